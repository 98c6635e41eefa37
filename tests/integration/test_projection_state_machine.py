"""A stateful property test of the event store and a projection, against a
plain Python model.

A hypothesis state machine appends with every kind of expected version,
re-sends recorded batches, races two real connections for one version, and
runs the real projector daemon: it lets it catch up, stops, cancels or
disconnects it while events are pending, starts new ones, and rebuilds the
read model blue/green. After every step the log read back (``read_all``,
``read_stream``) must be the model's, and the read model must be exactly the
fold of a prefix of the log in commit order, the one up to its checkpoint:
nothing applied twice, nothing skipped, whatever was interrupted where.

The daemons and rebuilds run on the test's event loop while the machine
runs in a worker thread, so a daemon keeps working between steps, as it
would in production. Every example gets a database of its own, cloned from
the migrated template (tests/helpers/cloned_databases.py): events cannot be
deleted, and a projection sees the whole log, so namespacing by stream
prefix as test_properties.py does would leave each example folding (and
re-sleeping through) its predecessors' events.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import psycopg
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)
from psycopg import sql
from pytest_postgresql.executors import NoopExecutor

from aura_pg import (
    ANY,
    NO_STREAM,
    STREAM_EXISTS,
    AppendResult,
    ConcurrencyError,
    EventStore,
    ExpectedVersion,
    NewEvent,
    ProjectorDaemon,
    ProjectorSettings,
)
from aura_pg.projection.catalog import ProjectionSpec
from aura_pg.projection.rebuild import rebuild
from tests.helpers.cloned_databases import ClonedDatabases
from tests.helpers.projections import fixture_catalog
from tests.helpers.threads import run_together

T = TypeVar("T")

STREAMS = ("s0", "s1", "s2")
TYPES = ("A", "B", "C")
PROJECTIONS = ("tally_set", "tally_each")
# A slow event keeps a daemon's batch in flight for a while, so that a stop
# or a cancel lands in the middle of the work rather than after it.
SLOW_MS = 20
LOOP_TIMEOUT = 60.0
CATCH_UP_TIMEOUT = 30.0

expected_versions = st.one_of(
    st.sampled_from([ANY, NO_STREAM, STREAM_EXISTS, "current"]), st.integers(0, 6)
)
event_types = st.lists(st.sampled_from(TYPES), min_size=1, max_size=3)


@dataclass(frozen=True)
class Recorded:
    """One event as the model says the store holds it."""

    event_id: uuid.UUID
    stream_id: str
    version: int
    global_position: int
    type: str
    data: dict[str, Any]

    def applied_row(self) -> tuple[int, str, str, int]:
        """The row the tally projection writes for it."""
        return (self.global_position, self.stream_id, self.type, self.version)


Batch = tuple[str, tuple[NewEvent, ...]]


class Model:
    """What the store must hold: the log in commit order (appends are
    sequential here, so commit order is the order they returned in)."""

    def __init__(self) -> None:
        self.log: list[Recorded] = []
        self.by_key: dict[tuple[str, str], Recorded] = {}

    def version(self, stream: str) -> int:
        return sum(1 for r in self.log if r.stream_id == stream)

    def stream(self, stream: str) -> list[Recorded]:
        return [r for r in self.log if r.stream_id == stream]

    def outcome(self, stream: str, batch: Sequence[NewEvent], expected: ExpectedVersion) -> str:
        """'duplicate', 'ok' or 'conflict', by the rules of docs/event-store.md."""
        recorded = [self.by_key.get((stream, e.key)) for e in batch]
        if all(recorded):
            return "duplicate"
        # Every batch is built of fresh events and re-sent whole, so a batch
        # is either recorded entirely or not at all.
        assert not any(recorded), "the machine never mixes recorded and new events"
        current = self.version(stream)
        if expected is ANY:
            ok = True
        elif expected is NO_STREAM:
            ok = current == 0
        elif expected is STREAM_EXISTS:
            ok = current > 0
        else:
            ok = current == expected
        return "ok" if ok else "conflict"

    def record(self, stream: str, batch: Sequence[NewEvent], result: AppendResult) -> None:
        before = self.version(stream)
        assert not result.duplicate
        assert [e.version for e in result.events] == list(
            range(before + 1, before + len(batch) + 1)
        )
        assert [e.event_id for e in result.events] == [e.event_id for e in batch]
        for event, appended in zip(batch, result.events, strict=True):
            recorded = Recorded(
                event.event_id,
                stream,
                appended.version,
                appended.global_position,
                event.type,
                dict(event.data),
            )
            self.log.append(recorded)
            self.by_key[(stream, event.key)] = recorded

    def fold(self, count: int) -> dict[str, tuple[int, int]]:
        """The tally's ``streams`` table after the first ``count`` events."""
        folded: dict[str, tuple[int, int]] = {}
        for r in self.log[:count]:
            events, last = folded.get(r.stream_id, (0, 0))
            folded[r.stream_id] = (events + 1, max(last, r.version))
        return folded


@dataclass
class ReadModel:
    """One consistent snapshot (a single statement) of a projection."""

    applied: list[tuple[int, str, str, int]]
    streams: dict[str, tuple[int, int]]
    events_to_checkpoint: int
    events_applied: int
    status: str
    dead_letters: int
    last_error: str | None


@dataclass
class Daemon:
    """A real ProjectorDaemon running as a task of the test's event loop."""

    daemon: ProjectorDaemon
    stop: asyncio.Event
    task: asyncio.Task[None]


def read_model_query(schema: str) -> sql.Composed:
    return sql.SQL(
        """
        SELECT
          (SELECT coalesce(jsonb_agg(jsonb_build_array(a.global_position, a.stream_id,
                                                       a.type, a.version)
                                     ORDER BY a.global_position), '[]')
           FROM {schema}.applied_events a),
          (SELECT coalesce(jsonb_object_agg(s.stream_id,
                                            jsonb_build_array(s.events, s.last_version)), '{{}}')
           FROM {schema}.streams s),
          (SELECT count(*) FROM aura.events e
           WHERE (e.transaction_id, e.global_position) <= (c.transaction_id, c.global_position)),
          c.events_applied,
          c.status,
          (SELECT count(*) FROM aura.dead_letters d WHERE d.projection = c.name),
          c.last_error
        FROM aura.projection_checkpoints c
        WHERE c.name = %s
        """
    ).format(schema=sql.Identifier(schema))


class ProjectionMachine(RuleBasedStateMachine):
    """The store and one projection against ``Model``."""

    databases: ClassVar[ClonedDatabases]
    loop: ClassVar[asyncio.AbstractEventLoop]
    # (how the daemon was interrupted, events applied then, events in the log)
    interruptions: ClassVar[list[tuple[str, int, int]]] = []
    races: ClassVar[int] = 0

    sent = Bundle("sent")

    def __init__(self) -> None:
        super().__init__()
        self.dsn = self.databases.create()
        self.store = EventStore.connect(self.dsn, max_size=4)
        self.checks = psycopg.connect(self.dsn, autocommit=True)
        # Two connections of their own for the racing writers.
        self.racers = [psycopg.connect(self.dsn, autocommit=True) for _ in range(2)]
        self.model = Model()
        self.daemon: Daemon | None = None
        self.daemons_started = 0
        self.registered = False
        self.rebuilds = 0
        self.interrupts = 0
        self.counter = itertools.count()
        self.spec: ProjectionSpec | None = None

    # -- plumbing ---------------------------------------------------------

    def _on_loop(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        """Start a coroutine on the test's event loop."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    @staticmethod
    def _result(future: Future[T]) -> T:
        try:
            return future.result(LOOP_TIMEOUT)
        except TimeoutError:
            future.cancel()
            raise

    def _events(self, types: Sequence[str], slow_first: bool = False) -> tuple[NewEvent, ...]:
        events = []
        for i, event_type in enumerate(types):
            data: dict[str, Any] = {"n": next(self.counter)}
            if slow_first and i == 0:
                data["sleep_ms"] = SLOW_MS
            events.append(NewEvent(event_type, data))
        return tuple(events)

    def _append(self, stream: str, batch: Sequence[NewEvent], expected: ExpectedVersion) -> None:
        """Append, and check the store did what the model says it must."""
        outcome = self.model.outcome(stream, batch, expected)
        before = self.model.version(stream)
        try:
            result = self.store.append(stream, batch, expected)
        except ConcurrencyError as exc:
            assert outcome == "conflict", f"{outcome} expected, got {exc!r}"
            assert (exc.stream_id, exc.actual) == (stream, before)
            return
        if outcome == "duplicate":
            assert result.duplicate
            originals = [self.model.by_key[(stream, e.key)] for e in batch]
            assert [(e.event_id, e.version, e.global_position) for e in result.events] == [
                (r.event_id, r.version, r.global_position) for r in originals
            ]
            return
        assert outcome == "ok", f"{outcome} expected, but the append succeeded"
        self.model.record(stream, batch, result)

    def _read_model(self) -> ReadModel | None:
        """The projection's read model and checkpoint, or None before any
        daemon or rebuild registered it."""
        assert self.spec is not None
        row = self.checks.execute(
            "SELECT 1 FROM aura.projection_checkpoints WHERE name = %s", (self.spec.name,)
        ).fetchone()
        if row is None:
            assert not self.registered, "the projection's row disappeared"
            return None
        self.registered = True
        row = self.checks.execute(
            read_model_query(self.spec.read_model_schema), (self.spec.name,)
        ).fetchone()
        assert row is not None
        applied, streams, to_checkpoint, events_applied, status, dead, last_error = row
        return ReadModel(
            [tuple(a) for a in applied],
            {k: (v[0], v[1]) for k, v in streams.items()},
            to_checkpoint,
            events_applied,
            status,
            dead,
            last_error,
        )

    def _check_prefix(self, model: ReadModel) -> int:
        """The read model is exactly the fold of the log up to its
        checkpoint: the first k events in commit order, each once."""
        k = len(model.applied)
        assert k <= len(self.model.log), "the read model holds events the log does not"
        assert model.applied == [r.applied_row() for r in self.model.log[:k]], (
            "applied events are not a prefix of the log in commit order"
        )
        assert model.streams == self.model.fold(k)
        assert model.events_to_checkpoint == k, (
            f"{model.events_to_checkpoint} events up to the checkpoint, {k} applied"
        )
        assert model.events_applied == k
        assert model.dead_letters == 0
        assert model.last_error is None, model.last_error
        return k

    def _check_caught_up(self) -> None:
        """Wait for the projection to apply the whole log, then compare."""
        deadline = time.monotonic() + CATCH_UP_TIMEOUT
        while True:
            model = self._read_model()
            # Checked on the way too, so that a failing handler (an event
            # applied twice violates applied_events' key) shows at once.
            if model is not None and self._check_prefix(model) == len(self.model.log):
                break
            self._check_daemon_alive()
            assert time.monotonic() < deadline, "the projection did not catch up"
            time.sleep(0.01)
        assert model.status == "running"

    def _check_daemon_alive(self) -> None:
        if self.daemon is not None and self.daemon.task.done():
            error = self.daemon.task.exception()
            raise AssertionError(f"the daemon stopped on its own: {error!r}")

    def _start_daemon(self) -> None:
        assert self.spec is not None and self.daemon is None
        self.daemons_started += 1
        projector_settings = ProjectorSettings(
            poll_interval=0.1, shutdown_timeout=5.0, owner=f"machine-{self.daemons_started}"
        )
        spec = self.spec

        async def start() -> Daemon:
            daemon = ProjectorDaemon(self.dsn, [spec], projector_settings)
            stop = asyncio.Event()
            task = asyncio.create_task(daemon.run(stop), name=f"daemon {self.daemons_started}")
            return Daemon(daemon, stop, task)

        self.daemon = self._result(self._on_loop(start()))

    def _wait_until_owning(self) -> None:
        """Past its start-up (registration), working from its checkpoint,
        its log watcher connected."""
        assert self.daemon is not None and self.spec is not None
        runner = self.daemon.daemon.runners[self.spec.name]
        watcher = self.daemon.daemon.watcher
        assert watcher is not None
        deadline = time.monotonic() + CATCH_UP_TIMEOUT
        while not (runner.owning and watcher.connected):
            self._check_daemon_alive()
            assert time.monotonic() < deadline, "the daemon never took its projection"
            time.sleep(0.01)

    def _stop_daemon(self, how: str) -> None:
        """Stop the daemon: 'stop' lets its batch in flight commit, 'cancel'
        cancels every one of its tasks wherever they are, as if the process
        had died (the batch rolls back, its connection closes)."""
        # Past its start-up, which is not what this is about: a task
        # cancelled inside aura_pg.projection.connection.connect() leaks the connection
        # being configured (a ResourceWarning, an error under pytest here).
        self._wait_until_owning()
        assert self.daemon is not None
        daemon, self.daemon = self.daemon, None

        async def stop() -> None:
            daemon.stop.set()
            await asyncio.wait_for(daemon.task, 20)

        async def cancel() -> None:
            own = {f"projection {name}" for name in daemon.daemon.runners} | {"watcher"}
            tasks = [t for t in asyncio.all_tasks() if t.get_name() in own]
            tasks.append(daemon.task)
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=20)
            assert all(t.done() for t in tasks)
            if not daemon.task.cancelled() and daemon.task.exception() is not None:
                raise AssertionError(f"the daemon failed: {daemon.task.exception()!r}")

        self._result(self._on_loop(stop() if how == "stop" else cancel()))

    def _daemon_sessions(self) -> dict[int, str]:
        """The daemon's sessions in this database: pid -> application name."""
        rows = self.checks.execute(
            "SELECT pid, application_name FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name LIKE 'aura-pg projector %'"
        ).fetchall()
        return dict(rows)

    def _terminate_daemon_connections(self) -> None:
        """Kill the daemon's sessions server-side: its batch in flight rolls
        back and its runner must reconnect, take the lock again and resume
        from the committed checkpoint. Returns once it has."""
        assert self.daemon is not None and self.spec is not None
        runner = self.daemon.daemon.runners[self.spec.name]
        watcher = self.daemon.daemon.watcher
        assert watcher is not None
        before = (runner.reconnects, watcher.reconnects)
        names = {f"aura-pg projector {self.spec.name}", "aura-pg projector watcher"}
        rows = self.checks.execute(
            "SELECT pid, application_name, pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name LIKE 'aura-pg projector %'"
        ).fetchall()
        # (A session that just closed may still be on its way out: ignored.)
        assert names <= {name for _, name, killed in rows if killed}, rows
        killed = {pid for pid, _, _ in rows}
        # The runner and the watcher only notice at their next statement,
        # and their flags say connected until they have reconnected (or
        # rather, through their backoff, until they try): wait for new
        # sessions of both, then for the flags.
        deadline = time.monotonic() + CATCH_UP_TIMEOUT
        while True:
            fresh = {name for pid, name in self._daemon_sessions().items() if pid not in killed}
            if (
                runner.reconnects > before[0]
                and watcher.reconnects > before[1]
                and fresh >= names
                and runner.owning
                and watcher.connected
            ):
                return
            self._check_daemon_alive()
            assert time.monotonic() < deadline, "the daemon did not come back"
            time.sleep(0.01)

    # -- rules --------------------------------------------------------------

    @initialize(projection=st.sampled_from(PROJECTIONS))
    def choose_projection(self, projection: str) -> None:
        self.spec = fixture_catalog().get(projection)

    @rule(
        target=sent,
        stream=st.sampled_from(STREAMS),
        types=event_types,
        expected=expected_versions,
    )
    def append(self, stream: str, types: list[str], expected: ExpectedVersion | str) -> Batch:
        """Any expected version: the model decides whether it must succeed
        or fail with ConcurrencyError, writing nothing."""
        version: ExpectedVersion = (
            self.model.version(stream) if expected == "current" else expected  # type: ignore[assignment]
        )
        batch = self._events(types)
        self._append(stream, batch, version)
        return stream, batch

    @rule(sent=sent, expected=expected_versions, new_metadata=st.booleans())
    def resend(self, sent: Batch, expected: ExpectedVersion | str, new_metadata: bool) -> None:
        """The same events again (same ids, maybe other metadata, as a
        retry carrying a new trace): a recorded batch is a duplicate with
        its first positions whatever the expected version; one that was
        refused is a new append like any other."""
        stream, original = sent
        version: ExpectedVersion = (
            self.model.version(stream) if expected == "current" else expected  # type: ignore[assignment]
        )
        batch = [
            NewEvent(
                e.type,
                e.data,
                metadata={"retry": True} if new_metadata else None,
                event_id=e.event_id,
            )
            for e in original
        ]
        self._append(stream, batch, version)

    @rule(target=sent, stream=st.sampled_from(STREAMS), first=event_types, second=event_types)
    def race(self, stream: str, first: list[str], second: list[str]) -> Any:
        """Two connections append to one stream at the same instant with the
        same exact expected version: one wins, the other conflicts."""
        version = self.model.version(stream)
        batches = (self._events(first), self._events(second))
        outcomes = run_together(
            2,
            lambda i: self.store.append(stream, batches[i], version, conn=self.racers[i]),
        )
        won = [i for i, o in enumerate(outcomes) if isinstance(o, AppendResult)]
        assert len(won) == 1, outcomes
        winner, loser = won[0], 1 - won[0]
        error = outcomes[loser]
        assert isinstance(error, ConcurrencyError), error
        assert (error.stream_id, error.expected, error.actual) == (
            stream,
            version,
            version + len(batches[winner]),
        )
        self.model.record(stream, batches[winner], outcomes[winner])
        type(self).races += 1
        return multiple((stream, batches[0]), (stream, batches[1]))

    @precondition(lambda self: self.daemon is None)
    @rule()
    def start_daemon(self) -> None:
        self._start_daemon()

    @precondition(lambda self: self.daemon is not None)
    @rule(how=st.sampled_from(["stop", "cancel"]))
    def stop_daemon(self, how: str) -> None:
        self._stop_daemon(how)

    @rule(keep_running=st.booleans())
    def catch_up(self, keep_running: bool) -> None:
        """The daemon applies the whole log, each event exactly once."""
        if self.daemon is None:
            self._start_daemon()
        self._check_caught_up()
        if not keep_running:
            self._stop_daemon("stop")

    # At most four per example: the slowest step but the rebuild, and
    # Hypothesis sometimes runs examples of little else.
    @precondition(lambda self: self.interrupts < 4)
    @rule(
        appends=st.lists(st.tuples(st.sampled_from(STREAMS), event_types), min_size=2, max_size=5),
        how=st.sampled_from(["stop", "cancel", "terminate"]),
    )
    def interrupt_daemon(self, appends: list[tuple[str, list[str]]], how: str) -> None:
        """Events arrive while a daemon works on a slow batch; it is stopped,
        cancelled or cut off mid-way, and a new one (or the reconnected
        one) carries on. The read model stays a prefix fold throughout."""
        self.interrupts += 1
        if self.daemon is None:
            self._start_daemon()
        self._wait_until_owning()
        for i, (stream, types) in enumerate(appends):
            self._append(stream, self._events(types, slow_first=i == 0), ANY)
        if how == "terminate":
            self._terminate_daemon_connections()
        else:
            self._stop_daemon(how)
        model = self._read_model()
        applied = 0 if model is None else self._check_prefix(model)
        type(self).interruptions.append((how, applied, len(self.model.log)))
        if self.daemon is None:
            self._start_daemon()

    # One per example: a second one would also drop the first's old model,
    # which takes a third of a second here (test_projections.py does that).
    @precondition(lambda self: self.rebuilds < 1)
    @rule(meanwhile=st.lists(st.tuples(st.sampled_from(STREAMS), event_types), max_size=3))
    def rebuild(self, meanwhile: list[tuple[str, list[str]]]) -> None:
        """A blue/green rebuild, while appends go on and a daemon may run
        the live model, swaps in a model equal to the fold of the log up
        to the swap."""
        assert self.spec is not None
        self.rebuilds += 1
        before = len(self.model.log)
        future = self._on_loop(
            rebuild(self.dsn, self.spec, ProjectorSettings(wake="poll", poll_interval=0.05))
        )
        for stream, types in meanwhile:
            self._append(stream, self._events(types), ANY)
        result = self._result(future)
        assert result is not None
        assert before <= result.events_applied <= len(self.model.log)
        model = self._read_model()
        assert model is not None
        applied = self._check_prefix(model)
        if self.daemon is None:
            assert applied == result.events_applied
        else:
            assert applied >= result.events_applied

    # -- invariants -----------------------------------------------------------

    @invariant()
    def log_matches_the_model(self) -> None:
        """The global read returns the model's log, in order, each event
        once; every stream reads back as the model's, at its version."""
        expected = [
            (r.event_id, r.stream_id, r.version, r.global_position, r.type, r.data)
            for r in self.model.log
        ]
        # Gap-free reads hold back events committed after a daemon's batch
        # began until that batch ends: wait for them, briefly.
        deadline = time.monotonic() + 10
        while True:
            events = list(self.store.iter_all(batch_size=8))
            if len(events) >= len(expected) or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert [
            (e.event_id, e.stream_id, e.version, e.global_position, e.type, e.data) for e in events
        ] == expected
        positions = [e.global_position for e in events]
        assert all(a < b for a, b in itertools.pairwise(positions))
        transactions = [e.transaction_id for e in events]
        assert transactions == sorted(transactions)
        for stream in STREAMS:
            mine = self.model.stream(stream)
            read = self.store.read_stream(stream)
            assert [(e.event_id, e.version, e.global_position) for e in read] == [
                (r.event_id, r.version, r.global_position) for r in mine
            ]
            assert self.store.stream_version(stream) == len(mine)

    @invariant()
    def read_model_is_a_prefix_fold(self) -> None:
        self._check_daemon_alive()
        model = self._read_model()
        if model is not None:
            self._check_prefix(model)

    def teardown(self) -> None:
        """Stop a daemon still running, quietly: a failure of its own was
        reported by the step that saw it."""
        try:
            if self.daemon is not None:
                # A daemon stopped while its watcher is still connecting
                # cancels it there, and connect() then leaks the connection.
                with contextlib.suppress(AssertionError):
                    self._wait_until_owning()
                daemon, self.daemon = self.daemon, None

                async def shutdown() -> None:
                    daemon.stop.set()
                    await asyncio.gather(daemon.task, return_exceptions=True)

                self._result(self._on_loop(shutdown()))
        finally:
            for conn in (self.checks, *self.racers):
                conn.close()
            self.store.close()
            self.databases.drop(self.dsn)


def run_machine(machine: type[RuleBasedStateMachine], check: Callable[[], None]) -> None:
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=20,
            stateful_step_count=20,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
            # No shrinking: at a second or so per example it would run into
            # the 300 s test timeout (Hypothesis gives it 300 s) and the
            # report would be lost; 20 steps read well unshrunk.
            phases=[Phase.explicit, Phase.reuse, Phase.generate],
        ),
    )
    check()


@pytest.mark.slow
async def test_store_and_projection_follow_the_model(postgresql_template: NoopExecutor) -> None:
    ProjectionMachine.loop = asyncio.get_running_loop()
    ProjectionMachine.interruptions = []
    ProjectionMachine.races = 0

    def check_coverage() -> None:
        # The interesting cases really happened: races, and daemons
        # interrupted with events still to apply.
        assert ProjectionMachine.races > 0
        assert any(applied < total for _, applied, total in ProjectionMachine.interruptions)

    with ClonedDatabases(postgresql_template, prefix="aura_machine") as databases:
        ProjectionMachine.databases = databases
        await asyncio.to_thread(run_machine, ProjectionMachine, check_coverage)
