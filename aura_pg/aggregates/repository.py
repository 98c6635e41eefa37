"""Repositories: load an aggregate, run a command on it, append its events.

A command runs against the aggregate as loaded; its events are appended
with the loaded version as the expected version. When another writer got
there first (``ConcurrencyError``) the repository reads the events it
missed and runs the command again, so the invariants are always checked
against the latest state and no update is lost. Attempts are bounded;
between them it sleeps a small jittered, growing delay so racing writers
spread out.

An append that fails transiently (a lost connection, a restarting server:
its outcome is unknown) is sent again unchanged by the store
(``RetryPolicy.append_retry``): the very same events, so a batch that did
commit comes back as a duplicate instead of a second effect. Reads are
retried through the same transient failures (they change nothing).

Snapshots: an aggregate class with ``snapshot_every = N`` is stored in
``aura.snapshots`` each time a command takes its stream past a multiple of
N, and loaded from the newest one plus the events after it. A snapshot of
another class or ``snapshot_version``, or one that cannot be restored, is
ignored (with a warning for the latter) and replaced by the next one;
writing one never fails or blocks a command (a failure costs only speed).

A repository given ``conn=`` works inside that connection's open
transaction (a Python processor's handler, a unit of work of the
caller's): reads, appends and snapshots all run there and commit or roll
back with it. Each append runs in a savepoint, so a conflict that the
repository retries leaves the transaction usable; nothing is resent (the
transaction's owner decides what happens after a failure), and a
``StreamOrderConflict`` (this transaction wrote before, and a later one
appended to the stream since) is raised, for the owner to run the
transaction again.

The logic is written once, as a generator of steps (read, append, sleep,
snapshot) that ``Repository`` runs with an ``EventStore`` and
``AsyncRepository`` with an ``AsyncEventStore``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

import psycopg
from psycopg.types.json import Jsonb

from aura_pg._resources import named_queries
from aura_pg._runtime import Backoff
from aura_pg.aggregates.aggregate import Aggregate
from aura_pg.errors import ConcurrencyError, IdempotencyConflict, StreamOrderConflict
from aura_pg.models import AppendResult, NewEvent, RecordedEvent
from aura_pg.store import AsyncEventStore, EventStore
from aura_pg.store.retry import AppendRetry

log = logging.getLogger("aura_pg.aggregates")

A = TypeVar("A", bound=Aggregate)
T = TypeVar("T")

_DEFAULT_APPEND_RETRY = AppendRetry()  # 8 attempts within 30 seconds


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently a command is retried.

    Two kinds of retry, kept apart: a version or idempotency conflict reruns
    the command on the reloaded aggregate (``max_attempts``, ``base_delay``,
    ``max_delay``); a transient failure of the append sends the identical
    batch again (``append_retry``), and one of a read reads again.
    """

    max_attempts: int = 30
    """Runs of the command on conflicts, the first included."""
    base_delay: float = 0.001
    max_delay: float = 0.05
    unknown_outcome_resends: int | None = None
    """Deprecated: use ``append_retry=AppendRetry(attempts=n + 1)``. When
    given, ``append_retry`` (``AppendRetry()`` if None) is taken with
    ``attempts = n + 1``, and a ``DeprecationWarning`` is issued."""
    append_retry: AppendRetry | None = field(default=_DEFAULT_APPEND_RETRY, kw_only=True)
    """How the store sends one batch again after a transient failure (a lost
    connection, a server shutting down or starting up, too many
    connections, a pool timeout, a deadlock or serialization failure), each
    resend counted in ``aura_append_retries_total{reason}``; other errors
    are raised at once. None: never resend (nor read again)."""
    _conflict_backoff: Backoff = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Full jitter: racing writers that conflicted together spread over
        # the whole interval. The first conflict waits up to 2 * base_delay.
        try:
            backoff = Backoff(self.base_delay, self.max_delay, jitter=1.0)
        except ValueError:
            raise ValueError(
                "RetryPolicy needs 0 < base_delay <= max_delay, "
                f"not {self.base_delay!r} and {self.max_delay!r}"
            ) from None
        object.__setattr__(self, "_conflict_backoff", backoff)
        retry = self.append_retry
        if retry is not None and not isinstance(retry, AppendRetry):
            raise TypeError(f"append_retry must be an AppendRetry or None, not {retry!r}")
        resends = self.unknown_outcome_resends
        if resends is None:
            return
        warnings.warn(
            "RetryPolicy.unknown_outcome_resends is deprecated: use "
            f"append_retry=AppendRetry(attempts={resends!r} + 1)",
            DeprecationWarning,
            stacklevel=3,
        )
        if isinstance(resends, bool) or not isinstance(resends, int) or resends < 0:
            raise ValueError(f"unknown_outcome_resends must be an int >= 0, not {resends!r}")
        base = retry if retry is not None else AppendRetry()
        object.__setattr__(self, "append_retry", replace(base, attempts=resends + 1))

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, min(max_delay, base_delay * 2**attempt)]."""
        return self._conflict_backoff.delay(attempt + 1, rng)


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What a command appended."""

    stream_id: str
    events: tuple[NewEvent, ...]
    """The events appended; empty when the command had nothing to do."""
    version: int
    """The stream's version after them."""
    duplicate: bool
    """The batch had been recorded before, with this content: by an attempt
    whose reply was lost (the resend found it), or by an identical command
    racing this one."""
    conflicts: int
    """Concurrency conflicts retried before the command went through."""

    @property
    def appended(self) -> int:
        """Events newly written by this command."""
        return 0 if self.duplicate else len(self.events)


# -- the steps the logic asks its driver for --------------------------------------


@dataclass(frozen=True, slots=True)
class _Read:
    stream_id: str
    from_version: int


@dataclass(frozen=True, slots=True)
class _Append:
    stream_id: str
    events: tuple[NewEvent, ...]
    expected_version: int


@dataclass(frozen=True, slots=True)
class _Sleep:
    seconds: float


@dataclass(frozen=True, slots=True)
class _LoadSnapshot:
    stream_id: str


@dataclass(frozen=True, slots=True)
class _SaveSnapshot:
    params: dict[str, Any]


_Step = _Read | _Append | _Sleep | _LoadSnapshot | _SaveSnapshot
_Operation = Generator[_Step, Any, T]
Command = Callable[[A], Sequence[NewEvent]]


def _restored(kind: type[A], aggregate_id: str, row: tuple[Any, ...] | None) -> A | None:
    """The aggregate from its snapshot row, or None: no row, a row of
    another class or shape (replaced at the next snapshot), or one that
    cannot be restored (a warning: it is ignored, not misread)."""
    if row is None:
        return None
    aggregate_type, schema_version, version, state = row
    if aggregate_type != kind.type_name() or schema_version != kind.snapshot_version:
        return None
    try:
        aggregate = kind.restore_snapshot(aggregate_id, int(version), state)
        if not isinstance(aggregate, kind) or aggregate.version != version:
            raise ValueError(f"restored at version {aggregate.version}, not {version}")
    except Exception as exc:
        log.warning(
            "snapshot of %s v%s (%s) cannot be restored, ignored: %s",
            kind.stream_id(aggregate_id),
            version,
            aggregate_type,
            exc,
        )
        return None
    return aggregate


def _load(kind: type[A], aggregate_id: str, snapshots: bool) -> _Operation[A]:
    stream_id = kind.stream_id(aggregate_id)
    aggregate: A | None = None
    if snapshots and kind.snapshot_every is not None:
        aggregate = _restored(kind, aggregate_id, (yield _LoadSnapshot(stream_id)))
    if aggregate is None:
        aggregate = kind(aggregate_id)
    aggregate.apply_all((yield _Read(stream_id, aggregate.version + 1)))
    return aggregate


def _execute(
    kind: type[A],
    aggregate_id: str,
    command: Command[A],
    retry: RetryPolicy,
    rng: random.Random,
    snapshots: bool,
) -> _Operation[CommandResult]:
    stream_id = kind.stream_id(aggregate_id)
    aggregate = yield from _load(kind, aggregate_id, snapshots)
    conflicts = 0
    attempt = 0
    idempotency_conflict_at: int | None = None
    while True:
        attempt += 1
        events = tuple(command(aggregate))
        if not events:
            return CommandResult(stream_id, (), aggregate.version, False, conflicts)
        try:
            appended: AppendResult = yield _Append(stream_id, events, aggregate.version)
        except StreamOrderConflict:
            raise  # a rerun in this transaction cannot cure it
        except (ConcurrencyError, IdempotencyConflict) as exc:
            # An idempotency conflict means another writer recorded an event
            # under one of these keys with other content: the reload shows
            # it, so retry as for a version conflict, unless the state had
            # not moved since the last such conflict.
            if isinstance(exc, IdempotencyConflict):
                if idempotency_conflict_at == aggregate.version:
                    raise
                idempotency_conflict_at = aggregate.version
            if attempt >= retry.max_attempts:
                raise
            conflicts += 1
            yield _Sleep(retry.delay(attempt, rng))
            aggregate.apply_all((yield _Read(stream_id, aggregate.version + 1)))
            continue
        every = kind.snapshot_every
        if (
            snapshots
            and every is not None
            and appended.version // every > aggregate.version // every
        ):
            yield from _snapshot(aggregate, appended.version)
        return CommandResult(stream_id, events, appended.version, appended.duplicate, conflicts)


def _snapshot(aggregate: Aggregate, version: int) -> _Operation[None]:
    """Store the aggregate at ``version`` (its events read back); a failure
    is logged, never raised: a snapshot is a cache."""
    kind = type(aggregate)
    stream_id = kind.stream_id(aggregate.id)
    try:
        aggregate.apply_all((yield _Read(stream_id, aggregate.version + 1)))
        yield _SaveSnapshot(
            {
                "stream_id": stream_id,
                "aggregate_type": kind.type_name(),
                "schema_version": kind.snapshot_version,
                "version": aggregate.version,
                "state": Jsonb(aggregate.snapshot_state()),
            }
        )
    except Exception as exc:
        log.warning("snapshot of %s v%s not taken: %s", stream_id, version, exc)


def _snapshot_queries() -> dict[str, Any]:
    return named_queries("queries/snapshots.sql")


class Repository(Generic[A]):
    """Aggregates of one class over an ``EventStore``."""

    def __init__(
        self,
        store: EventStore,
        aggregate: type[A],
        *,
        retry: RetryPolicy | None = None,
        snapshots: bool = True,
        rng: random.Random | None = None,
        sleep: Callable[[float], None] = time.sleep,
        conn: psycopg.Connection[Any] | None = None,
    ) -> None:
        """``snapshots=False``: neither read nor write them (for a class
        with ``snapshot_every``). ``conn``: work in its open transaction
        (the store then needs no pool)."""
        self.store = store
        self.aggregate = aggregate
        self.retry = retry or RetryPolicy()
        self.snapshots = snapshots
        self.conn = conn
        self._rng = rng or random.Random()
        self._sleep = sleep

    def load(self, aggregate_id: str) -> A:
        """The aggregate as its stream now stands (version 0 if it has no events)."""
        return self._run(_load(self.aggregate, aggregate_id, self.snapshots))

    def execute(self, aggregate_id: str, command: Command[A]) -> CommandResult:
        """Run ``command`` on the latest state and append what it returns.

        ``command`` may run several times (once per conflict) and must
        depend on nothing but the aggregate and its own arguments. It raises
        to refuse (a domain error); that is never retried.
        """
        return self._run(
            _execute(self.aggregate, aggregate_id, command, self.retry, self._rng, self.snapshots)
        )

    def _run(self, operation: _Operation[T]) -> T:
        step = next(operation)
        while True:
            try:
                answer = self._do(step)
            except Exception as exc:
                try:
                    step = operation.throw(exc)
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]
                continue
            try:
                step = operation.send(answer)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]

    def _do(self, step: _Step) -> Any:
        if isinstance(step, _Read):
            return self._read(step)
        if isinstance(step, _Append):
            return self._append(step)
        if isinstance(step, _Sleep):
            self._sleep(step.seconds)
            return None
        with self._connection() as conn:
            if isinstance(step, _LoadSnapshot):
                return conn.execute(
                    _snapshot_queries()["load"], {"stream_id": step.stream_id}
                ).fetchone()
            with conn.transaction():  # a savepoint in a caller's transaction
                conn.execute(_snapshot_queries()["save"], step.params)
            return None

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        if self.conn is not None:
            yield self.conn
            return
        pool = self.store.pool
        if pool is None:
            raise ValueError("a repository needs a store with a pool, or conn=")
        with pool.connection() as conn:
            yield conn

    def _append(self, step: _Append) -> AppendResult:
        if self.conn is None:
            return self.store.append(
                step.stream_id, step.events, step.expected_version, retry=self.retry.append_retry
            )
        with self.conn.transaction():
            return self.store.append(
                step.stream_id, step.events, step.expected_version, conn=self.conn
            )

    def _read(self, step: _Read) -> list[RecordedEvent]:
        if self.conn is not None:
            return self.store.read_stream(
                step.stream_id, from_version=step.from_version, conn=self.conn
            )
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                return self.store.read_stream(step.stream_id, from_version=step.from_version)
            except psycopg.Error as exc:
                delay = _read_again_in(self.retry, exc, attempt, started)
                if delay is None:
                    raise
                self._sleep(delay)


class AsyncRepository(Generic[A]):
    """Aggregates of one class over an ``AsyncEventStore``: the same logic
    as ``Repository``."""

    def __init__(
        self,
        store: AsyncEventStore,
        aggregate: type[A],
        *,
        retry: RetryPolicy | None = None,
        snapshots: bool = True,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        conn: psycopg.AsyncConnection[Any] | None = None,
    ) -> None:
        self.store = store
        self.aggregate = aggregate
        self.retry = retry or RetryPolicy()
        self.snapshots = snapshots
        self.conn = conn
        self._rng = rng or random.Random()
        self._sleep = sleep

    async def load(self, aggregate_id: str) -> A:
        return await self._run(_load(self.aggregate, aggregate_id, self.snapshots))

    async def execute(self, aggregate_id: str, command: Command[A]) -> CommandResult:
        return await self._run(
            _execute(self.aggregate, aggregate_id, command, self.retry, self._rng, self.snapshots)
        )

    async def _run(self, operation: _Operation[T]) -> T:
        step = next(operation)
        while True:
            try:
                answer = await self._do(step)
            except Exception as exc:
                try:
                    step = operation.throw(exc)
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]
                continue
            try:
                step = operation.send(answer)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]

    async def _do(self, step: _Step) -> Any:
        if isinstance(step, _Read):
            return await self._read(step)
        if isinstance(step, _Append):
            return await self._append(step)
        if isinstance(step, _Sleep):
            await self._sleep(step.seconds)
            return None
        async with self._connection() as conn:
            if isinstance(step, _LoadSnapshot):
                cur = await conn.execute(_snapshot_queries()["load"], {"stream_id": step.stream_id})
                return await cur.fetchone()
            async with conn.transaction():  # a savepoint in a caller's transaction
                await conn.execute(_snapshot_queries()["save"], step.params)
            return None

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        if self.conn is not None:
            yield self.conn
            return
        pool = self.store.pool
        if pool is None:
            raise ValueError("a repository needs a store with a pool, or conn=")
        async with pool.connection() as conn:
            yield conn

    async def _append(self, step: _Append) -> AppendResult:
        if self.conn is None:
            return await self.store.append(
                step.stream_id, step.events, step.expected_version, retry=self.retry.append_retry
            )
        async with self.conn.transaction():
            return await self.store.append(
                step.stream_id, step.events, step.expected_version, conn=self.conn
            )

    async def _read(self, step: _Read) -> list[RecordedEvent]:
        if self.conn is not None:
            return await self.store.read_stream(
                step.stream_id, from_version=step.from_version, conn=self.conn
            )
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self.store.read_stream(step.stream_id, from_version=step.from_version)
            except psycopg.Error as exc:
                delay = _read_again_in(self.retry, exc, attempt, started)
                if delay is None:
                    raise
                await self._sleep(delay)


def _read_again_in(
    retry: RetryPolicy, exc: BaseException, attempt: int, started: float
) -> float | None:
    """The wait before reading again after a transient failure (the append
    retry's attempts, delays and budget), or None: raise it."""
    if retry.append_retry is None:
        return None
    delay = retry.append_retry.next_delay(exc, attempt, time.monotonic() - started)
    if delay is not None:
        log.warning("read failed (%s); reading again in %.2fs", exc, delay)
    return delay
