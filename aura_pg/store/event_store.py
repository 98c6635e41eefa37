"""EventStore and AsyncEventStore: two drivers that only do I/O.

Each method builds an operation (aura_pg.store.operations) and runs it:
the driver executes the statements the operation yields, on the caller's
connection or on one taken from the pool for each statement, throws a
failed statement's error back in, and sleeps through the pauses it asks
for. Validation, results, typed errors and resending on transient failures
are decided there, once for both drivers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from types import TracebackType
from typing import Any, Self, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from aura_pg.errors import AuraPgError
from aura_pg.models import (
    ANY,
    FORWARDS,
    AppendResult,
    Checkpoint,
    Direction,
    ExpectedVersion,
    NewEvent,
    Page,
    RecordedEvent,
    StreamAppend,
)
from aura_pg.observability.appends import observed_append, register_append_metrics
from aura_pg.store import operations as ops
from aura_pg.store.pool import AsyncQuickReconnectPool, QuickReconnectPool
from aura_pg.store.retry import AppendRetry
from aura_pg.store.validation import DEFAULT_MAX_PAYLOAD_BYTES, as_batch, check_payload_limit

P = TypeVar("P", ConnectionPool[Any], AsyncConnectionPool[Any])


def _pool(pool: P | None) -> P:
    """The store's pool; a store made without one runs only in the
    caller's transactions (every call passes ``conn=``)."""
    if pool is None:
        raise AuraPgError("this store has no pool: pass conn= (the caller's connection)")
    return pool


def _autocommit_pool(pool_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pool options with autocommit connections, unless the caller chose.

    Every store operation is one statement, atomic on its own: autocommit
    saves the BEGIN and COMMIT round trips of an explicit transaction.
    """
    connection_kwargs = {"autocommit": True, **pool_kwargs.get("kwargs", {})}
    return {**pool_kwargs, "kwargs": connection_kwargs}


class EventStore:
    """The event store over a ``psycopg_pool.ConnectionPool``.

    ``EventStore(pool)`` borrows the caller's pool and never closes it;
    ``EventStore.connect(dsn)`` creates a pool that ``close()`` closes.
    Every method takes ``conn=`` to run inside the caller's open transaction,
    so business rows and events commit or roll back together; ``EventStore()``
    (no pool) runs only so, e.g. in a Python processor's handler.
    """

    def __init__(
        self,
        pool: ConnectionPool[Any] | None = None,
        *,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        owns_pool: bool = False,
    ) -> None:
        self.max_payload_bytes = check_payload_limit(max_payload_bytes)
        self.pool = pool
        self._owns_pool = owns_pool
        register_append_metrics()

    @classmethod
    def connect(
        cls,
        conninfo: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        **pool_kwargs: Any,
    ) -> Self:
        pool: ConnectionPool[Any] = QuickReconnectPool(
            conninfo,
            min_size=min_size,
            max_size=max_size,
            open=False,
            **_autocommit_pool(pool_kwargs),
        )
        pool.open(wait=True)
        return cls(pool, max_payload_bytes=max_payload_bytes, owns_pool=True)

    def close(self) -> None:
        if self._owns_pool and self.pool is not None:
            self.pool.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _run(
        self,
        operation: ops.Operation,
        conn: psycopg.Connection[Any] | None,
        *,
        commit: bool = False,
    ) -> Any:
        instruction = next(operation)  # validates before a connection is taken
        while True:
            try:
                if isinstance(instruction, ops.Pause):
                    time.sleep(instruction.seconds)
                    answer = None
                elif isinstance(instruction, ops.Copy):
                    answer = self._copy(instruction, conn)
                else:
                    answer = self._execute(instruction, conn)
                if commit and conn is not None:
                    conn.commit()
            except psycopg.Error as exc:
                if commit and conn is not None:
                    conn.rollback()
                instruction = operation.throw(exc)
                continue
            try:
                instruction = operation.send(answer)
            except StopIteration as done:
                return done.value

    def _execute(self, statement: ops.Statement, conn: psycopg.Connection[Any] | None) -> ops.Rows:
        if conn is not None:
            return conn.execute(statement.sql, statement.params).fetchall()
        with _pool(self.pool).connection() as pooled:
            rows: ops.Rows = pooled.execute(statement.sql, statement.params).fetchall()
        return rows

    @staticmethod
    def _copy(copy: ops.Copy, conn: psycopg.Connection[Any] | None) -> ops.Rows:
        if conn is None:  # a COPY stages rows for the statements after it
            raise TypeError("a Copy runs on the connection the operation holds")
        with conn.cursor() as cursor:
            for statement in copy.prepare:
                cursor.execute(statement)
            with cursor.copy(copy.sql) as staging:
                staging.set_types(list(copy.types))
                for row in copy.rows:
                    staging.write_row(row)
        return []

    def append_many(
        self,
        appends: Iterable[StreamAppend],
        *,
        conn: psycopg.Connection[Any] | None = None,
        chunk_streams: int = ops.DEFAULT_CHUNK_STREAMS,
        chunk_events: int = ops.DEFAULT_CHUNK_EVENTS,
    ) -> list[AppendResult]:
        """Append a batch to each of many streams: the bulk path for large
        loads; one ``AppendResult`` per stream, in call order. See the bulk
        section of docs/event-store.md.

        Each stream's batch is checked, answered as a duplicate or refused
        exactly as by ``append``. The streams go in chunks of at most
        ``chunk_streams`` streams and about ``chunk_events`` events, each
        chunk one transaction (all or nothing); an error stops the call
        after the chunks before it committed: resend the whole call, whose
        committed chunks are then answered as duplicates. With ``conn=`` the
        call runs in the caller's transaction and takes at most
        ``chunk_streams`` streams."""
        operation = ops.append_many(
            appends,
            self.max_payload_bytes,
            chunk_streams,
            chunk_events,
            in_transaction=conn is not None,
        )
        if conn is not None:
            return list(self._run(operation, conn))
        with _pool(self.pool).connection() as pooled:
            # Staging and appending are separate transactions: the append
            # must take its stream locks before its transaction has an id.
            return list(self._run(operation, pooled, commit=not pooled.autocommit))

    def append(
        self,
        stream_id: str,
        events: NewEvent | Iterable[NewEvent],
        expected_version: ExpectedVersion = ANY,
        *,
        conn: psycopg.Connection[Any] | None = None,
        retry: AppendRetry | None = None,
    ) -> AppendResult:
        """Append events to a stream, all or nothing; see docs/event-store.md.

        With ``retry``, transient failures (a lost connection, a restarting
        server) send the same batch again: the events are recorded exactly
        once whatever happened to the failed attempts (aura_pg.store.retry)."""
        batch = as_batch(events)
        ops.check_retry(retry, conn)
        with observed_append(stream_id, batch) as observation:
            operation = ops.append(
                stream_id,
                batch,
                expected_version,
                self.max_payload_bytes,
                observation.traceparent,
                retry,
            )
            observation.result = self._run(operation, conn)
        return observation.result

    def read_stream(
        self,
        stream_id: str,
        from_version: int | None = None,
        direction: Direction = FORWARDS,
        limit: int | None = None,
        *,
        conn: psycopg.Connection[Any] | None = None,
    ) -> list[RecordedEvent]:
        """Events of one stream from ``from_version`` on (default: its start
        reading forwards, its end reading backwards)."""
        events: list[RecordedEvent] = self._run(
            ops.read_stream(stream_id, from_version, direction, limit), conn
        )
        return events

    def stream_version(self, stream_id: str, *, conn: psycopg.Connection[Any] | None = None) -> int:
        """The stream's current version; 0 when it has no events."""
        version: int = self._run(ops.stream_version(stream_id), conn)
        return version

    def read_all(
        self,
        after: Checkpoint | None = None,
        limit: int = 1000,
        types: Iterable[str] | None = None,
        *,
        conn: psycopg.Connection[Any] | None = None,
    ) -> Page:
        """One page of events in commit order after ``after``; never skips one."""
        page: Page = self._run(ops.read_all(after, limit, types), conn)
        return page

    def iter_all(
        self,
        after: Checkpoint | None = None,
        batch_size: int = 1000,
        types: Iterable[str] | None = None,
    ) -> Iterator[RecordedEvent]:
        """Every event after ``after`` up to the present, read page by page."""
        type_names = None if types is None else list(types)
        while True:
            page = self.read_all(after, batch_size, type_names)
            yield from page.events
            if len(page.events) < batch_size:
                return
            after = page.checkpoint

    def iter_stream(
        self, stream_id: str, from_version: int = 1, batch_size: int = 1000
    ) -> Iterator[RecordedEvent]:
        """Every event of a stream from ``from_version`` on, read page by page."""
        while True:
            events = self.read_stream(stream_id, from_version, FORWARDS, batch_size)
            yield from events
            if len(events) < batch_size:
                return
            from_version = events[-1].version + 1


class AsyncEventStore:
    """``EventStore`` for asyncio, over a ``psycopg_pool.AsyncConnectionPool``.

    Same methods, same semantics; ``await AsyncEventStore.connect(dsn)``.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool[Any] | None = None,
        *,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        owns_pool: bool = False,
    ) -> None:
        self.max_payload_bytes = check_payload_limit(max_payload_bytes)
        self.pool = pool
        self._owns_pool = owns_pool
        register_append_metrics()

    @classmethod
    async def connect(
        cls,
        conninfo: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        **pool_kwargs: Any,
    ) -> Self:
        pool: AsyncConnectionPool[Any] = AsyncQuickReconnectPool(
            conninfo,
            min_size=min_size,
            max_size=max_size,
            open=False,
            **_autocommit_pool(pool_kwargs),
        )
        await pool.open(wait=True)
        return cls(pool, max_payload_bytes=max_payload_bytes, owns_pool=True)

    async def close(self) -> None:
        if self._owns_pool and self.pool is not None:
            await self.pool.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _run(
        self,
        operation: ops.Operation,
        conn: psycopg.AsyncConnection[Any] | None,
        *,
        commit: bool = False,
    ) -> Any:
        instruction = next(operation)  # validates before a connection is taken
        while True:
            try:
                if isinstance(instruction, ops.Pause):
                    await asyncio.sleep(instruction.seconds)
                    answer = None
                elif isinstance(instruction, ops.Copy):
                    answer = await self._copy(instruction, conn)
                else:
                    answer = await self._execute(instruction, conn)
                if commit and conn is not None:
                    await conn.commit()
            except psycopg.Error as exc:
                if commit and conn is not None:
                    await conn.rollback()
                instruction = operation.throw(exc)
                continue
            try:
                instruction = operation.send(answer)
            except StopIteration as done:
                return done.value

    async def _execute(
        self, statement: ops.Statement, conn: psycopg.AsyncConnection[Any] | None
    ) -> ops.Rows:
        if conn is not None:
            cursor = await conn.execute(statement.sql, statement.params)
            return await cursor.fetchall()
        async with _pool(self.pool).connection() as pooled:
            cursor = await pooled.execute(statement.sql, statement.params)
            rows: ops.Rows = await cursor.fetchall()
        return rows

    @staticmethod
    async def _copy(copy: ops.Copy, conn: psycopg.AsyncConnection[Any] | None) -> ops.Rows:
        if conn is None:  # a COPY stages rows for the statements after it
            raise TypeError("a Copy runs on the connection the operation holds")
        async with conn.cursor() as cursor:
            for statement in copy.prepare:
                await cursor.execute(statement)
            async with cursor.copy(copy.sql) as staging:
                staging.set_types(list(copy.types))
                for row in copy.rows:
                    await staging.write_row(row)
        return []

    async def append_many(
        self,
        appends: Iterable[StreamAppend],
        *,
        conn: psycopg.AsyncConnection[Any] | None = None,
        chunk_streams: int = ops.DEFAULT_CHUNK_STREAMS,
        chunk_events: int = ops.DEFAULT_CHUNK_EVENTS,
    ) -> list[AppendResult]:
        """``EventStore.append_many`` for asyncio."""
        operation = ops.append_many(
            appends,
            self.max_payload_bytes,
            chunk_streams,
            chunk_events,
            in_transaction=conn is not None,
        )
        if conn is not None:
            return list(await self._run(operation, conn))
        async with _pool(self.pool).connection() as pooled:
            return list(await self._run(operation, pooled, commit=not pooled.autocommit))

    async def append(
        self,
        stream_id: str,
        events: NewEvent | Iterable[NewEvent],
        expected_version: ExpectedVersion = ANY,
        *,
        conn: psycopg.AsyncConnection[Any] | None = None,
        retry: AppendRetry | None = None,
    ) -> AppendResult:
        """Append events to a stream, all or nothing; see docs/event-store.md.
        ``retry`` as in ``EventStore.append``."""
        batch = as_batch(events)
        ops.check_retry(retry, conn)
        with observed_append(stream_id, batch) as observation:
            operation = ops.append(
                stream_id,
                batch,
                expected_version,
                self.max_payload_bytes,
                observation.traceparent,
                retry,
            )
            observation.result = await self._run(operation, conn)
        return observation.result

    async def read_stream(
        self,
        stream_id: str,
        from_version: int | None = None,
        direction: Direction = FORWARDS,
        limit: int | None = None,
        *,
        conn: psycopg.AsyncConnection[Any] | None = None,
    ) -> list[RecordedEvent]:
        """Events of one stream from ``from_version`` on (default: its start
        reading forwards, its end reading backwards)."""
        events: list[RecordedEvent] = await self._run(
            ops.read_stream(stream_id, from_version, direction, limit), conn
        )
        return events

    async def stream_version(
        self, stream_id: str, *, conn: psycopg.AsyncConnection[Any] | None = None
    ) -> int:
        """The stream's current version; 0 when it has no events."""
        version: int = await self._run(ops.stream_version(stream_id), conn)
        return version

    async def read_all(
        self,
        after: Checkpoint | None = None,
        limit: int = 1000,
        types: Iterable[str] | None = None,
        *,
        conn: psycopg.AsyncConnection[Any] | None = None,
    ) -> Page:
        """One page of events in commit order after ``after``; never skips one."""
        page: Page = await self._run(ops.read_all(after, limit, types), conn)
        return page

    async def iter_all(
        self,
        after: Checkpoint | None = None,
        batch_size: int = 1000,
        types: Iterable[str] | None = None,
    ) -> AsyncIterator[RecordedEvent]:
        """Every event after ``after`` up to the present, read page by page."""
        type_names = None if types is None else list(types)
        while True:
            page = await self.read_all(after, batch_size, type_names)
            for event in page.events:
                yield event
            if len(page.events) < batch_size:
                return
            after = page.checkpoint

    async def iter_stream(
        self, stream_id: str, from_version: int = 1, batch_size: int = 1000
    ) -> AsyncIterator[RecordedEvent]:
        """Every event of a stream from ``from_version`` on, read page by page."""
        while True:
            events = await self.read_stream(stream_id, from_version, FORWARDS, batch_size)
            for event in events:
                yield event
            if len(events) < batch_size:
                return
            from_version = events[-1].version + 1
