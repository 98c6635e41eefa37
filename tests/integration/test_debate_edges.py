"""The debate domain's edges (issue 25) on the real store and the shipped
read model: a quorum only one outcome can reach, a decision nobody can
pre-empt, no decision for a debate without consensus, version 1 starts that
both folds read alike, and invalid values refused before the store."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from aura_pg import EventStore, NewEvent
from aura_pg.domain import (
    AlreadyExists,
    DebateRepository,
    DebateRules,
    DebateStatus,
    InvalidCommand,
    NotFound,
    RuleViolation,
    debate_stream,
    decision_id_for,
    decision_stream,
    votes_needed,
)
from aura_pg.projection.catalog import load_catalog
from aura_pg.projection.connection import connect
from aura_pg.projection.registration import register_projections
from aura_pg.projection.settings import ProjectorSettings
from tests.helpers.debate_projections import rows, shipped_daemon
from tests.helpers.projections import caught_up, wait_for

AGENTS = ("ann", "bob", "cyd", "dan")


def voting(repo: DebateRepository, debate_id: str, rules: DebateRules | None = None) -> None:
    repo.start(debate_id, f"Topic {debate_id}", AGENTS, "ann", rules)
    for agent in AGENTS:
        repo.add_argument(debate_id, agent, 1, "for", "because", 0.5)
    repo.complete_round(debate_id, 1)


def votes(repo: DebateRepository, debate_id: str, *choices: str) -> None:
    for agent, choice in zip(AGENTS, choices, strict=False):
        repo.cast_vote(debate_id, agent, choice, 0.5)  # type: ignore[arg-type]


def code_of(error: pytest.ExceptionInfo[Any]) -> str:
    return str(error.value.code)


def append_raw(store: EventStore, stream: str, event_type: str, data: dict[str, Any]) -> None:
    """An event appended without the domain: what an older version or
    another writer could have recorded."""
    store.append(stream, [NewEvent(event_type, data, {"schema_version": 1})])


# -- the quorum ------------------------------------------------------------------


def test_two_to_two_above_one_half_is_no_consensus(store: EventStore) -> None:
    repo = DebateRepository(store)
    voting(repo, "q1", DebateRules(quorum=0.5000000001))
    votes(repo, "q1", "approve", "approve", "reject", "reject")
    with pytest.raises(RuleViolation) as refused:
        repo.reach_consensus("q1", "ann")
    assert code_of(refused) == "no_quorum"
    assert repo.load("q1").status is DebateStatus.OPEN
    repo.fail("q1", "split")
    assert repo.load("q1").status is DebateStatus.FAILED
    assert store.read_stream(decision_stream(decision_id_for("q1"))) == []


@pytest.mark.parametrize("quorum", [2 / 3, 0.5000000001, 0.55, 0.7, 0.75, 1.0])
def test_sql_reading_the_recorded_quorum_needs_the_same_votes(
    store: EventStore, dsn: str, quorum: float
) -> None:
    """The mapping of a float quorum to a rational is the decimal the
    event's JSON holds: SQL numeric arithmetic on it agrees exactly."""
    repo = DebateRepository(store)
    repo.start("q2", "t", AGENTS[:3], "ann", DebateRules(quorum=quorum))
    sizes = [0, 1, 3, 4, 10, 20, 300, 10**12 + 1]
    needed = rows(
        dsn,
        "SELECT n, greatest(1, ceil((data->>'quorum')::numeric * n))::bigint AS needed "
        "FROM aura.events, unnest(%s::bigint[]) AS n "
        "WHERE stream_id = 'debate-q2' AND type = 'DEBATE_STARTED' ORDER BY n",
        (sizes,),
    )
    assert [r["needed"] for r in needed] == [votes_needed(quorum, n) for n in sizes]


# -- who proposes a debate's decision ------------------------------------------


def test_nobody_can_preempt_a_debates_decision(store: EventStore) -> None:
    """The issue's attack through the public API, and its variants."""
    repo = DebateRepository(store)
    voting(repo, "p1")
    derived = decision_id_for("p1")
    with pytest.raises(NotFound) as missing:
        repo.decisions.propose(derived, "some-other-debate", "mallory", "hijacked title")
    assert code_of(missing) == "debate_not_found"
    with pytest.raises(RuleViolation) as refused:
        repo.decisions.propose(derived, "p1", "mallory", "hijacked title")
    assert code_of(refused) == "no_consensus"
    voting(repo, "other")
    votes(repo, "other", "reject", "reject", "reject")
    repo.reach_consensus("other", "bob")
    with pytest.raises(RuleViolation) as refused:
        repo.decisions.propose(derived, "other", "mallory", "hijacked title")
    assert code_of(refused) == "not_the_debates_decision"
    assert store.read_stream(decision_stream(derived)) == []

    votes(repo, "p1", "approve", "approve", "approve")
    result = repo.reach_consensus("p1", "ann")
    assert (result.debate.appended, result.decision.appended) == (1, 1)
    decision = repo.decisions.load(derived)
    assert (decision.debate_id, decision.proposed_by, decision.title) == (
        "p1",
        "ann",
        "approve: Topic p1",
    )
    # after the consensus too, only its path proposes the derived id
    with pytest.raises(AlreadyExists):
        repo.decisions.propose(derived, "p1", "mallory", "hijacked title")


def test_a_crash_repair_cannot_be_preempted_by_hand(store: EventStore) -> None:
    repo = DebateRepository(store)
    voting(repo, "p2")
    votes(repo, "p2", "approve", "approve", "approve")
    repo.execute("p2", lambda d: d.reach_consensus(decision_id_for("p2")))  # died before proposing
    with pytest.raises(RuleViolation) as refused:
        repo.decisions.propose(decision_id_for("p2"), "p2", "mallory", "hijacked title")
    assert code_of(refused) == "derived_decision_id"
    assert repo.ensure_decision("p2", "ann").appended == 1
    assert repo.decisions.load(decision_id_for("p2")).proposed_by == "ann"


def test_a_recorded_foreign_proposal_fails_the_consensus_loudly(store: EventStore) -> None:
    """A proposal recorded before the fix (or by a writer bypassing the
    domain) under the derived id: reach_consensus raises before ending the
    debate instead of appending no proposal."""
    repo = DebateRepository(store)
    voting(repo, "p3")
    votes(repo, "p3", "approve", "approve", "approve")
    derived = decision_id_for("p3")
    forged = {
        "decision_id": derived,
        "debate_id": "some-other-debate",
        "proposed_by": "mallory",
        "title": "hijacked title",
    }
    append_raw(store, decision_stream(derived), "DECISION_PROPOSED", forged)
    with pytest.raises(AlreadyExists) as refused:
        repo.reach_consensus("p3", "ann")
    assert code_of(refused) == "decision_preempted"
    assert repo.load("p3").status is DebateStatus.OPEN  # nothing was written
    # A consensus recorded already: the repair step fails loudly too.
    repo.execute("p3", lambda d: d.reach_consensus(derived))
    with pytest.raises(AlreadyExists) as refused:
        repo.ensure_decision("p3", "ann")
    assert code_of(refused) == "decision_preempted"
    assert len(store.read_stream(decision_stream(derived))) == 1


@pytest.mark.parametrize("ending", ["failed", "timed_out", "open"])
def test_no_decision_for_a_debate_without_consensus(store: EventStore, ending: str) -> None:
    repo = DebateRepository(store)
    voting(repo, "f1")
    if ending == "failed":
        votes(repo, "f1", "approve", "approve", "reject", "reject")
        repo.fail("f1", "split")
    elif ending == "timed_out":
        started_at = repo.load("f1").started_at
        assert started_at is not None
        repo.time_out("f1", started_at + timedelta(hours=1))
    with pytest.raises(RuleViolation) as refused:
        repo.decisions.propose("x", "f1", "mallory", "ghost decision")
    assert code_of(refused) == "no_consensus"
    assert store.read_stream(decision_stream("x")) == []


# -- the read model says what the domain's fold says ---------------------------

V1_STARTS: dict[str, dict[str, Any]] = {
    "v1-two": {"agents": ["b1", "b2"]},
    "v1-empty-starter": {"agents": ["b1", "b2", "b3"], "started_by": ""},
    "v1-null-starter": {"agents": ["b1", "b2", "b3"], "started_by": None},
    "v1-twice": {"agents": ["b1", "b2", "b1", "b3"]},
    "v1-nobody": {"agents": []},
    "v1-colon": {"agents": ["x:1", "x:2", "x:3"], "started_by": "x:2"},
}


async def test_the_read_model_agrees_with_the_domain_fold(store: EventStore, dsn: str) -> None:
    repo = DebateRepository(store)
    for debate_id, data in V1_STARTS.items():
        append_raw(
            store,
            debate_stream(debate_id),
            "DEBATE_STARTED",
            {"debate_id": debate_id, "topic": f"Legacy {debate_id}", **data},
        )
    # a two-agent v1 debate goes on through the domain
    repo.join("v1-two", "b3")
    # a failed debate, and a proposal naming it recorded without the domain
    voting(repo, "ghost")
    votes(repo, "ghost", "approve", "approve", "reject", "reject")
    repo.fail("ghost", "split")
    proposal = {"decision_id": "x", "debate_id": "ghost", "proposed_by": "ann", "title": "boo"}
    append_raw(store, decision_stream("x"), "DECISION_PROPOSED", proposal)
    # an open debate named by a proposal, and one in consensus
    voting(repo, "early")
    append_raw(store, decision_stream("y"), "DECISION_PROPOSED", {**proposal, "debate_id": "early"})
    voting(repo, "done")
    votes(repo, "done", "reject", "reject", "reject")
    repo.reach_consensus("done", "ann")

    specs = load_catalog().select(["debate_state"])
    async with await connect(dsn, ProjectorSettings(), "test") as conn:
        await register_projections(conn, specs)
    async with shipped_daemon(dsn, ["debate_state"]):
        await wait_for(lambda: caught_up(dsn, "debate_state"), what="debate_state")

    model = {r["debate_id"]: r for r in rows(dsn, "SELECT * FROM debate_state.debates")}
    assert set(model) == {*V1_STARTS, "ghost", "early", "done"}
    for debate_id, row in model.items():
        debate = repo.load(debate_id)  # every stream loads
        assert (
            row["status"],
            tuple(row["participants"]),
            row["started_by"],
            row["decision_id"],
            row["outcome"],
            row["max_rounds"],
        ) == (
            debate.status.value,
            debate.participants,
            debate.started_by,
            debate.decision_id,
            debate.outcome,
            debate.rules.max_rounds,
        ), debate_id
    assert model["ghost"]["decision_id"] is None
    assert model["early"]["decision_id"] is None
    assert model["done"]["decision_id"] == decision_id_for("done")
    assert model["v1-two"]["participants"] == ["b1", "b2", "b3"]
    assert model["v1-empty-starter"]["started_by"] == "b1"
    assert model["v1-nobody"]["started_by"] is None


# -- invalid values are InvalidCommand, and nothing is written -----------------


def test_invalid_values_are_refused_before_the_store(store: EventStore) -> None:
    repo = DebateRepository(store)
    refusals: list[Any] = [
        lambda: repo.start("i1", "t", AGENTS, "ann", DebateRules(timeout_seconds=float("inf"))),
        lambda: repo.start("i1", "nul\x00topic", AGENTS, "ann"),
        lambda: repo.start("i1", "t", AGENTS, "ann", DebateRules(max_rounds=True)),
    ]
    for refusal in refusals:
        with pytest.raises(InvalidCommand) as refused:
            refusal()
        assert code_of(refused) == "invalid_arguments"
    assert store.read_stream(debate_stream("i1")) == []

    voting(repo, "i2")
    version = repo.load("i2").version
    with pytest.raises(InvalidCommand):
        repo.add_argument("i2", "ann", 2, "for", "nul\x00text", 0.5)
    with pytest.raises(InvalidCommand):
        repo.time_out("i2", datetime(2100, 1, 1))  # naive
    assert repo.load("i2").version == version
    votes(repo, "i2", "approve", "approve", "approve")
    version = repo.load("i2").version
    with pytest.raises(InvalidCommand):  # checked before the consensus is appended
        repo.reach_consensus("i2", "not an agent id")
    assert repo.load("i2").version == version
    assert repo.reach_consensus("i2", "ann").appended == 2


def test_time_out_trusts_the_clock_it_is_given(store: EventStore) -> None:
    """Documented: a forged future time ends an open debate at once."""
    repo = DebateRepository(store)
    voting(repo, "t1")
    started_at = repo.load("t1").started_at
    assert started_at is not None
    repo.time_out("t1", started_at + timedelta(days=365))
    assert repo.load("t1").status is DebateStatus.TIMED_OUT
