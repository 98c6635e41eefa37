"""Repositories: load an aggregate, run a command on it, append its events.

A command runs against the aggregate as loaded; its events are appended with
the loaded version as the expected version. When another writer got there
first (``ConcurrencyError``) the repository reads the events it missed and
runs the command again, so the invariants are always checked against the
latest state and no update is lost. Attempts are bounded; between them it
sleeps a small jittered, growing delay (a ``Backoff`` with full jitter) so
racing writers spread out.

An append that fails transiently (a lost connection, a restarting server:
its outcome is unknown) is sent again unchanged by the store
(``append(..., retry=RetryPolicy.append_retry)``, see ``aura_pg.store.retry``):
the very same events, so the same ids and idempotency keys, and a batch that
did commit comes back as a duplicate instead of a second vote. Permanent
errors are raised at once. Resending the identical batch and rerunning the
command after a conflict are separate: a resend never re-decides.
"""

from __future__ import annotations

import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, Protocol, TypeVar

from aura_pg.aggregates.repository import CommandResult, RetryPolicy
from aura_pg.domain.debate import Debate, DebateRules, DebateStatus, Stance
from aura_pg.domain.decision import Decision, consensus_title, decision_id_for
from aura_pg.domain.errors import RuleViolation
from aura_pg.domain.events import Vote, debate_stream, decision_stream, new_agent_id
from aura_pg.errors import ConcurrencyError, IdempotencyConflict
from aura_pg.models import AppendResult, NewEvent, RecordedEvent
from aura_pg.store import EventStore

__all__ = [
    "CommandResult",
    "ConsensusResult",
    "DebateRepository",
    "DecisionRepository",
    "RetryPolicy",
]


class _Aggregate(Protocol):
    version: int

    def apply_all(self, events: Iterable[RecordedEvent]) -> None: ...


A = TypeVar("A", bound=_Aggregate)


@dataclass(frozen=True, slots=True)
class ConsensusResult:
    """``reach_consensus`` appends to two streams."""

    debate: CommandResult
    """The DEBATE_CONSENSUS_REACHED append (empty if the debate had ended so)."""
    decision: CommandResult
    """The DECISION_PROPOSED append (empty if it was proposed before)."""

    @property
    def appended(self) -> int:
        return self.debate.appended + self.decision.appended

    @property
    def conflicts(self) -> int:
        return self.debate.conflicts + self.decision.conflicts


class _Repository(ABC, Generic[A]):
    def __init__(
        self,
        store: EventStore,
        *,
        retry: RetryPolicy | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.store = store
        self.retry = retry or RetryPolicy()
        self._rng = rng or random.Random()
        self._sleep = sleep

    @abstractmethod
    def _new(self, entity_id: str) -> A:
        """The aggregate before any event."""

    @abstractmethod
    def _stream(self, entity_id: str) -> str:
        """The stream holding the aggregate's events."""

    def load(self, entity_id: str) -> A:
        """The aggregate as its stream now stands (version 0 if it has no events)."""
        aggregate = self._new(entity_id)
        self._catch_up(entity_id, aggregate)
        return aggregate

    def _catch_up(self, entity_id: str, aggregate: A) -> None:
        aggregate.apply_all(
            self.store.read_stream(self._stream(entity_id), from_version=aggregate.version + 1)
        )

    def execute(self, entity_id: str, command: Callable[[A], Sequence[NewEvent]]) -> CommandResult:
        """Run ``command`` on the latest state and append what it returns.

        ``command`` may run several times (once per conflict) and must
        depend on nothing but the aggregate and its own arguments. It raises
        ``DomainError`` to refuse; that is never retried.
        """
        stream_id = self._stream(entity_id)
        aggregate = self._new(entity_id)
        conflicts = 0
        attempt = 0
        idempotency_conflict_at: int | None = None
        while True:
            attempt += 1
            self._catch_up(entity_id, aggregate)
            events = tuple(command(aggregate))
            if not events:
                return CommandResult(stream_id, (), aggregate.version, False, conflicts)
            try:
                appended = self._append(stream_id, events, aggregate.version)
            except (ConcurrencyError, IdempotencyConflict) as exc:
                # An idempotency conflict means another writer recorded an event
                # under one of these keys with other content: the reload shows
                # it, so retry as for a version conflict, unless the state had
                # not moved since the last such conflict.
                if isinstance(exc, IdempotencyConflict):
                    if idempotency_conflict_at == aggregate.version:
                        raise
                    idempotency_conflict_at = aggregate.version
                if attempt >= self.retry.max_attempts:
                    raise
                conflicts += 1
                self._sleep(self.retry.delay(attempt, self._rng))
                continue
            return CommandResult(stream_id, events, appended.version, appended.duplicate, conflicts)

    def _append(
        self, stream_id: str, events: Sequence[NewEvent], expected_version: int
    ) -> AppendResult:
        """Append through the store's pool (never in a caller's transaction,
        so ``retry=`` is allowed); a transient failure sends the same batch
        again, per ``RetryPolicy.append_retry``."""
        return self.store.append(stream_id, events, expected_version, retry=self.retry.append_retry)


class DecisionRepository(_Repository[Decision]):
    """Decisions in ``decision-<id>`` streams."""

    def _new(self, entity_id: str) -> Decision:
        return Decision(entity_id)

    def _stream(self, entity_id: str) -> str:
        return decision_stream(entity_id)

    def propose(
        self, decision_id: str, debate_id: str, proposed_by: str, title: str
    ) -> CommandResult:
        """Propose the decision the consensus of ``debate_id`` names, by hand
        (see ``Decision.propose``: not the id derived from the debate, which
        ``DebateRepository.reach_consensus`` proposes). The debate is read
        once: a debate in consensus never changes again."""
        debate = Debate.fold(debate_id, self.store.read_stream(debate_stream(debate_id)))
        return self.execute(decision_id, lambda d: d.propose(debate, proposed_by, title))

    def approve(self, decision_id: str, approved_by: str) -> CommandResult:
        return self.execute(decision_id, lambda d: d.approve(approved_by))

    def reject(self, decision_id: str, rejected_by: str, reason: str) -> CommandResult:
        return self.execute(decision_id, lambda d: d.reject(rejected_by, reason))


class DebateRepository(_Repository[Debate]):
    """Debates in ``debate-<id>`` streams; ``decisions`` for their decisions."""

    def __init__(
        self,
        store: EventStore,
        *,
        retry: RetryPolicy | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(store, retry=retry, rng=rng, sleep=sleep)
        self.decisions = DecisionRepository(store, retry=retry, rng=rng, sleep=sleep)

    def _new(self, entity_id: str) -> Debate:
        return Debate(entity_id)

    def _stream(self, entity_id: str) -> str:
        return debate_stream(entity_id)

    def start(
        self,
        debate_id: str,
        topic: str,
        participants: Sequence[str],
        started_by: str,
        rules: DebateRules | None = None,
    ) -> CommandResult:
        return self.execute(debate_id, lambda d: d.start(topic, participants, started_by, rules))

    def join(self, debate_id: str, agent_id: str) -> CommandResult:
        return self.execute(debate_id, lambda d: d.join(agent_id))

    def add_argument(
        self,
        debate_id: str,
        agent_id: str,
        round: int,
        stance: Stance,
        text: str,
        confidence: float,
    ) -> CommandResult:
        return self.execute(
            debate_id, lambda d: d.add_argument(agent_id, round, stance, text, confidence)
        )

    def complete_round(self, debate_id: str, round: int) -> CommandResult:
        return self.execute(debate_id, lambda d: d.complete_round(round))

    def cast_vote(
        self, debate_id: str, agent_id: str, vote: Vote, confidence: float
    ) -> CommandResult:
        return self.execute(debate_id, lambda d: d.cast_vote(agent_id, vote, confidence))

    def fail(self, debate_id: str, reason: str) -> CommandResult:
        return self.execute(debate_id, lambda d: d.fail(reason))

    def time_out(self, debate_id: str, now: datetime) -> CommandResult:
        return self.execute(debate_id, lambda d: d.time_out(now))

    def reach_consensus(self, debate_id: str, proposed_by: str) -> ConsensusResult:
        """End the debate in consensus, then propose its decision.

        Two appends to two streams. Re-running this after a crash between
        them (or racing another caller) is safe: once the debate is in
        consensus the first step has nothing to do, and the proposal is
        made at most once. Refusals that the second step would meet
        (an invalid ``proposed_by``, a decision id taken by another
        proposal) are raised before the first append; a proposal that
        appears in between fails the second step with ``AlreadyExists``
        (``decision_preempted``): the proposal is made or the call fails.
        """
        new_agent_id(proposed_by, "proposed_by")
        decision_id = decision_id_for(debate_id)
        taken = self.decisions.load(decision_id)

        def command(debate: Debate) -> list[NewEvent]:
            if debate.status is DebateStatus.CONSENSUS and debate.decision_id == decision_id:
                return []
            events = debate.reach_consensus(decision_id)
            taken.require_not_preempted(
                debate_id, consensus_title(debate.consensus_outcome(), debate.topic)
            )
            return events

        debate_result = self.execute(debate_id, command)
        return ConsensusResult(debate_result, self.ensure_decision(debate_id, proposed_by))

    def ensure_decision(self, debate_id: str, proposed_by: str) -> CommandResult:
        """Propose the decision of a debate that ended in consensus, unless it
        was proposed already (the repair step after a crash). A proposal
        that is not this consensus's raises ``AlreadyExists``
        (``decision_preempted``)."""
        debate = self.load(debate_id)
        if debate.status is not DebateStatus.CONSENSUS or debate.decision_id is None:
            raise RuleViolation(
                f"debate {debate_id} has not reached consensus", code="no_consensus"
            )
        return self.decisions.execute(
            debate.decision_id, lambda decision: decision.propose_consensus(debate, proposed_by)
        )
