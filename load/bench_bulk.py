"""Bulk load throughput: EventStore.append_many and `aura-pg import jsonl`
against EventStore.append of the same batches, in one run.

It loads --events events (default 1,000,000) in streams of --stream-size
events (default 100), one batch per stream, each target into a fresh
database of its own on the same server, and prints events/s of

  bulk    EventStore.append_many of every stream's batch in one call (the
          store splits it into chunks of --chunk-events events, one
          transaction each: COPY into the staging table, aura.append_many)
  append  EventStore.append of the same batches one by one, one writer:
          the reference, measured in the same run
  import  `aura-pg import jsonl` (a separate process, as an operator runs
          it) of the bulk database's `aura-pg export` file, into a fresh
          database; the export's own time is printed too
  plain   the ceiling: one INSERT ... SELECT, inside the server, of the
          bulk-loaded rows into a copy of aura.events (same columns,
          defaults, indexes and constraints): no client, no validation, no
          function, one commit

and the ratios bulk/append and import/append. The issue's targets: bulk at
least 100,000 events/s, import at least 50,000 events/s. By default it
starts a throw-away local cluster with production durability settings
(fsync on, synchronous_commit on), as load/bench_append.py does.

    python load/bench_bulk.py                       # 1,000,000 events
    python load/bench_bulk.py --events 200000       # a smaller run
    python load/bench_bulk.py --dsn "host=... dbname=postgres" --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from aura_pg import NO_STREAM, EventStore, NewEvent, StreamAppend, jsonl
from aura_pg.devtools.localdb import benchmark_settings, temporary_cluster
from aura_pg.store.operations import DEFAULT_CHUNK_EVENTS

REPO_ROOT = Path(__file__).resolve().parent.parent

PLAIN_TABLE = "CREATE TABLE public.events_plain (LIKE aura.events INCLUDING ALL)"
PLAIN_COPY = """
INSERT INTO public.events_plain
    (event_id, stream_id, version, type, data, metadata, idempotency_key, idempotency_hash)
SELECT event_id, stream_id, version, type, data, metadata, idempotency_key, idempotency_hash
FROM aura.events ORDER BY global_position
"""


def make_batches(events: int, stream_size: int) -> list[StreamAppend]:
    streams = max(1, events // stream_size)
    return [
        StreamAppend(
            f"bench-{s}",
            [
                NewEvent("BENCH_HAPPENED", {"stream": s, "n": n, "note": "bulk load benchmark"})
                for n in range(stream_size)
            ],
            NO_STREAM,
        )
        for s in range(streams)
    ]


@contextlib.contextmanager
def fresh_database(server_dsn: str, name: str) -> Iterator[str]:
    """A new, migrated database on the server, dropped afterwards."""
    from aura_pg import migrate  # alembic: slow to import

    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = make_conninfo(server_dsn, dbname=name)
    try:
        migrate.upgrade(dsn)
        yield dsn
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def checkpoint(dsn: str) -> None:
    """Start each measurement from the same state: no dirty buffers."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CHECKPOINT")


def count(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM aura.events").fetchone()
    return int(row[0]) if row else 0


def run(server_dsn: str, events: int, stream_size: int, chunk_events: int) -> dict[str, Any]:
    batches = make_batches(events, stream_size)
    total = len(batches) * stream_size
    figures: dict[str, Any] = {"events": total, "stream_size": stream_size}
    print(f"{total} events in {len(batches)} streams of {stream_size}")
    with (
        fresh_database(server_dsn, "bench_bulk") as bulk_dsn,
        tempfile.TemporaryDirectory() as tmp,
    ):
        with EventStore.connect(bulk_dsn, max_size=1) as store:
            checkpoint(bulk_dsn)
            began = time.perf_counter()
            store.append_many(batches, chunk_events=chunk_events)
            elapsed = time.perf_counter() - began
        assert count(bulk_dsn) == total
        figures["bulk_events_per_second"] = total / elapsed
        print(f"bulk    {total / elapsed:>10,.0f} events/s  ({elapsed:.1f} s)")

        with psycopg.connect(bulk_dsn, autocommit=True) as conn:
            conn.execute(PLAIN_TABLE)
            checkpoint(bulk_dsn)
            began = time.perf_counter()
            conn.execute(PLAIN_COPY)
            elapsed = time.perf_counter() - began
        figures["plain_events_per_second"] = total / elapsed
        print(f"plain   {total / elapsed:>10,.0f} events/s  ({elapsed:.1f} s, the ceiling)")

        exported = Path(tmp) / "log.jsonl"
        with EventStore.connect(bulk_dsn, max_size=1) as store, exported.open("w") as out:
            began = time.perf_counter()
            jsonl.export(store, out)
            elapsed = time.perf_counter() - began
        figures["export_events_per_second"] = total / elapsed
        print(f"export  {total / elapsed:>10,.0f} events/s  ({elapsed:.1f} s, to a file)")

        with fresh_database(server_dsn, "bench_import") as import_dsn:
            checkpoint(import_dsn)
            command = [
                sys.executable, "-m", "aura_pg.cli", "import", "jsonl", str(exported),
                "--dsn", import_dsn, "--chunk-events", str(chunk_events), "--quiet",
            ]  # fmt: skip
            env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
            began = time.perf_counter()
            subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
            elapsed = time.perf_counter() - began
            assert count(import_dsn) == total
        figures["import_events_per_second"] = total / elapsed
        print(f"import  {total / elapsed:>10,.0f} events/s  ({elapsed:.1f} s, the CLI process)")

    with fresh_database(server_dsn, "bench_append") as append_dsn:
        with EventStore.connect(append_dsn, max_size=1) as store:
            checkpoint(append_dsn)
            began = time.perf_counter()
            for batch in batches:
                store.append(batch.stream_id, batch.events, batch.expected_version)
            elapsed = time.perf_counter() - began
        assert count(append_dsn) == total
    figures["append_events_per_second"] = total / elapsed
    print(f"append  {total / elapsed:>10,.0f} events/s  ({elapsed:.1f} s, one writer)")

    figures["bulk_vs_append"] = (
        figures["bulk_events_per_second"] / figures["append_events_per_second"]
    )
    figures["import_vs_append"] = (
        figures["import_events_per_second"] / figures["append_events_per_second"]
    )
    figures["bulk_vs_plain"] = (
        figures["bulk_events_per_second"] / figures["plain_events_per_second"]
    )
    print()
    print(f"bulk/plain    {figures['bulk_vs_plain']:.2f}x   (the server's ceiling for these rows)")
    print(f"bulk/append   {figures['bulk_vs_append']:.2f}x   (target: bulk >= 100,000 events/s)")
    print(f"import/append {figures['import_vs_append']:.2f}x   (target: import >= 50,000 events/s)")
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--dsn",
        help="a server to create the benchmark databases on (a connection string to one of "
        "its databases; needs CREATEDB) instead of a local throw-away cluster",
    )
    parser.add_argument("--events", type=int, default=1_000_000, help="events to load")
    parser.add_argument("--stream-size", type=int, default=100, help="events per stream")
    parser.add_argument(
        "--chunk-events",
        type=int,
        default=DEFAULT_CHUNK_EVENTS,
        help=f"events per bulk transaction (default {DEFAULT_CHUNK_EVENTS})",
    )
    parser.add_argument(
        "--commit",
        choices=["durable", "async"],
        default="durable",
        help="local cluster: durable commits (the default) or synchronous_commit=off",
    )
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        dsn = args.dsn
        if dsn is None:
            dsn = stack.enter_context(temporary_cluster(benchmark_settings(args.commit))).dsn()
        with psycopg.connect(dsn) as conn:
            fsync = conn.execute("SHOW fsync").fetchone()
            sync_commit = conn.execute("SHOW synchronous_commit").fetchone()
        print(
            f"server: fsync={fsync[0] if fsync else '?'} "
            f"synchronous_commit={sync_commit[0] if sync_commit else '?'}"
        )
        figures = run(dsn, args.events, args.stream_size, args.chunk_events)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
