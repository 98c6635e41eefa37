"""A new database's first minutes: append latency window by window, from the
moment the schema is migrated, against the same run's steady state.

Postgres keeps no statistics of a table until its first ANALYZE (autovacuum
runs one within ``autovacuum_naptime`` of enough changes, a minute by
default), and plans made while the log was empty are cached by the
sessions that made them. This measures what that costs: ``--writers``
processes run the read-decide-append loop of a repository (read the events
after the version they know, append one event at that version) on streams
of their own, for ``--duration`` seconds, and the latency of each
read-and-append is bucketed in ``--window``-second windows. It prints p50
and p95 per window, when autovacuum first analyzed ``aura.events``, and the
ratio of the first minute's p95 to the last windows' (the steady state,
measured in the same run).

    python load/bench_first_minute.py                  # 4 writers, 120 s, 10-s windows
    python load/bench_first_minute.py --duration 60 --writers 2
    python load/bench_first_minute.py --dsn "host=... dbname=postgres" --json out.json

With ``--dsn`` it creates (and drops) a database of its own on that server.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psycopg
from bench_append import percentile  # milliseconds, of sorted seconds
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from aura_pg import EventStore, NewEvent
from aura_pg.devtools.localdb import benchmark_settings, temporary_cluster
from aura_pg.migrate import upgrade

STREAMS_PER_WRITER = 200
FIRST_MINUTE = 60.0


@dataclass
class Window:
    start: float
    """Seconds after the migration."""
    appends: int
    p50_ms: float
    p95_ms: float


def writer_main(dsn: str, writer: int, started: float, until: float, results: Any) -> None:
    """Read-decide-append on this writer's streams until ``until`` (a
    ``time.time()``); puts (seconds after ``started``, latency) pairs."""
    run = uuid.uuid4().hex[:6]
    versions = [0] * STREAMS_PER_WRITER
    samples: list[tuple[float, float]] = []
    with EventStore.connect(dsn, min_size=1, max_size=1) as store:
        n = 0
        while time.time() < until:
            slot = n % STREAMS_PER_WRITER
            stream_id = f"w{writer}-{run}-{slot}"
            began = time.perf_counter()
            missed = store.read_stream(stream_id, from_version=versions[slot] + 1)
            known = versions[slot] + len(missed)
            result = store.append(stream_id, NewEvent("TICKED", {"n": n, "writer": writer}), known)
            samples.append((time.time() - started, time.perf_counter() - began))
            versions[slot] = result.version
            n += 1
    results.put(samples)


def last_autoanalyze(dsn: str) -> float | None:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT extract(epoch FROM last_autoanalyze) FROM pg_stat_user_tables "
            "WHERE schemaname = 'aura' AND relname = 'events'"
        ).fetchone()
    return None if row is None or row[0] is None else float(row[0])


def measure(dsn: str, writers: int, duration: float, window: float) -> dict[str, Any]:
    upgrade(dsn)
    started = time.time()
    until = started + duration
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    processes = [
        ctx.Process(target=writer_main, args=(dsn, w, started, until, results))
        for w in range(writers)
    ]
    for process in processes:
        process.start()
    analyzed_at: float | None = None
    while time.time() < until:
        time.sleep(1.0)
        if analyzed_at is None and (seen := last_autoanalyze(dsn)) is not None:
            analyzed_at = seen - started
    samples = [sample for _ in processes for sample in results.get(timeout=duration + 60)]
    for process in processes:
        process.join()
    windows: list[Window] = []
    edge = 0.0
    while edge < duration:
        latencies = [lat for at, lat in samples if edge <= at < edge + window]
        if latencies:
            windows.append(
                Window(
                    edge,
                    len(latencies),
                    percentile(sorted(latencies), 0.5),
                    percentile(sorted(latencies), 0.95),
                )
            )
        edge += window
    first = [lat for at, lat in samples if at < FIRST_MINUTE]
    steady_from = max(FIRST_MINUTE, duration - 3 * window)
    steady = [lat for at, lat in samples if at >= steady_from]
    return {
        "writers": writers,
        "duration": duration,
        "windows": [asdict(w) for w in windows],
        "autoanalyze_after_s": analyzed_at,
        "first_minute_p95_ms": percentile(sorted(first), 0.95),
        "steady_p95_ms": percentile(sorted(steady), 0.95) if steady else None,
        "steady_from_s": steady_from,
    }


def print_report(figures: dict[str, Any]) -> None:
    print(f"\n{'window':>9} {'appends':>8} {'p50 ms':>8} {'p95 ms':>8}")
    for w in figures["windows"]:
        print(f"{w['start']:>7.0f} s {w['appends']:>8} {w['p50_ms']:>8.2f} {w['p95_ms']:>8.2f}")
    analyzed = figures["autoanalyze_after_s"]
    print(
        "autovacuum analyzed aura.events "
        + (f"{analyzed:.0f} s after the migration" if analyzed is not None else "not in the run")
    )
    first, steady = figures["first_minute_p95_ms"], figures["steady_p95_ms"]
    if steady:
        print(
            f"first minute p95 {first:.2f} ms, steady p95 (from {figures['steady_from_s']:.0f} s) "
            f"{steady:.2f} ms: first/steady {first / steady:.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dsn", help="a server to create a fresh database on")
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--duration", type=float, default=120.0)
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument(
        "--commit", choices=["durable", "async"], default="durable", help="throw-away cluster"
    )
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args(argv)
    if args.duration <= FIRST_MINUTE:
        parser.error(f"--duration must be above {FIRST_MINUTE:g} s: the first minute is measured")

    with contextlib.ExitStack() as stack:
        server = args.dsn
        if server is None:
            cluster = stack.enter_context(temporary_cluster(benchmark_settings(args.commit)))
            server = cluster.dsn()
        database = f"first_minute_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
        params = conninfo_to_dict(server)
        params["dbname"] = database
        dsn = make_conninfo(**{k: str(v) for k, v in params.items() if v is not None})
        try:
            figures = measure(dsn, args.writers, args.duration, args.window)
        finally:
            with psycopg.connect(server, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(database))
                )
    print_report(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
