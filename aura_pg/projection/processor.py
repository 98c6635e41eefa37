"""Python processors: a runner whose batch is user code.

A batch is one transaction on a connection of its own (the runner keeps the
ownership lock on another): read the events after the checkpoint
(``aura.processor_batch``), run the handler with the events and that
connection, advance the checkpoint (``aura.advance_processor``, which
compares it and the generation under a row lock), commit. What the handler
wrote through the connection commits with the checkpoint or not at all.

Everything else is the SQL projections' runner: ownership, failure
isolation down to the poison event, retries with backoff, dead letters,
the circuit breaker, metrics and traces. A sync handler runs in a worker
thread (the daemon's event loop carries on); an async one on the loop. A
batch that overruns ``batch_timeout_seconds`` has its session ended by the
server (``pg_terminate_backend``), so it rolls back whatever the handler
is doing, and counts as a failure of the batch.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import importlib
import inspect
import json
import logging
import queue
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, LiteralString, TypeVar

import psycopg
from psycopg.types.json import set_json_loads

from aura_pg._resources import named_queries
from aura_pg.errors import CatalogError, ConcurrencyError
from aura_pg.models import Checkpoint, RecordedEvent
from aura_pg.observability import metrics, tracing
from aura_pg.projection.catalog import ProjectionSpec
from aura_pg.projection.connection import (
    ConnectionLost,
    connect,
    is_connection_state,
    session_params,
    translate_projection_error,
)
from aura_pg.projection.runner import BatchFailed, BatchResult, ProjectionRunner
from aura_pg.projection.settings import ProjectorSettings
from aura_pg.upcasting import upcast

log = logging.getLogger("aura_pg.projector")

SyncHandler = Callable[[list[RecordedEvent], psycopg.Connection[Any]], object]
AsyncHandler = Callable[[list[RecordedEvent], psycopg.AsyncConnection[Any]], Awaitable[object]]
Handler = SyncHandler | AsyncHandler

T = TypeVar("T")

SERIALIZATION_FAILURE = "40001"

# How long a timed-out batch may still take to report, once its session
# is ended: it may have committed just before.
_TIMEOUT_GRACE_SECONDS = 0.5


_decode_json = json.JSONDecoder().decode


def json_loads(data: bytes | bytearray | memoryview | str) -> Any:
    """jsonb for a batch's events: decoded as UTF-8 text straight away
    (``json.loads`` on bytes first guesses their encoding, per value)."""
    if isinstance(data, memoryview):
        data = bytes(data)
    return _decode_json(data if isinstance(data, str) else data.decode("utf-8"))


def queries() -> dict[str, LiteralString]:
    """The statements of sql/queries/processors.sql, by name."""
    return named_queries("queries/processors.sql")


def load_handler(reference: str) -> Callable[..., Any]:
    """The callable named by ``package.module:attribute`` (imported now);
    CatalogError when it cannot be found or is not callable."""
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise CatalogError(f"handler {reference!r} is not 'package.module:callable'")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise CatalogError(f"handler {reference!r}: cannot import {module_name}: {exc}") from exc
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise CatalogError(f"handler {reference!r}: {module_name} has no {attribute}") from None
    if not callable(target):
        raise CatalogError(f"handler {reference!r} is not callable")
    return target  # type: ignore[no-any-return]


def handler_of(spec: ProjectionSpec) -> Callable[..., Any]:
    """A processor entry's handler: the function given in code, or imported."""
    if spec.handler_function is not None:
        return spec.handler_function  # type: ignore[no-any-return]
    return load_handler(spec.handler)


def is_async_handler(handler: Callable[..., Any]) -> bool:
    """Whether calling ``handler`` returns a coroutine (``async def``, or
    an object whose ``__call__`` is one)."""
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None)  # noqa: B004 - the method, not callable()
    )


def recorded_event(values: tuple[Any, ...]) -> RecordedEvent:
    """An event from the columns global_position, transaction_id (text),
    event_id, stream_id, version, type, data, metadata, idempotency_key,
    recorded_at; read through the registered upcasters."""
    position, transaction_id, event_id, stream_id, version, type_, data, meta, key, at = values
    return upcast(
        RecordedEvent(
            position, int(transaction_id), event_id, stream_id, version, type_, data, meta, key, at
        )
    )


@dataclass(frozen=True)
class _Batch:
    """What ``aura.processor_batch`` returned."""

    next_checkpoint: Checkpoint
    caught_up: bool
    status: str
    idle: bool
    events: list[RecordedEvent]

    @classmethod
    def from_rows(cls, rows: list[tuple[Any, ...]]) -> _Batch:
        next_tx, next_position, caught_up, status, idle = rows[0][:5]
        events = [recorded_event(row[5:]) for row in rows if row[7] is not None]
        return cls(Checkpoint(int(next_tx), next_position), caught_up, status, idle, events)


@dataclass(frozen=True)
class _Outcome:
    batch: _Batch
    status: str
    # The database's clock just before the commit (None: nothing recorded).
    recorded_at: datetime | None


class _HandlerRaised(Exception):
    """The handler raised ``error`` (not one of the batch's own statements)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _advance_params(params: dict[str, Any], batch: _Batch) -> dict[str, Any]:
    last = batch.events[-1] if batch.events else None
    return {
        **params,
        "next_transaction_id": str(batch.next_checkpoint.transaction_id),
        "next_position": batch.next_checkpoint.global_position,
        "applied": len(batch.events),
        "last_position": last.global_position if last else None,
        "last_recorded_at": last.recorded_at if last else None,
    }


def _run_sync_batch(
    conn: psycopg.Connection[Any], handler: SyncHandler, params: dict[str, Any]
) -> _Outcome:
    """One batch in one transaction on a sync connection. Our own
    statements leave no spans (an idle poll no trace); the handler's do."""
    with conn.transaction():
        with tracing.suppress_instrumentation():
            batch = _Batch.from_rows(conn.execute(queries()["batch"], params).fetchall())
        if batch.idle:
            return _Outcome(batch, batch.status, None)
        if batch.events:
            try:
                with tracing.handler_span(params["name"], len(batch.events)):
                    handler(batch.events, conn)
            except Exception as exc:
                raise _HandlerRaised(exc) from exc
        with tracing.suppress_instrumentation():
            row = conn.execute(queries()["advance"], _advance_params(params, batch)).fetchone()
    assert row is not None
    return _Outcome(batch, row[0], row[1])


async def _run_async_batch(
    conn: psycopg.AsyncConnection[Any], handler: AsyncHandler, params: dict[str, Any]
) -> _Outcome:
    """One batch in one transaction on an async connection."""
    async with conn.transaction():
        with tracing.suppress_instrumentation():
            cur = await conn.execute(queries()["batch"], params)
            batch = _Batch.from_rows(await cur.fetchall())
        if batch.idle:
            return _Outcome(batch, batch.status, None)
        if batch.events:
            try:
                with tracing.handler_span(params["name"], len(batch.events)):
                    await handler(batch.events, conn)
            except Exception as exc:
                raise _HandlerRaised(exc) from exc
        with tracing.suppress_instrumentation():
            cur = await conn.execute(queries()["advance"], _advance_params(params, batch))
            row = await cur.fetchone()
    assert row is not None
    return _Outcome(batch, row[0], row[1])


class _Worker:
    """A daemon thread running one runner's sync batches, on a connection
    of its own. Daemon, so that a handler hung for good does not keep the
    process from exiting; abandoned (a new one takes over) when it overruns."""

    def __init__(self, name: str, dsn: str, settings: ProjectorSettings) -> None:
        self.dsn = dsn
        self.settings = settings
        self.conn: psycopg.Connection[Any] | None = None
        self.backend_pid: int | None = None
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def connection(self) -> psycopg.Connection[Any]:
        """Its connection, opened (again) when missing or broken; in the thread."""
        if self.conn is None or self.conn.closed or self.conn.broken:
            if self.conn is not None:
                self.conn.close()
            self.conn = None
            conn = psycopg.Connection.connect(
                self.dsn,
                autocommit=True,
                application_name=f"aura-pg processor {self._thread.name}"[:63],
                keepalives=1,
                keepalives_idle=10,
                keepalives_interval=5,
                keepalives_count=3,
            )
            try:
                conn.execute(
                    named_queries("queries/projector.sql")["session_settings"],
                    session_params(self.settings),
                )
            except BaseException:
                conn.close()
                raise
            set_json_loads(json_loads, conn)
            self.conn = conn
            self.backend_pid = conn.info.backend_pid
        return self.conn

    def submit(self, job: Callable[[], T]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def settle(result: T | None, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)  # type: ignore[arg-type]

        def run() -> None:
            result: T | None = None
            error: BaseException | None = None
            try:
                result = job()
            except BaseException as exc:  # handed to the loop
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(settle, result, error)

        self._jobs.put(run)
        return future

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()
        if self.conn is not None:
            with contextlib.suppress(psycopg.Error):
                self.conn.close()

    def stop(self) -> None:
        """Finish the job in hand, close the connection and end."""
        self._jobs.put(None)


def _connection_failed(
    exc: psycopg.Error, conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any] | None
) -> bool:
    if conn is not None and (conn.closed or conn.broken):
        return True
    state = exc.sqlstate
    if state is None:
        return isinstance(exc, psycopg.OperationalError)
    return is_connection_state(state)


def _describe(error: BaseException) -> tuple[str, str | None]:
    """A handler's exception as (message, SQLSTATE). The SQLSTATE is that
    of the database error behind it, if any (the store raises its own
    errors from psycopg's), so a serialization failure or a deadlock is
    retried as a failure of the moment. A ConcurrencyError is one too: the
    batch runs again on the stream's new state, like a command retried
    after a conflict."""
    if isinstance(error, psycopg.Error):
        message = (error.diag.message_primary if error.diag else None) or str(error)
        return f"{type(error).__name__}: {message}", error.sqlstate
    message = f"{type(error).__name__}: {error}"
    if isinstance(error, ConcurrencyError):
        return message, SERIALIZATION_FAILURE
    cause = error.__cause__
    while cause is not None:
        if isinstance(cause, psycopg.Error):
            return message, cause.sqlstate
        cause = cause.__cause__
    return message, None


class PythonProcessorRunner(ProjectionRunner):
    """Runs one Python processor row (a partition) while it owns it."""

    def __init__(
        self,
        dsn: str,
        name: str,
        settings: ProjectorSettings,
        *,
        handler: Callable[..., Any],
        batch_timeout: float,
        dead_letter_queue: bool = True,
    ) -> None:
        super().__init__(dsn, name, settings, dead_letter_queue=dead_letter_queue)
        self.handler = handler
        self.is_async = is_async_handler(handler)
        self.batch_timeout = batch_timeout
        self.timeouts = 0
        self._worker: _Worker | None = None
        self._async_conn: psycopg.AsyncConnection[Any] | None = None

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await super().run(stop)
        finally:
            await self._close_batch_connection()

    async def _release(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Hand the row back, and close the batch connection with it (a
        partition handed to another daemon needs none here)."""
        await super()._release(conn)
        await self._close_batch_connection()

    async def _close_batch_connection(self) -> None:
        if self._worker is not None:
            self._worker.stop()
            self._worker = None
        if self._async_conn is not None:
            await self._async_conn.close()
            self._async_conn = None

    def _batch_params(self, params: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": self.name,
            "transaction_id": params["transaction_id"],
            "position": params["position"],
            "owner": params["owner"],
            "generation": params["generation"],
            "limit": params["limit"],
        }

    async def _apply_batch(
        self, conn: psycopg.AsyncConnection[Any], params: dict[str, Any]
    ) -> BatchResult:
        batch_params = self._batch_params(params)
        if self.is_async:
            if self._async_conn is None or self._async_conn.closed or self._async_conn.broken:
                self._async_conn = await connect(self.dsn, self.settings, f"processor {self.name}")
                set_json_loads(json_loads, self._async_conn)
            batch_conn = self._async_conn
            task: asyncio.Future[_Outcome] = asyncio.ensure_future(
                _run_async_batch(batch_conn, self.handler, batch_params)
            )
            backend_pid: int | None = batch_conn.info.backend_pid
        else:
            if self._worker is None:
                self._worker = _Worker(self.name, self.dsn, self.settings)
            worker = self._worker
            task = worker.submit(
                lambda: _run_sync_batch(worker.connection(), self.handler, batch_params)
            )
            backend_pid = None
        try:
            outcome = await asyncio.wait_for(asyncio.shield(task), self.batch_timeout)
        except TimeoutError:
            if self._worker is not None:
                backend_pid = self._worker.backend_pid
            outcome = await self._timed_out(conn, task, backend_pid)
        except _HandlerRaised as raised:
            raise self._handler_failure(raised.error) from raised.error
        except psycopg.Error as exc:
            raise self._statement_failure(exc) from exc
        return self._result(outcome, params.get("traced", False))

    def _handler_failure(self, error: BaseException) -> Exception:
        lost = isinstance(error, psycopg.Error) and _connection_failed(
            error, self._batch_connection()
        )
        if lost:
            return ConnectionLost(str(error))
        message, sqlstate = _describe(error)
        if self.isolation.batch_limit() == 1:
            log.warning("processor %s: handler %s raised", self.name, self.handler, exc_info=error)
        return BatchFailed(message, sqlstate)

    def _statement_failure(self, exc: psycopg.Error) -> Exception:
        if _connection_failed(exc, self._batch_connection()):
            return ConnectionLost(str(exc))
        typed = translate_projection_error(exc)
        if typed is not None:
            return typed
        message = (exc.diag.message_primary if exc.diag else None) or str(exc)
        return BatchFailed(message, exc.sqlstate)

    def _batch_connection(self) -> psycopg.Connection[Any] | psycopg.AsyncConnection[Any] | None:
        if self.is_async:
            return self._async_conn
        return self._worker.conn if self._worker is not None else None

    async def _timed_out(
        self,
        conn: psycopg.AsyncConnection[Any],
        task: asyncio.Future[_Outcome],
        backend_pid: int | None,
    ) -> _Outcome:
        """The batch overran: end its session (its transaction rolls back),
        leave its worker behind, and fail the batch, unless it committed
        just before."""
        self.timeouts += 1  # counted with the handler's errors by the runner
        if backend_pid is not None:
            with contextlib.suppress(psycopg.Error):
                await conn.execute(queries()["terminate"], {"pid": backend_pid})
        if self.is_async:
            task.cancel()
            if self._async_conn is not None:
                with contextlib.suppress(psycopg.Error):
                    await self._async_conn.close()
                self._async_conn = None
        elif self._worker is not None:
            self._worker.stop()  # once the handler returns, if ever
            self._worker = None
        try:
            return await asyncio.wait_for(asyncio.shield(task), _TIMEOUT_GRACE_SECONDS)
        except (Exception, asyncio.CancelledError):
            # Whatever it ends with later, nobody waits for it any more.
            task.add_done_callback(_forget)
        raise BatchFailed(
            f"handler did not finish within {self.batch_timeout:g}s: the batch was rolled back"
        )

    def _result(self, outcome: _Outcome, traced: bool) -> BatchResult:
        batch = outcome.batch
        events = batch.events if outcome.recorded_at is not None else []
        if not events:
            return BatchResult(0, batch.next_checkpoint, batch.caught_up, outcome.status)
        by_type = Counter(event.type for event in events)
        buckets: Counter[int] = Counter()
        waited_total = 0.0
        assert outcome.recorded_at is not None
        for event in events:
            waited = max((outcome.recorded_at - event.recorded_at).total_seconds(), 0.0)
            buckets[bisect.bisect_left(metrics.LATENCY_BOUNDS, waited)] += 1
            waited_total += waited
        return BatchResult(
            len(events),
            batch.next_checkpoint,
            batch.caught_up,
            outcome.status,
            type_names=list(by_type),
            type_counts=list(by_type.values()),
            end_to_end_buckets=list(buckets),
            end_to_end_counts=list(buckets.values()),
            end_to_end_seconds=waited_total,
            event_ids=[event.event_id for event in events] if traced else None,
            event_types=[event.type for event in events] if traced else None,
            stream_ids=[event.stream_id for event in events] if traced else None,
            versions=[event.version for event in events] if traced else None,
            traceparents=[_traceparent(event) for event in events] if traced else None,
        )


def _forget(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _traceparent(event: RecordedEvent) -> str | None:
    value = event.metadata.get("traceparent")
    return value if isinstance(value, str) else None
