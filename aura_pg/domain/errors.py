"""Typed errors of the debate domain.

Every refusal of a command is a ``DomainError`` (an ``AuraPgError``) and
nothing was written when one is raised. ``code`` names the rule that was
broken (``"already_voted"``, ``"wrong_round"``, ...) so callers and tests can
tell refusals apart without parsing messages.
"""

from __future__ import annotations

from aura_pg.errors import DomainError

__all__ = [
    "AlreadyExists",
    "Closed",
    "DomainError",
    "InvalidCommand",
    "NotAParticipant",
    "NotFound",
    "RuleViolation",
    "UnexpectedEvent",
]


class InvalidCommand(DomainError, ValueError):
    """The command's arguments are invalid on their own (too few participants,
    a confidence outside [0, 1], ...)."""


class NotFound(DomainError):
    """The debate or decision does not exist (its stream has no events)."""


class AlreadyExists(DomainError):
    """The debate or decision was started or proposed before."""


class NotAParticipant(DomainError):
    """The agent is not a participant of the debate."""


class Closed(DomainError):
    """The debate has ended, or the decision was approved or rejected:
    nothing may change any more."""


class RuleViolation(DomainError):
    """The command is out of order or repeats itself: wrong round, a second
    vote, a vote before any completed round, consensus without a quorum, ..."""


class UnexpectedEvent(DomainError):
    """A stream holds an event its aggregate cannot apply (a decision event in
    a debate stream, a second DEBATE_STARTED): the stream is not one this
    code wrote."""
