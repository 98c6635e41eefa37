"""Values that go into and come out of the event store."""

from __future__ import annotations

import enum
import os
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from pydantic import BaseModel

from aura_pg.errors import EventValidationError


class StreamState(enum.Enum):
    """Expected stream states for optimistic concurrency, beside exact versions."""

    ANY = "any"
    """Append whatever the stream's version."""
    NO_STREAM = "no_stream"
    """The stream must not exist yet (same as expected version 0)."""
    STREAM_EXISTS = "stream_exists"
    """The stream must have at least one event."""

    def __repr__(self) -> str:
        return self.name


ANY: Final = StreamState.ANY
NO_STREAM: Final = StreamState.NO_STREAM
STREAM_EXISTS: Final = StreamState.STREAM_EXISTS

ExpectedVersion = StreamState | int
"""``ANY``, ``NO_STREAM``, ``STREAM_EXISTS`` or the stream's exact current version."""


class Direction(enum.Enum):
    FORWARDS = "forwards"
    BACKWARDS = "backwards"

    def __repr__(self) -> str:
        return self.name


FORWARDS: Final = Direction.FORWARDS
BACKWARDS: Final = Direction.BACKWARDS


def uuid7() -> uuid.UUID:
    """A time-ordered UUID (RFC 9562 version 7).

    Event ids made this way land at the right edge of the unique index, which
    keeps inserts cache-friendly where random UUIDs would touch random pages.
    """
    unix_ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (unix_ms & 0xFFFF_FFFF_FFFF) << 80 | rand
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    return uuid.UUID(int=value)


Payload = Mapping[str, Any] | BaseModel


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append.

    ``data`` and ``metadata`` are JSON objects: mappings or pydantic models.
    ``idempotency_key`` defaults to the event id, so a retry of the same
    ``NewEvent`` object is recognised as a duplicate.
    """

    type: str
    data: Payload
    metadata: Payload | None = None
    idempotency_key: str | None = None
    event_id: uuid.UUID = field(default_factory=uuid7)

    def __post_init__(self) -> None:
        if not isinstance(self.event_id, uuid.UUID):
            raise EventValidationError(
                f"event_id must be a uuid.UUID, not {type(self.event_id).__name__}"
            )

    @property
    def key(self) -> str:
        """The idempotency key in effect: the explicit key or the event id."""
        return self.idempotency_key if self.idempotency_key is not None else str(self.event_id)


@dataclass(frozen=True, slots=True, order=True)
class Checkpoint:
    """A position in the global commit order: pass it back to ``read_all``.

    Ordered by (transaction_id, global_position), the order readers see.
    ``str()`` gives a compact form that ``Checkpoint.parse`` reads back.
    """

    transaction_id: int
    global_position: int

    def __str__(self) -> str:
        return f"{self.transaction_id}/{self.global_position}"

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        try:
            tx, pos = text.split("/")
            checkpoint = cls(int(tx), int(pos))
        except ValueError:
            raise ValueError(
                f"not a checkpoint: {text!r} (expected 'TRANSACTION/POSITION')"
            ) from None
        if checkpoint.transaction_id < 0 or checkpoint.global_position < 0:
            raise ValueError(f"not a checkpoint: {text!r} (negative)")
        return checkpoint


START: Final = Checkpoint(0, 0)
"""The checkpoint before the first event."""


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    """An event as stored."""

    global_position: int
    transaction_id: int
    event_id: uuid.UUID
    stream_id: str
    version: int
    type: str
    data: dict[str, Any]
    metadata: dict[str, Any]
    idempotency_key: str
    recorded_at: datetime

    @property
    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self.transaction_id, self.global_position)


@dataclass(frozen=True, slots=True)
class AppendedEvent:
    """Where one appended event was recorded."""

    event_id: uuid.UUID
    version: int
    global_position: int


@dataclass(frozen=True, slots=True)
class AppendResult:
    """The outcome of ``append``: the events' positions, in batch order.

    ``duplicate`` is True when the whole batch had been recorded before; the
    positions are then those recorded the first time and nothing was written.
    """

    stream_id: str
    events: tuple[AppendedEvent, ...]
    duplicate: bool

    @property
    def version(self) -> int:
        """The stream version after the batch's last event."""
        return self.events[-1].version


@dataclass(frozen=True, slots=True)
class StreamAppend:
    """One stream's batch in ``append_many``: as the arguments of ``append``.

    ``sequence`` (optional): each event's place in the commit order of the
    whole call, ascending; without it the call's events are committed
    stream by stream. ``aura-pg import jsonl`` keeps a file's order so.
    """

    stream_id: str
    events: NewEvent | Iterable[NewEvent]
    expected_version: ExpectedVersion = StreamState.ANY
    sequence: Sequence[int] | None = None


@dataclass(frozen=True, slots=True)
class Page:
    """One page of ``read_all``: events in commit order, and where to go on."""

    events: tuple[RecordedEvent, ...]
    checkpoint: Checkpoint
    """Pass as ``after`` to read on; it may be past the last event returned
    when a type filter skipped the events behind it."""

    @property
    def is_empty(self) -> bool:
        return not self.events
