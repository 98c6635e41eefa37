"""AURA's debate agents as Python processors: the reactive mode of the
debate simulator (docs/debates.md, *Reactive mode*).

The simulator drives each debate from a thread, by a plan drawn up before
it starts. Here nobody drives: every agent is a Python processor
(``aura_pg.processors``) that hears the debate events as they commit and
does what is due for it then, through ``DebateRepository``, inside the
transaction that advances its checkpoint. So each command checks the
aggregate's invariants against the exact expected version, and a reaction
commits with the checkpoint that consumed its cause or not at all: an
agent whose daemon is killed part-way hears the cause again and reacts
once, never twice, never not at all. What an agent says and votes is
``aura_pg.domain.agent_mind``.

**One processor per agent**, not one per role: an agent is what has a
memory and a pace of its own. Its checkpoint is what it has heard; its
failures are retried, dead-lettered or trip a circuit breaker for it alone
(the others carry on, and a debate it stalls times out as the domain
says); and agents write to a debate as independent writers racing for its
stream, the expected version sorting them out, as in the threaded
simulator. The price: every agent hears every debate event, and folds the
debate to see whether it is concerned. The moderator's duties (closing
rounds, ending the debate, resolving its decision) fall to the processor
of the agent that started the debate, so a debate started by an agent
without a processor (the threaded simulator's, a person's) is never
touched.

Agent ``ada`` runs as processor ``agent_ada`` with the handler
``aura_pg.domain.reactive:agent_ada``: the module makes ``agent_<id>``
attributes on demand (PEP 562 ``__getattr__``), so the daemon, ``aura-pg
dlq retry`` and ``projections replay`` import any agent's handler by name
with no table of agents to keep. Agent ids are therefore lower-case
letters and digits in words joined by single underscores.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from datetime import datetime
from functools import cache
from typing import Any, Final

import psycopg

from aura_pg.domain.agent_mind import argument_for, vote_for
from aura_pg.domain.debate import Debate
from aura_pg.domain.decision import Decision, DecisionStatus
from aura_pg.domain.events import (
    AgentJoined,
    DebateArgumentAdded,
    DebateRoundCompleted,
    DebateStarted,
    DebateVoteCast,
    DecisionProposed,
    debate_stream,
    decode,
)
from aura_pg.domain.repository import DebateRepository, RetryPolicy
from aura_pg.errors import StreamOrderConflict
from aura_pg.models import (
    ANY,
    FORWARDS,
    AppendResult,
    Checkpoint,
    Direction,
    ExpectedVersion,
    NewEvent,
    Page,
    RecordedEvent,
)
from aura_pg.processors import idempotency_key, python_processor
from aura_pg.projection.catalog import CircuitBreakerPolicy, ErrorHandling, ProjectionSpec
from aura_pg.store import EventStore
from aura_pg.store.retry import AppendRetry
from aura_pg.store.validation import as_batch

PROCESSOR_PREFIX: Final = "agent_"
_DEBATE_STREAM: Final = debate_stream("")
_AGENT_ID: Final = re.compile(r"[a-z0-9]+(_[a-z0-9]+)*")
MAX_AGENT_ID_LENGTH: Final = 40 - len(PROCESSOR_PREFIX)
"""Processor names have at most 40 characters."""

SOURCE_EVENTS: Final = (
    DebateStarted.TYPE,
    AgentJoined.TYPE,
    DebateArgumentAdded.TYPE,
    DebateRoundCompleted.TYPE,
    DebateVoteCast.TYPE,
    DecisionProposed.TYPE,
)
"""What an agent hears: every event that can make something due for it."""

DEFAULT_BATCH_SIZE: Final = 10
"""Small batches: once a batch's transaction has appended, a later append
of it to a debate that an agent writing later got to first is refused
(``StreamOrderConflict``) and the whole batch runs again; the fewer events
a batch holds, the less runs again."""

REACTIVE_ERROR_HANDLING: Final = ErrorHandling(
    max_retries=3,
    retry_base_ms=10,
    retry_max_ms=1000,
    circuit_breaker=CircuitBreakerPolicy(failure_threshold=20, recovery_timeout_seconds=5),
)
"""Quick retries and a patient circuit breaker: a busy debate makes agents'
batches fail for the moment (a serialization failure, retried without
counting against the event, but counted by the breaker)."""

_IN_TRANSACTION: Final = RetryPolicy(append_retry=None)
"""A reaction never resends an append: it cannot outlive its transaction,
and a lost connection rolls the whole batch back for the runtime to rerun."""


def check_agent_id(agent_id: str) -> str:
    """``agent_id`` if it can name a processor and a handler, else ValueError."""
    if (
        not isinstance(agent_id, str)
        or _AGENT_ID.fullmatch(agent_id) is None
        or len(agent_id) > MAX_AGENT_ID_LENGTH
    ):
        raise ValueError(
            f"a reactive agent's id is lower-case letters and digits in words joined by single "
            f"underscores, at most {MAX_AGENT_ID_LENGTH} characters, not {agent_id!r}"
        )
    return agent_id


def processor_name(agent_id: str) -> str:
    """The processor of agent ``agent_id``: ``agent_<id>``."""
    return PROCESSOR_PREFIX + check_agent_id(agent_id)


# -- the store as a reaction writes to it ------------------------------------------


class ReactionStore(EventStore):
    """The event store as one reaction sees it, for ``DebateRepository``.

    Reads and appends run in the handler's transaction (``conn``). Each
    append runs in a savepoint, so that a conflict the repository retries
    (another agent appended first) leaves the transaction usable. Every
    appended event is keyed by its cause, ``idempotency_key(cause, <the
    domain's key>)``: the key still names the action (``<debate>:argument:2:
    ada``), and the same reaction run twice would be a recorded duplicate;
    one argument per agent and round, one vote per agent and one ending
    stay the aggregate's rules, checked at the exact expected version. The
    metadata names the cause (``causation_id``) and the ``processor``.

    A ``StreamOrderConflict`` (this transaction had written before, and one
    that began writing later has appended to the stream since) cannot be
    cured inside the transaction: it leaves as a serialization failure
    (SQLSTATE 40001), which the processor runtime treats as momentary and
    cures by running the batch again in a new transaction.
    """

    def __init__(self, conn: psycopg.Connection[Any], cause: RecordedEvent, processor: str) -> None:
        super().__init__()  # no pool: everything runs on conn
        self.conn = conn
        self.cause = cause
        self.processor = processor
        self.appended: list[NewEvent] = []
        """The events this reaction wrote (a duplicate answer writes none)."""

    def _on(self, conn: psycopg.Connection[Any] | None) -> psycopg.Connection[Any]:
        if conn is not None and conn is not self.conn:
            raise ValueError("a reaction reads and writes in its handler's transaction only")
        return self.conn

    def read_stream(
        self,
        stream_id: str,
        from_version: int | None = None,
        direction: Direction = FORWARDS,
        limit: int | None = None,
        *,
        conn: psycopg.Connection[Any] | None = None,
    ) -> list[RecordedEvent]:
        return super().read_stream(stream_id, from_version, direction, limit, conn=self._on(conn))

    def stream_version(self, stream_id: str, *, conn: psycopg.Connection[Any] | None = None) -> int:
        return super().stream_version(stream_id, conn=self._on(conn))

    def read_all(
        self,
        after: Checkpoint | None = None,
        limit: int = 1000,
        types: Iterable[str] | None = None,
        *,
        conn: psycopg.Connection[Any] | None = None,
    ) -> Page:
        return super().read_all(after, limit, types, conn=self._on(conn))

    def append(
        self,
        stream_id: str,
        events: NewEvent | Iterable[NewEvent],
        expected_version: ExpectedVersion = ANY,
        *,
        conn: psycopg.Connection[Any] | None = None,
        retry: AppendRetry | None = None,
    ) -> AppendResult:
        if retry is not None:
            raise ValueError("a reaction never resends: the runtime reruns its batch")
        batch = [self._caused(event) for event in as_batch(events)]
        try:
            with self._on(conn).transaction():  # a savepoint
                result = super().append(stream_id, batch, expected_version, conn=self.conn)
        except StreamOrderConflict as exc:
            raise psycopg.errors.SerializationFailure(str(exc)) from exc
        if not result.duplicate:
            self.appended.extend(batch)
        return result

    def _caused(self, event: NewEvent) -> NewEvent:
        metadata = event.metadata
        if metadata is None:
            known: dict[str, Any] = {}
        elif isinstance(metadata, Mapping):
            known = dict(metadata)
        else:
            known = metadata.model_dump(mode="json")
        return replace(
            event,
            idempotency_key=idempotency_key(self.cause, event.key),
            metadata={
                **known,
                "causation_id": str(self.cause.event_id),
                "processor": self.processor,
            },
        )


# -- the agent ----------------------------------------------------------------------


class DebateAgent:
    """One agent's reactions: what its processor's handler runs per event.

    The cause's type says what an agent considers; the debate as it stands
    (read in the handler's transaction) says whether it is due, so hearing
    a cause late, or again (a replay, a retried dead letter), does nothing
    twice:

    ======================== ===============================================
    cause                    the agent considers
    ======================== ===============================================
    DEBATE_STARTED           arguing in round 1
    AGENT_JOINED (itself)    arguing in the current round
    DEBATE_ROUND_COMPLETED   arguing in the next round, or, after the last
                             (``max_rounds``), voting
    DEBATE_ARGUMENT_ADDED    as moderator: completing the round once every
                             participant has argued in it
    DEBATE_VOTE_CAST         as moderator: ending the debate once every
                             participant has voted (consensus, its decision
                             proposed in the same transaction, or failure)
    DECISION_PROPOSED        as its proposer: approving or rejecting it as
                             the consensus says
    any debate event         as moderator: timing the debate out when the
                             cause was recorded more than ``timeout_seconds``
                             after the start (the database's clock; a debate
                             nobody writes to any more waits for its next
                             event)
    ======================== ===============================================

    The moderator is the debate's starter (``started_by``).
    """

    def __init__(self, agent_id: str) -> None:
        self.agent_id = check_agent_id(agent_id)
        self.processor = processor_name(agent_id)

    def __call__(self, events: list[RecordedEvent], conn: psycopg.Connection[Any]) -> None:
        for event in events:
            self.react(event, conn)

    def react(self, cause: RecordedEvent, conn: psycopg.Connection[Any]) -> list[NewEvent]:
        """React to ``cause`` in ``conn``'s open transaction; the events written."""
        store = ReactionStore(conn, cause, self.processor)
        debates = DebateRepository(store, retry=_IN_TRANSACTION)
        if cause.type == DecisionProposed.TYPE:
            self._resolve(debates, cause)
        elif cause.stream_id.startswith(_DEBATE_STREAM):
            self._take_part(debates, cause, cause.stream_id.removeprefix(_DEBATE_STREAM))
        return store.appended

    def _take_part(self, debates: DebateRepository, cause: RecordedEvent, debate_id: str) -> None:
        debate = debates.load(debate_id)
        me = self.agent_id
        moderating = debate.started_by == me
        if not debate.is_open or not (moderating or me in debate.participants):
            return
        if moderating and debate.timeout_due(cause.recorded_at):
            debates.execute(debate_id, _time_out(cause.recorded_at))
            return
        match cause.type:
            case DebateStarted.TYPE:
                debates.execute(debate_id, self._argue)
            case AgentJoined.TYPE if cause.data.get("agent_id") == me:
                debates.execute(debate_id, self._argue)
            case DebateRoundCompleted.TYPE:
                debates.execute(debate_id, self._argue)
                debates.execute(debate_id, self._vote)
            case DebateArgumentAdded.TYPE if moderating:
                debates.execute(debate_id, _complete_round)
            case DebateVoteCast.TYPE if moderating:
                self._end(debates, debate_id)

    def _argue(self, debate: Debate) -> list[NewEvent]:
        me, round_ = self.agent_id, debate.current_round
        if (
            not debate.is_open
            or me not in debate.participants
            or round_ > debate.rules.max_rounds
            or me in debate.arguments.get(round_, {})
        ):
            return []
        stance, text, confidence = argument_for(debate, me, round_)
        return debate.add_argument(me, round_, stance, text, confidence)

    def _vote(self, debate: Debate) -> list[NewEvent]:
        me = self.agent_id
        if (
            not debate.is_open
            or me not in debate.participants
            or debate.rounds_completed < debate.rules.max_rounds
            or me in debate.votes
        ):
            return []
        choice, confidence = vote_for(debate, me)
        return debate.cast_vote(me, choice, confidence)

    def _end(self, debates: DebateRepository, debate_id: str) -> None:
        """Once everybody has voted: consensus (and its decision, proposed in
        the same transaction), or failure."""
        debate = debates.load(debate_id)
        if not debate.is_open or any(agent not in debate.votes for agent in debate.participants):
            return
        if debate.consensus_outcome() is not None:
            debates.reach_consensus(debate_id, proposed_by=self.agent_id)
        else:
            debates.execute(debate_id, _fail)

    def _resolve(self, debates: DebateRepository, cause: RecordedEvent) -> None:
        """Approve or reject, as the consensus says, the decision this agent
        proposed for a debate it moderated."""
        proposal = decode(cause)
        if not isinstance(proposal, DecisionProposed) or proposal.proposed_by != self.agent_id:
            return
        debate = debates.load(proposal.debate_id)
        if debate.started_by != self.agent_id or debate.decision_id != proposal.decision_id:
            return
        outcome, me = debate.outcome, self.agent_id

        def resolve(decision: Decision) -> list[NewEvent]:
            if decision.status is not DecisionStatus.PROPOSED:
                return []
            if outcome == "approve":
                return decision.approve(me)
            return decision.reject(me, "the debate's consensus was to reject")

        debates.decisions.execute(proposal.decision_id, resolve)


def _complete_round(debate: Debate) -> list[NewEvent]:
    round_ = debate.current_round
    if not debate.is_open or round_ > debate.rules.max_rounds:
        return []
    argued = debate.arguments.get(round_, {})
    if any(agent not in argued for agent in debate.participants):
        return []
    return debate.complete_round(round_)


def _fail(debate: Debate) -> list[NewEvent]:
    if not debate.is_open:
        return []
    return debate.fail(
        f"no quorum: {debate.votes_for()} approve, {debate.votes_against()} reject "
        f"of {len(debate.participants)}, {debate.votes_needed()} needed"
    )


def _time_out(now: datetime) -> Callable[[Debate], list[NewEvent]]:
    def command(debate: Debate) -> list[NewEvent]:
        if not debate.is_open or not debate.timeout_due(now):
            return []
        return debate.time_out(now)

    return command


# -- processors -----------------------------------------------------------------------

Handler = Callable[[list[RecordedEvent], psycopg.Connection[Any]], None]


@cache
def agent_handler(agent_id: str) -> Handler:
    """Agent ``agent_id``'s handler, importable as
    ``aura_pg.domain.reactive:agent_<id>`` (one function per agent, kept)."""
    agent = DebateAgent(agent_id)

    def handle(events: list[RecordedEvent], conn: psycopg.Connection[Any]) -> None:
        agent(events, conn)

    handle.__name__ = handle.__qualname__ = agent.processor
    handle.__module__ = __name__
    handle.__doc__ = f"Debate agent {agent_id!r} reacting to a batch of debate events."
    return handle


def __getattr__(name: str) -> Handler:
    """``agent_<id>``: that agent's handler (PEP 562), so a catalog entry
    can name any agent's handler without a table of agents."""
    if name.startswith(PROCESSOR_PREFIX):
        agent_id = name.removeprefix(PROCESSOR_PREFIX)
        if _AGENT_ID.fullmatch(agent_id) and len(agent_id) <= MAX_AGENT_ID_LENGTH:
            return agent_handler(agent_id)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def agent_processor(
    agent_id: str,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    partitions: int = 1,
    error_handling: ErrorHandling = REACTIVE_ERROR_HANDLING,
) -> ProjectionSpec:
    """Agent ``agent_id``'s processor, for ``ProjectorDaemon``. Partitions
    split the debates among daemons; an agent's reactions to one debate
    stay in order (a debate is one stream), and its decisions (the
    decision streams) may be resolved by another partition."""
    return python_processor(
        processor_name(agent_id),
        agent_handler(agent_id),
        source_events=SOURCE_EVENTS,
        batch_size=batch_size,
        partitions=partitions,
        error_handling=error_handling,
        description=f"debate agent {agent_id}: argues and votes; moderates the debates it starts",
    )


def agent_processors(agent_ids: Iterable[str], **options: Any) -> tuple[ProjectionSpec, ...]:
    """One processor per agent (``agent_processor``'s options for each)."""
    return tuple(agent_processor(agent_id, **options) for agent_id in agent_ids)


def agent_catalog(agent_ids: Iterable[str], **options: Any) -> dict[str, list[dict[str, Any]]]:
    """A catalog document with one processor per agent, for ``yaml.safe_dump``
    and then ``aura-pg project --catalog FILE``."""
    return {
        "projections": [_catalog_entry(spec) for spec in agent_processors(agent_ids, **options)]
    }


def _catalog_entry(spec: ProjectionSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "kind": "python",
        "description": spec.description,
        "handler": spec.handler,
        "source_events": list(spec.source_events or ()),
        "batch_size": spec.batch_size,
        "partitions": spec.partitions,
        "batch_timeout_seconds": spec.batch_timeout_seconds,
        "error_handling": spec.error_handling.model_dump(mode="json"),
    }


def agent_ids(count: int) -> tuple[str, ...]:
    """``count`` reactive agents' ids: computing pioneers, then ``agent_<n>``."""
    pioneers = ("ada", "grace", "linus", "barbara", "edsger", "alan", "margaret", "dennis")
    return tuple(
        pioneers[index] if index < len(pioneers) else f"agent_{index + 1}" for index in range(count)
    )
