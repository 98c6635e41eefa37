"""The database side of an import: a message's event (with its provenance
and idempotency key) appended, or the message dead-lettered; the lives of
a stream recorded; a database outage waited out with the message held.

The SQL is in ``sql/queries/importer.sql``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from aura_pg._resources import named_queries
from aura_pg._runtime import Backoff, can_resend, wait
from aura_pg.errors import EventValidationError, IdempotencyConflict, MigrationError
from aura_pg.importer.errors import RejectedMessage
from aura_pg.importer.mapping import ImportedEvent, MessageMapping, SourceMessage
from aura_pg.models import ANY, NewEvent
from aura_pg.store import AsyncEventStore
from aura_pg.store.retry import AppendRetry

log = logging.getLogger("aura_pg.importer")

_QUERIES: Final = named_queries("queries/importer.sql")

T = TypeVar("T")

SOURCE_NATS: Final = "nats"
APPLICATION_NAME: Final = "aura-pg import"
DEFAULT_DB_TIMEOUT: Final = 10.0
# Waits between attempts once AppendRetry gave up on a database outage: the
# importer holds the message and tries again until the database is back.
_OUTAGE_BACKOFF: Final = Backoff(base=0.5, cap=30.0)
_MAX_REASON_LENGTH: Final = 2000

PreparedMessage = tuple[str, NewEvent] | str
"""The stream id and event to append, or why the message is rejected."""


@functools.lru_cache(maxsize=16)  # one stream life per import: the same instant each time
def instant_text(moment: datetime) -> str:
    """A creation time as it appears in keys and metadata: UTC, microseconds."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _clean_text(text: str) -> str:
    # text and jsonb cannot hold NUL.
    return text.replace("\x00", "\\u0000")


def sequence_key(message: SourceMessage, plain: bool) -> str:
    """The key of a message that has none of its own: its sequence, which
    identifies it within one life of the stream only. ``plain``: the life
    this database imported first, which keeps the keys of before migration
    0009 (``ImportStore.has_plain_keys``)."""
    if plain or message.stream_created is None:
        return f"nats:{message.stream}:{message.sequence}"
    return f"nats:{message.stream}@{instant_text(message.stream_created)}:{message.sequence}"


def prepare(message: SourceMessage, mapping: MessageMapping, plain_keys: bool) -> PreparedMessage:
    """What ``mapping`` makes of ``message``, with the importer's provenance
    and key; or why the message is rejected."""
    try:
        result: Any = mapping(message)
    except RejectedMessage as exc:
        return f"rejected by the mapping: {exc}"
    except Exception as exc:
        return f"the mapping raised {type(exc).__name__}: {exc}"
    if not isinstance(result, ImportedEvent):
        return f"the mapping returned {type(result).__name__}, not an ImportedEvent"
    if not isinstance(result.metadata, Mapping):
        return f"the mapping's metadata is a {type(result.metadata).__name__}, not a mapping"
    key = result.idempotency_key
    if key is None:
        key = message.message_id or sequence_key(message, plain_keys)
    provenance: dict[str, Any] = {
        "nats_stream": message.stream,
        "nats_subject": message.subject,
        "nats_sequence": message.sequence,
    }
    if message.message_id is not None:
        provenance["nats_msg_id"] = message.message_id
    if message.stream_created is not None:
        provenance["nats_stream_created"] = instant_text(message.stream_created)
    try:
        event = NewEvent(
            result.type,
            result.data,
            metadata={**result.metadata, **provenance},
            idempotency_key=key,
        )
    except (EventValidationError, TypeError) as exc:
        return f"invalid event: {exc}"
    return result.stream_id, event


class ImportStore:
    """The event store an import appends to, with its dead letters and the
    stream lives it has seen. Open with :meth:`connect`."""

    def __init__(
        self, store: AsyncEventStore, retry: AppendRetry, conninfo: str | None = None
    ) -> None:
        self.store = store
        self.retry = retry
        self.conninfo = conninfo
        """Where ``hold`` opens its own session (None: no holding)."""

    @classmethod
    async def connect(cls, dsn: str, retry: AppendRetry, pool_size: int = 2) -> ImportStore:
        """A pool of up to ``pool_size`` connections on ``dsn`` once the
        import's tables are there (else MigrationError); a database that
        cannot be reached raises at once."""
        given = conninfo_to_dict(dsn)
        extra: dict[str, Any] = {}
        if "application_name" not in given:
            extra["application_name"] = APPLICATION_NAME
        if "connect_timeout" not in given:
            extra["connect_timeout"] = int(DEFAULT_DB_TIMEOUT)
        # One direct connection first: a clear error for a database that
        # cannot be reached, and the schema checked before anything is read.
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True, **extra) as conn:
            row = await (await conn.execute(_QUERIES["schema_ready"])).fetchone()
        if row is None or not row[0]:
            raise MigrationError(
                "aura.import_dead_letters or aura.import_stream_lives does not exist: "
                "run `aura-pg migrate` (migrations 0008 and 0009)"
            )
        store = await AsyncEventStore.connect(
            dsn, min_size=1, max_size=pool_size, timeout=DEFAULT_DB_TIMEOUT, kwargs=extra
        )
        return cls(store, retry, make_conninfo(dsn, **extra))

    async def hold(
        self, source: str, stream: str, consumer: str
    ) -> psycopg.AsyncConnection[Any] | None:
        """The session holding ``consumer`` for this importer (keep it open
        for the whole run), or None: another importer holds it."""
        if self.conninfo is None:
            raise ValueError("this ImportStore was made without a connection string")
        conn = await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True)
        try:
            params = {"source": source, "stream": stream, "consumer": consumer}
            row = await (await conn.execute(_QUERIES["hold_consumer"], params)).fetchone()
        except BaseException:
            await conn.close()
            raise
        if row is None or not row[0]:
            await conn.close()
            return None
        return conn

    @staticmethod
    async def still_holding(conn: psycopg.AsyncConnection[Any]) -> None:
        """Raise (a psycopg error) when the holding session is gone: the
        lock went with it, and another importer may have taken over."""
        await conn.execute(_QUERIES["still_holding"])

    async def close(self) -> None:
        await self.store.close()

    def _pool(self) -> AsyncConnectionPool[Any]:
        pool = self.store.pool
        assert pool is not None  # connect() made the store with one
        return pool

    async def has_plain_keys(self, stream: str, created: datetime) -> bool:
        """Record the life of ``stream`` created at ``created``; whether its
        sequence keys are the plain ones (see :func:`sequence_key`)."""
        params = {"source": SOURCE_NATS, "stream": stream, "created": created}
        async with self._pool().connection() as conn:
            await conn.execute(_QUERIES["claim_plain_keys"], params)
            await conn.execute(_QUERIES["record_stream_life"], params)
            row = await (await conn.execute(_QUERIES["stream_life_plain_keys"], params)).fetchone()
        assert row is not None
        return bool(row[0])

    async def dead_letter(self, message: SourceMessage, reason: str) -> bool:
        """Record a rejected message; False when it was recorded before."""
        headers = {_clean_text(k): _clean_text(v) for k, v in message.headers.items()}
        async with self._pool().connection() as conn:
            cursor = await conn.execute(
                _QUERIES["record_dead_letter"],
                {
                    "source": SOURCE_NATS,
                    "stream": message.stream,
                    "subject": message.subject,
                    "sequence": message.sequence,
                    "message_id": None
                    if message.message_id is None
                    else _clean_text(message.message_id),
                    "headers": Jsonb(headers),
                    "payload": message.data,
                    "reason": _clean_text(reason)[:_MAX_REASON_LENGTH],
                },
            )
            return await cursor.fetchone() is not None

    async def _until_done(
        self, attempt: Callable[[], Awaitable[T]], what: str, stop: asyncio.Event | None
    ) -> T | None:
        """``attempt()``'s result, tried again with backoff for as long as the
        database is unavailable; None when ``stop`` was set meanwhile. Raises
        the database errors after which the same statement cannot simply be
        sent again, and whatever else ``attempt`` raises."""
        failures = 0
        while True:
            try:
                return await attempt()
            except psycopg.Error as exc:
                if not can_resend(exc):
                    raise
                failures += 1
                delay = _OUTAGE_BACKOFF.delay(failures)
                log.warning(
                    "%s: database unavailable (%s); trying again in %.3g s",
                    what, str(exc).strip().splitlines()[0]
                    if str(exc).strip() else type(exc).__name__, delay,
                )  # fmt: skip
                if stop is not None:
                    await wait(stop, delay)
                    if stop.is_set():
                        return None
                else:
                    await asyncio.sleep(delay)

    async def record(
        self, message: SourceMessage, prepared: PreparedMessage, stop: asyncio.Event | None = None
    ) -> str | None:
        """Append the prepared event (or dead-letter the message): its
        outcome, or None when ``stop`` was set while the database was
        unavailable (nothing to acknowledge then). Raises on database
        errors after which the same append cannot simply be sent again."""
        what = f"stream {message.stream} sequence {message.sequence}"
        if not isinstance(prepared, str):
            stream_id, event = prepared
            try:
                # The same NewEvent (the same event id and key) on every
                # attempt: an attempt that committed unseen is a duplicate.
                result = await self._until_done(
                    lambda: self.store.append(stream_id, event, ANY, retry=self.retry), what, stop
                )
            except (EventValidationError, IdempotencyConflict) as exc:
                prepared = f"the store refused the event: {exc}"
            else:
                if result is None:
                    return None
                return "duplicate" if result.duplicate else "appended"
        reason = prepared
        new = await self._until_done(lambda: self.dead_letter(message, reason), what, stop)
        if new is None:
            return None
        if new:
            log.warning("%s dead-lettered: %s", what, reason)
        return "rejected" if new else "duplicate"

    async def record_many(
        self,
        stream_id: str,
        batch: Sequence[tuple[SourceMessage, NewEvent]],
        stop: asyncio.Event | None = None,
    ) -> list[str | None]:
        """Append the events of consecutive messages of one stream, in
        order: one append for all of them, or, when the store refuses that
        batch (a key recorded before, a key twice in the batch, an event it
        refuses), one :meth:`record` per message, so that each message gets
        its own outcome (appended, duplicate, or dead-lettered when refused)
        exactly as if it came alone. The outcomes in batch order; None for
        the messages not handled because ``stop`` was set while the database
        was unavailable (always a suffix: nothing is recorded after a
        message left unrecorded)."""
        if len(batch) > 1:
            first, last = batch[0][0], batch[-1][0]
            what = (
                f"stream {first.stream} sequences {first.sequence}..{last.sequence} "
                f"({len(batch)} messages)"
            )
            events = [event for _, event in batch]
            try:
                result = await self._until_done(
                    lambda: self.store.append(stream_id, events, ANY, retry=self.retry), what, stop
                )
            except (EventValidationError, IdempotencyConflict):
                pass  # one message at a time, below
            else:
                if result is None:
                    return [None] * len(batch)
                outcome = "duplicate" if result.duplicate else "appended"
                return [outcome] * len(batch)
        outcomes: list[str | None] = []
        for message, event in batch:
            if outcomes and outcomes[-1] is None:
                outcomes.append(None)
            else:
                outcomes.append(await self.record(message, (stream_id, event), stop))
        return outcomes
