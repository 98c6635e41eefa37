"""``aura-pg relay``: publish the transactional outbox (``aura.outbox``).

Each batch is one transaction: claim due pending rows (``FOR UPDATE SKIP
LOCKED``, so relays can run side by side), publish them, record the outcome
(delivered, or a failed attempt with a backoff, or dead after the last
attempt), commit. A relay or broker that dies mid-batch rolls the batch back
and its rows are published again later: delivery is at least once, and every
message carries its ``message_id`` (NATS ``Nats-Msg-Id``, HTTP
``Idempotency-Key``) for receivers to drop duplicates.

The SQL is in ``sql/queries/relay.sql``; docs/outbox.md is the operator guide.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow

from aura_pg._resources import named_queries
from aura_pg._runtime import OUTAGE_BACKOFF, Backoff, wait
from aura_pg.observability import metrics
from aura_pg.outbox.sinks import (
    APPLICATION_NAME,
    ClosableSink,
    DeliveryError,
    OutboxMessage,
    Sink,
    SinkUnavailable,
    header_strings,
)

log = logging.getLogger("aura_pg.relay")

_QUERIES: Final = named_queries("queries/relay.sql")

DEFAULT_BATCH_SIZE: Final = 100
DEFAULT_POLL_INTERVAL: Final = 0.5
DEFAULT_MAX_ATTEMPTS: Final = 20
DEFAULT_BACKOFF_BASE: Final = 1.0
DEFAULT_BACKOFF_MAX: Final = 600.0
DEFAULT_CONNECT_TIMEOUT: Final = 10
DEFAULT_SHUTDOWN_TIMEOUT: Final = 30.0
# last_error keeps the start of long messages (HTTP bodies, tracebacks).
_MAX_ERROR_LENGTH: Final = 1000


@dataclass(slots=True)
class RelayStats:
    """What a run did: ``batches`` that claimed rows, rows ``delivered``,
    ``failed`` attempts (including those that made a row ``dead``). Rows a
    paused sink left untouched are not counted."""

    batches: int = 0
    delivered: int = 0
    failed: int = 0
    dead: int = 0

    def add(self, other: RelayStats) -> None:
        self.batches += other.batches
        self.delivered += other.delivered
        self.failed += other.failed
        self.dead += other.dead


def _error_text(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, DeliveryError) else f"{type(exc).__name__}: {exc}"
    # text columns cannot hold NUL.
    return text.replace("\x00", "")[:_MAX_ERROR_LENGTH]


# A paused sink endpoint: (sink name, topic), topic None for a sink that
# serves every topic as one endpoint.
_Endpoint = tuple[str, str | None]


class _GaveUp(Exception):
    """The shutdown timeout ran out before the publish in flight ended."""


@dataclass(slots=True)
class _Pause:
    failures: int = 0
    until: float = 0.0


class Relay:
    """Publishes due ``aura.outbox`` rows of the given sinks.

    ``run_once()`` drains what is due and returns; ``run()`` polls until
    ``stop`` is set, reconnecting (with backoff) when the database
    connection drops. Both finish the batch in flight before returning, for
    at most ``shutdown_timeout`` seconds after ``stop`` is set: then the
    publish in flight is cancelled, it and the rows not tried yet are left
    as they were (published again later), and the outcomes known commit.
    Use as ``async with Relay(...) as relay`` to close the connections.
    """

    def __init__(
        self,
        dsn: str,
        sinks: Iterable[Sink],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        backoff: Backoff | None = None,
        reconnect_backoff: Backoff | None = None,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
    ) -> None:
        self.sinks: dict[str, Sink] = {}
        for sink in sinks:
            if sink.name in self.sinks:
                raise ValueError(f"two sinks named {sink.name!r}")
            self.sinks[sink.name] = sink
        if not self.sinks:
            raise ValueError("a relay needs at least one sink")
        if batch_size < 1 or max_attempts < 1 or not poll_interval > 0 or not shutdown_timeout > 0:
            raise ValueError(
                "batch_size, max_attempts, poll_interval and shutdown_timeout must be positive"
            )
        self.dsn = dsn
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.max_attempts = max_attempts
        self.backoff = backoff or Backoff(DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_MAX)
        self.reconnect_backoff = reconnect_backoff or OUTAGE_BACKOFF
        self.shutdown_timeout = shutdown_timeout
        # Set shutdown_timeout after a stop: the batch in flight gives up.
        self._give_up = asyncio.Event()
        self._conn: psycopg.AsyncConnection[TupleRow] | None = None
        self._pauses: dict[_Endpoint, _Pause] = {}

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._drop_connection()
        for sink in self.sinks.values():
            if isinstance(sink, ClosableSink):
                await sink.close()

    # -- the database connection ------------------------------------------

    async def _connection(self) -> psycopg.AsyncConnection[TupleRow]:
        if self._conn is None or self._conn.closed:
            given = conninfo_to_dict(self.dsn)
            extra: dict[str, Any] = {}
            if "application_name" not in given:
                extra["application_name"] = APPLICATION_NAME
            if "connect_timeout" not in given:
                extra["connect_timeout"] = DEFAULT_CONNECT_TIMEOUT
            self._conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=False, **extra)
        return self._conn

    async def _drop_connection(self) -> None:
        """Close the connection; an open transaction rolls back with it."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                await conn.close()

    # -- pausing failed sinks ---------------------------------------------

    def _endpoint(self, sink: Sink, topic: str) -> _Endpoint:
        return (sink.name, None if sink.topics is None else topic)

    def _paused(self, endpoint: _Endpoint) -> bool:
        pause = self._pauses.get(endpoint)
        return pause is not None and time.monotonic() < pause.until

    def _pause(self, endpoint: _Endpoint) -> float:
        pause = self._pauses.setdefault(endpoint, _Pause())
        pause.failures += 1
        delay = self.backoff.delay(pause.failures)
        pause.until = time.monotonic() + delay
        return delay

    def _claim_params(self) -> dict[str, Any] | None:
        """The claim's filter: the endpoints not paused now (None: all paused)."""
        any_topic: list[str] = []
        sinks: list[str] = []
        topics: list[str] = []
        for sink in self.sinks.values():
            if sink.topics is None:
                if not self._paused((sink.name, None)):
                    any_topic.append(sink.name)
                continue
            for topic in sorted(sink.topics):
                if not self._paused((sink.name, topic)):
                    sinks.append(sink.name)
                    topics.append(topic)
        if not any_topic and not sinks:
            return None
        return {
            "any_topic_sinks": any_topic,
            "sinks": sinks,
            "topics": topics,
            "limit": self.batch_size,
        }

    # -- one batch --------------------------------------------------------

    async def _publish(self, row: tuple[Any, ...]) -> BaseException | None:
        """Publish one claimed row: None, or the reason it failed."""
        row_id, sink_name, topic, message_id, payload, headers, attempts = row
        sink = self.sinks[sink_name]
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            message = OutboxMessage(
                id=row_id,
                sink=sink_name,
                topic=topic,
                message_id=message_id,
                payload=payload.encode("utf-8"),
                headers=header_strings(headers),
                attempts=attempts,
            )
            await sink.publish(message)
        except DeliveryError as exc:
            error = exc
        except Exception as exc:
            # A sink's bug must not stop the relay: the row records it.
            log.exception("sink %s failed on outbox row %s", sink_name, row_id)
            error = exc
        metrics.record_delivery(sink_name, time.perf_counter() - started, delivered=error is None)
        return error

    async def _publish_or_give_up(self, row: tuple[Any, ...]) -> BaseException | None:
        """``_publish(row)``; _GaveUp when the shutdown timeout ran out first
        (the publish is cancelled: the row stays as it was)."""
        if self._give_up.is_set():
            raise _GaveUp
        publishing = asyncio.ensure_future(self._publish(row))
        giving_up = asyncio.ensure_future(self._give_up.wait())
        try:
            await asyncio.wait((publishing, giving_up), return_when=asyncio.FIRST_COMPLETED)
        finally:
            giving_up.cancel()
            if not publishing.done():
                publishing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await publishing
        if publishing.cancelled():
            raise _GaveUp
        return publishing.result()

    async def _watch_shutdown(self, stop: asyncio.Event) -> None:
        """Once ``stop`` is set, give the batch in flight ``shutdown_timeout``."""
        await stop.wait()
        await asyncio.sleep(self.shutdown_timeout)
        self._give_up.set()

    @contextlib.asynccontextmanager
    async def _shutdown_deadline(self, stop: asyncio.Event | None) -> AsyncIterator[None]:
        self._give_up.clear()
        if stop is None:
            yield
            return
        watch = asyncio.create_task(self._watch_shutdown(stop))
        try:
            yield
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch

    async def _batch(self) -> tuple[int, RelayStats]:
        """Claim, publish, record, commit: (rows claimed, what was recorded)."""
        params = self._claim_params()
        if params is None:
            return 0, RelayStats()
        conn = await self._connection()
        try:
            async with conn.cursor() as cur:
                await cur.execute(_QUERIES["claim_batch"], params)
                rows = await cur.fetchall()
                delivered: list[int] = []
                failed: list[tuple[int, str, float]] = []
                for row in rows:
                    row_id, sink_name, topic, attempts = row[0], row[1], row[2], row[6]
                    endpoint = self._endpoint(self.sinks[sink_name], topic)
                    if self._paused(endpoint):
                        continue  # paused earlier in this batch: leave the row as it was
                    try:
                        error = await self._publish_or_give_up(row)
                    except _GaveUp:
                        log.warning(
                            "shutdown timeout (%.3g s): outbox row %s (%s %s) and the rest of "
                            "the batch are left as they were",
                            self.shutdown_timeout, row_id, sink_name, topic,
                        )  # fmt: skip
                        break
                    if error is None:
                        delivered.append(row_id)
                        self._pauses.pop(endpoint, None)
                        continue
                    delay = self.backoff.delay(attempts + 1)
                    failed.append((row_id, _error_text(error), delay))
                    log.warning(
                        "outbox row %s (%s %s) attempt %s failed: %s",
                        row_id, sink_name, topic, attempts + 1, _error_text(error),
                    )  # fmt: skip
                    if isinstance(error, SinkUnavailable):
                        pause = self._pause(endpoint)
                        what = sink_name if endpoint[1] is None else f"{sink_name} {topic}"
                        log.warning("%s unavailable: paused for %.3g s", what, pause)
                if delivered:
                    await cur.execute(_QUERIES["mark_delivered"], {"ids": delivered})
                dead: list[int] = []
                if failed:
                    ids, errors, delays = zip(*failed, strict=True)
                    await cur.execute(
                        _QUERIES["mark_failed"],
                        {
                            "ids": list(ids),
                            "errors": list(errors),
                            "delays": list(delays),
                            "max_attempts": self.max_attempts,
                        },
                    )
                    dead = [row_id for row_id, status in await cur.fetchall() if status == "dead"]
            await conn.commit()
        except BaseException:
            await self._drop_connection()
            raise
        for row_id in dead:
            log.error("outbox row %s is dead after %s attempts", row_id, self.max_attempts)
        if rows:
            log.debug(
                "batch: %s claimed, %s delivered, %s failed", len(rows), len(delivered), len(failed)
            )
        return len(rows), RelayStats(
            batches=1 if rows else 0, delivered=len(delivered), failed=len(failed), dead=len(dead)
        )

    # -- the loops --------------------------------------------------------

    async def run_once(self, stop: asyncio.Event | None = None) -> RelayStats:
        """Drain the rows due now, batch after batch, and return.

        Rows that fail are due again only after their backoff, and paused
        sinks are not claimed, so this ends. Database errors propagate.
        """
        stats = RelayStats()
        async with self._shutdown_deadline(stop):
            while stop is None or not stop.is_set():
                claimed, batch = await self._batch()
                stats.add(batch)
                if claimed < self.batch_size:
                    break
        return stats

    async def run(self, stop: asyncio.Event | None = None) -> RelayStats:
        """Publish until ``stop`` is set: drain while there is work, then poll
        every ``poll_interval``. A lost database connection is reopened with
        backoff; other database errors (say, a schema not migrated) propagate."""
        stop = stop if stop is not None else asyncio.Event()
        stats = RelayStats()
        failures = 0
        async with self._shutdown_deadline(stop):
            while not stop.is_set():
                try:
                    claimed, batch = await self._batch()
                except psycopg.OperationalError as exc:
                    failures += 1
                    delay = self.reconnect_backoff.delay(failures)
                    log.warning("database: %s; reconnecting in %.3g s", str(exc).strip(), delay)
                    await wait(stop, delay)
                    continue
                if failures:
                    log.info("database connection restored")
                    failures = 0
                stats.add(batch)
                if claimed < self.batch_size:
                    await wait(stop, self.poll_interval)
        return stats
