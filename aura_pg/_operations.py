"""The store's operations, free of I/O, shared by EventStore and AsyncEventStore.

Each operation is a generator: it validates its input (raising before any
connection is taken), yields the statements to run, receives their rows and
returns the result. The sync and async stores differ only in how they run a
statement, so the two cannot drift apart.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, LiteralString

import psycopg
from pydantic import BaseModel

from aura_pg._resources import named_queries
from aura_pg.errors import (
    AuraPgError,
    ConcurrencyError,
    EventValidationError,
    IdempotencyConflict,
    StreamOrderConflict,
)
from aura_pg.models import (
    START,
    AppendedEvent,
    AppendResult,
    Checkpoint,
    Direction,
    ExpectedVersion,
    NewEvent,
    Page,
    Payload,
    RecordedEvent,
    StreamState,
)
from aura_pg.observability.tracing import TRACEPARENT

MAX_STREAM_ID_LENGTH: Final = 200
MAX_TYPE_LENGTH: Final = 200
MAX_IDEMPOTENCY_KEY_LENGTH: Final = 255
DEFAULT_MAX_PAYLOAD_BYTES: Final = 1024 * 1024
_MAX_VERSION: Final = 2**63 - 1
# The SQL functions take limits as integer and transaction ids as xid8.
_MAX_LIMIT: Final = 2**31 - 1
_MAX_TRANSACTION_ID: Final = 2**64 - 1

# Postgres' [[:cntrl:]] in a UTF-8 database: C0, DEL and C1 controls.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# A NUL escape in JSON text (not an escaped backslash followed by "u0000"):
# jsonb cannot store it.
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
# A lone surrogate (a str from undecodable bytes, "\udcff"): not valid UTF-8,
# so it cannot reach the server.
_SURROGATE = re.compile(r"[\ud800-\udfff]")

_QUERIES: Final = named_queries("queries/store.sql")

# Event types come from a small vocabulary: remember the valid ones so the
# hot path checks each name once per process (bounded, in case it is not small).
_VALID_TYPES: set[str] = set()
_VALID_TYPES_MAX: Final = 10_000


@dataclass(frozen=True, slots=True)
class Statement:
    sql: LiteralString
    params: Mapping[str, Any]


Rows = list[tuple[Any, ...]]
Operation = Generator[Statement, Rows, Any]


def _check_name(what: str, value: object, max_length: int) -> str:
    if not isinstance(value, str):
        raise EventValidationError(f"{what} must be a str, not {type(value).__name__}")
    if not 1 <= len(value) <= max_length:
        raise EventValidationError(
            f"{what} must have 1 to {max_length} characters, not {len(value)}"
        )
    if _CONTROL.search(value):
        raise EventValidationError(f"{what} {value!r} contains control characters")
    if not value.isascii() and _SURROGATE.search(value):
        raise EventValidationError(f"{what} {value!r} contains a lone surrogate (not valid UTF-8)")
    return value


def _payload_object(what: str, value: Payload) -> dict[str, Any]:
    if isinstance(value, BaseModel):
        dumped: dict[str, Any] = value.model_dump(mode="json")
        return dumped
    if isinstance(value, dict):
        return value
    if isinstance(value, Mapping):
        return dict(value)
    raise EventValidationError(
        f"{what} must be a mapping or a pydantic model (a JSON object), not {type(value).__name__}"
    )


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def encodable(text: str) -> bool:
    """Whether ``text`` is valid UTF-8 (no lone surrogate), as the server needs."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _check_payload_text(what: str, value: dict[str, Any], max_bytes: int) -> None:
    """Precise checks of one payload; only run when the whole batch is suspect."""
    try:
        text = _dumps(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise EventValidationError(f"{what} is not JSON-serialisable: {exc}") from None
    try:
        size = len(text.encode())
    except UnicodeEncodeError:
        raise EventValidationError(
            f"{what} contains a lone surrogate, which is not valid UTF-8"
        ) from None
    if size > max_bytes:
        raise EventValidationError(f"{what} is {size} bytes, over the limit of {max_bytes}")
    if _JSON_NUL.search(text):
        raise EventValidationError(f"{what} contains a NUL character, which jsonb cannot store")


def encode_batch(
    events: Sequence[NewEvent], max_payload_bytes: int, traceparent: str | None = None
) -> str:
    """Validate a batch and encode it as the JSON array aura.append_events takes.

    ``traceparent`` (the appending span's W3C trace context) goes into each
    event's metadata, unless the event carries one of its own.

    The batch is serialised once; payloads are examined one by one only when
    that fails or the batch is big enough that one of them could be too large.
    """
    if not events:
        raise EventValidationError("an append needs at least one event")
    items: list[dict[str, Any]] = []
    keys: set[str] = set()
    ids: set[uuid.UUID] = set()
    for index, event in enumerate(events, start=1):
        if not isinstance(event, NewEvent):
            raise EventValidationError(
                f"event {index} must be a NewEvent, not {type(event).__name__}"
            )
        if event.type not in _VALID_TYPES:
            _check_name(f"event {index} type", event.type, MAX_TYPE_LENGTH)
            if len(_VALID_TYPES) < _VALID_TYPES_MAX:
                _VALID_TYPES.add(event.type)
        # The id's text once (str(UUID) is not free); a key left to default
        # to it is not sent: the server takes the event id (as it does for
        # events appended from SQL).
        event_id = str(event.event_id)
        key = event.idempotency_key
        if key is None:
            key = event_id
        else:
            _check_name(f"event {index} idempotency_key", key, MAX_IDEMPOTENCY_KEY_LENGTH)
        if key in keys:
            raise EventValidationError(f"idempotency key {key!r} repeats within the batch")
        if event.event_id in ids:
            raise EventValidationError(f"event id {event.event_id} repeats within the batch")
        keys.add(key)
        ids.add(event.event_id)
        metadata = (
            {}
            if event.metadata is None
            else _payload_object(f"event {index} metadata", event.metadata)
        )
        if traceparent is not None and TRACEPARENT not in metadata:
            metadata = {**metadata, TRACEPARENT: traceparent}
        item: dict[str, Any] = {
            "event_id": event_id,
            "type": event.type,
            "data": _payload_object(f"event {index} data", event.data),
            "metadata": metadata,
        }
        if event.idempotency_key is not None:
            item["idempotency_key"] = key
        items.append(item)
    try:
        text = _dumps(items)
    except (TypeError, ValueError, RecursionError):  # nested deeper than Python recurses
        text = ""
    # A UTF-8 character takes at most 4 bytes: a short batch cannot hold an
    # oversized payload, and most batches skip the per-payload checks. Only
    # a non-ASCII batch can hold a lone surrogate (isascii is O(1)).
    if (
        not text
        or len(text) * 4 > max_payload_bytes
        or "\\u0000" in text
        or not (text.isascii() or encodable(text))
    ):
        for index, item in enumerate(items, start=1):
            _check_payload_text(f"event {index} data", item["data"], max_payload_bytes)
            _check_payload_text(f"event {index} metadata", item["metadata"], max_payload_bytes)
    if not text:
        raise EventValidationError("the batch is not JSON-serialisable")
    return text


def expected_version_param(expected: ExpectedVersion) -> str:
    if isinstance(expected, StreamState):
        return expected.value
    if isinstance(expected, bool) or not isinstance(expected, int):
        raise EventValidationError(
            "expected_version must be ANY, NO_STREAM, STREAM_EXISTS or an int, "
            f"not {type(expected).__name__}"
        )
    if not 0 <= expected <= _MAX_VERSION:
        raise EventValidationError(f"expected_version must be >= 0, not {expected}")
    return str(expected)


def as_batch(events: NewEvent | Iterable[NewEvent]) -> Sequence[NewEvent]:
    if isinstance(events, NewEvent):
        return (events,)
    if isinstance(events, str | bytes | Mapping):
        raise EventValidationError("events must be a NewEvent or an iterable of NewEvent")
    return tuple(events)


def append(
    stream_id: str,
    events: NewEvent | Iterable[NewEvent],
    expected_version: ExpectedVersion,
    max_payload_bytes: int,
    traceparent: str | None = None,
) -> Operation:
    _check_name("stream_id", stream_id, MAX_STREAM_ID_LENGTH)
    expected = expected_version_param(expected_version)
    batch = as_batch(events)
    rows = yield Statement(
        _QUERIES["append_events"],
        {
            "stream_id": stream_id,
            "events": encode_batch(batch, max_payload_bytes, traceparent),
            "expected_version": expected,
        },
    )
    duplicate = bool(rows[0][2])
    return AppendResult(
        stream_id=stream_id,
        events=tuple(
            AppendedEvent(row[3] if duplicate else event.event_id, row[0], row[1])
            for event, row in zip(batch, rows, strict=True)
        ),
        duplicate=duplicate,
    )


def _recorded(row: Sequence[Any]) -> RecordedEvent:
    return RecordedEvent(
        global_position=row[0],
        transaction_id=int(row[1]),
        event_id=row[2],
        stream_id=row[3],
        version=row[4],
        type=row[5],
        data=row[6],
        metadata=row[7],
        idempotency_key=row[8],
        recorded_at=row[9],
    )


def _check_limit(limit: object, *, optional: bool) -> None:
    if limit is None and optional:
        return
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive int, not {limit!r}")


def _types_param(types: Iterable[str] | None) -> list[str] | None:
    if types is None:
        return None
    if isinstance(types, str):
        raise ValueError("types must be an iterable of event type names, not one str")
    names = [_check_name("event type filter", t, MAX_TYPE_LENGTH) for t in types]
    if not names:
        raise ValueError("types must name at least one event type (None reads all types)")
    return names


def read_all(after: Checkpoint | None, limit: int, types: Iterable[str] | None) -> Operation:
    _check_limit(limit, optional=False)
    limit = min(limit, _MAX_LIMIT)  # no page holds more; the SQL function takes an integer
    position = after if after is not None else START
    if not isinstance(position, Checkpoint):
        raise ValueError(f"after must be a Checkpoint or None, not {type(position).__name__}")
    if not (
        0 <= position.transaction_id <= _MAX_TRANSACTION_ID
        and 0 <= position.global_position <= _MAX_VERSION
    ):
        raise EventValidationError(f"after is not a checkpoint of this store: {position}")
    rows = yield Statement(
        _QUERIES["read_all"],
        {
            "after_transaction_id": str(position.transaction_id),
            "after_position": position.global_position,
            "limit": limit,
            "types": _types_param(types),
        },
    )
    events = tuple(_recorded(row[2:]) for row in rows if row[2] is not None)
    checkpoint = events[-1].checkpoint if events else position
    horizon_tx, horizon_position = rows[0][0], rows[0][1]
    if len(events) < limit and horizon_tx is not None:
        # Everything below the horizon has been looked at: skip past events
        # a type filter left out, so the next read does not scan them again.
        checkpoint = max(checkpoint, Checkpoint(int(horizon_tx), horizon_position))
    return Page(events=events, checkpoint=checkpoint)


def read_stream(
    stream_id: str, from_version: int | None, direction: Direction, limit: int | None
) -> Operation:
    _check_name("stream_id", stream_id, MAX_STREAM_ID_LENGTH)
    if not isinstance(direction, Direction):
        raise ValueError(f"direction must be FORWARDS or BACKWARDS, not {direction!r}")
    backwards = direction is Direction.BACKWARDS
    if from_version is None:
        from_version = _MAX_VERSION if backwards else 1
    if isinstance(from_version, bool) or not isinstance(from_version, int) or from_version < 0:
        raise ValueError(f"from_version must be an int >= 0, not {from_version!r}")
    _check_limit(limit, optional=True)
    rows = yield Statement(
        _QUERIES["read_stream"],
        {
            "stream_id": stream_id,
            "from_version": min(from_version, _MAX_VERSION),
            "limit": None if limit is None else min(limit, _MAX_LIMIT),
            "backwards": backwards,
        },
    )
    return [_recorded(row) for row in rows]


def stream_version(stream_id: str) -> Operation:
    _check_name("stream_id", stream_id, MAX_STREAM_ID_LENGTH)
    rows = yield Statement(_QUERIES["stream_version"], {"stream_id": stream_id})
    return int(rows[0][0])


def _expected_from_text(text: str) -> ExpectedVersion:
    return int(text) if text.isdigit() else StreamState(text)


def translate_error(exc: psycopg.Error, statement: Statement) -> AuraPgError | None:
    """The typed error for a database error the store raises on purpose."""
    diag = exc.diag
    stream_id = str(statement.params.get("stream_id", "?"))
    state = exc.sqlstate
    if state == "AU001":
        detail = json.loads(diag.message_detail or "{}")
        return ConcurrencyError(
            detail.get("stream_id", stream_id),
            _expected_from_text(str(detail.get("expected", "any"))),
            int(detail.get("actual", -1)),
        )
    if state == "40001" and statement.sql == _QUERIES["append_events"]:
        detail = json.loads(diag.message_detail or "{}")
        if detail.get("reason") == "stream_order":
            return StreamOrderConflict(
                detail.get("stream_id", stream_id),
                _expected_from_text(str(detail.get("expected", "any"))),
                int(detail.get("actual", -1)),
            )
        return None
    if state == "AU002":
        detail = json.loads(diag.message_detail or "{}")
        return IdempotencyConflict(
            detail.get("stream_id", stream_id), diag.message_primary or str(exc)
        )
    if state in ("AU003", "23514", "22P05", "22P02"):
        return EventValidationError(diag.message_primary or str(exc))
    if state in ("22003", "54001") and statement.sql == _QUERIES["append_events"]:
        # The batch's JSON: a number beyond numeric's range, or nesting
        # deeper than the server's stack (only reachable from raw JSON, or
        # with Python's int digit limit lifted).
        return EventValidationError(diag.message_primary or str(exc))
    if state == "23505" and diag.constraint_name == "events_event_id_key":
        return IdempotencyConflict(
            stream_id, f"an event with this id was recorded before: {diag.message_detail}"
        )
    return None
