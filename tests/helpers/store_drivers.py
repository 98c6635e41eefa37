"""Both store drivers behind one blocking interface, so that each behaviour
test of the store runs against EventStore and AsyncEventStore alike.

The async driver's store, pools and connections live on an event loop in a
thread of its own (a portal). The test calls them through :class:`Blocking`
proxies: a coroutine is run to its end on that loop, an async iterator or
context manager is used as a sync one, and the psycopg and store objects
that come out are wrapped in turn. So a test written against EventStore
(``store.append(...)``, ``with store.pool.connection() as conn:``,
``conn.execute(...).fetchone()``, ``conn=conn``) drives the async store,
its pool and its connections for real, and threads that call it at once
become tasks running at once on the loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, TypeVar

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from aura_pg import AsyncEventStore, EventStore

T = TypeVar("T")

DRIVERS = ("sync", "async")

sync_only = pytest.mark.parametrize("driver", ["sync"], indirect=True)
"""For a test of what the database does whichever driver appends: once is enough."""


class Portal:
    """An event loop running in a thread of its own, for blocking callers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="async-store-loop", daemon=True
        )
        self._thread.start()

    def run(self, awaitable: Awaitable[T]) -> T:
        """Run ``awaitable`` on the loop and wait for its result (or error)."""

        async def awaited() -> T:
            return await awaitable

        return asyncio.run_coroutine_threadsafe(awaited(), self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


# What a blocking proxy wraps: objects whose methods are coroutines.
_ASYNC_OBJECTS = (
    AsyncEventStore,
    AsyncConnectionPool,
    psycopg.AsyncConnection,
    psycopg.AsyncCursor,
    psycopg.AsyncTransaction,
)


class Blocking:
    """An async object (store, pool, connection, cursor) used from blocking code."""

    def __init__(self, target: Any, portal: Portal) -> None:
        self._target = target
        self._portal = portal

    def __repr__(self) -> str:
        return f"Blocking({self._target!r})"

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if callable(value):
            return lambda *args, **kwargs: self._call(value, args, kwargs)
        return blocking(value, self._portal)

    def _call(self, function: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        args = [unwrapped(arg) for arg in args]
        kwargs = {key: unwrapped(value) for key, value in kwargs.items()}
        return blocking(function(*args, **kwargs), self._portal)

    def __enter__(self) -> Any:
        return blocking(self._portal.run(self._target.__aenter__()), self._portal)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Any:
        return self._portal.run(self._target.__aexit__(exc_type, exc, tb))


class BlockingIterator:
    """An async iterator (``iter_all``, ``iter_stream``) used as a sync one."""

    def __init__(self, target: Any, portal: Portal) -> None:
        self._target = target
        self._portal = portal

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        try:
            return blocking(self._portal.run(self._target.__anext__()), self._portal)
        except StopAsyncIteration:
            raise StopIteration from None


def blocking(value: Any, portal: Portal) -> Any:
    """``value`` as blocking code can use it: awaited, or wrapped."""
    if asyncio.iscoroutine(value):
        value = portal.run(value)
    if isinstance(value, _ASYNC_OBJECTS) or hasattr(value, "__aenter__"):
        return Blocking(value, portal)
    if hasattr(value, "__anext__"):
        return BlockingIterator(value, portal)
    return value


def unwrapped(value: Any) -> Any:
    """What a proxy stands for (a connection passed as ``conn=``), else ``value``."""
    return value._target if isinstance(value, Blocking) else value


class SyncDriver:
    """EventStore, ConnectionPool and psycopg.Connection as they are."""

    name = "sync"

    def connect(self, dsn: str, **kwargs: Any) -> EventStore:
        """``EventStore.connect``: a store that owns its pool."""
        return EventStore.connect(dsn, **kwargs)

    def borrow(self, pool: Any, **kwargs: Any) -> EventStore:
        """``EventStore(pool)``: a store over the caller's pool."""
        return EventStore(pool, **kwargs)

    def pool(self, dsn: str, **kwargs: Any) -> ConnectionPool[Any]:
        """A pool of the caller's, opened by ``with``."""
        return ConnectionPool(dsn, open=False, **kwargs)

    def connection(self, dsn: str, **kwargs: Any) -> psycopg.Connection[Any]:
        """A connection of the caller's (not autocommit), for ``conn=``."""
        return psycopg.connect(dsn, **kwargs)


class AsyncDriver:
    """AsyncEventStore, AsyncConnectionPool and psycopg.AsyncConnection on a
    portal's loop, behind blocking proxies with the sync driver's interface."""

    name = "async"

    def __init__(self) -> None:
        self.portal = Portal()

    def close(self) -> None:
        self.portal.close()

    def connect(self, dsn: str, **kwargs: Any) -> Any:
        return blocking(AsyncEventStore.connect(dsn, **kwargs), self.portal)

    def borrow(self, pool: Any, **kwargs: Any) -> Any:
        return Blocking(AsyncEventStore(unwrapped(pool), **kwargs), self.portal)

    def pool(self, dsn: str, **kwargs: Any) -> Any:
        async def created() -> AsyncConnectionPool[Any]:
            return AsyncConnectionPool(dsn, open=False, **kwargs)

        return Blocking(self.portal.run(created()), self.portal)

    def connection(self, dsn: str, **kwargs: Any) -> Any:
        return blocking(psycopg.AsyncConnection.connect(dsn, **kwargs), self.portal)


StoreDriver = SyncDriver | AsyncDriver


@contextmanager
def store_driver(name: str) -> Iterator[StoreDriver]:
    """The driver named ``name`` (one of DRIVERS), its event loop stopped after use."""
    if name == "sync":
        yield SyncDriver()
        return
    driver = AsyncDriver()
    try:
        yield driver
    finally:
        driver.close()
