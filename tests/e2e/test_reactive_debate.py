"""The debate lifecycle in reactive mode: every agent a Python processor
(aura_pg.domain.reactive), the test only starting debates. Checked against
the stream: each agent argues exactly once per round and votes exactly
once, every reaction names its cause, and the read models equal the fold,
also when the agents' daemon, a real process, is killed with SIGKILL in
the middle of their reactions and started again."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import psycopg
import yaml

from aura_pg import EventStore
from aura_pg.domain import Debate, DebateRepository, DebateRules, DebateStatus, decision_id_for
from aura_pg.domain.events import debate_stream, decision_stream
from aura_pg.domain.reactive import (
    DebateAgent,
    agent_catalog,
    agent_processors,
    processor_name,
)
from aura_pg.models import RecordedEvent
from aura_pg.projection.catalog import ProjectionSpec, load_catalog
from aura_pg.projection.daemon import ProjectorDaemon
from aura_pg.projection.settings import ProjectorSettings
from tests.e2e.test_debate_lifecycle import (
    DEBATE_PROJECTIONS,
    assert_log_consistent,
    assert_read_models_match_the_fold,
    fetch,
)
from tests.helpers.deliberate_agents import LOG_VARIABLE
from tests.helpers.projections import caught_up, query, wait_for, wait_for_sync

ROOT = Path(__file__).resolve().parents[2]
AGENTS = ("ada", "grace", "linus")
# The agents' minds are pure functions of the topic and of what is said:
# with these three and two rounds, this topic ends in an approving consensus.
TOPIC = "Adopt event sourcing"
ENDINGS = ("DEBATE_CONSENSUS_REACHED", "DEBATE_FAILED", "DEBATE_TIMED_OUT")
# What may cause what (aura_pg.domain.reactive.DebateAgent).
CAUSES = {
    "DEBATE_ARGUMENT_ADDED": {"DEBATE_STARTED", "DEBATE_ROUND_COMPLETED", "AGENT_JOINED"},
    "DEBATE_ROUND_COMPLETED": {"DEBATE_ARGUMENT_ADDED"},
    "DEBATE_VOTE_CAST": {"DEBATE_ROUND_COMPLETED"},
    "DEBATE_CONSENSUS_REACHED": {"DEBATE_VOTE_CAST"},
    "DEBATE_FAILED": {"DEBATE_VOTE_CAST"},
    "DECISION_PROPOSED": {"DEBATE_VOTE_CAST"},
    "DECISION_APPROVED": {"DECISION_PROPOSED"},
    "DECISION_REJECTED": {"DECISION_PROPOSED"},
}


@asynccontextmanager
async def running(dsn: str, specs: Sequence[ProjectionSpec]) -> AsyncIterator[ProjectorDaemon]:
    daemon = ProjectorDaemon(
        dsn, specs, ProjectorSettings(poll_interval=0.2, shutdown_timeout=10.0)
    )
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        yield daemon
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


def streams_of(store: EventStore, debate_id: str) -> list[RecordedEvent]:
    """The debate's events and its decision's, in commit order."""
    events = [
        *store.read_stream(debate_stream(debate_id)),
        *store.read_stream(decision_stream(decision_id_for(debate_id))),
    ]
    return sorted(events, key=lambda e: (e.transaction_id, e.global_position))


def settled(store: EventStore, debate_ids: Iterable[str]) -> bool:
    """Every debate ended, and every consensus's decision resolved."""
    for debate_id in debate_ids:
        types = [e.type for e in streams_of(store, debate_id)]
        if not any(t in ENDINGS for t in types):
            return False
        if "DEBATE_CONSENSUS_REACHED" in types and not any(
            t in ("DECISION_APPROVED", "DECISION_REJECTED") for t in types
        ):
            return False
    return True


def processors_caught_up(dsn: str, agents: Iterable[str]) -> bool:
    return all(caught_up(dsn, processor_name(agent)) for agent in agents)


def assert_reacted_exactly_once(store: EventStore, debate_id: str) -> Debate:
    """Every participant argued exactly once in each round and voted exactly
    once; each round was completed once; one ending, the last event, as the
    votes say; the consensus's decision proposed and resolved once, as the
    consensus says, by the moderator."""
    events = store.read_stream(debate_stream(debate_id))
    debate = Debate.fold(debate_id, events)
    rounds = range(1, debate.rules.max_rounds + 1)
    arguments = Counter(
        (e.data["agent_id"], e.data["round"]) for e in events if e.type == "DEBATE_ARGUMENT_ADDED"
    )
    assert arguments == Counter({(a, r): 1 for a in debate.participants for r in rounds})
    completed = Counter(e.data["round"] for e in events if e.type == "DEBATE_ROUND_COMPLETED")
    assert completed == Counter(dict.fromkeys(rounds, 1))
    votes = Counter(e.data["agent_id"] for e in events if e.type == "DEBATE_VOTE_CAST")
    assert votes == Counter(dict.fromkeys(debate.participants, 1))
    endings = [e for e in events if e.type in ENDINGS]
    assert len(endings) == 1
    assert endings[0] == events[-1]
    decision = store.read_stream(decision_stream(decision_id_for(debate_id)))
    if debate.consensus_outcome() is None:
        assert debate.status is DebateStatus.FAILED
        assert decision == []
    else:
        assert debate.status is DebateStatus.CONSENSUS
        resolution = "DECISION_APPROVED" if debate.outcome == "approve" else "DECISION_REJECTED"
        assert [e.type for e in decision] == ["DECISION_PROPOSED", resolution]
        assert decision[0].data["proposed_by"] == debate.started_by
        decided_by = decision[1].data.get("approved_by") or decision[1].data.get("rejected_by")
        assert decided_by == debate.started_by
    return debate


def assert_reactions_name_their_causes(dsn: str, events: Sequence[RecordedEvent]) -> None:
    """Every event but the start is a reaction: its metadata names its cause
    and processor, its key is the cause's id and the domain's key, and the
    cause is of a type that can cause it and was committed before it."""
    by_id = {
        row[0]: row[1:]
        for row in query(dsn, "SELECT event_id::text, type, transaction_id::text FROM aura.events")
    }
    for event in events:
        if event.type == "DEBATE_STARTED":
            assert "causation_id" not in event.metadata
            continue
        cause_id = event.metadata["causation_id"]
        cause_type, cause_tx = by_id[cause_id]
        assert cause_type in CAUSES[event.type], (event.type, cause_type)
        assert int(cause_tx) < event.transaction_id
        assert event.metadata["processor"].startswith("agent_")
        entity = event.stream_id.split("-", 1)[1]
        assert event.idempotency_key.startswith(f"{cause_id}:{entity}:")


async def test_reactive_debate_lifecycle(dsn: str, store: EventStore) -> None:
    specs = (*load_catalog().select(DEBATE_PROJECTIONS), *agent_processors(AGENTS))
    async with running(dsn, specs):
        DebateRepository(store).start(
            "life-1", TOPIC, AGENTS, started_by="ada", rules=DebateRules(max_rounds=2)
        )
        await wait_for(lambda: settled(store, ["life-1"]), 60, "the agents to end the debate")
        await wait_for(
            lambda: (
                processors_caught_up(dsn, AGENTS)
                and all(caught_up(dsn, name) for name in DEBATE_PROJECTIONS)
            ),
            60,
            "catch-up",
        )

    events = store.read_stream(debate_stream("life-1"))
    debate = assert_reacted_exactly_once(store, "life-1")
    assert sum(e.type == "DEBATE_ARGUMENT_ADDED" for e in events) == 6
    assert events[-1].type == "DEBATE_CONSENSUS_REACHED"
    assert (debate.outcome, debate.votes_for()) == ("approve", 3)
    assert_reactions_name_their_causes(dsn, streams_of(store, "life-1"))
    # Each agent wrote its own arguments and votes; the moderator the rest.
    for event in events[1:]:
        author = event.data.get("agent_id") or "ada"
        assert event.metadata["processor"] == processor_name(author)
    assert_log_consistent(dsn)
    assert_read_models_match_the_fold(dsn, store, ["life-1"])
    (row,) = fetch(dsn, "SELECT * FROM debate_state.debates")
    assert (row["status"], row["rounds_completed"], row["argument_count"]) == ("consensus", 2, 6)

    # Hearing everything again (a replay, a reset, a retried dead letter)
    # finds nothing due: no reaction happens twice.
    everything = list(store.iter_all())
    with psycopg.connect(dsn, autocommit=True) as conn:
        for agent in AGENTS:
            with conn.transaction():
                assert [
                    e for cause in everything for e in DebateAgent(agent).react(cause, conn)
                ] == []
    assert store.read_stream(debate_stream("life-1")) == events


async def test_a_debate_times_out_at_the_first_event_after_its_timeout(
    dsn: str, store: EventStore
) -> None:
    """``mute`` has no processor and argues late, by hand: the round cannot
    complete in time, and ada, the moderator, times the debate out on
    hearing that late argument, by the time it was recorded at."""
    repository = DebateRepository(store)
    async with running(dsn, agent_processors(("ada", "grace"))):
        repository.start(
            "slow-1",
            TOPIC,
            ["ada", "grace", "mute"],
            started_by="ada",
            rules=DebateRules(max_rounds=2, timeout_seconds=1.0),
        )
        await wait_for(
            lambda: len(repository.load("slow-1").arguments.get(1, {})) == 2, 30, "ada and grace"
        )
        started_at = repository.load("slow-1").started_at
        assert started_at is not None
        await asyncio.sleep(1.2)
        late = repository.add_argument("slow-1", "mute", 1, "against", "sorry, I was away", 0.5)
        await wait_for(lambda: not repository.load("slow-1").is_open, 30, "the timeout")
        await wait_for(lambda: processors_caught_up(dsn, ("ada", "grace")), 30, "catch-up")

    events = store.read_stream(debate_stream("slow-1"))
    assert [e.type for e in events] == [
        "DEBATE_STARTED",
        "DEBATE_ARGUMENT_ADDED",
        "DEBATE_ARGUMENT_ADDED",
        "DEBATE_ARGUMENT_ADDED",
        "DEBATE_TIMED_OUT",
    ]
    ending = events[-1]
    assert ending.data == {"rounds_completed": 0}
    assert ending.metadata["processor"] == "agent_ada"
    assert ending.metadata["causation_id"] == str(late.events[0].event_id)
    assert (events[3].recorded_at - started_at).total_seconds() > 1.0


class AgentDaemon:
    """`python -m aura_pg project --catalog FILE` running the deliberate
    agents (tests/helpers/deliberate_agents.py), killed and restarted."""

    def __init__(self, dsn: str, catalog: Path, reactions_log: Path, logs: Path) -> None:
        self.dsn = dsn
        self.catalog = catalog
        self.reactions_log = reactions_log
        self.logs = logs
        self.started: list[subprocess.Popen[str]] = []

    def start(self) -> subprocess.Popen[str]:
        with (self.logs / f"daemon-{len(self.started)}.log").open("w") as log:
            process = subprocess.Popen(
                [
                    sys.executable, "-m", "aura_pg", "project",
                    "--dsn", self.dsn, "--catalog", str(self.catalog),
                    "--owner", f"agents-{len(self.started)}",
                    "--poll-interval", "0.2", "--shutdown-timeout", "10",
                ],
                cwd=ROOT,  # the daemon imports tests.helpers.deliberate_agents
                env={**os.environ, LOG_VARIABLE: str(self.reactions_log)},
                stdout=subprocess.DEVNULL,
                stderr=log,
                text=True,
            )  # fmt: skip
        self.started.append(process)
        return process

    def logged(self) -> list[dict[str, str]]:
        """The reactions the deliberate agents wrote, committed or not."""
        if not self.reactions_log.exists():
            return []
        lines = self.reactions_log.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]

    def kill_mid_reaction(self, process: subprocess.Popen[str], kind: str) -> None:
        """SIGKILL as soon as a new reaction of type ``kind`` is logged: the
        agent that logged it is then thinking before its commit."""
        start = len(self.logged())
        wait_for_sync(
            lambda: any(r["type"] == kind for r in self.logged()[start:]),
            60,
            f"a {kind} reaction to kill in",
        )
        process.send_signal(signal.SIGKILL)
        assert process.wait(10) == -signal.SIGKILL
        # Its sessions end (and roll back) once the server notices.
        wait_for_sync(
            lambda: (
                query(
                    self.dsn,
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND application_name LIKE 'aura-pg%%'",
                )
                == [(0,)]
            ),
            30,
            "the killed daemon's sessions to end",
        )

    def close(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.kill()
                process.wait(10)


def recorded_keys(dsn: str) -> Counter[str]:
    return Counter(row[0] for row in query(dsn, "SELECT idempotency_key FROM aura.events"))


def test_agents_killed_mid_reaction_react_exactly_once(
    dsn: str, store: EventStore, tmp_path: Path
) -> None:
    agents = ("ada", "grace", "linus", "barbara")
    document = agent_catalog(agents, batch_size=5)
    for entry in document["projections"]:
        entry["handler"] = f"tests.helpers.deliberate_agents:{entry['name']}"
    catalog = tmp_path / "agents.yaml"
    catalog.write_text(yaml.safe_dump(document), encoding="utf-8")
    repository = DebateRepository(store)
    debate_ids = []
    for index in range(6):
        participants = [agents[(index + k) % len(agents)] for k in range(3 + index % 2)]
        debate_id = f"kill-{index}"
        repository.start(
            debate_id,
            f"{TOPIC} (#{index})",
            participants,
            started_by=participants[0],
            rules=DebateRules(max_rounds=3),
        )
        debate_ids.append(debate_id)

    daemon = AgentDaemon(dsn, catalog, tmp_path / "reactions.jsonl", tmp_path)
    lost: list[dict[str, str]] = []
    try:
        process = daemon.start()
        # Part-way, four times: while the agents argue, as a moderator
        # completes a round, while they vote, as a moderator ends a debate.
        for kind in (
            "DEBATE_ARGUMENT_ADDED",
            "DEBATE_ROUND_COMPLETED",
            "DEBATE_VOTE_CAST",
            "DEBATE_CONSENSUS_REACHED",
        ):
            daemon.kill_mid_reaction(process, kind)
            recorded = recorded_keys(dsn)
            lost += [r for r in daemon.logged() if recorded[r["key"]] == 0]
            assert not settled(store, debate_ids), "the debates ended before the kill"
            process = daemon.start()
        wait_for_sync(lambda: settled(store, debate_ids), 120, "the agents to end the debates")
        wait_for_sync(lambda: processors_caught_up(dsn, agents), 60, "catch-up")
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
    finally:
        daemon.close()

    # The kills landed in reactions of each kind: logged, then rolled back
    # with the batch that heard their causes.
    assert {r["type"] for r in lost} >= {
        "DEBATE_ARGUMENT_ADDED",
        "DEBATE_ROUND_COMPLETED",
        "DEBATE_VOTE_CAST",
        "DEBATE_CONSENSUS_REACHED",
    }, lost
    for debate_id in debate_ids:
        assert_reacted_exactly_once(store, debate_id)
        assert_reactions_name_their_causes(dsn, streams_of(store, debate_id))
    # A lost argument or vote was made again in reaction to the same cause
    # (same key), once. (The moderator may complete a round, or end the
    # debate, on another argument or vote than the first time: whichever it
    # hears when the last one is in.)
    recorded = recorded_keys(dsn)
    for reaction in lost:
        if reaction["type"] in ("DEBATE_ARGUMENT_ADDED", "DEBATE_VOTE_CAST"):
            assert recorded[reaction["key"]] == 1, reaction
    assert query(dsn, "SELECT count(*) FROM aura.dead_letters") == [(0,)]
    assert_log_consistent(dsn)


def test_demo_reactive_on_an_existing_database(empty_dsn: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "aura_pg.cli", "demo", "--reactive", "--dsn", empty_dsn,
         "--debates", "4", "--agents", "4"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 agents as Python processors (agent_ada, agent_grace, agent_linus, agent_barbara)" in (
        result.stdout
    )
    assert "Agents: events heard, what their reactions wrote" in result.stdout
    assert "Debates by outcome (debate_state.debates)" in result.stdout
    assert "debates ended 4/4" in result.stdout
    debate_ids = [
        row["debate_id"] for row in fetch(empty_dsn, "SELECT debate_id FROM debate_state.debates")
    ]
    assert len(debate_ids) == 4
    with EventStore.connect(empty_dsn, max_size=2) as store:
        for debate_id in debate_ids:
            debate = assert_reacted_exactly_once(store, debate_id)
            assert debate.rules.max_rounds in (1, 2, 3)
            assert_reactions_name_their_causes(empty_dsn, streams_of(store, debate_id))
