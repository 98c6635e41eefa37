"""The debate domain at its edges (issue 25), without a database: an exact
quorum, the v1 upcaster on every v1 event, field values refused as
``InvalidCommand`` before they reach the store, and who may propose which
decision."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from aura_pg.domain import (
    AlreadyExists,
    Debate,
    DebateRules,
    DebateStatus,
    Decision,
    InvalidCommand,
    NotFound,
    RuleViolation,
    decision_id_for,
    votes_needed,
)
from aura_pg.domain.events import DebateStarted
from aura_pg.models import NewEvent, RecordedEvent

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
AGENTS = ("ann", "bob", "cyd", "dan")


def recorded(event: NewEvent, version: int, stream: str = "debate-d1") -> RecordedEvent:
    """The event as the store gives it back (data through JSON)."""
    return RecordedEvent(
        global_position=version,
        transaction_id=1,
        event_id=event.event_id,
        stream_id=stream,
        version=version,
        type=event.type,
        data=json.loads(json.dumps(dict(event.data))),
        metadata=json.loads(json.dumps(dict(event.metadata or {}))),
        idempotency_key=event.key,
        recorded_at=T0,
    )


def apply(aggregate: Debate | Decision, events: Iterable[NewEvent]) -> None:
    for event in events:
        aggregate.apply(recorded(event, aggregate.version + 1, aggregate.stream_id(aggregate.id)))


def debate_with_votes(rules: DebateRules, approve: int, reject: int) -> Debate:
    agents = tuple(f"a{i}" for i in range(approve + reject))
    debate = Debate("d1")
    apply(debate, debate.start("Ship it?", agents, agents[0], rules))
    for agent in agents:
        apply(debate, debate.add_argument(agent, 1, "for", "x", 0.5))
    apply(debate, debate.complete_round(1))
    for n, agent in enumerate(agents):
        apply(debate, debate.cast_vote(agent, "approve" if n < approve else "reject", 0.5))
    return debate


# -- the quorum is exact -----------------------------------------------------


@pytest.mark.parametrize(
    ("quorum", "participants", "needed"),
    [
        (2 / 3, 3, 2),  # 2/3 is 0.6666666666666666 as a float: still 2 of 3
        (2 / 3, 5, 4),
        (2 / 3, 6, 4),
        (2 / 3, 300, 200),
        (0.5000000001, 4, 3),  # was 2: both outcomes reached it
        (0.5000000001, 10, 6),
        (0.55, 20, 11),  # 0.55 is 11/20, not the float just above it
        (0.7, 10, 7),
        (0.75, 4, 3),
        (0.6, 5, 3),
        (1.0, 7, 7),
        (1, 7, 7),
        (2 / 3, 0, 1),
        (0.51, 1, 1),
    ],
)
def test_votes_needed_is_exact(quorum: float, participants: int, needed: int) -> None:
    assert votes_needed(quorum, participants) == needed


def test_a_quorum_means_the_decimal_it_is_written_as() -> None:
    from aura_pg.domain.debate import quorum_fraction

    assert quorum_fraction(0.55) == Fraction(11, 20)
    assert quorum_fraction(2 / 3) == Fraction("0.6666666666666666")
    assert quorum_fraction(1) == 1
    assert quorum_fraction(Fraction(2, 3)) == Fraction(2, 3)
    # the event's JSON holds the same digits, so SQL numeric agrees
    payload = DebateStarted(debate_id="d", topic="t", participants=AGENTS, started_by="ann")
    stored = json.loads(json.dumps(payload.model_dump(mode="json")), parse_float=Fraction)
    assert stored["quorum"] == quorum_fraction(2 / 3)


def test_two_to_two_of_four_is_no_consensus_above_one_half() -> None:
    """The issue's case: quorum 0.5000000001, 2 approve and 2 reject."""
    debate = debate_with_votes(DebateRules(quorum=0.5000000001), 2, 2)
    assert debate.votes_needed() == 3
    assert debate.consensus_outcome() is None
    with pytest.raises(RuleViolation) as refused:
        debate.reach_consensus("x")
    assert refused.value.code == "no_quorum"
    assert debate.quorum_impossible()
    apply(debate, debate.fail("split"))
    assert debate.status is DebateStatus.FAILED


quorums = st.floats(min_value=0.5, max_value=1.0, exclude_min=True) | st.fractions(
    min_value=Fraction(1, 2), max_value=1
).filter(lambda q: q > Fraction(1, 2))


@given(quorum=quorums, participants=st.integers(0, 10_000), data=st.data())
@example(quorum=0.5000000001, participants=4, data=None)
@example(quorum=0.5000000001, participants=10, data=None)
@example(quorum=float.fromhex("0x1.0000000000001p-1"), participants=2**52, data=None)
def test_at_most_one_outcome_reaches_the_quorum(
    quorum: float | Fraction, participants: int, data: st.DataObject | None
) -> None:
    from aura_pg.domain.debate import quorum_fraction

    needed = votes_needed(quorum, participants)
    share = quorum_fraction(quorum) * participants
    # the least whole number of votes that is at least the share (and >= 1)
    assert needed >= share and (needed - 1 < share or needed == 1)
    # more than half of the participants: two outcomes cannot both reach it
    assert 2 * needed > participants
    if participants:
        assert needed <= participants
    if data is not None:
        approve = data.draw(st.integers(0, participants))
        reject = data.draw(st.integers(0, participants - approve))
        assert not (approve >= needed and reject >= needed)


@given(
    quorum=st.floats(min_value=0.5, max_value=1.0, exclude_min=True),
    approve=st.integers(0, 12),
    reject=st.integers(0, 12),
)
@example(quorum=0.5000000001, approve=2, reject=2)
@example(quorum=0.5000000001, approve=5, reject=5)
def test_a_debate_never_finds_two_outcomes(quorum: float, approve: int, reject: int) -> None:
    if approve + reject < 3:
        return
    debate = debate_with_votes(DebateRules(quorum=quorum), approve, reject)
    outcome = debate.consensus_outcome()
    needed = debate.votes_needed()
    assert not (approve >= needed and reject >= needed)
    assert outcome == ("approve" if approve >= needed else "reject" if reject >= needed else None)


# -- version 1 of DEBATE_STARTED ---------------------------------------------


def v1(data: dict[str, Any], metadata: dict[str, Any] | None = None) -> RecordedEvent:
    return recorded(
        NewEvent("DEBATE_STARTED", {"debate_id": "d1", "topic": "Old", **data}, metadata), 1
    )


@pytest.mark.parametrize(
    ("data", "participants", "started_by"),
    [
        ({"agents": ["bob", "ann"]}, ("bob", "ann"), "bob"),  # fewer than v2's 3
        ({"agents": ["bob"], "started_by": ""}, ("bob",), "bob"),
        ({"agents": ["bob", "ann", "cyd"], "started_by": None}, ("bob", "ann", "cyd"), "bob"),
        ({"agents": ["bob", "ann", "cyd"], "started_by": "cyd"}, ("bob", "ann", "cyd"), "cyd"),
        ({"agents": ["bob", "ann", "bob"]}, ("bob", "ann"), "bob"),  # SQL dedupes too
        ({"agents": []}, (), None),
        ({"agents": ["x:1", "x:2", "x:3"]}, ("x:1", "x:2", "x:3"), "x:1"),  # ':' was valid then
    ],
)
def test_every_v1_start_folds(
    data: dict[str, Any], participants: tuple[str, ...], started_by: str | None
) -> None:
    for metadata in (None, {"schema_version": 1}):
        debate = Debate.fold("d1", [v1(data, metadata)])
        assert debate.status is DebateStatus.OPEN
        assert debate.participants == participants
        assert debate.started_by == started_by
        assert debate.rules == DebateRules()


def test_a_two_agent_v1_debate_goes_on_under_todays_rules() -> None:
    debate = Debate.fold("d1", [v1({"agents": ["bob", "ann"]})])
    assert debate.votes_needed() == 2
    apply(debate, debate.join("cyd"))  # nobody voted yet: anyone may join
    for agent in ("bob", "ann", "cyd"):
        apply(debate, debate.add_argument(agent, 1, "for", "x", 0.5))
    apply(debate, debate.complete_round(1))
    apply(debate, debate.cast_vote("bob", "approve", 0.5))
    apply(debate, debate.cast_vote("ann", "approve", 0.5))
    apply(debate, debate.reach_consensus("k"))
    assert debate.outcome == "approve"


def test_a_recorded_id_with_a_colon_still_decodes_but_no_command_writes_one() -> None:
    """Ids with ':' were valid until they were refused for idempotency keys:
    recorded ones must still load, new ones are refused."""
    joined = recorded(NewEvent("AGENT_JOINED", {"agent_id": "x:4"}), 2)
    debate = Debate.fold("d1", [v1({"agents": ["x:1", "x:2", "x:3"]}), joined])
    assert debate.participants[-1] == "x:4"
    with pytest.raises(InvalidCommand):
        debate.join("y:1")
    with pytest.raises(InvalidCommand):
        Debate("d2").start("t", ("a:1", "b", "c"), "b")
    with pytest.raises(ValueError, match="':'"):
        DebateStarted(debate_id="d", topic="t", participants=("a:1", "b", "c"), started_by="b")


def test_a_v2_start_keeps_its_rules() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        DebateStarted(debate_id="d", topic="t", participants=("a", "b"), started_by="a")


# -- invalid field values are InvalidCommand -----------------------------------


def refused_as_invalid(call: Any) -> None:
    with pytest.raises(InvalidCommand) as refused:
        call()
    assert refused.value.code == "invalid_arguments"


@pytest.mark.parametrize(
    "rules",
    [
        {"timeout_seconds": float("inf")},
        {"timeout_seconds": float("nan")},
        {"timeout_seconds": 0},
        {"timeout_seconds": True},
        {"max_rounds": True},
        {"max_rounds": 2.0},
        {"max_rounds": "3"},
        {"max_rounds": 0},
        {"max_rounds": 51},
        {"quorum": True},
        {"quorum": 0.5},
        {"quorum": float("nan")},
        {"quorum": float("inf")},
        {"quorum": "0.7"},
        {"quorum": Fraction(1, 2)},
    ],
)
def test_invalid_rules_are_invalid_commands(rules: dict[str, Any]) -> None:
    refused_as_invalid(lambda: DebateRules(**rules))


def test_valid_rules_are_kept() -> None:
    rules = DebateRules(max_rounds=50, quorum=1, timeout_seconds=1e9)
    assert (rules.max_rounds, rules.quorum, rules.timeout_seconds) == (50, 1.0, 1e9)
    assert DebateRules(quorum=Fraction(3, 4)).quorum == 0.75  # type: ignore[arg-type]


def open_debate() -> Debate:
    debate = Debate("d1")
    apply(debate, debate.start("Ship it?", AGENTS, "ann"))
    return debate


@pytest.mark.parametrize(
    "bad", ["nul\x00inside", "\x00", "lone \ud800 surrogate"], ids=["nul", "only-nul", "surrogate"]
)
def test_text_postgres_cannot_store_is_an_invalid_command(bad: str) -> None:
    refused_as_invalid(lambda: Debate("d1").start(bad, AGENTS[:3], "ann"))
    debate = open_debate()
    refused_as_invalid(lambda: debate.add_argument("ann", 1, "for", bad, 0.5))
    for agent in AGENTS:
        apply(debate, debate.add_argument(agent, 1, "for", "x", 0.5))
    apply(debate, debate.complete_round(1))
    for agent in AGENTS[:3]:
        apply(debate, debate.cast_vote(agent, "reject", 0.5))
    apply(debate, debate.reach_consensus("k"))
    decision = Decision("k")
    refused_as_invalid(lambda: decision.propose(debate, "ann", bad))
    apply(decision, decision.propose(debate, "ann", "ok"))
    refused_as_invalid(lambda: decision.reject("bob", bad))


def test_fail_with_an_unstorable_reason() -> None:
    debate = open_debate()
    for agent in AGENTS:
        apply(debate, debate.add_argument(agent, 1, "for", "x", 0.5))
    apply(debate, debate.complete_round(1))
    for agent, vote in zip(AGENTS, ("approve", "approve", "reject", "reject"), strict=True):
        apply(debate, debate.cast_vote(agent, vote, 0.5))  # type: ignore[arg-type]
    refused_as_invalid(lambda: debate.fail("split\x00"))


@pytest.mark.parametrize("now", [datetime(2026, 1, 1, 13, 0), "2026-01-01T13:00:00Z", 1e12])
def test_time_out_needs_an_aware_datetime(now: Any) -> None:
    debate = open_debate()
    refused_as_invalid(lambda: debate.time_out(now))
    apply(debate, debate.time_out(T0 + timedelta(hours=1)))
    assert debate.status is DebateStatus.TIMED_OUT


def test_numbers_are_not_booleans_nor_strings() -> None:
    debate = open_debate()
    refused_as_invalid(lambda: debate.add_argument("ann", 1, "for", "x", True))
    refused_as_invalid(lambda: debate.add_argument("ann", True, "for", "x", 0.5))
    refused_as_invalid(lambda: debate.add_argument("ann", 1, "for", "x", "0.5"))  # type: ignore[arg-type]
    refused_as_invalid(lambda: debate.complete_round(True))


def test_participants_are_a_sequence_of_ids_not_a_string() -> None:
    refused_as_invalid(lambda: Debate("d1").start("t", "abc", "a"))
    refused_as_invalid(lambda: Debate("d1").start("t", ["ann", "bob", 3], "ann"))  # type: ignore[list-item]


# -- who may propose which decision ------------------------------------------


def ended(how: str) -> Debate:
    debate = open_debate()
    for agent in AGENTS:
        apply(debate, debate.add_argument(agent, 1, "for", "x", 0.5))
    apply(debate, debate.complete_round(1))
    if how == "open":
        return debate
    if how == "timed_out":
        apply(debate, debate.time_out(T0 + timedelta(hours=1)))
        return debate
    votes = ["approve"] * 3 if how == "consensus" else ["approve", "approve", "reject", "reject"]
    for agent, vote in zip(AGENTS, votes, strict=False):
        apply(debate, debate.cast_vote(agent, vote, 0.5))  # type: ignore[arg-type]
    if how == "consensus":
        apply(debate, debate.reach_consensus(decision_id_for("d1")))
    else:
        apply(debate, debate.fail("split"))
    return debate


@pytest.mark.parametrize("how", ["open", "failed", "timed_out"])
def test_only_a_consensus_leads_to_a_decision(how: str) -> None:
    debate = ended(how)
    for decision_id in ("x", decision_id_for("d1")):
        with pytest.raises(RuleViolation) as refused:
            Decision(decision_id).propose(debate, "mallory", "hijacked title")
        assert refused.value.code == "no_consensus"
        with pytest.raises(RuleViolation):
            Decision(decision_id).propose_consensus(debate, "ann")


def test_a_debate_that_does_not_exist_leads_to_no_decision() -> None:
    with pytest.raises(NotFound) as refused:
        Decision("x").propose(Debate("nowhere"), "mallory", "t")
    assert refused.value.code == "debate_not_found"


def test_a_consensus_leads_only_to_the_decision_it_names() -> None:
    debate = ended("consensus")
    with pytest.raises(RuleViolation) as refused:
        Decision("x").propose(debate, "mallory", "another decision")
    assert refused.value.code == "not_the_debates_decision"
    other = Debate.fold("other", [])
    with pytest.raises(NotFound):
        Decision(decision_id_for("d1")).propose(other, "mallory", "t")
    # the derived id: only the consensus path proposes it, with its title
    with pytest.raises(RuleViolation) as refused:
        Decision(decision_id_for("d1")).propose(debate, "mallory", "hijacked title")
    assert refused.value.code == "derived_decision_id"
    decision = Decision(decision_id_for("d1"))
    apply(decision, decision.propose_consensus(debate, "ann"))
    assert (decision.debate_id, decision.title) == ("d1", "approve: Ship it?")
    assert decision.propose_consensus(debate, "bob") == []  # proposed already: nothing to do


def test_a_named_decision_of_a_consensus_may_be_proposed_by_hand() -> None:
    debate = open_debate()
    for agent in AGENTS:
        apply(debate, debate.add_argument(agent, 1, "for", "x", 0.5))
    apply(debate, debate.complete_round(1))
    for agent in AGENTS[:3]:
        apply(debate, debate.cast_vote(agent, "reject", 0.5))
    apply(debate, debate.reach_consensus("k-1"))
    decision = Decision("k-1")
    apply(decision, decision.propose(debate, "ann", "Drop it"))
    with pytest.raises(AlreadyExists):
        decision.propose(debate, "ann", "again")


def test_a_preempted_decision_fails_the_consensus_path_loudly() -> None:
    """A proposal for the derived id recorded by someone else (before the
    domain refused it): the consensus path must not take it for its own."""
    debate = ended("consensus")
    decision = Decision(decision_id_for("d1"))
    forged = NewEvent(
        "DECISION_PROPOSED",
        {
            "decision_id": decision_id_for("d1"),
            "debate_id": "some-other-debate",
            "proposed_by": "mallory",
            "title": "hijacked title",
        },
    )
    decision.apply(recorded(forged, 1, stream=f"decision-{decision_id_for('d1')}"))
    with pytest.raises(AlreadyExists) as refused:
        decision.propose_consensus(debate, "ann")
    assert refused.value.code == "decision_preempted"
