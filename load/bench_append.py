"""Append throughput: EventStore.append against its references, in one run.

For single-event and 100-event batches at 1, 4 and 16 concurrent writers
(separate processes, each with its own connection), it measures events/s of

  store   EventStore.append (the aura.append_events function: validation,
          stream version compare-and-set, idempotency lookup), as deployed:
          no notification (aura.notify is off unless a session turns it on)
  watched the same, while --watchers processes run the projector's log
          watcher (the read horizon every 10 ms, as each projector daemon
          does): what prompt wake-ups cost the appends now
  notify  the same EventStore.append on connections with aura.notify = on
          (libpq options '-c aura.notify=on'): pg_notify('aura_events') in
          every appending transaction, the wake-up of --wake listen daemons
  plain   one plain INSERT of the identical rows into a copy of aura.events
          (same columns, defaults, indexes and constraints; no function, no NOTIFY)
  bare    the same INSERT into a table with no indexes, constraints or
          triggers: the physical limit of this machine
  eventsourcing
          the eventsourcing library's PostgresApplicationRecorder (Python
          package eventsourcing[postgres]) inserting the same events (the
          same JSON payload as state, one originator per stream, the same
          versions) into its own table: the library's gap-free
          notification ids (not measured unless asked: --targets)

and prints the ratios store/plain and store/bare (and notify/store, the
cost of NOTIFY, watched/store, the cost of the log watcher, and
store/eventsourcing, when those are measured), plus the append latency
percentiles. Targets other than store, plain and bare are measured only
when asked (--targets). By default it starts a throw-away local cluster
with production durability settings (fsync on, synchronous_commit on).

    python load/bench_append.py                    # full run: 3 rounds of 5 s per cell
    python load/bench_append.py --duration 1 --writers 1 4 --batch 1
    python load/bench_append.py --commit async      # CPU cost, without flush noise
    python load/bench_append.py --targets store notify watched   # the cost of wake-ups
    python load/bench_append.py --targets store notify plain bare
    python load/bench_append.py --targets store plain eventsourcing
    python load/bench_append.py --dsn "host=... dbname=..." --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import statistics
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from aura_pg import EventStore, NewEvent
from aura_pg.devtools.localdb import benchmark_settings, temporary_cluster

TARGETS = ("store", "watched", "notify", "plain", "bare", "eventsourcing")
DEFAULT_TARGETS = ("store", "plain", "bare")
STORE_TARGETS = ("store", "watched", "notify")
# Measured against the store, round by round: (target, the ratio's key).
STORE_VARIANTS = (("notify", "notify_vs_store"), ("watched", "watched_vs_store"))
STREAMS_PER_WRITER = 50

REFERENCE_TABLES = """
DROP SCHEMA IF EXISTS bench CASCADE;
CREATE SCHEMA bench;
CREATE TABLE bench.events_plain (LIKE aura.events INCLUDING ALL);
CREATE TABLE bench.events_bare (LIKE aura.events INCLUDING DEFAULTS INCLUDING IDENTITY);
"""

# The rows aura.append_events would write, from the same JSON batch: the
# benchmark's events bring no key of their own, so no idempotency hash.
PLAIN_INSERT = """
INSERT INTO bench.{table}
    (event_id, stream_id, version, type, data, metadata, idempotency_key, idempotency_hash)
SELECT (e->>'event_id')::uuid, %(stream_id)s, %(base_version)s + ord, e->>'type', e->'data',
       e->'metadata', e->>'event_id', NULL
FROM jsonb_array_elements(%(events)s::jsonb) WITH ORDINALITY AS t(e, ord)
"""


EVENTSOURCING_TABLE = "bench_eventsourcing_events"


def eventsourcing_recorder(dsn: str) -> tuple[Any, Any]:
    """The eventsourcing library's datastore and application recorder on
    the benchmark database (imported here: only that target needs it)."""
    from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore

    params = conninfo_to_dict(dsn)
    datastore = PostgresDatastore(
        dbname=str(params.get("dbname", "postgres")),
        host=str(params.get("host", "localhost")),
        port=str(params.get("port", "5432")),
        user=str(params.get("user", "postgres")),
        password=str(params.get("password", "")),
        pool_size=1,
    )
    return datastore, PostgresApplicationRecorder(datastore, events_table_name=EVENTSOURCING_TABLE)


def stored_events(events: list[NewEvent], originator: uuid.UUID, base_version: int) -> list[Any]:
    """The same events as the eventsourcing library stores them: the JSON of
    data and metadata as state, the next versions of the originator."""
    from eventsourcing.persistence import StoredEvent

    return [
        StoredEvent(
            originator_id=originator,
            originator_version=base_version + i,
            topic=e.type,
            state=json.dumps({"data": e.data, "metadata": e.metadata}).encode(),
        )
        for i, e in enumerate(events, start=1)
    ]


def with_notify(dsn: str) -> str:
    """The connection string with ``-c aura.notify=on`` added to its options."""
    options = conninfo_to_dict(dsn).get("options")
    extra = "-c aura.notify=on"
    return make_conninfo(dsn, options=f"{options} {extra}" if options else extra)


def watcher_main(dsn: str, ready: Any, stop: Any) -> None:
    """One projector daemon's log watcher, and nothing else, until ``stop``."""
    import asyncio

    from aura_pg.projection.settings import ProjectorSettings
    from aura_pg.projection.wakeups import LogWatcher

    async def watch() -> None:
        stopping = asyncio.Event()
        watcher = LogWatcher(dsn, ProjectorSettings(), lambda _horizon: None)
        task = asyncio.create_task(watcher.run(stopping))
        while not watcher.connected:
            await asyncio.sleep(0.01)
        ready.release()
        await asyncio.to_thread(stop.wait)
        stopping.set()
        await task

    asyncio.run(watch())


def make_events(batch: int, writer: int, n: int) -> list[NewEvent]:
    return [
        NewEvent(
            "AGENT_VOTED",
            {"writer": writer, "n": n, "i": i, "vote": "approve", "reason": "x" * 60},
            metadata={"correlation_id": f"c-{writer}-{n}", "actor": f"agent-{writer}"},
        )
        for i in range(batch)
    ]


def batch_json(events: list[NewEvent]) -> str:
    return json.dumps(
        [
            {
                "event_id": str(e.event_id),
                "type": e.type,
                "data": e.data,
                "metadata": e.metadata,
            }
            for e in events
        ]
    )


def writer_main(
    dsn: str,
    target: str,
    batch: int,
    writer: int,
    duration: float,
    barrier: Barrier,
    results: Any,
) -> None:
    """One writer process: append for `duration` seconds after the barrier."""
    run = uuid.uuid4().hex[:8]
    versions = [0] * STREAMS_PER_WRITER
    latencies: list[float] = []
    count = 0
    originators = [uuid.uuid4() for _ in range(STREAMS_PER_WRITER)]
    if target in STORE_TARGETS:
        store = EventStore.connect(
            with_notify(dsn) if target == "notify" else dsn, min_size=1, max_size=1
        )
    elif target == "eventsourcing":
        datastore, recorder = eventsourcing_recorder(dsn)
    else:
        conn = psycopg.connect(dsn, autocommit=True)
        insert = PLAIN_INSERT.format(table="events_plain" if target == "plain" else "events_bare")
    barrier.wait()
    deadline = time.perf_counter() + duration
    n = 0
    while True:
        began = time.perf_counter()
        if began >= deadline:
            break
        slot = n % STREAMS_PER_WRITER
        stream_id = f"{run}-w{writer}-s{slot}"
        events = make_events(batch, writer, n)
        if target in STORE_TARGETS:
            store.append(stream_id, events)
        elif target == "eventsourcing":
            recorder.insert_events(stored_events(events, originators[slot], versions[slot]))
            versions[slot] += batch
        else:
            conn.execute(
                insert,
                {
                    "stream_id": stream_id,
                    "base_version": versions[slot],
                    "events": batch_json(events),
                },
            )
            versions[slot] += batch
        latencies.append(time.perf_counter() - began)
        count += batch
        n += 1
    if target in STORE_TARGETS:
        store.close()
    elif target == "eventsourcing":
        datastore.close()
    else:
        conn.close()
    results.put((count, latencies))


@dataclass
class Cell:
    target: str
    batch: int
    writers: int
    events_per_second: float
    appends: int
    p50_ms: float
    p95_ms: float
    p99_ms: float


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, int(fraction * len(sorted_values)))
    return sorted_values[index] * 1000


def measure(
    dsn: str, target: str, batch: int, writers: int, duration: float, watchers: int = 1
) -> Cell:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(writers)
    results = ctx.Queue()
    processes = [
        ctx.Process(target=writer_main, args=(dsn, target, batch, w, duration, barrier, results))
        for w in range(writers)
    ]
    ready, stop = ctx.Semaphore(0), ctx.Event()
    watching = [
        ctx.Process(target=watcher_main, args=(dsn, ready, stop))
        for _ in range(watchers if target == "watched" else 0)
    ]
    try:
        for process in watching:
            process.start()
        for _ in watching:
            if not ready.acquire(timeout=60):
                raise RuntimeError("a log watcher did not connect")
        for process in processes:
            process.start()
        outcomes = [results.get(timeout=duration + 120) for _ in processes]
        for process in processes:
            process.join()
            if process.exitcode != 0:
                raise RuntimeError(f"writer process failed ({process.exitcode})")
    finally:
        stop.set()
        for process in watching:
            process.join(30)
    latencies = sorted(lat for _, lats in outcomes for lat in lats)
    total = sum(count for count, _ in outcomes)
    return Cell(
        target=target,
        batch=batch,
        writers=writers,
        events_per_second=total / duration,
        appends=len(latencies),
        p50_ms=percentile(latencies, 0.50),
        p95_ms=percentile(latencies, 0.95),
        p99_ms=percentile(latencies, 0.99),
    )


def prepare(dsn: str) -> None:
    from aura_pg import migrate  # here: alembic is slow to import in every writer process

    migrate.upgrade(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(REFERENCE_TABLES)
        conn.execute(f"DROP TABLE IF EXISTS {EVENTSOURCING_TABLE}")


def prepare_eventsourcing(dsn: str) -> None:
    datastore, recorder = eventsourcing_recorder(dsn)
    try:
        recorder.create_table()
    finally:
        datastore.close()


def settle(dsn: str) -> None:
    """Start each measurement from the same state: no dirty buffers."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CHECKPOINT")


def median_cell(samples: list[Cell]) -> Cell:
    """The round with the median throughput (its latencies come with it)."""
    ordered = sorted(samples, key=lambda c: c.events_per_second)
    return ordered[len(ordered) // 2]


def run(
    dsn: str,
    batches: list[int],
    writer_counts: list[int],
    duration: float,
    rounds: int,
    targets: tuple[str, ...] = DEFAULT_TARGETS,
    watchers: int = 1,
) -> tuple[list[Cell], dict[tuple[str, int, int], list[Cell]]]:
    """Measure every cell `rounds` times, targets interleaved (in a rotating
    order) so that drift in the machine hits them all alike; keep medians.
    Returns the median cells and every round's cell, by (target, batch, writers)."""
    prepare(dsn)
    if "eventsourcing" in targets:
        prepare_eventsourcing(dsn)
    cells: list[Cell] = []
    every_round: dict[tuple[str, int, int], list[Cell]] = {}
    header = (
        f"{'batch':>5} {'writers':>7} {'target':>7} {'events/s':>10} {'appends':>8} "
        f"{'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7}   rounds events/s"
    )
    print(header)
    for batch in batches:
        for writers in writer_counts:
            samples: dict[str, list[Cell]] = {t: [] for t in targets}
            for round_ in range(rounds):
                shift = round_ % len(targets)
                order = targets[shift:] + targets[:shift]
                for target in order:
                    measure(dsn, target, batch, writers, min(0.5, duration), watchers)  # warm-up
                    settle(dsn)
                    samples[target].append(measure(dsn, target, batch, writers, duration, watchers))
            for target in targets:
                every_round[(target, batch, writers)] = samples[target]
                cell = median_cell(samples[target])
                cells.append(cell)
                spread = " ".join(f"{c.events_per_second:.0f}" for c in samples[target])
                print(
                    f"{batch:>5} {writers:>7} {target:>7} {cell.events_per_second:>10.0f} "
                    f"{cell.appends:>8} {cell.p50_ms:>7.2f} {cell.p95_ms:>7.2f} "
                    f"{cell.p99_ms:>7.2f}   {spread}",
                    flush=True,
                )
    return cells, every_round


def ratios(
    cells: list[Cell], every_round: dict[tuple[str, int, int], list[Cell]] | None = None
) -> list[dict[str, Any]]:
    """Per (batch, writers): the store's events/s and its ratios to the
    references that were measured. notify/store is the cost of NOTIFY and
    watched/store the cost of the log watchers (below 1: slower); with them
    come the ratios of each round's pair (measured back to back), which
    drift less."""
    by_key = {(c.target, c.batch, c.writers): c for c in cells}
    rows = []
    for c in cells:
        if c.target != "store":
            continue
        row: dict[str, Any] = {
            "batch": c.batch,
            "writers": c.writers,
            "store": c.events_per_second,
        }
        plain = by_key.get(("plain", c.batch, c.writers))
        bare = by_key.get(("bare", c.batch, c.writers))
        library = by_key.get(("eventsourcing", c.batch, c.writers))
        if library is not None:
            row["eventsourcing"] = library.events_per_second
            row["store_vs_eventsourcing"] = c.events_per_second / library.events_per_second
        if plain is not None:
            row["store_vs_plain"] = c.events_per_second / plain.events_per_second
        if bare is not None:
            row["store_vs_bare"] = c.events_per_second / bare.events_per_second
        if plain is not None and bare is not None:
            row["plain_vs_bare"] = plain.events_per_second / bare.events_per_second
        for variant, key in STORE_VARIANTS:
            other = by_key.get((variant, c.batch, c.writers))
            if other is None:
                continue
            row[variant] = other.events_per_second
            row[key] = other.events_per_second / c.events_per_second
            if every_round is not None:
                pairs = zip(
                    every_round[(variant, c.batch, c.writers)],
                    every_round[("store", c.batch, c.writers)],
                    strict=True,
                )
                row[f"{key}_rounds"] = [v.events_per_second / s.events_per_second for v, s in pairs]
        rows.append(row)
    return rows


def print_ratios(summary: list[dict[str, Any]]) -> None:
    columns: list[tuple[str, str, str]] = [
        ("store_vs_plain", "store/plain", ".2f"),
        ("store_vs_bare", "store/bare", ".2f"),
        ("plain_vs_bare", "plain/bare", ".2f"),
        ("notify", "notify ev/s", ".0f"),
        ("notify_vs_store", "notify/store", ".2f"),
        ("watched", "watched ev/s", ".0f"),
        ("watched_vs_store", "watched/store", ".2f"),
        ("eventsourcing", "eventsourcing ev/s", ".0f"),
        ("store_vs_eventsourcing", "store/eventsourcing", ".2f"),
    ]
    shown = [col for col in columns if summary and col[0] in summary[0]]
    round_keys = [key for _, key in STORE_VARIANTS if summary and f"{key}_rounds" in summary[0]]
    print(
        f"{'batch':>5} {'writers':>7} {'store ev/s':>10} "
        + " ".join(f"{title:>{len(title)}}" for _, title, _ in shown)
        + "".join(f"   rounds {key.replace('_vs_', '/')}" for key in round_keys)
    )
    for row in summary:
        print(
            f"{row['batch']:>5} {row['writers']:>7} {row['store']:>10.0f} "
            + " ".join(f"{row[key]:>{len(title)}{fmt}}" for key, title, fmt in shown)
            + "".join(
                "   " + " ".join(f"{r:.2f}" for r in row[f"{key}_rounds"]) for key in round_keys
            )
        )
    if summary and "store_vs_plain" in summary[0]:
        worst = min(row["store_vs_plain"] for row in summary)
        print(f"\nworst store/plain ratio: {worst:.2f} (target >= 0.80)")
    for variant, key in STORE_VARIANTS:
        if summary and key in summary[0]:
            values = [row[key] for row in summary]
            print(
                f"{variant}/store from {min(values):.2f} to {max(values):.2f} "
                f"(events/s {'with NOTIFY' if variant == 'notify' else 'with log watchers'} "
                "over events/s of the store as deployed)"
            )
    if summary and "store_vs_eventsourcing" in summary[0]:
        # The targets: single events at 16 writers 3x, 100-event batches 1.5x.
        for row in summary:
            goal = 3.0 if (row["batch"], row["writers"]) == (1, 16) else None
            goal = 1.5 if row["batch"] == 100 else goal
            if goal is not None:
                ratio = row["store_vs_eventsourcing"]
                verdict = "met" if ratio >= goal else "missed"
                print(
                    f"store/eventsourcing, batch {row['batch']}, {row['writers']} writers: "
                    f"{ratio:.2f} (target >= {goal:.1f}: {verdict})"
                )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--dsn", help="benchmark this database instead of a local throw-away cluster"
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 100])
    parser.add_argument("--writers", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=3, help="repeats per cell (median kept)")
    parser.add_argument(
        "--commit",
        choices=["durable", "async"],
        default="durable",
        help="local cluster: durable commits (fsync, synchronous_commit on: the default), or "
        "synchronous_commit=off, which takes the disk's flush time (and its noise) out and "
        "compares the CPU cost of the three paths",
    )
    parser.add_argument(
        "--targets",
        nargs="+",
        choices=TARGETS,
        default=list(DEFAULT_TARGETS),
        help="what to measure (default: store plain bare); add notify (the store with "
        "aura.notify = on) for the cost of NOTIFY, watched (the store while log watchers "
        "run) for theirs, and eventsourcing for the eventsourcing library's recorder",
    )
    parser.add_argument(
        "--watchers",
        type=int,
        default=1,
        help="log watchers running during the watched target: one per projector daemon (default 1)",
    )
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args(argv)
    if "store" not in args.targets:
        parser.error("--targets must include store (every ratio is the store's)")
    targets = tuple(dict.fromkeys(args.targets))

    with contextlib.ExitStack() as stack:
        dsn = args.dsn
        if dsn is None:
            dsn = stack.enter_context(temporary_cluster(benchmark_settings(args.commit))).dsn()
        with psycopg.connect(dsn) as conn:
            fsync = conn.execute("SHOW fsync").fetchone()
            sync_commit = conn.execute("SHOW synchronous_commit").fetchone()
        fsync_value = fsync[0] if fsync else "?"
        sync_value = sync_commit[0] if sync_commit else "?"
        print(f"server: fsync={fsync_value} synchronous_commit={sync_value}")
        cells, every_round = run(
            dsn, args.batch, args.writers, args.duration, args.rounds, targets, args.watchers
        )

    print()
    summary = ratios(cells, every_round)
    print_ratios(summary)
    if args.json:
        figures: dict[str, Any] = {"cells": [asdict(c) for c in cells], "ratios": summary}
        if "plain" in targets:
            figures["median_store_vs_plain"] = statistics.median(
                r["store_vs_plain"] for r in summary
            )
        for variant, key in STORE_VARIANTS:
            if variant in targets:
                figures[f"median_{key}"] = statistics.median(r[key] for r in summary)
        if "eventsourcing" in targets:
            figures["median_store_vs_eventsourcing"] = statistics.median(
                r["store_vs_eventsourcing"] for r in summary
            )
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
