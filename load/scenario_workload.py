"""The writer processes of load/scenario.py: real debates through the real
repository and store, started on a schedule, and timed.

Each writer process has its own ``EventStore`` (its own connection pool)
and runs its share of the debates, up to ``in_flight`` at once on a thread
pool, each through the simulator's runner (``aura_pg.domain.simulator``:
the plan of debate ``index`` comes from ``plan_debate(seed, index, ...)``,
and within a debate the agents argue and vote at once, racing for the
debate's stream as in ``aura-pg demo``).

Pacing is by schedule: debate ``i`` is due at ``start + due_i``, whatever
happened to the debates before it. A debate starts at its due time if a
slot is free, otherwise as soon as one frees; how late it started is
recorded (the schedule lag), so a slow store shows up as latency and lag,
not as a lower offered load. No debate starts after ``start + duration``:
the ones still due by then are recorded as not started. Debates running at
that moment finish.

What is recorded, and sent to the parent about once a second:

* every ``EventStore.append`` call (the store's own round trip: one
  statement, one transaction, its commit included): when it started, how
  long it took, how many events, and whether they were appended, a
  duplicate of an earlier append (a re-send after an unknown outcome), a
  version conflict or an idempotency conflict (which the repository
  retries), or an error;
* every repository command (load the aggregate, decide, append, and reload
  and retry on conflicts): when it started, how long it took, the events it
  appended and the conflicts it retried, or that it failed;
* every debate: due, started and ended times and outcome;
* every event the store said it recorded (event id, stream, version,
  global position), for the parent to check against ``aura.events``.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event as MpEvent
from typing import Any

import psycopg

from aura_pg.domain.debate import DebateRules
from aura_pg.domain.repository import CommandResult, ConsensusResult, DebateRepository
from aura_pg.domain.simulator import DebateRunner, SimulationTally, plan_debate
from aura_pg.errors import ConcurrencyError, IdempotencyConflict
from aura_pg.models import ANY, AppendResult, ExpectedVersion, NewEvent
from aura_pg.store import EventStore
from aura_pg.store.retry import AppendRetry

# Outcomes of one EventStore.append call.
APPENDED = "appended"
DUPLICATE = "duplicate"
CONFLICT = "conflict"
IDEMPOTENCY_CONFLICT = "idempotency_conflict"
FAILED = "failed"

NOT_STARTED = "not_started"
DEBATE_ERROR = "error"

# (started at, wall clock seconds; seconds taken; events; outcome)
AppendRecord = tuple[float, float, int, str]
# (started at; seconds taken; events appended; conflicts retried; succeeded)
CommandRecord = tuple[float, float, int, int, bool]
# (debate index; due at; started at or None; ended at or None; outcome)
DebateRecord = tuple[int, float, float | None, float | None, str]
# (event id; stream id; version; global position)
EventRecord = tuple[str, str, int, int]

MAX_ERROR_MESSAGES = 20


def debate_id(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}"


@dataclass
class Chunk:
    """What one writer recorded since its previous chunk."""

    writer: int
    appends: list[AppendRecord] = field(default_factory=list)
    commands: list[CommandRecord] = field(default_factory=list)
    debates: list[DebateRecord] = field(default_factory=list)
    events: list[EventRecord] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    error_count: int = 0

    def extend(self, other: Chunk) -> None:
        self.appends += other.appends
        self.commands += other.commands
        self.debates += other.debates
        self.events += other.events
        self.errors += other.errors[: max(0, MAX_ERROR_MESSAGES - len(self.errors))]
        self.error_count += other.error_count


class Recorder:
    """The writer's records, filled by its threads, taken by the flusher."""

    def __init__(self, writer: int) -> None:
        self.writer = writer
        self._lock = threading.Lock()
        self._chunk = Chunk(writer)
        self._messages_kept = 0

    def append(self, began: float, seconds: float, events: int, outcome: str) -> None:
        record = (began, seconds, events, outcome)
        with self._lock:
            self._chunk.appends.append(record)

    def recorded(self, stream_id: str, result: AppendResult) -> None:
        rows = [(str(e.event_id), stream_id, e.version, e.global_position) for e in result.events]
        with self._lock:
            self._chunk.events += rows

    def command(
        self, began: float, seconds: float, appended: int, conflicts: int, ok: bool
    ) -> None:
        record = (began, seconds, appended, conflicts, ok)
        with self._lock:
            self._chunk.commands.append(record)

    def debate(
        self, index: int, due: float, started: float | None, ended: float | None, outcome: str
    ) -> None:
        with self._lock:
            self._chunk.debates.append((index, due, started, ended, outcome))

    def error(self, message: str) -> None:
        with self._lock:
            self._chunk.error_count += 1
            if self._messages_kept < MAX_ERROR_MESSAGES:
                self._messages_kept += 1
                self._chunk.errors.append(f"writer {self.writer}: {message}")

    def take(self) -> Chunk:
        with self._lock:
            chunk, self._chunk = self._chunk, Chunk(self.writer)
        return chunk


class TimedStore(EventStore):
    """The event store, timing each append and keeping what it recorded."""

    recorder: Recorder

    def append(
        self,
        stream_id: str,
        events: NewEvent | Iterable[NewEvent],
        expected_version: ExpectedVersion = ANY,
        *,
        conn: psycopg.Connection[Any] | None = None,
        retry: AppendRetry | None = None,
    ) -> AppendResult:
        batch = [events] if isinstance(events, NewEvent) else list(events)
        began = time.time()
        started = time.perf_counter()
        try:
            result = super().append(stream_id, batch, expected_version, conn=conn, retry=retry)
        except ConcurrencyError:
            self.recorder.append(began, time.perf_counter() - started, len(batch), CONFLICT)
            raise
        except IdempotencyConflict:
            seconds = time.perf_counter() - started
            self.recorder.append(began, seconds, len(batch), IDEMPOTENCY_CONFLICT)
            raise
        except Exception as exc:
            self.recorder.append(began, time.perf_counter() - started, len(batch), FAILED)
            self.recorder.error(f"append to {stream_id}: {exc!r}")
            raise
        seconds = time.perf_counter() - started
        outcome = DUPLICATE if result.duplicate else APPENDED
        self.recorder.append(began, seconds, len(batch), outcome)
        self.recorder.recorded(stream_id, result)
        return result


class TimedRunner(DebateRunner):
    """The simulator's debate runner, timing each repository command."""

    def __init__(
        self,
        repository: DebateRepository,
        rules: DebateRules,
        agent_pool: ThreadPoolExecutor,
        recorder: Recorder,
    ) -> None:
        super().__init__(repository, rules, SimulationTally(0, None), agent_pool)
        self.recorder = recorder

    def execute(self, command: Callable[[], CommandResult | ConsensusResult]) -> None:
        began = time.time()
        started = time.perf_counter()
        try:
            result = command()
        except Exception:
            self.recorder.command(began, time.perf_counter() - started, 0, 0, False)
            raise
        seconds = time.perf_counter() - started
        self.recorder.command(began, seconds, result.appended, result.conflicts, True)
        self.tally.record(result)


@dataclass(frozen=True)
class WriterPlan:
    """One writer process's share of a phase."""

    dsn: str
    writer: int
    writers: int
    prefix: str
    seed: int
    agents: int
    in_flight: int
    duration: float
    """Seconds after the start after which no debate starts."""
    schedule: tuple[tuple[int, float], ...] | None
    """(debate index, seconds after the start it is due), in due order;
    None: unthrottled, a new debate whenever a slot is free."""
    flush_interval: float = 1.0

    def debates(self) -> Iterator[tuple[int, float]]:
        if self.schedule is not None:
            return iter(self.schedule)
        # Unthrottled: indices of this writer's own residue class, all due now.
        return ((index, 0.0) for index in itertools.count(self.writer + 1, self.writers))


class Flusher(threading.Thread):
    """Sends the recorder's chunk to the parent every ``interval`` seconds."""

    def __init__(self, recorder: Recorder, messages: Any, interval: float) -> None:
        super().__init__(name="flusher", daemon=True)
        self.recorder = recorder
        self.messages = messages
        self.interval = interval
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.flush()

    def flush(self) -> None:
        self.messages.put(("chunk", self.recorder.take()))

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.flush()


def writer_main(
    plan: WriterPlan, messages: Any, go: MpEvent, start_at: Synchronized[float]
) -> None:
    """A writer process: connect, say ("ready", writer, pid), wait for
    ``go``, run the debates from ``start_at`` (wall clock) on, send its
    records as ("chunk", Chunk) and end with ("done", writer)."""
    recorder = Recorder(plan.writer)
    rules = DebateRules()
    try:
        store = TimedStore.connect(plan.dsn, min_size=plan.in_flight, max_size=3 * plan.in_flight)
    except Exception as exc:
        messages.put(("failed", plan.writer, f"cannot connect: {exc!r}"))
        return
    store.recorder = recorder
    with store:
        repository = DebateRepository(store)
        messages.put(("ready", plan.writer, os.getpid()))
        go.wait()
        start = float(start_at.value)
        flusher = Flusher(recorder, messages, plan.flush_interval)
        flusher.start()
        try:
            _run_debates(plan, repository, rules, recorder, start)
        finally:
            flusher.stop()
    messages.put(("done", plan.writer))


def _run_debates(
    plan: WriterPlan,
    repository: DebateRepository,
    rules: DebateRules,
    recorder: Recorder,
    start: float,
) -> None:
    deadline = start + plan.duration
    slots = threading.BoundedSemaphore(plan.in_flight)

    def run_one(runner: TimedRunner, index: int, due: float) -> None:
        started = time.time()
        identifier = debate_id(plan.prefix, index)
        try:
            result = runner.run(plan_debate(plan.seed, index, plan.agents, rules), identifier)
            outcome: str = result.outcome
        except Exception as exc:
            outcome = DEBATE_ERROR
            recorder.error(f"debate {identifier}: {exc!r}")
        finally:
            slots.release()
        recorder.debate(index, due, started, time.time(), outcome)

    # The agent pool is entered first so that it shuts down last: the
    # debates still running at the end need it until they finish.
    with (
        ThreadPoolExecutor(2 * plan.in_flight, thread_name_prefix="agent") as agent_pool,
        ThreadPoolExecutor(plan.in_flight, thread_name_prefix="debate") as debate_pool,
    ):
        runner = TimedRunner(repository, rules, agent_pool, recorder)
        debates = plan.debates()
        for index, offset in debates:
            due = start + offset
            if due >= deadline:
                break
            pause = due - time.time()
            if pause > 0:
                time.sleep(pause)  # pacing: wait for the debate's due time
            # A free slot, but not past the deadline: a debate that cannot
            # start in time is offered load the writers could not take.
            if not slots.acquire(timeout=max(deadline - time.time(), 0.0)):
                if plan.schedule is None:
                    break  # unthrottled: nothing was due
                recorder.debate(index, due, None, None, NOT_STARTED)
                for late_index, late_offset in debates:
                    if start + late_offset >= deadline:
                        break
                    recorder.debate(late_index, start + late_offset, None, None, NOT_STARTED)
                break
            if plan.schedule is None:
                due = time.time()  # unthrottled: due when a slot frees
            debate_pool.submit(run_one, runner, index, due)
