"""The store's operations, free of I/O, shared by EventStore and AsyncEventStore.

Each operation is a generator: it validates its input (raising before any
connection is taken), yields instructions and returns the result. A driver
runs a :class:`Statement` and sends back its rows (or throws its
``psycopg.Error`` in), and sleeps through a :class:`Pause` (sending None).
Everything else is decided here: which statement, how its rows become
results, which database errors become typed errors, and whether a failed
append is sent again and after how long. The sync and async stores differ
only in how they run a statement and how they sleep, so they cannot drift
apart.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, LiteralString

import psycopg

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
    RecordedEvent,
    StreamAppend,
)
from aura_pg.store.retry import AppendRetry, wait_before_resending
from aura_pg.store.validation import (
    MAX_LIMIT,
    MAX_TRANSACTION_ID,
    MAX_VERSION,
    as_batch,
    check_limit,
    check_sequence,
    check_stream_id,
    encode_batch,
    expected_from_text,
    expected_version_param,
    types_param,
)

_QUERIES: Final = named_queries("queries/store.sql")
_APPENDS: Final = (_QUERIES["append_events"], _QUERIES["append_many"])

# aura.append_many's ceiling of streams per call (one advisory lock each).
MAX_BULK_STREAMS: Final = 10_000
# append_many's default chunks: each a transaction of at most this many
# streams and (about) this many events. The server's lock table is shared:
# max_locks_per_transaction * max_connections entries (6,400 by default).
DEFAULT_CHUNK_STREAMS: Final = 1_000
DEFAULT_CHUNK_EVENTS: Final = 20_000


@dataclass(frozen=True, slots=True)
class Statement:
    """Run this and send back its rows."""

    sql: LiteralString
    params: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Pause:
    """Sleep this many seconds, then send None (a wait between append attempts)."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Copy:
    """Run ``prepare`` (statements without results), then COPY ``rows`` in
    with ``sql`` (binary, columns of ``types``); send back no rows."""

    prepare: tuple[LiteralString, ...]
    sql: LiteralString
    types: tuple[str, ...]
    rows: Sequence[tuple[Any, ...]]


Instruction = Statement | Pause | Copy
Rows = list[tuple[Any, ...]]
Operation = Generator[Instruction, Rows | None, Any]


def _run(statement: Statement | Copy) -> Generator[Instruction, Rows | None, Rows]:
    """The rows of one statement; a database error the store raises on
    purpose comes out typed, any other as it is."""
    try:
        rows = yield statement
    except psycopg.Error as exc:
        typed = translate_error(exc, statement) if isinstance(statement, Statement) else None
        if typed is None:
            raise
        raise typed from exc
    if rows is None:
        raise TypeError("a Statement must be answered with its rows")
    return rows


def _resending(
    statement: Statement, retry: AppendRetry | None, stream_id: str
) -> Generator[Instruction, Rows | None, Rows]:
    """The rows of an append statement, sent again after a transient failure
    as long as ``retry`` allows (aura_pg.store.retry): each attempt takes a
    new connection from the driver, and a pause comes before each resend."""
    began = time.monotonic()
    attempt = 1
    while True:
        try:
            return (yield from _run(statement))
        except psycopg.Error as exc:
            elapsed = time.monotonic() - began
            delay = wait_before_resending(retry, stream_id, exc, attempt, elapsed)
            if delay is None:
                raise
        yield Pause(delay)
        attempt += 1


def check_retry(retry: AppendRetry | None, conn: object) -> None:
    if retry is not None and not isinstance(retry, AppendRetry):
        raise TypeError(f"retry must be an AppendRetry, not {type(retry).__name__}")
    if retry is not None and conn is not None:
        # A failed statement aborts the caller's transaction: there is
        # nothing left to retry in, and only the caller can start over.
        raise ValueError("retry cannot be used with conn=: retry the caller's transaction")


def append(
    stream_id: str,
    events: NewEvent | Iterable[NewEvent],
    expected_version: ExpectedVersion,
    max_payload_bytes: int,
    traceparent: str | None = None,
    retry: AppendRetry | None = None,
) -> Operation:
    check_stream_id(stream_id)
    expected = expected_version_param(expected_version)
    batch = as_batch(events)
    statement = Statement(
        _QUERIES["append_events"],
        {
            "stream_id": stream_id,
            "events": encode_batch(batch, max_payload_bytes, traceparent),
            "expected_version": expected,
        },
    )
    rows = yield from _resending(statement, retry, stream_id)
    duplicate = bool(rows[0][2])
    return AppendResult(
        stream_id=stream_id,
        events=tuple(
            AppendedEvent(row[3] if duplicate else event.event_id, row[0], row[1])
            for event, row in zip(batch, rows, strict=True)
        ),
        duplicate=duplicate,
    )


@dataclass(frozen=True, slots=True)
class _Staged:
    stream_id: str
    batch: Sequence[NewEvent]
    expected: str
    events: str  # the batch as aura.append_events' JSON array


def _positive(name: str, value: object, ceiling: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= ceiling:
        raise ValueError(f"{name} must be an int from 1 to {ceiling}, not {value!r}")
    return value


def append_many(
    appends: Iterable[StreamAppend],
    max_payload_bytes: int,
    chunk_streams: int = DEFAULT_CHUNK_STREAMS,
    chunk_events: int = DEFAULT_CHUNK_EVENTS,
    *,
    in_transaction: bool = False,
) -> Operation:
    """Validate every stream's batch now (before any connection is taken),
    then append them in chunks: each chunk is one COPY into the session's
    staging table and one call of aura.append_many, a transaction of its
    own unless ``in_transaction`` (the caller's), when the whole call is
    one chunk at most."""
    _positive("chunk_streams", chunk_streams, MAX_BULK_STREAMS)
    _positive("chunk_events", chunk_events, 2**31 - 1)
    if isinstance(appends, StreamAppend):
        appends = (appends,)
    staged: list[_Staged] = []
    streams: set[str] = set()
    ids: set[uuid.UUID] = set()
    for index, item in enumerate(appends, start=1):
        if not isinstance(item, StreamAppend):
            raise EventValidationError(
                f"append {index} must be a StreamAppend, not {type(item).__name__}"
            )
        stream_id = check_stream_id(item.stream_id)
        if stream_id in streams:
            raise EventValidationError(
                f"stream {stream_id!r} appears more than once: give each stream one batch"
            )
        streams.add(stream_id)
        batch = as_batch(item.events)
        expected = expected_version_param(item.expected_version)
        try:
            sequence = check_sequence(item.sequence, len(batch))
            text = encode_batch(batch, max_payload_bytes, sequence=sequence)
        except EventValidationError as exc:
            raise EventValidationError(f"stream {stream_id!r}: {exc}") from None
        for event in batch:
            if event.event_id in ids:
                raise EventValidationError(
                    f"event id {event.event_id} repeats within the call (stream {stream_id!r})"
                )
            ids.add(event.event_id)
        staged.append(_Staged(stream_id, batch, expected, text))
    if in_transaction and len(staged) > chunk_streams:
        raise EventValidationError(
            f"{len(staged)} streams in one transaction, over chunk_streams={chunk_streams}: "
            "without conn= the store splits the call into transactions of that many"
        )
    chunks: list[list[_Staged]] = []
    size = 0
    for one in staged:
        if not chunks or (
            not in_transaction
            and (len(chunks[-1]) >= chunk_streams or size + len(one.batch) > chunk_events)
        ):
            chunks.append([])
            size = 0
        chunks[-1].append(one)
        size += len(one.batch)
    return _append_chunks(chunks)


def _append_chunks(chunks: list[list[_Staged]]) -> Operation:
    results: list[AppendResult] = []
    for chunk in chunks:
        token = uuid.uuid4()
        yield from _run(
            Copy(
                (_QUERIES["bulk_staging"], _QUERIES["bulk_truncate"]),
                _QUERIES["bulk_copy"],
                ("uuid", "int4", "text", "text", "text"),
                [(token, n, s.stream_id, s.expected, s.events) for n, s in enumerate(chunk)],
            )
        )
        try:
            rows = yield from _run(
                Statement(_QUERIES["append_many"], {"token": token, "streams": len(chunk)})
            )
        except EventValidationError as exc:
            if "needs at least one stream" in str(exc):
                # Only when the staged rows were not all there: another
                # client shared the session (a transaction-mode pooler).
                raise AuraPgError(
                    "append_many found its staged batches incomplete: it needs a database "
                    "session of its own across its statements (not a transaction-mode "
                    "pooler); nothing of this chunk was written"
                ) from exc
            raise
        by_stream: dict[str, list[tuple[Any, ...]]] = {}
        for row in rows:
            by_stream.setdefault(row[0], []).append(row)
        for item in chunk:
            recorded = sorted(by_stream[item.stream_id], key=lambda row: row[1])
            duplicate = bool(recorded[0][3])
            results.append(
                AppendResult(
                    stream_id=item.stream_id,
                    events=tuple(
                        AppendedEvent(row[4] if duplicate else event.event_id, row[1], row[2])
                        for event, row in zip(item.batch, recorded, strict=True)
                    ),
                    duplicate=duplicate,
                )
            )
    return results


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


def read_all(after: Checkpoint | None, limit: int, types: Iterable[str] | None) -> Operation:
    check_limit(limit, optional=False)
    limit = min(limit, MAX_LIMIT)  # no page holds more; the SQL function takes an integer
    position = after if after is not None else START
    if not isinstance(position, Checkpoint):
        raise ValueError(f"after must be a Checkpoint or None, not {type(position).__name__}")
    if not (
        0 <= position.transaction_id <= MAX_TRANSACTION_ID
        and 0 <= position.global_position <= MAX_VERSION
    ):
        raise EventValidationError(f"after is not a checkpoint of this store: {position}")
    rows = yield from _run(
        Statement(
            _QUERIES["read_all"],
            {
                "after_transaction_id": str(position.transaction_id),
                "after_position": position.global_position,
                "limit": limit,
                "types": types_param(types),
            },
        )
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
    check_stream_id(stream_id)
    if not isinstance(direction, Direction):
        raise ValueError(f"direction must be FORWARDS or BACKWARDS, not {direction!r}")
    backwards = direction is Direction.BACKWARDS
    if from_version is None:
        from_version = MAX_VERSION if backwards else 1
    if isinstance(from_version, bool) or not isinstance(from_version, int) or from_version < 0:
        raise ValueError(f"from_version must be an int >= 0, not {from_version!r}")
    check_limit(limit, optional=True)
    rows = yield from _run(
        Statement(
            _QUERIES["read_stream"],
            {
                "stream_id": stream_id,
                "from_version": min(from_version, MAX_VERSION),
                "limit": None if limit is None else min(limit, MAX_LIMIT),
                "backwards": backwards,
            },
        )
    )
    return [_recorded(row) for row in rows]


def stream_version(stream_id: str) -> Operation:
    check_stream_id(stream_id)
    rows = yield from _run(Statement(_QUERIES["stream_version"], {"stream_id": stream_id}))
    return int(rows[0][0])


def translate_error(exc: psycopg.Error, statement: Statement) -> AuraPgError | None:
    """The typed error for a database error the store raises on purpose."""
    diag = exc.diag
    stream_id = str(statement.params.get("stream_id", "?"))
    state = exc.sqlstate
    if state == "AU001":
        detail = json.loads(diag.message_detail or "{}")
        return ConcurrencyError(
            detail.get("stream_id", stream_id),
            expected_from_text(str(detail.get("expected", "any"))),
            int(detail.get("actual", -1)),
        )
    if state == "40001" and statement.sql in _APPENDS:
        detail = json.loads(diag.message_detail or "{}")
        if detail.get("reason") == "stream_order":
            return StreamOrderConflict(
                detail.get("stream_id", stream_id),
                expected_from_text(str(detail.get("expected", "any"))),
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
    if state in ("22003", "54001") and statement.sql in _APPENDS:
        # The batch's JSON: a number beyond numeric's range, or nesting
        # deeper than the server's stack (only reachable from raw JSON, or
        # with Python's int digit limit lifted).
        return EventValidationError(diag.message_primary or str(exc))
    return None
