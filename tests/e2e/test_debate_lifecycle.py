"""The debate lifecycle end to end (the plan's test_complete_debate_lifecycle,
for real): commands through the repository and the real store, the
projector daemon running the shipped debate projections, and the read
models checked against the domain's own fold of the same events."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

from aura_pg import EventStore
from aura_pg.domain import Debate, DebateRepository, DebateStatus, run_simulation
from aura_pg.domain.events import DebateVoteCast, debate_stream
from aura_pg.projection.catalog import load_catalog
from aura_pg.projection.rebuild import rebuild
from tests.helpers.debate_projections import shipped_daemon
from tests.helpers.projections import caught_up, wait_for

ROOT = Path(__file__).resolve().parents[2]
DEBATE_PROJECTIONS = ("debate_state", "agent_performance")


async def all_caught_up(dsn: str) -> None:
    await wait_for(lambda: all(caught_up(dsn, name) for name in DEBATE_PROJECTIONS), timeout=60)


def fetch(dsn: str, statement: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        return conn.execute(statement, params).fetchall()


def assert_log_consistent(dsn: str) -> None:
    """Every stream's versions are contiguous from 1 and grow in the global
    commit order; global positions are unique."""
    rows = fetch(
        dsn,
        "SELECT stream_id, version, global_position FROM aura.events "
        "ORDER BY transaction_id, global_position",
    )
    last: dict[str, int] = {}
    for row in rows:
        assert row["version"] == last.get(row["stream_id"], 0) + 1, row
        last[row["stream_id"]] = row["version"]
    assert len({row["global_position"] for row in rows}) == len(rows)


def assert_read_models_match_the_fold(dsn: str, store: EventStore, debate_ids: list[str]) -> None:
    """debate_state equals Debate.fold of each stream; agent_performance holds
    one row per vote and per decided decision."""
    model = {row["debate_id"]: row for row in fetch(dsn, "SELECT * FROM debate_state.debates")}
    assert set(model) == set(debate_ids)
    votes = 0
    for debate_id in debate_ids:
        events = store.read_stream(debate_stream(debate_id))
        debate = Debate.fold(debate_id, events)
        votes += sum(1 for e in events if e.type == DebateVoteCast.TYPE)
        row = model[debate_id]
        assert row["status"] == debate.status.value
        assert row["topic"] == debate.topic
        assert tuple(row["participants"]) == debate.participants
        assert row["rounds_completed"] == debate.rounds_completed
        assert row["argument_count"] == sum(len(a) for a in debate.arguments.values())
        assert row["votes_for"] == sum(v.vote == "approve" for v in debate.votes.values())
        assert row["votes_against"] == sum(v.vote == "reject" for v in debate.votes.values())
        assert row["outcome"] == debate.outcome
        assert row["decision_id"] == debate.decision_id
        assert row["last_version"] == debate.version
        assert (row["ended_at"] is None) == (debate.status is DebateStatus.OPEN)
    decided = fetch(
        dsn,
        "SELECT count(*) AS n FROM aura.events "
        "WHERE type IN ('DECISION_APPROVED', 'DECISION_REJECTED')",
    )[0]["n"]
    activity = fetch(
        dsn,
        "SELECT count(*) FILTER (WHERE kind = 'vote') AS votes, "
        "count(*) FILTER (WHERE kind = 'decision') AS decisions "
        "FROM agent_performance.agent_activity",
    )[0]
    assert activity == {"votes": votes, "decisions": decided}


async def test_complete_debate_lifecycle(dsn: str, store: EventStore) -> None:
    repository = DebateRepository(store)
    agents = ["ada", "grace", "linus"]
    async with shipped_daemon(dsn, DEBATE_PROJECTIONS):
        repository.start("life-1", "Adopt event sourcing", agents, started_by="ada")
        for round_ in (1, 2):
            for agent in agents:
                repository.add_argument(
                    "life-1", agent, round_, "for", f"{agent} argues in round {round_}", 0.8
                )
            repository.complete_round("life-1", round_)
        for agent in agents:
            repository.cast_vote("life-1", agent, "approve", 0.9)
        repository.reach_consensus("life-1", proposed_by="ada")
        debate = repository.load("life-1")
        assert debate.status is DebateStatus.CONSENSUS
        decision_id = debate.decision_id
        assert decision_id is not None
        repository.decisions.approve(decision_id, approved_by="grace")
        await all_caught_up(dsn)

        events = store.read_stream(debate_stream("life-1"))
        assert sum(e.type == "DEBATE_ARGUMENT_ADDED" for e in events) >= 6
        assert events[-1].type == "DEBATE_CONSENSUS_REACHED"
        assert_log_consistent(dsn)
        assert_read_models_match_the_fold(dsn, store, ["life-1"])
        (row,) = fetch(dsn, "SELECT * FROM debate_state.debates")
        assert (row["status"], row["rounds_completed"], row["argument_count"]) == (
            "consensus",
            2,
            6,
        )
        (ending,) = fetch(dsn, "SELECT * FROM agent_performance.consensus_rate_last_hour")
        assert (ending["debates_ended"], ending["consensus"]) == (1, 1)


async def test_many_debates_concurrently_and_after_a_rebuild(dsn: str) -> None:
    with EventStore.connect(dsn, max_size=16) as store:
        async with shipped_daemon(dsn, DEBATE_PROJECTIONS):
            summary = await asyncio.to_thread(
                run_simulation, store, debates=24, agents=5, seed=7, workers=6
            )
            await all_caught_up(dsn)
            assert sum(summary.outcomes.values()) == 24
            assert_log_consistent(dsn)
            debate_ids = list(summary.debate_ids)
            assert_read_models_match_the_fold(dsn, store, debate_ids)
            before = fetch(dsn, "SELECT * FROM debate_state.debates ORDER BY debate_id")
            # Rebuild both while the daemon keeps running: same read models.
            for name in DEBATE_PROJECTIONS:
                result = await rebuild(dsn, load_catalog().get(name))
                assert result is not None
            await all_caught_up(dsn)
            after = fetch(dsn, "SELECT * FROM debate_state.debates ORDER BY debate_id")
            strip = ("updated_at",)
            assert [{k: v for k, v in r.items() if k not in strip} for r in after] == [
                {k: v for k, v in r.items() if k not in strip} for r in before
            ]
            assert_read_models_match_the_fold(dsn, store, debate_ids)


def test_demo_command_on_an_existing_database(empty_dsn: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "aura_pg.cli", "demo", "--dsn", empty_dsn,
         "--debates", "6", "--agents", "4", "--workers", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Debates by outcome (debate_state.debates)" in result.stdout
    assert "Consensus rate, last hour" in result.stdout
    counts = fetch(empty_dsn, "SELECT count(*) AS n FROM debate_state.debates")
    assert counts == [{"n": 6}]
