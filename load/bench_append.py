"""Append throughput: EventStore.append against two references, in one run.

For single-event and 100-event batches at 1, 4 and 16 concurrent writers
(separate processes, each with its own connection), it measures events/s of

  store  EventStore.append (the aura.append_events function: validation,
         stream version compare-and-set, idempotency lookup)
  plain  one plain INSERT of the identical rows into a copy of aura.events
         (same columns, defaults, indexes and constraints; no function, no NOTIFY)
  bare   the same INSERT into a table with no indexes, constraints or
         triggers: the physical limit of this machine

and prints the ratios store/plain and store/bare, plus the store's append
latency percentiles. By default it starts a throw-away local cluster with
production durability settings (fsync on, synchronous_commit on).

    python load/bench_append.py                    # full run: 3 rounds of 5 s per cell
    python load/bench_append.py --duration 1 --writers 1 4 --batch 1
    python load/bench_append.py --commit async      # CPU cost, without flush noise
    python load/bench_append.py --dsn "host=... dbname=..." --json out.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import psycopg

from aura_pg import EventStore, NewEvent, migrate
from aura_pg.localdb import LocalCluster, free_port

TARGETS = ("store", "plain", "bare")
STREAMS_PER_WRITER = 50

REFERENCE_TABLES = """
DROP SCHEMA IF EXISTS bench CASCADE;
CREATE SCHEMA bench;
CREATE TABLE bench.events_plain (LIKE aura.events INCLUDING ALL);
CREATE TABLE bench.events_bare (LIKE aura.events INCLUDING DEFAULTS INCLUDING IDENTITY);
"""

# The rows aura.append_events would write, from the same JSON batch.
PLAIN_INSERT = """
INSERT INTO bench.{table}
    (event_id, stream_id, version, type, data, metadata, idempotency_key, idempotency_hash)
SELECT (e->>'event_id')::uuid, %(stream_id)s, %(base_version)s + ord, e->>'type', e->'data',
       e->'metadata', e->>'event_id',
       sha256(convert_to(%(stream_id)s || ':' || (e->>'event_id'), 'UTF8'))
FROM jsonb_array_elements(%(events)s::jsonb) WITH ORDINALITY AS t(e, ord)
"""


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
    if target == "store":
        store = EventStore.connect(dsn, min_size=1, max_size=1)
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
        if target == "store":
            store.append(stream_id, events)
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
    if target == "store":
        store.close()
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


def measure(dsn: str, target: str, batch: int, writers: int, duration: float) -> Cell:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(writers)
    results = ctx.Queue()
    processes = [
        ctx.Process(target=writer_main, args=(dsn, target, batch, w, duration, barrier, results))
        for w in range(writers)
    ]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=duration + 120) for _ in processes]
    for process in processes:
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"writer process failed ({process.exitcode})")
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
    migrate.upgrade(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(REFERENCE_TABLES)


def settle(dsn: str) -> None:
    """Start each measurement from the same state: no dirty buffers."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CHECKPOINT")


def median_cell(samples: list[Cell]) -> Cell:
    """The round with the median throughput (its latencies come with it)."""
    ordered = sorted(samples, key=lambda c: c.events_per_second)
    return ordered[len(ordered) // 2]


def run(
    dsn: str, batches: list[int], writer_counts: list[int], duration: float, rounds: int
) -> list[Cell]:
    """Measure every cell `rounds` times, targets interleaved (in a rotating
    order) so that drift in the machine hits all three alike; keep medians."""
    prepare(dsn)
    cells: list[Cell] = []
    header = (
        f"{'batch':>5} {'writers':>7} {'target':>6} {'events/s':>10} {'appends':>8} "
        f"{'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7}   rounds events/s"
    )
    print(header)
    for batch in batches:
        for writers in writer_counts:
            samples: dict[str, list[Cell]] = {t: [] for t in TARGETS}
            for round_ in range(rounds):
                order = TARGETS[round_ % 3 :] + TARGETS[: round_ % 3]
                for target in order:
                    measure(dsn, target, batch, writers, min(0.5, duration))  # warm-up
                    settle(dsn)
                    samples[target].append(measure(dsn, target, batch, writers, duration))
            for target in TARGETS:
                cell = median_cell(samples[target])
                cells.append(cell)
                spread = " ".join(f"{c.events_per_second:.0f}" for c in samples[target])
                print(
                    f"{batch:>5} {writers:>7} {target:>6} {cell.events_per_second:>10.0f} "
                    f"{cell.appends:>8} {cell.p50_ms:>7.2f} {cell.p95_ms:>7.2f} "
                    f"{cell.p99_ms:>7.2f}   {spread}",
                    flush=True,
                )
    return cells


def ratios(cells: list[Cell]) -> list[dict[str, Any]]:
    by_key = {(c.target, c.batch, c.writers): c for c in cells}
    rows = []
    for c in cells:
        if c.target != "store":
            continue
        plain = by_key[("plain", c.batch, c.writers)].events_per_second
        bare = by_key[("bare", c.batch, c.writers)].events_per_second
        rows.append(
            {
                "batch": c.batch,
                "writers": c.writers,
                "store": c.events_per_second,
                "store_vs_plain": c.events_per_second / plain,
                "store_vs_bare": c.events_per_second / bare,
                "plain_vs_bare": plain / bare,
            }
        )
    return rows


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
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args(argv)

    cluster = None
    dsn = args.dsn
    if dsn is None:
        workdir = Path(tempfile.mkdtemp(prefix="aura-pg-bench-"))
        workdir.chmod(0o755)
        cluster = LocalCluster(
            workdir / "data",
            port=free_port(),
            settings={
                "shared_buffers": "'512MB'",
                "max_wal_size": "'4GB'",
                "synchronous_commit": "on" if args.commit == "durable" else "off",
            },
        )
        cluster.start()
        dsn = cluster.dsn()
    try:
        with psycopg.connect(dsn) as conn:
            fsync = conn.execute("SHOW fsync").fetchone()
            sync_commit = conn.execute("SHOW synchronous_commit").fetchone()
        fsync_value = fsync[0] if fsync else "?"
        sync_value = sync_commit[0] if sync_commit else "?"
        print(f"server: fsync={fsync_value} synchronous_commit={sync_value}")
        cells = run(dsn, args.batch, args.writers, args.duration, args.rounds)
    finally:
        if cluster is not None:
            cluster.destroy()

    print()
    print(
        f"{'batch':>5} {'writers':>7} {'store ev/s':>10} {'store/plain':>11} "
        f"{'store/bare':>10} {'plain/bare':>10}"
    )
    summary = ratios(cells)
    for row in summary:
        print(
            f"{row['batch']:>5} {row['writers']:>7} {row['store']:>10.0f} "
            f"{row['store_vs_plain']:>11.2f} {row['store_vs_bare']:>10.2f} "
            f"{row['plain_vs_bare']:>10.2f}"
        )
    worst = min(row["store_vs_plain"] for row in summary)
    print(f"\nworst store/plain ratio: {worst:.2f} (target >= 0.80)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "cells": [asdict(c) for c in cells],
                    "ratios": summary,
                    "median_store_vs_plain": statistics.median(
                        r["store_vs_plain"] for r in summary
                    ),
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
