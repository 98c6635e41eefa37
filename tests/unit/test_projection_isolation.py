"""The poison-isolation and circuit-breaker state machine, without a database.

Each transition is checked over a grid of every kind of state (circuit
closed or open, no failed batch or a few of its events left in slices of
several sizes, no suspect or one at this checkpoint or at another), and a
simulated projection drives the machine the way the runner does, against a
fake of what the database owns (the checkpoint, failures in a row, the
circuit), to check the whole path: poison events found in a few slices,
retried, dead-lettered exactly once, every other event applied once and in
order.
"""

from __future__ import annotations

import itertools
import math
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aura_pg._runtime import is_momentary
from aura_pg.models import Checkpoint
from aura_pg.projection.isolation import (
    BatchFailure,
    Circuit,
    DeadLetter,
    Isolation,
    RetryLater,
    RetryPolicy,
    Suspect,
)
from aura_pg.projection.runner import retry_backoff

HERE = Checkpoint(7, 70)
ELSEWHERE = Checkpoint(6, 60)
EARLIER = datetime(2026, 1, 1, tzinfo=UTC)
NOW = EARLIER + timedelta(minutes=5)
EVENT_ID = uuid.UUID(int=1)

SUSPECTS: tuple[Suspect | None, ...] = (
    None,
    Suspect(HERE, EARLIER, attempts=2, event_id=EVENT_ID, event_type="T"),
    Suspect(ELSEWHERE, EARLIER, attempts=5),
)
STATES: tuple[Isolation, ...] = tuple(
    Isolation(circuit=circuit, remaining=remaining, slice=size, suspect=suspect)
    for circuit, remaining, size, suspect in itertools.product(
        Circuit, (0, 1, 2, 3, 7, 64), (1, 2, 5, 32), SUSPECTS
    )
)


def ids(state: Isolation) -> str:
    suspect = "none" if state.suspect is None else str(state.suspect.checkpoint)
    return f"{state.circuit.value}-r{state.remaining}-s{state.slice}-{suspect}"


# -- the batch limit -------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "limit"),
    [
        (Isolation(), None),
        (Isolation(circuit=Circuit.OPEN), 1),
        (Isolation(circuit=Circuit.OPEN, remaining=10, slice=5), 1),
        (Isolation(remaining=10, slice=5), 5),
        (Isolation(remaining=3, slice=5), 3),
        (Isolation(remaining=1, slice=5), 1),
        (Isolation(remaining=0, slice=5), None),
    ],
)
def test_the_batch_limit(state: Isolation, limit: int | None) -> None:
    assert state.batch_limit() == limit


@pytest.mark.parametrize("state", STATES, ids=ids)
def test_an_open_circuit_probes_with_one_event_and_a_failed_batch_is_tried_in_slices(
    state: Isolation,
) -> None:
    limit = state.batch_limit()
    if state.circuit is Circuit.OPEN:
        assert limit == 1
    elif state.remaining == 0:
        assert limit is None
    else:
        assert limit is not None and 1 <= limit <= state.remaining and limit <= state.slice


@pytest.mark.parametrize(
    ("circuit_state", "circuit"),
    [("closed", Circuit.CLOSED), ("open", Circuit.OPEN), ("half_open", Circuit.OPEN)],
)
def test_loading_the_row_starts_afresh_with_its_circuit(
    circuit_state: str, circuit: Circuit
) -> None:
    assert Isolation.loaded(circuit_state) == Isolation(circuit=circuit)


# -- a failed batch --------------------------------------------------------------


@pytest.mark.parametrize("state", STATES, ids=ids)
def test_a_failed_batch_is_measured_halved_or_is_one_event(state: Isolation) -> None:
    limit = state.batch_limit()
    after, failure = state.batch_failed()
    if limit == 1:
        assert failure is BatchFailure.EVENT
        assert after == state
    elif limit is None:
        assert failure is BatchFailure.MEASURE
        assert after == state
    else:
        assert failure is BatchFailure.HALVE
        assert after == replace(state, slice=limit // 2)
        next_limit = after.batch_limit()
        assert next_limit is not None and 1 <= next_limit < limit


@pytest.mark.parametrize(
    ("events", "remaining", "first_slice"),
    [(0, 1, 1), (1, 1, 1), (2, 2, 1), (3, 3, 1), (500, 500, 250), (501, 501, 250)],
)
def test_a_measured_batch_is_retried_from_its_first_half(
    events: int, remaining: int, first_slice: int
) -> None:
    state = Isolation().measured(events)
    assert (state.remaining, state.slice) == (remaining, first_slice)
    assert state.batch_limit() == first_slice


def test_halving_reaches_one_event_in_log2_steps() -> None:
    state = Isolation().measured(500)
    steps = 1
    while state.batch_limit() != 1:
        state, failure = state.batch_failed()
        assert failure is BatchFailure.HALVE
        steps += 1
    assert steps == math.floor(math.log2(500))
    assert state.batch_failed() == (state, BatchFailure.EVENT)


# -- a batch that applied, caught up or was paused -------------------------------


@pytest.mark.parametrize("state", STATES, ids=ids)
@pytest.mark.parametrize("count", [1, 2, 5, 100])
def test_an_applied_batch_closes_the_circuit(state: Isolation, count: int) -> None:
    after = state.applied(count)
    assert after.circuit is Circuit.CLOSED
    assert after.remaining == max(state.remaining - count, 0)
    if state.suspect is None:
        assert after.slice == state.slice
    else:
        # The failing event went through on a retry: the rest in one slice.
        assert after.suspect is None
        assert after.slice == max(after.remaining, 1)
        assert after.batch_limit() == (after.remaining or None)


@pytest.mark.parametrize("state", STATES, ids=ids)
def test_caught_up_leaves_nothing_to_isolate(state: Isolation) -> None:
    after = state.caught_up()
    assert after.circuit is Circuit.CLOSED
    assert after.remaining == 0
    assert after.batch_limit() is None
    assert after.suspect == state.suspect


@pytest.mark.parametrize("state", STATES, ids=ids)
def test_a_pause_forgets_the_suspect_only(state: Isolation) -> None:
    assert state.paused() == replace(state, suspect=None)


# -- one event that failed -------------------------------------------------------


@pytest.mark.parametrize("state", STATES, ids=ids)
@pytest.mark.parametrize("transient", [False, True])
def test_an_event_failure_counts_for_the_suspect_at_this_checkpoint(
    state: Isolation, transient: bool
) -> None:
    after = state.event_failed(HERE, transient=transient, now=NOW)
    assert replace(after, suspect=state.suspect) == state
    suspect = after.suspect
    assert suspect is not None and suspect.checkpoint == HERE
    same = state.suspect is not None and state.suspect.checkpoint == HERE
    before = state.suspect.attempts if same and state.suspect else 0
    # Transient failures say nothing about the event: never counted for it.
    assert suspect.attempts == before + (0 if transient else 1)
    if same:
        assert state.suspect is not None
        assert suspect.first_failed_at == state.suspect.first_failed_at == EARLIER
        assert (suspect.event_id, suspect.event_type) == (EVENT_ID, "T")
    else:
        assert suspect.first_failed_at == NOW
        assert (suspect.event_id, suspect.event_type) == (None, None)


def test_a_suspect_is_identified_once() -> None:
    assert not Isolation().needs_identity
    assert Isolation().identified(EVENT_ID, "T") == Isolation()
    state = Isolation().event_failed(HERE, transient=False, now=NOW)
    assert state.needs_identity
    state = state.identified(EVENT_ID, "T")
    assert not state.needs_identity
    assert state.suspect == Suspect(HERE, NOW, attempts=1, event_id=EVENT_ID, event_type="T")
    again = state.event_failed(HERE, transient=False, now=NOW + timedelta(seconds=1))
    assert not again.needs_identity


@pytest.mark.parametrize("transient", [False, True])
@pytest.mark.parametrize("attempts", [0, 1, 3, 4, 10])
@pytest.mark.parametrize("max_retries", [0, 3])
@pytest.mark.parametrize("dead_letter_queue", [True, False])
@pytest.mark.parametrize("failures", [1, 4, 20])
@pytest.mark.parametrize("circuit_state", ["closed", "open"])
@pytest.mark.parametrize("remaining", [0, 5])
def test_a_recorded_failure_is_retried_after_a_backoff_or_dead_lettered(
    transient: bool,
    attempts: int,
    max_retries: int,
    dead_letter_queue: bool,
    failures: int,
    circuit_state: str,
    remaining: int,
) -> None:
    suspect = Suspect(HERE, EARLIER, attempts=attempts)
    state = Isolation(remaining=remaining, slice=1, suspect=suspect)
    policy = RetryPolicy(max_retries=max_retries, dead_letter_queue=dead_letter_queue)
    after, verdict = state.failure_recorded(
        failures, circuit_state, transient=transient, policy=policy
    )
    # The circuit is the database's: mirrored, so an open one probes next.
    assert after == replace(state, circuit=Circuit.from_state(circuit_state))
    if circuit_state == "open":
        assert after.batch_limit() == 1
    if not transient and attempts > max_retries and dead_letter_queue:
        assert verdict == DeadLetter(suspect)
    elif transient:
        # A busy database backs off by its failures in a row.
        assert verdict == RetryLater(max(attempts, failures))
    else:
        assert verdict == RetryLater(attempts)


def test_a_recorded_failure_needs_a_suspect() -> None:
    with pytest.raises(ValueError, match="suspect"):
        Isolation().failure_recorded(1, "closed", transient=False, policy=RetryPolicy())


@pytest.mark.parametrize("state", [s for s in STATES if s.suspect is not None], ids=ids)
def test_a_dead_letter_moves_on_to_the_rest_of_the_failed_batch(state: Isolation) -> None:
    after = state.dead_lettered()
    assert after.suspect is None
    assert after.circuit is state.circuit
    assert after.remaining == max(state.remaining - 1, 0)
    assert after.slice == max(after.remaining, 1)


@pytest.mark.parametrize("state", STATES, ids=ids)
def test_a_suspect_that_is_gone_is_forgotten(state: Isolation) -> None:
    assert state.suspect_gone() == replace(state, suspect=None)


# -- the named helpers -----------------------------------------------------------


@pytest.mark.parametrize(
    ("sqlstate", "transient"),
    [
        ("40001", True),
        ("40P01", True),
        ("55P03", True),
        ("53100", True),
        ("53200", True),
        ("58030", True),
        ("22012", False),
        ("P0001", False),
        ("57014", False),
        ("23505", False),
        (None, False),
    ],
)
def test_which_sqlstates_are_failures_of_the_moment(sqlstate: str | None, transient: bool) -> None:
    assert is_momentary(sqlstate) is transient


@pytest.mark.parametrize(
    ("attempt", "base_ms", "max_ms", "ceiling"),
    [(1, 100, 10_000, 0.1), (2, 100, 10_000, 0.2), (4, 100, 10_000, 0.8), (20, 100, 500, 0.5),
     (0, 100, 10_000, 0.1), (3, 0, 0, 0.01), (1000, 100, 10_000, 10.0)],
)  # fmt: skip
def test_backoff_is_half_fixed_half_jitter(
    attempt: int, base_ms: int, max_ms: int, ceiling: float
) -> None:
    for _ in range(50):
        assert ceiling / 2 <= retry_backoff(base_ms, max_ms).delay(attempt) <= ceiling


# -- the whole path, against a fake of what the database owns --------------------


@dataclass
class FakeProjection:
    """The checkpoint row and the log: events 0..events-1, the poison ones
    failing every time. The circuit recovers at once (a half-open probe)."""

    events: int
    poison: frozenset[int]
    batch_size: int
    threshold: int
    position: int = 0
    failures: int = 0
    circuit: str = "closed"
    applied: list[int] = field(default_factory=list)
    dead: list[int] = field(default_factory=list)
    transactions: int = 0

    def project_batch(self, limit: int | None) -> int | None:
        """Events applied, or None when the batch failed (rolled back)."""
        self.transactions += 1
        size = 1 if self.circuit != "closed" else (limit or self.batch_size)
        batch = range(self.position, min(self.position + size, self.events))
        if any(event in self.poison for event in batch):
            return None
        self.applied.extend(batch)
        self.position += len(batch)
        self.failures, self.circuit = 0, "closed"
        return len(batch)

    def pending(self, limit: int) -> int:
        return min(limit, self.events - self.position)

    def record_failure(self) -> tuple[int, str]:
        self.failures += 1
        if self.circuit != "closed" or self.failures >= self.threshold:
            self.circuit = "open"
        return self.failures, self.circuit

    def dead_letter(self) -> None:
        assert self.position in self.poison, "a good event was dead-lettered"
        self.dead.append(self.position)
        self.position += 1

    @property
    def checkpoint(self) -> Checkpoint:
        return Checkpoint(1, self.position)


def run(projection: FakeProjection, policy: RetryPolicy, max_steps: int = 100_000) -> Isolation:
    """Drive the machine as ProjectionRunner does, until caught up."""
    state = Isolation.loaded(projection.circuit)
    for _ in range(max_steps):
        applied = projection.project_batch(state.batch_limit())
        if applied is not None:
            if applied:
                state = state.applied(applied)
            if projection.position == projection.events:
                return state.caught_up()
            continue
        state, failure = state.batch_failed()
        if failure is BatchFailure.MEASURE:
            state = state.measured(projection.pending(policy.batch_size))
            continue
        if failure is BatchFailure.HALVE:
            continue
        state = state.event_failed(projection.checkpoint, transient=False, now=NOW)
        failures, circuit = projection.record_failure()
        state, verdict = state.failure_recorded(failures, circuit, transient=False, policy=policy)
        if isinstance(verdict, DeadLetter):
            assert verdict.suspect.checkpoint == projection.checkpoint
            assert verdict.suspect.attempts == policy.max_retries + 1
            projection.dead_letter()
            state = state.dead_lettered()
        else:
            assert state.suspect is not None
            assert verdict == RetryLater(state.suspect.attempts)
    raise AssertionError(f"not caught up after {max_steps} batches: {state}")


@settings(max_examples=300, deadline=None)
@given(
    events=st.integers(0, 300),
    poison=st.sets(st.integers(0, 299), max_size=6),
    batch_size=st.integers(1, 128),
    max_retries=st.integers(0, 4),
    threshold=st.integers(1, 8),
)
def test_every_poison_is_dead_lettered_once_and_every_other_event_applied_once_in_order(
    events: int, poison: set[int], batch_size: int, max_retries: int, threshold: int
) -> None:
    projection = FakeProjection(
        events, frozenset(p for p in poison if p < events), batch_size, threshold
    )
    policy = RetryPolicy(batch_size=batch_size, max_retries=max_retries)
    final = run(projection, policy)
    assert projection.applied == [e for e in range(events) if e not in projection.poison]
    assert projection.dead == sorted(projection.poison)
    assert (final.circuit, final.remaining, final.suspect) == (Circuit.CLOSED, 0, None)
    assert final.batch_limit() is None
    # Each poison costs its retries and about log2 of a batch in slices,
    # not a transaction per event.
    per_poison = max_retries + 1 + 3 * (math.ceil(math.log2(batch_size)) + 2)
    assert projection.transactions <= events // batch_size + 2 + len(projection.poison) * (
        per_poison + 1
    )


def test_a_poison_event_is_found_in_a_few_slices_not_event_by_event() -> None:
    projection = FakeProjection(500, frozenset({321}), batch_size=500, threshold=100)
    run(projection, RetryPolicy(batch_size=500, max_retries=2))
    assert projection.dead == [321]
    # 1 failed batch, about log2(500) slices, 3 attempts of the event, the rest.
    assert projection.transactions <= 1 + 2 * 9 + 3 + 2


def test_without_a_dead_letter_queue_a_poison_event_is_retried_with_growing_backoff() -> None:
    projection = FakeProjection(10, frozenset({4}), batch_size=10, threshold=3)
    policy = RetryPolicy(batch_size=10, max_retries=1, dead_letter_queue=False)
    state = Isolation()
    attempts = []
    for _ in range(40):
        applied = projection.project_batch(state.batch_limit())
        if applied is not None:
            state = state.applied(applied)
            continue
        state, failure = state.batch_failed()
        if failure is BatchFailure.MEASURE:
            state = state.measured(projection.pending(policy.batch_size))
        elif failure is BatchFailure.EVENT:
            state = state.event_failed(projection.checkpoint, transient=False, now=NOW)
            failures, circuit = projection.record_failure()
            state, verdict = state.failure_recorded(
                failures, circuit, transient=False, policy=policy
            )
            assert isinstance(verdict, RetryLater)
            attempts.append(verdict.attempt)
    assert projection.applied == [0, 1, 2, 3]
    assert projection.dead == []
    assert attempts == list(range(1, len(attempts) + 1)) and len(attempts) > 10
    assert state.circuit is Circuit.OPEN and state.batch_limit() == 1


def test_transient_failures_open_the_circuit_but_never_dead_letter() -> None:
    projection = FakeProjection(3, frozenset({0}), batch_size=3, threshold=2, circuit="open")
    policy = RetryPolicy(batch_size=3, max_retries=0)
    state = Isolation.loaded(projection.circuit)  # the probe: one event
    verdicts = []
    for _ in range(5):
        assert projection.project_batch(state.batch_limit()) is None
        state, failure = state.batch_failed()
        assert failure is BatchFailure.EVENT
        state = state.event_failed(projection.checkpoint, transient=True, now=NOW)
        failures, circuit = projection.record_failure()
        state, verdict = state.failure_recorded(failures, circuit, transient=True, policy=policy)
        verdicts.append(verdict)
    assert verdicts == [RetryLater(n) for n in range(1, 6)]
    assert state.suspect is not None and state.suspect.attempts == 0
    # The database recovers: the probe applies and the circuit closes.
    projection.poison = frozenset()
    applied = projection.project_batch(state.batch_limit())
    assert applied == 1
    state = state.applied(applied)
    assert state == Isolation()
    assert state.batch_limit() is None
