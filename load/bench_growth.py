"""The cost of a large log: appends and stream reads on an empty log against
the same on a log already holding ``--events`` events, in one run.

Two databases on one server: ``empty`` (just migrated) and ``full``, filled
first with ``--events`` events in 100-event streams, 20% of them with an
idempotency key of their own, event ids time-ordered as the store makes
them (UUIDv7), then vacuumed and analyzed as a production log is. Both get
a 1,000-event stream to read. Then, round by round and alternating between
the two, it measures with load/bench_append.py's writers:

* single-event appends and 100-event batches (events/s, ``--writers``
  processes, ``--duration`` seconds each);
* ``read_stream`` of the 1,000-event stream (p50/p95 over ``--reads`` reads).

and prints full/empty for each (the target: within 15%, i.e. at least 0.85
for throughput and at most 1.15 for read latency).

    python load/bench_growth.py                       # 10 million events
    python load/bench_growth.py --events 3000000 --rounds 3
    python load/bench_growth.py --dsn "host=... dbname=postgres" --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from bench_append import measure, percentile, settle  # the append benchmark's writers
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from aura_pg import EventStore, NewEvent
from aura_pg.devtools.localdb import benchmark_settings, temporary_cluster

FILL_CHUNK = 1_000_000
READ_STREAM = "growth-read"
READ_STREAM_EVENTS = 1000

# One chunk of the fill: events [lo, hi) of 100-event streams, as the store
# writes them (UUIDv7 ids, in id order; a hash only for an explicit key).
FILL = """
INSERT INTO aura.events (event_id, stream_id, version, type, data, metadata,
                         idempotency_key, idempotency_hash)
SELECT f.event_id, f.stream_id, f.version, 'FILLED',
       jsonb_build_object('n', f.i, 'reason', repeat('x', 60)),
       jsonb_build_object('correlation_id', 'c-' || f.i),
       coalesce(f.own_key, f.event_id::text),
       CASE WHEN f.own_key IS NOT NULL THEN aura.idempotency_hash(f.stream_id, f.own_key) END
FROM (
    SELECT i,
           (lpad(to_hex(1700000000000 + i), 12, '0') || '7' || substr(md5(i::text), 1, 3)
            || '8' || substr(md5(i::text), 4, 15))::uuid AS event_id,
           'filled-' || (i / 100) AS stream_id,
           i %% 100 + 1 AS version,
           CASE WHEN i %% 5 = 0 THEN 'k-' || i END AS own_key
    FROM generate_series(%(lo)s::bigint, %(hi)s::bigint - 1) AS i
) AS f
ORDER BY f.i
"""


def database_dsn(server: str, name: str) -> str:
    params = conninfo_to_dict(server)
    params["dbname"] = name
    return make_conninfo(**{k: str(v) for k, v in params.items() if v is not None})


def create_database(server: str, name: str) -> str:
    from aura_pg import migrate  # here: alembic is slow to import in every writer process

    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = database_dsn(server, name)
    migrate.upgrade(dsn)
    with EventStore.connect(dsn, min_size=1, max_size=1) as store:
        for start in range(0, READ_STREAM_EVENTS, 100):
            store.append(READ_STREAM, [NewEvent("READ", {"n": start + i}) for i in range(100)])
    return dsn


def fill(dsn: str, events: int) -> float:
    """Events/s of the fill (one plain INSERT per million)."""
    began = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        for lo in range(0, events, FILL_CHUNK):
            hi = min(events, lo + FILL_CHUNK)
            conn.execute(FILL, {"lo": lo, "hi": hi})
            done = time.perf_counter() - began
            print(f"  filled {hi:,} events in {done:.0f} s", flush=True)
    elapsed = time.perf_counter() - began
    return events / elapsed


def vacuum(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE) aura.events")


def read_latencies(dsn: str, reads: int) -> list[float]:
    with EventStore.connect(dsn, min_size=1, max_size=1) as store:
        for _ in range(20):
            store.read_stream(READ_STREAM)
        latencies = []
        for _ in range(reads):
            began = time.perf_counter()
            events = store.read_stream(READ_STREAM)
            latencies.append(time.perf_counter() - began)
            assert len(events) == READ_STREAM_EVENTS
    return sorted(latencies)


def table_size(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT pg_size_pretty(pg_total_relation_size('aura.events'))"
        ).fetchone()
    return str(row[0]) if row else "?"


def run(
    dsns: dict[str, str], writers: int, duration: float, rounds: int, reads: int
) -> dict[str, Any]:
    throughput: dict[tuple[str, int], list[float]] = {}
    reads_p95: dict[str, list[float]] = {}
    reads_p50: dict[str, list[float]] = {}
    for round_no in range(1, rounds + 1):
        for batch in (1, 100):
            for name, dsn in dsns.items():  # alternating: the same conditions for both
                settle(dsn)
                cell = measure(dsn, "store", batch, writers, duration)
                throughput.setdefault((name, batch), []).append(cell.events_per_second)
                print(
                    f"round {round_no}: {name:>5} batch {batch:>3}: "
                    f"{cell.events_per_second:,.0f} events/s (p95 {cell.p95_ms:.2f} ms)",
                    flush=True,
                )
        for name, dsn in dsns.items():
            latencies = read_latencies(dsn, reads)
            reads_p50.setdefault(name, []).append(percentile(latencies, 0.5))
            reads_p95.setdefault(name, []).append(percentile(latencies, 0.95))
            print(
                f"round {round_no}: {name:>5} read_stream of {READ_STREAM_EVENTS} events: "
                f"p50 {reads_p50[name][-1]:.2f} ms, p95 {reads_p95[name][-1]:.2f} ms",
                flush=True,
            )
    rows = []
    for batch in (1, 100):
        empty = statistics.median(throughput[("empty", batch)])
        full = statistics.median(throughput[("full", batch)])
        rows.append({"what": f"append, batch {batch}", "empty": empty, "full": full,
                     "full_vs_empty": full / empty, "target": ">= 0.85"})  # fmt: skip
    empty_read = statistics.median(reads_p95["empty"])
    full_read = statistics.median(reads_p95["full"])
    rows.append({"what": f"read_stream {READ_STREAM_EVENTS} p95 ms", "empty": empty_read,
                 "full": full_read, "full_vs_empty": full_read / empty_read,
                 "target": "<= 1.15"})  # fmt: skip
    return {"rows": rows, "throughput": {f"{k[0]}/{k[1]}": v for k, v in throughput.items()}}


def print_rows(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'':>26} {'empty':>10} {'full':>10} {'full/empty':>11}  target")
    for row in rows:
        print(
            f"{row['what']:>26} {row['empty']:>10,.2f} {row['full']:>10,.2f} "
            f"{row['full_vs_empty']:>11.2f}  {row['target']}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dsn", help="a server to create the two databases on")
    parser.add_argument("--events", type=int, default=10_000_000, help="events in the full log")
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per append cell")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reads", type=int, default=300, help="timed read_stream calls per round")
    parser.add_argument(
        "--commit", choices=["durable", "async"], default="durable", help="throw-away cluster"
    )
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args(argv)

    with contextlib.ExitStack() as stack:
        server = args.dsn
        if server is None:
            settings = benchmark_settings(args.commit)
            server = stack.enter_context(temporary_cluster(settings)).dsn()
        suffix = uuid.uuid4().hex[:6]
        dsns = {
            "empty": create_database(server, f"growth_empty_{suffix}"),
            "full": create_database(server, f"growth_full_{suffix}"),
        }
        print(f"filling the full log with {args.events:,} events", flush=True)
        rate = fill(dsns["full"], args.events)
        for dsn in dsns.values():
            vacuum(dsn)
        sizes = {name: table_size(dsn) for name, dsn in dsns.items()}
        print(f"fill: {rate:,.0f} events/s; aura.events: {sizes['empty']} and {sizes['full']}")
        figures = run(dsns, args.writers, args.duration, args.rounds, args.reads)
        figures.update(events=args.events, fill_events_per_second=rate, sizes=sizes)
        if args.dsn is not None:
            with psycopg.connect(server, autocommit=True) as conn:
                for name in (f"growth_empty_{suffix}", f"growth_full_{suffix}"):
                    conn.execute(
                        sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name))
                    )
    print_rows(figures["rows"])
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
