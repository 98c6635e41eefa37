"""The AURA debate domain's events: one versioned payload model per event
type (``aura_pg.aggregates.Event``), in two registries: ``DEBATE_EVENTS``
and ``DECISION_EVENTS``.

Each payload model has a ``TYPE`` (the event type stored in
``aura.events.type``) and a ``VERSION``. ``encode`` turns a payload into a
``NewEvent`` whose metadata carries ``schema_version``; ``decode`` reads a
recorded event back through the current model, first running the upcasters
registered for older versions (schema evolution: an event recorded as
version 1 is read as version 2 without rewriting the log, which is
append-only). Recorded facts are held to the rules of the day they were
written (``is_recorded``), new events to today's.

Streams: ``debate-<debate_id>`` holds a debate's events,
``decision-<decision_id>`` a decision's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    AfterValidator,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from aura_pg.aggregates.events import Event, EventRegistry, is_recorded
from aura_pg.domain.errors import InvalidCommand
from aura_pg.models import NewEvent, RecordedEvent
from aura_pg.upcasting import register_upcaster

EventPayload = Event
"""Base of every domain event payload (the toolkit's ``Event``)."""


def _new_id(value: str, info: ValidationInfo) -> str:
    # No ':' in new ids: idempotency keys are built as "<id>:<command>..."
    # and must not be ambiguous. Ids recorded before that rule had them.
    if ":" in value and not is_recorded(info):
        raise ValueError("must not contain ':'")
    return value


def _storable(value: str) -> str:
    # Postgres text and jsonb hold neither NUL nor unpaired surrogates: refuse
    # them here, as an invalid argument, rather than fail in the store.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no unpaired surrogates)") from None
    return value


_ID = StringConstraints(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$")
AgentId = Annotated[str, _ID, AfterValidator(_new_id)]
EntityId = Annotated[str, _ID, AfterValidator(_new_id)]
Topic = Annotated[str, StringConstraints(min_length=1, max_length=500), AfterValidator(_storable)]
Title = Topic
Reason = Annotated[str, StringConstraints(min_length=1, max_length=1000), AfterValidator(_storable)]
ArgumentText = Annotated[
    str, StringConstraints(min_length=1, max_length=10_000), AfterValidator(_storable)
]
Vote = Literal["approve", "reject"]


def debate_stream(debate_id: str) -> str:
    return f"debate-{debate_id}"


def decision_stream(decision_id: str) -> str:
    return f"decision-{decision_id}"


class DebateStarted(EventPayload):
    """Version 2. Version 1 had ``agents`` instead of ``participants`` and
    no rules; ``upcast_debate_started_v1`` reads it as version 2."""

    TYPE: ClassVar[str] = "DEBATE_STARTED"
    VERSION: ClassVar[int] = 2

    debate_id: EntityId
    topic: Topic
    # At least 3 (checked below), except in a recorded version 1 start.
    participants: tuple[AgentId, ...]
    # None only in a recorded version 1 start that named nobody.
    started_by: AgentId | None
    max_rounds: int = Field(default=3, ge=1, le=50)
    # Share of participants' votes needed for consensus either way; read as
    # the decimal written here (see ``debate.quorum_fraction``).
    quorum: float = Field(default=2 / 3, gt=0.5, le=1.0, allow_inf_nan=False)
    timeout_seconds: float = Field(default=300.0, gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _valid_start(self, info: ValidationInfo) -> DebateStarted:
        if len(set(self.participants)) != len(self.participants):
            raise ValueError("participants must be distinct")
        if not is_recorded(info):
            if len(self.participants) < 3:
                raise ValueError("a debate needs at least 3 participants")
            if self.started_by is None:
                raise ValueError("started_by is required")
        return self


class AgentJoined(EventPayload):
    TYPE: ClassVar[str] = "AGENT_JOINED"

    agent_id: AgentId


class DebateArgumentAdded(EventPayload):
    TYPE: ClassVar[str] = "DEBATE_ARGUMENT_ADDED"

    agent_id: AgentId
    round: int = Field(ge=1)
    stance: Literal["for", "against", "neutral"]
    text: ArgumentText
    confidence: float = Field(ge=0.0, le=1.0)


class DebateRoundCompleted(EventPayload):
    TYPE: ClassVar[str] = "DEBATE_ROUND_COMPLETED"

    round: int = Field(ge=1)
    arguments: int = Field(ge=0)


class DebateVoteCast(EventPayload):
    TYPE: ClassVar[str] = "DEBATE_VOTE_CAST"

    agent_id: AgentId
    vote: Vote
    confidence: float = Field(ge=0.0, le=1.0)


class DebateConsensusReached(EventPayload):
    TYPE: ClassVar[str] = "DEBATE_CONSENSUS_REACHED"

    outcome: Vote
    votes_for: int = Field(ge=0)
    votes_against: int = Field(ge=0)
    # The decision the consensus proposes (its own stream), if any.
    decision_id: EntityId | None = None


class DebateFailed(EventPayload):
    TYPE: ClassVar[str] = "DEBATE_FAILED"

    reason: Reason
    votes_for: int = Field(default=0, ge=0)
    votes_against: int = Field(default=0, ge=0)


class DebateTimedOut(EventPayload):
    TYPE: ClassVar[str] = "DEBATE_TIMED_OUT"

    rounds_completed: int = Field(ge=0)


class DecisionProposed(EventPayload):
    TYPE: ClassVar[str] = "DECISION_PROPOSED"

    decision_id: EntityId
    debate_id: EntityId
    proposed_by: AgentId
    title: Title


class DecisionApproved(EventPayload):
    TYPE: ClassVar[str] = "DECISION_APPROVED"

    decision_id: EntityId
    approved_by: AgentId


class DecisionRejected(EventPayload):
    TYPE: ClassVar[str] = "DECISION_REJECTED"

    decision_id: EntityId
    rejected_by: AgentId
    reason: Reason


DEBATE_EVENTS = EventRegistry(
    DebateStarted,
    AgentJoined,
    DebateArgumentAdded,
    DebateRoundCompleted,
    DebateVoteCast,
    DebateConsensusReached,
    DebateFailed,
    DebateTimedOut,
)
"""What a debate stream holds."""

DECISION_EVENTS = EventRegistry(DecisionProposed, DecisionApproved, DecisionRejected)
"""What a decision stream holds."""

DOMAIN_EVENTS = DEBATE_EVENTS | DECISION_EVENTS

PAYLOAD_TYPES: Mapping[str, type[Event]] = {model.TYPE: model for model in DOMAIN_EVENTS.models}
"""Every domain event type, by its stored name."""

DEBATE_EVENT_TYPES = DEBATE_EVENTS.types
DECISION_EVENT_TYPES = DECISION_EVENTS.types


@register_upcaster("DEBATE_STARTED", 1)
def upcast_debate_started_v1(data: dict[str, Any]) -> dict[str, Any]:
    """v1 {debate_id, topic, agents, started_by?} -> v2 (default rules).

    Version 1 set no minimum of agents and let ``started_by`` be missing,
    null or empty. Such a start means: the agents (first occurrence of each,
    in order) are the participants, the first of them started it (nobody if
    there are none), and today's default rules apply. The SQL fold
    (projections/debate_state.sql) reads it the same way.
    """
    upgraded = {key: value for key, value in data.items() if key != "agents"}
    listed = upgraded.setdefault("participants", data.get("agents", []))
    if isinstance(listed, list):
        upgraded["participants"] = list(dict.fromkeys(listed))
    if not upgraded.get("started_by"):
        participants = upgraded["participants"]
        upgraded["started_by"] = participants[0] if participants else None
    return upgraded


def encode(
    payload: Event,
    *,
    idempotency_key: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> NewEvent:
    """The event to append for ``payload`` (its version in the metadata)."""
    return DOMAIN_EVENTS.encode(payload, idempotency_key=idempotency_key, metadata=metadata)


def decode(event: RecordedEvent) -> Event:
    """A recorded domain event read through its current payload model.

    Raises EventValidationError for an unknown type, a version newer than
    this code knows, or data the model refuses.
    """
    return DOMAIN_EVENTS.decode(event)


P = TypeVar("P", bound=Event)


def new_payload(model: type[P], **fields: object) -> P:
    """The payload of a new event from a command's arguments, validated
    strictly (a bool is no number, a string no int), or ``InvalidCommand``."""
    try:
        return model.model_validate(fields, strict=True)
    except ValidationError as exc:
        raise InvalidCommand(f"{model.TYPE}: {exc}", code="invalid_arguments") from None


_AGENT_ID: TypeAdapter[str] = TypeAdapter(AgentId)


def new_agent_id(value: object, argument: str) -> str:
    """``value`` as a new event's agent id, or ``InvalidCommand`` naming
    ``argument``: for a command that must refuse before its first append."""
    try:
        return _AGENT_ID.validate_python(value, strict=True)
    except ValidationError as exc:
        raise InvalidCommand(f"{argument}: {exc}", code="invalid_arguments") from None
