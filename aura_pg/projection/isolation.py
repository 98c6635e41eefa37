"""Poison isolation and the circuit breaker, as a pure state machine.

The runner asks :class:`Isolation` how many events its next batch may hold,
tells it what came of each batch, and does what it answers. Nothing here
does I/O or reads a clock, so every transition is unit-tested without a
database (tests/unit/test_projection_isolation.py).

The database keeps the durable truth in the projection's checkpoint row:
the checkpoint, the failures in a row, the circuit and its recovery time
(``aura.project_batch`` closes the circuit when a batch applies and sends
one event at a time while it is not closed; ``aura.record_projection_failure``
counts a failure and opens it at the threshold; ``aura.dead_letter_next``
moves the checkpoint past a dead-lettered event). This machine holds what
lasts only as long as a runner owns the projection, and mirrors the circuit
the database reported, to size the next batch.

The path of a failure:

1. A batch fails (:meth:`Isolation.batch_failed`). If it held more than one
   event it is *isolated*: retried in ever smaller slices, halving the one
   that fails, down to the single event that fails. The first failure of a
   batch first asks the runner to count the events it held (``MEASURE``,
   then :meth:`Isolation.measured`). A poison event costs about log2 of the
   failed batch's events in extra transactions, not one per event.
2. A single event fails (``EVENT``): the runner records the failure
   (:meth:`Isolation.event_failed`, then the database, then
   :meth:`Isolation.failure_recorded`), which answers *retry after a
   backoff* or, after more than ``max_retries`` failures of its own,
   *dead-letter* it (:meth:`Isolation.dead_lettered`). Transient failures
   (a busy database) count for the circuit, never toward an event's retries.
3. When the database reports the circuit open, every batch is a *half-open
   probe* of one event, until one applies and the circuit *closes*
   (:meth:`Isolation.applied`).
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, replace
from datetime import datetime

from aura_pg.models import Checkpoint


class Circuit(enum.Enum):
    CLOSED = "closed"
    # Open or half-open in the database: batches of one event (probes).
    OPEN = "open"

    @classmethod
    def from_state(cls, circuit_state: str) -> Circuit:
        """The circuit of a checkpoint row's ``circuit_state``."""
        return cls.CLOSED if circuit_state == "closed" else cls.OPEN


@dataclass(frozen=True)
class RetryPolicy:
    """A projection's retry settings, from its checkpoint row (where
    ``projections register`` may change them) and its catalog entry."""

    batch_size: int = 1
    max_retries: int = 0
    retry_base_ms: int = 100
    retry_max_ms: int = 10_000
    # False: a poison event is retried until an operator steps in.
    dead_letter_queue: bool = True


@dataclass(frozen=True)
class Suspect:
    """The single event that failed: the next one after ``checkpoint``."""

    checkpoint: Checkpoint
    first_failed_at: datetime
    # Its own failures (transient ones not counted).
    attempts: int = 0
    event_id: uuid.UUID | None = None
    event_type: str | None = None


class BatchFailure(enum.Enum):
    """What to do after a failed batch."""

    MEASURE = "measure"  # a whole batch failed: count its events, then measured()
    HALVE = "halve"  # the next batch is the first half of the failed slice
    EVENT = "event"  # one event failed: event_failed(), record it, failure_recorded()


@dataclass(frozen=True)
class RetryLater:
    """Retry the suspect after the catalog's backoff for ``attempt`` (``runner.retry_backoff``)."""

    attempt: int


@dataclass(frozen=True)
class DeadLetter:
    """Move the suspect to the dead letters, then dead_lettered()."""

    suspect: Suspect


Verdict = RetryLater | DeadLetter


@dataclass(frozen=True)
class Isolation:
    """A runner's isolation and circuit state; each transition returns a new one."""

    circuit: Circuit = Circuit.CLOSED
    # Events of a failed batch not yet applied or dead-lettered.
    remaining: int = 0
    # How many of them the next batch tries.
    slice: int = 1
    suspect: Suspect | None = None

    @classmethod
    def loaded(cls, circuit_state: str) -> Isolation:
        """Fresh, after claiming or reloading the projection's row."""
        return cls(circuit=Circuit.from_state(circuit_state))

    def batch_limit(self) -> int | None:
        """The most events the next batch may hold (None: the batch size)."""
        if self.circuit is Circuit.OPEN:
            return 1  # a half-open probe
        if self.remaining > 0:
            return max(min(self.slice, self.remaining), 1)
        return None

    def applied(self, count: int) -> Isolation:
        """A batch applied ``count`` (> 0) events: the circuit is closed."""
        remaining = max(self.remaining - count, 0)
        if self.suspect is not None:
            # The failing event went through on a retry: try the rest of the
            # failed batch in one slice again.
            return replace(
                self,
                circuit=Circuit.CLOSED,
                remaining=remaining,
                slice=max(remaining, 1),
                suspect=None,
            )
        return replace(self, circuit=Circuit.CLOSED, remaining=remaining)

    def caught_up(self) -> Isolation:
        """Nothing left to read: whatever failed before is behind."""
        return replace(self, circuit=Circuit.CLOSED, remaining=0)

    def paused(self) -> Isolation:
        """An operator paused the projection: retries start afresh after a resume."""
        return replace(self, suspect=None)

    def batch_failed(self) -> tuple[Isolation, BatchFailure]:
        """The batch of :meth:`batch_limit` events failed."""
        limit = self.batch_limit()
        if limit == 1:
            return self, BatchFailure.EVENT
        if limit is None:
            return self, BatchFailure.MEASURE
        return replace(self, slice=max(limit // 2, 1)), BatchFailure.HALVE

    def measured(self, events: int) -> Isolation:
        """The failed batch held ``events``: retry its first half."""
        tried = max(events, 1)
        return replace(self, remaining=tried, slice=max(tried // 2, 1))

    def event_failed(self, at: Checkpoint, *, transient: bool, now: datetime) -> Isolation:
        """The single event after ``at`` failed (at ``now``)."""
        suspect = self.suspect
        if suspect is None or suspect.checkpoint != at:
            suspect = Suspect(at, now)
        if not transient:
            suspect = replace(suspect, attempts=suspect.attempts + 1)
        return replace(self, suspect=suspect)

    @property
    def needs_identity(self) -> bool:
        """Whether the runner should look up which event the suspect is."""
        return self.suspect is not None and self.suspect.event_type is None

    def identified(self, event_id: uuid.UUID, event_type: str) -> Isolation:
        if self.suspect is None:
            return self
        return replace(
            self, suspect=replace(self.suspect, event_id=event_id, event_type=event_type)
        )

    def failure_recorded(
        self, failures: int, circuit_state: str, *, transient: bool, policy: RetryPolicy
    ) -> tuple[Isolation, Verdict]:
        """The database counted the suspect's failure: ``failures`` in a row,
        the circuit now ``circuit_state``."""
        if self.suspect is None:
            raise ValueError("failure_recorded without a suspect (call event_failed first)")
        state = replace(self, circuit=Circuit.from_state(circuit_state))
        attempts = self.suspect.attempts
        if not transient and attempts > policy.max_retries and policy.dead_letter_queue:
            return state, DeadLetter(self.suspect)
        return state, RetryLater(max(attempts, failures if transient else 0))

    def dead_lettered(self) -> Isolation:
        """The suspect is a dead letter: the rest of the failed batch in one slice."""
        remaining = max(self.remaining - 1, 0)
        return replace(self, remaining=remaining, slice=max(remaining, 1), suspect=None)

    def suspect_gone(self) -> Isolation:
        """No event follows the suspect's checkpoint any more (nothing to dead-letter)."""
        return replace(self, suspect=None)
