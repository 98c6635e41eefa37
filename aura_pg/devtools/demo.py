"""``aura-pg demo``: the debate platform end to end, on a real Postgres.

Starts a throw-away local cluster (unless given a DSN), migrates it, runs
the projector daemon in-process, simulates debates through the real
repository and store with a live progress line, waits for the read models
to catch up, and prints them as an operator would query them, with how long
each step took.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import psycopg
from psycopg.rows import dict_row

from aura_pg import migrate
from aura_pg._resources import named_queries
from aura_pg.devtools.localdb import temporary_cluster
from aura_pg.domain.simulator import SimulationProgress, SimulationSummary, run_simulation
from aura_pg.errors import AuraPgError
from aura_pg.projection.catalog import ProjectionSpec, load_catalog
from aura_pg.projection.daemon import ProjectorDaemon
from aura_pg.projection.settings import ProjectorSettings
from aura_pg.store import EventStore

DEMO_PROJECTIONS = ("debate_state", "agent_performance")


def _queries() -> dict[str, Any]:
    return named_queries("queries/demo.sql")


@dataclass
class DemoReport:
    summary: SimulationSummary | None = None
    steps: dict[str, float] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


@contextlib.contextmanager
def _step(report: DemoReport, name: str) -> Iterator[None]:
    started = time.monotonic()
    yield
    report.steps[name] = time.monotonic() - started


class _DaemonThread:
    """The projector daemon on its own event loop in a background thread
    (the demo's read models, unless given other ``specs``)."""

    def __init__(
        self,
        dsn: str,
        settings: ProjectorSettings,
        specs: Sequence[ProjectionSpec] | None = None,
    ) -> None:
        if specs is None:
            specs = load_catalog().select(list(DEMO_PROJECTIONS))
        self.daemon = ProjectorDaemon(dsn, specs, settings)
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="projector", daemon=True)

    def _main(self) -> None:
        try:
            self._loop.run_until_complete(self.daemon.run(self._stop))
        except BaseException as exc:  # reported by stop()
            self._error = exc
        finally:
            self._loop.close()

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(60)
        if self._error is not None:
            raise AuraPgError(f"the projector daemon failed: {self._error}") from self._error


def _progress_printer(out: TextIO, interactive: bool) -> Any:
    last_printed = [0.0]

    def show(p: SimulationProgress) -> None:
        outcomes = ", ".join(f"{name} {count}" for name, count in p.outcomes.items())
        line = (
            f"debates {p.debates_done}/{p.debates_total} ({outcomes}); "
            f"{p.events_appended} events, {p.conflicts_retried} conflicts retried, "
            f"{p.elapsed_seconds:.1f}s"
        )
        if interactive:
            out.write(f"\r{line}   ")
            out.flush()
        elif p.debates_done == p.debates_total or p.elapsed_seconds - last_printed[0] >= 1.0:
            last_printed[0] = p.elapsed_seconds
            out.write(line + "\n")

    return show


def _wait_caught_up(
    dsn: str,
    daemon: _DaemonThread,
    timeout: float = 120.0,
    names: Sequence[str] = DEMO_PROJECTIONS,
) -> None:
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            rows = conn.execute(_queries()["projections_behind"], {"names": list(names)}).fetchall()
            if len(rows) == len(names) and all(row[1] == 0 for row in rows):
                return
            if not daemon.alive:
                daemon.stop()  # raises the daemon's error
                raise AuraPgError("the projector daemon stopped")
            if time.monotonic() > deadline:
                raise AuraPgError(f"the read models did not catch up within {timeout:.0f}s")
            time.sleep(0.05)


def _read_tables(dsn: str) -> dict[str, list[dict[str, Any]]]:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        return {
            name: conn.execute(_queries()[name]).fetchall()
            for name in ("debates_by_outcome", "top_agents_last_hour", "consensus_rate_last_hour")
        }


def run_demo(
    dsn: str | None,
    *,
    debates: int = 50,
    agents: int = 5,
    seed: int = 0,
    workers: int = 8,
    out: TextIO = sys.stdout,
) -> DemoReport:
    """Run the demo and print it to ``out``; the figures as a DemoReport."""
    if debates < 1 or agents < 3 or workers < 1:
        raise ValueError("debates and workers must be at least 1, agents at least 3")
    report = DemoReport()
    interactive = out.isatty()
    with contextlib.ExitStack() as stack:
        if dsn is None:
            with _step(report, "start a local Postgres"):
                dsn = stack.enter_context(temporary_cluster(prefix="aura-pg-demo-")).dsn()
        with _step(report, "migrate"):
            migrate.upgrade(dsn)
        with _step(report, "start the projector daemon"):
            daemon = _DaemonThread(dsn, ProjectorSettings(poll_interval=0.5))
            daemon.start()
            stack.callback(daemon.stop)
        out.write(f"simulating {debates} debates of {agents} agents ({workers} at a time)\n")
        with (
            _step(report, "simulate the debates"),
            EventStore.connect(dsn, max_size=2 * workers + 2) as store,
        ):
            report.summary = run_simulation(
                store,
                debates=debates,
                agents=agents,
                seed=seed,
                workers=workers,
                progress=_progress_printer(out, interactive),
            )
        if interactive:
            out.write("\n")
        with _step(report, "read models catch up"):
            _wait_caught_up(dsn, daemon)
        with _step(report, "query the read models"):
            report.tables = _read_tables(dsn)
    _print_report(report, out)
    return report


def _table(out: TextIO, title: str, rows: Sequence[dict[str, Any]]) -> None:
    out.write(f"\n{title}\n")
    if not rows:
        out.write("  (none)\n")
        return
    columns = list(rows[0])
    cells = [["" if row[c] is None else str(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    out.write("  " + "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + "\n")
    for r in cells:
        out.write("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + "\n")


def _print_report(report: DemoReport, out: TextIO) -> None:
    summary = report.summary
    assert summary is not None
    _table(out, "Debates by outcome (debate_state.debates)", report.tables["debates_by_outcome"])
    _table(
        out,
        "Top agents by approval rate, last hour (agent_performance.agent_stats_last_hour)",
        report.tables["top_agents_last_hour"],
    )
    _table(
        out,
        "Consensus rate, last hour (agent_performance.consensus_rate_last_hour)",
        report.tables["consensus_rate_last_hour"],
    )
    _table(
        out,
        "Steps",
        [{"step": name, "seconds": f"{seconds:.2f}"} for name, seconds in report.steps.items()],
    )
    out.write(
        f"\n{summary.events_appended} events appended by {summary.commands} commands, "
        f"{summary.conflicts_retried} concurrency conflicts retried\n"
    )
