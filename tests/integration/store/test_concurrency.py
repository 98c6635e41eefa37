"""Concurrency with real connections, threads and processes: lost updates,
racing retries, and readers that never skip an event. With the async
driver, the threads' calls run as concurrent tasks on its event loop."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from aura_pg import NO_STREAM, START, Checkpoint, ConcurrencyError, EventStore, NewEvent
from tests.helpers.store_drivers import StoreDriver, sync_only
from tests.helpers.threads import run_together

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_sixteen_writers_racing_for_one_version_one_wins(store: EventStore) -> None:
    store.append("race", NewEvent("T", {}))
    for round_ in range(5):
        version = store.stream_version("race")
        outcomes = run_together(
            16, lambda i: store.append("race", NewEvent("T", {"round": round_, "w": i}), version)
        )
        winners = [o for o in outcomes if not isinstance(o, Exception)]
        losers = [o for o in outcomes if isinstance(o, Exception)]
        assert len(winners) == 1, outcomes
        assert winners[0].version == version + 1
        assert all(isinstance(o, ConcurrencyError) and o.actual == version + 1 for o in losers)
    assert [e.version for e in store.read_stream("race")] == list(range(1, 7))


def test_sixteen_writers_retrying_on_conflict_keep_versions_contiguous(store: EventStore) -> None:
    per_writer = 15
    conflicts = [0] * 16

    def writer(i: int) -> list[int]:
        versions = []
        for n in range(per_writer):
            while True:
                current = store.stream_version("hot")
                try:
                    result = store.append("hot", NewEvent("T", {"w": i, "n": n}), current)
                except ConcurrencyError:
                    conflicts[i] += 1
                    continue
                versions.append(result.version)
                break
        return versions

    outcomes = run_together(16, writer)
    assert not any(isinstance(o, Exception) for o in outcomes), outcomes
    won = sorted(v for versions in outcomes for v in versions)
    assert won == list(range(1, 16 * per_writer + 1))
    events = store.read_stream("hot")
    assert [e.version for e in events] == won
    assert len({(e.data["w"], e.data["n"]) for e in events}) == 16 * per_writer
    assert sum(conflicts) > 0  # the race was real


@pytest.mark.parametrize("stream_exists", [False, True])
def test_two_identical_appends_at_once_record_once(store: EventStore, stream_exists: bool) -> None:
    for round_ in range(10):
        stream = f"dup-{round_}"
        if stream_exists:
            store.append(stream, NewEvent("T", {}))
        batch = [NewEvent("T", {"n": n}, idempotency_key=f"k{n}") for n in range(3)]
        outcomes = run_together(2, lambda _i: store.append(stream, batch))
        assert not any(isinstance(o, Exception) for o in outcomes), outcomes
        assert sorted(o.duplicate for o in outcomes) == [False, True]
        assert outcomes[0].events == outcomes[1].events
        assert store.stream_version(stream) == (4 if stream_exists else 3)


@pytest.mark.parametrize("stream_exists", [False, True])
def test_retry_waiting_on_the_first_append_gets_the_duplicate(
    store: EventStore, driver: StoreDriver, dsn: str, stream_exists: bool
) -> None:
    if stream_exists:
        store.append("s", NewEvent("T", {}))
    batch = [NewEvent("T", {"n": 1}, idempotency_key="k")]
    second: list[Any] = []
    with driver.connection(dsn) as first_conn:
        first = store.append("s", batch, conn=first_conn)  # transaction left open
        retry = threading.Thread(target=lambda: second.append(store.append("s", batch)))
        retry.start()
        time.sleep(0.3)
        assert retry.is_alive()  # waiting on the first append's stream lock
        first_conn.commit()
        retry.join(timeout=30)
    assert second[0].duplicate and second[0].events == first.events
    assert store.stream_version("s") == (2 if stream_exists else 1)


def test_reader_never_skips_an_event_that_commits_late(
    store: EventStore, driver: StoreDriver, dsn: str
) -> None:
    store.append("early", NewEvent("T", {}))
    before = store.read_all(START)
    assert len(before.events) == 1
    with driver.connection(dsn) as slow:
        slow_result = store.append("slow", NewEvent("SLOW", {}), conn=slow)  # not committed
        fast_result = store.append("fast", NewEvent("FAST", {}))  # committed
        fast_pos = fast_result.events[0].global_position
        slow_pos = slow_result.events[0].global_position
        assert slow_pos < fast_pos
        # A reader going by position alone would see `fast` and move past
        # `slow`'s position for good; this reader holds back instead.
        held = store.read_all(before.checkpoint)
        assert held.events == ()
        assert held.checkpoint == before.checkpoint
        slow.commit()
    after = store.read_all(before.checkpoint)
    assert [e.type for e in after.events] == ["SLOW", "FAST"]


def test_commit_order_follows_transaction_ids_not_positions(
    store: EventStore, driver: StoreDriver, dsn: str
) -> None:
    with driver.connection(dsn) as early_xid:
        # This transaction takes its id first but inserts last.
        early_xid.execute("SELECT pg_current_xact_id()")
        store.append("b", NewEvent("SECOND_POSITION", {}))
        assert store.read_all().events == ()  # held back by the open transaction
        store.append("a", NewEvent("FIRST_XID", {}), conn=early_xid)
        early_xid.commit()
    events = store.read_all().events
    assert [e.type for e in events] == ["FIRST_XID", "SECOND_POSITION"]
    assert events[0].global_position > events[1].global_position
    assert events[0].checkpoint < events[1].checkpoint


def writer_process(dsn: str, *args: str, stdout: Path | None = None) -> subprocess.Popen[str]:
    """The writer helper as a process; its output on a pipe, or in ``stdout``."""
    with contextlib.ExitStack() as files:
        target = files.enter_context(stdout.open("w")) if stdout else subprocess.PIPE
        return subprocess.Popen(
            [sys.executable, "-m", "tests.helpers.append_writer", dsn, *args],
            cwd=REPO_ROOT,
            stdout=target,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )


def writers_and_a_reader_see_every_event_once(
    store: EventStore, dsn: str, out: Path, writers: int, batches: int, page: int
) -> int:
    """``writers`` processes append ``batches`` batches of 1 to 5 events each,
    some holding their transaction open a little so that commits land out
    of position order, while this process reads the log through
    ``read_all`` checkpoints; every event is read exactly once. Returns how
    many events were written."""
    # Each writer prints the ids it was told were recorded into a file of its
    # own: a pipe would fill up and stall a writer until the reader is done.
    files = [out / f"writer-{seed}.txt" for seed in range(writers)]
    processes = [
        writer_process(dsn, str(batches), str(seed), stdout=path) for seed, path in enumerate(files)
    ]
    seen: list[Any] = []
    checkpoint: Checkpoint = START
    while any(w.poll() is None for w in processes):
        read = store.read_all(checkpoint, limit=page)
        seen.extend(e.event_id for e in read.events)
        checkpoint = read.checkpoint
        if not read.events:
            time.sleep(0.005)
    assert all(w.wait() == 0 for w in processes)
    seen.extend(e.event_id for e in store.iter_all(checkpoint, batch_size=page))
    written = {line for path in files for line in path.read_text().split()}
    assert len(seen) == len(set(seen)), "an event was read twice"
    assert {str(i) for i in seen} == written, "an event was skipped"
    with store.pool.connection() as conn:
        assert conn.execute("SELECT count(*) FROM aura.events").fetchone() == (len(written),)
    # versions stayed contiguous in every stream
    with store.pool.connection() as conn:
        gaps = conn.execute(
            "SELECT stream_id FROM aura.events GROUP BY stream_id HAVING max(version) <> count(*)"
        ).fetchall()
    assert gaps == []
    return len(written)


@pytest.mark.slow
def test_concurrent_writer_processes_and_a_reader_see_every_event_once(
    store: EventStore, dsn: str, tmp_path: Path
) -> None:
    writers_and_a_reader_see_every_event_once(store, dsn, tmp_path, writers=6, batches=120, page=50)


@pytest.mark.slow
@sync_only  # the reader's driver is checked by the test above; this one is about volume
def test_sixteen_writers_and_a_reader_over_100k_events_see_each_once(
    store: EventStore, dsn: str, tmp_path: Path
) -> None:
    """Gap-freedom under stress: 16 writer processes, random batch sizes and
    transaction lengths, at least 100,000 events, one checkpointing reader."""
    written = writers_and_a_reader_see_every_event_once(
        store, dsn, tmp_path, writers=16, batches=2_300, page=1_000
    )
    assert written >= 100_000


def test_writer_killed_mid_transaction_leaves_nothing_and_blocks_no_reader(
    store: EventStore, dsn: str
) -> None:
    store.append("before", NewEvent("T", {}))
    writer = writer_process(dsn, "hold", "victim")
    assert writer.stdout is not None
    assert writer.stdout.readline().strip() == "appended"
    store.append("during", NewEvent("T", {}))
    assert [e.stream_id for e in store.read_all().events] == ["before"]  # held back
    writer.send_signal(signal.SIGKILL)
    writer.communicate(timeout=30)
    deadline = time.monotonic() + 30
    while True:  # the server notices the dead client and aborts its transaction
        streams = [e.stream_id for e in store.read_all().events]
        if streams == ["before", "during"] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert streams == ["before", "during"]
    assert store.stream_version("victim") == 0
    assert store.read_stream("victim") == []
    store.append("victim", NewEvent("T", {}), NO_STREAM)  # the stream is free again
