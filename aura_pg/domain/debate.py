"""The ``Debate`` aggregate: state folded from a debate stream, and commands
that check the invariants against that state and return the events to append.

Commands never change the aggregate; they return ``NewEvent`` objects (with
deterministic idempotency keys) for the repository to append with the
aggregate's version as the expected version. The state changes only by
applying recorded events, so the events are the single source of truth.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from fractions import Fraction
from numbers import Real
from typing import Literal

from aura_pg.aggregates import Aggregate, Event, applies
from aura_pg.domain.errors import (
    AlreadyExists,
    Closed,
    InvalidCommand,
    NotAParticipant,
    NotFound,
    RuleViolation,
    UnexpectedEvent,
)
from aura_pg.domain.events import (
    DEBATE_EVENTS,
    PAYLOAD_TYPES,
    AgentJoined,
    DebateArgumentAdded,
    DebateConsensusReached,
    DebateFailed,
    DebateRoundCompleted,
    DebateStarted,
    DebateTimedOut,
    DebateVoteCast,
    Vote,
    new_payload,
)
from aura_pg.models import NewEvent, RecordedEvent

Stance = Literal["for", "against", "neutral"]


class DebateStatus(enum.StrEnum):
    NEW = "new"
    """No events yet: only ``start`` is allowed."""
    OPEN = "open"
    CONSENSUS = "consensus"
    FAILED = "failed"
    TIMED_OUT = "timed_out"


@dataclass(frozen=True, slots=True)
class DebateRules:
    """A debate's rules, checked when made: ``InvalidCommand`` for a value
    the debate could not run with or the store could not hold."""

    max_rounds: int = 3
    """1 to 50 rounds (an int, not a bool)."""
    quorum: float = 2 / 3
    """Share of the participants one outcome needs: above 1/2, at most 1
    (any real number but a bool; kept, and recorded, as a float)."""
    timeout_seconds: float = 300.0
    """Positive and finite."""

    def __post_init__(self) -> None:
        max_rounds, quorum, timeout = self.max_rounds, self.quorum, self.timeout_seconds
        if not _is_int(max_rounds) or not 1 <= max_rounds <= 50:
            raise _invalid(f"max_rounds must be an int from 1 to 50, not {max_rounds!r}")
        if not _is_real(quorum) or not (math.isfinite(quorum) and 0.5 < float(quorum) <= 1):
            raise _invalid(f"quorum must be a number above 0.5 and at most 1, not {quorum!r}")
        if not _is_real(timeout) or not (math.isfinite(timeout) and timeout > 0):
            raise _invalid(f"timeout_seconds must be a finite number above 0, not {timeout!r}")
        object.__setattr__(self, "quorum", float(quorum))
        object.__setattr__(self, "timeout_seconds", float(timeout))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _invalid(message: str) -> InvalidCommand:
    return InvalidCommand(message, code="invalid_arguments")


def quorum_fraction(quorum: float | Fraction) -> Fraction:
    """The rational number a quorum means.

    A float quorum means the decimal it is written as: its shortest repr,
    which is also the number its event's JSON holds (``0.55`` is 11/20, not
    the binary float just above it; ``2 / 3`` is 0.6666666666666666), so
    SQL reading the event's quorum as numeric gets the same number. A
    ``Fraction`` is taken as it is.
    """
    if isinstance(quorum, Fraction):
        return quorum
    return Fraction(repr(float(quorum)))


def votes_needed(quorum: float | Fraction, participants: int) -> int:
    """Votes one outcome needs for consensus: the quorum share of the
    participants rounded up, computed exactly (and at least 1). With a
    quorum above 1/2 that is more than half the participants, so at most
    one outcome can reach it."""
    return max(1, math.ceil(quorum_fraction(quorum) * participants))


class Debate(Aggregate):
    """A debate as its events left it. ``Debate.fold(debate_id, events)``
    builds one; ``Debate(debate_id)`` is the state before any event (status
    NEW)."""

    events = DEBATE_EVENTS
    stream_prefix = "debate"

    def __init__(self, debate_id: str) -> None:
        super().__init__(debate_id)
        self.topic = ""
        self.status = DebateStatus.NEW
        self.participants: tuple[str, ...] = ()
        self.started_by: str | None = None
        self.rules = DebateRules()
        self.rounds_completed = 0
        self.arguments: dict[int, dict[str, DebateArgumentAdded]] = {}
        """Per round, per agent: the argument it made."""
        self.votes: dict[str, DebateVoteCast] = {}
        self.started_at: datetime | None = None
        """recorded_at of DEBATE_STARTED (database time)."""
        self.outcome: Vote | None = None
        self.decision_id: str | None = None
        self.end_reason: str | None = None

    @property
    def debate_id(self) -> str:
        return self.id

    def __repr__(self) -> str:
        return f"Debate({self.id!r}, status={self.status.value}, version={self.version})"

    # -- folding -----------------------------------------------------------

    def apply(self, event: RecordedEvent) -> None:
        """Apply one recorded event (decoded and upcast). Events are facts:
        only what would make the state meaningless is refused."""
        if event.type in PAYLOAD_TYPES and event.type not in DEBATE_EVENTS:
            raise UnexpectedEvent(
                f"debate {self.id}: {event.type} does not belong in a debate stream",
                code="foreign_event",
            )
        super().apply(event)

    def when(self, payload: Event, event: RecordedEvent) -> None:
        if self.status is DebateStatus.NEW and not isinstance(payload, DebateStarted):
            raise UnexpectedEvent(
                f"debate {self.id}: {event.type} before DEBATE_STARTED", code="not_started"
            )
        super().when(payload, event)

    @applies(DebateStarted)
    def _started(self, payload: DebateStarted, event: RecordedEvent) -> None:
        if self.status is not DebateStatus.NEW:
            raise UnexpectedEvent(f"debate {self.id}: a second DEBATE_STARTED", code="restarted")
        self.topic = payload.topic
        self.participants = payload.participants
        self.started_by = payload.started_by
        self.rules = DebateRules(payload.max_rounds, payload.quorum, payload.timeout_seconds)
        self.started_at = event.recorded_at
        self.status = DebateStatus.OPEN

    @applies(AgentJoined)
    def _joined(self, payload: AgentJoined) -> None:
        self.participants = (*self.participants, payload.agent_id)

    @applies(DebateArgumentAdded)
    def _argued(self, payload: DebateArgumentAdded) -> None:
        self.arguments.setdefault(payload.round, {})[payload.agent_id] = payload

    @applies(DebateRoundCompleted)
    def _round_completed(self, payload: DebateRoundCompleted) -> None:
        self.rounds_completed = max(self.rounds_completed, payload.round)

    @applies(DebateVoteCast)
    def _voted(self, payload: DebateVoteCast) -> None:
        self.votes[payload.agent_id] = payload

    @applies(DebateConsensusReached)
    def _consensus(self, payload: DebateConsensusReached) -> None:
        self.status = DebateStatus.CONSENSUS
        self.outcome = payload.outcome
        self.decision_id = payload.decision_id

    @applies(DebateFailed)
    def _failed(self, payload: DebateFailed) -> None:
        self.status = DebateStatus.FAILED
        self.end_reason = payload.reason

    @applies(DebateTimedOut)
    def _timed_out(self, payload: DebateTimedOut) -> None:
        self.status = DebateStatus.TIMED_OUT
        self.end_reason = "timed out"

    # -- derived state -----------------------------------------------------

    @property
    def current_round(self) -> int:
        """The round arguments go to: the one after the last completed."""
        return self.rounds_completed + 1

    @property
    def is_open(self) -> bool:
        return self.status is DebateStatus.OPEN

    def votes_for(self) -> int:
        return sum(1 for v in self.votes.values() if v.vote == "approve")

    def votes_against(self) -> int:
        return sum(1 for v in self.votes.values() if v.vote == "reject")

    def votes_needed(self) -> int:
        return votes_needed(self.rules.quorum, len(self.participants))

    def consensus_outcome(self) -> Vote | None:
        """The outcome whose votes reach the quorum, if one does (quorum > 1/2,
        so at most one can)."""
        needed = self.votes_needed()
        if self.votes_for() >= needed:
            return "approve"
        if self.votes_against() >= needed:
            return "reject"
        return None

    def quorum_impossible(self) -> bool:
        """No outcome can reach the quorum even if every participant who has
        not voted yet votes for it."""
        remaining = len(self.participants) - len(self.votes)
        needed = self.votes_needed()
        return self.votes_for() + remaining < needed and self.votes_against() + remaining < needed

    def timeout_due(self, now: datetime) -> bool:
        """More than ``timeout_seconds`` since the start, by ``now`` (an
        aware datetime, else ``InvalidCommand``)."""
        if not isinstance(now, datetime) or now.utcoffset() is None:
            raise _invalid(f"now must be a timezone-aware datetime, not {now!r}")
        if self.started_at is None:
            return False
        return (now - self.started_at).total_seconds() > self.rules.timeout_seconds

    # -- guards ------------------------------------------------------------

    def _require_open(self) -> None:
        if self.status is DebateStatus.NEW:
            raise NotFound(f"debate {self.debate_id} does not exist", code="not_found")
        if self.status is not DebateStatus.OPEN:
            raise Closed(
                f"debate {self.debate_id} has ended ({self.status.value})", code="debate_closed"
            )

    def _require_current_round(self, round: int) -> None:
        if not _is_int(round):
            raise _invalid(f"round must be an int, not {round!r}")
        if round != self.current_round:
            raise RuleViolation(
                f"debate {self.debate_id}: round {round} is not the current round "
                f"{self.current_round}",
                code="wrong_round",
            )
        if round > self.rules.max_rounds:
            raise RuleViolation(
                f"debate {self.debate_id}: all {self.rules.max_rounds} rounds are completed",
                code="rounds_exhausted",
            )

    def _require_participant(self, agent_id: str) -> None:
        if agent_id not in self.participants:
            raise NotAParticipant(
                f"{agent_id} is not a participant of debate {self.debate_id}",
                code="not_a_participant",
            )

    def idempotency_key(self, key: str) -> str:
        # "<debate id>:<key>", not the toolkit's "<stream>:<key>": the keys
        # already recorded in debate streams are of this form.
        return f"{self.id}:{key}"

    def _event(self, payload: Event, key: str) -> NewEvent:
        return self.new_event(payload, key=key)

    # -- commands ----------------------------------------------------------

    def start(
        self,
        topic: str,
        participants: Sequence[str],
        started_by: str,
        rules: DebateRules | None = None,
    ) -> list[NewEvent]:
        """Start the debate: at least 3 distinct participants."""
        if self.status is not DebateStatus.NEW:
            raise AlreadyExists(f"debate {self.debate_id} exists already", code="already_started")
        # A str is a Sequence[str] too: "abc" would start a debate of a, b and c.
        if isinstance(participants, str | bytes) or not isinstance(participants, Sequence):
            raise _invalid(f"participants must be a list of agent ids, not {participants!r}")
        if not all(isinstance(agent, str) for agent in participants):
            raise _invalid(f"participants must be agent ids (str), not {participants!r}")
        if rules is not None and not isinstance(rules, DebateRules):
            raise _invalid(f"rules must be DebateRules, not {rules!r}")
        if len(participants) < 3:
            raise InvalidCommand(
                f"a debate needs at least 3 participants, not {len(participants)}",
                code="too_few_participants",
            )
        if len(set(participants)) != len(participants):
            raise InvalidCommand("participants must be distinct", code="duplicate_participants")
        rules = rules or DebateRules()
        payload = new_payload(
            DebateStarted,
            debate_id=self.debate_id,
            topic=topic,
            participants=tuple(participants),
            started_by=started_by,
            max_rounds=rules.max_rounds,
            quorum=rules.quorum,
            timeout_seconds=rules.timeout_seconds,
        )
        return [self._event(payload, "started")]

    def join(self, agent_id: str) -> list[NewEvent]:
        """A new participant joins: while open, before any vote, once."""
        self._require_open()
        if agent_id in self.participants:
            raise RuleViolation(
                f"{agent_id} is a participant of debate {self.debate_id} already",
                code="already_joined",
            )
        if self.votes:
            raise RuleViolation(
                f"debate {self.debate_id}: voting has begun, nobody may join", code="voting_begun"
            )
        return [self._event(new_payload(AgentJoined, agent_id=agent_id), f"join:{agent_id}")]

    def add_argument(
        self, agent_id: str, round: int, stance: Stance, text: str, confidence: float
    ) -> list[NewEvent]:
        """An argument in the current round: participants only, while open,
        one per agent and round, and only up to ``max_rounds``."""
        self._require_open()
        self._require_participant(agent_id)
        self._require_current_round(round)
        if agent_id in self.arguments.get(round, {}):
            raise RuleViolation(
                f"{agent_id} has argued in round {round} of debate {self.debate_id} already",
                code="already_argued",
            )
        payload = new_payload(
            DebateArgumentAdded,
            agent_id=agent_id,
            round=round,
            stance=stance,
            text=text,
            confidence=confidence,
        )
        return [self._event(payload, f"argument:{round}:{agent_id}")]

    def complete_round(self, round: int) -> list[NewEvent]:
        """Close the current round once every participant has argued in it.

        Waiting for everybody keeps rounds meaningful; a participant who
        never argues stalls the debate until it times out.
        """
        self._require_open()
        self._require_current_round(round)
        argued = self.arguments.get(round, {})
        missing = [agent for agent in self.participants if agent not in argued]
        if missing:
            raise RuleViolation(
                f"debate {self.debate_id}: round {round} lacks arguments from {', '.join(missing)}",
                code="round_incomplete",
            )
        payload = new_payload(DebateRoundCompleted, round=round, arguments=len(argued))
        return [self._event(payload, f"round:{round}:completed")]

    def cast_vote(self, agent_id: str, vote: Vote, confidence: float) -> list[NewEvent]:
        """A participant's vote: once, while open, after a completed round."""
        self._require_open()
        self._require_participant(agent_id)
        if self.rounds_completed < 1:
            raise RuleViolation(
                f"debate {self.debate_id}: no round is completed yet", code="no_completed_round"
            )
        if agent_id in self.votes:
            raise RuleViolation(
                f"{agent_id} has voted in debate {self.debate_id} already", code="already_voted"
            )
        payload = new_payload(DebateVoteCast, agent_id=agent_id, vote=vote, confidence=confidence)
        return [self._event(payload, f"vote:{agent_id}")]

    def reach_consensus(self, decision_id: str | None = None) -> list[NewEvent]:
        """End the debate with the outcome whose votes reach the quorum."""
        self._require_open()
        outcome = self.consensus_outcome()
        if outcome is None:
            raise RuleViolation(
                f"debate {self.debate_id}: no outcome has {self.votes_needed()} of "
                f"{len(self.participants)} votes (approve {self.votes_for()}, "
                f"reject {self.votes_against()})",
                code="no_quorum",
            )
        payload = new_payload(
            DebateConsensusReached,
            outcome=outcome,
            votes_for=self.votes_for(),
            votes_against=self.votes_against(),
            decision_id=decision_id,
        )
        return [self._event(payload, "end")]

    def fail(self, reason: str) -> list[NewEvent]:
        """End the debate as failed: only when no outcome can reach the quorum
        any more, whatever the participants who have not voted do."""
        self._require_open()
        if not self.quorum_impossible():
            raise RuleViolation(
                f"debate {self.debate_id}: a quorum is still possible", code="quorum_possible"
            )
        payload = new_payload(
            DebateFailed,
            reason=reason,
            votes_for=self.votes_for(),
            votes_against=self.votes_against(),
        )
        return [self._event(payload, "end")]

    def time_out(self, now: datetime) -> list[NewEvent]:
        """End the debate as timed out: only when more than ``timeout_seconds``
        have passed since it started, by the clock passed in (an aware
        datetime). That clock is trusted: a time in the future ends any open
        debate at once, so only callers that own the clock should call this."""
        self._require_open()
        if not self.timeout_due(now):
            raise RuleViolation(
                f"debate {self.debate_id}: the timeout of {self.rules.timeout_seconds}s "
                "has not passed",
                code="not_timed_out",
            )
        payload = new_payload(DebateTimedOut, rounds_completed=self.rounds_completed)
        return [self._event(payload, "end")]
