"""Python processors in real `aura-pg project` processes under real faults:
kill -9 of the owner under a steady append load with poison events, two
daemons sharing four partitions while the owner is killed over and over,
a handler that hangs, and terminated sessions (ownership and batch).

The handlers (tests/helpers/processor_handlers.py) insert every event they
are given into a table whose primary key on event_id refuses a second
application outright, in insertion order (a bigserial) and with the
transaction that inserted it. Afterwards each table must hold exactly the
events of the processor's types in the log, but the poison ones, which
must be exactly the processor's pending dead letters; per stream in the
order of its versions; per partition in the log's commit order."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, LiteralString

import pytest
import yaml
from psycopg import sql

from aura_pg import EventStore, NewEvent
from tests.helpers.daemons import ROOT, Daemons, start_writer
from tests.helpers.projections import (
    FIXTURE_CATALOG,
    assert_exact_fold,
    caught_up,
    query,
    wait_for_sync,
)

HANDLERS = "tests.helpers.processor_handlers"
# `python -m aura_pg` from the repository: the daemons import the handlers
# from the tests' package.
PYTHON_M_AURA_PG = (sys.executable, "-m", "aura_pg")
HANDLER_TABLE = (
    "CREATE TABLE {} (seq bigserial NOT NULL UNIQUE, event_id uuid PRIMARY KEY,"
    " stream_id text NOT NULL, version bigint NOT NULL,"
    " tx xid8 NOT NULL DEFAULT pg_current_xact_id())"
)
# The ids of the events the steady processor and the SQL projection applied.
STEADY_APPLIED = "SELECT event_id FROM processed"
TALLY_APPLIED = (
    "SELECT e.event_id FROM tally_set.applied_events JOIN aura.events e USING (global_position)"
)
# Longer than any test here: steady writers append until stop_writers.
WRITER_SECONDS = 300.0
MakeDaemons = Callable[[Sequence[dict[str, Any]], Sequence[str]], Daemons]


def processor(
    name: str,
    handler: str,
    *,
    source_events: Sequence[str] | None,
    batch_size: int,
    partitions: int = 1,
    batch_timeout_seconds: float | None = None,
    max_retries: int = 2,
    retry_base_ms: int = 10,
    retry_max_ms: int = 50,
) -> dict[str, Any]:
    """A catalog entry of a Python processor whose handler is one of
    tests/helpers/processor_handlers.py (``source_events`` None: all)."""
    entry: dict[str, Any] = {
        "name": name,
        "kind": "python",
        "handler": f"{HANDLERS}:{handler}",
        "source_events": list(source_events) if source_events is not None else "all",
        "batch_size": batch_size,
        "partitions": partitions,
        "error_handling": {
            "max_retries": max_retries,
            "retry_base_ms": retry_base_ms,
            "retry_max_ms": retry_max_ms,
            "dead_letter_queue": True,
            # Poison events in a row must be dead-lettered, not pause the
            # processor behind an open circuit.
            "circuit_breaker": {"failure_threshold": 50, "recovery_timeout_seconds": 1},
        },
    }
    if batch_timeout_seconds is not None:
        entry["batch_timeout_seconds"] = batch_timeout_seconds
    return entry


@pytest.fixture
def make_daemons(dsn: str, tmp_path: Path) -> Iterator[MakeDaemons]:
    """``make_daemons(entries, rows)``: writes a catalog of ``entries`` into
    the test's directory and returns the Daemons that run it (``rows``: the
    checkpoint rows whose owners it watches). Every process is killed at the
    end; the daemons' logs stay in the test's directory."""
    made: list[Daemons] = []

    def make(entries: Sequence[dict[str, Any]], rows: Sequence[str]) -> Daemons:
        catalog = tmp_path / "catalog.yaml"
        catalog.write_text(yaml.safe_dump({"projections": list(entries)}, sort_keys=False))
        daemons = Daemons(
            dsn,
            tmp_path,
            catalog=catalog,
            projections=[entry["name"] for entry in entries],
            rows=rows,
            command=PYTHON_M_AURA_PG,
        )
        made.append(daemons)
        return daemons

    try:
        yield make
    finally:
        for daemons in made:
            daemons.close()


def create_handler_tables(dsn: str, *tables: str) -> None:
    for table in tables:
        query(dsn, sql.SQL(HANDLER_TABLE).format(sql.Identifier(table)))


def start_batch_writer(daemons: Daemons, count: int, seed: int) -> subprocess.Popen[str]:
    """tests/helpers/append_writer.py: batches of 1-5 WRITTEN events, some
    transactions held open a little, so that commits land out of position
    order."""
    writer = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.append_writer", daemons.dsn, str(count), str(seed)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    daemons.started.append(writer)
    return writer


def table_ids(dsn: str, table: str) -> set[uuid.UUID]:
    rows = query(dsn, sql.SQL("SELECT event_id FROM {}").format(sql.Identifier(table)))
    return {row[0] for row in rows}


def log_ids(dsn: str, types: Sequence[str] | None = None) -> set[uuid.UUID]:
    """The ids of the events of ``types`` (None: all) in the log."""
    rows = query(
        dsn,
        "SELECT event_id FROM aura.events WHERE %s::text[] IS NULL OR type = ANY(%s::text[])",
        (list(types) if types is not None else None,) * 2,
    )
    return {row[0] for row in rows}


def marked_ids(dsn: str, key: str) -> set[uuid.UUID]:
    """The ids of the events whose data has ``key`` (poison, hang)."""
    rows = query(dsn, "SELECT event_id FROM aura.events WHERE data ? %s", (key,))
    return {row[0] for row in rows}


def dead_letters(dsn: str, projection: str) -> list[tuple[uuid.UUID, str]]:
    """Every dead letter of a processor's row: (event id, status)."""
    return query(
        dsn,
        "SELECT event_id, status FROM aura.dead_letters WHERE projection = %s ORDER BY id",
        (projection,),
    )


def applied_after(dsn: str, applied: LiteralString, event_id: uuid.UUID) -> int:
    """How many events after ``event_id`` in commit order are among those
    ``applied`` (a query of event ids) selects."""
    rows = query(
        dsn,
        sql.SQL(
            "SELECT count(*) FROM ({}) AS a JOIN aura.events e USING (event_id)"
            " JOIN aura.events h ON h.event_id = %s"
            " WHERE (e.transaction_id, e.global_position) > (h.transaction_id, h.global_position)"
        ).format(sql.SQL(applied)),
        (event_id,),
    )
    return int(rows[0][0])


def owned_only_by(daemons: Daemons, owner: str) -> Callable[[], bool]:
    return lambda: daemons.owners() == {owner}


def both_running(daemons: Daemons) -> bool:
    """Whether two daemons run each watched row: the owner, and a stand-by
    polling for its ownership lock (each runner holds a session named
    after its row)."""
    rows = query(
        daemons.dsn,
        "SELECT count(*) FILTER (WHERE application_name = 'aura-pg projector ' || r.name)"
        "  FROM unnest(%s::text[]) AS r(name)"
        "  CROSS JOIN pg_stat_activity a WHERE a.datname = current_database()"
        " GROUP BY r.name",
        (list(daemons.rows),),
    )
    return len(rows) == len(daemons.rows) and all(count >= 2 for (count,) in rows)


def both_members(daemons: Daemons, processor: str) -> bool:
    """Whether two daemons run the partitioned ``processor``: each holds a
    membership session of it (a daemon at its share of the partitions
    holds no session for the others, so stand-by sessions do not show it)."""
    rows = query(
        daemons.dsn,
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name = %s",
        (f"aura-pg members {processor}",),
    )
    return rows[0][0] >= 2


def start_steady_writers(daemons: Daemons, rate: float, *seeds: int) -> list[subprocess.Popen[str]]:
    """Steady writers (tests/helpers/steady_writer.py) at ``rate`` events/s
    each, appending until ``stop_writers``."""
    return [start_writer(daemons.dsn, daemons, WRITER_SECONDS, rate, seed) for seed in seeds]


def under_load(writers: Sequence[subprocess.Popen[str]]) -> bool:
    """Whether all the writers still append."""
    return all(writer.poll() is None for writer in writers)


def stop_writers(writers: Sequence[subprocess.Popen[str]]) -> None:
    """Stops the steady writers; each must have appended without an error
    until then."""
    for writer in writers:
        if writer.poll() is None:
            writer.send_signal(signal.SIGTERM)
    for writer in writers:
        assert writer.wait(30) in (0, -signal.SIGTERM)


def hangs_over(dsn: str) -> dict[str, int] | None:
    """How often the sync hanging handler started a hang and woke from one
    (then wrote, or failed to), once it woke from every hang; else None."""
    counts = dict(query(dsn, "SELECT note, count(*)::int FROM hang_notes GROUP BY note"))
    notes = {note: counts.get(note, 0) for note in ("started", "woke")}
    return notes if notes["started"] == notes["woke"] else None


def wait_caught_up(dsn: str, rows: Sequence[str], timeout: float = 60) -> None:
    wait_for_sync(lambda: all(caught_up(dsn, row) for row in rows), timeout, f"catch-up of {rows}")


def assert_exactly_once(
    dsn: str, table: str, row: str, types: Sequence[str] | None, poison: set[uuid.UUID]
) -> None:
    """The handler's table holds every event of ``types`` in the log once,
    but the ``poison`` ones, which are exactly the row's dead letters, all
    pending."""
    applied = table_ids(dsn, table)
    expected = log_ids(dsn, types) - poison
    assert not applied - expected, f"{table}: applied events that it should not have"
    assert not expected - applied, f"{table}: {len(expected - applied)} events never applied"
    letters = dead_letters(dsn, row)
    assert sorted(letters) == sorted((event_id, "pending") for event_id in poison), (
        f"{row}: dead letters {letters}, poison {poison}"
    )


def test_kill_minus_nine_under_load_with_poison_applies_each_event_once(
    dsn: str, store: EventStore, make_daemons: MakeDaemons
) -> None:
    """Two processors (a thread-run handler and a coroutine), two daemons
    competing for them, the owner killed four times under two steady
    writers, each kill after a poison event and a burst of batches whose
    transactions commit out of position order."""
    types = ["A", "WRITTEN"]  # not the steady writers' B events
    rows = ["audit_sync", "audit_async"]
    tables = {"audit_sync": "processed", "audit_async": "processed_async"}
    create_handler_tables(dsn, *tables.values())
    policy: dict[str, Any] = {"max_retries": 2, "retry_base_ms": 50, "retry_max_ms": 200}
    daemons = make_daemons(
        [
            processor("audit_sync", "record", source_events=types, batch_size=20, **policy),
            processor("audit_async", "record_async", source_events=types, batch_size=20, **policy),
        ],
        rows,
    )
    steady = start_steady_writers(daemons, 80, 1, 2)
    bursts = []
    daemons.start("a")
    wait_for_sync(lambda: daemons.owners() == {"a"}, 90, "first ownership")
    daemons.start("b")
    takeovers: list[float] = []
    for round_, pause in enumerate((0.3, 0.6, 0.4, 0.8)):
        wait_for_sync(lambda: both_running(daemons), 60, "the stand-by running")
        bursts.append(start_batch_writer(daemons, 300, seed=10 + round_))
        owners = daemons.owners()
        assert len(owners) == 1, f"one daemon owns both processors, not {owners}"
        owner = owners.pop()
        assert owner in ("a", "b")
        other = "b" if owner == "a" else "a"
        # Each poison event is being isolated, retried or dead-lettered
        # when its owner dies.
        store.append(f"steady-1-{round_}", [NewEvent("A", {"poison": True, "round": round_})])
        time.sleep(pause)
        assert under_load(steady), "the writers stopped before the kills"
        killed_at = time.monotonic()
        daemons.kill(owner)
        wait_for_sync(owned_only_by(daemons, other), 30, f"takeover by {other}")
        takeovers.append(time.monotonic() - killed_at)
        daemons.start(owner)  # back as the stand-by
    stop_writers(steady)
    for burst in bursts:
        assert burst.wait(60) == 0
    wait_caught_up(dsn, rows)

    poison = marked_ids(dsn, "poison")
    assert len(poison) == 4
    assert query(
        dsn, "SELECT name, kind FROM aura.projection_checkpoints WHERE kind = 'python' ORDER BY 1"
    ) == [("audit_async", "python"), ("audit_sync", "python")]
    for row in rows:
        assert_exactly_once(dsn, tables[row], row, types, poison)
    print(f"takeover after kill -9: {', '.join(f'{t:.2f}s' for t in takeovers)}")
    assert max(takeovers) < 10


class OwnerSampler:
    """Records the live owner of each watched row (the daemon holding its
    ownership lock, None while nobody does) every 50 ms, in a thread."""

    def __init__(self, daemons: Daemons) -> None:
        self.daemons = daemons
        self.samples: list[dict[str, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            rows = query(
                self.daemons.dsn,
                "SELECT name, CASE WHEN owner_alive THEN owner END FROM aura.projection_status"
                " WHERE name = ANY(%s)",
                (list(self.daemons.rows),),
            )
            self.samples.append(dict(rows))

    def __enter__(self) -> OwnerSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def test_partitions_over_two_daemons_with_kills_apply_each_event_once_in_order(
    dsn: str, store: EventStore, make_daemons: MakeDaemons
) -> None:
    """Four partitions over daemons a and b, started together; four times
    the daemon owning the most partitions is killed (the other takes them
    over) and restarted, under two steady writers and a burst of batches
    before each kill, with a poison event before every other kill. Each
    event applied once but the poison ones, which are dead letters of their
    stream's partition; each stream's events in version order, each
    partition's in the log's commit order, each batch of one partition's
    streams."""
    partitions = 4
    rows = [f"parts/{i}" for i in range(partitions)]
    create_handler_tables(dsn, "processed")
    daemons = make_daemons(
        [processor("parts", "record", source_events=None, batch_size=10, partitions=partitions)],
        rows,
    )
    steady = start_steady_writers(daemons, 80, 3, 4)
    bursts = []
    daemons.start("a")
    daemons.start("b")
    killed: list[tuple[str, int]] = []
    with OwnerSampler(daemons) as sampler:
        wait_for_sync(lambda: daemons.owners() <= {"a", "b"}, 90, "every partition owned")
        for round_, pause in enumerate((0.6, 0.9, 0.5, 0.8)):
            wait_for_sync(lambda: both_members(daemons, "parts"), 60, "both daemons running")
            bursts.append(start_batch_writer(daemons, 300, seed=20 + round_))
            if round_ % 2:
                stream = f"steady-{round_}-{round_}"
                store.append(stream, [NewEvent("A", {"poison": True, "round": round_})])
            time.sleep(pause)
            assert under_load(steady), "the writers stopped before the kills"
            owners = list(daemons.owner_of().values())
            victim = max(("a", "b"), key=owners.count)
            other = "b" if victim == "a" else "a"
            killed.append((victim, owners.count(victim)))
            daemons.kill(victim)
            wait_for_sync(owned_only_by(daemons, other), 30, f"{other} owns every partition")
            daemons.start(victim)
        stop_writers(steady)
        for burst in bursts:
            assert burst.wait(60) == 0
        wait_caught_up(dsn, rows)
    print(f"killed (daemon, partitions it owned): {killed}")
    split = [sample for sample in sampler.samples if {"a", "b"} <= set(sample.values())]
    print(f"owner samples: {len(sampler.samples)}, with a and b owning partitions: {len(split)}")

    # The rows, one per partition, all caught up.
    assert query(
        dsn,
        "SELECT name, kind, partition_index, partition_count FROM aura.projection_checkpoints"
        " WHERE kind = 'python' ORDER BY partition_index",
    ) == [(row, "python", i, partitions) for i, row in enumerate(rows)]
    behind = query(
        dsn,
        "SELECT name, events_behind FROM aura.projection_status"
        " WHERE name LIKE 'parts/%%' ORDER BY 1",
    )
    assert behind == [(row, 0) for row in rows]
    # Every partition had streams (the test means something for each).
    assert query(
        dsn,
        "SELECT count(DISTINCT aura.stream_partition(stream_id, %s)) FROM aura.events",
        (partitions,),
    ) == [(partitions,)]

    # Each event once but the poison ones, each a dead letter of its
    # stream's partition.
    poison = marked_ids(dsn, "poison")
    assert len(poison) == 2
    applied = table_ids(dsn, "processed")
    expected = log_ids(dsn) - poison
    assert not applied - expected, "applied events that it should not have"
    assert not expected - applied, f"{len(expected - applied)} events never applied"
    for i, row in enumerate(rows):
        in_partition = query(
            dsn,
            "SELECT event_id, 'pending' FROM aura.events"
            " WHERE data ? 'poison' AND aura.stream_partition(stream_id, %s) = %s",
            (partitions, i),
        )
        assert sorted(dead_letters(dsn, row)) == sorted(in_partition), row
    # Per stream, the insertion order is the order of versions.
    inversions = query(
        dsn,
        "SELECT stream_id, version, previous FROM ("
        "  SELECT stream_id, version, lag(version) OVER (PARTITION BY stream_id ORDER BY seq)"
        "         AS previous FROM processed) AS p"
        " WHERE previous >= version",
    )
    assert inversions == []
    # Per partition, the insertion order is the log's commit order.
    inversions = query(
        dsn,
        "SELECT part, transaction_id, global_position FROM ("
        "  SELECT aura.stream_partition(p.stream_id, %s) AS part, e.transaction_id,"
        "         e.global_position,"
        "         lag(e.transaction_id) OVER w AS previous_tx,"
        "         lag(e.global_position) OVER w AS previous_position"
        "    FROM processed p JOIN aura.events e USING (event_id)"
        "  WINDOW w AS (PARTITION BY aura.stream_partition(p.stream_id, %s) ORDER BY p.seq)"
        ") AS o WHERE (previous_tx, previous_position) >= (transaction_id, global_position)",
        (partitions, partitions),
    )
    assert inversions == []
    # A batch (one transaction) holds the events of one partition's streams.
    mixed = query(
        dsn,
        "SELECT tx::text FROM processed GROUP BY tx"
        " HAVING count(DISTINCT aura.stream_partition(stream_id, %s)) > 1",
        (partitions,),
    )
    assert mixed == []

    # Both daemons owned partitions during the run (holding their locks).
    seen = {owner for sample in sampler.samples for owner in sample.values()}
    assert {"a", "b"} <= seen, seen


def test_a_hanging_handler_is_bounded_and_the_rest_goes_on(
    dsn: str, tmp_path: Path, store: EventStore, make_daemons: MakeDaemons
) -> None:
    """Two processors whose handler hangs (a blocked thread, a sleeping
    coroutine) on one event, far longer than their batch timeout, beside a
    processor and a SQL projection in the same daemon. The hang counts as a
    failure: each attempt ends after about the timeout, not the hang, and
    the event is dead-lettered after its retries and never applied, even
    when the abandoned thread wakes up and writes through its connection;
    the other processor and the projection go on meanwhile."""
    hang_seconds = 8.0
    timeout = 0.5
    types = ["A", "B", "H"]
    create_handler_tables(dsn, "processed", "hang_processed", "hang_async_processed")
    query(dsn, "CREATE TABLE hang_notes (event_id uuid NOT NULL, note text NOT NULL)")
    shutil.copy(FIXTURE_CATALOG.parent / "tally.sql", tmp_path / "tally.sql")
    tally = {
        "name": "tally_set",
        "sql": "tally.sql",
        "source_events": "all",
        "handler": "apply_batch",
        "handler_kind": "set_based",
        "batch_size": 50,
    }
    hanging = {"hanging": "hang_processed", "hanging_async": "hang_async_processed"}
    daemons = make_daemons(
        [
            processor("steady", "record", source_events=["A", "B"], batch_size=20),
            # Small batches: every attempt of the isolation that halves the
            # failing batch down to the hanging event takes a timeout.
            processor(
                "hanging", "hang", source_events=types, batch_size=4,
                batch_timeout_seconds=timeout,
            ),
            processor(
                "hanging_async", "hang_async", source_events=types, batch_size=4,
                batch_timeout_seconds=timeout,
            ),
            tally,
        ],
        ["steady", *hanging, "tally_set"],
    )  # fmt: skip
    writers = start_steady_writers(daemons, 100, 5)
    daemons.start("solo")
    wait_for_sync(lambda: daemons.owners() == {"solo"}, 90, "ownership")
    wait_for_sync(lambda: caught_up(dsn, "hanging"), 30, "the hanging processor caught up")

    hung = store.append("steady-5-0", [NewEvent("H", {"hang": hang_seconds})]).events[0]
    appended_at = time.monotonic()
    # While both hang, the events appended after the hanging one reach the
    # steady processor and the projection.
    wait_for_sync(
        lambda: (
            applied_after(dsn, STEADY_APPLIED, hung.event_id) >= 20
            and applied_after(dsn, TALLY_APPLIED, hung.event_id) >= 20
        ),
        10,
        "the steady processor and the projection past the hanging event",
    )
    stuck = query(
        dsn,
        "SELECT c.name FROM aura.projection_checkpoints c, aura.events e"
        " WHERE c.name = ANY(%s) AND e.event_id = %s"
        "   AND (c.transaction_id, c.global_position) < (e.transaction_id, e.global_position)"
        " ORDER BY 1",
        (list(hanging), hung.event_id),
    )
    assert stuck == [(name,) for name in sorted(hanging)], "not held up by the hanging event"
    assert all(dead_letters(dsn, name) == [] for name in hanging)

    # Bounded: each attempt ends after about the timeout (plus what the
    # daemon grants the batch to report), not after the hang.
    wait_for_sync(
        lambda: all(dead_letters(dsn, name) for name in hanging),
        60,
        "the hanging event dead-lettered",
    )
    took = time.monotonic() - appended_at
    for name in hanging:
        attempts, error, retries_took = query(
            dsn,
            "SELECT attempts, error, extract(epoch FROM last_failed_at - first_failed_at)::float8"
            "  FROM aura.dead_letters WHERE projection = %s",
            (name,),
        )[0]
        print(
            f"{name}: dead-lettered {took:.1f}s after the append, {attempts} attempts, "
            f"the retries {retries_took:.1f}s: {error}"
        )
        assert attempts == 3  # max_retries 2: the first try and two retries
        # Between the first failure and the last: two attempts of at least
        # hang_seconds each, had the timeout not ended them.
        assert retries_took < hang_seconds, f"{name}: two retries took {retries_took:.1f}s"

    # The abandoned handler threads wake up (hang_seconds after each
    # attempt) and write through the connection they were given, while the
    # load goes on: none of it may land.
    notes = wait_for_sync(
        lambda: hangs_over(dsn),
        hang_seconds + 30,
        "the abandoned handler threads awake",
    )
    assert notes["started"] >= 3, notes
    assert under_load(writers), "the writer stopped before the threads woke"
    stop_writers(writers)
    rows = ["steady", *hanging, "tally_set"]
    wait_caught_up(dsn, rows)
    hang_events = marked_ids(dsn, "hang")
    assert hang_events == {hung.event_id}
    assert_exactly_once(dsn, "processed", "steady", ["A", "B"], set())
    for name, table in hanging.items():
        assert_exactly_once(dsn, table, name, types, hang_events)
    assert_exact_fold(dsn, "tally_set")
    assert daemons.processes["solo"].poll() is None


def test_terminated_sessions_under_load_apply_each_event_once(
    dsn: str, tmp_path: Path, make_daemons: MakeDaemons
) -> None:
    """Every 0.3 s under load, with a stand-by daemon waiting, the sessions
    holding the processors' ownership locks are terminated, or by turns the
    sessions their batches run on. A daemon runs batches on another
    connection than its ownership lock's and may go on with one or more
    while the stand-by takes over: the compare-and-set on the checkpoint,
    and the rollback of the loser's writes with it, must keep each event
    applied once."""
    types = ["A", "B", "WRITTEN"]
    rows = ["audit_sync", "audit_async"]
    tables = {"audit_sync": "processed", "audit_async": "processed_async"}
    create_handler_tables(dsn, *tables.values())
    daemons = make_daemons(
        [
            processor("audit_sync", "record", source_events=types, batch_size=20),
            processor("audit_async", "record_async", source_events=types, batch_size=20),
        ],
        rows,
    )
    steady = start_steady_writers(daemons, 150, 1, 2)
    burst = start_batch_writer(daemons, 1000, seed=9)
    daemons.start("a")
    wait_for_sync(lambda: daemons.owners() == {"a"}, 90, "first ownership")
    daemons.start("b")
    wait_for_sync(lambda: both_running(daemons), 60, "the stand-by running")
    terminated = 0
    for n in range(16):
        time.sleep(0.3)
        assert under_load(steady)
        # By turns the sessions holding the ownership locks, and those the
        # batches run on.
        terminated += len(
            query(
                dsn,
                "SELECT pg_terminate_backend(a.pid) FROM pg_stat_activity a"
                " WHERE a.datname = current_database() AND CASE WHEN %s"
                "  THEN a.application_name LIKE 'aura-pg processor audit%%'"
                "  ELSE a.application_name LIKE 'aura-pg projector audit%%' AND EXISTS ("
                "       SELECT 1 FROM pg_locks l"
                "        WHERE l.pid = a.pid AND l.locktype = 'advisory' AND l.granted) END",
                (n % 2 == 1,),
            )
        )
    stop_writers(steady)
    assert burst.wait(60) == 0
    wait_caught_up(dsn, rows)
    assert terminated >= 10
    for row in rows:
        assert_exactly_once(dsn, tables[row], row, types, set())
    # Both daemons survived; how often a handler ran into the other
    # daemon's insert of the same event (two owners at once, briefly).
    assert all(process.poll() is None for process in daemons.processes.values())
    collisions = sum(
        log.read_text().count("UniqueViolation") for log in tmp_path.glob("daemon-*.log")
    )
    print(f"terminated {terminated} sessions; {collisions} batches collided")
