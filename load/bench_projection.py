"""Projection throughput and end-to-end latency, in one run.

1. Catch-up. Appends --events events (--load-batch events per append,
   over --streams streams, from --load-writers processes), then runs the
   projector daemon (ProjectorDaemon, in a child process) on one projection
   from checkpoint 0 until it reports caught up, and prints events/s for
   the per-event handler and the set-based one at each --set-batch-sizes,
   all folding the same read model (load/projections/bench_fold.sql). The
   parent samples the child's VmRSS (and the RssAnon of its Postgres
   backend, when /proc shows it) while it catches up.
2. End-to-end latency. Writer processes append 1-event batches (one new
   stream per append) at --rate events/s for --duration seconds while the
   daemon, caught up, applies them. Per event: the clock_timestamp() at
   which the handler applied it minus the wall time the writer read right
   after its append returned (so after the commit; same machine, same
   clock); also from the append's commit record timestamp when the server
   tracks them (track_commit_timestamp, on in the throw-away cluster).
   Measured several ways in the same run: the log watcher (10 ms) + poll
   1 s, as deployed (writers do not notify); LISTEN + poll 1 s (writers
   with aura.notify = on); and poll only at each --poll-intervals.
3. Checks that every read model equals the others and a GROUP BY over
   aura.events, and prints "verified".
4. Python processors (``--scenarios python``, load/bench_processors.py,
   whose docstring says how each figure is measured): catch-up of the
   same log with no-op and inserting handlers against the SQL fold as the
   reference, end-to-end latency at --rate (the handler's commit, against
   the SQL fold measured the same way), and the throughput of an
   I/O-bound handler with 1, 4 and 8 partitions over as many daemons; PASS
   or MISS against the targets.

By default it starts a throw-away local cluster with production durability
settings (fsync on, synchronous_commit on).

    python load/bench_projection.py                  # full run, about 2 minutes
    python load/bench_projection.py --quick          # under a minute
    python load/bench_projection.py --commit async   # synchronous_commit=off
    python load/bench_projection.py --dsn "host=... dbname=..." --json out.json
    python load/bench_projection.py --scenarios python          # Python processors only
    python load/bench_projection.py --scenarios python --quick --py-profile /tmp/prof

With --dsn it drops and recreates the projections and processors named
bench_* (and their schemas, and the schema bench_py) in that database, and
adds events to it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import multiprocessing as mp
import os
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from multiprocessing.synchronize import Barrier
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from aura_pg import EventStore, NewEvent
from aura_pg.devtools.localdb import benchmark_settings, temporary_cluster
from aura_pg.projection.catalog import ProjectionSpec, load_catalog
from aura_pg.projection.daemon import ProjectorDaemon
from aura_pg.projection.runner import ProjectionRunner, StepOutcome
from aura_pg.projection.settings import ProjectorSettings

CATALOG = Path(__file__).resolve().parent / "projections" / "catalog.yaml"
EVENT_TYPES = (
    "ORDER_PLACED",
    "ITEM_ADDED",
    "ITEM_REMOVED",
    "PAYMENT_TAKEN",
    "ORDER_SHIPPED",
    "NOTE_ADDED",
)
MIB = 1024.0
SCENARIOS = ("sql", "python")
# The catch-up handlers of the Python processors (load/processor_handlers.py).
PY_HANDLERS = ("noop", "noop_async", "insert", "insert_async")


# ---------------------------------------------------------------- helpers


def with_notify(dsn: str, notify: bool) -> str:
    """The connection string with ``-c aura.notify=on|off`` added to its
    options (explicitly, whatever the schema's default)."""
    options = conninfo_to_dict(dsn).get("options")
    extra = f"-c aura.notify={'on' if notify else 'off'}"
    return make_conninfo(dsn, options=f"{options} {extra}" if options else extra)


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, int(fraction * len(sorted_values)))
    return sorted_values[index]


def proc_status_kb(pid: int, field: str) -> int | None:
    """A field of /proc/PID/status in kB (VmRSS, VmHWM, RssAnon), or None."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def make_events(
    count: int, first: int, payload: str, event_type: str | None = None
) -> list[NewEvent]:
    """Events of the benchmark's types in turn (or all of ``event_type``)."""
    return [
        NewEvent(
            event_type or EVENT_TYPES[(first + i) % len(EVENT_TYPES)],
            {"n": first + i, "amount": (first + i) % 997, "note": payload},
            metadata={"actor": "bench"},
        )
        for i in range(count)
    ]


def settle(dsn: str) -> None:
    """Start each measurement from the same state: no dirty buffers."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CHECKPOINT")


# The per-event projection with its handler run as the daemon's role, as
# before migration 0006: prepare() makes its schema's aura_run_handler
# SECURITY INVOKER, so the run measures what running handlers as the read
# model's role (one switch of user per batch) costs.
INVOKER_REFERENCE = "bench_each_invoker"


def bench_specs(set_batch_sizes: list[int], live_count: int) -> dict[str, ProjectionSpec]:
    """The projections this run registers, derived from the bench catalog:
    bench_each, bench_set_SIZE for each batch size, bench_live_N."""
    catalog = load_catalog(CATALOG)
    each, batched = catalog.get("bench_each"), catalog.get("bench_set")
    reference = each.model_copy(update={"name": INVOKER_REFERENCE})
    specs = {each.name: each, reference.name: reference}
    for size in set_batch_sizes:
        name = f"bench_set_{size}"
        specs[name] = batched.model_copy(update={"name": name, "batch_size": size})
    for index in range(live_count):
        name = f"bench_live_{index}"
        specs[name] = batched.model_copy(update={"name": name})
    return specs


def prepare(dsn: str, specs: list[ProjectionSpec]) -> None:
    """Migrate; drop earlier bench projections; register this run's."""
    from aura_pg import migrate  # here: alembic is slow to import in every child process

    migrate.upgrade(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        drop_bench_projections(conn)
    asyncio.run(ProjectorDaemon(dsn, specs).register())
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "ALTER FUNCTION {}.aura_run_handler(text, text, text, aura.events[])"
                " SECURITY INVOKER"
            ).format(sql.Identifier(INVOKER_REFERENCE))
        )


def drop_bench_projections(conn: psycopg.Connection[Any]) -> None:
    """Remove every projection and processor named bench_* (the partitions
    of a Python processor, bench_x/N, included), with their read-model
    schemas (a Python processor has none) and dead letters."""
    rows = conn.execute(
        "SELECT name, schema_name FROM aura.projection_checkpoints "
        "WHERE name LIKE 'bench\\_%' ORDER BY rebuild_of NULLS LAST"
    ).fetchall()
    for name, schema in rows:
        if schema is not None:
            for suffix in ("", "__previous"):
                conn.execute(
                    sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                        sql.Identifier(schema + suffix)
                    )
                )
        conn.execute("DELETE FROM aura.dead_letters WHERE projection = %s", (name,))
    conn.execute("DELETE FROM aura.projection_checkpoints WHERE name LIKE 'bench\\_%'")


# ---------------------------------------------------------------- loading


def load_writer(
    dsn: str,
    run: str,
    writer: int,
    events: int,
    batch: int,
    streams: int,
    barrier: Barrier,
    results: Any,
    event_type: str | None = None,
) -> None:
    """Append ``events`` events in ``batch``-event appends, round robin over
    this writer's own ``streams`` streams. No projector runs yet: the
    appends do not notify (aura.notify = off)."""
    payload = "x" * 60
    with EventStore.connect(with_notify(dsn, False), min_size=1, max_size=1) as store:
        barrier.wait()
        done = 0
        n = 0
        while done < events:
            size = min(batch, events - done)
            store.append(
                f"load{run}-w{writer}-s{n % streams}",
                make_events(size, writer * events + done, payload, event_type),
            )
            done += size
            n += 1
    results.put(done)


@dataclass
class Load:
    events: int
    seconds: float
    events_per_second: float
    batch: int
    streams: int
    writers: int


def load_events(
    dsn: str, events: int, batch: int, streams: int, writers: int, event_type: str | None = None
) -> Load:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    barrier = ctx.Barrier(writers + 1)
    run = uuid.uuid4().hex[:6]
    shares = [events // writers + (1 if w < events % writers else 0) for w in range(writers)]
    per_writer_streams = max(1, streams // writers)
    processes = [
        ctx.Process(
            target=load_writer,
            args=(dsn, run, w, shares[w], batch, per_writer_streams, barrier, results, event_type),
        )
        for w in range(writers)
    ]
    for process in processes:
        process.start()
    barrier.wait()  # timed from when every writer has connected
    began = time.perf_counter()
    total = sum(results.get(timeout=600) for _ in processes)
    seconds = time.perf_counter() - began
    for process in processes:
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"load writer failed ({process.exitcode})")
    with psycopg.connect(dsn, autocommit=True) as conn:
        # A log that is caught up on is usually an old one: vacuumed, with
        # hint bits set, so no autovacuum of it competes with the projector.
        conn.execute("VACUUM (ANALYZE) aura.events")
    return Load(total, seconds, total / seconds, batch, per_writer_streams * writers, writers)


# ---------------------------------------------------------------- projector child


class TimedRunner(ProjectionRunner):
    """The daemon's runner, timing each batch that applied events."""

    def __init__(
        self,
        dsn: str,
        spec: ProjectionSpec,
        settings: ProjectorSettings,
        on_caught_up: Callable[[psycopg.AsyncConnection[Any]], Awaitable[bool]],
    ) -> None:
        super().__init__(
            dsn,
            spec.name,
            settings,
            dead_letter_queue=spec.error_handling.dead_letter_queue,
            on_caught_up=on_caught_up,
        )
        self.batch_seconds: list[float] = []
        self.batch_events: list[int] = []
        # How many of the timed batches were the catch-up (until first idle).
        self.catch_up_batches: int | None = None

    async def step(self, conn: psycopg.AsyncConnection[Any]) -> StepOutcome:
        before = self.events_applied
        began = time.perf_counter()
        outcome = await super().step(conn)
        if self.events_applied > before:
            self.batch_seconds.append(time.perf_counter() - began)
            self.batch_events.append(self.events_applied - before)
        if outcome is StepOutcome.IDLE and self.catch_up_batches is None:
            self.catch_up_batches = len(self.batch_seconds)
        return outcome


def projector_main(
    dsn: str,
    spec: ProjectionSpec,
    settings: dict[str, Any],
    stop_when_caught_up: bool,
    messages: Any,
    go: MpEvent,
    stop: MpEvent,
) -> None:
    """A child process: the projector daemon running one projection.

    Sends ("ready", pid), waits for ``go``, runs the daemon; sends
    ("caught_up", figures) the first time the projection is caught up (and
    stops there if ``stop_when_caught_up``), runs until ``stop`` otherwise,
    and sends ("done", figures) at the end.
    """
    logging.basicConfig(level=logging.WARNING, format="projector: %(levelname)s %(message)s")
    asyncio.run(_projector(dsn, spec, settings, stop_when_caught_up, messages, go, stop))


async def _projector(
    dsn: str,
    spec: ProjectionSpec,
    settings: dict[str, Any],
    stop_when_caught_up: bool,
    messages: Any,
    go: MpEvent,
    stop: MpEvent,
) -> None:
    stopping = asyncio.Event()
    daemon = ProjectorDaemon(dsn, [spec], ProjectorSettings(**settings))
    started = 0.0
    caught_up = False

    async def on_caught_up(_conn: psycopg.AsyncConnection[Any]) -> bool:
        nonlocal caught_up
        if not caught_up:
            caught_up = True
            messages.put(
                (
                    "caught_up",
                    {
                        "seconds": time.perf_counter() - started,
                        "events": runner.events_applied,
                        "batches": runner.batches,
                        "rss_kb": proc_status_kb(os.getpid(), "VmRSS"),
                    },
                )
            )
            if stop_when_caught_up:
                stopping.set()
        return False

    runner = TimedRunner(dsn, spec, daemon.settings, on_caught_up)
    daemon.runners[spec.name] = runner
    messages.put(("ready", os.getpid()))
    await asyncio.to_thread(go.wait)

    async def watch() -> None:
        while not stopping.is_set():
            if stop.is_set():
                stopping.set()
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    started = time.perf_counter()
    await daemon.run(stopping)
    await watcher
    listener = daemon.listener
    log_watcher = daemon.watcher
    messages.put(
        (
            "done",
            {
                "events": runner.events_applied,
                "batches": runner.batches,
                "dead_lettered": runner.dead_lettered,
                "catch_up_batches": runner.catch_up_batches or 0,
                "batch_seconds": runner.batch_seconds,
                "batch_events": runner.batch_events,
                "wake_ups": (
                    listener.notifications if listener else log_watcher.moves if log_watcher else 0
                ),
                "watch_ticks": log_watcher.ticks if log_watcher else 0,
            },
        )
    )


class RssSampler(threading.Thread):
    """Samples a process's VmRSS, and its projector backend's RssAnon, every
    ``interval`` seconds until stopped."""

    def __init__(self, pid: int, dsn: str, application_name: str, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.dsn = dsn
        self.application_name = application_name
        self.interval = interval
        self.rss_kb: list[int] = []
        self.backend_kb: list[int] = []
        self.backend_pid: int | None = None
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self._stop_event.is_set():
                rss = proc_status_kb(self.pid, "VmRSS")
                if rss is not None:
                    self.rss_kb.append(rss)
                if self.backend_pid is None:
                    row = conn.execute(
                        "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                        (self.application_name,),
                    ).fetchone()
                    self.backend_pid = row[0] if row else None
                if self.backend_pid is not None:
                    anon = proc_status_kb(self.backend_pid, "RssAnon")
                    if anon is not None:
                        self.backend_kb.append(anon)
                self._stop_event.wait(self.interval)


class Projector:
    """The projector child process, driven from the parent."""

    def __init__(
        self, dsn: str, spec: ProjectionSpec, settings: dict[str, Any], stop_when_caught_up: bool
    ) -> None:
        ctx = mp.get_context("spawn")
        self.messages = ctx.Queue()
        self.go = ctx.Event()
        self.stop_event = ctx.Event()
        self.process = ctx.Process(
            target=projector_main,
            args=(
                dsn,
                spec,
                settings,
                stop_when_caught_up,
                self.messages,
                self.go,
                self.stop_event,
            ),
        )

    def start(self) -> int:
        self.process.start()
        return int(self.expect("ready", 60))

    def expect(self, kind: str, timeout: float) -> Any:
        try:
            got, value = self.messages.get(timeout=timeout)
        except Exception as exc:
            self.kill()
            raise RuntimeError(f"projector: no {kind!r} within {timeout:.0f}s") from exc
        if got != kind:
            self.kill()
            raise RuntimeError(f"projector sent {got!r}, expected {kind!r}")
        return value

    def finish(self, timeout: float = 60) -> dict[str, Any]:
        self.stop_event.set()
        done: dict[str, Any] = self.expect("done", timeout)
        self.process.join(timeout)
        if self.process.exitcode != 0:
            raise RuntimeError(f"projector process failed ({self.process.exitcode})")
        return done

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def application_name(spec: ProjectionSpec) -> str:
    return f"aura-pg projector {spec.name}"[:63]


# ---------------------------------------------------------------- catch-up


@dataclass
class CatchUp:
    projection: str
    handler_kind: str
    batch_size: int
    events: int
    seconds: float
    events_per_second: float
    batches: int
    batch_p50_ms: float
    batch_max_ms: float
    seconds_in_batches: float
    rss_start_mib: float
    rss_peak_mib: float
    rss_final_mib: float
    backend_anon_peak_mib: float | None


def catch_up(dsn: str, spec: ProjectionSpec, timeout: float) -> CatchUp:
    settle(dsn)
    projector = Projector(dsn, spec, {"poll_interval": 1.0}, stop_when_caught_up=True)
    pid = projector.start()
    sampler = RssSampler(pid, dsn, application_name(spec))
    sampler.start()
    while not sampler.rss_kb:
        time.sleep(0.005)
    projector.go.set()
    try:
        caught = projector.expect("caught_up", timeout)
    finally:
        sampler.stop()
    done = projector.finish()
    batch_seconds = sorted(done["batch_seconds"][: done["catch_up_batches"]])
    return CatchUp(
        projection=spec.name,
        handler_kind=spec.handler_kind,
        batch_size=spec.batch_size,
        events=caught["events"],
        seconds=caught["seconds"],
        events_per_second=caught["events"] / caught["seconds"],
        batches=caught["batches"],
        batch_p50_ms=percentile(batch_seconds, 0.5) * 1000,
        batch_max_ms=max(batch_seconds, default=float("nan")) * 1000,
        seconds_in_batches=sum(batch_seconds),
        rss_start_mib=sampler.rss_kb[0] / MIB,
        rss_peak_mib=max(sampler.rss_kb) / MIB,
        rss_final_mib=(caught["rss_kb"] or sampler.rss_kb[-1]) / MIB,
        backend_anon_peak_mib=max(sampler.backend_kb) / MIB if sampler.backend_kb else None,
    )


# ---------------------------------------------------------------- latency


def latency_writer(
    dsn: str,
    prefix: str,
    writer: int,
    writers: int,
    rate: float,
    duration: float,
    batch: int,
    barrier: Barrier,
    results: Any,
) -> None:
    """Append ``batch``-event appends at ``rate`` events/s (this writer's
    share), each to a new stream; record the wall time after each returns."""
    payload = "x" * 60
    interval = batch / rate
    records: list[tuple[str, float, int]] = []
    with EventStore.connect(dsn, min_size=1, max_size=1) as store:
        barrier.wait()
        start = time.perf_counter() + interval * writer / writers  # spread the writers out
        deadline = time.perf_counter() + duration
        n = 0
        while True:
            due = start + n * interval
            if due >= deadline:
                break
            pause = due - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            stream_id = f"{prefix}-w{writer}-{n}"
            store.append(stream_id, make_events(batch, n * batch, payload))
            records.append((stream_id, time.time(), batch))
            n += 1
    results.put(records)


@dataclass
class Latency:
    wake_up: str
    notify: bool
    poll_interval: float
    wake: str
    target_rate: float
    achieved_rate: float
    events: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    min_ms: float
    batches: int
    events_per_batch: float
    batch_p50_ms: float
    # Notifications received (listen) or read-horizon moves seen (watch).
    wake_ups: int
    # Statements the log watcher sent: its cost, whatever the append rate.
    watch_ticks: int
    # From the writer's commit record timestamp (track_commit_timestamp)
    # instead of the writer's clock after the append returned; None when
    # the server does not track commit timestamps.
    from_commit_p50_ms: float | None
    from_commit_p95_ms: float | None
    from_commit_p99_ms: float | None
    from_commit_min_ms: float | None


def wait_caught_up(dsn: str, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            row = conn.execute(
                "SELECT events_behind FROM aura.projection_status WHERE name = %s", (name,)
            ).fetchone()
            if row is not None and row[0] == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not catch up within {timeout:.0f}s")
            time.sleep(0.05)


def live_latency(
    dsn: str,
    spec: ProjectionSpec,
    wake_up: str,
    wake: str,
    poll_interval: float,
    rate: float,
    duration: float,
    writers: int,
    batch: int,
    catch_up_timeout: float,
) -> Latency:
    notify = wake == "listen"  # only a listening daemon needs notifying writers
    settle(dsn)
    projector = Projector(
        dsn, spec, {"poll_interval": poll_interval, "wake": wake}, stop_when_caught_up=False
    )
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(writers + 1)
    results = ctx.Queue()
    prefix = f"live{uuid.uuid4().hex[:6]}"
    writer_dsn = with_notify(dsn, notify)
    processes = [
        ctx.Process(
            target=latency_writer,
            args=(
                writer_dsn,
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
    projector.start()
    projector.go.set()
    try:
        # The writers start (and connect) while the projector catches up;
        # they append once it has and the barrier lets them go.
        for process in processes:
            process.start()
        projector.expect("caught_up", catch_up_timeout)
        barrier.wait(timeout=120)
        records = [r for _ in processes for r in results.get(timeout=duration + 120)]
        for process in processes:
            process.join()
            if process.exitcode != 0:
                raise RuntimeError(f"latency writer failed ({process.exitcode})")
        wait_caught_up(dsn, spec.name, 60 + 2 * poll_interval)
        done = projector.finish()
    finally:
        barrier.abort()  # a writer still waiting (something failed) gives up
        for process in processes:
            if process.is_alive():
                process.join(10)
        projector.kill()

    with psycopg.connect(dsn, autocommit=True) as conn:
        tracked = conn.execute("SHOW track_commit_timestamp").fetchone()
        commit_ts = (
            sql.SQL("extract(epoch FROM pg_xact_commit_timestamp(e.xmin))::float8")
            if tracked and tracked[0] == "on"
            else sql.SQL("NULL::float8")
        )
        rows = conn.execute(
            sql.SQL(
                "SELECT s.stream_id, extract(epoch FROM s.applied_at)::float8, {commit_ts} "
                "FROM {schema}.streams s "
                "JOIN aura.events e ON e.stream_id = s.stream_id AND e.version = s.last_version "
                "WHERE s.stream_id LIKE %s"
            ).format(commit_ts=commit_ts, schema=sql.Identifier(spec.read_model_schema)),
            (prefix + "-%",),
        ).fetchall()
    applied: dict[str, tuple[float, float | None]] = {row[0]: (row[1], row[2]) for row in rows}
    missing = [stream for stream, _, _ in records if stream not in applied]
    if missing:
        raise RuntimeError(f"{len(missing)} appends never reached {spec.name}")
    latencies = sorted(
        (applied[stream][0] - committed) * 1000
        for stream, committed, count in records
        for _ in range(count)
    )
    from_commit = sorted(
        (applied_at - commit_at) * 1000
        for stream, _, count in records
        for applied_at, commit_at in [applied[stream]]
        if commit_at is not None
        for _ in range(count)
    )
    live = done["catch_up_batches"]
    batch_seconds = sorted(done["batch_seconds"][live:])
    return Latency(
        wake_up=wake_up,
        notify=notify,
        poll_interval=poll_interval,
        wake=wake,
        target_rate=rate,
        achieved_rate=len(latencies) / duration,
        events=len(latencies),
        p50_ms=percentile(latencies, 0.50),
        p95_ms=percentile(latencies, 0.95),
        p99_ms=percentile(latencies, 0.99),
        max_ms=latencies[-1],
        min_ms=latencies[0],
        batches=len(batch_seconds),
        events_per_batch=sum(done["batch_events"][live:]) / max(len(batch_seconds), 1),
        batch_p50_ms=percentile(batch_seconds, 0.5) * 1000,
        wake_ups=done["wake_ups"],
        watch_ticks=done["watch_ticks"],
        from_commit_p50_ms=percentile(from_commit, 0.50) if from_commit else None,
        from_commit_p95_ms=percentile(from_commit, 0.95) if from_commit else None,
        from_commit_p99_ms=percentile(from_commit, 0.99) if from_commit else None,
        from_commit_min_ms=from_commit[0] if from_commit else None,
    )


# ---------------------------------------------------------------- verification

EXPECTED_STREAMS = """
SELECT stream_id, count(*), max(version), (array_agg(type ORDER BY version DESC))[1],
       max(global_position)
FROM aura.events GROUP BY stream_id
"""
EXPECTED_TYPES = "SELECT type, count(*) FROM aura.events GROUP BY type"
MODEL_STREAMS = "SELECT stream_id, events, last_version, last_type, last_position FROM {}.streams"
MODEL_TYPES = "SELECT type, events FROM {}.event_types"


def differences(conn: psycopg.Connection[Any], left: sql.Composable, right: sql.Composable) -> int:
    """Rows in one query's result and not in the other's, both ways."""
    query = sql.SQL(
        "SELECT count(*) FROM (({left} EXCEPT ALL {right}) UNION ALL ({right} EXCEPT ALL {left})) d"
    ).format(left=left, right=right)
    row = conn.execute(query).fetchone()
    return int(row[0]) if row else -1


def verify(dsn: str, schemas: list[str]) -> list[str]:
    """Problems found comparing the read models in ``schemas`` with each
    other and with a GROUP BY over aura.events (none: they are equal)."""
    problems: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for model_sql, expected_sql, table in (
            (MODEL_STREAMS, EXPECTED_STREAMS, "streams"),
            (MODEL_TYPES, EXPECTED_TYPES, "event_types"),
        ):
            expected = sql.SQL(expected_sql)
            models = [sql.SQL(model_sql).format(sql.Identifier(s)) for s in schemas]
            for schema, model in zip(schemas, models, strict=True):
                count = differences(conn, model, expected)
                if count:
                    problems.append(f"{schema}.{table}: {count} rows differ from aura.events")
            for schema, model in zip(schemas[1:], models[1:], strict=True):
                count = differences(conn, models[0], model)
                if count:
                    problems.append(f"{schema}.{table}: {count} rows differ from {schemas[0]}")
    return problems


# ---------------------------------------------------------------- main


def print_catch_up_header() -> None:
    print(
        f"{'projection':<16} {'kind':<9} {'batch':>5} {'events':>7} {'seconds':>7} "
        f"{'events/s':>8} {'batches':>7} {'batch p50 ms':>12} {'batch max ms':>12} "
        f"{'in batches s':>12}  {'RSS MiB start/peak/final':>24} {'backend peak MiB':>16}"
    )


def print_catch_up(r: CatchUp) -> None:
    backend = f"{r.backend_anon_peak_mib:.1f}" if r.backend_anon_peak_mib is not None else "n/a"
    rss = f"{r.rss_start_mib:.1f}/{r.rss_peak_mib:.1f}/{r.rss_final_mib:.1f}"
    print(
        f"{r.projection:<16} {r.handler_kind:<9} {r.batch_size:>5} {r.events:>7} "
        f"{r.seconds:>7.2f} {r.events_per_second:>8.0f} {r.batches:>7} "
        f"{r.batch_p50_ms:>12.1f} {r.batch_max_ms:>12.1f} {r.seconds_in_batches:>12.2f}  "
        f"{rss:>24} {backend:>16}",
        flush=True,
    )


def print_latency_header() -> None:
    print(
        f"{'wake-up':<18} {'notify':>6} {'events/s':>8} {'events':>6} {'p50 ms':>7} "
        f"{'p95 ms':>7} {'p99 ms':>7} {'max ms':>7} {'min ms':>7} {'batches':>7} "
        f"{'ev/batch':>8} {'batch p50 ms':>12} {'wake-ups':>8} {'ticks':>6}   "
        "from commit record: p50/p95/p99/min ms"
    )


def print_latency(r: Latency) -> None:
    from_commit = (
        f"{r.from_commit_p50_ms:.1f}/{r.from_commit_p95_ms:.1f}/{r.from_commit_p99_ms:.1f}/"
        f"{r.from_commit_min_ms:.1f}"
        if r.from_commit_p50_ms is not None
        else "n/a (track_commit_timestamp off)"
    )
    print(
        f"{r.wake_up:<18} {'on' if r.notify else 'off':>6} {r.achieved_rate:>8.0f} "
        f"{r.events:>6} {r.p50_ms:>7.1f} {r.p95_ms:>7.1f} {r.p99_ms:>7.1f} {r.max_ms:>7.1f} "
        f"{r.min_ms:>7.1f} {r.batches:>7} {r.events_per_batch:>8.1f} {r.batch_p50_ms:>12.1f} "
        f"{r.wake_ups:>8} {r.watch_ticks:>6}   {from_commit}",
        flush=True,
    )


def run(args: argparse.Namespace, dsn: str) -> dict[str, Any]:
    """The scenarios of ``--scenarios``, in order; their figures (the SQL
    scenario's at the top level, the Python processors' under "python")
    and the problems found."""
    with psycopg.connect(dsn) as conn:
        fsync = conn.execute("SHOW fsync").fetchone()
        sync_commit = conn.execute("SHOW synchronous_commit").fetchone()
    print(
        f"server: fsync={fsync[0] if fsync else '?'} "
        f"synchronous_commit={sync_commit[0] if sync_commit else '?'}; machine: "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (1 min) at the start "
        "(whatever else runs on it shares them)"
    )
    figures: dict[str, Any] = {
        "settings": {
            key: str(value) if isinstance(value, Path) else value
            for key, value in vars(args).items()
            if key not in ("json", "dsn")
        },
        "problems": [],
    }
    if "sql" in args.scenarios:
        figures.update(run_sql(args, dsn))
    if "python" in args.scenarios:
        # Here, not at the top: it imports this module (as "bench_projection").
        from bench_processors import run_processors

        if "sql" in args.scenarios:
            print()
        python = run_processors(args, dsn)
        figures["python"] = python
        figures["problems"] = figures["problems"] + python["problems"]
    figures["verified"] = not figures["problems"]
    return figures


def run_sql(args: argparse.Namespace, dsn: str) -> dict[str, Any]:
    """The SQL projections: catch-up, end-to-end latency, checks."""
    poll_intervals: list[float] = args.poll_intervals
    specs = bench_specs(args.set_batch_sizes, 2 + len(poll_intervals))
    prepare(dsn, list(specs.values()))

    load = load_events(dsn, args.events, args.load_batch, args.streams, args.load_writers)
    print(
        f"loaded {load.events} events ({load.batch}-event appends over {load.streams} streams, "
        f"{load.writers} writer processes, aura.notify = off) in {load.seconds:.1f} s: "
        f"{load.events_per_second:.0f} events/s",
        flush=True,
    )
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM aura.events").fetchone()
        log_events = int(row[0]) if row else 0

    print(
        f"\ncatch-up of {log_events} events from checkpoint 0 (ProjectorDaemon in a child "
        "process, timed from daemon start to the runner's first caught-up batch)"
    )
    timeout = max(300.0, log_events / 200)
    catch_ups: list[CatchUp] = []
    names = [
        INVOKER_REFERENCE,
        "bench_each",
        *(f"bench_set_{size}" for size in args.set_batch_sizes),
    ]
    print_catch_up_header()
    for name in names:
        caught = catch_up(dsn, specs[name], timeout)
        catch_ups.append(caught)
        print_catch_up(caught)
    invoker, each = catch_ups[0], catch_ups[1]
    print(
        f"bench_each (handler runs as its read model's role): "
        f"{each.events_per_second / invoker.events_per_second:.2f}x {INVOKER_REFERENCE} "
        "(the same handler as the daemon's role)"
    )
    for r in catch_ups[2:]:
        print(
            f"{r.projection}: {r.events_per_second / each.events_per_second:.1f}x the per-event "
            "handler"
        )
    problems = [
        f"{r.projection} applied {r.events} events, the log holds {log_events}"
        for r in catch_ups
        if r.events != log_events
    ]
    problems += verify(dsn, [specs[name].read_model_schema for name in names])
    if not problems:
        print(f"read models {' = '.join(names)} = GROUP BY over aura.events ({log_events} events)")

    print(
        f"\nend-to-end latency at {args.rate:.0f} events/s for {args.duration:.0f} s "
        f"({args.latency_writers} writer processes, {args.latency_batch}-event appends, each to "
        "a new stream; set-based projection, batch 500):\n"
        "applied_at (clock_timestamp() in the handler) minus the writer's wall time right "
        "after its append returned"
    )
    print_latency_header()
    configs = [("watch + poll 1s", "watch", 1.0), ("listen + poll 1s", "listen", 1.0)] + [
        (f"poll only {p:g}s", "poll", p) for p in poll_intervals
    ]
    latencies: list[Latency] = []
    live_schemas: list[str] = []
    for index, (wake_up, wake, poll) in enumerate(configs):
        spec = specs[f"bench_live_{index}"]
        result = live_latency(
            dsn,
            spec,
            wake_up,
            wake,
            poll,
            args.rate,
            args.duration,
            args.latency_writers,
            args.latency_batch,
            timeout,
        )
        latencies.append(result)
        print_latency(result)
        live_schemas.append(spec.read_model_schema)
        # Caught up with every event (wait_caught_up), and no writer runs now.
        problems += verify(dsn, [spec.read_model_schema])

    best_set = max(
        (r for r in catch_ups if r.handler_kind == "set_based"), key=lambda r: r.events_per_second
    )
    deployed = latencies[0]
    print(
        f"\ntargets: set-based catch-up >= 20000 events/s: {best_set.events_per_second:.0f} "
        f"({best_set.projection}), {'met' if best_set.events_per_second >= 20000 else 'NOT met'}; "
        f"p95 < 50 ms at 1000 events/s with the log watcher: {deployed.p95_ms:.1f} ms at "
        f"{deployed.achieved_rate:.0f} events/s, {'met' if deployed.p95_ms < 50 else 'NOT met'}"
    )
    return {
        "load": asdict(load),
        "log_events": log_events,
        "catch_up": [asdict(r) for r in catch_ups],
        "latency": [asdict(r) for r in latencies],
        "problems": problems,
    }


def default_io_events(args: argparse.Namespace) -> int:
    """IO_WORK events enough for every partition of the largest count to
    stay busy from its start through the window, with room for the uneven
    spread of streams over partitions: each partition handles at most
    1000/--io-sleep-ms events/s when the wait is per event (a guess of 10 ms
    of the daemon's own per batch when it is per batch)."""
    if args.io_sleep_per == "event":
        per_partition = 1000.0 / max(args.io_sleep_ms, 0.1)
    else:
        per_partition = args.io_batch * 1000.0 / (args.io_sleep_ms + 10.0)
    wanted = max(args.io_partitions) * per_partition * (args.io_window + 15.0) * 1.5
    return int(min(wanted, 500_000))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--dsn", help="benchmark this database instead of a local throw-away cluster"
    )
    parser.add_argument("--events", type=int, help="events to catch up on (default 100000)")
    parser.add_argument("--rate", type=float, default=1000.0, help="latency: events/s to append")
    parser.add_argument("--duration", type=float, help="latency: seconds per run (default 20)")
    parser.add_argument(
        "--quick", action="store_true", help="10000 events and 5 s runs: under a minute"
    )
    parser.add_argument(
        "--commit",
        choices=["durable", "async"],
        default="durable",
        help="local cluster: durable commits (fsync, synchronous_commit on: the default), "
        "or synchronous_commit=off",
    )
    parser.add_argument(
        "--set-batch-sizes",
        type=int,
        nargs="+",
        default=[500, 5000],
        help="batch sizes of the set-based catch-up runs (default 500 5000)",
    )
    parser.add_argument(
        "--poll-intervals",
        type=float,
        nargs="+",
        default=[1.0, 0.1],
        help="latency: poll intervals of the poll-only runs (default 1 0.1)",
    )
    parser.add_argument("--load-batch", type=int, default=10, help="events per loading append")
    parser.add_argument("--streams", type=int, default=2000, help="streams the load spreads over")
    parser.add_argument("--load-writers", type=int, default=4, help="loading writer processes")
    parser.add_argument("--latency-writers", type=int, default=4, help="latency: writer processes")
    parser.add_argument("--latency-batch", type=int, default=1, help="latency: events per append")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument(
        "--scenarios",
        nargs="+",
        choices=SCENARIOS,
        default=list(SCENARIOS),
        help="sql: the SQL projections; python: the Python processors (load/bench_processors.py)"
        " (default both)",
    )
    python = parser.add_argument_group("Python processors (--scenarios python)")
    python.add_argument(
        "--py-handlers",
        nargs="+",
        choices=PY_HANDLERS,
        default=list(PY_HANDLERS),
        help="catch-up: the handlers to run (load/processor_handlers.py; default all)",
    )
    python.add_argument("--py-batch", type=int, default=500, help="catch-up: batch size")
    python.add_argument(
        "--py-profile",
        type=Path,
        metavar="DIR",
        help="run the no-op catch-up's daemon under cProfile, write DIR/bench_py_noop.prof "
        "and print its top functions",
    )
    python.add_argument(
        "--io-partitions",
        type=int,
        nargs="+",
        default=[1, 4, 8],
        help="I/O-bound: partition counts, each over as many daemons (default 1 4 8)",
    )
    python.add_argument(
        "--io-sleep-ms", type=float, default=5.0, help="I/O-bound: the handler's wait (ms)"
    )
    python.add_argument(
        "--io-sleep-per",
        choices=["event", "batch"],
        default="event",
        help="I/O-bound: wait per event (default) or once per batch",
    )
    python.add_argument(
        "--io-async", action="store_true", help="I/O-bound: an async handler (asyncio.sleep)"
    )
    python.add_argument("--io-batch", type=int, default=50, help="I/O-bound: batch size")
    python.add_argument(
        "--io-assign",
        nargs="+",
        choices=["pinned", "free"],
        default=["pinned", "free"],
        help="I/O-bound: pinned, each daemon runs one partition; free, each takes any free "
        "partition, as deployed daemons do (default both)",
    )
    python.add_argument(
        "--io-window", type=float, help="I/O-bound: measured seconds per run (default 10)"
    )
    python.add_argument(
        "--io-events",
        type=int,
        help="I/O-bound: IO_WORK events in the log (default: enough for the largest partition "
        "count to stay busy through the window)",
    )
    python.add_argument(
        "--io-streams", type=int, default=512, help="I/O-bound: streams of the IO_WORK events"
    )
    args = parser.parse_args(argv)
    if args.events is None:
        args.events = 10_000 if args.quick else 100_000
    if args.duration is None:
        args.duration = 5.0 if args.quick else 20.0
    if args.io_window is None:
        args.io_window = 3.0 if args.quick else 10.0
    if args.events < 1 or args.duration <= 0 or args.rate <= 0 or args.io_window <= 0:
        parser.error("--events, --duration, --rate and --io-window must be positive")
    if args.py_batch < 1 or args.io_batch < 1 or args.io_sleep_ms < 0:
        parser.error("--py-batch and --io-batch must be positive, --io-sleep-ms not negative")
    if any(not 1 <= count <= 64 for count in args.io_partitions):
        parser.error("--io-partitions: from 1 to 64")
    if args.io_events is None:
        args.io_events = default_io_events(args)

    began = time.monotonic()
    with contextlib.ExitStack() as stack:
        dsn = args.dsn
        if dsn is None:
            # track_commit_timestamp: for the latency measured from the
            # commit record's timestamp.
            settings = {**benchmark_settings(args.commit), "track_commit_timestamp": "on"}
            if "python" in args.scenarios:
                # N daemons of an N-partition processor: a connection per
                # partition row each may hold or wait for, and a watcher.
                settings["max_connections"] = str(max(100, 4 * max(args.io_partitions) ** 2))
            dsn = stack.enter_context(temporary_cluster(settings)).dsn()
        figures = run(args, dsn)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    if figures["problems"]:
        print("NOT verified:")
        for problem in figures["problems"]:
            print(f"  {problem}")
        return 1
    print(f"verified (the run took {time.monotonic() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
