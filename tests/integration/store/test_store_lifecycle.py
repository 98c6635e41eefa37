"""Pools: a store closes the pool it created and never one it borrowed."""

from __future__ import annotations

import pytest
from psycopg_pool import AsyncConnectionPool

from aura_pg import AsyncEventStore, NewEvent
from tests.helpers.store_drivers import StoreDriver


def test_borrowed_pool_stays_open(driver: StoreDriver, dsn: str) -> None:
    with driver.pool(dsn, min_size=1, max_size=2) as pool:
        with driver.borrow(pool) as store:
            store.append("s", NewEvent("T", {}))
        assert not pool.closed
        with pool.connection() as conn:
            assert conn.execute("SELECT count(*) FROM aura.events").fetchone() == (1,)


def test_owned_pool_is_closed(driver: StoreDriver, dsn: str) -> None:
    store = driver.connect(dsn)
    store.append("s", NewEvent("T", {}))
    store.close()
    assert store.pool.closed


async def test_async_borrowed_and_owned_pools(dsn: str) -> None:
    async with AsyncConnectionPool(dsn, min_size=1, max_size=2, open=False) as pool:
        async with AsyncEventStore(pool) as store:
            await store.append("s", NewEvent("T", {}))
        assert not pool.closed
    owned = await AsyncEventStore.connect(dsn)
    await owned.close()
    assert owned.pool.closed


def test_payload_limit_must_be_positive(driver: StoreDriver, dsn: str) -> None:
    with (
        driver.pool(dsn, min_size=1, max_size=1) as pool,
        pytest.raises(ValueError, match="max_payload_bytes"),
    ):
        driver.borrow(pool, max_payload_bytes=0)
