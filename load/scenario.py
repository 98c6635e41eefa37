"""Load scenarios: real debates through the real store while projector
daemons keep the debate read models up to date, measured second by second.

    python load/scenario.py sustained [--rate 1000] [--duration 60]
    python load/scenario.py spike [--from-rate 100] [--to-rate 10000] [--ramp 300] [--hold 0]
    python load/scenario.py soak [--fraction 0.8] [--capacity DEBATES_PER_HOUR] [--duration 600]
    python load/scenario.py sustained --duration 30          # about a minute here

Rates are in debates per hour. A debate is many events: the start, late
joins, one argument per agent per round, the round completions, the votes,
and the ending (consensus, failure or timeout) with, on consensus, the
decision's proposal and approval or rejection in the decision's own stream:
16 to 19 events on average in runs here, from about 16 repository commands,
with the default 5 agents. The run prints the measured events per debate,
which converts debates/hour to events/s.

* **sustained**: a constant --rate for --duration seconds.
* **spike**: from --from-rate to --to-rate linearly over --ramp seconds,
  then --hold seconds at --to-rate.
* **soak**: --fraction of a capacity for --duration seconds. The capacity
  is --capacity when given; otherwise this invocation measures it first
  with an unthrottled run of --probe-duration seconds (the same writers,
  each keeping --in-flight debates going back to back): the debates
  completed per hour there. The output says which.

How it runs:

1. **Postgres**: a throw-away local cluster (aura_pg.devtools.localdb, as
   load/bench_append.py and load/bench_projection.py do: the benchmarks'
   settings, durable commits unless --commit async, and
   track_commit_timestamp = on), or an existing database with --dsn. It is
   migrated and the projections are registered.
2. **Projector daemons**: --daemons (default 2) `aura-pg project`
   processes (the CLI, as deployed: `--metrics-port 0`, JSON logs, the
   daemon's default wake-up), each with its own --owner. With --placement
   split (the default) the projections are dealt out between them, so both
   processes do work; with --placement all every daemon runs every
   projection, each projection is owned by whichever daemon takes its
   advisory lock first and the others stand by (failover as deployed; the
   work may then all land in one process). The run waits until every
   projection is owned and caught up before the load starts.
3. **Writers**: --writers processes (load/scenario_workload.py), each with
   its own EventStore, running the real debate commands
   (aura_pg.domain.repository through the simulator's runner), up to
   --in-flight debates at once each. Debate i is due at a fixed time
   (start times spaced by the rate profile, dealt round robin to the
   writers); a debate starts at its due time, or as soon as a slot frees
   when all are busy. The schedule lag (start minus due) is recorded, and
   debates still not started when the phase ends are counted as not
   started. So a slow store shows as latency and lag, never as a lower
   offered load.
4. **Each second** the parent samples every projection's checkpoint row
   (aura.projection_status: events applied, events and seconds behind,
   dead letters, owner), each daemon's VmRSS (/proc/PID/status) and its
   /metrics (the end-to-end histogram, projection errors). The writers
   record every append, command and debate. After the last writer ends,
   sampling goes on until every projection has caught up (the drain).
5. **After the run** the daemons are stopped (SIGTERM; a non-zero exit is a
   failure), the end-to-end latency is computed, and the run is verified:
   * every event the store told a writer it recorded (event id, stream,
     version, global position) is in aura.events exactly so, the run's
     streams hold no event a writer was not told about, and no domain fact
     was recorded twice (one start, one vote per agent, one argument per
     agent and round, one ending per debate, one proposal and one outcome
     per decision);
   * every read model equals a fresh rebuild: each projection is rebuilt
     blue/green with the real rebuild (aura_pg.projection.rebuild.rebuild,
     what `aura-pg projections rebuild` runs), which swaps the fresh model in
     and keeps the daemons' one as SCHEMA__previous; each table of the two
     is compared with EXCEPT ALL both ways. (With --dsn this replaces the
     live read models by their rebuilt, equal, copies.)
   It prints "verified" and exits 0, or what differs and exits 1.

What is measured:

* **append latency**: around each EventStore.append call in the writers,
  one round trip (one statement, its commit included, plus the pool's
  checkout). **Command latency**: around each repository command (reload
  the aggregate, decide, append, and reload and retry on conflicts).
* **end-to-end latency**, from the commit of the event's transaction to the
  commit of the read-model transaction that applied it, both as the
  server's commit timestamps (pg_xact_commit_timestamp of the event row's
  xmin and of the read-model row's xmin; same clock, exact to the
  microsecond; both stamped just before the commit's WAL flush). Read-model
  rows keep the xmin of the batch that last wrote them, so it is measured
  for the events that own a row: agent_performance, every vote, decision
  outcome and debate ending (one row each in agent_activity and
  debate_endings); debate_state, each debate's last event (its debate_fold
  row) and each decision proposal (decision_links); stream_summary, each
  stream's last event. Per second by the event's commit second, pooled over
  those projections. This needs track_commit_timestamp (on in the
  throw-away cluster). Beside it, and instead of it when the server does not
  track commit timestamps, the daemons' own histogram
  aura_event_end_to_end_seconds (every applied event of every projection,
  from its recorded_at, the append transaction's start, to the end of the
  batch statement, before its commit; bucket resolution, quantiles
  interpolated within buckets as Prometheus' histogram_quantile does).
* **applied/s** per projection: the change of events_applied in its
  checkpoint row (projections that fold only some event types apply fewer
  events than are appended).
* **lag** per projection: events_behind and seconds_behind of
  aura.projection_status, sampled each second.
* conflicts (version conflicts the repository retried), duplicates (appends
  the store recognised as re-sends), errors (failed commands and appends in
  the writers, projection errors from the daemons' metrics, dead letters,
  warnings and errors in the daemons' logs).

Output: the summary table on stdout, a JSON file (--out, default
load/results/scenario-NAME.json: parameters, machine, server, the
per-second series, the summary, the verification) and a PNG next to it
(--plot): rates, latencies, lag and daemon RSS over time.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import math
import multiprocessing as mp
import os
import platform
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql
from scenario_workload import (
    APPENDED,
    CONFLICT,
    DEBATE_ERROR,
    DUPLICATE,
    FAILED,
    IDEMPOTENCY_CONFLICT,
    NOT_STARTED,
    Chunk,
    EventRecord,
    WriterPlan,
    debate_id,
    writer_main,
)

from aura_pg import migrate
from aura_pg.devtools.localdb import benchmark_settings, temporary_cluster
from aura_pg.domain.decision import decision_id_for
from aura_pg.domain.events import debate_stream, decision_stream
from aura_pg.observability import names as metric_names
from aura_pg.projection.catalog import ProjectionSpec, load_catalog
from aura_pg.projection.daemon import ProjectorDaemon
from aura_pg.projection.rebuild import RebuildResult, rebuild

LOAD_DIR = Path(__file__).resolve().parent
REPO_ROOT = LOAD_DIR.parent
SAMPLE_INTERVAL = 1.0
MIB = 1024.0
LATENCY_BOUNDS = tuple(float(b) for b in metric_names.LATENCY_BUCKETS)
PORT_LOGGED = "metrics server: /metrics, /health and /ready on port "


# ---------------------------------------------------------------- helpers


def percentile(sorted_values: Sequence[float], fraction: float) -> float | None:
    """Nearest rank, as the other load scripts compute it; None when empty."""
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


def quantiles_ms(seconds: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99/max in milliseconds, and the number of samples."""
    values = sorted(s * 1000.0 for s in seconds)
    return {
        "p50": percentile(values, 0.50),
        "p95": percentile(values, 0.95),
        "p99": percentile(values, 0.99),
        "max": values[-1] if values else None,
        "samples": float(len(values)),
    }


def histogram_quantile(fraction: float, counts: Sequence[float]) -> float | None:
    """The quantile of observations counted into LATENCY_BOUNDS (plus +Inf),
    interpolated within its bucket as Prometheus' histogram_quantile does;
    in the +Inf bucket, the largest finite bound (a lower bound)."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = fraction * total
    below = 0.0
    for index, count in enumerate(counts):
        if count > 0 and below + count >= rank:
            if index >= len(LATENCY_BOUNDS):
                return LATENCY_BOUNDS[-1]
            lower = LATENCY_BOUNDS[index - 1] if index > 0 else 0.0
            return lower + (LATENCY_BOUNDS[index] - lower) * (rank - below) / count
        below += count
    return LATENCY_BOUNDS[-1]


def histogram_ms(counts: Sequence[float]) -> dict[str, float | None]:
    def ms(fraction: float) -> float | None:
        value = histogram_quantile(fraction, counts)
        return None if value is None else value * 1000.0

    return {"p50": ms(0.50), "p95": ms(0.95), "p99": ms(0.99), "samples": float(sum(counts))}


def proc_status_kb(pid: int, field_name: str) -> int | None:
    """A field of /proc/PID/status in kB (VmRSS, VmHWM), or None."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def machine_info() -> dict[str, Any]:
    memory_kb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_kb = int(line.split()[1])
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(memory_kb / MIB / MIB, 1) if memory_kb else None,
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def server_info(dsn: str) -> dict[str, Any]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        info: dict[str, Any] = {}
        for setting in (
            "server_version",
            "fsync",
            "synchronous_commit",
            "track_commit_timestamp",
            "shared_buffers",
            "max_connections",
        ):
            row = conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(setting))).fetchone()
            info[setting] = row[0] if row else None
        row = conn.execute(
            "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'"
        ).fetchone()
        info["timescaledb"] = row[0] if row else None
    return info


def aura_pg_command() -> list[str]:
    beside = Path(sys.executable).with_name("aura-pg")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("aura-pg")
    if found is None:
        raise SystemExit("aura-pg is not installed beside this Python (pip install -e .)")
    return [found]


# ---------------------------------------------------------------- rate profiles


@dataclass(frozen=True)
class Profile:
    """Offered debates per hour: ``start_rate`` rising (or falling) linearly
    to ``end_rate`` over ``ramp`` seconds, then ``end_rate`` until
    ``duration``."""

    start_rate: float
    end_rate: float
    ramp: float
    duration: float

    def rate(self, t: float) -> float:
        """Debates per hour at ``t`` seconds."""
        if self.ramp > 0 and t < self.ramp:
            return self.start_rate + (self.end_rate - self.start_rate) * t / self.ramp
        return self.end_rate

    def _ramp_debates(self) -> float:
        return (self.start_rate + self.end_rate) / 2 / 3600 * self.ramp

    def cumulative(self, t: float) -> float:
        """Debates due in [0, t)."""
        a, b = self.start_rate / 3600, self.end_rate / 3600
        if self.ramp > 0 and t <= self.ramp:
            return a * t + (b - a) * t * t / (2 * self.ramp)
        return (self._ramp_debates() if self.ramp > 0 else 0.0) + b * (t - max(self.ramp, 0.0))

    def time_of(self, debates: float) -> float:
        """When the cumulative count reaches ``debates`` (inf if never)."""
        a, b = self.start_rate / 3600, self.end_rate / 3600
        if self.ramp > 0 and debates <= self._ramp_debates():
            c = (b - a) / (2 * self.ramp)
            if abs(c) < 1e-15:
                return debates / a if a > 0 else math.inf
            return (-a + math.sqrt(max(a * a + 4 * c * debates, 0.0))) / (2 * c)
        rest = debates - (self._ramp_debates() if self.ramp > 0 else 0.0)
        return max(self.ramp, 0.0) + rest / b if b > 0 else math.inf

    def due_offsets(self) -> list[float]:
        """Start offsets of the debates: debate k is due when the cumulative
        count reaches k + 1/2, so [0, t) holds about cumulative(t) of them."""
        offsets: list[float] = []
        while True:
            due = self.time_of(len(offsets) + 0.5)
            if due >= self.duration:
                return offsets
            offsets.append(due)


# ---------------------------------------------------------------- daemons


@dataclass
class Daemon:
    index: int
    owner: str
    projections: list[str]
    log_path: Path
    process: subprocess.Popen[bytes]
    port: int | None = None
    exit_code: int | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_lines(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = []
        with contextlib.suppress(OSError):
            for line in self.log_path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if isinstance(entry, dict):
                        entries.append(entry)
        return entries

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


class Daemons:
    """The `aura-pg project` processes of the run."""

    def __init__(
        self,
        dsn: str,
        names: list[str],
        count: int,
        placement: str,
        log_dir: Path,
        extra_args: list[str],
    ) -> None:
        self.dsn = dsn
        self.names = names
        self.log_dir = log_dir
        self.extra_args = extra_args
        self.run_id = uuid.uuid4().hex[:6]
        if placement == "split":
            shares = [names[i::count] for i in range(count)]
        else:
            shares = [list(names) for _ in range(count)]
        self.shares = [share for share in shares if share]
        self.daemons: list[Daemon] = []

    def start(self) -> None:
        command = aura_pg_command()
        for index, share in enumerate(self.shares, start=1):
            owner = f"scenario-{self.run_id}-daemon-{index}"
            log_path = self.log_dir / f"daemon-{index}.log"
            with log_path.open("wb") as log:
                process = subprocess.Popen(
                    [
                        *command, "project", *share,
                        "--dsn", self.dsn,
                        "--owner", owner,
                        "--metrics-port", "0",
                        "--metrics-host", "127.0.0.1",
                        "--log-format", "json",
                        *self.extra_args,
                    ],
                    cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                )  # fmt: skip
            self.daemons.append(Daemon(index, owner, share, log_path, process))

    def by_owner(self) -> dict[str, Daemon]:
        return {d.owner: d for d in self.daemons}

    def check_alive(self) -> None:
        for daemon in self.daemons:
            code = daemon.process.poll()
            if code is not None:
                daemon.exit_code = code
                raise RuntimeError(
                    f"daemon {daemon.index} exited with {code}:\n{daemon.log_tail()}"
                )

    def wait_ready(self, timeout: float) -> None:
        """Until each daemon's metrics port is logged and /ready answers."""
        deadline = time.monotonic() + timeout
        for daemon in self.daemons:
            while daemon.port is None:
                self.check_alive()
                for entry in daemon.log_lines():
                    event = str(entry.get("event", ""))
                    if event.startswith(PORT_LOGGED):
                        daemon.port = int(event.removeprefix(PORT_LOGGED))
                if daemon.port is None:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"daemon {daemon.index} logged no metrics port")
                    time.sleep(0.1)
            while http_status(daemon.port, "/ready") != 200:
                self.check_alive()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"daemon {daemon.index}: /ready never answered 200")
                time.sleep(0.1)

    def stop(self, timeout: float = 40.0) -> None:
        for daemon in self.daemons:
            if daemon.process.poll() is None:
                daemon.process.send_signal(signal.SIGTERM)
        for daemon in self.daemons:
            try:
                daemon.exit_code = daemon.process.wait(timeout)
            except subprocess.TimeoutExpired:
                daemon.process.kill()
                daemon.process.wait(10)
                daemon.exit_code = None

    def kill(self) -> None:
        for daemon in self.daemons:
            if daemon.process.poll() is None:
                daemon.process.kill()
                daemon.process.wait(10)


def http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def scrape(port: int) -> tuple[dict[str, list[float]], dict[str, float]] | None:
    """A daemon's end-to-end histogram (per projection: counts per bucket of
    LATENCY_BOUNDS plus +Inf, not cumulative) and projection errors."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    cumulative: dict[str, dict[float, float]] = {}
    errors: dict[str, float] = {}
    bucket_name = metric_names.EVENT_END_TO_END + "_bucket"
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == bucket_name:
                projection = sample.labels["projection_name"]
                cumulative.setdefault(projection, {})[float(sample.labels["le"])] = sample.value
            elif sample.name == metric_names.PROJECTION_ERRORS:
                projection = sample.labels["projection_name"]
                errors[projection] = errors.get(projection, 0.0) + sample.value
    histograms: dict[str, list[float]] = {}
    for projection, by_bound in cumulative.items():
        running = [by_bound.get(bound, 0.0) for bound in (*LATENCY_BOUNDS, math.inf)]
        histograms[projection] = [
            running[i] - (running[i - 1] if i else 0.0) for i in range(len(running))
        ]
    return histograms, errors


# ---------------------------------------------------------------- sampling


@dataclass
class Sample:
    at: float
    applied: dict[str, int]
    behind: dict[str, int]
    seconds_behind: dict[str, float]
    oldest_unapplied: dict[str, float]
    dead_letters: dict[str, int]
    owners: dict[str, str | None]
    rss_kb: dict[str, int | None]
    """By daemon owner."""
    e2e_buckets: dict[str, list[float]]
    """By projection, summed over the daemons."""
    projection_errors: dict[str, float]

    def caught_up(self, names: list[str]) -> bool:
        return all(self.behind.get(name) == 0 for name in names)


# Per projection: events applied, events behind, seconds behind (as the
# view defines it: the newest recorded event minus the newest applied one,
# which after a quiet spell is the length of the spell, not a wait), dead
# letters, owner; and the age of the oldest event it has not applied yet
# (since its append began: recorded_at is the append transaction's start).
STATUS_QUERY = """
SELECT s.name, s.events_applied, s.events_behind, s.seconds_behind::float8, s.dead_letters,
       s.owner, coalesce(extract(epoch FROM clock_timestamp() - o.oldest), 0)::float8
FROM aura.projection_status s
JOIN aura.projection_checkpoints c ON c.name = s.name
LEFT JOIN LATERAL (
    SELECT min(e.recorded_at) AS oldest FROM aura.events e
    WHERE (e.transaction_id, e.global_position) > (c.transaction_id, c.global_position)
      AND (c.event_types IS NULL OR e.type = ANY (c.event_types))
) AS o ON true
WHERE s.name = ANY(%(names)s)
"""


class Sampler:
    def __init__(self, dsn: str, names: list[str], daemons: Daemons) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True, application_name="scenario sampler")
        self.names = names
        self.daemons = daemons

    def close(self) -> None:
        self.conn.close()

    def sample(self) -> Sample:
        rows = self.conn.execute(STATUS_QUERY, {"names": self.names}).fetchall()
        # After the query: every event it counted as applied was appended
        # (its append had started) before this instant.
        at = time.time()
        rss = {d.owner: proc_status_kb(d.pid, "VmRSS") for d in self.daemons.daemons}
        buckets: dict[str, list[float]] = {}
        errors: dict[str, float] = {}
        for daemon in self.daemons.daemons:
            scraped = scrape(daemon.port) if daemon.port is not None else None
            if scraped is None:
                continue
            for projection, counts in scraped[0].items():
                total = buckets.setdefault(projection, [0.0] * len(counts))
                buckets[projection] = [x + y for x, y in zip(total, counts, strict=True)]
            for projection, count in scraped[1].items():
                errors[projection] = errors.get(projection, 0.0) + count
        return Sample(
            at=at,
            applied={r[0]: int(r[1]) for r in rows},
            behind={r[0]: int(r[2]) for r in rows},
            seconds_behind={r[0]: float(r[3]) for r in rows},
            oldest_unapplied={r[0]: float(r[6]) for r in rows},
            dead_letters={r[0]: int(r[4]) for r in rows},
            owners={r[0]: r[5] for r in rows},
            rss_kb=rss,
            e2e_buckets=buckets,
            projection_errors=errors,
        )

    def wait_owned_and_caught_up(self, timeout: float) -> Sample:
        owners = set(self.daemons.by_owner())
        deadline = time.monotonic() + timeout
        while True:
            self.daemons.check_alive()
            sample = self.sample()
            if sample.caught_up(self.names) and all(
                sample.owners.get(name) in owners for name in self.names
            ):
                return sample
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"projections not owned by the run's daemons and caught up within "
                    f"{timeout:.0f}s: owners {sample.owners}, behind {sample.behind}"
                )
            time.sleep(0.1)


# ---------------------------------------------------------------- a phase


@dataclass
class PhaseRun:
    name: str
    prefix: str
    start: float
    """Wall clock of second 0."""
    duration: float
    load_end: float
    """When the last writer had ended."""
    end: float
    caught_up: bool
    dues: list[float]
    """Due offsets of the scheduled debates (empty: unthrottled)."""
    records: Chunk
    samples: list[Sample]
    writer_failures: list[str] = field(default_factory=list)


def run_phase(
    name: str,
    args: argparse.Namespace,
    dsn: str,
    profile: Profile | None,
    duration: float,
    sampler: Sampler,
    prefix: str,
) -> PhaseRun:
    """Run the writers on ``profile`` (None: unthrottled) for ``duration``
    seconds, sampling every second, then until the projections caught up."""
    writers: int = args.writers
    dues = profile.due_offsets() if profile is not None else []
    ctx = mp.get_context("spawn")
    messages = ctx.Queue()
    go = ctx.Event()
    start_at = ctx.Value("d", 0.0)
    processes = []
    for writer in range(writers):
        schedule = (
            tuple((k + 1, due) for k, due in enumerate(dues) if k % writers == writer)
            if profile is not None
            else None
        )
        plan = WriterPlan(
            dsn=dsn,
            writer=writer,
            writers=writers,
            prefix=prefix,
            seed=args.seed,
            agents=args.agents,
            in_flight=args.in_flight,
            duration=duration,
            schedule=schedule,
        )
        processes.append(
            ctx.Process(target=writer_main, args=(plan, messages, go, start_at), daemon=True)
        )
    records = Chunk(-1)
    done: set[int] = set()
    failures: list[str] = []

    def handle(message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "chunk":
            records.extend(message[1])
        elif kind == "done":
            done.add(message[1])
        elif kind == "failed":
            done.add(message[1])
            failures.append(f"writer {message[1]}: {message[2]}")

    def pump(until: float) -> None:
        """Take the writers' messages until ``until`` (wall clock)."""
        while True:
            timeout = until - time.time()
            try:
                message = messages.get(timeout=timeout) if timeout > 0 else messages.get_nowait()
            except queue.Empty:
                return
            handle(message)

    try:
        for process in processes:
            process.start()
        ready = 0
        deadline = time.monotonic() + 120
        while ready + len(failures) < writers:
            if time.monotonic() > deadline:
                raise RuntimeError("the writers did not connect within 120 s")
            try:
                message = messages.get(timeout=1.0)
            except queue.Empty:
                continue
            if message[0] == "ready":
                ready += 1
            else:
                handle(message)
        if failures:
            raise RuntimeError("; ".join(failures))

        start = time.time() + 0.5
        start_at.value = start
        go.set()
        pump(start - 0.2)
        samples = [sampler.sample()]  # the baseline, before any debate starts
        load_end: float | None = None
        caught_up = False
        next_progress = 5
        k = 1
        while True:
            pump(start + k * SAMPLE_INTERVAL)
            sampler.daemons.check_alive()
            for writer, process in enumerate(processes):
                if writer not in done and process.exitcode is not None:
                    pump(time.time())  # its last messages, if any
                    if writer not in done:
                        done.add(writer)
                        failures.append(f"writer {writer} exited with {process.exitcode}")
            if load_end is None and len(done) == writers:
                load_end = time.time()  # every append has returned: the drain begins
            sample = sampler.sample()
            samples.append(sample)
            if load_end is not None:
                if sample.caught_up(sampler.names):
                    caught_up = True
                    break
                if time.time() - load_end > args.drain_timeout:
                    break
            if k >= next_progress:
                print_progress(k, records, sample, sampler.names, load_end is not None)
                next_progress += 5
            k += 1
        pump(time.time())
        end = time.time()
    finally:
        go.set()
        for process in processes:
            process.join(30)
            if process.is_alive():
                process.kill()
                process.join()
    for writer, process in enumerate(processes):
        if process.exitcode not in (0, None) and not any(
            f.startswith(f"writer {writer} ") for f in failures
        ):
            failures.append(f"writer {writer} exited with {process.exitcode}")
    return PhaseRun(
        name=name,
        prefix=prefix,
        start=start,
        duration=duration,
        load_end=load_end if load_end is not None else end,
        end=end,
        caught_up=caught_up,
        dues=dues,
        records=records,
        samples=samples,
        writer_failures=failures,
    )


def print_progress(
    second: int, records: Chunk, sample: Sample, names: list[str], draining: bool
) -> None:
    appended = sum(r[2] for r in records.appends if r[3] == APPENDED)
    started = sum(1 for d in records.debates if d[2] is not None)
    behind = max(sample.behind.values(), default=0)
    lag = max(sample.oldest_unapplied.values(), default=0.0)
    rss = ", ".join(f"{kb / MIB:.0f}" if kb is not None else "?" for kb in sample.rss_kb.values())
    print(
        f"  {second:>5} s  {'draining; ' if draining else ''}debates started {started}, "
        f"events appended {appended}, most behind {behind} events / oldest {lag:.2f} s, "
        f"daemon RSS {rss} MiB",
        flush=True,
    )


# ---------------------------------------------------------------- end-to-end

# Per projection: (commit time of the event's transaction, commit time of
# the read-model transaction that wrote the row), in epoch seconds, for the
# events that own a row of its model. {schema} is the projection's schema.
E2E_QUERIES: dict[str, str] = {
    "agent_performance": """
        SELECT extract(epoch FROM pg_xact_commit_timestamp(e.xmin))::float8,
               extract(epoch FROM pg_xact_commit_timestamp(m.row_xmin))::float8
        FROM (SELECT a.global_position, a.xmin AS row_xmin FROM {schema}.agent_activity a
              WHERE a.stream_id = ANY(%(streams)s)
              UNION ALL
              SELECT d.global_position, d.xmin FROM {schema}.debate_endings d
              WHERE d.stream_id = ANY(%(streams)s)) AS m
        JOIN aura.events e ON e.global_position = m.global_position
    """,
    "debate_state": """
        SELECT extract(epoch FROM pg_xact_commit_timestamp(e.xmin))::float8,
               extract(epoch FROM pg_xact_commit_timestamp(f.xmin))::float8
        FROM {schema}.debate_fold f
        JOIN aura.events e ON e.stream_id = f.stream_id AND e.version = f.last_version
        WHERE f.stream_id = ANY(%(streams)s)
        UNION ALL
        SELECT extract(epoch FROM pg_xact_commit_timestamp(e.xmin))::float8,
               extract(epoch FROM pg_xact_commit_timestamp(l.xmin))::float8
        FROM {schema}.decision_links l
        JOIN aura.events e ON e.global_position = l.global_position
        WHERE l.stream_id = ANY(%(streams)s)
    """,
    "stream_summary": """
        SELECT extract(epoch FROM pg_xact_commit_timestamp(e.xmin))::float8,
               extract(epoch FROM pg_xact_commit_timestamp(s.xmin))::float8
        FROM {schema}.streams s
        JOIN aura.events e ON e.stream_id = s.stream_id AND e.version = s.last_version
        WHERE s.stream_id = ANY(%(streams)s)
    """,
}


def live_schemas(conn: psycopg.Connection[Any], names: list[str]) -> dict[str, str]:
    rows = conn.execute(
        "SELECT name, schema_name FROM aura.projection_checkpoints "
        "WHERE name = ANY(%(names)s) AND rebuild_of IS NULL",
        {"names": names},
    ).fetchall()
    return {str(r[0]): str(r[1]) for r in rows}


def commit_timestamp_e2e(
    dsn: str, names: list[str], streams: list[str]
) -> dict[str, list[tuple[float, float]]] | None:
    """Per projection: (event commit time, seconds to the read-model commit);
    None when the server does not track commit timestamps."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SHOW track_commit_timestamp").fetchone()
        if not row or row[0] != "on":
            return None
        schemas = live_schemas(conn, names)
        found: dict[str, list[tuple[float, float]]] = {}
        for name, query in E2E_QUERIES.items():
            if name not in schemas:
                continue
            rows = conn.execute(
                sql.SQL(query).format(schema=sql.Identifier(schemas[name])),
                {"streams": streams},
            ).fetchall()
            found[name] = sorted(
                (float(event_at), float(model_at) - float(event_at))
                for event_at, model_at in rows
                if event_at is not None and model_at is not None
            )
    return found


# ---------------------------------------------------------------- verification

# Domain facts recorded more than once in the run's streams: one start per
# debate, one join per agent, one argument per agent and round, one
# completion per round, one vote per agent, one ending per debate, one
# proposal and one outcome per decision.
DOMAIN_DUPLICATES = """
SELECT e.stream_id,
       CASE WHEN e.type IN ('DEBATE_CONSENSUS_REACHED', 'DEBATE_FAILED', 'DEBATE_TIMED_OUT')
            THEN 'DEBATE_ENDED'
            WHEN e.type IN ('DECISION_APPROVED', 'DECISION_REJECTED') THEN 'DECISION_DECIDED'
            ELSE e.type END AS fact,
       e.data ->> 'agent_id' AS agent, e.data ->> 'round' AS round, count(*) AS times
FROM aura.events e
WHERE e.stream_id = ANY(%(streams)s) OR e.stream_id LIKE ANY(%(patterns)s)
GROUP BY 1, 2, 3, 4
HAVING count(*) > 1
ORDER BY 1, 2, 3, 4
LIMIT 20
"""

# The run's events: reported but not stored as reported; stored but never
# reported; stored in all; event ids stored more than once.
EVENT_CHECKS = """
WITH stored AS (
    SELECT e.global_position, e.event_id, e.stream_id, e.version
    FROM aura.events e
    WHERE e.stream_id = ANY(%(streams)s) OR e.stream_id LIKE ANY(%(patterns)s)
)
SELECT
    (SELECT count(*) FROM scenario_reported r
     WHERE NOT EXISTS (SELECT 1 FROM aura.events e
                       WHERE e.global_position = r.global_position AND e.event_id = r.event_id
                         AND e.stream_id = r.stream_id AND e.version = r.version)),
    (SELECT count(*) FROM stored s
     WHERE NOT EXISTS (SELECT 1 FROM scenario_reported r WHERE r.event_id = s.event_id)),
    (SELECT count(*) FROM stored),
    (SELECT count(*) FROM (SELECT s.event_id FROM stored s
                           GROUP BY s.event_id HAVING count(*) > 1) AS d)
"""


def run_streams(phases: list[PhaseRun]) -> tuple[list[str], list[str]]:
    """The streams the run's debates may have written (debate and decision
    streams of every debate that started), and LIKE patterns of its debate
    streams."""
    streams: set[str] = set()
    for phase in phases:
        for index, _due, started, _ended, _outcome in phase.records.debates:
            if started is None:
                continue
            identifier = debate_id(phase.prefix, index)
            streams.add(debate_stream(identifier))
            streams.add(decision_stream(decision_id_for(identifier)))
        streams.update(e[1] for e in phase.records.events)
    patterns = [debate_stream(f"{phase.prefix}-%") for phase in phases]
    return sorted(streams), patterns


def verify_events(
    dsn: str, events: list[EventRecord], streams: list[str], patterns: list[str]
) -> tuple[dict[str, Any], list[str]]:
    """Every event a writer was told was recorded is in aura.events with
    that id, stream, version and position, once; the run's streams hold no
    other event; no domain fact was recorded twice."""
    reported = {e[0]: e for e in events}
    params = {"streams": streams, "patterns": patterns}
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TEMP TABLE scenario_reported "
            "(event_id uuid PRIMARY KEY, stream_id text, version bigint, global_position bigint)"
        )
        with conn.cursor().copy(
            "COPY scenario_reported (event_id, stream_id, version, global_position) FROM STDIN"
        ) as copy:
            for record in reported.values():
                copy.write_row(record)
        row = conn.execute(EVENT_CHECKS, params).fetchone()
        assert row is not None
        missing, unreported, stored, ids_twice = (int(x) for x in row)
        duplicates = conn.execute(DOMAIN_DUPLICATES, params).fetchall()
    figures: dict[str, Any] = {
        "reported": len(reported),
        "reported_again": len(events) - len(reported),
        "stored": stored,
        "missing": missing,
        "unreported": unreported,
        "ids_twice": ids_twice,
        "domain_duplicates": len(duplicates),
    }
    problems: list[str] = []
    if missing:
        problems.append(f"{missing} events the writers were told were recorded are not stored so")
    if unreported:
        problems.append(f"{unreported} events in the run's streams were never reported recorded")
    if stored != len(reported):
        problems.append(f"the run's streams hold {stored} events; reported: {len(reported)}")
    if ids_twice:
        problems.append(f"{ids_twice} event ids stored more than once")
    for stream_id, fact, agent, round_, times in duplicates[:10]:
        problems.append(
            f"{stream_id}: {fact} recorded {times} times"
            + (f" (agent {agent})" if agent else "")
            + (f" (round {round_})" if round_ else "")
        )
    return figures, problems


async def _rebuild_all(dsn: str, specs: list[ProjectionSpec]) -> list[RebuildResult | None]:
    return list(await asyncio.gather(*(rebuild(dsn, spec) for spec in specs)))


def base_tables(conn: psycopg.Connection[Any], schema: str) -> list[str]:
    rows = conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relkind IN ('r', 'p') AND NOT c.relispartition "
        "ORDER BY 1",
        (schema,),
    ).fetchall()
    return [str(r[0]) for r in rows]


TABLE_DIFFERENCE = """
SELECT (SELECT count(*) FROM (SELECT * FROM {a} EXCEPT ALL SELECT * FROM {b}) AS x),
       (SELECT count(*) FROM (SELECT * FROM {b} EXCEPT ALL SELECT * FROM {a}) AS y),
       (SELECT count(*) FROM {a})
"""


def rebuild_and_compare(
    dsn: str, specs: list[ProjectionSpec]
) -> tuple[list[dict[str, Any]], list[str]]:
    """Rebuild every projection blue/green and compare each table of the
    daemons' model (now SCHEMA__previous) with the rebuilt one."""
    names = [spec.name for spec in specs]
    with psycopg.connect(dsn, autocommit=True) as conn:
        before = live_schemas(conn, names)
    began = time.monotonic()
    results = asyncio.run(_rebuild_all(dsn, specs))
    print(f"rebuilt {', '.join(names)} in {time.monotonic() - began:.1f} s", flush=True)
    figures: list[dict[str, Any]] = []
    problems: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        after = live_schemas(conn, names)
        for spec, result in zip(specs, results, strict=True):
            name = spec.name
            if result is None:
                problems.append(f"{name}: the rebuild did not finish")
                continue
            previous, live = before[name] + "__previous", after[name]
            tables = base_tables(conn, previous)
            if tables != base_tables(conn, live):
                problems.append(f"{name}: {previous} and {live} have different tables")
                continue
            for table in tables:
                row = conn.execute(
                    sql.SQL(TABLE_DIFFERENCE).format(
                        a=sql.Identifier(previous, table), b=sql.Identifier(live, table)
                    )
                ).fetchone()
                assert row is not None
                only_daemons, only_rebuild, rows = int(row[0]), int(row[1]), int(row[2])
                figures.append(
                    {
                        "projection": name,
                        "table": table,
                        "rows": rows,
                        "only_in_daemons_model": only_daemons,
                        "only_in_rebuild": only_rebuild,
                        "rebuild_events": result.events_applied,
                        "rebuild_seconds": round(result.seconds, 3),
                    }
                )
                if only_daemons or only_rebuild:
                    problems.append(
                        f"{name}.{table}: {only_daemons} rows only in the daemons' model, "
                        f"{only_rebuild} only in the fresh rebuild"
                    )
    return figures, problems


# ---------------------------------------------------------------- the series


def row_of(times: list[float], at: float) -> int:
    """The row whose interval [times[i], times[i + 1]) holds ``at``; before
    the first, the first; after the last, the last."""
    return min(max(bisect.bisect_right(times, at) - 1, 0), max(len(times) - 2, 0))


def build_series(
    phase: PhaseRun,
    names: list[str],
    owners: list[str],
    events_per_debate: float,
    e2e: dict[str, list[tuple[float, float]]] | None,
) -> list[dict[str, Any]]:
    """One row per second from the start of the load to the end of the
    drain: row i runs from sample i to sample i + 1 (about a second apart;
    row 0 starts with the baseline sample, just before the first debate).
    Appends and commands go to the row in which they started, debates to the
    row they were due or started in, end-to-end figures to the row of the
    event's commit; checkpoint, lag and RSS figures are the sample at the end
    of the row, applied counts its change over the row. So an event applied
    by the end of a row was appended in it or before: cumulative applied
    never exceeds cumulative appended."""
    samples = phase.samples
    count = max(len(samples) - 1, 1)
    times = [sample.at for sample in samples]

    def buckets_of() -> list[list[Any]]:
        return [[] for _ in range(count)]

    appends, commands, lags, e2e_rows = buckets_of(), buckets_of(), buckets_of(), buckets_of()
    due_counts = [0] * count
    started, completed, not_started = [0] * count, [0] * count, [0] * count
    for offset in phase.dues:
        due_counts[row_of(times, phase.start + offset)] += 1
    for _index, due, began, ended, outcome in phase.records.debates:
        if began is None:
            not_started[row_of(times, due)] += int(outcome == NOT_STARTED)
            continue
        started[row_of(times, began)] += 1
        lags[row_of(times, began)].append(max(began - due, 0.0))
        if ended is not None and outcome != DEBATE_ERROR:
            completed[row_of(times, ended)] += 1
    for record in phase.records.appends:
        appends[row_of(times, record[0])].append(record)
    for command in phase.records.commands:
        commands[row_of(times, command[0])].append(command)
    for points in (e2e or {}).values():
        for event_at, seconds in points:
            if times[0] <= event_at < phase.end:
                e2e_rows[row_of(times, event_at)].append(seconds)

    rows: list[dict[str, Any]] = []
    for s in range(count):
        before, after = samples[min(s, len(samples) - 1)], samples[min(s + 1, len(samples) - 1)]
        in_second = appends[s]
        hist = [0.0] * (len(LATENCY_BOUNDS) + 1)
        for name in names:
            now_counts = after.e2e_buckets.get(name)
            then_counts = before.e2e_buckets.get(name)
            if now_counts is None:
                continue
            for i, value in enumerate(now_counts):
                hist[i] += value - (then_counts[i] if then_counts else 0.0)
        append_ms = quantiles_ms([r[1] for r in in_second])
        command_ms = quantiles_ms([c[1] for c in commands[s]])
        lag_ms = quantiles_ms(lags[s])
        width = max(after.at - before.at, 1e-6)
        rows.append(
            {
                "t": s,
                "from_s": round(before.at - phase.start, 3),
                "seconds": round(width, 3),
                "offered_debates": due_counts[s],
                "offered_debates_per_hour": due_counts[s] * 3600 / width,
                "offered_events": due_counts[s] * events_per_debate,
                "debates_started": started[s],
                "debates_completed": completed[s],
                "debates_not_started": not_started[s],
                "schedule_lag_ms_max": lag_ms["max"],
                "appends": len(in_second),
                "appended": sum(r[2] for r in in_second if r[3] == APPENDED),
                "append_ms": {k: append_ms[k] for k in ("p50", "p95", "p99")},
                "commands": len(commands[s]),
                "command_ms": {k: command_ms[k] for k in ("p50", "p95", "p99")},
                "conflicts": sum(1 for r in in_second if r[3] in (CONFLICT, IDEMPOTENCY_CONFLICT)),
                "duplicates": sum(r[2] for r in in_second if r[3] == DUPLICATE),
                "errors": sum(1 for r in in_second if r[3] == FAILED)
                + sum(1 for c in commands[s] if not c[4])
                + int(
                    sum(after.projection_errors.values()) - sum(before.projection_errors.values())
                ),
                "applied": {n: after.applied.get(n, 0) - before.applied.get(n, 0) for n in names},
                "events_behind": {n: after.behind.get(n) for n in names},
                "seconds_behind": {n: after.seconds_behind.get(n) for n in names},
                "oldest_unapplied_s": {n: after.oldest_unapplied.get(n) for n in names},
                "rss_mib": {
                    o: (after.rss_kb[o] or 0) / MIB if after.rss_kb.get(o) else None for o in owners
                },
                "e2e_ms": {k: v for k, v in quantiles_ms(e2e_rows[s]).items() if k != "max"}
                if e2e is not None
                else None,
                "e2e_histogram_ms": histogram_ms(hist),
            }
        )
    return rows


# ---------------------------------------------------------------- summary


def events_per_completed_debate(phase: PhaseRun) -> float | None:
    """Events recorded per debate that ran to its end, in its debate and
    decision streams together."""
    completed: dict[str, str] = {}
    for index, _due, started, ended, outcome in phase.records.debates:
        if started is not None and ended is not None and outcome != DEBATE_ERROR:
            identifier = debate_id(phase.prefix, index)
            completed[debate_stream(identifier)] = identifier
            completed[decision_stream(decision_id_for(identifier))] = identifier
    if not completed:
        return None
    events = len({e[0] for e in phase.records.events if e[1] in completed})
    return events / len(set(completed.values()))


def summarize(
    phase: PhaseRun,
    names: list[str],
    daemons: Daemons,
    e2e: dict[str, list[tuple[float, float]]] | None,
) -> dict[str, Any]:
    records = phase.records
    debates = records.debates
    ran = [d for d in debates if d[2] is not None]
    finished = [d for d in ran if d[3] is not None and d[4] != DEBATE_ERROR]
    outcomes: dict[str, int] = {}
    for d in debates:
        outcomes[d[4]] = outcomes.get(d[4], 0) + 1
    appended = sum(r[2] for r in records.appends if r[3] == APPENDED)
    load_seconds = phase.duration
    first, last = phase.samples[0], phase.samples[-1]
    applied = {n: last.applied.get(n, 0) - first.applied.get(n, 0) for n in names}
    hist_total = [0.0] * (len(LATENCY_BOUNDS) + 1)
    hist_by_projection: dict[str, dict[str, float | None]] = {}
    for name in names:
        now_counts = last.e2e_buckets.get(name)
        if now_counts is None:
            continue
        then_counts = first.e2e_buckets.get(name) or [0.0] * len(now_counts)
        delta = [a - b for a, b in zip(now_counts, then_counts, strict=True)]
        hist_by_projection[name] = histogram_ms(delta)
        hist_total = [a + b for a, b in zip(hist_total, delta, strict=True)]
    e2e_points: dict[str, list[float]] = {}
    if e2e is not None:
        for name, points in e2e.items():
            e2e_points[name] = [s for at, s in points if phase.start <= at < phase.end]
    owners = daemons.by_owner()
    rss: dict[str, dict[str, Any]] = {}
    for owner, daemon in owners.items():
        values = [s.rss_kb[owner] for s in phase.samples if s.rss_kb.get(owner)]
        kb = [v for v in values if v is not None]
        rss[owner] = {
            "daemon": daemon.index,
            "pid": daemon.pid,
            "projections_owned": sorted(n for n in names if last.owners.get(n) == owner),
            "start_mib": kb[0] / MIB if kb else None,
            "max_mib": max(kb) / MIB if kb else None,
            "end_mib": kb[-1] / MIB if kb else None,
        }
    lags = sorted(max(d[2] - d[1], 0.0) for d in ran if d[2] is not None)
    projection_errors = sum(last.projection_errors.values()) - sum(first.projection_errors.values())
    return {
        "debates_offered": len(phase.dues) if phase.dues else len(ran),
        "debates_started": len(ran),
        "debates_completed": len(finished),
        "debates_not_started": outcomes.get(NOT_STARTED, 0),
        "debate_outcomes": outcomes,
        "events_appended": appended,
        "events_per_debate": events_per_completed_debate(phase),
        "load_seconds": load_seconds,
        "writers_ended_after_seconds": round(phase.load_end - phase.start, 2),
        "drain_seconds": round(phase.end - phase.load_end, 2),
        "caught_up": phase.caught_up,
        "offered_debates_per_hour": (len(phase.dues) if phase.dues else len(ran))
        * 3600
        / load_seconds,
        "started_debates_per_hour": len(ran) * 3600 / load_seconds,
        "completed_debates_per_hour": len(finished) * 3600 / load_seconds,
        "appended_events_per_second": appended / load_seconds,
        "schedule_lag_ms": quantiles_ms(lags) if phase.dues else None,
        "appends": len(records.appends),
        "append_ms": quantiles_ms([r[1] for r in records.appends]),
        "append_ms_by_outcome": {
            outcome: quantiles_ms([r[1] for r in records.appends if r[3] == outcome])
            for outcome in sorted({r[3] for r in records.appends})
        },
        "commands": len(records.commands),
        "command_ms": quantiles_ms([c[1] for c in records.commands]),
        "conflicts": sum(1 for r in records.appends if r[3] in (CONFLICT, IDEMPOTENCY_CONFLICT)),
        "conflicts_retried_by_commands": sum(c[3] for c in records.commands),
        "duplicates": sum(r[2] for r in records.appends if r[3] == DUPLICATE),
        "writer_errors": records.error_count,
        "failed_debates": outcomes.get(DEBATE_ERROR, 0),
        "failed_commands": sum(1 for c in records.commands if not c[4]),
        "failed_appends": sum(1 for r in records.appends if r[3] == FAILED),
        "projection_errors": int(projection_errors),
        "dead_letters": sum(last.dead_letters.values()),
        "error_messages": records.errors + phase.writer_failures,
        "applied": applied,
        "applied_per_second": {n: applied[n] / load_seconds for n in names},
        "max_events_behind": {n: max(s.behind.get(n, 0) for s in phase.samples) for n in names},
        "max_seconds_behind": {
            n: max(s.seconds_behind.get(n, 0.0) for s in phase.samples) for n in names
        },
        "max_oldest_unapplied_s": {
            n: max(s.oldest_unapplied.get(n, 0.0) for s in phase.samples) for n in names
        },
        "e2e_source": "commit timestamps" if e2e is not None else "daemon histogram",
        "e2e_ms": (
            {
                "all": quantiles_ms([s for points in e2e_points.values() for s in points]),
                **{name: quantiles_ms(points) for name, points in e2e_points.items()},
            }
            if e2e is not None
            else None
        ),
        "e2e_histogram_ms": {"all": histogram_ms(hist_total), **hist_by_projection},
        "daemons": rss,
    }


# ---------------------------------------------------------------- output


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def print_summary(result: dict[str, Any]) -> None:
    summary = result["summary"]
    params = result["parameters"]
    per_debate = summary["events_per_debate"]
    print()
    print(f"scenario {result['scenario']}: {result['description']}")
    if result.get("capacity"):
        cap = result["capacity"]
        print(f"capacity: {fmt(cap['debates_per_hour'], 0)} debates/h ({cap['source']})")
    print(
        f"{params['writers']} writer processes x {params['in_flight']} debates in flight, "
        f"{params['agents']} agents; {len(result['daemons'])} projector daemon(s), "
        f"placement {params['placement']}; Postgres {result['server']['server_version']}, "
        f"{result['machine']['cores']} cores"
    )
    if per_debate:
        print(
            f"events per debate: {per_debate:.1f} on average, so 1,000 debates/h = "
            f"{1000 * per_debate / 3600:.1f} events/s"
        )
    print()
    print(f"{'':<26}{'offered':>12}{'achieved':>12}")
    print(
        f"{'debates/h':<26}{fmt(summary['offered_debates_per_hour'], 0):>12}"
        f"{fmt(summary['completed_debates_per_hour'], 0):>12}   (completed)"
    )
    offered_events = summary["offered_debates_per_hour"] / 3600 * per_debate if per_debate else None
    print(
        f"{'events/s':<26}{fmt(offered_events):>12}"
        f"{fmt(summary['appended_events_per_second']):>12}   (appended)"
    )
    print(
        f"{'debates':<26}{summary['debates_offered']:>12}{summary['debates_started']:>12}   "
        f"(started; {summary['debates_completed']} completed, "
        f"{summary['debates_not_started']} not started in time)"
    )
    print(f"outcomes: {summary['debate_outcomes']}; events appended {summary['events_appended']}")
    lag = summary["schedule_lag_ms"]
    if lag:
        print(
            f"schedule lag (start - due) ms: p50 {fmt(lag['p50'])}, p95 {fmt(lag['p95'])}, "
            f"max {fmt(lag['max'])}"
        )
    print(
        f"writers ended {summary['writers_ended_after_seconds']:.1f} s after the start; "
        f"the projections {'were caught up' if summary['caught_up'] else 'had NOT caught up'} "
        f"at the sample {summary['drain_seconds']:.1f} s later (sampled each second)"
    )
    print()
    print(f"{'latency ms':<44}{'p50':>9}{'p95':>9}{'p99':>9}{'max':>9}{'samples':>9}")

    def latency(label: str, q: dict[str, Any]) -> None:
        print(
            f"{label:<44}{fmt(q.get('p50'), 2):>9}{fmt(q.get('p95'), 2):>9}"
            f"{fmt(q.get('p99'), 2):>9}{fmt(q.get('max'), 2):>9}{fmt(q.get('samples'), 0):>9}"
        )

    latency("append (EventStore.append)", summary["append_ms"])
    for outcome, q in summary["append_ms_by_outcome"].items():
        latency(f"  append: {outcome}", q)
    latency("command (repository, retries included)", summary["command_ms"])
    if summary["e2e_ms"]:
        for name, q in summary["e2e_ms"].items():
            latency(f"end-to-end, commit timestamps: {name}", q)
    for name, q in summary["e2e_histogram_ms"].items():
        latency(f"end-to-end, daemon histogram: {name}", q)
    print()
    print(
        f"{'projection':<20}{'applied':>9}{'applied/s':>11}{'max behind':>12}"
        f"{'max lag s':>11}{'max age s':>11}  owner"
    )
    for name in result["projections"]:
        owner = next(
            (
                f"daemon {d['daemon']}"
                for d in summary["daemons"].values()
                if name in d["projections_owned"]
            ),
            "?",
        )
        print(
            f"{name:<20}{summary['applied'][name]:>9}"
            f"{fmt(summary['applied_per_second'][name]):>11}"
            f"{summary['max_events_behind'][name]:>12}"
            f"{fmt(summary['max_seconds_behind'][name], 2):>11}"
            f"{fmt(summary['max_oldest_unapplied_s'][name], 2):>11}  {owner}"
        )
    print(
        "(max lag s: seconds_behind of aura.projection_status; max age s: the oldest "
        "unapplied event's age; both sampled each second)"
    )
    print()
    print(f"{'daemon':<8}{'pid':>8}{'RSS MiB start':>15}{'max':>8}{'end':>8}{'exit':>6}  runs")
    for daemon in result["daemons"]:
        figures = summary["daemons"][daemon["owner"]]
        print(
            f"{daemon['index']:<8}{daemon['pid']:>8}{fmt(figures['start_mib']):>15}"
            f"{fmt(figures['max_mib']):>8}{fmt(figures['end_mib']):>8}"
            f"{daemon['exit_code'] if daemon['exit_code'] is not None else '?':>6}  "
            f"{', '.join(daemon['projections'])}"
        )
    print()
    print(
        f"conflicts retried {summary['conflicts']}, duplicates {summary['duplicates']}, "
        f"errors: {summary['failed_debates']} failed debates, "
        f"{summary['failed_commands']} failed commands, "
        f"{summary['failed_appends']} failed appends, "
        f"{summary['projection_errors']} projection errors, "
        f"{summary['dead_letters']} dead letters, "
        f"{sum(d['log_errors'] for d in result['daemons'])} daemon log errors, "
        f"{sum(d['log_warnings'] for d in result['daemons'])} warnings"
    )
    for message in summary["error_messages"][:10]:
        print(f"  {message}")


def plot(path: Path, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["series"]
    names = result["projections"]
    t = [r["from_s"] for r in rows]

    def series(values: list[float | None]) -> list[float]:
        return [math.nan if v is None else float(v) for v in values]

    fig, axes = plt.subplots(4, 1, sharex=True, figsize=(11, 13))

    def per_second(counts: list[float]) -> list[float]:
        """A row's counts over its width (about a second; longer when the
        sampler was late)."""
        return [count / row["seconds"] for count, row in zip(counts, rows, strict=True)]

    ax = axes[0]
    ax.plot(
        t, per_second([r["offered_events"] for r in rows]), label="offered", color="black", ls="--"
    )
    ax.plot(
        t,
        per_second([r["appended"] for r in rows]),
        label="appended",
        color="black",
        lw=3,
        alpha=0.4,
    )
    for index, name in enumerate(names):
        ax.plot(
            t,
            per_second([r["applied"][name] for r in rows]),
            label=f"applied: {name}",
            color=f"C{index}",
        )
    ax.set_ylabel("events/s (offered: debates due x events/debate)")
    ax.set_title(f"{result['scenario']}: {result['description']}")
    ax.legend(fontsize="small", ncol=2)

    ax = axes[1]
    # Markers: at low rates most seconds have no sample, and a line alone
    # would not show a point between two gaps.
    marks: dict[str, Any] = {"marker": "o", "markersize": 2.5}
    ax.plot(
        t, series([r["append_ms"]["p95"] for r in rows]), label="append p95", color="black", **marks
    )
    ax.plot(
        t,
        series([r["command_ms"]["p95"] for r in rows]),
        label="command p95",
        color="grey",
        **marks,
    )
    source = "e2e_ms" if result["summary"]["e2e_ms"] else "e2e_histogram_ms"
    for key, style in (("p50", ":"), ("p95", "-"), ("p99", "--")):
        ax.plot(
            t,
            series([r[source][key] if r[source] else None for r in rows]),
            label=f"end-to-end {key}",
            color="tab:red",
            ls=style,
            **marks,
        )
    ax.set_yscale("log")
    ax.set_ylabel("ms")
    ax.legend(fontsize="small", ncol=3)

    ax = axes[2]
    twin = ax.twinx()
    for index, name in enumerate(names):
        color = f"C{index}"
        ax.plot(t, series([r["events_behind"][name] for r in rows]), color=color, label=name)
        twin.plot(t, series([r["oldest_unapplied_s"][name] for r in rows]), color=color, ls="--")
    ax.set_ylabel("events behind (solid)")
    twin.set_ylabel("oldest unapplied event's age, s (dashed)")
    ax.legend(fontsize="small", ncol=2)

    ax = axes[3]
    for daemon in result["daemons"]:
        owner = daemon["owner"]
        ax.plot(
            t,
            series([r["rss_mib"].get(owner) for r in rows]),
            label=f"daemon {daemon['index']} ({', '.join(daemon['projections'])})",
        )
    ax.set_ylabel("RSS MiB")
    ax.set_xlabel("seconds")
    ax.legend(fontsize="small")

    load_end = result["summary"]["writers_ended_after_seconds"]
    for ax in axes:
        ax.axvline(load_end, color="grey", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------- main


def describe(args: argparse.Namespace) -> str:
    if args.scenario == "sustained":
        return f"{args.rate:,.0f} debates/h for {args.duration:g} s"
    if args.scenario == "spike":
        hold = f", then {args.hold:g} s at {args.to_rate:,.0f}" if args.hold else ""
        return f"{args.from_rate:,.0f} to {args.to_rate:,.0f} debates/h over {args.ramp:g} s{hold}"
    return f"{args.fraction:g} x capacity for {args.duration:g} s"


def run(args: argparse.Namespace, dsn: str, log_dir: Path) -> dict[str, Any]:
    migrate.upgrade(dsn)
    catalog = load_catalog()
    specs = list(catalog.select(args.projections) if args.projections else catalog.projections)
    names = [spec.name for spec in specs]
    asyncio.run(ProjectorDaemon(dsn, specs).register())
    result: dict[str, Any] = {
        "scenario": args.scenario,
        "parameters": {
            k: v for k, v in vars(args).items() if k not in ("dsn", "out", "plot", "daemon_args")
        }
        | {"daemon_args": args.daemon_args, "dsn_given": args.dsn is not None},
        "machine": machine_info(),
        "server": server_info(dsn),
        "projections": names,
    }

    daemons = Daemons(
        dsn, names, args.daemons, args.placement, log_dir, shlex.split(args.daemon_args)
    )
    run_id = uuid.uuid4().hex[:6]
    phases: list[PhaseRun] = []
    sampler: Sampler | None = None
    try:
        daemons.start()
        daemons.wait_ready(60)
        sampler = Sampler(dsn, names, daemons)
        sampler.wait_owned_and_caught_up(args.drain_timeout)
        print(
            "daemons: "
            + "; ".join(
                f"{d.index} (pid {d.pid}, metrics port {d.port}): {', '.join(d.projections)}"
                for d in daemons.daemons
            ),
            flush=True,
        )
        if args.scenario == "sustained":
            profile = Profile(args.rate, args.rate, 0.0, args.duration)
        elif args.scenario == "spike":
            profile = Profile(args.from_rate, args.to_rate, args.ramp, args.ramp + args.hold)
        else:
            if args.capacity is not None:
                capacity = float(args.capacity)
                result["capacity"] = {"debates_per_hour": capacity, "source": "given (--capacity)"}
            else:
                print(
                    f"measuring capacity: unthrottled for {args.probe_duration:g} s "
                    f"({args.writers} writers x {args.in_flight} debates in flight)",
                    flush=True,
                )
                probe = run_phase(
                    "probe", args, dsn, None, args.probe_duration, sampler, f"scn{run_id}p"
                )
                phases.append(probe)
                completed = sum(
                    1 for d in probe.records.debates if d[3] is not None and d[4] != DEBATE_ERROR
                )
                capacity = completed * 3600 / args.probe_duration
                result["capacity"] = {
                    "debates_per_hour": capacity,
                    "source": f"measured in this run: debates completed by an unthrottled run "
                    f"of {args.probe_duration:g} s ({args.writers} writers x "
                    f"{args.in_flight} debates in flight)",
                    "probe": summarize(probe, names, daemons, None),
                }
                if not probe.caught_up:
                    raise RuntimeError("the projections did not catch up after the probe")
                if capacity <= 0:
                    raise RuntimeError("the probe completed no debate: no capacity to soak at")
            rate = args.fraction * capacity
            profile = Profile(rate, rate, 0.0, args.duration)
        duration = profile.duration
        result["description"] = describe(args)
        print(f"{args.scenario}: {result['description']}", flush=True)
        phase = run_phase(args.scenario, args, dsn, profile, duration, sampler, f"scn{run_id}")
        phases.append(phase)
    finally:
        if sampler is not None:
            sampler.close()
        daemons.stop()
    result["daemons"] = [
        {
            "index": d.index,
            "owner": d.owner,
            "pid": d.pid,
            "projections": d.projections,
            "metrics_port": d.port,
            "exit_code": d.exit_code,
            "log_errors": sum(1 for e in d.log_lines() if e.get("level") in ("error", "critical")),
            "log_warnings": sum(1 for e in d.log_lines() if e.get("level") == "warning"),
            "log_messages": [
                str(e.get("event"))
                for e in d.log_lines()
                if e.get("level") in ("warning", "error", "critical")
            ][:10],
        }
        for d in daemons.daemons
    ]

    problems: list[str] = []
    for d in result["daemons"]:
        if d["exit_code"] != 0:
            problems.append(f"daemon {d['index']} exited with {d['exit_code']}")
    for p in phases:
        problems += p.writer_failures
        if not p.caught_up:
            problems.append(
                f"{p.name}: the projections did not catch up within {args.drain_timeout:g} s"
            )

    streams, patterns = run_streams(phases)
    e2e = commit_timestamp_e2e(dsn, names, streams)
    summary = summarize(phase, names, daemons, e2e)
    result["summary"] = summary
    result["series"] = build_series(
        phase, names, [d.owner for d in daemons.daemons], summary["events_per_debate"] or 0.0, e2e
    )

    print("verifying: the events the writers were told were recorded, and a fresh rebuild")
    events = [e for p in phases for e in p.records.events]
    event_figures, event_problems = verify_events(dsn, events, streams, patterns)
    rebuild_figures, rebuild_problems = rebuild_and_compare(dsn, specs)
    problems += event_problems + rebuild_problems
    result["verification"] = {
        "events": event_figures,
        "read_models": rebuild_figures,
        "problems": problems,
        "verified": not problems,
    }
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dsn", help="an existing database instead of a throw-away cluster")
    common.add_argument(
        "--commit",
        choices=["durable", "async"],
        default="durable",
        help="throw-away cluster: durable commits (default) or synchronous_commit=off",
    )
    common.add_argument("--writers", type=int, default=3, help="writer processes (default 3)")
    common.add_argument(
        "--in-flight", type=int, default=4, help="debates at once per writer (default 4)"
    )
    common.add_argument("--agents", type=int, default=5, help="agents per debate pool (default 5)")
    common.add_argument("--seed", type=int, default=0, help="seed of the debate plans")
    common.add_argument("--daemons", type=int, default=2, help="projector daemons (default 2)")
    common.add_argument(
        "--placement",
        choices=["split", "all"],
        default="split",
        help="split: projections dealt out between the daemons (default); all: every daemon "
        "runs every projection, the first to lock one owns it",
    )
    common.add_argument(
        "--projections", nargs="+", metavar="NAME", help="catalog projections (default: all)"
    )
    common.add_argument(
        "--daemon-args",
        default="",
        help='extra options for `aura-pg project`, e.g. "--async-commit"',
    )
    common.add_argument(
        "--drain-timeout",
        type=float,
        default=120.0,
        help="seconds the projections get to catch up after the load (default 120)",
    )
    common.add_argument(
        "--out", type=Path, help="JSON result (default load/results/scenario-NAME.json)"
    )
    common.add_argument("--plot", type=Path, help="PNG plot (default: the --out path with .png)")
    sub = parser.add_subparsers(dest="scenario", required=True)
    p = sub.add_parser("sustained", parents=[common], help="a constant rate")
    p.add_argument("--rate", type=float, default=1000.0, help="debates/hour (default 1000)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds (default 60)")
    p = sub.add_parser("spike", parents=[common], help="a linear ramp")
    p.add_argument("--from-rate", type=float, default=100.0, help="debates/hour (default 100)")
    p.add_argument("--to-rate", type=float, default=10000.0, help="debates/hour (default 10000)")
    p.add_argument("--ramp", type=float, default=300.0, help="seconds (default 300)")
    p.add_argument("--hold", type=float, default=0.0, help="seconds at --to-rate (default 0)")
    p = sub.add_parser("soak", parents=[common], help="a fraction of capacity, for long")
    p.add_argument("--fraction", type=float, default=0.8, help="of capacity (default 0.8)")
    p.add_argument("--capacity", type=float, help="debates/hour (default: measure it first)")
    p.add_argument(
        "--probe-duration",
        type=float,
        default=30.0,
        help="seconds of the unthrottled capacity run (default 30)",
    )
    p.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    args = parser.parse_args(argv)
    if args.writers < 1 or args.in_flight < 1 or args.daemons < 1 or args.agents < 3:
        parser.error("--writers, --in-flight and --daemons must be >= 1, --agents >= 3")
    if args.scenario == "sustained" and (args.rate <= 0 or args.duration <= 0):
        parser.error("--rate and --duration must be positive")
    if args.scenario == "spike" and (
        args.from_rate < 0 or args.to_rate <= 0 or args.ramp <= 0 or args.hold < 0
    ):
        parser.error("--to-rate and --ramp must be positive, --from-rate and --hold >= 0")
    if args.scenario == "soak" and (
        not args.fraction > 0 or args.duration <= 0 or args.probe_duration <= 0
    ):
        parser.error("--fraction, --duration and --probe-duration must be positive")
    if args.out is None:
        args.out = LOAD_DIR / "results" / f"scenario-{args.scenario}.json"
    if args.plot is None:
        args.plot = args.out.with_suffix(".png")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    with contextlib.ExitStack() as stack:
        dsn = args.dsn
        if dsn is None:
            settings = {**benchmark_settings(args.commit), "track_commit_timestamp": "on"}
            dsn = stack.enter_context(temporary_cluster(settings, prefix="aura-pg-scenario-")).dsn()
        log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="scenario-logs-")))
        try:
            result = run(args, dsn, log_dir)
        except Exception:
            for log in sorted(log_dir.glob("*.log")):
                print(f"----- {log.name} (last lines)", file=sys.stderr)
                print(
                    "\n".join(log.read_text(errors="replace").splitlines()[-20:]), file=sys.stderr
                )
            raise
    result["seconds"] = round(time.monotonic() - began, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    plot(args.plot, result)
    print_summary(result)
    print(f"\nresults: {args.out}, plot: {args.plot} (the run took {result['seconds']:.0f} s)")
    verification = result["verification"]
    if not verification["verified"]:
        print("NOT verified:")
        for problem in verification["problems"]:
            print(f"  {problem}")
        return 1
    events = verification["events"]
    tables = verification["read_models"]
    print(
        f"{events['stored']} events stored, each as reported, none unreported, no duplicate; "
        f"{len(tables)} read-model tables equal to a fresh rebuild"
    )
    print("verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
