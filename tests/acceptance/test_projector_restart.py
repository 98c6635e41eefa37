"""Postgres itself dies (immediate shutdown: no checkpoint, crash recovery
on restart) under a daemon that is applying batches, on a cluster of this
test's own. The daemon reconnects by itself, its log watcher too, and the read
models end exactly the fold of the log."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from aura_pg import EventStore, NewEvent, migrate
from aura_pg.devtools.localdb import LocalCluster, temporary_cluster
from tests.helpers.projections import (
    applied_positions,
    caught_up,
    fold_streams,
    log_positions,
    running_daemon,
    stream_counts,
    wait_for,
)


@pytest.fixture
def own_cluster() -> Iterator[LocalCluster]:
    with temporary_cluster({"fsync": "on"}, prefix="aura-pg-restart-") as cluster:
        migrate.upgrade(cluster.dsn())
        yield cluster


def keep_appending(dsn: str, stop: threading.Event, recorded: list[int]) -> None:
    """Appends one event at a time, riding out the outage; records the
    positions it was told were committed."""
    n = 0
    while not stop.is_set():
        try:
            with EventStore.connect(dsn, max_size=1, timeout=2) as store:
                while not stop.is_set():
                    result = store.append(f"r-{n % 7}", [NewEvent("A", {"n": n, "sleep_ms": 1})])
                    recorded.append(result.events[0].global_position)
                    n += 1
                    time.sleep(0.005)
        except psycopg.Error:  # the outage, the pool's timeout included
            time.sleep(0.2)


async def test_daemon_recovers_from_an_immediate_postgres_restart(
    own_cluster: LocalCluster,
) -> None:
    dsn = own_cluster.dsn()
    stop = threading.Event()
    recorded: list[int] = []
    writer = threading.Thread(target=keep_appending, args=(dsn, stop, recorded))
    writer.start()
    try:
        async with running_daemon(dsn, ["tally_set", "tally_each"], poll_interval=0.2) as daemon:
            await wait_for(lambda: len(recorded) > 100, timeout=30)
            await asyncio.to_thread(own_cluster.stop, "immediate")
            await asyncio.sleep(1.0)
            await asyncio.to_thread(own_cluster.start)
            before = len(recorded)
            await wait_for(lambda: len(recorded) > before + 100, timeout=60, what="appends again")
            stop.set()
            await asyncio.to_thread(writer.join, 30)
            await wait_for(
                lambda: caught_up(dsn, "tally_set") and caught_up(dsn, "tally_each"),
                timeout=60,
                what="catch-up after the restart",
            )
            assert daemon.watcher is not None and daemon.watcher.reconnects >= 1
            assert all(r.reconnects >= 1 for r in daemon.runners.values())
    finally:
        stop.set()
        writer.join(30)
    log = log_positions(dsn)
    # Every append the writer was told about survived the crash.
    assert set(recorded) <= set(log)
    for schema in ("tally_set", "tally_each"):
        assert applied_positions(dsn, schema) == log
        assert stream_counts(dsn, schema) == fold_streams(dsn)
