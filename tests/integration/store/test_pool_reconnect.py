"""Writers come back soon after the database does.

A store's pool replaces a lost connection in the background. psycopg_pool's
own schedule waits about 1 s, then 2 s, 4 s... between attempts, so after a
partition of a few seconds a writer waited up to seconds more although the
server answered; the store's pools (aura_pg.store.pool) try again within
``RECONNECT_MAX_DELAY``. And idle connections cut with a broken one are
checked and replaced, not handed out to a retrying append one by one. A
partition and cut connections through a TCP proxy, both drivers.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from aura_pg import AppendRetry, NewEvent
from aura_pg.chaos import LatencyProxy
from aura_pg.store.pool import RECONNECT_FIRST_DELAY, RECONNECT_MAX_DELAY, QuickAttempt
from tests.helpers.store_drivers import StoreDriver

RIDE_OUT = AppendRetry(attempts=1000, base_delay=0.02, max_delay=0.2, budget=60.0)
# The partition ends this long after the first failed reconnection attempt:
# past psycopg_pool's second retry (at 1 + 2 s, +-10%), well before its third
# (at 1 + 2 + 4 s, -10%), so its own schedule would come back over 2.5 s
# after the partition ended.
PARTITION = 3.6
# Generous for a loaded 2-core machine, far below psycopg_pool's 2.7 s.
RESUMED_WITHIN = 1.0


@pytest.fixture
def proxy(dsn: str) -> Iterator[LatencyProxy]:
    with LatencyProxy.in_front_of(dsn) as opened:
        yield opened


def test_the_reconnection_schedule_is_short_and_bounded() -> None:
    attempt = QuickAttempt(timeout=60.0)
    delays = []
    for _ in range(8):
        attempt.update_delay(time.monotonic())
        delays.append(attempt.delay)
    assert RECONNECT_FIRST_DELAY * 0.9 <= delays[0] <= RECONNECT_FIRST_DELAY * 1.1
    assert delays[1] > delays[0]
    assert all(d <= RECONNECT_MAX_DELAY * 1.1 for d in delays)
    assert delays[-1] >= RECONNECT_MAX_DELAY * 0.9  # it does grow to the cap
    # psycopg_pool's giving up after reconnect_timeout still holds.
    short = QuickAttempt(timeout=0.1)
    now = time.monotonic()
    short.update_delay(now)
    short.update_delay(now + 0.1)
    assert short.time_to_give_up(now + 0.1)


def recorded_copies(dsn: str, event: NewEvent) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM aura.events WHERE event_id = %s", (event.event_id,)
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_appends_resume_soon_after_a_partition_ends(
    driver: StoreDriver, dsn: str, proxy: LatencyProxy
) -> None:
    stream = f"reconnect-{uuid.uuid4()}"
    with driver.connect(proxy.dsn(dsn), min_size=1, max_size=1, timeout=30) as store:
        store.append(stream, [NewEvent("Before", {})], retry=RIDE_OUT)
        proxy.refuse(True)
        assert proxy.sever() >= 1
        ended = threading.Event()
        ended_at: list[float] = []

        def end_partition() -> None:
            proxy.refuse(False)
            ended_at.append(time.monotonic())
            ended.set()

        # The append meets the severed connection at once; the pool starts
        # replacing it (refused) and the resend waits for a connection.
        timer = threading.Timer(PARTITION, end_partition)
        timer.start()
        try:
            event = NewEvent("During", {"n": 1})
            result = store.append(stream, [event], retry=RIDE_OUT)
            done = time.monotonic()
        finally:
            timer.cancel()
            proxy.refuse(False)
        assert ended.is_set(), "the append succeeded during the partition"
        resumed = done - ended_at[0]
        assert resumed < RESUMED_WITHIN, f"the append came back {resumed:.2f} s after the partition"
        # Nothing lost, nothing doubled.
        assert not result.duplicate
        assert result.events[0].version == 2
        assert recorded_copies(dsn, event) == 1
        after = store.append(stream, [NewEvent("After", {})], retry=RIDE_OUT)
        assert after.events[0].version == 3


def test_idle_connections_cut_with_the_first_are_not_handed_out_one_by_one(
    driver: StoreDriver, dsn: str, proxy: LatencyProxy
) -> None:
    # Ten idle connections, all cut at once (a failover, a dropped NAT
    # table): psycopg_pool would hand them out in turn, and the default
    # AppendRetry's eight attempts would all meet a dead one. The first
    # comes back broken, the pool checks the others in the background.
    stream = f"stale-{uuid.uuid4()}"
    with driver.connect(proxy.dsn(dsn), min_size=10, max_size=10, timeout=30) as store:
        store.pool.wait(timeout=30)
        store.append(stream, [NewEvent("Before", {})])
        assert proxy.sever() >= 10
        event = NewEvent("After", {})
        began = time.monotonic()
        result = store.append(stream, [event], retry=AppendRetry())
        took = time.monotonic() - began
        assert took < RESUMED_WITHIN, f"the append took {took:.2f} s"
        assert result.events[0].version == 2
        assert recorded_copies(dsn, event) == 1
