"""What the relay publishes to: the message a sink receives, the sink
protocols, and the errors by which a sink reports a failed delivery."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol, runtime_checkable

from aura_pg.errors import AuraPgError

# The client name a sink gives the servers it connects to.
APPLICATION_NAME: Final = "aura-pg relay"
DEFAULT_PUBLISH_TIMEOUT: Final = 5.0

# RFC 9110 token: what both HTTP and NATS accept as a header name.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Control characters other than tab would break (or be silently rewritten
# in) an HTTP or NATS header.
_HEADER_VALUE_INVALID = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class DeliveryError(AuraPgError):
    """This message was not delivered; the relay records a failed attempt."""


class SinkUnavailable(DeliveryError):
    """The sink itself failed (unreachable, no answer in time), not just this
    message: the relay also pauses the sink and leaves its other rows in the
    batch untouched, so an outage costs one timeout per pause, not one per row."""


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """One claimed ``aura.outbox`` row, ready to publish."""

    id: int
    sink: str
    topic: str
    message_id: uuid.UUID
    payload: bytes
    """The row's ``payload`` as JSON text, UTF-8."""
    headers: Mapping[str, str]
    """The row's ``headers`` object; non-string values as JSON text."""
    attempts: int
    """Attempts before this one."""


class Sink(Protocol):
    """Where the rows of one ``aura.outbox.sink`` value go."""

    @property
    def name(self) -> str:
        """The ``sink`` column value this sink publishes."""
        ...

    @property
    def topics(self) -> frozenset[str] | None:
        """The topics served, each paused on its own; None: every topic, paused together."""
        ...

    async def publish(self, message: OutboxMessage) -> None:
        """Deliver the message, or raise DeliveryError (SinkUnavailable)."""
        ...


@runtime_checkable
class ClosableSink(Protocol):
    """A sink holding a connection, which the relay closes when it stops."""

    async def close(self) -> None: ...


def header_strings(headers: object) -> dict[str, str]:
    """A row's ``headers`` object as header strings (non-string values as
    JSON text); DeliveryError for what no HTTP or NATS header can carry."""
    if not isinstance(headers, dict):
        raise DeliveryError(f"headers must be a JSON object, not {type(headers).__name__}")
    result: dict[str, str] = {}
    for key, value in headers.items():
        text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        if not _HEADER_NAME.fullmatch(key):
            raise DeliveryError(f"header name {key!r} is not a valid HTTP/NATS header name")
        if _HEADER_VALUE_INVALID.search(text):
            raise DeliveryError(f"header {key!r} has control characters in its value")
        result[key] = text
    return result


def without_headers(headers: Mapping[str, str], names: Iterable[str]) -> dict[str, str]:
    """``headers`` minus ``names``, compared case-insensitively."""
    drop = {name.lower() for name in names}
    return {key: value for key, value in headers.items() if key.lower() not in drop}
