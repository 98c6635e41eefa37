"""The ``Decision`` aggregate: proposed, then approved or rejected, and never
changed after that. A debate that reaches consensus proposes one."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import ValidationError

from aura_pg.domain.errors import AlreadyExists, Closed, InvalidCommand, NotFound, UnexpectedEvent
from aura_pg.domain.events import (
    DecisionApproved,
    DecisionProposed,
    DecisionRejected,
    EventPayload,
    decode,
    encode,
)
from aura_pg.models import NewEvent, RecordedEvent

_DECISION_NAMESPACE = uuid.UUID("6f1c6a55-4d0e-4c1b-9d59-6a1f3e0b7a21")


def decision_id_for(debate_id: str) -> str:
    """The id of the decision a debate's consensus proposes: derived from the
    debate id, so re-running the proposal after a crash finds the same one."""
    return str(uuid.uuid5(_DECISION_NAMESPACE, debate_id))


class DecisionStatus(enum.StrEnum):
    NEW = "new"
    """No events yet: only ``propose`` is allowed."""
    PROPOSED = "proposed"
    APPROVED = "approved"
    REJECTED = "rejected"


@dataclass(slots=True)
class Decision:
    """A decision as its events left it; ``Decision(decision_id)`` is the
    state before any event."""

    decision_id: str
    status: DecisionStatus = DecisionStatus.NEW
    debate_id: str | None = None
    title: str = ""
    proposed_by: str | None = None
    resolved_by: str | None = None
    reason: str | None = None
    version: int = 0

    @classmethod
    def fold(cls, decision_id: str, events: Iterable[RecordedEvent]) -> Decision:
        decision = cls(decision_id)
        decision.apply_all(events)
        return decision

    def apply_all(self, events: Iterable[RecordedEvent]) -> None:
        for event in events:
            self.apply(event)

    def apply(self, event: RecordedEvent) -> None:
        payload = decode(event)
        match payload:
            case DecisionProposed() if self.status is DecisionStatus.NEW:
                self.status = DecisionStatus.PROPOSED
                self.debate_id = payload.debate_id
                self.title = payload.title
                self.proposed_by = payload.proposed_by
            case DecisionApproved() if self.status is DecisionStatus.PROPOSED:
                self.status = DecisionStatus.APPROVED
                self.resolved_by = payload.approved_by
            case DecisionRejected() if self.status is DecisionStatus.PROPOSED:
                self.status = DecisionStatus.REJECTED
                self.resolved_by = payload.rejected_by
                self.reason = payload.reason
            case _:
                raise UnexpectedEvent(
                    f"decision {self.decision_id}: {event.type} cannot follow status "
                    f"{self.status.value}",
                    code="unexpected_event",
                )
        self.version = event.version

    def _event(self, payload: EventPayload, key: str) -> NewEvent:
        return encode(payload, idempotency_key=f"{self.decision_id}:{key}")

    def _require_proposed(self) -> None:
        if self.status is DecisionStatus.NEW:
            raise NotFound(f"decision {self.decision_id} does not exist", code="not_found")
        if self.status is not DecisionStatus.PROPOSED:
            raise Closed(
                f"decision {self.decision_id} is {self.status.value} already",
                code="decision_closed",
            )

    def propose(self, debate_id: str, proposed_by: str, title: str) -> list[NewEvent]:
        if self.status is not DecisionStatus.NEW:
            raise AlreadyExists(
                f"decision {self.decision_id} was proposed already", code="already_proposed"
            )
        try:
            payload = DecisionProposed(
                decision_id=self.decision_id,
                debate_id=debate_id,
                proposed_by=proposed_by,
                title=title,
            )
        except ValidationError as exc:
            raise InvalidCommand(str(exc), code="invalid_arguments") from None
        return [self._event(payload, "proposed")]

    # Approval and rejection share the idempotency key "resolved": even an
    # append that skipped the aggregate could not record both.

    def approve(self, approved_by: str) -> list[NewEvent]:
        self._require_proposed()
        try:
            payload = DecisionApproved(decision_id=self.decision_id, approved_by=approved_by)
        except ValidationError as exc:
            raise InvalidCommand(str(exc), code="invalid_arguments") from None
        return [self._event(payload, "resolved")]

    def reject(self, rejected_by: str, reason: str) -> list[NewEvent]:
        self._require_proposed()
        try:
            payload = DecisionRejected(
                decision_id=self.decision_id, rejected_by=rejected_by, reason=reason
            )
        except ValidationError as exc:
            raise InvalidCommand(str(exc), code="invalid_arguments") from None
        return [self._event(payload, "resolved")]
