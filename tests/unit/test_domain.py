"""The debate domain without a database: folds, every invariant of the
commands, encode/decode round trips, upcasting and the simulator's plans."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from aura_pg import AppendRetry
from aura_pg.domain import (
    AlreadyExists,
    Closed,
    Debate,
    DebateRules,
    DebateStatus,
    Decision,
    DecisionStatus,
    DomainError,
    InvalidCommand,
    NotAParticipant,
    NotFound,
    RetryPolicy,
    RuleViolation,
    UnexpectedEvent,
    decision_id_for,
    plan_debate,
    votes_needed,
)
from aura_pg.domain.events import (
    PAYLOAD_TYPES,
    AgentJoined,
    DebateArgumentAdded,
    DebateConsensusReached,
    DebateFailed,
    DebateRoundCompleted,
    DebateStarted,
    DebateTimedOut,
    DebateVoteCast,
    DecisionApproved,
    DecisionProposed,
    DecisionRejected,
    EventPayload,
    decode,
    encode,
)
from aura_pg.errors import AuraPgError, EventValidationError
from aura_pg.models import NewEvent, RecordedEvent

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
AGENTS = ("ann", "bob", "cyd")


def recorded(
    event: NewEvent, version: int, stream: str = "debate-d1", at: datetime = T0
) -> RecordedEvent:
    """The event as the store would give it back (data through JSON)."""
    data: Any = event.data
    metadata: Any = event.metadata or {}
    return RecordedEvent(
        global_position=version,
        transaction_id=1,
        event_id=event.event_id,
        stream_id=stream,
        version=version,
        type=event.type,
        data=json.loads(json.dumps(dict(data))),
        metadata=json.loads(json.dumps(dict(metadata))),
        idempotency_key=event.key,
        recorded_at=at,
    )


def apply(debate: Debate, events: Iterable[NewEvent]) -> Debate:
    for event in events:
        debate.apply(recorded(event, debate.version + 1))
    return debate


def started(participants: tuple[str, ...] = AGENTS, rules: DebateRules | None = None) -> Debate:
    debate = Debate("d1")
    return apply(debate, debate.start("Ship it?", participants, participants[0], rules))


def argued(debate: Debate, round_: int | None = None) -> Debate:
    round_ = round_ or debate.current_round
    for agent in debate.participants:
        apply(debate, debate.add_argument(agent, round_, "for", "because", 0.5))
    return debate


def voting(participants: tuple[str, ...] = AGENTS, rules: DebateRules | None = None) -> Debate:
    """A debate with its first round completed: open for votes."""
    debate = argued(started(participants, rules))
    return apply(debate, debate.complete_round(1))


def vote(debate: Debate, votes: dict[str, str]) -> Debate:
    for agent, choice in votes.items():
        apply(debate, debate.cast_vote(agent, choice, 0.8))  # type: ignore[arg-type]
    return debate


def refused(error: type[DomainError], code: str) -> _Refusal:
    return _Refusal(error, code)


class _Refusal:
    """``with refused(RuleViolation, "already_voted"):`` checks class and code."""

    def __init__(self, error: type[DomainError], code: str) -> None:
        self.error = error
        self.code = code
        self._raises = pytest.raises(error)

    def __enter__(self) -> Any:
        self._info = self._raises.__enter__()
        return self._info

    def __exit__(self, *exc: Any) -> bool:
        handled = self._raises.__exit__(*exc)
        assert self._info.value.code == self.code, self._info.value
        return bool(handled)


# -- folding ---------------------------------------------------------------


def test_start_folds_into_an_open_debate() -> None:
    rules = DebateRules(max_rounds=2, quorum=0.75, timeout_seconds=60)
    debate = started(("ann", "bob", "cyd", "dan"), rules)
    assert debate.status is DebateStatus.OPEN
    assert debate.topic == "Ship it?"
    assert debate.participants == ("ann", "bob", "cyd", "dan")
    assert debate.started_by == "ann"
    assert debate.rules == rules
    assert debate.started_at == T0
    assert debate.version == 1
    assert debate.current_round == 1
    assert debate.votes_needed() == 3


def test_a_whole_debate_folds_to_consensus() -> None:
    debate = voting()
    argued(debate, 2)
    apply(debate, debate.complete_round(2))
    vote(debate, {"ann": "approve", "bob": "approve", "cyd": "reject"})
    events = debate.reach_consensus("dec-1")
    payload = decode(recorded(events[0], debate.version + 1))
    assert payload == DebateConsensusReached(
        outcome="approve", votes_for=2, votes_against=1, decision_id="dec-1"
    )
    apply(debate, events)
    assert debate.status is DebateStatus.CONSENSUS
    assert debate.outcome == "approve"
    assert debate.decision_id == "dec-1"
    assert debate.rounds_completed == 2
    assert set(debate.arguments) == {1, 2}
    assert set(debate.arguments[2]) == set(AGENTS)
    assert debate.version == 1 + 3 + 1 + 3 + 1 + 3 + 1


def test_fold_refuses_events_out_of_place() -> None:
    vote_event = encode(DebateVoteCast(agent_id="ann", vote="approve", confidence=1.0))
    with refused(UnexpectedEvent, "not_started"):
        Debate("d1").apply(recorded(vote_event, 1))
    debate = started()
    again = Debate("d1").start("Again", AGENTS, "ann")
    with refused(UnexpectedEvent, "restarted"):
        debate.apply(recorded(again[0], 2))
    proposal = encode(
        DecisionProposed(decision_id="x", debate_id="d1", proposed_by="ann", title="t")
    )
    with refused(UnexpectedEvent, "foreign_event"):
        debate.apply(recorded(proposal, 2))
    assert debate.version == 1  # nothing applied


def test_domain_errors_are_aura_pg_errors() -> None:
    assert issubclass(DomainError, AuraPgError)
    with pytest.raises(AuraPgError):
        started().join("ann")


# -- start -----------------------------------------------------------------


def test_start_needs_three_distinct_participants() -> None:
    with refused(InvalidCommand, "too_few_participants"):
        Debate("d1").start("t", ("ann", "bob"), "ann")
    with refused(InvalidCommand, "duplicate_participants"):
        Debate("d1").start("t", ("ann", "bob", "ann"), "ann")


def test_start_refuses_invalid_rules_and_a_second_start() -> None:
    with refused(InvalidCommand, "invalid_arguments"):
        Debate("d1").start("t", AGENTS, "ann", DebateRules(quorum=0.5))
    with refused(InvalidCommand, "invalid_arguments"):
        Debate("d1").start("", AGENTS, "ann")
    with refused(AlreadyExists, "already_started"):
        started().start("t", AGENTS, "ann")


def test_commands_on_a_debate_that_does_not_exist() -> None:
    with refused(NotFound, "not_found"):
        Debate("d1").join("ann")
    with refused(NotFound, "not_found"):
        Debate("d1").cast_vote("ann", "approve", 0.5)


# -- join ------------------------------------------------------------------


def test_join_adds_a_participant_once() -> None:
    debate = started()
    apply(debate, debate.join("dan"))
    assert debate.participants == (*AGENTS, "dan")
    with refused(RuleViolation, "already_joined"):
        debate.join("dan")
    with refused(RuleViolation, "already_joined"):
        debate.join("ann")


def test_join_only_before_any_vote() -> None:
    debate = voting()
    apply(debate, debate.join("dan"))  # after a round, before votes: fine
    vote(debate, {"ann": "approve"})
    with refused(RuleViolation, "voting_begun"):
        debate.join("eve")


# -- arguments and rounds --------------------------------------------------


def test_argument_only_from_participants_in_the_current_round_once() -> None:
    debate = started()
    with refused(NotAParticipant, "not_a_participant"):
        debate.add_argument("eve", 1, "for", "x", 0.5)
    with refused(RuleViolation, "wrong_round"):
        debate.add_argument("ann", 2, "for", "x", 0.5)
    apply(debate, debate.add_argument("ann", 1, "against", "x", 0.5))
    with refused(RuleViolation, "already_argued"):
        debate.add_argument("ann", 1, "for", "another", 0.9)
    with refused(InvalidCommand, "invalid_arguments"):
        debate.add_argument("bob", 1, "for", "x", 1.5)
    with refused(InvalidCommand, "invalid_arguments"):
        debate.add_argument("bob", 1, "for", "", 0.5)


def test_round_completes_only_when_every_participant_argued() -> None:
    debate = started()
    apply(debate, debate.join("dan"))
    for agent in AGENTS:
        apply(debate, debate.add_argument(agent, 1, "neutral", "x", 0.5))
    with refused(RuleViolation, "round_incomplete") as info:
        debate.complete_round(1)
    assert "dan" in str(info.value)
    apply(debate, debate.add_argument("dan", 1, "for", "x", 0.5))
    with refused(RuleViolation, "wrong_round"):
        debate.complete_round(2)
    events = debate.complete_round(1)
    assert decode(recorded(events[0], 9)) == DebateRoundCompleted(round=1, arguments=4)
    apply(debate, events)
    assert debate.current_round == 2
    with refused(RuleViolation, "wrong_round"):
        debate.add_argument("ann", 1, "for", "late", 0.5)


def test_no_arguments_after_the_last_round() -> None:
    debate = started(rules=DebateRules(max_rounds=1))
    argued(debate)
    apply(debate, debate.complete_round(1))
    with refused(RuleViolation, "rounds_exhausted"):
        debate.add_argument("ann", 2, "for", "x", 0.5)
    with refused(RuleViolation, "rounds_exhausted"):
        debate.complete_round(2)


@pytest.mark.parametrize("ending", ["consensus", "failed", "timed_out"])
def test_nothing_changes_after_the_debate_ended(ending: str) -> None:
    debate = voting(rules=DebateRules(timeout_seconds=10, quorum=1.0))
    if ending == "consensus":
        vote(debate, {"ann": "approve", "bob": "approve", "cyd": "approve"})
        apply(debate, debate.reach_consensus())
    elif ending == "failed":
        vote(debate, {"ann": "approve", "bob": "reject"})
        apply(debate, debate.fail("split"))
    else:
        apply(debate, debate.time_out(T0 + timedelta(seconds=11)))
    assert debate.status.value == ending
    with refused(Closed, "debate_closed"):
        debate.add_argument("ann", 2, "for", "after the end", 0.5)
    with refused(Closed, "debate_closed"):
        debate.cast_vote("cyd", "approve", 0.5)
    with refused(Closed, "debate_closed"):
        debate.join("dan")
    with refused(Closed, "debate_closed"):
        debate.complete_round(2)
    with refused(Closed, "debate_closed"):
        debate.reach_consensus()
    with refused(Closed, "debate_closed"):
        debate.fail("again")
    with refused(Closed, "debate_closed"):
        debate.time_out(T0 + timedelta(days=1))


# -- votes and endings -----------------------------------------------------


def test_votes_only_after_a_completed_round_from_participants_once() -> None:
    debate = argued(started())
    with refused(RuleViolation, "no_completed_round"):
        debate.cast_vote("ann", "approve", 0.5)
    apply(debate, debate.complete_round(1))
    with refused(NotAParticipant, "not_a_participant"):
        debate.cast_vote("eve", "approve", 0.5)
    vote(debate, {"ann": "approve"})
    with refused(RuleViolation, "already_voted"):
        debate.cast_vote("ann", "approve", 0.5)
    with refused(RuleViolation, "already_voted"):
        debate.cast_vote("ann", "reject", 0.9)
    assert debate.votes_for() == 1
    assert debate.votes_against() == 0


@pytest.mark.parametrize(
    ("quorum", "participants", "needed"),
    [(2 / 3, 3, 2), (2 / 3, 4, 3), (2 / 3, 5, 4), (2 / 3, 6, 4), (0.75, 4, 3), (1.0, 5, 5)],
)
def test_votes_needed_is_the_quorum_share_rounded_up(
    quorum: float, participants: int, needed: int
) -> None:
    assert votes_needed(quorum, participants) == needed


def test_consensus_needs_the_quorum_for_one_outcome() -> None:
    debate = voting(("ann", "bob", "cyd", "dan", "eve"))  # 4 of 5 needed
    vote(debate, {"ann": "reject", "bob": "reject", "cyd": "reject"})
    with refused(RuleViolation, "no_quorum"):
        debate.reach_consensus()
    vote(debate, {"dan": "reject"})
    payload = decode(recorded(debate.reach_consensus()[0], 99))
    assert payload == DebateConsensusReached(
        outcome="reject", votes_for=0, votes_against=4, decision_id=None
    )


def test_fail_only_when_no_quorum_is_possible() -> None:
    debate = voting(("ann", "bob", "cyd", "dan", "eve"))  # 4 of 5 needed
    with refused(RuleViolation, "quorum_possible"):
        debate.fail("impatient")
    vote(debate, {"ann": "approve", "bob": "reject"})
    with refused(RuleViolation, "quorum_possible"):
        debate.fail("impatient")  # three more approvals would make 4
    vote(debate, {"cyd": "reject"})
    assert not debate.quorum_impossible()  # two more rejections would make 4
    vote(debate, {"dan": "approve"})
    assert debate.quorum_impossible()  # before eve votes: 3 at most either way
    payload = decode(recorded(debate.fail("split")[0], 99))
    assert payload == DebateFailed(reason="split", votes_for=2, votes_against=2)


def test_time_out_only_past_the_timeout_by_the_clock_given() -> None:
    debate = argued(started(rules=DebateRules(timeout_seconds=30)))
    with refused(RuleViolation, "not_timed_out"):
        debate.time_out(T0 + timedelta(seconds=30))
    with refused(RuleViolation, "not_timed_out"):
        debate.time_out(T0 - timedelta(seconds=60))
    events = debate.time_out(T0 + timedelta(seconds=30.5))
    assert decode(recorded(events[0], 99)) == DebateTimedOut(rounds_completed=0)
    apply(debate, events)
    assert debate.status is DebateStatus.TIMED_OUT


def test_idempotency_keys_are_deterministic_and_endings_share_one() -> None:
    debate = voting()
    assert debate.cast_vote("ann", "approve", 0.5)[0].idempotency_key == "d1:vote:ann"
    assert debate.join("dan")[0].idempotency_key == "d1:join:dan"
    assert debate.add_argument("ann", 2, "for", "x", 0.1)[0].idempotency_key == (
        "d1:argument:2:ann"
    )
    # The same command on the same state: same key and content, so the store
    # would take a retry of it for a duplicate.
    first, again = (
        debate.cast_vote("bob", "reject", 0.5)[0],
        debate.cast_vote("bob", "reject", 0.5)[0],
    )
    assert (first.type, first.key, first.data) == (again.type, again.key, again.data)
    assert first.event_id != again.event_id
    vote(debate, {"ann": "approve", "bob": "approve", "cyd": "reject"})
    endings = [
        debate.reach_consensus("x")[0],
        debate.time_out(T0 + timedelta(days=1))[0],
    ]
    assert {e.idempotency_key for e in endings} == {"d1:end"}
    assert debate.votes_needed() == 2


# -- decisions -------------------------------------------------------------


def in_consensus(decision_id: str = "dec-1") -> Debate:
    """Debate d1 ended in consensus, naming ``decision_id``."""
    debate = vote(voting(), {"ann": "approve", "bob": "approve"})
    return apply(debate, debate.reach_consensus(decision_id))


def decided(action: str) -> Decision:
    decision = Decision("dec-1")
    for event in decision.propose(in_consensus(), "ann", "Ship it"):
        decision.apply(recorded(event, decision.version + 1, "decision-dec-1"))
    events = decision.approve("bob") if action == "approve" else decision.reject("bob", "no")
    for event in events:
        decision.apply(recorded(event, decision.version + 1, "decision-dec-1"))
    return decision


def test_decision_is_proposed_then_approved_or_rejected() -> None:
    approved = decided("approve")
    assert approved.status is DecisionStatus.APPROVED
    assert (approved.debate_id, approved.title, approved.proposed_by) == ("d1", "Ship it", "ann")
    assert approved.resolved_by == "bob"
    assert approved.version == 2
    rejected = decided("reject")
    assert rejected.status is DecisionStatus.REJECTED
    assert rejected.reason == "no"


@pytest.mark.parametrize("action", ["approve", "reject"])
def test_a_resolved_decision_never_changes(action: str) -> None:
    decision = decided(action)
    with refused(Closed, "decision_closed"):
        decision.approve("cyd")
    with refused(Closed, "decision_closed"):
        decision.reject("cyd", "changed my mind")
    with refused(AlreadyExists, "already_proposed"):
        decision.propose(in_consensus(), "ann", "Again")
    late = encode(DecisionApproved(decision_id="dec-1", approved_by="cyd"))
    with refused(UnexpectedEvent, "unexpected_event"):
        decision.apply(recorded(late, 3, "decision-dec-1"))


def test_decision_commands_need_a_proposal() -> None:
    with refused(NotFound, "not_found"):
        Decision("dec-1").approve("ann")
    with refused(NotFound, "not_found"):
        Decision("dec-1").reject("ann", "no")
    with refused(InvalidCommand, "invalid_arguments"):
        Decision("dec-1").propose(in_consensus(), "ann", "")


def test_decision_ids_derive_from_the_debate() -> None:
    assert decision_id_for("d1") == decision_id_for("d1")
    assert decision_id_for("d1") != decision_id_for("d2")
    assert uuid.UUID(decision_id_for("d1")).version == 5


# -- encode / decode / upcast ----------------------------------------------

SAMPLES: list[EventPayload] = [
    DebateStarted(
        debate_id="d1",
        topic="Ship it?",
        participants=AGENTS,
        started_by="ann",
        max_rounds=4,
        quorum=0.8,
        timeout_seconds=12.5,
    ),
    AgentJoined(agent_id="dan"),
    DebateArgumentAdded(agent_id="ann", round=2, stance="neutral", text="hm", confidence=0.25),
    DebateRoundCompleted(round=2, arguments=3),
    DebateVoteCast(agent_id="ann", vote="reject", confidence=1.0),
    DebateConsensusReached(outcome="reject", votes_for=1, votes_against=2, decision_id="x"),
    DebateFailed(reason="split", votes_for=1, votes_against=1),
    DebateTimedOut(rounds_completed=1),
    DecisionProposed(decision_id="x", debate_id="d1", proposed_by="ann", title="T"),
    DecisionApproved(decision_id="x", approved_by="bob"),
    DecisionRejected(decision_id="x", rejected_by="bob", reason="no"),
]


def test_samples_cover_every_event_type() -> None:
    assert {s.TYPE for s in SAMPLES} == set(PAYLOAD_TYPES)


@pytest.mark.parametrize("payload", SAMPLES, ids=lambda p: p.TYPE)
def test_encode_decode_round_trip(payload: EventPayload) -> None:
    event = encode(payload, idempotency_key="k", metadata={"trace": "t"})
    assert event.type == payload.TYPE
    assert event.idempotency_key == "k"
    assert event.metadata == {"trace": "t", "schema_version": payload.VERSION}
    back = decode(recorded(event, 1))
    assert back == payload
    assert type(back) is type(payload)


@pytest.mark.parametrize("metadata", [{}, {"schema_version": 1}])
def test_debate_started_v1_is_read_as_v2(metadata: dict[str, Any]) -> None:
    v1 = NewEvent(
        "DEBATE_STARTED",
        {"debate_id": "d1", "topic": "Old", "agents": ["bob", "ann", "cyd"]},
        metadata,
    )
    payload = decode(recorded(v1, 1))
    assert payload == DebateStarted(
        debate_id="d1", topic="Old", participants=("bob", "ann", "cyd"), started_by="bob"
    )
    debate = Debate.fold("d1", [recorded(v1, 1)])
    assert debate.participants == ("bob", "ann", "cyd")
    assert debate.rules == DebateRules()
    # and it carries on under today's rules
    apply(debate, debate.add_argument("ann", 1, "for", "x", 0.5))
    assert debate.version == 2


def test_v1_keeps_an_explicit_starter() -> None:
    v1 = NewEvent(
        "DEBATE_STARTED",
        {"debate_id": "d1", "topic": "Old", "agents": list(AGENTS), "started_by": "cyd"},
    )
    payload = decode(recorded(v1, 1))
    assert isinstance(payload, DebateStarted)
    assert payload.started_by == "cyd"


def test_v1_with_too_few_agents_folds_as_recorded() -> None:
    """Version 1 set no minimum: such a start stays loadable (see
    tests/unit/test_debate_edges.py for every v1 shape)."""
    v1 = NewEvent("DEBATE_STARTED", {"debate_id": "d1", "topic": "Old", "agents": ["a"]})
    payload = decode(recorded(v1, 1))
    assert isinstance(payload, DebateStarted)
    assert (payload.participants, payload.started_by) == (("a",), "a")


def test_v1_with_invalid_agents_is_a_typed_error() -> None:
    v1 = NewEvent("DEBATE_STARTED", {"debate_id": "d1", "topic": "Old", "agents": ["a b"]})
    with pytest.raises(EventValidationError, match="DEBATE_STARTED"):
        decode(recorded(v1, 1))


@pytest.mark.parametrize(
    ("event", "message"),
    [
        (NewEvent("DEBATE_RENAMED", {"name": "x"}), "unknown event type"),
        (NewEvent("AGENT_JOINED", {"agent_id": "a"}, {"schema_version": 2}), "newer"),
        (NewEvent("AGENT_JOINED", {"agent_id": "a"}, {"schema_version": 0}), "invalid"),
        (NewEvent("AGENT_JOINED", {"agent_id": "a"}, {"schema_version": "1"}), "invalid"),
        (NewEvent("AGENT_JOINED", {"agent_id": "a"}, {"schema_version": True}), "invalid"),
        (NewEvent("AGENT_JOINED", {"agent_id": "a b"}), "AGENT_JOINED"),
        (NewEvent("AGENT_JOINED", {"agent_id": "a", "extra": 1}), "AGENT_JOINED"),
    ],
)
def test_undecodable_events_are_typed_errors(event: NewEvent, message: str) -> None:
    with pytest.raises(EventValidationError, match=message):
        decode(recorded(event, 1))
    # and a debate fold passes the error on
    with pytest.raises(EventValidationError):
        Debate.fold("d1", [recorded(event, 1)])


# -- simulator plans -------------------------------------------------------


def test_plans_depend_only_on_their_inputs() -> None:
    rules = DebateRules()
    first = [plan_debate(7, i, 5, rules) for i in range(1, 30)]
    again = [plan_debate(7, i, 5, rules) for i in range(1, 30)]
    other = [plan_debate(8, i, 5, rules) for i in range(1, 30)]
    assert first == again
    assert first != other


def test_plans_are_valid_debates() -> None:
    rules = DebateRules(max_rounds=4)
    plans = [plan_debate(3, i, 6, rules) for i in range(1, 200)]
    for plan in plans:
        initial = plan.initial_participants
        assert len(initial) >= 3
        assert len(set(initial)) == len(initial)
        assert plan.moderator == initial[0]
        assert 1 <= plan.rounds <= 4
        assert len(plan.round_seconds) == plan.rounds
        for agent in plan.agents:
            assert len(agent.stances) == len(agent.confidences) == plan.rounds
        assert all(a.stops_at_round is None for a in plan.agents if a.agent_id == plan.moderator)
    # the seed gives every kind of debate somewhere
    assert any(a.joins_at_round for p in plans for a in p.agents)
    assert any(a.stops_at_round for p in plans for a in p.agents)
    assert {a.vote for p in plans for a in p.agents} == {"approve", "reject"}


def test_plans_need_three_agents() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        plan_debate(1, 1, 2, DebateRules())


# -- the repository's retry policy ------------------------------------------


DEPRECATED = "unknown_outcome_resends is deprecated"


def test_a_retry_policy_resends_through_append_retry_by_default() -> None:
    assert RetryPolicy().append_retry == AppendRetry()
    fast = AppendRetry(attempts=3, base_delay=0.01)
    assert RetryPolicy(append_retry=fast).append_retry is fast
    assert RetryPolicy(append_retry=None).append_retry is None
    with pytest.raises(TypeError, match="append_retry must be an AppendRetry or None"):
        RetryPolicy(append_retry=3)  # type: ignore[arg-type]


def test_unknown_outcome_resends_is_deprecated_for_append_retry_attempts() -> None:
    with pytest.warns(DeprecationWarning, match=DEPRECATED) as seen:
        policy = RetryPolicy(unknown_outcome_resends=2)
    assert seen[0].filename == __file__  # the warning points at the caller
    assert policy.append_retry == AppendRetry(attempts=3)
    assert policy.unknown_outcome_resends == 2
    with pytest.warns(DeprecationWarning, match=DEPRECATED):
        assert RetryPolicy(30, 0.001, 0.05, 0).append_retry == AppendRetry(attempts=1)
    fast = AppendRetry(base_delay=0.01, max_delay=0.1)
    with pytest.warns(DeprecationWarning, match=DEPRECATED):
        policy = RetryPolicy(unknown_outcome_resends=4, append_retry=fast)
    assert policy.append_retry == AppendRetry(attempts=5, base_delay=0.01, max_delay=0.1)
    with (
        pytest.warns(DeprecationWarning, match=DEPRECATED),
        pytest.raises(ValueError, match="must be an int >= 0, not -1"),
    ):
        RetryPolicy(unknown_outcome_resends=-1)
