"""Actions and probes for Chaos Toolkit (``chaos run deploy/chaos/*.json``).

Chaos Toolkit calls each function as a ``python`` activity, with the
arguments written in the experiment (plain JSON, with ``${...}`` taken from
its ``configuration``), and records what it returns in the journal, where
the steady-state tolerances check it. So every function here:

* takes JSON values: a DSN, the local cluster's data directory and port,
  projection names, URLs, numbers;
* returns JSON values (bools, numbers, strings, dicts and lists of them);
* keeps nothing between calls. An undo finds what a fault left behind by
  itself: the read-model triggers by their names (``aura_chaos_failure``,
  ``aura_chaos_delay``), poison events by their metadata, a daemon to
  restart by the health URL that no longer answers, the server by its
  data directory.

Faults are injected through ``FailureInjector``. A probe that only looks
returns what it saw; a ``wait_*`` probe waits for a condition and raises
(which the journal records as a failed activity) when it does not come.

One module, over 500 lines, because the experiments name their activities
by this module's path (``aura_pg.chaos.toolkit``): splitting it would
rename every activity in ``deploy/chaos/``.
"""

from __future__ import annotations

import logging
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, LiteralString, TypeVar
from urllib.parse import urlsplit

import psycopg
from psycopg.rows import dict_row

from aura_pg._resources import named_queries
from aura_pg.chaos.injector import FailureInjector, process_gone
from aura_pg.devtools.localdb import LocalCluster
from aura_pg.models import NewEvent
from aura_pg.store import EventStore
from aura_pg.store.retry import AppendRetry

log = logging.getLogger("aura_pg.chaos")

#: What ``aura-pg db start`` serves.
DEFAULT_DSN = "host=127.0.0.1 port=54329 user=postgres dbname=postgres"
_APPLICATION = "aura-pg chaos toolkit"
_POLL = 0.1
T = TypeVar("T")


def _queries() -> dict[str, LiteralString]:
    return named_queries("queries/chaos_toolkit.sql")


@contextmanager
def _connect(dsn: str) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    with psycopg.connect(
        dsn, autocommit=True, connect_timeout=5, application_name=_APPLICATION, row_factory=dict_row
    ) as conn:
        conn.execute(_queries()["session"])
        yield conn


def _names(projections: Sequence[str] | str | None) -> list[str] | None:
    """None (all), or a list: a single name may be given as a string."""
    if projections is None or projections == "":
        return None
    if isinstance(projections, str):
        return [projections]
    return list(projections)


def _projections(dsn: str, projections: Sequence[str] | str | None) -> list[dict[str, Any]]:
    names = _names(projections)
    with _connect(dsn) as conn:
        rows = conn.execute(_queries()["projections"], {"names": names}).fetchall()
    missing = set(names or ()) - {row["name"] for row in rows}
    if missing:
        raise LookupError(f"no projection named {', '.join(sorted(missing))}")
    if not rows:
        raise LookupError("no projection is registered (has a daemon run yet?)")
    return rows


def _injector(dsn: str, data_dir: str | None = None, port: int | None = None) -> FailureInjector:
    cluster = None
    if data_dir is not None:
        cluster = LocalCluster(Path(data_dir), port=int(port) if port is not None else 54329)
    return FailureInjector(dsn, cluster=cluster)


def _wait(
    check: Callable[[], T | None], timeout: float, what: str, describe: Callable[[], str]
) -> tuple[T, float]:
    """Call ``check`` until it returns something other than None (a
    connection error, or a projection not registered yet, counts as not
    yet); that value and the seconds it took. TimeoutError, naming
    ``what`` and the last state, after ``timeout`` seconds."""
    started = time.monotonic()
    while True:
        try:
            value = check()
        except (psycopg.OperationalError, LookupError) as exc:
            log.info("chaos toolkit: waiting for %s: %s", what, exc)
            value = None
        if value is not None:
            return value, round(time.monotonic() - started, 3)
        if time.monotonic() - started > timeout:
            try:
                state = describe()
            except (psycopg.Error, LookupError) as exc:
                state = str(exc)
            raise TimeoutError(f"no {what} within {timeout}s; {state}")
        time.sleep(_POLL)


def _behind(rows: list[dict[str, Any]]) -> dict[str, int]:
    return {row["name"]: int(row["events_behind"]) for row in rows if row["events_behind"]}


# -- probes: the database ------------------------------------------------------


def postgres_accepting(dsn: str = DEFAULT_DSN, timeout: float = 5.0) -> bool:
    """Whether the server accepts a connection and answers a query."""
    try:
        with psycopg.connect(
            dsn,
            autocommit=True,
            connect_timeout=max(1, round(timeout)),
            application_name=_APPLICATION,
        ) as conn:
            conn.execute(_queries()["ping"])
    except psycopg.Error as exc:
        log.info("chaos toolkit: postgres does not accept connections: %s", exc)
        return False
    return True


def projection_states(
    dsn: str = DEFAULT_DSN, projections: Sequence[str] | str | None = None
) -> list[dict[str, Any]]:
    """``aura.projection_status`` of the live projections (all, or the named
    ones): status, circuit, owner, events applied and behind, seconds
    behind, consecutive failures, dead letters, last error."""
    return _projections(dsn, projections)


def projections_caught_up(
    dsn: str = DEFAULT_DSN,
    projections: Sequence[str] | str | None = None,
    within_seconds: float = 0.0,
) -> bool:
    """Whether every projection (or the named ones) has no event of its
    types after its checkpoint (``events_behind`` = 0), all at the same
    moment, at some point within ``within_seconds`` (0: right now). The
    window lets a probe pass on a live system whose writers keep the
    projections a few milliseconds behind most of the time."""
    deadline = time.monotonic() + within_seconds
    while True:
        try:
            rows = _projections(dsn, projections)
            if not _behind(rows):
                return True
            state = f"behind: {_behind(rows)}"
        except psycopg.OperationalError as exc:
            state = str(exc)
        if time.monotonic() >= deadline:
            log.warning("chaos toolkit: projections not caught up: %s", state)
            return False
        time.sleep(_POLL)


def events_behind(dsn: str = DEFAULT_DSN, projection: str = "debate_state") -> int:
    """Events of the projection's types after its checkpoint."""
    return int(_projections(dsn, projection)[0]["events_behind"])


def max_lag_seconds(
    dsn: str = DEFAULT_DSN, projections: Sequence[str] | str | None = None
) -> float:
    """The largest ``seconds_behind`` (as ``aura_projection_lag_seconds``)."""
    return max(float(row["seconds_behind"] or 0) for row in _projections(dsn, projections))


def circuit_state(dsn: str = DEFAULT_DSN, projection: str = "debate_state") -> str:
    """The projection's circuit breaker: ``closed``, ``open`` or ``half_open``."""
    return str(_projections(dsn, projection)[0]["circuit"])


def projections_failing(
    dsn: str = DEFAULT_DSN, projections: Sequence[str] | str | None = None
) -> int:
    """How many projections are stopped by their circuit breaker (status
    ``failed`` or a circuit that is not closed)."""
    rows = _projections(dsn, projections)
    return sum(1 for row in rows if row["status"] == "failed" or row["circuit"] != "closed")


def dead_letters_pending(
    dsn: str = DEFAULT_DSN, projection: str | None = None, include_poison: bool = True
) -> int:
    """Pending dead letters, of one projection or all. With
    ``include_poison`` false, those of events appended as poison on purpose
    (``append_poison_event``) are not counted."""
    with _connect(dsn) as conn:
        rows = conn.execute(_queries()["pending_dead_letters"], {"projection": projection})
        return sum(1 for row in rows if include_poison or not row["poison"])


def projection_owners(
    dsn: str = DEFAULT_DSN, projections: Sequence[str] | str | None = None
) -> list[dict[str, Any]]:
    """Each live projection's owner row (``host:pid`` or ``--owner``) and
    whether a session holds its ownership lock right now."""
    with _connect(dsn) as conn:
        return conn.execute(_queries()["owners"], {"names": _names(projections)}).fetchall()


def projections_owned(
    dsn: str = DEFAULT_DSN, projections: Sequence[str] | str | None = None
) -> bool:
    """Whether a daemon runs every projection (or the named ones): a live
    session holds its ownership lock."""
    rows = projection_owners(dsn, projections)
    return bool(rows) and all(row["locked"] for row in rows)


# -- probes that wait ------------------------------------------------------------


def wait_until_caught_up(
    dsn: str = DEFAULT_DSN,
    projections: Sequence[str] | str | None = None,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """Wait until every projection (or the named ones) is caught up at once;
    the seconds it took and each one's events applied."""

    def check() -> dict[str, int] | None:
        rows = _projections(dsn, projections)
        if _behind(rows):
            return None
        return {row["name"]: int(row["events_applied"]) for row in rows}

    applied, seconds = _wait(
        check, timeout, "catch-up", lambda: f"behind: {_behind(_projections(dsn, projections))}"
    )
    return {"caught_up_after_seconds": seconds, "events_applied": applied}


def wait_until_owned(
    dsn: str = DEFAULT_DSN,
    projections: Sequence[str] | str | None = None,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """Wait until a daemon holds the ownership lock of every projection (or
    the named ones) and its owner row names a live process; the owners and
    the seconds it took. After a kill, the dead daemon's name stays in the
    row until a stand-by claims the projection, so a new owner shows here."""
    host = socket.gethostname()

    def check() -> dict[str, str] | None:
        # One read decides and is returned: a second read of the owner could
        # see a newer claim than the rows reported.
        rows = projection_owners(dsn, projections)
        if not rows or not all(row["locked"] and row["owner"] for row in rows):
            return None
        for row in rows:
            owner_host, _, pid = str(row["owner"]).rpartition(":")
            if owner_host == host and pid.isdigit() and process_gone(int(pid)):
                return None  # the killed owner's row, not claimed yet
            # An owner on another host (or named by --owner): its lock is
            # held, which is what counts.
        return {row["name"]: str(row["owner"]) for row in rows}

    owners, seconds = _wait(
        check,
        timeout,
        "owner for every projection",
        lambda: f"owners: {projection_owners(dsn, projections)}",
    )
    return {"owned_after_seconds": seconds, "owners": owners}


def wait_for_lag(
    dsn: str = DEFAULT_DSN,
    projection: str = "stream_summary",
    min_events_behind: int = 1,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """Wait until ``projection`` is at least ``min_events_behind`` events
    behind; what every projection's backlog was at that moment."""

    def check() -> list[dict[str, Any]] | None:
        rows = _projections(dsn, None)
        ours = [row for row in rows if row["name"] == projection]
        if not ours:
            raise LookupError(f"no projection named {projection!r}")
        return rows if ours[0]["events_behind"] >= min_events_behind else None

    rows, seconds = _wait(
        check, timeout, f"lag of {projection}", lambda: f"states: {_projections(dsn, None)}"
    )
    return {
        "seen_after_seconds": seconds,
        "events_behind": {row["name"]: int(row["events_behind"]) for row in rows},
        "seconds_behind": {row["name"]: float(row["seconds_behind"] or 0) for row in rows},
    }


def wait_for_dead_letters(
    dsn: str = DEFAULT_DSN,
    projection: str | None = None,
    count: int = 1,
    poison_only: bool = True,
    within_seconds: float | None = None,
    timeout: float = 60.0,
) -> list[dict[str, Any]]:
    """Wait until at least ``count`` dead letters are pending (of
    ``projection`` or any; only those of poison events with
    ``poison_only``; only those that first failed less than
    ``within_seconds`` ago, if given, so that one left by an earlier run
    does not count); them, with their errors."""

    def letters() -> list[dict[str, Any]]:
        with _connect(dsn) as conn:
            rows = conn.execute(_queries()["pending_dead_letters"], {"projection": projection})
            return [
                row
                for row in rows
                if (row["poison"] or not poison_only)
                and (within_seconds is None or row["age_seconds"] < within_seconds)
            ]

    def check() -> list[dict[str, Any]] | None:
        found = letters()
        return found if len(found) >= count else None

    found, _ = _wait(check, timeout, f"{count} dead letter(s)", lambda: f"pending: {letters()}")
    return found


# -- actions: faults -----------------------------------------------------------


def stop_postgres(
    dsn: str = DEFAULT_DSN,
    data_dir: str = ".aura-pg/cluster/data",
    port: int = 54329,
    mode: str = "immediate",
) -> dict[str, Any]:
    """Stop the local cluster (``immediate``: like a crash, recovery at the
    next start). Undo: ``start_postgres``."""
    return _injector(dsn, data_dir, port).stop_postgres(mode).as_dict()


def start_postgres(
    dsn: str = DEFAULT_DSN,
    data_dir: str = ".aura-pg/cluster/data",
    port: int = 54329,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """Start the local cluster if it is down and wait until it accepts
    connections; whether it had to, and how long that took."""
    started = time.monotonic()
    was_down = _injector(dsn, data_dir, port).start_postgres(timeout)
    return {"started": was_down, "seconds": round(time.monotonic() - started, 3)}


def kill_projector(dsn: str = DEFAULT_DSN, projection: str = "debate_state") -> dict[str, Any]:
    """SIGKILL the daemon (on this host) that owns ``projection``."""
    owner = projection_owners(dsn, projection)
    fault = _injector(dsn).kill_projector(projection=projection).as_dict()
    return {**fault, "owner": owner[0]["owner"] if owner else None}


def terminate_backends(
    dsn: str = DEFAULT_DSN, pattern: str = "aura-pg projector%"
) -> dict[str, Any]:
    """``pg_terminate_backend`` every session whose application_name is
    LIKE ``pattern`` (the projector daemons', their metrics included)."""
    return _injector(dsn).terminate_backends(pattern).as_dict()


def fail_projection(
    dsn: str = DEFAULT_DSN, projection: str = "stream_summary", sqlstate: str = "P0001"
) -> dict[str, Any]:
    """Every write to the projection's tables fails until
    ``remove_read_model_faults``."""
    return _injector(dsn).fail_projection(projection, sqlstate).as_dict()


def slow_projection(
    dsn: str = DEFAULT_DSN, projection: str = "stream_summary", delay_seconds: float = 1.0
) -> dict[str, Any]:
    """Every write statement to the projection's tables waits
    ``delay_seconds`` until ``remove_read_model_faults``."""
    return _injector(dsn).slow_projection(projection, delay_seconds).as_dict()


def remove_read_model_faults(
    dsn: str = DEFAULT_DSN, projection: str | None = None
) -> dict[str, Any]:
    """Drop the failure and delay triggers from the projection's tables (or
    from every table): the undo of ``fail_projection``/``slow_projection``."""
    return {"removed": _injector(dsn).remove_read_model_faults(projection)}


def append_poison_event(
    dsn: str = DEFAULT_DSN,
    stream_prefix: str = "debate-chaos-poison-",
    event_type: str = "DEBATE_ROUND_COMPLETED",
    data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Append one event a handler cannot apply, to a new stream
    ``stream_prefix`` + a random suffix, marked as poison in its metadata.
    The default is a round that ``debate_state`` casts to integer, spelt in
    words."""
    stream_id = f"{stream_prefix}{uuid.uuid4().hex[:12]}"
    payload = data if data is not None else {"round": "two"}
    return _injector(dsn).poison_event(stream_id, event_type, payload).as_dict()


def skip_poison_dead_letters(
    dsn: str = DEFAULT_DSN, projection: str | None = None
) -> dict[str, Any]:
    """Skip the pending dead letters of poison events (of ``projection`` or
    all): the undo of ``append_poison_event``."""
    return {"skipped": _injector(dsn).skip_poison_dead_letters(projection)}


# -- actions: the workload and the daemons ---------------------------------------


def append_events(
    dsn: str = DEFAULT_DSN,
    count: int = 0,
    seconds: float = 0.0,
    rate: float = 50.0,
    streams: int = 4,
    event_type: str = "CHAOS_WRITE",
    retry_budget: float = 90.0,
) -> dict[str, Any]:
    """A writer: append single events at about ``rate`` a second (0: as fast
    as it can) until ``count`` are appended or ``seconds`` have passed
    (whichever limit is given and comes first), each with
    ``AppendRetry``, so it rides out a restarting server. Then read its
    streams back: every event it was told was recorded must be there,
    exactly once, at the position it was told; RuntimeError otherwise."""
    if count <= 0 and seconds <= 0:
        raise ValueError("give a count or a number of seconds")
    run = uuid.uuid4().hex[:12]
    stream_ids = [f"chaos-writer-{run}-{k}" for k in range(max(1, streams))]
    retry = AppendRetry(attempts=10_000, base_delay=0.05, max_delay=0.5, budget=retry_budget)
    told: dict[str, int] = {}
    duplicates = 0
    started = time.monotonic()
    with EventStore.connect(dsn, max_size=1, timeout=5) as store:
        while not (count > 0 and len(told) >= count) and not (
            seconds > 0 and time.monotonic() - started >= seconds
        ):
            n = len(told)
            event = NewEvent(event_type, {"run": run, "n": n}, metadata={"aura_chaos": "writer"})
            result = store.append(stream_ids[n % len(stream_ids)], [event], retry=retry)
            told[str(event.event_id)] = result.events[0].global_position
            duplicates += result.duplicate
            if rate > 0:
                time.sleep(1.0 / rate)
    elapsed = time.monotonic() - started
    with _connect(dsn) as conn:
        stored_rows = conn.execute(_queries()["stream_events"], {"streams": stream_ids}).fetchall()
    stored = {row["event_id"]: int(row["global_position"]) for row in stored_rows}
    report = {
        "streams": stream_ids,
        "appended": len(told),
        "seconds": round(elapsed, 3),
        "retried_as_duplicate": duplicates,
        "stored": len(stored_rows),
        "missing": sorted(set(told) - set(stored)),
        "unexpected": sorted(set(stored) - set(told)),
        "moved": sorted(k for k in set(told) & set(stored) if told[k] != stored[k]),
    }
    if (
        report["missing"]
        or report["unexpected"]
        or report["moved"]
        or len(stored_rows) != len(stored)
    ):
        raise RuntimeError(f"the log does not hold exactly the acknowledged events: {report}")
    return report


def _health_status(url: str, timeout: float = 3.0) -> int | None:
    """The HTTP status of a GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None


def ensure_projectors(
    dsn: str = DEFAULT_DSN,
    health_urls: Sequence[str] = ("http://127.0.0.1:9187/health",),
    projector_args: str = "",
    log_dir: str = ".aura-pg/chaos",
    timeout: float = 60.0,
) -> dict[str, Any]:
    """A supervisor's restart: for each daemon ``/health`` URL that nothing
    answers, start ``aura-pg project`` serving it (``--metrics-host`` and
    ``--metrics-port`` from the URL, plus ``projector_args``), detached,
    logging to ``log_dir``; then wait until every URL answers 200. What each
    URL was, and the pids of the daemons started (to stop them later).
    RuntimeError when a URL answers but not 200 (a daemon there is
    unhealthy: starting another would not help) or does not come up."""
    urls = [health_urls] if isinstance(health_urls, str) else list(health_urls)
    found: dict[str, Any] = {}
    started: list[dict[str, Any]] = []
    processes: list[subprocess.Popen[bytes]] = []
    for url in urls:
        status = _health_status(url)
        if status is not None:
            found[url] = "healthy" if status == 200 else f"answers {status}"
            continue
        parts = urlsplit(url)
        if parts.port is None:
            raise ValueError(f"{url}: a health URL needs an explicit port")
        logs = Path(log_dir)
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"projector-{parts.port}-{time.strftime('%Y%m%d-%H%M%S')}.log"
        argv = [
            sys.executable, "-m", "aura_pg.cli", "project", "--dsn", dsn,
            "--metrics-host", parts.hostname or "127.0.0.1", "--metrics-port", str(parts.port),
            *shlex.split(projector_args),
        ]  # fmt: skip
        with log_path.open("ab") as handle:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=handle,
                start_new_session=True,  # outlives this run, as a supervised daemon would
                env=os.environ.copy(),
            )
        processes.append(process)
        log.warning("chaos toolkit: started a projector for %s (pid %s)", url, process.pid)
        found[url] = "started"
        started.append({"url": url, "pid": process.pid, "log": str(log_path.resolve())})
    deadline = time.monotonic() + timeout
    for url in urls:
        while (status := _health_status(url)) != 200:
            exited = [p.pid for p in processes if p.poll() is not None]
            if exited:
                raise RuntimeError(f"projector(s) {exited} exited at once; see {started}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{url} answers {status} {timeout}s later; started: {started}, seen: {found}"
                )
            time.sleep(_POLL)
    return {"daemons": found, "started": started}
