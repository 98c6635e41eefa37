"""NATS import throughput: `aura-pg import nats` (NatsImporter) in messages/s,
with a window of 1 (one message in flight: the importer before issue 22)
against the default window, in one run.

It starts a throw-away Postgres cluster (durable commits unless --commit
async) and a nats-server with JetStream (file storage, a temporary
directory), publishes --messages messages over --aggregates aggregates
(bodies shaped like the hardening plan's Event model, the default
mapping, each with a Nats-Msg-Id), then imports the stream once per
target into a fresh migrated database through a fresh durable consumer:

  window-1   NatsImporter(window=1): one message delivered at a time, the
             old behaviour; stopped after --before-seconds (it is slow) and
             measured on what it imported by then
  window-N   NatsImporter(window=N) for each --window (default: the
             importer's default), until the end of the stream

Each import runs in this process, timed from run() to its return (the
consumer created, the barrier checked, every message appended and
acknowledged). After each windowed run the database is checked: every
message once, each aggregate's events in publish order (the body's
`version` kept as `original_version`). Printed: messages/s per target and
the ratio of each window to window-1.

    python load/bench_import.py                       # 20,000 messages over 200 aggregates
    python load/bench_import.py --messages 5000 --before-seconds 5
    python load/bench_import.py --window 100 1000 4000 --commit async
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nats
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from aura_pg.devtools.localdb import benchmark_settings, free_port, temporary_cluster
from aura_pg.importer import EventModelMapping, NatsImporter
from aura_pg.importer.nats import DEFAULT_WINDOW

STREAM = "BENCH"
NATS_SERVER_PATHS = ("/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server")


@dataclass
class Figure:
    target: str
    window: int
    messages: int
    seconds: float
    complete: bool

    @property
    def per_second(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0


@contextlib.contextmanager
def nats_server() -> Iterator[str]:
    """A nats-server with JetStream on a free port; its URL."""
    binary = shutil.which("nats-server") or next(
        (path for path in NATS_SERVER_PATHS if Path(path).exists()), None
    )
    if binary is None:
        raise SystemExit("nats-server not found (scripts/install-system.sh installs it)")
    port = free_port()
    store = tempfile.mkdtemp(prefix="aura-pg-bench-nats-")
    process = subprocess.Popen(
        [binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", store],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.02)
        yield f"nats://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(store, ignore_errors=True)


async def publish(url: str, messages: int, aggregates: int, seed: int = 22) -> None:
    """``messages`` events over ``aggregates`` aggregates, interleaved at random."""
    rng = random.Random(seed)
    versions: dict[str, int] = {}
    nc = await nats.connect(url, allow_reconnect=False)
    try:
        js = nc.jetstream()
        await js.add_stream(name=STREAM, subjects=["bench.>"])
        pending = []
        for index in range(messages):
            aggregate = f"agg-{rng.randrange(aggregates):04d}"
            version = versions[aggregate] = versions.get(aggregate, 0) + 1
            body = {
                "id": f"evt-{index}",
                "type": "THING_STARTED" if version == 1 else "THING_HAPPENED",
                "aggregate_id": aggregate,
                "version": version,
                "payload": {"n": index, "version": version, "note": "x" * 64},
                "metadata": {"producer": "bench"},
            }
            pending.append(
                js.publish(
                    f"bench.{aggregate}",
                    json.dumps(body).encode(),
                    headers={"Nats-Msg-Id": f"msg-{index}"},
                )
            )
            if len(pending) >= 500:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await nc.close()


def fresh_database(admin_dsn: str, name: str) -> str:
    """A new database ``name``, migrated; its dsn."""
    from aura_pg import migrate  # here: alembic is slow to import

    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(
            psycopg.sql.SQL("DROP DATABASE IF EXISTS {}").format(psycopg.sql.Identifier(name))
        )
        conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
    dsn = make_conninfo(admin_dsn, dbname=name)
    migrate.upgrade(dsn)
    return dsn


async def import_once(
    dsn: str, url: str, window: int, consumer: str, budget: float | None
) -> tuple[int, float, bool]:
    """Import through a new consumer: (messages handled, seconds, reached the end)."""
    importer = NatsImporter(
        dsn, [url], STREAM, EventModelMapping(), consumer=consumer, window=window,
        fetch_timeout=0.2, lag_interval=3600,
    )  # fmt: skip
    stop = asyncio.Event()
    async with importer:
        started = time.perf_counter()
        timer = asyncio.get_running_loop().call_later(budget, stop.set) if budget else None
        stats = await importer.run(stop, until_end=True)
        seconds = time.perf_counter() - started
        if timer is not None:
            timer.cancel()
    handled = stats.appended + stats.duplicates + stats.rejected
    return handled, seconds, not stop.is_set()


def check_log(dsn: str, messages: int) -> None:
    """Every message once; each aggregate's original versions 1, 2, 3, ... in order."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT stream_id, (metadata->>'original_version')::int FROM aura.events"
            " ORDER BY stream_id, version"
        ).fetchall()
    if len(rows) != messages:
        raise SystemExit(f"the log holds {len(rows)} events, not {messages}")
    by_stream: dict[str, list[int]] = {}
    for stream_id, original in rows:
        by_stream.setdefault(stream_id, []).append(original)
    for stream_id, originals in by_stream.items():
        if originals != list(range(1, len(originals) + 1)):
            raise SystemExit(f"stream {stream_id}: out of order: {originals[:20]}...")


def run(args: argparse.Namespace, admin_dsn: str, url: str) -> list[Figure]:
    asyncio.run(publish(url, args.messages, args.aggregates))
    print(f"published {args.messages} messages over {args.aggregates} aggregates")
    figures: list[Figure] = []
    targets = [1, *args.window]
    for round_number in range(args.rounds):
        for window in targets:
            name = f"bench_import_w{window}_r{round_number}"
            dsn = fresh_database(admin_dsn, name)
            budget = args.before_seconds if window == 1 else None
            handled, seconds, complete = asyncio.run(
                import_once(dsn, url, window, f"bench-{window}-{round_number}", budget)
            )
            if complete:
                check_log(dsn, args.messages)
            figure = Figure(f"window-{window}", window, handled, seconds, complete)
            figures.append(figure)
            scope = "all" if complete else f"stopped after {args.before_seconds:g} s"
            print(
                f"round {round_number + 1} {figure.target:>12}: {handled:>6} messages in "
                f"{seconds:6.2f} s ({scope}) = {figure.per_second:8.0f} messages/s"
                + (", log checked: once each, in order" if complete else "")
            )
    return figures


def summary(figures: list[Figure]) -> dict[str, Any]:
    import statistics

    by_target: dict[str, list[float]] = {}
    for figure in figures:
        by_target.setdefault(figure.target, []).append(figure.per_second)
    medians = {target: statistics.median(values) for target, values in by_target.items()}
    reference = medians["window-1"]
    return {
        "messages_per_second": medians,
        "ratio_to_window_1": {
            target: value / reference for target, value in medians.items() if reference > 0
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--dsn", help="a server to create the databases on (default: a local one)")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--aggregates", type=int, default=200)
    parser.add_argument(
        "--window", type=int, nargs="+", default=[DEFAULT_WINDOW], help="windows to measure"
    )
    parser.add_argument(
        "--before-seconds",
        type=float,
        default=10.0,
        help="window 1 is stopped after this long and measured on what it imported",
    )
    parser.add_argument("--rounds", type=int, default=1, help="repeats (median kept)")
    parser.add_argument("--commit", choices=["durable", "async"], default="durable")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args(argv)
    if any(window < 2 for window in args.window):
        parser.error("--window: window 1 is always measured; give larger ones")

    with contextlib.ExitStack() as stack:
        admin_dsn = args.dsn
        if admin_dsn is None:
            cluster = stack.enter_context(temporary_cluster(benchmark_settings(args.commit)))
            admin_dsn = cluster.dsn()
        with psycopg.connect(admin_dsn) as conn:
            row = conn.execute("SHOW synchronous_commit").fetchone()
        user = conninfo_to_dict(admin_dsn).get("user")
        print(f"server: synchronous_commit={row[0] if row else '?'} (user {user})")
        url = stack.enter_context(nats_server())
        figures = run(args, admin_dsn, url)

    result = summary(figures)
    print()
    reference = result["messages_per_second"]["window-1"]
    for target, value in result["messages_per_second"].items():
        ratio = value / reference if reference > 0 else float("nan")
        print(f"{target:>12}: {value:8.0f} messages/s  ({ratio:5.2f}x window-1)")
    best = max(value for key, value in result["messages_per_second"].items() if key != "window-1")
    verdict = "met" if best >= 5000 else "missed"
    print(f"target: at least 5,000 messages/s: {best:.0f} ({verdict})")
    if args.json:
        args.json.write_text(
            json.dumps({"figures": [asdict(f) for f in figures], **result}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
