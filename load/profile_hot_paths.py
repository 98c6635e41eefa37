"""Where the time goes: the append and projection hot paths profiled in one run.

1. Workload: --writers processes append --batch-event batches through
   EventStore.append for --duration seconds, as fast as they can, while a
   projector daemon (`aura-pg project`, its own process, log watcher on)
   keeps the shipped stream_summary (set-based) and event_type_counts (per
   event) projections up to date.
   Three phases of --duration seconds each: the writers alone, with the
   daemon, and with the daemon while py-spy samples (--rate 0 skips it);
   the events/s of each show what the daemon and the profiler cost.
2. Python: in the last phase py-spy samples one writer and the daemon
   (`py-spy record --format raw --nonblocking`) and the script prints, per
   process, the share of samples waiting for the server, idle, and working,
   and its functions with the most samples, inclusive and self.
3. Server: pg_stat_statements (track = all: statements inside functions
   too) over the phase with the daemon, the statements with the most
   execution time.
4. Plans: auto_explain, loaded into one session with nested statements and
   its level at NOTICE, prints EXPLAIN (ANALYZE, BUFFERS) of every statement
   inside one --batch-event aura.append_events call and inside one
   aura.project_batch of each projection over --explain-events new events.

By default it starts a throw-away cluster (durable commits) with
pg_stat_statements preloaded; --dsn takes a database whose server preloads
it. Needs py-spy (a dev dependency) and the right to trace processes (root,
or ptrace_scope 0).

    python load/profile_hot_paths.py                       # 16 writers, 1-event appends, 15 s
    python load/profile_hot_paths.py --writers 4 --batch 100 --duration 10
    python load/profile_hot_paths.py --out load/results/profile   # keep the raw py-spy stacks
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from multiprocessing.synchronize import Barrier
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

import psycopg
from bench_append import make_events  # the same events as the append benchmark

from aura_pg import EventStore, migrate
from aura_pg.devtools.localdb import benchmark_settings, temporary_cluster

PROJECTIONS = ("stream_summary", "event_type_counts")

TOP_STATEMENTS = """
SELECT s.toplevel, s.calls, s.total_exec_time, s.mean_exec_time, s.rows,
       s.shared_blks_hit + s.shared_blks_read AS blocks, s.wal_bytes,
       left(regexp_replace(s.query, '\\s+', ' ', 'g'), 110)
FROM pg_stat_statements s
WHERE s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
ORDER BY s.total_exec_time DESC
LIMIT %(limit)s
"""

AUTO_EXPLAIN = """
LOAD 'auto_explain';
SET auto_explain.log_min_duration = 0;
SET auto_explain.log_analyze = on;
SET auto_explain.log_buffers = on;
SET auto_explain.log_timing = on;
SET auto_explain.log_nested_statements = on;
SET auto_explain.log_level = notice;
"""


def writer_main(
    dsn: str, writer: int, batch: int, barrier: Barrier, stop: MpEvent, results: Any
) -> None:
    """Append ``batch``-event batches over 50 streams until ``stop``."""
    run = uuid.uuid4().hex[:8]
    appended = 0
    with EventStore.connect(dsn, min_size=1, max_size=1) as store:
        barrier.wait()
        n = 0
        while not stop.is_set():
            store.append(f"{run}-w{writer}-s{n % 50}", make_events(batch, writer, n))
            appended += batch
            n += 1
    results.put(appended)


def py_spy(pid: int, seconds: float, rate: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling ``pid`` for ``seconds`` into ``out`` (collapsed stacks)."""
    executable = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return subprocess.Popen(
        [
            executable, "record", "--pid", str(pid), "--duration", str(int(seconds)),
            "--rate", str(rate), "--format", "raw", "--nonblocking", "--output", str(out),
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip


def frame_name(frame: str) -> str:
    """``function (path/to/module.py:42)`` as ``function (module.py)``."""
    name, _, location = frame.partition(" (")
    module = location.rsplit("/", 1)[-1].split(":", 1)[0]
    return f"{name} ({module})" if module else name


# Leaf frames that mean the thread is waiting: for the server's answer (the
# psycopg wait loops, the event loop's epoll) or idle (pool worker threads).
WAITING_FOR_SERVER = ("Connection.wait (", "AsyncConnection.wait (", "EpollSelector.select (")
IDLE = ("Condition.wait (", "Event.wait (", "Queue.get (")


def summarise_stacks(raw: Path, top: int) -> dict[str, Any]:
    """Samples per function (inclusive: on the stack; self: at its top) from
    py-spy's collapsed stacks (root first), as shares of all samples, and
    the shares whose top frame is a wait for the server or an idle wait.
    py-spy's own idle detection is unreliable here (threads waiting for a
    core count as running), hence the classification by top frame."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame_name(f) for f in stack.split(";")]
        samples += count
        for name in set(frames):
            inclusive[name] += count
        own[frames[-1]] += count
    waiting = sum(n for name, n in own.items() if name.startswith(WAITING_FOR_SERVER))
    idle = sum(n for name, n in own.items() if name.startswith(IDLE))
    total = samples or 1
    return {
        "samples": samples,
        "waiting_for_server": waiting / total,
        "idle": idle / total,
        "working": (samples - waiting - idle) / total,
        "inclusive": [(name, n / total) for name, n in inclusive.most_common(top)],
        "self": [(name, n / total) for name, n in own.most_common(top)],
    }


def print_profile(title: str, profile: dict[str, Any]) -> None:
    print(
        f"\n{title}: {profile['samples']} samples; top frame waiting for the server "
        f"{profile['waiting_for_server']:.0%}, idle {profile['idle']:.0%}, "
        f"other work (Python, libpq calls) {profile['working']:.0%}"
    )
    print(f"  {'inclusive':>9}  function")
    for name, share in profile["inclusive"]:
        print(f"  {share:>9.1%}  {name}")
    print(f"  {'self':>9}  function")
    for name, share in profile["self"]:
        print(f"  {share:>9.1%}  {name}")


def start_daemon(dsn: str) -> subprocess.Popen[bytes]:
    executable = shutil.which("aura-pg") or str(Path(sys.executable).parent / "aura-pg")
    return subprocess.Popen(
        [executable, "project", *PROJECTIONS, "--dsn", dsn, "--log-format", "json"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_caught_up(dsn: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            rows = conn.execute(
                "SELECT events_behind FROM aura.projection_status WHERE name = ANY(%s)",
                (list(PROJECTIONS),),
            ).fetchall()
            if len(rows) == len(PROJECTIONS) and all(r[0] == 0 for r in rows):
                return
            time.sleep(0.1)
    raise RuntimeError(f"the projections did not catch up within {timeout:.0f} s")


def explain_hot_statements(dsn: str, batch: int, explain_events: int) -> list[str]:
    """auto_explain's plans of the statements inside one append and inside
    one project_batch of each projection (the daemon is stopped by now)."""
    plans: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.add_notice_handler(lambda d: plans.append(d.message_primary or ""))
        with EventStore.connect(dsn, min_size=1, max_size=1) as store:
            for n in range(explain_events):
                store.append(f"explain-{n % 50}", make_events(1, 0, n))
        batch_json = json.dumps(
            [{"type": e.type, "data": e.data, "metadata": e.metadata}
             for e in make_events(batch, 0, 0)]
        )  # fmt: skip
        append = "SELECT * FROM aura.append_events(%s, %s::jsonb, 'any')"
        # Once before explaining: the session's first call compiles and plans.
        conn.execute(append, (f"explain-{uuid.uuid4().hex[:8]}", batch_json))
        conn.execute(AUTO_EXPLAIN)
        plans.append(f"=== aura.append_events of {batch} events (a new stream) ===")
        conn.execute(append, (f"explain-{uuid.uuid4().hex[:8]}", batch_json))
        for name in PROJECTIONS:
            row = conn.execute(
                "SELECT transaction_id::text, global_position FROM aura.projection_checkpoints "
                "WHERE name = %s",
                (name,),
            ).fetchone()
            assert row is not None
            plans.append(f"=== aura.project_batch('{name}'), {explain_events} events behind ===")
            conn.execute(
                "SELECT applied FROM aura.project_batch(%s, %s::xid8, %s)", (name, row[0], row[1])
            )
    return plans


def workload(
    dsn: str, args: argparse.Namespace, daemon_pid: int | None, stacks: Path | None
) -> tuple[int, float]:
    """--writers writers appending for --duration seconds; with ``stacks``,
    py-spy samples one writer (and the daemon) meanwhile. (events, seconds)."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(args.writers + 1)
    stop = ctx.Event()
    results = ctx.Queue()
    writers = [
        ctx.Process(target=writer_main, args=(dsn, w, args.batch, barrier, stop, results))
        for w in range(args.writers)
    ]
    try:
        for process in writers:
            process.start()
        barrier.wait(timeout=120)
        began = time.monotonic()
        spies = []
        if stacks is not None:
            assert writers[0].pid is not None
            spies.append(py_spy(writers[0].pid, args.duration, args.rate, stacks / "writer.txt"))
            if daemon_pid is not None:
                spies.append(py_spy(daemon_pid, args.duration, args.rate, stacks / "daemon.txt"))
        time.sleep(args.duration)
        stop.set()
        appended = sum(results.get(timeout=120) for _ in writers)
        seconds = time.monotonic() - began
        for spy in spies:
            _, err = spy.communicate(timeout=120)
            if spy.returncode != 0:
                raise RuntimeError(f"py-spy failed: {err.decode(errors='replace').strip()}")
    finally:
        stop.set()
        for process in writers:
            process.join(60)
    return appended, seconds


def run(args: argparse.Namespace, dsn: str, out: Path) -> dict[str, Any]:
    migrate.upgrade(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    figures: dict[str, Any] = {}
    print(
        f"workload: {args.batch}-event appends from {args.writers} writers, "
        f"{args.duration:g} s per phase"
    )
    alone = workload(dsn, args, None, None)
    daemon = start_daemon(dsn)
    try:
        wait_caught_up(dsn, 120)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_stat_statements_reset()")
        projected = workload(dsn, args, daemon.pid, None)
        wait_caught_up(dsn, 120)
        with psycopg.connect(dsn, autocommit=True) as conn:
            rows = conn.execute(TOP_STATEMENTS, {"limit": args.top}).fetchall()
        profiled = workload(dsn, args, daemon.pid, out) if args.rate else None
        wait_caught_up(dsn, 120)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
    phases = [("writers alone", alone), ("with the projector daemon", projected)]
    if profiled is not None:
        phases.append(("with the daemon, under py-spy", profiled))
    for label, (events, seconds) in phases:
        print(f"  {label:<30} {events:>8} events {events / seconds:>8.0f} events/s")
        figures[label] = {"events": events, "events_per_second": events / seconds}
    for who in ("writer", "daemon") if args.rate else ():
        profile = summarise_stacks(out / f"{who}.txt", args.top)
        figures[who] = profile
        print_profile(f"{who} (py-spy, {args.rate} Hz)", profile)

    total = sum(r[2] for r in rows) or 1.0
    print(
        "\npg_stat_statements, the phase with the daemon (not under py-spy): most execution "
        "time (top: sent by a client)"
    )
    print(f"{'top':>3} {'calls':>8} {'total ms':>9} {'share':>6} {'mean ms':>8} {'rows':>8}  query")
    for top, calls, total_ms, mean_ms, nrows, _blocks, _wal, query in rows:
        print(
            f"{'yes' if top else 'no':>3} {calls:>8} {total_ms:>9.0f} {total_ms / total:>6.0%} "
            f"{mean_ms:>8.3f} {nrows:>8}  {query}"
        )
    figures["statements"] = [
        {"toplevel": r[0], "calls": r[1], "total_ms": r[2], "mean_ms": r[3], "query": r[7]}
        for r in rows
    ]
    plans = explain_hot_statements(dsn, args.batch, args.explain_events)
    print("\nauto_explain: EXPLAIN (ANALYZE, BUFFERS) of the statements inside the hot calls")
    for plan in plans:
        print(plan)
    figures["plans"] = plans
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--dsn", help="profile this database (its server preloads pg_stat_statements)"
    )
    parser.add_argument("--writers", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1, help="events per append")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of workload")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=12, help="rows per table")
    parser.add_argument(
        "--explain-events", type=int, default=500, help="events project_batch is explained over"
    )
    parser.add_argument("--out", type=Path, help="keep py-spy's stacks and the figures here")
    parser.add_argument(
        "--commit", choices=["durable", "async"], default="durable", help="local cluster commits"
    )
    args = parser.parse_args(argv)
    if args.writers < 1 or args.batch < 1 or args.duration < 1:
        parser.error("--writers, --batch and --duration must be at least 1")
    with contextlib.ExitStack() as stack:
        if args.out is None:
            out = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="aura-pg-profile-")))
        else:
            out = args.out
            out.mkdir(parents=True, exist_ok=True)
        dsn = args.dsn
        if dsn is None:
            settings = {
                **benchmark_settings(args.commit),
                "shared_preload_libraries": "'timescaledb,pg_stat_statements'",
                "pg_stat_statements.track": "all",
                "track_io_timing": "on",
            }
            dsn = stack.enter_context(temporary_cluster(settings)).dsn()
        figures = run(args, dsn, out)
        (out / "profile.json").write_text(json.dumps(figures, indent=2))
        if args.out is not None:
            print(f"\nraw stacks and figures in {out}{os.sep}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
