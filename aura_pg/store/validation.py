"""Checking and encoding what the store is given, before any connection is taken.

Everything here is pure: names, versions and payloads are checked the way
the server checks them (so a bad event fails fast, with a typed error and
nothing sent), and a batch is encoded once as the JSON array that
``aura.append_events`` takes.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from pydantic import BaseModel

from aura_pg.errors import EventValidationError
from aura_pg.models import ExpectedVersion, NewEvent, Payload, StreamState
from aura_pg.observability.tracing import TRACEPARENT

MAX_STREAM_ID_LENGTH: Final = 200
MAX_TYPE_LENGTH: Final = 200
MAX_IDEMPOTENCY_KEY_LENGTH: Final = 255
DEFAULT_MAX_PAYLOAD_BYTES: Final = 1024 * 1024
MAX_VERSION: Final = 2**63 - 1
# The SQL functions take limits as integer and transaction ids as xid8.
MAX_LIMIT: Final = 2**31 - 1
MAX_TRANSACTION_ID: Final = 2**64 - 1

# Postgres' [[:cntrl:]] in a UTF-8 database: C0, DEL and C1 controls.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# A NUL escape in JSON text (not an escaped backslash followed by "u0000"):
# jsonb cannot store it.
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
# A lone surrogate (a str from undecodable bytes, "\udcff"): not valid UTF-8,
# so it cannot reach the server.
_SURROGATE = re.compile(r"[\ud800-\udfff]")

# Event types come from a small vocabulary: remember the valid ones so the
# hot path checks each name once per process (bounded, in case it is not small).
_VALID_TYPES: set[str] = set()
_VALID_TYPES_MAX: Final = 10_000


def check_name(what: str, value: object, max_length: int) -> str:
    """``value`` if it is a str the server accepts as a name (stream id,
    event type, idempotency key); EventValidationError otherwise."""
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


def check_stream_id(stream_id: object) -> str:
    return check_name("stream_id", stream_id, MAX_STREAM_ID_LENGTH)


def check_payload_limit(max_payload_bytes: object) -> int:
    """A store's ``max_payload_bytes``: a positive int."""
    if (
        isinstance(max_payload_bytes, bool)
        or not isinstance(max_payload_bytes, int)
        or max_payload_bytes < 1
    ):
        raise ValueError(f"max_payload_bytes must be a positive int, not {max_payload_bytes!r}")
    return max_payload_bytes


def check_limit(limit: object, *, optional: bool) -> None:
    if limit is None and optional:
        return
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive int, not {limit!r}")


def types_param(types: Iterable[str] | None) -> list[str] | None:
    """The event type filter of ``read_all`` as the SQL function takes it."""
    if types is None:
        return None
    if isinstance(types, str):
        raise ValueError("types must be an iterable of event type names, not one str")
    names = [check_name("event type filter", t, MAX_TYPE_LENGTH) for t in types]
    if not names:
        raise ValueError("types must name at least one event type (None reads all types)")
    return names


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
    events: Sequence[NewEvent],
    max_payload_bytes: int,
    traceparent: str | None = None,
    sequence: Sequence[int] | None = None,
) -> str:
    """Validate a batch and encode it as the JSON array aura.append_events takes.

    ``traceparent`` (the appending span's W3C trace context) goes into each
    event's metadata, unless the event carries one of its own.

    ``sequence`` (aura.append_many only) gives each event its place in the
    call's commit order.

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
            check_name(f"event {index} type", event.type, MAX_TYPE_LENGTH)
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
            check_name(f"event {index} idempotency_key", key, MAX_IDEMPOTENCY_KEY_LENGTH)
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
        if sequence is not None:
            item["sequence"] = sequence[index - 1]
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


MAX_SEQUENCE: Final = 10**18 - 1


def check_sequence(sequence: object, events: int) -> list[int] | None:
    """A ``StreamAppend.sequence``: one int per event, ascending, 0 to 10**18 - 1."""
    if sequence is None:
        return None
    if isinstance(sequence, str | bytes) or not isinstance(sequence, Iterable):
        raise EventValidationError("sequence must be a sequence of ints, one per event")
    numbers = list(sequence)
    if len(numbers) != events:
        raise EventValidationError(f"sequence has {len(numbers)} numbers for {events} events")
    previous = -1
    for number in numbers:
        if isinstance(number, bool) or not isinstance(number, int):
            raise EventValidationError(f"sequence must hold ints, not {type(number).__name__}")
        if not previous < number <= MAX_SEQUENCE:
            raise EventValidationError(
                f"sequence must ascend from 0 to {MAX_SEQUENCE}: {number} after {previous}"
            )
        previous = number
    return numbers


def expected_version_param(expected: ExpectedVersion) -> str:
    if isinstance(expected, StreamState):
        return expected.value
    if isinstance(expected, bool) or not isinstance(expected, int):
        raise EventValidationError(
            "expected_version must be ANY, NO_STREAM, STREAM_EXISTS or an int, "
            f"not {type(expected).__name__}"
        )
    if not 0 <= expected <= MAX_VERSION:
        raise EventValidationError(f"expected_version must be >= 0, not {expected}")
    return str(expected)


def expected_from_text(text: str) -> ExpectedVersion:
    """The expected version as the server reports it in an error's detail."""
    return int(text) if text.isdigit() else StreamState(text)


def as_batch(events: NewEvent | Iterable[NewEvent]) -> Sequence[NewEvent]:
    if isinstance(events, NewEvent):
        return (events,)
    if isinstance(events, str | bytes | Mapping):
        raise EventValidationError("events must be a NewEvent or an iterable of NewEvent")
    return tuple(events)
