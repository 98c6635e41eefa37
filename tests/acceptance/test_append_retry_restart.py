"""Postgres crashes (immediate shutdown, crash recovery on restart) twice
under writers that append with AppendRetry, on a cluster of this test's
own. Some appends die with the server, some of those after their commit;
every writer carries on, and every event each writer was told was
recorded is in the log exactly once, at the position it was told. The
writers take turns at the two drivers: EventStore and AsyncEventStore."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from aura_pg import AppendRetry, NewEvent, migrate
from aura_pg.devtools.localdb import LocalCluster, temporary_cluster
from tests.helpers.store_drivers import DRIVERS, store_driver

WRITERS = 3
# Generous: a restart here takes a few seconds, crash recovery included.
RIDE_OUT = AppendRetry(attempts=200, base_delay=0.05, max_delay=0.5, budget=90.0)


@pytest.fixture
def own_cluster() -> Iterator[LocalCluster]:
    with temporary_cluster({"fsync": "on"}, prefix="aura-pg-retry-") as cluster:
        migrate.upgrade(cluster.dsn())
        yield cluster


class Writer(threading.Thread):
    """Appends one event at a time with retries until told to stop; keeps
    what the store reported for each event."""

    def __init__(self, dsn: str, number: int, stop: threading.Event) -> None:
        driver = DRIVERS[number % len(DRIVERS)]
        super().__init__(name=f"writer {number} ({driver})")
        self.driver = driver
        self.dsn = dsn
        self.number = number
        self.stop = stop
        self.reported: dict[str, int] = {}  # event id -> global position
        self.duplicates = 0
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            with (
                store_driver(self.driver) as driver,
                driver.connect(self.dsn, max_size=1, timeout=2) as store,
            ):
                n = 0
                while not self.stop.is_set():
                    event = NewEvent("A", {"writer": self.number, "n": n})
                    stream = f"w{self.number}-{n % 5}"
                    result = store.append(stream, [event], retry=RIDE_OUT)
                    self.reported[str(event.event_id)] = result.events[0].global_position
                    self.duplicates += result.duplicate
                    n += 1
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.failure = exc


def wait_for_appends(writers: list[Writer], more_than: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while sum(len(w.reported) for w in writers) <= more_than:
        assert time.monotonic() < deadline, "the writers stopped making progress"
        assert not any(w.failure for w in writers), [w.failure for w in writers]
        time.sleep(0.05)


@pytest.mark.slow
def test_retrying_writers_record_each_event_exactly_once_across_crashes(
    own_cluster: LocalCluster,
) -> None:
    dsn = own_cluster.dsn()
    stop = threading.Event()
    writers = [Writer(dsn, number, stop) for number in range(WRITERS)]
    for writer in writers:
        writer.start()
    try:
        for _ in range(2):
            wait_for_appends(writers, sum(len(w.reported) for w in writers) + 150)
            own_cluster.stop("immediate")
            time.sleep(0.5)
            own_cluster.start()
        wait_for_appends(writers, sum(len(w.reported) for w in writers) + 150)
    finally:
        stop.set()
        for writer in writers:
            writer.join(120)
    assert [w.failure for w in writers] == [None] * WRITERS

    reported = {event_id: pos for w in writers for event_id, pos in w.reported.items()}
    with psycopg.connect(dsn) as conn:
        stored = conn.execute("SELECT event_id::text, global_position FROM aura.events").fetchall()
    # Exactly once: no event twice, none missing, none the writers were not
    # told about, each where they were told it is.
    assert len(stored) == len({event_id for event_id, _ in stored})
    assert dict(stored) == reported
    print(
        f"{len(reported)} events from {WRITERS} writers across 2 crashes; "
        f"{sum(w.duplicates for w in writers)} appends were found already recorded on retry"
    )
