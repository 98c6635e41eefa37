"""The debate domain's repositories: ``DebateRepository`` and
``DecisionRepository``, the toolkit's ``Repository`` (``aura_pg.aggregates``)
with the debate commands named.

A command runs on the latest state and is rerun on the reloaded aggregate
after a concurrency conflict (bounded, jittered); an append whose outcome
is unknown is sent again unchanged, so a batch that did commit comes back
as a duplicate instead of a second vote. See ``aura_pg.aggregates.repository``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from aura_pg.aggregates.repository import CommandResult, Repository, RetryPolicy
from aura_pg.domain.debate import Debate, DebateRules, DebateStatus, Stance
from aura_pg.domain.decision import Decision, consensus_title, decision_id_for
from aura_pg.domain.errors import RuleViolation
from aura_pg.domain.events import Vote, debate_stream, new_agent_id
from aura_pg.models import NewEvent
from aura_pg.store import EventStore

__all__ = [
    "CommandResult",
    "ConsensusResult",
    "DebateRepository",
    "DecisionRepository",
    "RetryPolicy",
]


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


class DecisionRepository(Repository[Decision]):
    """Decisions in ``decision-<id>`` streams."""

    def __init__(
        self,
        store: EventStore,
        *,
        retry: RetryPolicy | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(store, Decision, retry=retry, rng=rng, sleep=sleep)

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


class DebateRepository(Repository[Debate]):
    """Debates in ``debate-<id>`` streams; ``decisions`` for their decisions."""

    def __init__(
        self,
        store: EventStore,
        *,
        retry: RetryPolicy | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(store, Debate, retry=retry, rng=rng, sleep=sleep)
        self.decisions = DecisionRepository(store, retry=retry, rng=rng, sleep=sleep)

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
