"""EventStore and AsyncEventStore: thin drivers over the shared operations."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from types import TracebackType
from typing import Any, Self

import psycopg
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from aura_pg import _operations as ops
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
)
from aura_pg.observability.appends import observed_append
from aura_pg.retry import AppendRetry, wait_before_resending


def _translated(exc: psycopg.Error, statement: ops.Statement) -> Exception:
    return ops.translate_error(exc, statement) or exc


def _autocommit_pool(pool_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pool options with autocommit connections, unless the caller chose.

    Every store operation is one statement, atomic on its own: autocommit
    saves the BEGIN and COMMIT round trips of an explicit transaction.
    """
    connection_kwargs = {"autocommit": True, **pool_kwargs.get("kwargs", {})}
    return {**pool_kwargs, "kwargs": connection_kwargs}


def _check_retry(retry: AppendRetry | None, conn: object) -> None:
    if retry is not None and not isinstance(retry, AppendRetry):
        raise TypeError(f"retry must be an AppendRetry, not {type(retry).__name__}")
    if retry is not None and conn is not None:
        # A failed statement aborts the caller's transaction: there is
        # nothing left to retry in, and only the caller can start over.
        raise ValueError("retry cannot be used with conn=: retry the caller's transaction")


class _StoreSettings:
    def __init__(self, max_payload_bytes: int) -> None:
        if (
            isinstance(max_payload_bytes, bool)
            or not isinstance(max_payload_bytes, int)
            or (max_payload_bytes < 1)
        ):
            raise ValueError(f"max_payload_bytes must be a positive int, not {max_payload_bytes!r}")
        self.max_payload_bytes = max_payload_bytes


class EventStore(_StoreSettings):
    """The event store over a ``psycopg_pool.ConnectionPool``.

    ``EventStore(pool)`` borrows the caller's pool and never closes it;
    ``EventStore.connect(dsn)`` creates a pool that ``close()`` closes.
    Every method takes ``conn=`` to run inside the caller's open transaction,
    so business rows and events commit or roll back together.
    """

    def __init__(
        self,
        pool: ConnectionPool[Any],
        *,
        max_payload_bytes: int = ops.DEFAULT_MAX_PAYLOAD_BYTES,
        owns_pool: bool = False,
    ) -> None:
        super().__init__(max_payload_bytes)
        self.pool = pool
        self._owns_pool = owns_pool

    @classmethod
    def connect(
        cls,
        conninfo: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        max_payload_bytes: int = ops.DEFAULT_MAX_PAYLOAD_BYTES,
        **pool_kwargs: Any,
    ) -> Self:
        pool: ConnectionPool[Any] = ConnectionPool(
            conninfo,
            min_size=min_size,
            max_size=max_size,
            open=False,
            **_autocommit_pool(pool_kwargs),
        )
        pool.open(wait=True)
        return cls(pool, max_payload_bytes=max_payload_bytes, owns_pool=True)

    def close(self) -> None:
        if self._owns_pool:
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

    def _run(self, operation: ops.Operation, conn: psycopg.Connection[Any] | None) -> Any:
        statement = next(operation)  # validates before a connection is taken
        if conn is not None:
            return self._drive(conn, operation, statement)
        with self.pool.connection() as pooled:
            return self._drive(pooled, operation, statement)

    @staticmethod
    def _drive(
        conn: psycopg.Connection[Any], operation: ops.Operation, statement: ops.Statement
    ) -> Any:
        while True:
            try:
                rows = conn.execute(statement.sql, statement.params).fetchall()
            except psycopg.Error as exc:
                raise _translated(exc, statement) from exc
            try:
                statement = operation.send(rows)
            except StopIteration as done:
                return done.value

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
        once whatever happened to the failed attempts (aura_pg.retry)."""
        batch = ops.as_batch(events)
        _check_retry(retry, conn)
        with observed_append(stream_id, batch) as observation:
            began = time.monotonic()
            attempt = 1
            while True:
                try:
                    observation.result = self._run(
                        ops.append(
                            stream_id,
                            batch,
                            expected_version,
                            self.max_payload_bytes,
                            observation.traceparent,
                        ),
                        conn,
                    )
                    break
                except psycopg.Error as exc:
                    delay = wait_before_resending(retry, stream_id, exc, attempt, began)
                    if delay is None:
                        raise
                    time.sleep(delay)
                    attempt += 1
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


class AsyncEventStore(_StoreSettings):
    """``EventStore`` for asyncio, over a ``psycopg_pool.AsyncConnectionPool``.

    Same methods, same semantics; ``await AsyncEventStore.connect(dsn)``.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        *,
        max_payload_bytes: int = ops.DEFAULT_MAX_PAYLOAD_BYTES,
        owns_pool: bool = False,
    ) -> None:
        super().__init__(max_payload_bytes)
        self.pool = pool
        self._owns_pool = owns_pool

    @classmethod
    async def connect(
        cls,
        conninfo: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        max_payload_bytes: int = ops.DEFAULT_MAX_PAYLOAD_BYTES,
        **pool_kwargs: Any,
    ) -> Self:
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            conninfo,
            min_size=min_size,
            max_size=max_size,
            open=False,
            **_autocommit_pool(pool_kwargs),
        )
        await pool.open(wait=True)
        return cls(pool, max_payload_bytes=max_payload_bytes, owns_pool=True)

    async def close(self) -> None:
        if self._owns_pool:
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
        self, operation: ops.Operation, conn: psycopg.AsyncConnection[Any] | None
    ) -> Any:
        statement = next(operation)  # validates before a connection is taken
        if conn is not None:
            return await self._drive(conn, operation, statement)
        async with self.pool.connection() as pooled:
            return await self._drive(pooled, operation, statement)

    @staticmethod
    async def _drive(
        conn: psycopg.AsyncConnection[Any], operation: ops.Operation, statement: ops.Statement
    ) -> Any:
        while True:
            try:
                cursor = await conn.execute(statement.sql, statement.params)
                rows = await cursor.fetchall()
            except psycopg.Error as exc:
                raise _translated(exc, statement) from exc
            try:
                statement = operation.send(rows)
            except StopIteration as done:
                return done.value

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
        batch = ops.as_batch(events)
        _check_retry(retry, conn)
        with observed_append(stream_id, batch) as observation:
            began = time.monotonic()
            attempt = 1
            while True:
                try:
                    observation.result = await self._run(
                        ops.append(
                            stream_id,
                            batch,
                            expected_version,
                            self.max_payload_bytes,
                            observation.traceparent,
                        ),
                        conn,
                    )
                    break
                except psycopg.Error as exc:
                    delay = wait_before_resending(retry, stream_id, exc, attempt, began)
                    if delay is None:
                        raise
                    await asyncio.sleep(delay)
                    attempt += 1
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
