"""Projector daemons as real processes under real faults: SIGTERM, kill -9
of the owner mid-batch under a steady append load, terminated backends, a
poison event. Afterwards every read model must be exactly the fold of the
log: nothing skipped, nothing applied twice (the tally's primary key on the
event position would refuse a second application outright)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aura_pg.projection.rebuild import rebuild
from tests.helpers.daemons import FIXTURE_PROJECTIONS, ROOT, Daemons, start_writer
from tests.helpers.projections import (
    assert_exact_fold,
    caught_up,
    fixture_catalog,
    query,
    stream_counts,
    wait_for_sync,
)

PROJECTIONS = FIXTURE_PROJECTIONS
# The advisory lock class of aura.append_events' per-stream lock.
STREAM_APPEND_LOCK_CLASS = 1635087475


@pytest.fixture
def daemons(dsn: str, tmp_path: Path) -> Iterator[Daemons]:
    # The daemons' logs stay in pytest's temporary directory for a look
    # after a failure.
    running = Daemons(dsn, tmp_path)
    try:
        yield running
    finally:
        running.close()


def wait_caught_up(dsn: str) -> None:
    wait_for_sync(lambda: all(caught_up(dsn, name) for name in PROJECTIONS), 60, "catch-up")


def test_sigterm_finishes_the_batch_releases_and_exits_zero(dsn: str, daemons: Daemons) -> None:
    writer = start_writer(dsn, daemons, 2.0, 200, seed=1)
    process = daemons.start("solo")
    wait_for_sync(lambda: daemons.owners() == {"solo"}, 90, "ownership")
    time.sleep(0.5)  # mid-load
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(20) == 0
    stopped_in = time.monotonic() - started
    assert stopped_in < 10, f"took {stopped_in:.1f}s to stop"
    assert daemons.owners() == {None}
    # The writer still runs: its appends hold the per-stream append lock
    # (two-key class STREAM_APPEND_LOCK_CLASS); only the daemon's locks count.
    assert query(
        dsn,
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
        " AND NOT (objsubid = 2 AND classid = %s::oid)",
        (STREAM_APPEND_LOCK_CLASS,),
    ) == [(0,)]
    assert writer.wait(30) == 0
    # A fresh daemon finishes the work exactly.
    daemons.start("after")
    wait_caught_up(dsn)
    for schema in PROJECTIONS:
        assert_exact_fold(dsn, schema)


def test_kill_minus_nine_of_the_owner_fails_over_with_nothing_lost_or_doubled(
    dsn: str, daemons: Daemons
) -> None:
    writers = [start_writer(dsn, daemons, 12.0, 150, seed=seed) for seed in (1, 2)]
    # Plus a writer whose transactions stay open a while, so commits land
    # out of position order while the owners die.
    writers.append(
        subprocess.Popen(
            [sys.executable, "-m", "tests.helpers.append_writer", dsn, "600", "9"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            text=True,
        )
    )
    daemons.start("a")
    wait_for_sync(lambda: daemons.owners() == {"a"}, 90, "first ownership")
    daemons.start("b")
    takeovers: list[float] = []
    for _ in range(4):
        owner = next(iter(daemons.owners()))
        assert owner in ("a", "b")
        other = "b" if owner == "a" else "a"
        time.sleep(0.7)
        killed_at = time.monotonic()
        daemons.kill(owner)
        wait_for_sync(lambda other=other: daemons.owners() == {other}, 30, f"takeover by {other}")
        takeovers.append(time.monotonic() - killed_at)
        daemons.start(owner)  # back as the stand-by
    for writer in writers:
        assert writer.wait(60) == 0
    wait_caught_up(dsn)
    for schema in PROJECTIONS:
        assert_exact_fold(dsn, schema)
    # ... and equals a fresh rebuild from the first event.
    for process in daemons.started:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            assert process.wait(20) == 0
    before = {schema: stream_counts(dsn, schema) for schema in PROJECTIONS}
    for schema in PROJECTIONS:
        assert asyncio.run(rebuild(dsn, fixture_catalog().get(schema)))
        assert stream_counts(dsn, schema) == before[schema]
        assert_exact_fold(dsn, schema)
    print(f"takeover after kill -9: {', '.join(f'{t:.2f}s' for t in takeovers)}")
    assert max(takeovers) < 15


def test_terminated_backends_under_load_recover(dsn: str, daemons: Daemons) -> None:
    writer = start_writer(dsn, daemons, 6.0, 200, seed=3)
    daemons.start("solo")
    wait_for_sync(lambda: daemons.owners() == {"solo"}, 90, "ownership")
    for _ in range(4):
        time.sleep(1.0)
        query(
            dsn,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name LIKE 'aura-pg projector%%' AND datname = current_database()",
        )
    assert writer.wait(60) == 0
    wait_caught_up(dsn)
    for schema in PROJECTIONS:
        assert_exact_fold(dsn, schema)
    assert daemons.processes["solo"].poll() is None  # it survived every termination


def test_poison_event_under_kills_is_dead_lettered_exactly_once(dsn: str, daemons: Daemons) -> None:
    writer = start_writer(dsn, daemons, 4.0, 150, seed=4, poison_at=100)
    try:
        daemons.start("a")
        # The stand-by starts once "a" owns both projections: two daemons
        # starting together may split them, and the kills below go to one
        # owner of both.
        wait_for_sync(lambda: daemons.owners() == {"a"}, 90)
        daemons.start("b")
        for _ in range(2):
            time.sleep(1.0)
            owner = next(iter(daemons.owners() - {None}))
            assert owner is not None
            daemons.kill(owner)
            daemons.start(owner)
        assert writer.wait(60) == 0
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait(10)
    wait_caught_up(dsn)
    poison = query(dsn, "SELECT global_position FROM aura.events WHERE data ? 'poison'")
    assert len(poison) == 1
    for schema in PROJECTIONS:
        assert_exact_fold(dsn, schema, exclude=[poison[0][0]])
        letters = query(
            dsn, "SELECT global_position FROM aura.dead_letters WHERE projection = %s", (schema,)
        )
        assert letters == poison
