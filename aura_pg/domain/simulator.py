"""A debate simulator: deterministic agents debating through the real
repository against the real store, concurrently.

Everything an agent will do is planned up front from the seed (``plan_debate``:
participants, a late joiner, stances, confidences, votes, who stops answering,
how long each round takes on a simulated clock). Running the plans only
decides the order in which the events land, so the outcome of every debate
depends on the seed alone, single-threaded or not; with ``workers > 1`` the
agents of a debate act at once and race for its stream (the repository
retries their conflicts).

Time is simulated: each debate has its own clock in seconds since it
started, advanced by the planned thinking times, and ``time_out`` is given
``started_at + clock``. Timeouts are deterministic and cost no waiting.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Final, Literal

from aura_pg.domain.debate import DebateRules, DebateStatus, Stance
from aura_pg.domain.decision import decision_id_for
from aura_pg.domain.events import Vote
from aura_pg.domain.repository import (
    CommandResult,
    ConsensusResult,
    DebateRepository,
    RetryPolicy,
)
from aura_pg.store import EventStore

Outcome = Literal["consensus", "failed", "timed_out"]
OUTCOMES: Final[tuple[Outcome, ...]] = ("consensus", "failed", "timed_out")

TOPICS: Final = (
    "Adopt event sourcing for billing",
    "Move the projections to SQL",
    "Retire the legacy message bus",
    "Shard the event log by tenant",
    "Replace polling with LISTEN/NOTIFY",
    "Require idempotency keys on every append",
    "Introduce schema versions for payloads",
    "Split the monolith into three services",
)
_PHRASES: Final = (
    "the evidence from production points this way",
    "the operational cost is the deciding factor",
    "the failure modes are better understood",
    "it keeps the system simpler to reason about",
    "the migration risk is acceptable",
    "the team has the experience for it",
)
# Chances per debate, from the seed.
_LATE_JOINER_CHANCE: Final = 0.4
_DROPOUT_CHANCE: Final = 0.1


def agent_names(count: int) -> tuple[str, ...]:
    return tuple(f"agent-{i:02d}" for i in range(1, count + 1))


@dataclass(frozen=True, slots=True)
class AgentPlan:
    """What one agent does in one debate."""

    agent_id: str
    stances: tuple[Stance, ...]
    """One stance per planned round."""
    confidences: tuple[float, ...]
    vote: Vote
    vote_confidence: float
    joins_at_round: int | None = None
    """For a late joiner: the round before whose arguments it joins."""
    stops_at_round: int | None = None
    """For an agent that stops answering: the first round it does not argue."""

    def argues_in(self, round: int) -> bool:
        joined = self.joins_at_round is None or round >= self.joins_at_round
        stopped = self.stops_at_round is not None and round >= self.stops_at_round
        return joined and not stopped


@dataclass(frozen=True, slots=True)
class DebatePlan:
    """A whole debate, decided by the seed before it runs."""

    index: int
    topic: str
    moderator: str
    agents: tuple[AgentPlan, ...]
    """The starting participants first, a late joiner (if any) last."""
    rounds: int
    round_seconds: tuple[float, ...]
    """Simulated time each planned round takes."""
    vote_seconds: float

    @property
    def initial_participants(self) -> tuple[str, ...]:
        return tuple(a.agent_id for a in self.agents if a.joins_at_round is None)


def _agent_lean(seed: int, agent_id: str) -> tuple[float, float]:
    """An agent's character, the same in every debate: how much it leans
    towards approving (-0.25..0.25) and its base confidence."""
    rng = random.Random(f"{seed}:agent:{agent_id}")
    return rng.uniform(-0.25, 0.25), rng.uniform(0.45, 0.9)


def _stance(lean: float) -> Stance:
    if lean > 0.6:
        return "for"
    if lean < 0.4:
        return "against"
    return "neutral"


def plan_debate(seed: int, index: int, agents: int, rules: DebateRules) -> DebatePlan:
    """The plan of debate ``index``: a pure function of its arguments."""
    if agents < 3:
        raise ValueError(f"a debate needs at least 3 agents, not {agents}")
    rng = random.Random(f"{seed}:debate:{index}")
    pool = agent_names(agents)
    size = rng.randint(3, agents)
    participants = rng.sample(pool, size)
    others = [a for a in pool if a not in participants]
    rounds = rng.randint(1, rules.max_rounds)
    joiner = rng.choice(others) if others and rng.random() < _LATE_JOINER_CHANCE else None
    join_round = rng.randint(1, rounds) if joiner else None
    dropout = rng.choice(participants[1:]) if rng.random() < _DROPOUT_CHANCE else None
    drop_round = rng.randint(1, rounds) if dropout else None
    bias = rng.random()
    pace = rng.uniform(0.5, 2.5)
    round_seconds = tuple(pace * rng.uniform(10.0, 45.0) for _ in range(rounds))
    vote_seconds = rng.uniform(5.0, 20.0)

    plans = []
    for agent_id in (*participants, *([joiner] if joiner else [])):
        lean, base_confidence = _agent_lean(seed, agent_id)
        agent_rng = random.Random(f"{seed}:debate:{index}:agent:{agent_id}")
        opinion = min(1.0, max(0.0, bias + lean + agent_rng.uniform(-0.2, 0.2)))
        stances = []
        confidences = []
        for _ in range(rounds):
            stances.append(_stance(min(1.0, max(0.0, opinion + agent_rng.uniform(-0.1, 0.1)))))
            confidences.append(round(min(1.0, base_confidence + agent_rng.uniform(-0.1, 0.1)), 3))
        vote: Vote = "approve" if agent_rng.random() < opinion else "reject"
        plans.append(
            AgentPlan(
                agent_id=agent_id,
                stances=tuple(stances),
                confidences=tuple(confidences),
                vote=vote,
                vote_confidence=round(min(1.0, base_confidence + agent_rng.uniform(0, 0.1)), 3),
                joins_at_round=join_round if agent_id == joiner else None,
                stops_at_round=drop_round if agent_id == dropout else None,
            )
        )
    return DebatePlan(
        index=index,
        topic=f"{rng.choice(TOPICS)} (#{index})",
        moderator=participants[0],
        agents=tuple(plans),
        rounds=rounds,
        round_seconds=round_seconds,
        vote_seconds=vote_seconds,
    )


@dataclass(frozen=True, slots=True)
class DebateResult:
    debate_id: str
    outcome: Outcome
    participants: tuple[str, ...]
    rounds_completed: int
    votes_for: int
    votes_against: int
    decision_id: str | None
    """The decision proposed on consensus (approved or rejected by the
    moderator as the consensus says)."""
    simulated_seconds: float


@dataclass(frozen=True, slots=True)
class SimulationProgress:
    """Passed to the progress callback after each debate ends."""

    debates_total: int
    debates_done: int
    outcomes: Mapping[Outcome, int]
    events_appended: int
    conflicts_retried: int
    elapsed_seconds: float
    last: DebateResult


@dataclass(frozen=True, slots=True)
class SimulationSummary:
    seed: int
    prefix: str
    """Debate ids are ``<prefix>-<index>``, streams ``debate-<prefix>-<index>``."""
    debates: int
    agents: int
    workers: int
    outcomes: Mapping[Outcome, int]
    """Debates by outcome; every outcome is present, maybe with 0."""
    events_appended: int
    """Events written to the store, debate and decision streams together."""
    conflicts_retried: int
    """Concurrency conflicts the repository retried."""
    commands: int
    decisions_approved: int
    decisions_rejected: int
    elapsed_seconds: float
    results: tuple[DebateResult, ...] = field(repr=False)
    """Per debate, in index order."""

    @property
    def debate_ids(self) -> tuple[str, ...]:
        return tuple(r.debate_id for r in self.results)


class SimulationTally:
    """Counters shared by the worker threads (events, conflicts, commands,
    outcomes), reported through ``progress``."""

    def __init__(self, total: int, progress: Callable[[SimulationProgress], None] | None) -> None:
        self.lock = threading.Lock()
        self.total = total
        self.progress = progress
        self.started = time.perf_counter()
        self.events = 0
        self.conflicts = 0
        self.commands = 0
        self.done = 0
        self.approved = 0
        self.rejected = 0
        self.outcomes: dict[Outcome, int] = dict.fromkeys(OUTCOMES, 0)

    def record(self, result: CommandResult | ConsensusResult) -> None:
        with self.lock:
            self.events += result.appended
            self.conflicts += result.conflicts
            self.commands += 1

    def decided(self, outcome: Vote) -> None:
        with self.lock:
            if outcome == "approve":
                self.approved += 1
            else:
                self.rejected += 1

    def finished(self, result: DebateResult) -> None:
        # The callback runs under the lock: it sees consistent counts and
        # need not be thread-safe itself.
        with self.lock:
            self.done += 1
            self.outcomes[result.outcome] += 1
            if self.progress is not None:
                self.progress(
                    SimulationProgress(
                        debates_total=self.total,
                        debates_done=self.done,
                        outcomes=dict(self.outcomes),
                        events_appended=self.events,
                        conflicts_retried=self.conflicts,
                        elapsed_seconds=time.perf_counter() - self.started,
                        last=result,
                    )
                )


class DebateRunner:
    """Runs planned debates through the repository, one command at a time
    (the agents of a round at once on ``agent_pool``). Load tools subclass
    it and override ``execute`` to time or count each command."""

    def __init__(
        self,
        repository: DebateRepository,
        rules: DebateRules,
        tally: SimulationTally,
        agent_pool: ThreadPoolExecutor | None,
    ) -> None:
        self.repository = repository
        self.rules = rules
        self.tally = tally
        self.agent_pool = agent_pool

    def execute(self, command: Callable[[], CommandResult | ConsensusResult]) -> None:
        """Run one repository command and count its result."""
        self.tally.record(command())

    def _together(self, commands: list[Callable[[], CommandResult]]) -> None:
        """Run the commands at once on the agent pool (in order without one)."""
        if self.agent_pool is None:
            for command in commands:
                self.execute(command)
            return
        futures = [self.agent_pool.submit(self.execute, command) for command in commands]
        for future in futures:
            future.result()

    def run(self, plan: DebatePlan, debate_id: str) -> DebateResult:
        repo = self.repository
        moderator = plan.moderator
        self.execute(
            partial(
                repo.start, debate_id, plan.topic, plan.initial_participants, moderator, self.rules
            )
        )
        started_at = repo.load(debate_id).started_at
        if started_at is None:
            raise RuntimeError(f"debate {debate_id} did not start")
        clock = 0.0
        timed_out = False
        for round_ in range(1, plan.rounds + 1):
            for agent in plan.agents:
                if agent.joins_at_round == round_:
                    self.execute(partial(repo.join, debate_id, agent.agent_id))
            self._together(
                [
                    partial(
                        repo.add_argument,
                        debate_id,
                        agent.agent_id,
                        round_,
                        agent.stances[round_ - 1],
                        _argument_text(plan, agent, round_),
                        agent.confidences[round_ - 1],
                    )
                    for agent in plan.agents
                    if agent.argues_in(round_)
                ]
            )
            clock += plan.round_seconds[round_ - 1]
            if any(a.stops_at_round is not None and not a.argues_in(round_) for a in plan.agents):
                # Somebody stopped answering: the round cannot complete, and
                # the moderator waits out the timeout.
                clock = max(clock, self.rules.timeout_seconds + 1.0)
            if clock > self.rules.timeout_seconds:
                timed_out = True
                break
            self.execute(partial(repo.complete_round, debate_id, round_))

        if timed_out:
            self.execute(partial(repo.time_out, debate_id, started_at + timedelta(seconds=clock)))
        else:
            self._together(
                [
                    partial(
                        repo.cast_vote, debate_id, agent.agent_id, agent.vote, agent.vote_confidence
                    )
                    for agent in plan.agents
                ]
            )
            clock += plan.vote_seconds
            self._close(debate_id, moderator)

        final = repo.load(debate_id)
        result = DebateResult(
            debate_id=debate_id,
            outcome=_OUTCOME_OF[final.status],
            participants=final.participants,
            rounds_completed=final.rounds_completed,
            votes_for=final.votes_for(),
            votes_against=final.votes_against(),
            decision_id=final.decision_id,
            simulated_seconds=clock,
        )
        self.tally.finished(result)
        return result

    def _close(self, debate_id: str, moderator: str) -> None:
        """After the votes: consensus and the decision, or failure."""
        repo = self.repository
        debate = repo.load(debate_id)
        outcome = debate.consensus_outcome()
        if outcome is None:
            reason = (
                f"no quorum: {debate.votes_for()} approve, {debate.votes_against()} reject "
                f"of {len(debate.participants)}, {debate.votes_needed()} needed"
            )
            self.execute(partial(repo.fail, debate_id, reason))
            return
        self.execute(partial(repo.reach_consensus, debate_id, moderator))
        decision_id = decision_id_for(debate_id)
        if outcome == "approve":
            self.execute(partial(repo.decisions.approve, decision_id, moderator))
        else:
            reason = "the debate's consensus was to reject"
            self.execute(partial(repo.decisions.reject, decision_id, moderator, reason))
        self.tally.decided(outcome)


def _argument_text(plan: DebatePlan, agent: AgentPlan, round_: int) -> str:
    phrase = _PHRASES[(plan.index + round_ + len(agent.agent_id)) % len(_PHRASES)]
    return f"{agent.agent_id}, round {round_}, {agent.stances[round_ - 1]}: {phrase}"


_OUTCOME_OF: Final[Mapping[DebateStatus, Outcome]] = {
    DebateStatus.CONSENSUS: "consensus",
    DebateStatus.FAILED: "failed",
    DebateStatus.TIMED_OUT: "timed_out",
}


def run_simulation(
    store: EventStore,
    *,
    debates: int = 50,
    agents: int = 5,
    seed: int = 0,
    workers: int = 8,
    rules: DebateRules | None = None,
    prefix: str | None = None,
    progress: Callable[[SimulationProgress], None] | None = None,
    retry: RetryPolicy | None = None,
) -> SimulationSummary:
    """Run ``debates`` debates among a pool of ``agents`` agents.

    ``workers`` debates run at once, and within each its agents argue and
    vote at once (``2 * workers`` agent threads in all); ``workers=1`` runs
    everything in order in the calling thread. Each store operation borrows
    its own connection from the store's pool, so a pool of ``2 * workers``
    connections or more avoids waiting. ``prefix`` defaults to
    ``sim<seed>-<random>`` so runs never collide; outcomes depend only on
    ``seed``, ``debates``, ``agents`` and ``rules``.
    """
    if debates < 0:
        raise ValueError(f"debates must be >= 0, not {debates}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, not {workers}")
    rules = rules or DebateRules()
    prefix = prefix or f"sim{seed}-{uuid.uuid4().hex[:8]}"
    plans = [plan_debate(seed, index, agents, rules) for index in range(1, debates + 1)]
    ids = [f"{prefix}-{plan.index:04d}" for plan in plans]
    tally = SimulationTally(debates, progress)
    repository = DebateRepository(store, retry=retry)

    if workers == 1:
        runner = DebateRunner(repository, rules, tally, None)
        results = [runner.run(plan, debate_id) for plan, debate_id in zip(plans, ids, strict=True)]
    else:
        with (
            ThreadPoolExecutor(workers, thread_name_prefix="debate") as debate_pool,
            ThreadPoolExecutor(2 * workers, thread_name_prefix="agent") as agent_pool,
        ):
            runner = DebateRunner(repository, rules, tally, agent_pool)
            futures = [
                debate_pool.submit(runner.run, plan, debate_id)
                for plan, debate_id in zip(plans, ids, strict=True)
            ]
            try:
                results = [future.result() for future in futures]
            except BaseException:
                # Interrupted (Ctrl-C) or failed: start no further debate;
                # the ones running finish their current command.
                debate_pool.shutdown(wait=True, cancel_futures=True)
                raise

    return SimulationSummary(
        seed=seed,
        prefix=prefix,
        debates=debates,
        agents=agents,
        workers=workers,
        outcomes=dict(tally.outcomes),
        events_appended=tally.events,
        conflicts_retried=tally.conflicts,
        commands=tally.commands,
        decisions_approved=tally.approved,
        decisions_rejected=tally.rejected,
        elapsed_seconds=time.perf_counter() - tally.started,
        results=tuple(results),
    )
