"""Retrying appends against real connection failures: the pool's connection
killed while idle, or killed while the append waits for a lock; the events
end up recorded exactly once, with either driver."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from aura_pg import AppendRetry, ConcurrencyError, EventStore, NewEvent
from tests.helpers.metrics import retries_counted
from tests.helpers.projections import query
from tests.helpers.store_drivers import StoreDriver

APP = "aura-pg retry test"
FAST = AppendRetry(base_delay=0.02, max_delay=0.2, budget=20.0)


def connect_store(driver: StoreDriver, dsn: str) -> EventStore:
    return driver.connect(dsn, min_size=1, max_size=1, kwargs={"application_name": APP})


def terminate_store_connections(dsn: str) -> int:
    rows = query(
        dsn,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = %s",
        [APP],
    )
    return len(rows)


def recorded_copies(dsn: str, event: NewEvent) -> int:
    rows = query(dsn, "SELECT count(*) FROM aura.events WHERE event_id = %s", [event.event_id])
    return int(rows[0][0])


def test_an_append_on_a_killed_connection_is_sent_again(
    driver: StoreDriver, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    with connect_store(driver, dsn) as store:
        store.append("idle", [NewEvent("A", {})])
        assert terminate_store_connections(dsn) == 1
        event = NewEvent("A", {"n": 2})
        counted = retries_counted()
        with caplog.at_level(logging.WARNING, logger="aura_pg.retry"):
            result = store.append("idle", [event], 1, retry=FAST)
    assert (result.duplicate, result.events[0].version) == (False, 2)
    assert recorded_copies(dsn, event) == 1
    assert "attempt 1 failed" in caplog.text
    assert retries_counted() == counted + 1


def test_without_retry_the_failure_reaches_the_caller(driver: StoreDriver, dsn: str) -> None:
    with connect_store(driver, dsn) as store:
        store.append("idle", [NewEvent("A", {})])
        terminate_store_connections(dsn)
        event = NewEvent("A", {})
        with pytest.raises(psycopg.OperationalError):
            store.append("idle", [event])
    assert recorded_copies(dsn, event) == 0


def test_an_append_killed_while_it_waits_for_its_stream_is_recorded_once(
    driver: StoreDriver, dsn: str
) -> None:
    """The first attempt is killed while it waits for the stream's append
    lock (held by another session); the retry waits again, and commits
    once the lock is free."""
    with connect_store(driver, dsn) as store, psycopg.connect(dsn) as blocker:
        store.append("locked", [NewEvent("A", {})])
        blocker.execute("SELECT pg_advisory_xact_lock(1635087475, hashtext('locked'))")
        event = NewEvent("B", {"n": 1})
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(store.append, "locked", [event], 1, retry=FAST)
            deadline = time.monotonic() + 10
            while not query(
                dsn,
                "SELECT 1 FROM pg_stat_activity WHERE application_name = %s "
                "AND wait_event_type = 'Lock'",
                [APP],
            ):
                assert time.monotonic() < deadline, "the append never waited for the lock"
                time.sleep(0.02)
            assert terminate_store_connections(dsn) == 1
            time.sleep(0.3)  # the second attempt is waiting for the lock now
            assert not pending.done()
            blocker.commit()
            result = pending.result(timeout=30)
    assert (result.duplicate, result.events[0].version) == (False, 2)
    assert recorded_copies(dsn, event) == 1


def test_what_the_store_refuses_on_purpose_is_not_retried(
    driver: StoreDriver, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    with connect_store(driver, dsn) as store:
        store.append("s", [NewEvent("A", {})])
        with (
            caplog.at_level(logging.WARNING, logger="aura_pg.retry"),
            pytest.raises(ConcurrencyError),
        ):
            store.append("s", [NewEvent("A", {})], 5, retry=FAST)
    assert "attempt" not in caplog.text


def test_retry_inside_the_callers_transaction_is_refused(driver: StoreDriver, dsn: str) -> None:
    with connect_store(driver, dsn) as store, driver.connection(dsn) as conn:
        with pytest.raises(ValueError, match="retry cannot be used with conn="):
            store.append("s", [NewEvent("A", {})], conn=conn, retry=FAST)
        with pytest.raises(TypeError, match="retry must be an AppendRetry"):
            store.append("s", [NewEvent("A", {})], retry=3)  # type: ignore[arg-type]
    assert query(dsn, "SELECT count(*) FROM aura.events") == [(0,)]


def test_a_pooled_connection_closed_for_idling_is_retried(driver: StoreDriver, dsn: str) -> None:
    # idle_session_timeout ends the pool's idle connection (SQLSTATE 57P05):
    # nothing of the append was sent on it, so it is sent again.
    options = {"application_name": APP, "options": "-c idle_session_timeout=300"}
    with driver.connect(dsn, min_size=1, max_size=1, kwargs=options) as store:
        store.append("idle", NewEvent("T", {}))
        time.sleep(1.0)
        event = NewEvent("T", {"after": "idle"})
        before = retries_counted("connection")
        result = store.append("idle", event, retry=FAST)
    assert result.version == 2
    assert recorded_copies(dsn, event) == 1
    assert retries_counted("connection") > before
