"""``aura-pg demo --reactive``: debates that the agents carry on by
themselves, each agent a Python processor (aura_pg.domain.reactive).

Like the demo (aura_pg.devtools.demo): a throw-away local cluster unless
given a DSN, migrations, the projector daemon in-process. But the daemon
runs one processor per agent beside the read models, and the demo only
starts the debates: from then on every argument, round, vote, ending and
decision is an agent's reaction, committed with its checkpoint. It waits
until every debate has ended and every decision is resolved, then prints
the debates, what each agent heard and wrote, and the read models.
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, LiteralString, TextIO

import psycopg
from psycopg.rows import dict_row

from aura_pg import migrate
from aura_pg._resources import named_queries
from aura_pg.devtools.demo import (
    DEMO_PROJECTIONS,
    _DaemonThread,
    _read_tables,
    _table,
    _wait_caught_up,
)
from aura_pg.devtools.localdb import temporary_cluster
from aura_pg.domain.debate import DebateRules
from aura_pg.domain.decision import decision_id_for
from aura_pg.domain.events import debate_stream, decision_stream
from aura_pg.domain.reactive import agent_ids, agent_processors, processor_name
from aura_pg.domain.repository import DebateRepository
from aura_pg.domain.simulator import TOPICS
from aura_pg.errors import AuraPgError
from aura_pg.projection.catalog import load_catalog
from aura_pg.projection.settings import ProjectorSettings
from aura_pg.store import EventStore


def _queries() -> dict[str, LiteralString]:
    return named_queries("queries/reactive_demo.sql")


@contextlib.contextmanager
def _timed(steps: dict[str, float], name: str) -> Iterator[None]:
    started = time.monotonic()
    yield
    steps[name] = time.monotonic() - started


@dataclass(frozen=True, slots=True)
class DebateSetup:
    """What the demo decides about a debate before it starts; the agents
    decide everything after."""

    debate_id: str
    topic: str
    participants: tuple[str, ...]
    """The first one starts and moderates it."""
    rounds: int


def plan_debates(seed: int, debates: int, agents: Sequence[str]) -> list[DebateSetup]:
    """The debates to start: a pure function of the arguments, but for the
    id's random suffix (so runs never collide). The agents' minds depend on
    the topic and what is said, so outcomes depend on the seed alone."""
    suffix = uuid.uuid4().hex[:8]
    setups = []
    for index in range(1, debates + 1):
        rng = random.Random(f"{seed}:reactive:{index}")
        participants = tuple(rng.sample(list(agents), rng.randint(3, len(agents))))
        setups.append(
            DebateSetup(
                debate_id=f"reactive{seed}-{suffix}-{index:04d}",
                topic=f"{rng.choice(TOPICS)} (#{index})",
                participants=participants,
                rounds=rng.randint(1, 3),
            )
        )
    return setups


@dataclass
class ReactiveDemoReport:
    setups: list[DebateSetup] = field(default_factory=list)
    progress: dict[str, int] = field(default_factory=dict)
    """arguments, votes, ended, consensus, resolved: over all the debates."""
    steps: dict[str, float] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def _streams(setups: Sequence[DebateSetup]) -> list[str]:
    return [
        stream
        for setup in setups
        for stream in (
            debate_stream(setup.debate_id),
            decision_stream(decision_id_for(setup.debate_id)),
        )
    ]


def _progress(conn: psycopg.Connection[Any], streams: list[str]) -> dict[str, int]:
    row = conn.execute(_queries()["progress"], {"streams": streams}).fetchone()
    assert row is not None
    return dict(row)


def _wait_settled(
    dsn: str,
    setups: Sequence[DebateSetup],
    daemon: _DaemonThread,
    out: TextIO,
    timeout: float,
) -> dict[str, int]:
    """Until every debate has ended and every consensus's decision is
    approved or rejected, with a progress line."""
    interactive = out.isatty()
    streams = _streams(setups)
    deadline = time.monotonic() + timeout
    last_line = ""
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        while True:
            progress = _progress(conn, streams)
            line = (
                f"debates ended {progress['ended']}/{len(setups)}; "
                f"{progress['arguments']} arguments, {progress['votes']} votes, "
                f"{progress['resolved']}/{progress['consensus']} decisions resolved"
            )
            if line != last_line:
                out.write(f"\r{line}   " if interactive else line + "\n")
                out.flush()
                last_line = line
            if progress["ended"] == len(setups) and progress["resolved"] == progress["consensus"]:
                if interactive:
                    out.write("\n")
                return progress
            if not daemon.alive:
                daemon.stop()  # raises the daemon's error
                raise AuraPgError("the projector daemon stopped")
            if time.monotonic() > deadline:
                raise AuraPgError(f"the agents did not finish within {timeout:.0f}s: {line}")
            time.sleep(0.1)


def run_reactive_demo(
    dsn: str | None,
    *,
    debates: int = 50,
    agents: int = 5,
    seed: int = 0,
    out: TextIO = sys.stdout,
    timeout: float = 600.0,
) -> ReactiveDemoReport:
    """Run the reactive demo and print it to ``out``."""
    if debates < 1 or agents < 3:
        raise ValueError("debates must be at least 1, agents at least 3")
    report = ReactiveDemoReport()
    names = agent_ids(agents)
    processors = [processor_name(agent) for agent in names]
    with contextlib.ExitStack() as stack:
        if dsn is None:
            with _timed(report.steps, "start a local Postgres"):
                dsn = stack.enter_context(temporary_cluster(prefix="aura-pg-demo-")).dsn()
        with _timed(report.steps, "migrate"):
            migrate.upgrade(dsn)
        with _timed(report.steps, "start the daemon: read models and agents"):
            specs = (*load_catalog().select(list(DEMO_PROJECTIONS)), *agent_processors(names))
            daemon = _DaemonThread(dsn, ProjectorSettings(poll_interval=0.2), specs)
            daemon.start()
            stack.callback(daemon.stop)
        report.setups = plan_debates(seed, debates, names)
        out.write(
            f"{agents} agents as Python processors ({', '.join(processors)}); "
            f"starting {debates} debates, the agents do the rest\n"
        )
        with _timed(report.steps, "the agents debate"):
            with EventStore.connect(dsn, max_size=2) as store:
                repository = DebateRepository(store)
                for setup in report.setups:
                    repository.start(
                        setup.debate_id,
                        setup.topic,
                        setup.participants,
                        started_by=setup.participants[0],
                        rules=DebateRules(max_rounds=setup.rounds),
                    )
            report.progress = _wait_settled(dsn, report.setups, daemon, out, timeout)
        with _timed(report.steps, "read models and agents catch up"):
            _wait_caught_up(dsn, daemon, names=[*DEMO_PROJECTIONS, *processors])
        with _timed(report.steps, "query"):
            report.tables = _read_tables(dsn)
            report.tables.update(_read_reactive_tables(dsn, report.setups, processors))
    _print_report(report, out)
    return report


def _read_reactive_tables(
    dsn: str, setups: Sequence[DebateSetup], processors: Sequence[str]
) -> dict[str, list[dict[str, Any]]]:
    params = {
        "streams": _streams(setups),
        "debate_ids": [setup.debate_id for setup in setups],
        "names": list(processors),
    }
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        return {
            name: conn.execute(_queries()[name], params).fetchall()
            for name in ("debates", "agents")
        }


def _print_report(report: ReactiveDemoReport, out: TextIO) -> None:
    shown = min(len(report.setups), 10)
    _table(out, f"Debates (the first {shown}, debate_state.debates)", report.tables["debates"])
    _table(
        out,
        "Agents: events heard, what their reactions wrote (aura.projection_status, aura.events)",
        report.tables["agents"],
    )
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
    progress = report.progress
    out.write(
        f"\n{len(report.setups)} debates started; the agents' reactions wrote "
        f"{progress['arguments']} arguments and {progress['votes']} votes, ended "
        f"{progress['ended']} debates ({progress['consensus']} in consensus) and resolved "
        f"{progress['resolved']} decisions\n"
    )
