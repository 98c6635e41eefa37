"""The ``Decision`` aggregate: proposed, then approved or rejected, and never
changed after that. A debate that reaches consensus proposes one: a decision
is only ever proposed for a debate in consensus, and only the one its
consensus names."""

from __future__ import annotations

import enum
import uuid

from aura_pg.aggregates import Aggregate, Event, applies
from aura_pg.domain.debate import Debate, DebateStatus
from aura_pg.domain.errors import AlreadyExists, Closed, NotFound, RuleViolation, UnexpectedEvent
from aura_pg.domain.events import (
    DECISION_EVENTS,
    PAYLOAD_TYPES,
    DecisionApproved,
    DecisionProposed,
    DecisionRejected,
    new_payload,
)
from aura_pg.models import NewEvent, RecordedEvent

_DECISION_NAMESPACE = uuid.UUID("6f1c6a55-4d0e-4c1b-9d59-6a1f3e0b7a21")


def decision_id_for(debate_id: str) -> str:
    """The id of the decision a debate's consensus proposes: derived from the
    debate id, so re-running the proposal after a crash finds the same one."""
    return str(uuid.uuid5(_DECISION_NAMESPACE, debate_id))


def consensus_title(outcome: str | None, topic: str) -> str:
    """The title the consensus path gives a debate's decision."""
    return f"{outcome}: {topic}"[:500]


class DecisionStatus(enum.StrEnum):
    NEW = "new"
    """No events yet: only ``propose`` is allowed."""
    PROPOSED = "proposed"
    APPROVED = "approved"
    REJECTED = "rejected"


class Decision(Aggregate):
    """A decision as its events left it; ``Decision(decision_id)`` is the
    state before any event."""

    events = DECISION_EVENTS
    stream_prefix = "decision"

    def __init__(self, decision_id: str) -> None:
        super().__init__(decision_id)
        self.status = DecisionStatus.NEW
        self.debate_id: str | None = None
        self.title = ""
        self.proposed_by: str | None = None
        self.resolved_by: str | None = None
        self.reason: str | None = None

    @property
    def decision_id(self) -> str:
        return self.id

    def __repr__(self) -> str:
        return f"Decision({self.id!r}, status={self.status.value}, version={self.version})"

    def apply(self, event: RecordedEvent) -> None:
        """Apply one recorded event: a proposal first, then one resolution."""
        if event.type in PAYLOAD_TYPES and event.type not in DECISION_EVENTS:
            raise self._unexpected(event.type)
        super().apply(event)

    def _unexpected(self, event_type: str) -> UnexpectedEvent:
        return UnexpectedEvent(
            f"decision {self.id}: {event_type} cannot follow status {self.status.value}",
            code="unexpected_event",
        )

    @applies(DecisionProposed)
    def _proposed(self, payload: DecisionProposed) -> None:
        if self.status is not DecisionStatus.NEW:
            raise self._unexpected(payload.TYPE)
        self.status = DecisionStatus.PROPOSED
        self.debate_id = payload.debate_id
        self.title = payload.title
        self.proposed_by = payload.proposed_by

    @applies(DecisionApproved)
    def _approved(self, payload: DecisionApproved) -> None:
        if self.status is not DecisionStatus.PROPOSED:
            raise self._unexpected(payload.TYPE)
        self.status = DecisionStatus.APPROVED
        self.resolved_by = payload.approved_by

    @applies(DecisionRejected)
    def _rejected(self, payload: DecisionRejected) -> None:
        if self.status is not DecisionStatus.PROPOSED:
            raise self._unexpected(payload.TYPE)
        self.status = DecisionStatus.REJECTED
        self.resolved_by = payload.rejected_by
        self.reason = payload.reason

    def idempotency_key(self, key: str) -> str:
        # "<decision id>:<key>": the form of the keys already recorded.
        return f"{self.id}:{key}"

    def _event(self, payload: Event, key: str) -> NewEvent:
        return self.new_event(payload, key=key)

    def _require_proposed(self) -> None:
        if self.status is DecisionStatus.NEW:
            raise NotFound(f"decision {self.decision_id} does not exist", code="not_found")
        if self.status is not DecisionStatus.PROPOSED:
            raise Closed(
                f"decision {self.decision_id} is {self.status.value} already",
                code="decision_closed",
            )

    def _require_debates_decision(self, debate: Debate) -> None:
        """Only a debate in consensus leads to a decision, and only to the
        one its consensus names."""
        if debate.status is DebateStatus.NEW:
            raise NotFound(f"debate {debate.debate_id} does not exist", code="debate_not_found")
        if debate.status is not DebateStatus.CONSENSUS:
            raise RuleViolation(
                f"debate {debate.debate_id} has not reached consensus ({debate.status.value}): "
                "it leads to no decision",
                code="no_consensus",
            )
        if debate.decision_id != self.decision_id:
            raise RuleViolation(
                f"the consensus of debate {debate.debate_id} names decision "
                f"{debate.decision_id}, not {self.decision_id}",
                code="not_the_debates_decision",
            )

    def _proposal(self, debate: Debate, proposed_by: str, title: str) -> list[NewEvent]:
        payload = new_payload(
            DecisionProposed,
            decision_id=self.decision_id,
            debate_id=debate.debate_id,
            proposed_by=proposed_by,
            title=title,
        )
        return [self._event(payload, "proposed")]

    def propose(self, debate: Debate, proposed_by: str, title: str) -> list[NewEvent]:
        """Propose the decision ``debate``'s consensus names, by hand.

        The decision id derived from the debate (``decision_id_for``) is
        proposed only by ``propose_consensus`` (``reach_consensus``,
        ``ensure_decision``), so nobody can take it first with another
        proposer or title.
        """
        if self.status is not DecisionStatus.NEW:
            raise AlreadyExists(
                f"decision {self.decision_id} was proposed already", code="already_proposed"
            )
        self._require_debates_decision(debate)
        if self.decision_id == decision_id_for(debate.debate_id):
            raise RuleViolation(
                f"decision {self.decision_id} is derived from debate {debate.debate_id}: "
                "only its consensus proposes it (reach_consensus or ensure_decision)",
                code="derived_decision_id",
            )
        return self._proposal(debate, proposed_by, title)

    def propose_consensus(self, debate: Debate, proposed_by: str) -> list[NewEvent]:
        """The proposal of ``debate``'s consensus, unless it is recorded
        already (nothing to do). A proposal recorded for another debate or
        with another title took the decision's id first (written before the
        domain refused it, or bypassing it): ``AlreadyExists``
        (``decision_preempted``) instead of mistaking it for this one."""
        self._require_debates_decision(debate)
        title = consensus_title(debate.outcome, debate.topic)
        if self.status is DecisionStatus.NEW:
            return self._proposal(debate, proposed_by, title)
        self.require_not_preempted(debate.debate_id, title)
        return []

    def require_not_preempted(self, debate_id: str, title: str) -> None:
        """Refuse (``AlreadyExists``, ``decision_preempted``) if this decision
        was proposed other than by the consensus of ``debate_id`` with
        ``title``; nothing to say while it is not proposed."""
        if self.status is DecisionStatus.NEW:
            return
        if self.debate_id != debate_id or self.title != title:
            raise AlreadyExists(
                f"decision {self.decision_id} was proposed for debate {self.debate_id} by "
                f"{self.proposed_by} ({self.title!r}), not by the consensus of debate "
                f"{debate_id}",
                code="decision_preempted",
            )

    # Approval and rejection share the idempotency key "resolved": even an
    # append that skipped the aggregate could not record both.

    def approve(self, approved_by: str) -> list[NewEvent]:
        self._require_proposed()
        payload = new_payload(
            DecisionApproved, decision_id=self.decision_id, approved_by=approved_by
        )
        return [self._event(payload, "resolved")]

    def reject(self, rejected_by: str, reason: str) -> list[NewEvent]:
        self._require_proposed()
        payload = new_payload(
            DecisionRejected, decision_id=self.decision_id, rejected_by=rejected_by, reason=reason
        )
        return [self._event(payload, "resolved")]
