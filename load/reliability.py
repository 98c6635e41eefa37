"""The reliability suite: real faults, again and again, under a steady load
of retrying writers and two projector daemons; then proof that nothing was
lost, nothing duplicated, and every read model is exact.

    python load/reliability.py --rounds 200 --interval 4 --out rel.json

It runs on a throw-away cluster of its own (durable commits), since it
restarts the server. What runs meanwhile:

* ``--writers`` processes (load/reliability_writer.py) append batches of 1
  to ``--max-batch`` events with ``AppendRetry`` and log every event id
  and position the store reported (or, past the retry budget, the ids whose
  fate is unknown). Every ``--poison-every``-th event is a poison event.
* two ``aura-pg project`` daemons run both projections of
  load/projections/reliability.yaml (set-based and per event), so one owns
  and the other stands by; a supervisor restarts any daemon that exits.
* writers and daemons connect through a ``LatencyProxy``, so network faults
  reach them; this script's own checks connect directly.

Every ``--interval`` seconds (jittered) one fault, cycling through
``--faults``: kill -9 of a projection's owner (``kill_daemon``), Postgres
immediate shutdown and restart (``restart_postgres``), pg_terminate_backend
of the daemons' and the writers' sessions (``terminate_backends``), added
latency (``latency``) and a partition (``connection_loss``) through the
proxy. After each fault ends, its recovery time is measured: until every
writer has appended again and every projection has applied everything that
was committed when the fault ended.

At the end the writers stop, the daemons catch up and stop, and the script
checks, printing each figure and ending with "verified" or the problems:

* every event a writer was told was recorded is in ``aura.events`` exactly
  once, at the position it was told; no (writer, ordinal) is stored twice;
  no event is stored that no writer sent; events of appends that ran out of
  retries are stored at most once;
* each read model holds exactly the non-poison events (an EXCEPT both ways
  against the log, stream counts against a GROUP BY), and equals a fresh
  blue/green rebuild;
* each projection's pending dead letters are exactly the poison events;
* every daemon exit was one the run caused (kill -9) and SIGTERM stops
  each daemon with exit code 0.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import multiprocessing as mp
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo
from reliability_writer import writer_main
from scenario import aura_pg_command, machine_info, rebuild_and_compare

from aura_pg import migrate
from aura_pg.chaos import FailureInjector, Fault, LatencyProxy
from aura_pg.devtools.localdb import LocalCluster, temporary_cluster
from aura_pg.projection.catalog import load_catalog

REPO_ROOT = Path(__file__).resolve().parent.parent
CATALOG = REPO_ROOT / "load" / "projections" / "reliability.yaml"
PROJECTIONS = ["rel_set", "rel_each"]
FAULTS = ["kill_daemon", "restart_postgres", "terminate_backends", "latency", "connection_loss"]
DURABLE = {"fsync": "on", "synchronous_commit": "on", "max_wal_size": "'2GB'"}


# ------------------------------------------------------------------ daemons


@dataclass
class DaemonSlot:
    """One supervised `aura-pg project` daemon: restarted whenever it exits."""

    index: int
    process: subprocess.Popen[bytes]
    log_path: Path
    exits: list[int] = field(default_factory=list)
    killed_pids: set[int] = field(default_factory=set)


class Supervisor(threading.Thread):
    """Starts the daemons and restarts any that exits, after
    ``restart_delay`` (as systemd's Restart=always would)."""

    def __init__(self, dsn: str, count: int, log_dir: Path, restart_delay: float) -> None:
        super().__init__(name="supervisor", daemon=True)
        self.dsn = dsn
        self.log_dir = log_dir
        self.restart_delay = restart_delay
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.slots = [DaemonSlot(i, self._spawn(i), self._log(i)) for i in range(count)]
        self.restarts = 0

    def _log(self, index: int) -> Path:
        return self.log_dir / f"daemon-{index}.log"

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        with self._log(index).open("ab") as log:
            return subprocess.Popen(
                [
                    *aura_pg_command(), "project", *PROJECTIONS,
                    "--dsn", self.dsn, "--catalog", str(CATALOG),
                    "--poll-interval", "0.5", "--log-format", "json",
                ],
                cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip

    def expect_kill(self, pid: int) -> None:
        with self.lock:
            for slot in self.slots:
                if slot.process.pid == pid:
                    slot.killed_pids.add(pid)

    def run(self) -> None:
        while not self.stopping.wait(0.05):
            with self.lock:
                for slot in self.slots:
                    code = slot.process.poll()
                    if code is None:
                        continue
                    slot.exits.append(code)
                    if code == -signal.SIGKILL and slot.process.pid in slot.killed_pids:
                        pass  # the run killed it
                    else:
                        print(f"daemon {slot.index} exited on its own with {code}", flush=True)
                    time.sleep(self.restart_delay)
                    slot.process = self._spawn(slot.index)
                    self.restarts += 1

    def unexpected_exits(self) -> list[int]:
        return [code for slot in self.slots for code in slot.exits if code != -signal.SIGKILL]

    def kill(self) -> None:
        """SIGKILL every daemon still running (cleanup after a failed run)."""
        self.stopping.set()
        for slot in self.slots:
            if slot.process.poll() is None:
                slot.process.kill()
                slot.process.wait(10)

    def stop(self, timeout: float = 60.0) -> list[int | None]:
        """SIGTERM every daemon; their exit codes (None: had to be killed)."""
        self.stopping.set()
        self.join(5)
        codes: list[int | None] = []
        for slot in self.slots:
            slot.process.send_signal(signal.SIGTERM)
        for slot in self.slots:
            try:
                codes.append(slot.process.wait(timeout))
            except subprocess.TimeoutExpired:
                slot.process.kill()
                slot.process.wait(10)
                codes.append(None)
        return codes


# ------------------------------------------------------------------ writers


@dataclass
class Writers:
    processes: Sequence[mp.process.BaseProcess]
    last_ok: list[Synchronized[float]]
    logs: list[Path]
    stop: Any

    def kill(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.kill()
                process.join(10)


def start_writers(dsn: str, args: argparse.Namespace, log_dir: Path) -> Writers:
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    last_ok = [ctx.Value("d", 0.0) for _ in range(args.writers)]
    logs = [log_dir / f"writer-{n}.jsonl" for n in range(args.writers)]
    processes = []
    for n in range(args.writers):
        options = (args.max_batch, args.poison_every, args.retry_budget, args.rate)
        writer_args = (dsn, n, args.seed, stop, str(logs[n]), last_ok[n], *options)
        processes.append(ctx.Process(target=writer_main, args=writer_args, daemon=True))
    for process in processes:
        process.start()
    return Writers(processes, last_ok, logs, stop)


# --------------------------------------------------------------- recovery


def log_head(dsn: str) -> tuple[str, int] | None:
    """The last committed event in read order, as (transaction id, position)."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(
            # Ordered by the column, not by its text (the output's name).
            "SELECT e.transaction_id::text, e.global_position FROM aura.events e "
            "ORDER BY e.transaction_id DESC, e.global_position DESC LIMIT 1"
        ).fetchone()
    return (str(row[0]), int(row[1])) if row else None


def projections_past(dsn: str, head: tuple[str, int] | None) -> bool:
    if head is None:
        return True
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE (transaction_id, global_position) >= (%s::xid8, %s)), "
            "count(*) FROM aura.projection_checkpoints WHERE name = ANY(%s)",
            (head[0], head[1], PROJECTIONS),
        ).fetchone()
    assert row is not None
    return int(row[0]) == int(row[1]) == len(PROJECTIONS)


def retry_until(check: Callable[[], Any], timeout: float) -> Any:
    """``check()`` until it returns something truthy; database errors (the
    server restarting) count as not yet."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(psycopg.Error):
            value = check()
            if value:
                return value
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)


def measure_recovery(
    dsn: str, writers: Writers, ended: float, timeout: float
) -> dict[str, float | None]:
    """Seconds from ``ended`` (monotonic) until every writer has appended
    again, and until every projection has applied all that was committed at
    that moment."""
    head = retry_until(lambda: (log_head(dsn),), timeout)
    writers_back: float | None = None
    projections_back: float | None = None
    deadline = ended + timeout
    while time.monotonic() < deadline and (writers_back is None or projections_back is None):
        now = time.monotonic()
        if writers_back is None and all(v.value > ended for v in writers.last_ok):
            writers_back = max(v.value for v in writers.last_ok) - ended
        if projections_back is None and head is not None:
            with contextlib.suppress(psycopg.Error):
                if projections_past(dsn, head[0]):
                    projections_back = now - ended
        time.sleep(0.02)
    return {
        "writers_recovery_s": None if writers_back is None else round(writers_back, 3),
        "projections_recovery_s": None if projections_back is None else round(projections_back, 3),
    }


# ------------------------------------------------------------------- faults


def inject(
    kind: str,
    injector: FailureInjector,
    supervisor: Supervisor,
    rng: random.Random,
    hold: float,
) -> Fault:
    """Inject one fault and end it; returns it (undone)."""
    if kind == "kill_daemon":
        projection = rng.choice(PROJECTIONS)
        pid = retry_until(lambda: injector.owner_pid(projection), 30)
        if pid is None:
            raise RuntimeError(f"{projection} has no running owner to kill")
        supervisor.expect_kill(pid)
        return injector.kill_projector(pid=pid)
    if kind == "restart_postgres":
        return injector.restart_postgres("immediate", down_for=rng.uniform(0, 1.0))
    if kind == "terminate_backends":
        return injector.terminate_backends("aura-pg%")
    if kind == "latency":
        fault = injector.network_latency(rng.uniform(0.01, 0.05), samples=5)
        time.sleep(hold)
        fault.undo()
        return fault
    if kind == "connection_loss":
        fault = injector.connection_loss(refuse=True)
        time.sleep(hold)
        fault.undo()
        return fault
    raise ValueError(f"unknown fault {kind!r}")


# ------------------------------------------------------------------- checks


@dataclass
class WriterLogs:
    reported: dict[str, int] = field(default_factory=dict)  # event id -> position
    unknown: set[str] = field(default_factory=set)
    appends: int = 0
    duplicates_answered: int = 0
    gave_up: int = 0
    reported_twice: int = 0


def read_writer_logs(paths: list[Path]) -> WriterLogs:
    logs = WriterLogs()
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):  # a line cut short by a kill
                entry = json.loads(line)
                if "unknown" in entry:
                    logs.unknown.update(entry["unknown"])
                    logs.gave_up += 1
                    continue
                logs.appends += 1
                logs.duplicates_answered += bool(entry["duplicate"])
                for event_id, position in zip(entry["ids"], entry["positions"], strict=True):
                    if event_id in logs.reported:
                        logs.reported_twice += 1
                    logs.reported[event_id] = int(position)
    return logs


def verify_log(dsn: str, logs: WriterLogs) -> tuple[dict[str, int], list[str]]:
    """The store against the writers' logs."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        stored = {
            str(event_id): int(position)
            for event_id, position in conn.execute(
                "SELECT event_id::text, global_position FROM aura.events"
            )
        }
        row = conn.execute(
            "SELECT count(*), count(DISTINCT (data->>'w', data->>'n')), "
            "count(*) FILTER (WHERE data ? 'poison') FROM aura.events"
        ).fetchone()
    assert row is not None
    rows, distinct, poison = int(row[0]), int(row[1]), int(row[2])
    lost = [i for i in logs.reported if i not in stored]
    misplaced = [i for i, p in logs.reported.items() if i in stored and stored[i] != p]
    unreported = [i for i in stored if i not in logs.reported]
    phantom = [i for i in unreported if i not in logs.unknown]
    figures = {
        "events_stored": rows,
        "events_reported": len(logs.reported),
        "appends": logs.appends,
        "duplicates_answered": logs.duplicates_answered,
        "appends_given_up": logs.gave_up,
        "unknown_outcome_events": len(logs.unknown),
        "unknown_outcome_stored": len(unreported) - len(phantom),
        "lost": len(lost),
        "misplaced": len(misplaced),
        "duplicated": rows - distinct,
        "phantom": len(phantom),
        "poison_events": poison,
    }
    problems = [
        f"{figures[key]} {text}"
        for key, text in [
            ("lost", "events reported recorded are missing"),
            ("misplaced", "events are stored at another position than reported"),
            ("duplicated", "events are stored twice"),
            ("phantom", "stored events were never sent"),
        ]
        if figures[key]
    ]
    if logs.reported_twice:
        problems.append(f"{logs.reported_twice} event ids were reported recorded twice")
    return figures, problems


EXACT_FOLD = """
SELECT
  (SELECT count(*) FROM (SELECT global_position, stream_id, version FROM aura.events
                          WHERE NOT data ? 'poison'
                         EXCEPT ALL SELECT global_position, stream_id, version FROM {applied}) a),
  (SELECT count(*) FROM (SELECT global_position, stream_id, version FROM {applied}
                         EXCEPT ALL SELECT global_position, stream_id, version FROM aura.events
                          WHERE NOT data ? 'poison') b),
  (SELECT count(*) FROM (SELECT stream_id, count(*), max(version) FROM aura.events
                          WHERE NOT data ? 'poison' GROUP BY stream_id
                         EXCEPT ALL SELECT stream_id, events, last_version FROM {streams}) c),
  (SELECT count(*) FROM {applied}),
  (SELECT count(*) FROM aura.events e, aura.projection_checkpoints c
    WHERE c.name = %(name)s
      AND (e.transaction_id, e.global_position) > (c.transaction_id, c.global_position))
"""

DEAD_LETTERS = """
SELECT
  (SELECT count(*) FROM (SELECT global_position FROM aura.events WHERE data ? 'poison'
                         EXCEPT ALL SELECT global_position FROM aura.dead_letters
                          WHERE projection = %(name)s AND status = 'pending') a),
  (SELECT count(*) FROM (SELECT global_position FROM aura.dead_letters
                          WHERE projection = %(name)s AND status = 'pending'
                         EXCEPT ALL SELECT global_position FROM aura.events
                          WHERE data ? 'poison') b)
"""


def verify_read_models(dsn: str) -> tuple[dict[str, Any], list[str]]:
    """Each read model against the log, and its dead letters against the
    poison events."""
    figures: dict[str, Any] = {}
    problems: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name in PROJECTIONS:
            row = conn.execute(
                "SELECT schema_name FROM aura.projection_checkpoints "
                "WHERE name = %s AND rebuild_of IS NULL",
                (name,),
            ).fetchone()
            assert row is not None, f"{name} is not registered"
            schema = str(row[0])
            fold = conn.execute(
                sql.SQL(EXACT_FOLD).format(
                    applied=sql.Identifier(schema, "applied_events"),
                    streams=sql.Identifier(schema, "streams"),
                ),
                {"name": name},
            ).fetchone()
            letters = conn.execute(DEAD_LETTERS, {"name": name}).fetchone()
            assert fold is not None
            assert letters is not None
            missing, extra, streams_off, applied, behind = (int(v) for v in fold)
            poison_not_dead, dead_not_poison = int(letters[0]), int(letters[1])
            figures[name] = {
                "applied": applied,
                "behind_checkpoint": behind,
                "missing": missing,
                "extra": extra,
                "streams_off": streams_off,
                "poison_not_dead_lettered": poison_not_dead,
                "dead_letters_not_poison": dead_not_poison,
            }
            for value, text in [
                (behind, "events are after the checkpoint"),
                (missing, "events are not applied"),
                (extra, "applied rows match no event"),
                (streams_off, "stream rows differ from the log"),
                (poison_not_dead, "poison events are not dead-lettered"),
                (dead_not_poison, "dead letters are not poison events"),
            ]:
                if value:
                    problems.append(f"{name}: {value} {text}")
    return figures, problems


# --------------------------------------------------------------------- run


def quantiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "max": None}
    ordered = sorted(values)
    return {
        "p50": round(statistics.median(ordered), 3),
        "p95": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3),
        "max": round(ordered[-1], 3),
    }


def run_rounds(
    args: argparse.Namespace,
    cluster: LocalCluster,
    proxy: LatencyProxy,
    supervisor: Supervisor,
    writers: Writers,
) -> list[dict[str, Any]]:
    dsn = cluster.dsn()
    injector = FailureInjector(dsn, cluster=cluster, proxy=proxy)
    rng = random.Random(args.seed)
    kinds = itertools.cycle(args.faults)
    began = time.monotonic()
    rounds: list[dict[str, Any]] = []
    try:
        for number in range(1, args.rounds + 1):
            time.sleep(args.interval * rng.uniform(0.5, 1.5))
            kind = next(kinds)
            at = time.monotonic() - began
            fault = inject(kind, injector, supervisor, rng, args.hold)
            ended = time.monotonic()
            recovery = measure_recovery(dsn, writers, ended, args.recovery_timeout)
            times = [v for v in recovery.values() if v is not None]
            record = {
                "round": number,
                "fault": kind,
                "at_s": round(at, 2),
                **{k: v for k, v in fault.as_dict().items() if k not in ("kind", "target")},
                **recovery,
                "recovery_s": max(times) if len(times) == len(recovery) else None,
            }
            rounds.append(record)
            print(
                f"round {number:4d} {kind:<18} recovered in "
                f"{record['recovery_s'] if record['recovery_s'] is not None else 'NEVER'} s "
                f"(writers {recovery['writers_recovery_s']}, "
                f"projections {recovery['projections_recovery_s']})",
                flush=True,
            )
    finally:
        injector.undo_all()
    return rounds


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    by_kind: dict[str, Any] = {}
    for kind in sorted({r["fault"] for r in rounds}):
        mine = [r for r in rounds if r["fault"] == kind]
        by_kind[kind] = {
            "injected": len(mine),
            "not_recovered": sum(r["recovery_s"] is None for r in mine),
            **recovery_quantiles(mine),
        }
    recovered = [r["recovery_s"] for r in rounds if r["recovery_s"] is not None]
    return {
        "faults_injected": len(rounds),
        "not_recovered": len(rounds) - len(recovered),
        **recovery_quantiles(rounds),
        "by_fault": by_kind,
    }


def recovery_quantiles(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Quantiles of the recovery times of ``rounds``: overall (the later of
    the two), of the writers and of the projections."""
    return {
        key: quantiles([r[key] for r in rounds if r.get(key) is not None])
        for key in ("recovery_s", "writers_recovery_s", "projections_recovery_s")
    }


def run_load(
    args: argparse.Namespace,
    cluster: LocalCluster,
    proxy: LatencyProxy,
    supervisor: Supervisor,
    writers: Writers,
) -> tuple[list[dict[str, Any]], float, list[str]]:
    """The fault rounds under load, then the writers stopped: the rounds,
    the seconds of load and the problems seen."""
    dsn = cluster.dsn()
    started = time.monotonic()
    problems: list[str] = []
    try:
        ready = retry_until(lambda: all(v.value > 0 for v in writers.last_ok), 60)
        owned = retry_until(lambda: projections_past(dsn, log_head(dsn)), 90)
        if not (ready and owned):
            raise RuntimeError("writers or daemons did not start within 90 s")
        rounds = run_rounds(args, cluster, proxy, supervisor, writers)
    finally:
        writers.stop.set()
        for process in writers.processes:
            process.join(args.retry_budget + 30)
            if process.is_alive():
                problems.append(f"writer {process.name} did not stop; killed")
    return rounds, time.monotonic() - started, problems


def run(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    with temporary_cluster(DURABLE, prefix="aura-pg-reliability-") as cluster:
        dsn = cluster.dsn()
        migrate.upgrade(dsn)
        with LatencyProxy.in_front_of(dsn) as proxy:
            through = proxy.dsn(dsn)
            supervisor = Supervisor(through, 2, log_dir, args.restart_delay)
            supervisor.start()
            writers: Writers | None = None
            try:
                writers = start_writers(
                    make_conninfo(through, application_name="aura-pg reliability writer"),
                    args,
                    log_dir,
                )
                rounds, load_seconds, problems = run_load(args, cluster, proxy, supervisor, writers)
                caught_up = retry_until(lambda: projections_past(dsn, log_head(dsn)), 300)
                if not caught_up:
                    problems.append("the projections did not catch up within 300 s after the load")
                exit_codes = supervisor.stop()
                if any(code != 0 for code in exit_codes):
                    problems.append(f"daemons' exit codes on SIGTERM: {exit_codes}")
                unexpected = supervisor.unexpected_exits()
                if unexpected:
                    problems.append(f"daemons exited on their own: {unexpected}")
            finally:
                # Whatever went wrong, no process of the run outlives it.
                supervisor.kill()
                if writers is not None:
                    writers.kill()

        logs = read_writer_logs(writers.logs)
        events, event_problems = verify_log(dsn, logs)
        models, model_problems = verify_read_models(dsn)
        specs = load_catalog(CATALOG).select(PROJECTIONS)
        rebuilds, rebuild_problems = rebuild_and_compare(dsn, list(specs))
        problems += event_problems + model_problems + rebuild_problems
        summary = summarize(rounds)
        not_recovered = summary["not_recovered"]
        if not_recovered:
            problems.append(f"{not_recovered} faults were not recovered from")
    return {
        "arguments": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": machine_info(),
        "load_seconds": round(load_seconds, 1),
        "events_per_second": round(events["events_stored"] / load_seconds, 1),
        "daemon_restarts": supervisor.restarts,
        "events": events,
        "read_models": models,
        "rebuilds": rebuilds,
        "summary": summary,
        "rounds": rounds,
        "problems": problems,
    }


def print_report(result: dict[str, Any]) -> None:
    events, summary = result["events"], result["summary"]
    print()
    print(
        f"{summary['faults_injected']} faults over {result['load_seconds']} s; "
        f"{events['events_stored']:,} events stored ({result['events_per_second']:,} /s) "
        f"in {events['appends']:,} appends; daemon restarts {result['daemon_restarts']}"
    )
    print(
        f"lost {events['lost']}, duplicated {events['duplicated']}, "
        f"misplaced {events['misplaced']}, phantom {events['phantom']}; "
        f"resends answered as duplicates {events['duplicates_answered']}; "
        f"appends given up {events['appends_given_up']} "
        f"({events['unknown_outcome_stored']} of {events['unknown_outcome_events']} "
        "of their events stored, once)"
    )
    for name, model in result["read_models"].items():
        print(
            f"{name}: {model['applied']:,} applied, missing {model['missing']}, "
            f"extra {model['extra']}, stream rows off {model['streams_off']}; "
            f"dead letters = poison events ({events['poison_events']}): "
            f"{not (model['poison_not_dead_lettered'] or model['dead_letters_not_poison'])}"
        )
    print_recovery_table(result["summary"])
    for problem in result["problems"]:
        print(f"PROBLEM: {problem}")
    print("verified" if not result["problems"] else "NOT verified")


def print_recovery_table(summary: dict[str, Any]) -> None:
    """Seconds from a fault's end until everything is back (p50, p95, max),
    then until every writer appended again and until every projection
    applied all committed at the fault's end."""
    print(
        f"{'':<29}{'recovery s':^18}{'writers s':^18}{'projections s':^18}\n"
        f"{'fault':<20}{'injected':>9}" + "  p50   p95   max" * 3
    )
    rows = [*summary["by_fault"].items(), ("all", summary)]
    for kind, figures in rows:
        injected = figures.get("injected", figures.get("faults_injected"))
        cells = ""
        for key in ("recovery_s", "writers_recovery_s", "projections_recovery_s"):
            q = figures.get(key) or {}
            cells += "".join(f"{_seconds(q.get(k)):>6}" for k in ("p50", "p95", "max"))
        print(f"{kind:<20}{injected:>9}{cells}")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="faults to inject")
    parser.add_argument("--interval", type=float, default=4.0, help="mean seconds between faults")
    parser.add_argument(
        "--faults", type=lambda s: s.split(","), default=FAULTS,
        help=f"comma-separated, injected in turn (default: {','.join(FAULTS)})",
    )  # fmt: skip
    parser.add_argument(
        "--hold", type=float, default=1.5, help="seconds latency and partitions last"
    )
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=10, help="events per append: 1 to this")
    parser.add_argument(
        "--rate", type=float, default=150.0, help="events/s per writer (0: unthrottled)"
    )
    parser.add_argument("--poison-every", type=int, default=2000, help="0: no poison events")
    parser.add_argument("--retry-budget", type=float, default=60.0, help="AppendRetry budget, s")
    parser.add_argument("--restart-delay", type=float, default=0.5, help="before a daemon restarts")
    parser.add_argument("--recovery-timeout", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("-v", "--verbose", action="store_true", help="show the library's warnings")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--log-dir", type=Path, help="daemon and writer logs (default: a temp dir)")
    parser.add_argument(
        "--table", type=Path, metavar="JSON",
        help="only print the recovery table of a saved --out file",
    )  # fmt: skip
    args = parser.parse_args(argv)
    unknown = set(args.faults) - set(FAULTS)
    if unknown:
        parser.error(f"unknown faults: {', '.join(sorted(unknown))}")
    return args


@contextlib.contextmanager
def log_directory(given: Path | None) -> Iterator[Path]:
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="aura-pg-reliability-logs-") as name:
        yield Path(name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table is not None:
        saved = json.loads(args.table.read_text(encoding="utf-8"))
        # Tables of runs saved before writers and projections were counted
        # apart are computed from their rounds.
        print_recovery_table(summarize(saved["rounds"]))
        return 0
    # SIGTERM unwinds like an error: the daemons, writers and the cluster go.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # The report says what happened; the library's own warnings (every
    # injected fault, every dead letter of the rebuilds) only with -v.
    logging.basicConfig(level=logging.WARNING if args.verbose else logging.CRITICAL)
    with log_directory(args.log_dir) as log_dir:
        result = run(args, log_dir)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, default=str))
    print_report(result)
    return 0 if not result["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
