"""The AURA debate domain on the event store: events, aggregates, simulator."""

from aura_pg.domain.debate import Debate, DebateRules, DebateStatus, votes_needed
from aura_pg.domain.decision import Decision, DecisionStatus, decision_id_for
from aura_pg.domain.errors import (
    AlreadyExists,
    Closed,
    DomainError,
    InvalidCommand,
    NotAParticipant,
    NotFound,
    RuleViolation,
    UnexpectedEvent,
)
from aura_pg.domain.events import debate_stream, decision_stream, decode, encode
from aura_pg.domain.repository import (
    CommandResult,
    ConsensusResult,
    DebateRepository,
    DecisionRepository,
    RetryPolicy,
)
from aura_pg.domain.simulator import (
    DebateResult,
    SimulationProgress,
    SimulationSummary,
    plan_debate,
    run_simulation,
)

__all__ = [
    "AlreadyExists",
    "Closed",
    "CommandResult",
    "ConsensusResult",
    "Debate",
    "DebateRepository",
    "DebateResult",
    "DebateRules",
    "DebateStatus",
    "Decision",
    "DecisionRepository",
    "DecisionStatus",
    "DomainError",
    "InvalidCommand",
    "NotAParticipant",
    "NotFound",
    "RetryPolicy",
    "RuleViolation",
    "SimulationProgress",
    "SimulationSummary",
    "UnexpectedEvent",
    "debate_stream",
    "decision_id_for",
    "decision_stream",
    "decode",
    "encode",
    "plan_debate",
    "run_simulation",
    "votes_needed",
]
