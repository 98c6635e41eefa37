"""Python processors: the ``python`` scenario of load/bench_projection.py.

Run it with ``python load/bench_projection.py --scenarios python`` (the
default runs it after the SQL scenarios). What it measures, each figure
against a reference or target printed beside it:

1. Catch-up. The log holds at least ``--events`` events (loaded as the SQL
   scenario loads them). Each projection runs alone in a daemon child
   process (``ProjectorDaemon``) from checkpoint 0 until its checkpoint
   reaches the last event of the log: the SQL references first (the
   benchmark fold, per event and set-based, at ``--py-batch``), then one
   Python processor per ``--py-handlers`` entry (load/processor_handlers.py:
   a no-op, sync and async; one INSERT per event with ``executemany``, sync
   and async). All of them are timed the same way: from the child's call
   of ``daemon.run`` (registration, connection, ownership included) to the
   moment the parent, reading the checkpoint row every 10 ms, sees it at
   the log's last event. For the Python processors the handlers also time
   themselves (load/processor_handlers.py), which splits the run into the
   start (until the first handler call), the time inside the handler, the
   time between one call's return and the next call (the daemon's own work
   per batch: reading and decoding the next batch, advancing the checkpoint,
   committing) and the tail (the last call's return to the checkpoint seen
   at the end: the last commit and the 10 ms poll). It also reads the CPU
   time of the daemon process and of the Postgres server (all its
   processes, when it runs on this machine) over each catch-up.
   Then the anatomy of a batch: the statements a daemon sends for a sync
   processor's batch, replayed step by step in this process on a scratch
   processor row (BEGIN, aura.processor_batch, fetching the rows with
   psycopg's JSON decoding of data and metadata, building the
   RecordedEvents, aura.advance_processor, COMMIT), each timed, taking
   turns with the same steps with jsonb fetched as text (no JSON decoding).
   With ``--py-profile DIR``, one more no-op catch-up (measured apart, as
   cProfile slows it down) runs under cProfile in every thread of the
   daemon, and the top functions are printed.
2. End-to-end latency. ``--latency-writers`` processes append single-event batches,
   each to a new stream, at ``--rate`` events/s for ``--duration`` s while
   a daemon (log watcher + poll 1 s, as deployed; caught up first) runs a
   Python processor that inserts one row per event (``record_live``,
   batch 500), and then, in the same run and measured the same way, the
   SQL set-based fold (batch 500). Per event: the commit record time of
   the handler's transaction (``pg_xact_commit_timestamp`` of the row it
   wrote: the checkpoint's transaction) minus the event's ``recorded_at``
   (the append statement's start), its commit record time, and the
   writer's wall time right after the append returned. Without
   ``track_commit_timestamp`` (``--dsn`` on a server without it) the end
   point is the row's ``applied_at`` (clock_timestamp() in the handler,
   before the commit) instead, and the output says so.
3. I/O-bound throughput. ``--io-events`` events of type IO_WORK are
   appended over ``--io-streams`` streams; for each ``--io-partitions`` count
   N, a processor with N partitions (source_events IO_WORK, batch
   ``--io-batch``) runs in N daemon processes started together, each
   running one partition (``bench_py_io_pinned_N``), and then each taking
   whichever partitions it finds free, as deployed daemons do
   (``bench_py_io_free_N``; ``--io-assign``). Its handler sleeps
   ``--io-sleep-ms`` per event (or per batch, ``--io-sleep-per batch``),
   then inserts one row per batch. Once every partition has committed a
   batch, the events of the batches finished in the next ``--io-window``
   seconds (by the handler's clock_timestamp just before its commit) give
   the throughput; it prints which daemon held which partition, the CPU
   time of the daemons and of the server and the machine's busy share
   (everything on it) in the window, and checks that no partition ran out
   of work in the window and that no event was handled twice.

It ends with PASS or MISS for each target: no-op catch-up >= 20,000
events/s, end-to-end p95 < 50 ms at 1,000 events/s, I/O-bound 4 partitions
>= 3x 1 partition; each MISS with the figures that show where the time went.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import itertools
import logging
import multiprocessing as mp
import os
import pstats
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any, Final

import processor_handlers
import psycopg
from bench_projection import (
    CATALOG,
    MIB,
    drop_bench_projections,
    latency_writer,
    load_events,
    percentile,
    proc_status_kb,
    settle,
    verify,
    with_notify,
)
from psycopg import sql
from psycopg.types.json import set_json_loads
from psycopg.types.string import TextLoader

from aura_pg.processors import python_processor
from aura_pg.projection.catalog import ProjectionSpec, load_catalog
from aura_pg.projection.daemon import ProjectorDaemon
from aura_pg.projection.processor import json_loads, recorded_event
from aura_pg.projection.processor import queries as processor_queries
from aura_pg.projection.settings import ProjectorSettings

SCHEMA_SQL: Final = Path(__file__).resolve().parent / "projections" / "bench_processors.sql"
HANDLERS: Final[dict[str, Callable[..., Any]]] = {
    "noop": processor_handlers.noop,
    "noop_async": processor_handlers.noop_async,
    "insert": processor_handlers.insert_rows,
    "insert_async": processor_handlers.insert_rows_async,
}
# The tables of the inserting handlers, for the checks.
HANDLER_TABLES: Final = {"insert": "insert_rows", "insert_async": "insert_rows_async"}
IO_TYPE: Final = "IO_WORK"
SQL_EACH: Final = "bench_ref_each"
SQL_SET: Final = "bench_ref_set"
SQL_LIVE: Final = "bench_ref_live"
PY_LIVE: Final = "bench_py_live"
PY_PROFILED: Final = "bench_py_noop_profiled"
ANATOMY: Final = ("bench_py_anatomy", "bench_py_anatomy_raw")
ANATOMY_BATCHES: Final = 100
POLL_SECONDS: Final = 0.01
CATCH_UP_TARGET: Final = 20_000.0
LATENCY_TARGET_MS: Final = 50.0
SCALING_TARGET: Final = 3.0


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def io_name(mode: str, partitions: int) -> str:
    """The I/O-bound processor of a mode (pinned, free) and partition count."""
    return f"bench_py_io_{mode}_{partitions}"


# ---------------------------------------------------------------- specs and setup


def processor_specs(args: argparse.Namespace) -> dict[str, ProjectionSpec]:
    """The projections of this scenario: the SQL references (the benchmark
    fold at --py-batch, per event and set-based; set-based at 500 for the
    latency), a Python processor per --py-handlers entry, the latency
    processor and one I/O-bound processor per --io-partitions count."""
    catalog = load_catalog(CATALOG)
    each, batched = catalog.get("bench_each"), catalog.get("bench_set")
    specs = {
        SQL_EACH: each.model_copy(update={"name": SQL_EACH, "batch_size": args.py_batch}),
        SQL_SET: batched.model_copy(update={"name": SQL_SET, "batch_size": args.py_batch}),
        SQL_LIVE: batched.model_copy(update={"name": SQL_LIVE, "batch_size": 500}),
    }
    for handler in args.py_handlers:
        name = f"bench_py_{handler}"
        specs[name] = python_processor(name, HANDLERS[handler], batch_size=args.py_batch)
    specs[PY_LIVE] = python_processor(PY_LIVE, processor_handlers.record_live, batch_size=500)
    if args.py_profile is not None:
        specs[PY_PROFILED] = python_processor(
            PY_PROFILED, processor_handlers.noop, batch_size=args.py_batch
        )
    for name in ANATOMY:
        # Never run by a daemon: the anatomy replays a batch's statements on it.
        specs[name] = python_processor(name, processor_handlers.noop, batch_size=args.py_batch)
    io_handler: Callable[..., Any] = (
        processor_handlers.io_bound_async if args.io_async else processor_handlers.io_bound
    )
    per_batch_s = args.io_sleep_ms / 1000 * (args.io_batch if args.io_sleep_per == "event" else 1)
    for mode, count in itertools.product(args.io_assign, args.io_partitions):
        name = io_name(mode, count)
        specs[name] = python_processor(
            name,
            io_handler,
            source_events=[IO_TYPE],
            batch_size=args.io_batch,
            partitions=count,
            batch_timeout_seconds=max(30.0, 10 * per_batch_s),
        )
    return specs


def prepare_processors(dsn: str, specs: list[ProjectionSpec]) -> None:
    """Drop earlier bench projections and processors (their rows, read
    models and dead letters) and the handlers' schema; register this run's;
    create the handlers' tables (load/projections/bench_processors.sql)."""
    from aura_pg import migrate  # here: alembic is slow to import in every child process

    migrate.upgrade(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        drop_bench_projections(conn)
        conn.execute("DROP SCHEMA IF EXISTS bench_py CASCADE")
        conn.execute(SCHEMA_SQL.read_bytes())  # a file of the repository, no parameters
    asyncio.run(ProjectorDaemon(dsn, specs).register())


# ---------------------------------------------------------------- the daemon child


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process, all its threads."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int | str) -> list[str] | None:
    """/proc/PID/stat from the field after the command name on (so
    fields[0] is the state, [1] the parent pid, [11:15] utime, stime,
    cutime, cstime), or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def server_root(conn: psycopg.Connection[Any]) -> int | None:
    """The postmaster's pid when the server runs on this machine (the
    parent of this connection's backend), else None."""
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    fields = _stat_fields(int(row[0])) if row else None
    return int(fields[1]) if fields else None


def tree_cpu_seconds(root: int | None) -> float | None:
    """CPU seconds of ``root`` and its children: the live ones' own, and
    the exited ones' (which the root's cutime and cstime hold once
    reaped). For the Postgres server: every backend and background
    process, the benchmark's own connections included."""
    if root is None:
        return None
    fields = _stat_fields(root)
    if fields is None:
        return None
    ticks = sum(int(v) for v in fields[11:15])
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            child = _stat_fields(entry)
            if child is not None and child[1] == str(root):
                ticks += int(child[11]) + int(child[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


def daemon_main(
    dsn: str,
    specs: list[ProjectionSpec],
    settings: dict[str, Any],
    io_settings: tuple[float, bool],
    messages: Any,
    go: MpEvent,
    stop: MpEvent,
    profile: str | None,
    only: str | None,
) -> None:
    """A child process: a projector daemon running ``specs``.

    Sends ("ready", pid) once imported, waits for ``go``, sends ("started",
    time.monotonic()) right before ``daemon.run``, runs until ``stop`` and
    sends ("done", figures): every handler call of this process (began,
    ended, events). With ``profile``, the daemon runs under cProfile (the
    event loop's thread and every thread started after it) and the stats
    go to that file.
    """
    logging.basicConfig(level=logging.WARNING, format="processor: %(levelname)s %(message)s")
    processor_handlers.configure(*io_settings)
    profiles: list[cProfile.Profile] = []
    lock = threading.Lock()

    def profile_thread(*_: Any) -> None:
        # Installed by threading.setprofile: the first event of each new
        # thread starts a profiler of its own there (replacing this hook).
        thread_profile = cProfile.Profile()
        with lock:
            profiles.append(thread_profile)
        thread_profile.enable()

    main_profile = cProfile.Profile() if profile else None
    if main_profile is not None:
        threading.setprofile(profile_thread)
        main_profile.enable()
    try:
        asyncio.run(_daemon(dsn, specs, settings, messages, go, stop, only))
    finally:
        if main_profile is not None and profile is not None:
            main_profile.disable()
            threading.setprofile(None)
            stats = pstats.Stats(main_profile)
            with lock:
                for thread_profile in profiles:
                    stats.add(thread_profile)
            stats.dump_stats(profile)


async def _daemon(
    dsn: str,
    specs: list[ProjectionSpec],
    settings: dict[str, Any],
    messages: Any,
    go: MpEvent,
    stop: MpEvent,
    only: str | None,
) -> None:
    stopping = asyncio.Event()
    daemon = ProjectorDaemon(dsn, specs, ProjectorSettings(**settings))
    if only is not None:
        # --io-pin: this daemon runs one partition row and leaves the others.
        daemon.runners = {name: r for name, r in daemon.runners.items() if name == only}
    messages.put(("ready", os.getpid()))
    await asyncio.to_thread(go.wait)

    async def watch() -> None:
        while not stopping.is_set():
            if stop.is_set():
                stopping.set()
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    messages.put(("started", time.monotonic()))
    try:
        await daemon.run(stopping)
    finally:
        stopping.set()
        await watcher
    messages.put(("done", {"calls": processor_handlers.snapshot()}))


class DaemonChild:
    """One daemon child process, driven from the parent."""

    def __init__(
        self,
        dsn: str,
        specs: list[ProjectionSpec],
        settings: dict[str, Any],
        io_settings: tuple[float, bool] = (0.005, True),
        profile: Path | None = None,
        only: str | None = None,
    ) -> None:
        ctx = mp.get_context("spawn")
        self.messages = ctx.Queue()
        self.go = ctx.Event()
        self.stop_event = ctx.Event()
        self.process = ctx.Process(
            target=daemon_main,
            args=(
                dsn,
                specs,
                settings,
                io_settings,
                self.messages,
                self.go,
                self.stop_event,
                str(profile) if profile else None,
                only,
            ),
        )
        self.pid = 0
        self.started = 0.0

    def start(self) -> None:
        self.process.start()

    def wait_ready(self) -> None:
        """Once the process has imported everything and made its daemon."""
        self.pid = int(self.expect("ready", 120))

    def begin(self) -> None:
        self.go.set()

    def wait_started(self) -> float:
        self.started = float(self.expect("started", 60))
        return self.started

    def expect(self, kind: str, timeout: float) -> Any:
        try:
            got, value = self.messages.get(timeout=timeout)
        except Exception as exc:
            self.kill()
            raise RuntimeError(f"processor daemon: no {kind!r} within {timeout:.0f}s") from exc
        if got != kind:
            self.kill()
            raise RuntimeError(f"processor daemon sent {got!r}, expected {kind!r}")
        return value

    def finish(self, timeout: float = 60) -> dict[str, Any]:
        self.stop_event.set()
        done: dict[str, Any] = self.expect("done", timeout)
        self.process.join(timeout)
        if self.process.exitcode != 0:
            raise RuntimeError(f"processor daemon failed ({self.process.exitcode})")
        return done

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


class RssWatch(threading.Thread):
    """Samples a process's VmRSS every ``interval`` seconds until stopped."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.rss_kb: list[int] = []
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def run(self) -> None:
        while not self._stop_event.is_set():
            rss = proc_status_kb(self.pid, "VmRSS")
            if rss is not None:
                self.rss_kb.append(rss)
            self._stop_event.wait(self.interval)


# ---------------------------------------------------------------- checkpoints


def log_head(conn: psycopg.Connection[Any], event_type: str | None = None) -> tuple[int, int]:
    """The last event of the log in commit order (of ``event_type`` only
    when given), as (transaction_id, global_position)."""
    row = conn.execute(
        # Ordered by the xid8 column, not the text output column of the same name.
        "SELECT e.transaction_id::text AS tx, e.global_position FROM aura.events e "
        "WHERE %(type)s::text IS NULL OR e.type = %(type)s "
        "ORDER BY e.transaction_id DESC, e.global_position DESC LIMIT 1",
        {"type": event_type},
    ).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def checkpoint_of(conn: psycopg.Connection[Any], name: str) -> tuple[int, int]:
    row = conn.execute(
        "SELECT transaction_id::text, global_position FROM aura.projection_checkpoints "
        "WHERE name = %s",
        (name,),
    ).fetchone()
    if row is None:
        raise RuntimeError(f"no checkpoint row named {name!r}")
    return int(row[0]), int(row[1])


def wait_for_checkpoint(
    conn: psycopg.Connection[Any],
    name: str,
    target: tuple[int, int],
    timeout: float,
    child: DaemonChild | None = None,
) -> float:
    """Read the checkpoint every POLL_SECONDS until it reaches ``target``;
    the time.monotonic() at which it was seen there."""
    deadline = time.monotonic() + timeout
    while True:
        if checkpoint_of(conn, name) >= target:
            return time.monotonic()
        if child is not None and not child.process.is_alive():
            raise RuntimeError(f"the daemon running {name} died ({child.process.exitcode})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not reach {target} within {timeout:.0f}s")
        time.sleep(POLL_SECONDS)


# ---------------------------------------------------------------- catch-up


@dataclass
class ProcessorCatchUp:
    projection: str
    kind: str
    handler: str
    batch_size: int
    events: int
    applied: int  # the row's events_applied once caught up
    seconds: float
    events_per_second: float
    rss_start_mib: float
    rss_peak_mib: float
    # CPU seconds from go to caught up: the daemon process (all its
    # threads), and the Postgres server (all its processes, the checkpoint
    # poll's included); None where /proc does not show them.
    daemon_cpu_seconds: float | None
    server_cpu_seconds: float | None
    # From the handler's own timing (Python processors only).
    handler_calls: int | None = None
    start_seconds: float | None = None  # daemon.run to the first handler call
    in_handler_seconds: float | None = None
    between_calls_seconds: float | None = None  # the daemon's own work per batch, summed
    between_calls_p50_ms: float | None = None
    between_calls_max_ms: float | None = None
    tail_seconds: float | None = None  # the last call's return to the checkpoint seen
    handled_events: int | None = None


def handler_breakdown(
    calls: list[tuple[float, float, int]], started: float, finished: float
) -> dict[str, Any]:
    """The handler calls of one catch-up, split into start, in handler,
    between calls and tail (see the module's docstring)."""
    calls = sorted(calls)
    if not calls:
        return {"handler_calls": 0, "handled_events": 0}
    gaps = sorted(nxt[0] - cur[1] for cur, nxt in itertools.pairwise(calls))
    return {
        "handler_calls": len(calls),
        "handled_events": sum(c[2] for c in calls),
        "start_seconds": calls[0][0] - started,
        "in_handler_seconds": sum(c[1] - c[0] for c in calls),
        "between_calls_seconds": sum(gaps),
        "between_calls_p50_ms": percentile(gaps, 0.5) * 1000 if gaps else 0.0,
        "between_calls_max_ms": gaps[-1] * 1000 if gaps else 0.0,
        "tail_seconds": finished - calls[-1][1],
    }


def processor_catch_up(
    dsn: str, spec: ProjectionSpec, head: tuple[int, int], events: int, timeout: float,
    profile: Path | None = None,
) -> ProcessorCatchUp:  # fmt: skip
    """Run ``spec`` alone from checkpoint 0 until its checkpoint is ``head``."""
    settle(dsn)
    child = DaemonChild(dsn, [spec], {"poll_interval": 1.0}, profile=profile)
    child.start()
    child.wait_ready()
    sampler = RssWatch(child.pid)
    sampler.start()
    try:
        while not sampler.rss_kb:
            time.sleep(0.005)
        with psycopg.connect(dsn, autocommit=True) as conn:
            server = server_root(conn)
            daemon_before = cpu_seconds(child.pid)
            server_before = tree_cpu_seconds(server)
            child.begin()
            started = child.wait_started()
            finished = wait_for_checkpoint(conn, spec.name, head, timeout, child)
            daemon_after = cpu_seconds(child.pid)
            server_after = tree_cpu_seconds(server)
            row = conn.execute(
                "SELECT events_applied FROM aura.projection_checkpoints WHERE name = %s",
                (spec.name,),
            ).fetchone()
            applied = int(row[0]) if row else -1
    except BaseException:
        child.kill()
        raise
    finally:
        sampler.stop()
    done = child.finish()
    seconds = finished - started
    kind = spec.kind
    result = ProcessorCatchUp(
        projection=spec.name,
        kind=kind if kind == "python" else f"sql {spec.handler_kind}",
        handler=str(spec.handler),
        batch_size=spec.batch_size,
        events=events,
        applied=applied,
        seconds=seconds,
        events_per_second=events / seconds,
        rss_start_mib=sampler.rss_kb[0] / MIB,
        rss_peak_mib=max(sampler.rss_kb) / MIB,
        daemon_cpu_seconds=(
            daemon_after - daemon_before
            if daemon_after is not None and daemon_before is not None
            else None
        ),
        server_cpu_seconds=(
            server_after - server_before
            if server_after is not None and server_before is not None
            else None
        ),
    )
    if kind == "python":
        for key, value in handler_breakdown(done["calls"], started, finished).items():
            setattr(result, key, value)
    return result


def print_catch_up_header() -> None:
    print(
        f"{'projection':<22} {'kind':<14} {'batch':>5} {'events':>7} {'seconds':>7} "
        f"{'events/s':>8} {'calls':>6} {'start s':>7} {'handler s':>9} {'between s':>9} "
        f"{'between p50/max ms':>18} {'tail s':>6} {'daemon/server CPU s':>19}  "
        f"{'RSS MiB start/peak':>18}"
    )


def _opt(value: float | None, fmt: str) -> str:
    return format(value, fmt) if value is not None else "-"


def print_catch_up(r: ProcessorCatchUp) -> None:
    between = (
        f"{r.between_calls_p50_ms:.1f}/{r.between_calls_max_ms:.1f}"
        if r.between_calls_p50_ms is not None and r.between_calls_max_ms is not None
        else "-"
    )
    print(
        f"{r.projection:<22} {r.kind:<14} {r.batch_size:>5} {r.events:>7} {r.seconds:>7.2f} "
        f"{r.events_per_second:>8.0f} {_opt(r.handler_calls, 'd'):>6} "
        f"{_opt(r.start_seconds, '.2f'):>7} {_opt(r.in_handler_seconds, '.2f'):>9} "
        f"{_opt(r.between_calls_seconds, '.2f'):>9} {between:>18} "
        f"{_opt(r.tail_seconds, '.2f'):>6} "
        f"{_opt(r.daemon_cpu_seconds, '.2f') + '/' + _opt(r.server_cpu_seconds, '.2f'):>19}  "
        f"{f'{r.rss_start_mib:.1f}/{r.rss_peak_mib:.1f}':>18}",
        flush=True,
    )


def print_profile(path: Path, limit: int = 25) -> None:
    """The functions of a profile with the most time of their own, and
    with the most time in all (wall clock: a thread waiting counts)."""
    out = io.StringIO()
    stats = pstats.Stats(str(path), stream=out)
    stats.sort_stats("tottime").print_stats(limit)
    print(
        f"\ncProfile of a no-op catch-up daemon ({PY_PROFILED}, measured apart: {path}; every "
        "thread), by time of their own:"
    )
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip()))
    out = io.StringIO()
    stats = pstats.Stats(str(path), stream=out)
    stats.sort_stats("cumulative").print_stats(limit)
    print("by cumulative time:")
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip()))


# ---------------------------------------------------------------- latency


@dataclass
class ProcessorLatency:
    projection: str
    kind: str
    target_rate: float
    achieved_rate: float
    events: int
    end_point: str  # "handler commit record" or "handler clock_timestamp()"
    # From the event's recorded_at (its append statement's start).
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    # From the append's commit record (None without track_commit_timestamp).
    from_commit_p50_ms: float | None
    from_commit_p95_ms: float | None
    from_commit_p99_ms: float | None
    # From the writer's wall time right after its append returned.
    from_return_p50_ms: float
    from_return_p95_ms: float
    from_return_min_ms: float
    # The handler calls during the run (Python processors only).
    handler_calls: int | None = None
    events_per_call: float | None = None
    handler_p50_ms: float | None = None
    # From one handler call's start to the next one's: a batch's whole
    # cycle while events keep coming (read, handler, advance, commit, the
    # wake-up), idle waits included.
    call_interval_p50_ms: float | None = None
    call_interval_p95_ms: float | None = None


LIVE_PYTHON: Final = """
SELECT l.stream_id,
       extract(epoch FROM max(e.recorded_at))::float8,
       extract(epoch FROM max({append_commit}))::float8,
       extract(epoch FROM max({end_point}))::float8
FROM bench_py.live l JOIN aura.events e ON e.event_id = l.event_id
WHERE l.stream_id LIKE %s
GROUP BY l.stream_id
"""
LIVE_SQL: Final = """
SELECT s.stream_id,
       extract(epoch FROM max(e.recorded_at))::float8,
       extract(epoch FROM max({append_commit}))::float8,
       extract(epoch FROM max({end_point}))::float8
FROM {schema}.streams s JOIN aura.events e ON e.stream_id = s.stream_id
WHERE s.stream_id LIKE %s
GROUP BY s.stream_id
"""


def processor_latency(
    dsn: str,
    spec: ProjectionSpec,
    rate: float,
    duration: float,
    writers: int,
    batch: int,
    timeout: float,
) -> ProcessorLatency:
    """``spec`` in a daemon (log watcher + poll 1 s), caught up, while
    writers append at ``rate``; per event, from append to the handler's
    commit (see the module's docstring)."""
    settle(dsn)
    child = DaemonChild(dsn, [spec], {"poll_interval": 1.0, "wake": "watch"})
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(writers + 1)
    results = ctx.Queue()
    prefix = f"plive{uuid.uuid4().hex[:6]}"
    processes = [
        ctx.Process(
            target=latency_writer,
            args=(
                with_notify(dsn, False),
                prefix,
                w,
                writers,
                rate / writers,
                duration,
                batch,
                barrier,
                results,
            ),
        )
        for w in range(writers)
    ]
    child.start()
    child.wait_ready()
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            child.begin()
            child.wait_started()
            for process in processes:
                process.start()
            wait_for_checkpoint(conn, spec.name, log_head(conn), timeout, child)
            barrier.wait(timeout=120)
            live_from = time.monotonic()
            records = [r for _ in processes for r in results.get(timeout=duration + 120)]
            for process in processes:
                process.join()
                if process.exitcode != 0:
                    raise RuntimeError(f"latency writer failed ({process.exitcode})")
            wait_for_checkpoint(conn, spec.name, log_head(conn), 60, child)
        done = child.finish()
    finally:
        barrier.abort()
        for process in processes:
            if process.is_alive():
                process.join(10)
        child.kill()

    with psycopg.connect(dsn, autocommit=True) as conn:
        tracked = conn.execute("SHOW track_commit_timestamp").fetchone()
        committed = bool(tracked and tracked[0] == "on")
        python = spec.is_python
        alias = "l" if python else "s"
        end_point = (
            sql.SQL("pg_xact_commit_timestamp({}.xmin)").format(sql.Identifier(alias))
            if committed
            else sql.SQL("{}.applied_at").format(sql.Identifier(alias))
        )
        append_commit = (
            sql.SQL("pg_xact_commit_timestamp(e.xmin)")
            if committed
            else sql.SQL("NULL::timestamptz")
        )
        query = (
            sql.SQL(LIVE_PYTHON).format(end_point=end_point, append_commit=append_commit)
            if python
            else sql.SQL(LIVE_SQL).format(
                end_point=end_point,
                append_commit=append_commit,
                schema=sql.Identifier(spec.read_model_schema),
            )
        )
        rows = conn.execute(query, (prefix + "-%",)).fetchall()
    applied = {row[0]: (row[1], row[2], row[3]) for row in rows}
    missing = [stream for stream, _, _ in records if stream not in applied]
    if missing:
        raise RuntimeError(f"{len(missing)} appends never reached {spec.name}")
    weighted = [(applied[stream], returned, count) for stream, returned, count in records]
    from_recorded = sorted(
        (end - recorded) * 1000 for (recorded, _, end), _, n in weighted for _ in range(n)
    )
    from_commit = sorted(
        (end - commit) * 1000
        for (_, commit, end), _, n in weighted
        if commit is not None
        for _ in range(n)
    )
    from_return = sorted(
        (end - returned) * 1000 for (_, _, end), returned, n in weighted for _ in range(n)
    )
    result = ProcessorLatency(
        projection=spec.name,
        kind="python" if python else f"sql {spec.handler_kind}",
        target_rate=rate,
        achieved_rate=len(from_recorded) / duration,
        events=len(from_recorded),
        end_point="handler commit record" if committed else "handler clock_timestamp()",
        p50_ms=percentile(from_recorded, 0.50),
        p95_ms=percentile(from_recorded, 0.95),
        p99_ms=percentile(from_recorded, 0.99),
        max_ms=from_recorded[-1],
        from_commit_p50_ms=percentile(from_commit, 0.50) if committed else None,
        from_commit_p95_ms=percentile(from_commit, 0.95) if committed else None,
        from_commit_p99_ms=percentile(from_commit, 0.99) if committed else None,
        from_return_p50_ms=percentile(from_return, 0.50),
        from_return_p95_ms=percentile(from_return, 0.95),
        from_return_min_ms=from_return[0],
    )
    if python:
        live_calls = sorted(c for c in done["calls"] if c[0] >= live_from)
        intervals = sorted(b[0] - a[0] for a, b in itertools.pairwise(live_calls))
        if intervals:
            result.call_interval_p50_ms = percentile(intervals, 0.5) * 1000
            result.call_interval_p95_ms = percentile(intervals, 0.95) * 1000
        result.handler_calls = len(live_calls)
        result.events_per_call = sum(c[2] for c in live_calls) / max(len(live_calls), 1)
        result.handler_p50_ms = (
            percentile(sorted(c[1] - c[0] for c in live_calls), 0.5) * 1000 if live_calls else None
        )
    return result


def print_latency_header() -> None:
    print(
        f"{'projection':<16} {'kind':<14} {'events/s':>8} {'events':>6} {'p50 ms':>7} "
        f"{'p95 ms':>7} {'p99 ms':>7} {'max ms':>7}  {'from commit p50/p95/p99':>23}  "
        f"{'from return p50/p95/min':>23} {'calls':>6} {'ev/call':>7} {'call p50 ms':>11} "
        f"{'call to call p50/p95 ms':>23}"
    )


def print_latency(r: ProcessorLatency) -> None:
    from_commit = (
        f"{r.from_commit_p50_ms:.1f}/{r.from_commit_p95_ms:.1f}/{r.from_commit_p99_ms:.1f}"
        if r.from_commit_p50_ms is not None and r.from_commit_p95_ms is not None
        and r.from_commit_p99_ms is not None
        else "n/a"
    )  # fmt: skip
    from_return = (
        f"{r.from_return_p50_ms:.1f}/{r.from_return_p95_ms:.1f}/{r.from_return_min_ms:.1f}"
    )
    print(
        f"{r.projection:<16} {r.kind:<14} {r.achieved_rate:>8.0f} {r.events:>6} "
        f"{r.p50_ms:>7.1f} {r.p95_ms:>7.1f} {r.p99_ms:>7.1f} {r.max_ms:>7.1f}  "
        f"{from_commit:>23}  {from_return:>23} {_opt(r.handler_calls, 'd'):>6} "
        f"{_opt(r.events_per_call, '.1f'):>7} {_opt(r.handler_p50_ms, '.1f'):>11} "
        f"{_opt(r.call_interval_p50_ms, '.1f') + '/' + _opt(r.call_interval_p95_ms, '.1f'):>23}",
        flush=True,
    )


# ---------------------------------------------------------------- I/O-bound


@dataclass
class IoRun:
    projection: str
    partitions: int
    daemons: int
    window_seconds: float
    events: int  # handled in batches finished in the window
    events_per_second: float
    per_partition_events: list[int]
    # How many partitions each daemon held in the window (owners of the
    # partition rows), largest first.
    partitions_per_daemon: list[int]
    ran_dry: list[int]  # partitions that had nothing left before the window's end
    duplicates: int  # events handled twice (over the whole run)
    daemon_cpu_seconds: float  # all daemons, in the window
    # The Postgres server (every process of it), in the window; None when
    # it does not run on this machine.
    server_cpu_seconds: float | None
    # Share of all CPUs busy in the window: everything on the machine,
    # other users' processes included.
    machine_busy: float
    warmup_seconds: float  # go to every partition's first batch
    pinned: bool  # each daemon ran one partition, not any it could take
    connections: int  # to the database at the window's end, the benchmark's own excluded
    in_handler_share: float = 0.0  # of the daemons' wall time in the window, inside handlers
    batches: int = 0
    per_daemon_events: list[int] = field(default_factory=list)


def partition_rows(spec: ProjectionSpec, partitions: int) -> list[str]:
    return [spec.name] if partitions == 1 else [f"{spec.name}/{i}" for i in range(partitions)]


def io_backlog(conn: psycopg.Connection[Any], partitions: int) -> list[int]:
    """IO_WORK events in the log per partition."""
    counts = [0] * partitions
    for index, count in conn.execute(
        "SELECT aura.stream_partition(stream_id, %s), count(*) FROM aura.events "
        "WHERE type = %s GROUP BY 1",
        (partitions, IO_TYPE),
    ).fetchall():
        counts[int(index)] = int(count)
    return counts


def io_run(
    dsn: str,
    spec: ProjectionSpec,
    partitions: int,
    window: float,
    io_settings: tuple[float, bool],
    warmup_timeout: float,
    pin: bool = False,
) -> IoRun:
    """``partitions`` daemon processes running ``spec`` together; the
    events of the batches they finish in ``window`` seconds once every
    partition is under way."""
    settle(dsn)
    rows = partition_rows(spec, partitions)
    children = [
        DaemonChild(
            dsn,
            [spec],
            {"poll_interval": 1.0, "wake": "watch"},
            io_settings,
            only=rows[index] if pin else None,
        )
        for index in range(partitions)
    ]
    with psycopg.connect(dsn, autocommit=True) as conn:
        server = server_root(conn)
        conn.execute("TRUNCATE bench_py.io_batches")
        backlog = io_backlog(conn, partitions)
        try:
            for child in children:
                child.start()
            for child in children:
                child.wait_ready()
            began = time.monotonic()
            for child in children:
                child.begin()
            for child in children:
                child.wait_started()
            deadline = time.monotonic() + warmup_timeout
            while True:
                row = conn.execute(
                    "SELECT count(DISTINCT aura.stream_partition(first_stream, %s)) "
                    "FROM bench_py.io_batches",
                    (partitions,),
                ).fetchone()
                if row and row[0] == partitions:
                    break
                if any(not child.process.is_alive() for child in children):
                    raise RuntimeError(f"a daemon running {spec.name} died")
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{spec.name}: {row[0] if row else 0} of {partitions} partitions "
                        f"under way after {warmup_timeout:.0f}s"
                    )
                time.sleep(0.05)
            warmup = time.monotonic() - began
            cpu_before = [cpu_seconds(child.pid) or 0.0 for child in children]
            server_before = tree_cpu_seconds(server)
            busy_before, total_before = machine_ticks()
            start_row = conn.execute("SELECT clock_timestamp()").fetchone()
            window_from = time.monotonic()
            time.sleep(window)
            end_row = conn.execute("SELECT clock_timestamp()").fetchone()
            window_to = time.monotonic()
            cpu_after = [cpu_seconds(child.pid) or 0.0 for child in children]
            server_after = tree_cpu_seconds(server)
            busy_after, total_after = machine_ticks()
            found = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid()"
            ).fetchone()
            connections = int(found[0]) if found else -1
            owners = conn.execute(
                "SELECT owner, count(*) FROM aura.projection_checkpoints "
                "WHERE name = ANY(%s) GROUP BY owner ORDER BY 2 DESC",
                (rows,),
            ).fetchall()
            # A stopping daemon finishes its batch in flight: every batch
            # finished in the window has committed once they have stopped.
            done = [child.finish() for child in children]
        except BaseException:
            for child in children:
                child.kill()
            raise
        assert start_row is not None
        assert end_row is not None
        window_start, window_end = start_row[0], end_row[0]
        per_partition = [0] * partitions
        handled_by_end = [0] * partitions
        per_pid: dict[int, int] = {}
        for index, pid, events, in_window in conn.execute(
            "SELECT aura.stream_partition(first_stream, %s), pid, events, "
            "done_at > %s AND done_at <= %s FROM bench_py.io_batches WHERE done_at <= %s",
            (partitions, window_start, window_end, window_end),
        ).fetchall():
            handled_by_end[int(index)] += int(events)
            if in_window:
                per_partition[int(index)] += int(events)
                per_pid[int(pid)] = per_pid.get(int(pid), 0) + int(events)
        row = conn.execute(
            "SELECT count(*) - count(DISTINCT u.event_id) "
            "FROM bench_py.io_batches b, unnest(b.event_ids) AS u(event_id)"
        ).fetchone()
        duplicates = int(row[0]) if row else -1
    seconds = (window_end - window_start).total_seconds()
    in_handler = 0.0
    batches = 0
    for figures in done:
        for began_at, ended_at, _ in figures["calls"]:
            overlap = min(ended_at, window_to) - max(began_at, window_from)
            if overlap > 0:
                in_handler += overlap
                batches += 1
    events = sum(per_partition)
    return IoRun(
        projection=spec.name,
        partitions=partitions,
        daemons=len(children),
        window_seconds=seconds,
        events=events,
        events_per_second=events / seconds,
        per_partition_events=per_partition,
        partitions_per_daemon=[int(count) for _, count in owners],
        ran_dry=[i for i in range(partitions) if handled_by_end[i] >= backlog[i]],
        duplicates=duplicates,
        daemon_cpu_seconds=sum(
            after - before for before, after in zip(cpu_before, cpu_after, strict=True)
        ),
        server_cpu_seconds=(
            server_after - server_before
            if server_after is not None and server_before is not None
            else None
        ),
        machine_busy=(busy_after - busy_before) / max(total_after - total_before, 1),
        warmup_seconds=warmup,
        pinned=pin,
        connections=connections,
        in_handler_share=in_handler / (partitions * (window_to - window_from)),
        batches=batches,
        per_daemon_events=sorted(per_pid.values(), reverse=True),
    )


def print_io_header() -> None:
    print(
        f"{'projection':<22} {'partitions':>10} {'daemons':>7} {'window s':>8} {'events':>7} "
        f"{'events/s':>8} {'batches':>7} {'in handler':>10} {'daemon CPU s':>12} "
        f"{'server CPU s':>12} {'machine busy':>12} {'warm-up s':>9} {'conns':>5}  "
        "partitions per daemon / events per partition"
    )


def print_io(r: IoRun) -> None:
    print(
        f"{r.projection:<22} {r.partitions:>10} {r.daemons:>7} {r.window_seconds:>8.1f} "
        f"{r.events:>7} {r.events_per_second:>8.1f} {r.batches:>7} "
        f"{r.in_handler_share:>10.0%} {r.daemon_cpu_seconds:>12.2f} "
        f"{_opt(r.server_cpu_seconds, '.2f'):>12} {r.machine_busy:>12.0%} "
        f"{r.warmup_seconds:>9.1f} {r.connections:>5}  "
        f"{'/'.join(map(str, r.partitions_per_daemon))} / "
        f"{' '.join(map(str, r.per_partition_events))}"
        + (f"  RAN DRY: partitions {r.ran_dry}" if r.ran_dry else "")
        + (f"  DUPLICATES: {r.duplicates}" if r.duplicates else ""),
        flush=True,
    )


# ---------------------------------------------------------------- batch anatomy

ANATOMY_STEPS: Final = ("begin", "batch", "fetch", "decode", "advance", "commit", "total")


@dataclass
class Anatomy:
    """One no-op batch's statements, replayed step by step on a scratch
    processor: median milliseconds per step; the same with data and
    metadata fetched as text (no JSON decoding)."""

    batches: int
    events: int
    decoded_ms: dict[str, float]
    raw_ms: dict[str, float]
    decoded_events_per_second: float
    raw_events_per_second: float


class _Replay:
    """What the daemon does for a sync processor's batch
    (aura_pg/projection/processor.py), on a scratch processor row: BEGIN;
    aura.processor_batch; fetch the rows (psycopg decodes data and
    metadata, jsonb, with json.loads); a RecordedEvent per row (upcast
    included); aura.advance_processor; COMMIT. Each step timed; ``raw``:
    jsonb loaded as text instead, so no JSON decoding."""

    def __init__(self, conn: psycopg.Connection[Any], name: str, raw: bool) -> None:
        self.conn = conn
        self.raw = raw
        if raw:
            conn.adapters.register_loader("jsonb", TextLoader)
        else:
            set_json_loads(json_loads, conn)  # as the daemon's batch connections
        row = conn.execute(
            "SELECT generation FROM aura.projection_checkpoints WHERE name = %s", (name,)
        ).fetchone()
        self.at: dict[str, Any] = {
            "name": name,
            "transaction_id": "0",
            "position": 0,
            "owner": None,  # the scratch row has no owner
            "generation": row[0] if row else None,
            "limit": None,
        }
        self.steps: dict[str, list[float]] = {step: [] for step in ANATOMY_STEPS}
        self.events = 0

    def batch(self) -> int:
        """One batch; how many events it had."""
        conn, at = self.conn, self.at
        t0 = time.perf_counter()
        with conn.transaction():
            t1 = time.perf_counter()
            cur = conn.execute(processor_queries()["batch"], at)
            t2 = time.perf_counter()
            rows = cur.fetchall()
            t3 = time.perf_counter()
            if self.raw:
                count = sum(1 for r in rows if r[7] is not None)
            else:
                count = len([recorded_event(r[5:]) for r in rows if r[7] is not None])
            t4 = time.perf_counter()
            next_at = {**at, "transaction_id": rows[0][0], "position": rows[0][1]}
            conn.execute(
                processor_queries()["advance"],
                {
                    **at,
                    "next_transaction_id": next_at["transaction_id"],
                    "next_position": next_at["position"],
                    "applied": count,
                    "last_position": None,
                    "last_recorded_at": None,
                },
            ).fetchone()
            t5 = time.perf_counter()
        t6 = time.perf_counter()
        self.at = next_at
        if count:
            self.events += count
            for step, seconds in zip(
                ANATOMY_STEPS,
                (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t6 - t0),
                strict=True,
            ):
                self.steps[step].append(seconds)
        return count


def batch_anatomy(dsn: str, batches: int) -> Anatomy:
    """Up to ``batches`` batches of each replay, taking turns (so that
    whatever else the machine does weighs on both alike)."""
    settle(dsn)
    with (
        psycopg.connect(dsn, autocommit=True) as decoded_conn,
        psycopg.connect(dsn, autocommit=True) as raw_conn,
    ):
        decoded = _Replay(decoded_conn, ANATOMY[0], raw=False)
        raw = _Replay(raw_conn, ANATOMY[1], raw=True)
        for _ in range(batches):
            if not decoded.batch() + raw.batch():
                break

    def medians(steps: dict[str, list[float]]) -> dict[str, float]:
        return {k: percentile(sorted(v), 0.5) * 1000 for k, v in steps.items()}

    return Anatomy(
        batches=len(decoded.steps["total"]),
        events=decoded.events,
        decoded_ms=medians(decoded.steps),
        raw_ms=medians(raw.steps),
        decoded_events_per_second=decoded.events / max(sum(decoded.steps["total"]), 1e-9),
        raw_events_per_second=raw.events / max(sum(raw.steps["total"]), 1e-9),
    )


def print_anatomy(a: Anatomy) -> None:
    print(
        f"\nanatomy of a no-op batch ({a.batches} batches, {a.events} events: the daemon's "
        "statements for a sync processor replayed step by step in this process, median ms):"
    )
    print(f"{'':<34} " + " ".join(f"{step:>8}" for step in ANATOMY_STEPS) + f" {'events/s':>9}")
    for label, ms, rate in (
        ("as the daemon does it", a.decoded_ms, a.decoded_events_per_second),
        ("jsonb as text (no JSON decoding)", a.raw_ms, a.raw_events_per_second),
    ):
        print(
            f"{label:<34} " + " ".join(f"{ms[step]:>8.2f}" for step in ANATOMY_STEPS)
            + f" {rate:>9.0f}"
        )  # fmt: skip
    print(
        "(batch: aura.processor_batch until its result arrives; fetch: building the rows, "
        "JSON decoding of data and metadata included; decode: RecordedEvent and upcasting)"
    )


# ---------------------------------------------------------------- checks


def check_inserted(conn: psycopg.Connection[Any], table: str) -> int:
    """Rows of bench_py.TABLE that are not exactly the events of the log
    (each once), both ways."""
    query = sql.SQL(
        "SELECT count(*) FROM ("
        "(SELECT event_id, stream_id, version, type, global_position FROM {table} "
        " EXCEPT ALL SELECT event_id, stream_id, version, type, global_position FROM aura.events)"
        " UNION ALL "
        "(SELECT event_id, stream_id, version, type, global_position FROM aura.events "
        " EXCEPT ALL SELECT event_id, stream_id, version, type, global_position FROM {table})"
        ") d"
    ).format(table=sql.Identifier("bench_py", table))
    row = conn.execute(query).fetchone()
    return int(row[0]) if row else -1


# ---------------------------------------------------------------- the scenario


def run_processors(args: argparse.Namespace, dsn: str) -> dict[str, Any]:
    """The Python processors scenario; its figures (with "problems")."""
    specs = processor_specs(args)
    prepare_processors(dsn, list(specs.values()))
    problems: list[str] = []
    with psycopg.connect(dsn) as conn:
        found = conn.execute(
            "SELECT count(*) FROM aura.events WHERE type <> %s", (IO_TYPE,)
        ).fetchone()
        have = int(found[0]) if found else 0
    if have < args.events:
        load = load_events(
            dsn, args.events - have, args.load_batch, args.streams, args.load_writers
        )
        print(
            f"loaded {load.events} events ({load.batch}-event appends over {load.streams} "
            f"streams, {load.writers} writer processes) in {load.seconds:.1f} s: "
            f"{load.events_per_second:.0f} events/s",
            flush=True,
        )
    with psycopg.connect(dsn, autocommit=True) as conn:
        # Earlier IO_WORK events (a --dsn run) are part of the log too.
        row = conn.execute("SELECT count(*) FROM aura.events").fetchone()
        log_events = int(row[0]) if row else 0
        head = log_head(conn)

    print(
        f"\nPython processors: catch-up of {log_events} events from checkpoint 0 "
        "(ProjectorDaemon in a child process, timed from daemon.run to the checkpoint at the "
        f"log's last event, read every {POLL_SECONDS * 1000:.0f} ms; the SQL fold first, as the "
        "reference)"
    )
    timeout = max(300.0, log_events / 200)
    print_catch_up_header()
    catch_ups: list[ProcessorCatchUp] = []
    names = [SQL_EACH, SQL_SET, *(f"bench_py_{h}" for h in args.py_handlers)]
    if args.py_profile is not None:
        # Measured apart: cProfile slows the daemon down.
        args.py_profile.mkdir(parents=True, exist_ok=True)
        names.append(PY_PROFILED)
    for name in names:
        profile = args.py_profile / f"{name}.prof" if name == PY_PROFILED else None
        result = processor_catch_up(dsn, specs[name], head, log_events, timeout, profile)
        catch_ups.append(result)
        print_catch_up(result)
        if result.applied != log_events:
            problems.append(f"{name}: applied {result.applied} events, the log holds {log_events}")
        if result.handled_events is not None and result.handled_events != log_events:
            problems.append(
                f"{name}: the handler got {result.handled_events} events, the log holds "
                f"{log_events}"
            )
    problems += verify(dsn, [specs[SQL_EACH].read_model_schema, specs[SQL_SET].read_model_schema])
    by_name = {r.projection: r for r in catch_ups}
    each, batched = by_name[SQL_EACH], by_name[SQL_SET]
    for r in catch_ups[2:]:
        if r.projection == PY_PROFILED:
            continue
        print(
            f"{r.projection}: {r.events_per_second / batched.events_per_second:.2f}x {SQL_SET} "
            f"(SQL set-based), {r.events_per_second / each.events_per_second:.2f}x {SQL_EACH} "
            "(SQL per event)"
        )
    with psycopg.connect(dsn, autocommit=True) as conn:
        for handler, table in HANDLER_TABLES.items():
            if handler in args.py_handlers:
                count = check_inserted(conn, table)
                if count:
                    problems.append(f"bench_py.{table}: {count} rows differ from aura.events")
                else:
                    print(f"bench_py.{table} = the log's {log_events} events, each once")
    anatomy = batch_anatomy(dsn, ANATOMY_BATCHES)
    print_anatomy(anatomy)
    if args.py_profile is not None:
        print_profile(args.py_profile / f"{PY_PROFILED}.prof")

    print(
        f"\nPython processors: end-to-end latency at {args.rate:.0f} events/s for "
        f"{args.duration:.0f} s ({args.latency_writers} writer processes, {args.latency_batch}"
        "-event appends, each to a new stream; log watcher + poll 1 s; batch 500): a Python "
        "processor inserting one row per event, then the SQL set-based fold measured the same "
        "way. Per event, to the commit record of the handler's transaction (the checkpoint's), "
        "from: the event's recorded_at (p50..max), the append's commit record, the writer's "
        "wall time after its append returned"
    )
    print_latency_header()
    latencies: list[ProcessorLatency] = []
    for name in (PY_LIVE, SQL_LIVE):
        latency = processor_latency(
            dsn,
            specs[name],
            args.rate,
            args.duration,
            args.latency_writers,
            args.latency_batch,
            timeout,
        )
        latencies.append(latency)
        print_latency(latency)
    if latencies[0].end_point != "handler commit record":
        print(
            "(track_commit_timestamp is off on this server: the end point is the handler's "
            "clock_timestamp() before its commit, and 'from commit' is n/a)"
        )
    problems += verify(dsn, [specs[SQL_LIVE].read_model_schema])

    io_settings = (args.io_sleep_ms / 1000, args.io_sleep_per == "event")
    with psycopg.connect(dsn, autocommit=True) as conn:
        found = conn.execute(
            "SELECT count(*) FROM aura.events WHERE type = %s", (IO_TYPE,)
        ).fetchone()
        have_io = int(found[0]) if found else 0
    if have_io < args.io_events:
        load = load_events(
            dsn,
            args.io_events - have_io,
            args.load_batch,
            args.io_streams,
            args.load_writers,
            event_type=IO_TYPE,
        )
        print(
            f"\nloaded {load.events} {IO_TYPE} events over {load.streams} streams in "
            f"{load.seconds:.1f} s"
        )
    print(
        f"\nPython processors, I/O-bound: the handler sleeps {args.io_sleep_ms:g} ms per "
        f"{args.io_sleep_per} ({'asyncio.sleep' if args.io_async else 'time.sleep'}), batch "
        f"{args.io_batch}, source_events {IO_TYPE}; N partitions over N daemon processes "
        "started together, each running one partition (pinned) or taking any free one, as "
        "deployed daemons do (free); "
        f"events of the batches finished in a {args.io_window:g} s window once every partition "
        "is under way. 'in handler': share of the partitions' wall time in the window spent "
        "inside the handler"
    )
    print_io_header()
    io_runs: list[IoRun] = []
    for mode in args.io_assign:
        mode_runs: list[IoRun] = []
        for count in args.io_partitions:
            io_result = io_run(
                dsn,
                specs[io_name(mode, count)],
                count,
                args.io_window,
                io_settings,
                timeout,
                pin=mode == "pinned",
            )
            mode_runs.append(io_result)
            print_io(io_result)
            if io_result.duplicates:
                problems.append(
                    f"{io_result.projection}: {io_result.duplicates} events handled twice"
                )
        base = mode_runs[0]
        for run in mode_runs[1:]:
            print(
                f"{run.projection}: {run.events_per_second / base.events_per_second:.2f}x "
                f"{base.projection} ({run.partitions}/{base.partitions} partitions)"
            )
        io_runs += mode_runs

    print_targets(catch_ups, latencies, io_runs, anatomy)
    return {
        "log_events": log_events,
        "catch_up": [asdict(r) for r in catch_ups],
        "anatomy": asdict(anatomy),
        "latency": [asdict(r) for r in latencies],
        "io": [asdict(r) for r in io_runs],
        "problems": problems,
    }


def print_targets(
    catch_ups: list[ProcessorCatchUp],
    latencies: list[ProcessorLatency],
    io_runs: list[IoRun],
    anatomy: Anatomy,
) -> None:
    """PASS or MISS per target; with each MISS, the figures that show where
    the time went."""
    print("\ntargets (Python processors):")
    noop = next((r for r in catch_ups if r.projection == "bench_py_noop"), None)
    if noop is not None:
        ok = noop.events_per_second >= CATCH_UP_TARGET
        print(
            f"  no-op catch-up >= {CATCH_UP_TARGET:.0f} events/s: {noop.events_per_second:.0f} "
            f"events/s ({noop.events} events in {noop.seconds:.2f} s): {verdict(ok)}"
        )
        if not ok and noop.handler_calls:
            per_batch = (noop.between_calls_seconds or 0.0) / max(noop.handler_calls - 1, 1)
            print(
                f"    where the time went: start {noop.start_seconds:.2f} s (registration, "
                f"connection, ownership, first batch read), inside the handler "
                f"{noop.in_handler_seconds:.2f} s, between handler calls "
                f"{noop.between_calls_seconds:.2f} s over {noop.handler_calls} batches "
                f"({per_batch * 1000:.1f} ms per batch: reading and decoding the next batch, "
                f"advancing the checkpoint, committing), tail {noop.tail_seconds:.2f} s; "
                f"CPU: the daemon {_opt(noop.daemon_cpu_seconds, '.2f')} s, the server "
                f"{_opt(noop.server_cpu_seconds, '.2f')} s in {noop.seconds:.2f} s"
            )
            dec, raw = anatomy.decoded_ms, anatomy.raw_ms
            print(
                f"    a batch's steps (anatomy, median): aura.processor_batch {dec['batch']:.1f} "
                f"ms, fetching the rows {dec['fetch']:.1f} ms ({raw['fetch']:.1f} ms of it without "
                f"JSON decoding), RecordedEvent {dec['decode']:.1f} ms, advance "
                f"{dec['advance']:.1f} ms, commit {dec['commit']:.1f} ms: "
                f"{anatomy.decoded_events_per_second:.0f} events/s for the statements alone, "
                f"{anatomy.raw_events_per_second:.0f} without JSON decoding"
            )
    python, reference = latencies[0], latencies[1]
    ok = python.p95_ms < LATENCY_TARGET_MS
    print(
        f"  end-to-end p95 < {LATENCY_TARGET_MS:.0f} ms at {python.target_rate:.0f} events/s "
        f"(recorded_at to the {python.end_point}): {python.p95_ms:.1f} ms at "
        f"{python.achieved_rate:.0f} events/s ({reference.projection}, SQL, the same way: "
        f"{reference.p95_ms:.1f} ms): {verdict(ok)}"
    )
    if not ok:
        dec = anatomy.decoded_ms
        print(
            f"    the handler ran {python.handler_calls} times, "
            f"{_opt(python.events_per_call, '.1f')} events per call, "
            f"{_opt(python.handler_p50_ms, '.1f')} ms per call at the median; from one call "
            f"to the next {_opt(python.call_interval_p50_ms, '.1f')} ms at the median, "
            f"{_opt(python.call_interval_p95_ms, '.1f')} at the p95 (a batch's cycle); a "
            f"batch's fixed statements (anatomy, median): BEGIN {dec['begin']:.1f}, "
            f"aura.processor_batch {dec['batch']:.1f} (500 events), advance "
            f"{dec['advance']:.1f}, commit {dec['commit']:.1f} ms, each a round trip"
        )
    for pinned in (True, False):
        by_count = {r.partitions: r for r in io_runs if r.pinned == pinned}
        one, four = by_count.get(1), by_count.get(4)
        if one is None or four is None:
            continue
        ratio = four.events_per_second / one.events_per_second
        ok = ratio >= SCALING_TARGET and not four.ran_dry and not one.ran_dry
        print(
            f"  I/O-bound, 4 partitions >= {SCALING_TARGET:.0f}x 1 partition "
            f"({'pinned' if pinned else 'free'}): {ratio:.2f}x "
            f"({four.events_per_second:.0f} against {one.events_per_second:.0f} events/s): "
            f"{verdict(ok)}"
        )
        if not ok:
            for r in (one, four):
                print(
                    f"    {r.projection}: partitions per daemon "
                    f"{'/'.join(map(str, r.partitions_per_daemon))}, events per partition "
                    f"{r.per_partition_events}, inside the handler {r.in_handler_share:.0%} of "
                    f"the partitions' time, CPU: the daemons {r.daemon_cpu_seconds:.2f} s, the "
                    f"server {_opt(r.server_cpu_seconds, '.2f')} s in {r.window_seconds:.1f} s, "
                    f"machine busy {r.machine_busy:.0%}"
                    + (f", ran dry: {r.ran_dry}" if r.ran_dry else "")
                )
    if not any(r.partitions == 1 for r in io_runs) or not any(r.partitions == 4 for r in io_runs):
        print("  I/O-bound scaling from 1 to 4 partitions: not measured (--io-partitions)")
