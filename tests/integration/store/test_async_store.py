"""AsyncEventStore awaited in the test's own event loop, as an application
uses it: the other tests here run every behaviour against both drivers
through blocking proxies; these add tasks gathered on one loop, native
``async for`` and ``async with``, and the two stores' same methods."""

from __future__ import annotations

import asyncio
import inspect

import pytest

from aura_pg import (
    NO_STREAM,
    AsyncEventStore,
    ConcurrencyError,
    EventStore,
    EventValidationError,
    IdempotencyConflict,
    NewEvent,
)
from tests.helpers.store_drivers import StoreDriver, unwrapped


async def test_append_read_and_duplicates(async_store: AsyncEventStore) -> None:
    batch = [NewEvent("T", {"n": 1}), NewEvent("T", {"n": 2})]
    first = await async_store.append("s", batch, NO_STREAM)
    again = await async_store.append("s", batch, NO_STREAM)
    assert again.duplicate and again.events == first.events
    assert await async_store.stream_version("s") == 2
    assert [e.data["n"] for e in await async_store.read_stream("s")] == [1, 2]
    page = await async_store.read_all(limit=1)
    assert len(page.events) == 1
    assert [e.version async for e in async_store.iter_all(batch_size=1)] == [1, 2]
    assert [e.version async for e in async_store.iter_stream("s", batch_size=1)] == [1, 2]


async def test_typed_errors(async_store: AsyncEventStore) -> None:
    await async_store.append("s", NewEvent("T", {}, idempotency_key="k"))
    with pytest.raises(ConcurrencyError):
        await async_store.append("s", NewEvent("T", {}), NO_STREAM)
    with pytest.raises(IdempotencyConflict):
        await async_store.append("s", NewEvent("T", {"other": 1}, idempotency_key="k"))
    with pytest.raises(EventValidationError):
        await async_store.append("", NewEvent("T", {}))


async def test_concurrent_appends_to_one_stream_stay_contiguous(
    async_store: AsyncEventStore,
) -> None:
    results = await asyncio.gather(
        *(async_store.append("s", NewEvent("T", {"i": i})) for i in range(20))
    )
    assert sorted(r.version for r in results) == list(range(1, 21))


async def test_append_in_the_callers_transaction(async_store: AsyncEventStore) -> None:
    async with async_store.pool.connection() as conn, conn.transaction():
        await async_store.append("s", NewEvent("T", {}), conn=conn)
        assert await async_store.stream_version("s") == 0
    assert await async_store.stream_version("s") == 1


def test_sync_and_async_stores_offer_the_same_methods() -> None:
    def public(cls: type) -> dict[str, list[str]]:
        return {
            name: list(inspect.signature(member).parameters)
            for name, member in inspect.getmembers(cls)
            if not name.startswith("_") and callable(member)
        }

    assert public(EventStore) == public(AsyncEventStore)


def test_each_driver_drives_its_own_store(driver: StoreDriver, store: EventStore) -> None:
    """The harness itself: the async runs of the shared tests go through
    AsyncEventStore, not through EventStore."""
    expected = AsyncEventStore if driver.name == "async" else EventStore
    assert type(unwrapped(store)) is expected
