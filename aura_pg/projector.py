"""The projector daemon: runs catalog projections, each owned by one daemon.

One asyncio process runs many projections. Each projection gets a runner
with its own connection, which holds the projection's advisory lock (the
ownership: when the process dies, Postgres releases it and another daemon
takes over) and sends ``aura.project_batch``, which applies a batch and
advances the checkpoint in one statement, hence one transaction, with a
compare-and-set on the checkpoint.

How runners learn there is work (``ProjectorSettings.wake``):

* ``watch`` (the default): one log-watcher connection per daemon reads the
  read horizon every ``watch_interval`` seconds (10 ms) and wakes the runners
  that are behind it. After ``watch_hold`` (1 s) without movement it slows
  down to ``watch_idle_interval`` (50 ms), and returns to full speed at the
  first movement. Appends pay nothing for it, unlike NOTIFY, whose
  cluster-wide lock makes notifying commits take turns.
* ``listen``: a listener connection wakes the runners on ``NOTIFY
  aura_events``, sent by appends in sessions that ``SET aura.notify = on``.
* ``poll``: neither.

Each runner also polls every ``poll_interval`` (1 s), so a lost wake-up, a
dropped watcher or listener, or a pooler in between delays it by one poll
interval at most.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import enum
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, LiteralString, get_args

import psycopg

from aura_pg._resources import named_queries
from aura_pg.catalog import ProjectionSpec
from aura_pg.errors import CatalogError, ProjectionError, StaleCheckpoint, UnknownProjection
from aura_pg.observability import metrics, tracing
from aura_pg.observability.logging import bind
from aura_pg.store.retry import transient_reason

log = logging.getLogger("aura_pg.projector")

NOTIFY_CHANNEL = "aura_events"

WakeSource = Literal["watch", "listen", "poll"]
WAKE_SOURCES: tuple[WakeSource, ...] = get_args(WakeSource)


def _queries() -> dict[str, LiteralString]:
    return named_queries("queries/projector.sql")


def default_owner() -> str:
    """How this process names itself in checkpoint rows: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class ProjectorSettings:
    poll_interval: float = 1.0
    wake: WakeSource = "watch"
    # The log watcher reads the horizon every watch_interval while the log
    # moves and for watch_hold seconds after it last moved (bursts with
    # short pauses keep the fast tick), then slows down, each quiet tick 1.5
    # times the last, to watch_idle_interval: the most an event appended
    # after a long quiet spell waits for its wake-up.
    watch_interval: float = 0.01
    watch_idle_interval: float = 0.05
    watch_hold: float = 1.0
    shutdown_timeout: float = 30.0
    owner: str = field(default_factory=default_owner)
    statement_timeout_ms: int = 60_000
    lock_timeout_ms: int = 10_000
    reconnect_max_delay: float = 10.0
    # How often the listener proves its connection alive when no
    # notification comes.
    listen_keepalive: float = 5.0
    # False: batches commit without waiting for their WAL flush. Safe for
    # correctness (a batch and its checkpoint are lost together in a crash
    # and applied again), and it spares a flush per batch.
    synchronous_commit: bool = True
    # How often a daemon looks for new shadows of its projections
    # (aura_pg.shadows) to run beside them.
    shadow_discovery_interval: float = 5.0

    def __post_init__(self) -> None:
        if not self.poll_interval > 0:
            raise ValueError(f"poll_interval must be > 0, not {self.poll_interval!r}")
        if not self.shutdown_timeout > 0:
            raise ValueError(f"shutdown_timeout must be > 0, not {self.shutdown_timeout!r}")
        if self.wake not in WAKE_SOURCES:
            raise ValueError(f"wake must be one of {', '.join(WAKE_SOURCES)}, not {self.wake!r}")
        if not self.watch_hold >= 0:
            raise ValueError(f"watch_hold must be >= 0, not {self.watch_hold!r}")
        if not 0 < self.watch_interval <= self.watch_idle_interval:
            raise ValueError(
                "need 0 < watch_interval <= watch_idle_interval, not "
                f"{self.watch_interval!r} and {self.watch_idle_interval!r}"
            )


@dataclass(frozen=True)
class BatchResult:
    applied: int
    transaction_id: str
    position: int
    caught_up: bool
    status: str
    # The applied events counted by type (None when nothing was applied).
    type_names: list[str] | None = None
    type_counts: list[int] | None = None
    # Their seconds from append to the end of the batch, as histogram
    # buckets (index into LATENCY_BUCKETS + [inf]) with counts, and the sum.
    end_to_end_buckets: list[int] | None = None
    end_to_end_counts: list[int] | None = None
    end_to_end_seconds: float | None = None
    # Only when traced: the applied events (the lists in the same order).
    event_ids: list[uuid.UUID] | None = None
    event_types: list[str] | None = None
    stream_ids: list[str] | None = None
    versions: list[int] | None = None
    traceparents: list[str | None] | None = None

    def counts_by_type(self) -> dict[str, int]:
        return dict(zip(self.type_names or (), self.type_counts or (), strict=True))

    def end_to_end(self) -> metrics.BucketCounts:
        return metrics.BucketCounts(
            dict(zip(self.end_to_end_buckets or (), self.end_to_end_counts or (), strict=True)),
            self.end_to_end_seconds or 0.0,
        )

    def traced_events(self) -> list[tuple[uuid.UUID, str, str, int, str | None]]:
        if not self.event_ids:
            return []
        return list(
            zip(
                self.event_ids,
                self.event_types or (),
                self.stream_ids or (),
                self.versions or (),
                self.traceparents or (),
                strict=True,
            )
        )


class StepOutcome(enum.Enum):
    BUSY = "busy"  # more to do now
    IDLE = "idle"  # caught up, paused or circuit open: wait for a wake-up
    FINISHED = "finished"  # the runner's work is over (a rebuild swapped in)


def translate_projection_error(exc: psycopg.Error) -> Exception | None:
    """The typed error for the projection functions' own SQLSTATEs."""
    message = (exc.diag.message_primary if exc.diag else None) or str(exc)
    if exc.sqlstate == "AU005":
        return UnknownProjection(message)
    if exc.sqlstate == "AU006":
        return StaleCheckpoint(message)
    if exc.sqlstate == "AU007":
        return ProjectionError(message)
    return None


def backoff_delay(attempt: int, base_ms: int, max_ms: int) -> float:
    """Exponential backoff with jitter, in seconds: half fixed, half random,
    so retrying daemons spread out but never retry at once."""
    ceiling = min(max_ms, base_ms * (1 << min(max(attempt - 1, 0), 30))) / 1000.0
    # Never retry in a tight loop, whatever the catalog says.
    ceiling = max(ceiling, 0.01)
    return ceiling / 2 + random.uniform(0, ceiling / 2)


async def connect(
    dsn: str, settings: ProjectorSettings, purpose: str
) -> psycopg.AsyncConnection[Any]:
    """An autocommit connection with the daemon's timeouts and keepalives.

    Keepalives on both ends make a vanished peer (host crash, partition)
    show within about half a minute: the daemon reconnects, and the server
    ends the dead daemon's session, which releases its projection locks so
    a stand-by can take over.
    """
    conn = await psycopg.AsyncConnection.connect(
        dsn,
        autocommit=True,
        application_name=f"aura-pg {purpose}"[:63],
        keepalives=1,
        keepalives_idle=10,
        keepalives_interval=5,
        keepalives_count=3,
    )
    conn.add_notice_handler(_log_notice)
    try:
        await conn.execute(
            _queries()["session_settings"],
            {
                "statement_timeout": str(settings.statement_timeout_ms),
                "lock_timeout": str(settings.lock_timeout_ms),
                "synchronous_commit": "on" if settings.synchronous_commit else "off",
            },
        )
    except BaseException:  # failed or cancelled half-way: not left open
        await conn.close()
        raise
    return conn


def _log_notice(diagnostic: psycopg.errors.Diagnostic) -> None:
    """Server notices and warnings (from projection definitions, rebuilds)
    go to the daemon's log instead of being dropped."""
    severity = diagnostic.severity_nonlocalized or diagnostic.severity or "NOTICE"
    level = logging.WARNING if severity == "WARNING" else logging.INFO
    log.log(level, "postgres %s: %s", severity, diagnostic.message_primary)


async def _wait(stop: asyncio.Event, wake: asyncio.Event | None, timeout: float) -> None:
    """Sleep until ``timeout`` passes, ``stop`` is set or ``wake`` fires."""
    waiters = [asyncio.ensure_future(stop.wait())]
    if wake is not None:
        waiters.append(asyncio.ensure_future(wake.wait()))
    try:
        await asyncio.wait(waiters, timeout=max(timeout, 0.0), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    if wake is not None:
        wake.clear()


def _spec_params(spec: ProjectionSpec) -> dict[str, Any]:
    policy = spec.error_handling
    return {
        "name": spec.name,
        "description": spec.description,
        "schema": spec.read_model_schema,
        "handler": spec.handler,
        "handler_kind": spec.handler_kind,
        "event_types": list(spec.source_events) if spec.source_events is not None else None,
        "forget_handler": spec.forget_handler,
        "definition_sql": spec.definition_sql,
        "batch_size": spec.batch_size,
        "max_retries": policy.max_retries,
        "retry_base_ms": policy.retry_base_ms,
        "retry_max_ms": policy.retry_max_ms,
        "circuit_failure_threshold": policy.circuit_breaker.failure_threshold,
        "circuit_recovery_seconds": policy.circuit_breaker.recovery_timeout_seconds,
    }


def shadow_params(live: str, spec: ProjectionSpec) -> dict[str, Any]:
    """The parameters of aura.begin_shadow for ``spec`` as ``live``'s next
    version (queries/shadows.sql "begin_shadow")."""
    return {
        "name": live,
        "definition_sql": spec.definition_sql,
        "handler": spec.handler,
        "handler_kind": spec.handler_kind,
        "event_types": list(spec.source_events) if spec.source_events is not None else None,
        "forget_handler": spec.forget_handler,
    }


async def register_projections(
    conn: psycopg.AsyncConnection[Any], specs: Sequence[ProjectionSpec]
) -> dict[str, str]:
    """Install or update the catalog entries in the database.

    Returns, per projection, 'created', 'unchanged' or 'changed' (a changed
    definition waits for a rebuild). A definition that fails to install is
    a CatalogError naming the projection.
    """
    outcomes: dict[str, str] = {}
    # Live entries first: a shadow entry (shadow_of) becomes the shadow of
    # one (aura.begin_shadow), under the name NAME__shadow.
    for spec in sorted(specs, key=lambda spec: spec.shadow_of is not None):
        try:
            async with conn.transaction():
                if spec.shadow_of is not None:
                    cur = await conn.execute(
                        named_queries("queries/shadows.sql")["begin_shadow"],
                        shadow_params(spec.shadow_of, spec),
                    )
                else:
                    cur = await conn.execute(_queries()["register"], _spec_params(spec))
                row = await cur.fetchone()
        except psycopg.OperationalError:
            raise
        except psycopg.Error as exc:
            detail = (exc.diag.message_primary if exc.diag else None) or str(exc)
            raise CatalogError(
                f"projection {spec.name!r}: installing {spec.sql} failed: {detail}"
            ) from None
        outcome = str(row[0]) if row else "unchanged"
        outcomes[spec.name if spec.shadow_of is None else f"{spec.shadow_of}__shadow"] = outcome
        if outcome == "changed":
            log.warning(
                "projection %s: its definition changed; the live read model keeps the old one "
                "until `aura-pg projections rebuild %s` swaps the new one in",
                spec.name,
                spec.name,
            )
    return outcomes


async def check_log_origin(conn: psycopg.AsyncConnection[Any]) -> None:
    """Refuse to project a log restored from another cluster whose
    transaction ids run ahead of this one's: gap-free reads would hide the
    restored events and order new ones before the checkpoints."""
    cur = await conn.execute(_queries()["log_origin"])
    row = await cur.fetchone()
    if row is not None and row[2]:
        raise ProjectionError(
            f"aura.events holds transaction ids up to {row[0]}, but this cluster's next "
            f"transaction id is {row[1]}: the log was restored from another cluster. Advance "
            "the transaction id counter past it (pg_resetwal -x, with -e if the source's ids had "
            "wrapped, while stopped) before appending or projecting; see docs/event-store.md"
        )


@dataclass
class _PoisonCandidate:
    transaction_id: str
    position: int
    attempts: int = 0
    first_failed_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    event_id: uuid.UUID | None = None
    event_type: str | None = None


async def is_connection_failure(exc: psycopg.Error, conn: psycopg.AsyncConnection[Any]) -> bool:
    """Whether ``exc`` means the connection is gone (reconnect), as opposed
    to a failure of the statement (the handler's, a timeout, a deadlock:
    handled as a failed batch). psycopg files both under OperationalError.
    A connection-class SQLSTATE on a connection that still answers came from
    inside the statement (a handler using dblink, say): a failed batch."""
    if conn.closed or conn.broken:
        return True
    state = exc.sqlstate
    if state is None:
        return isinstance(exc, psycopg.OperationalError)
    # 08: connection exceptions; 57P01-57P03: admin shutdown, crash
    # shutdown, cannot connect now.
    if not (state.startswith("08") or state in ("57P01", "57P02", "57P03")):
        return False
    try:
        await conn.execute("SELECT 1")
    except psycopg.Error:
        return True
    return False


# Failures of the moment, not of the event: lock and serialization conflicts,
# deadlocks, resource shortages (disk full, out of memory), system errors.
# They are retried with backoff and count for the circuit breaker, but never
# toward an event's retries: a busy database does not dead-letter good events.
TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "55P03"})
TRANSIENT_SQLSTATE_CLASSES = ("53", "58")


def is_transient(sqlstate: str | None) -> bool:
    return sqlstate is not None and (
        sqlstate in TRANSIENT_SQLSTATES or sqlstate.startswith(TRANSIENT_SQLSTATE_CLASSES)
    )


class _ConnectionLost(Exception):
    """Internal: the runner's connection is unusable; reconnect."""


class ProjectionReplaced(ProjectionError):
    """A runner pinned to one generation of its projection (a rebuild's, by
    the process that began it) found another: the projection was restarted
    with another definition, reset or swapped. Nothing of the old one was
    applied to the new one; the runner stops."""


class ProjectionRunner:
    """Runs one projection (or a rebuild's shadow) while it owns it."""

    # How often an idle runner re-reads its settings (batch size, retries)
    # from the database, where `projections register` may have changed them.
    SETTINGS_REFRESH_SECONDS = 5.0

    def __init__(
        self,
        dsn: str,
        name: str,
        settings: ProjectorSettings,
        *,
        dead_letter_queue: bool = True,
        on_caught_up: Callable[[psycopg.AsyncConnection[Any]], Awaitable[bool]] | None = None,
        generation: int | None = None,
    ) -> None:
        """``generation``: run only that generation of the projection (a
        rebuild began by this process); ProjectionReplaced when it is gone.
        Without it the runner follows the projection through restarts,
        resets and swaps, reloading at each."""
        self.dsn = dsn
        self.name = name
        self.settings = settings
        self.dead_letter_queue = dead_letter_queue
        self.on_caught_up = on_caught_up
        self.wake = asyncio.Event()
        self.owning = False
        self.finished = False
        self.events_applied = 0
        self.batches = 0
        self.dead_lettered = 0
        self.reconnects = 0
        self.transaction_id = "0"
        self.position = 0
        # Sent with the checkpoint: generations never repeat, so a batch,
        # failure or dead letter of a replaced projection is refused (AU006)
        # even at the checkpoint its successor starts from.
        self.generation: int | None = generation
        self._pinned_generation = generation
        self._max_retries = 0
        self._retry_base_ms = 100
        self._retry_max_ms = 10_000
        self._settings_loaded_at = 0.0
        # After a failed batch, the events it covered are retried in ever
        # smaller slices (halving the failing one) down to the single event
        # that fails: a poison event costs about log2 of the failed batch's
        # events in extra transactions, not one per event of the batch.
        self._isolate_remaining = 0
        self._slice = 1
        self._batch_size = 1
        self._trial_next = False
        self._poison: _PoisonCandidate | None = None
        self._stop = asyncio.Event()

    @property
    def checkpoint(self) -> tuple[int, int]:
        """(transaction id, position) as numbers, to compare with the horizon."""
        return int(self.transaction_id), self.position

    async def run(self, stop: asyncio.Event) -> None:
        """Own and run the projection until ``stop`` is set; survives
        connection loss, database restarts and losing the ownership.
        Raises UnknownProjection when the projection's row is gone."""
        self._stop = stop
        bind(projection=self.name)  # this task's log lines name the projection
        delay = 0.1
        while not stop.is_set() and not self.finished:
            conn: psycopg.AsyncConnection[Any] | None = None
            try:
                conn = await connect(self.dsn, self.settings, f"projector {self.name}")
                if not await self._acquire(conn, stop):
                    return
                applied_before = self.events_applied
                owned_at = time.monotonic()
                try:
                    await self._work(conn, stop)
                finally:
                    # It worked for a while: reconnect quickly next time. (A
                    # connection that fails at once keeps backing off.)
                    if self.events_applied > applied_before or time.monotonic() - owned_at > 10:
                        delay = 0.1
                await self._release(conn)
            except ProjectionReplaced:
                if conn is not None:
                    await self._release(conn)  # claimed the successor: not ours
                raise
            except (psycopg.OperationalError, _ConnectionLost) as exc:
                self.owning = False  # not while it waits to reconnect
                self.reconnects += 1
                metrics.record_projection_error(self.name, "connection")
                log.warning(
                    "projection %s: connection lost (%s); reconnecting in %.1fs",
                    self.name,
                    exc,
                    delay,
                )
                await _wait(stop, None, delay)
                delay = min(delay * 2, self.settings.reconnect_max_delay)
            finally:
                self.owning = False
                if conn is not None:
                    await conn.close()

    async def _execute(
        self, conn: psycopg.AsyncConnection[Any], query: LiteralString, params: dict[str, Any]
    ) -> tuple[Any, ...] | None:
        """One statement, its first row; connection loss as _ConnectionLost,
        the projection functions' own errors typed."""
        try:
            cur = await conn.execute(query, params)
            return await cur.fetchone()
        except psycopg.Error as exc:
            if await is_connection_failure(exc, conn):
                raise _ConnectionLost(str(exc)) from exc
            typed = translate_projection_error(exc)
            if typed is not None:
                raise typed from exc
            raise

    async def _acquire(self, conn: psycopg.AsyncConnection[Any], stop: asyncio.Event) -> bool:
        waiting_logged = False
        while not stop.is_set():
            row = await self._execute(conn, _queries()["try_lock"], {"name": self.name})
            if row and row[0]:
                claimed = await self._execute(
                    conn, _queries()["claim"], {"name": self.name, "owner": self.settings.owner}
                )
                self._load(claimed)
                self._poison = None
                self._isolate_remaining = 0
                self.owning = True
                log.info(
                    "projection %s: owned by %s from checkpoint %s/%s",
                    self.name,
                    self.settings.owner,
                    self.transaction_id,
                    self.position,
                )
                return True
            if not waiting_logged:
                log.info("projection %s: owned by another daemon; standing by", self.name)
                waiting_logged = True
            await _wait(stop, None, self.settings.poll_interval)
        return False

    async def _release(self, conn: psycopg.AsyncConnection[Any]) -> None:
        with contextlib.suppress(psycopg.Error):
            await conn.execute(
                _queries()["release"], {"name": self.name, "owner": self.settings.owner}
            )
            await conn.execute(_queries()["unlock"], {"name": self.name})
        log.info("projection %s: released", self.name)

    def _load(self, row: tuple[Any, ...] | None, *, settings_only: bool = False) -> None:
        if row is None or row[0] is None:
            raise UnknownProjection(f"unknown projection {self.name!r}")
        (
            transaction_id,
            position,
            _status,
            self._batch_size,
            self._max_retries,
            self._retry_base_ms,
            self._retry_max_ms,
            circuit_state,
            _circuit_open_until,
            generation,
        ) = row
        self._settings_loaded_at = time.monotonic()
        if not settings_only:
            if self._pinned_generation is not None and generation != self._pinned_generation:
                raise ProjectionReplaced(
                    f"projection {self.name!r} was restarted, reset or swapped (generation "
                    f"{generation}, not {self._pinned_generation})"
                )
            self.transaction_id, self.position = transaction_id, position
            self.generation = generation
            self._trial_next = circuit_state != "closed"

    async def _reload(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._load(await self._execute(conn, _queries()["load"], {"name": self.name}))
        self._poison = None
        self._isolate_remaining = 0

    async def _work(self, conn: psycopg.AsyncConnection[Any], stop: asyncio.Event) -> None:
        while not stop.is_set():
            outcome = await self.step(conn)
            if outcome is StepOutcome.FINISHED:
                self.finished = True
                return
            if outcome is StepOutcome.IDLE:
                if time.monotonic() - self._settings_loaded_at > self.SETTINGS_REFRESH_SECONDS:
                    row = await self._execute(conn, _queries()["load"], {"name": self.name})
                    self._load(row, settings_only=True)
                await _wait(stop, self.wake, self.settings.poll_interval)

    async def step(self, conn: psycopg.AsyncConnection[Any]) -> StepOutcome:
        """One batch: apply it, or handle its failure."""
        if self._trial_next:
            limit: int | None = 1
        elif self._isolate_remaining > 0:
            limit = max(min(self._slice, self._isolate_remaining), 1)
        else:
            limit = None
        params = {
            "name": self.name,
            "transaction_id": self.transaction_id,
            "position": self.position,
            "owner": self.settings.owner,
            "limit": limit,
            "generation": self.generation,
            "traced": tracing.recording(),
            "bounds": len(metrics.LATENCY_BOUNDS),
            "negated_bounds": metrics.NEGATED_LATENCY_BOUNDS,
        }
        start_ns = time.time_ns()
        started = time.perf_counter()
        try:
            # Our own spans describe the batch; an idle poll leaves no trace.
            with tracing.suppress_instrumentation():
                row = await self._execute(conn, _queries()["project_batch"], params)
        except StaleCheckpoint as exc:
            metrics.record_projection_error(self.name, "stale_checkpoint")
            tracing.record_batch_spans(self.name, start_ns, time.time_ns(), (), error=exc)
            log.warning("projection %s: %s; reloading", self.name, exc)
            await self._reload(conn)
            return StepOutcome.BUSY
        except psycopg.Error as exc:
            tracing.record_batch_spans(self.name, start_ns, time.time_ns(), (), error=exc)
            return await self._failed(conn, exc, limit)
        duration = time.perf_counter() - started
        assert row is not None
        result = BatchResult(*row)
        self.transaction_id, self.position = result.transaction_id, result.position
        if result.applied:
            metrics.record_applied_batch(
                self.name, result.counts_by_type(), duration, result.end_to_end()
            )
            tracing.record_batch_spans(
                self.name,
                start_ns,
                time.time_ns(),
                result.traced_events(),
                attributes={"aura.checkpoint": f"{result.transaction_id}/{result.position}"},
            )
        if result.status == "paused":
            self._poison = None  # retries start afresh after a resume
            return StepOutcome.IDLE
        if result.applied:
            self.events_applied += result.applied
            self.batches += 1
            self._trial_next = False
            self._isolate_remaining = max(self._isolate_remaining - result.applied, 0)
            if self._poison is not None:
                # The failing event went through on a retry: try the rest of
                # the failed batch in one slice again.
                self._poison = None
                self._slice = max(self._isolate_remaining, 1)
        if result.caught_up and result.status in ("running", "rebuilding"):
            self._isolate_remaining = 0
            self._trial_next = False
            if self.on_caught_up is not None and await self.on_caught_up(conn):
                return StepOutcome.FINISHED
            return StepOutcome.IDLE
        if result.applied == 0:
            return StepOutcome.IDLE  # the circuit is open
        return StepOutcome.BUSY

    async def _failed(
        self, conn: psycopg.AsyncConnection[Any], exc: psycopg.Error, limit: int | None
    ) -> StepOutcome:
        error = (exc.diag.message_primary if exc.diag else None) or str(exc)
        sqlstate = exc.sqlstate
        if limit != 1:
            # Find the failing event: retry the failed slice's first half.
            tried = limit
            if self._isolate_remaining == 0:
                row = await self._execute(
                    conn,
                    _queries()["pending_events"],
                    {"name": self.name, "limit": limit or self._batch_size},
                )
                tried = max(int(row[0]) if row else 1, 1)
                self._isolate_remaining = tried
                log.warning(
                    "projection %s: batch after %s/%s failed (%s: %s); "
                    "retrying it in halves to find the failing event",
                    self.name,
                    self.transaction_id,
                    self.position,
                    sqlstate,
                    error,
                )
            metrics.record_projection_error(
                self.name, "transient" if is_transient(sqlstate) else "handler"
            )
            self._slice = max((tried or 1) // 2, 1)
            return StepOutcome.BUSY
        at = (self.transaction_id, self.position)
        if self._poison is None or (self._poison.transaction_id, self._poison.position) != at:
            self._poison = _PoisonCandidate(*at)
        transient = is_transient(sqlstate)
        if self._poison.event_type is None:
            event = await self._execute(conn, _queries()["next_event"], {"name": self.name})
            if event is not None:
                self._poison.event_id, _, self._poison.event_type = event
        metrics.record_projection_error(
            self.name, "transient" if transient else "handler", self._poison.event_type
        )
        if not transient:
            self._poison.attempts += 1
        try:
            recorded = await self._execute(
                conn,
                _queries()["record_failure"],
                {
                    "name": self.name,
                    "transaction_id": self.transaction_id,
                    "position": self.position,
                    "owner": self.settings.owner,
                    "error": error,
                    "sqlstate": sqlstate,
                    "generation": self.generation,
                },
            )
        except StaleCheckpoint:
            await self._reload(conn)
            return StepOutcome.BUSY
        failures, circuit_state, _ = recorded or (0, "closed", None)
        # An open circuit half-opens with one event: the next call is a trial.
        self._trial_next = circuit_state != "closed"
        log.warning(
            "projection %s: event after %s/%s failed (attempt %d, %d failures in a row, "
            "circuit %s): %s: %s",
            self.name,
            self.transaction_id,
            self.position,
            self._poison.attempts,
            failures,
            circuit_state,
            sqlstate,
            error,
            extra={"event_id": str(self._poison.event_id), "event_type": self._poison.event_type},
        )
        if not transient and self._poison.attempts > self._max_retries and self.dead_letter_queue:
            return await self._dead_letter(conn, error, sqlstate)
        delay = backoff_delay(
            max(self._poison.attempts, failures if transient else 0),
            self._retry_base_ms,
            self._retry_max_ms,
        )
        await _wait(self._stop, None, delay)
        return StepOutcome.BUSY

    async def _dead_letter(
        self, conn: psycopg.AsyncConnection[Any], error: str, sqlstate: str | None
    ) -> StepOutcome:
        assert self._poison is not None
        event = await self._execute(conn, _queries()["next_event"], {"name": self.name})
        if event is None:
            self._poison = None
            return StepOutcome.BUSY
        event_id, global_position, event_type = event
        try:
            row = await self._execute(
                conn,
                _queries()["dead_letter_next"],
                {
                    "name": self.name,
                    "transaction_id": self.transaction_id,
                    "position": self.position,
                    "owner": self.settings.owner,
                    "event_id": event_id,
                    "error": error,
                    "sqlstate": sqlstate,
                    "attempts": self._poison.attempts,
                    "first_failed_at": self._poison.first_failed_at,
                    "generation": self.generation,
                },
            )
        except (StaleCheckpoint, ProjectionError) as exc:
            log.warning("projection %s: not dead-lettered (%s); reloading", self.name, exc)
            await self._reload(conn)
            return StepOutcome.BUSY
        assert row is not None
        dead_letter_id, self.transaction_id, self.position = row
        self.dead_lettered += 1
        metrics.record_dead_lettered(event_type)
        log.error(
            "projection %s: event %s (%s, position %s) dead-lettered as #%s after %d attempts: %s",
            self.name,
            event_id,
            event_type,
            global_position,
            dead_letter_id,
            self._poison.attempts,
            error,
            extra={"event_id": str(event_id), "event_type": event_type},
        )
        self._poison = None
        self._isolate_remaining = max(self._isolate_remaining - 1, 0)
        # The rest of the failed batch in one slice: it may well be clean.
        self._slice = max(self._isolate_remaining, 1)
        return StepOutcome.BUSY


class _WakeConnection(abc.ABC):
    """A connection of its own that wakes runners (``_serve``); reconnects
    with backoff when it drops, and wakes everyone on each (re)connect,
    since whatever happened while it was away went unseen."""

    role: str

    def __init__(self, dsn: str, settings: ProjectorSettings) -> None:
        self.dsn = dsn
        self.settings = settings
        self.connected = False
        self.reconnects = 0

    @abc.abstractmethod
    async def _serve(self, conn: psycopg.AsyncConnection[Any], stop: asyncio.Event) -> None:
        """Wake runners while connected, until ``stop`` is set."""

    async def run(self, stop: asyncio.Event) -> None:
        delay = 0.1
        while not stop.is_set():
            conn: psycopg.AsyncConnection[Any] | None = None
            try:
                conn = await connect(self.dsn, self.settings, f"projector {self.role}")
                self.connected = True
                delay = 0.1
                await self._serve(conn, stop)
            except psycopg.OperationalError as exc:
                self.connected = False
                if stop.is_set():
                    return
                self.reconnects += 1
                log.warning(
                    "%s: connection lost (%s); reconnecting in %.1fs", self.role, exc, delay
                )
                await _wait(stop, None, delay)
                delay = min(delay * 2, self.settings.reconnect_max_delay)
            finally:
                self.connected = False
                if conn is not None:
                    await conn.close()


class Listener(_WakeConnection):
    """LISTEN aura_events on its own connection; wakes the runners on each
    notification (sent by appends where aura.notify = on)."""

    role = "listener"

    def __init__(self, dsn: str, settings: ProjectorSettings, wake: Callable[[], None]) -> None:
        super().__init__(dsn, settings)
        self.wake = wake
        self.notifications = 0

    async def _serve(self, conn: psycopg.AsyncConnection[Any], stop: asyncio.Event) -> None:
        await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        self.wake()
        while not stop.is_set():
            async for _ in conn.notifies(timeout=self.settings.listen_keepalive):
                self.notifications += 1
                self.wake()
            with tracing.suppress_instrumentation():
                await conn.execute("SELECT 1")


class LogWatcher(_WakeConnection):
    """Reads the read horizon on its own connection; wakes the runners
    behind it when it moves.

    The horizon is the newest event ``aura.read_all`` can return: it moves
    only when events become readable (their transaction and every older one
    have ended), so a wake-up always finds work, and no runner is woken for
    appends still in flight.
    """

    role = "watcher"

    def __init__(
        self,
        dsn: str,
        settings: ProjectorSettings,
        wake: Callable[[tuple[int, int] | None], None],
    ) -> None:
        super().__init__(dsn, settings)
        self.wake = wake
        self.horizon: tuple[int, int] | None = None
        self.ticks = 0
        self.moves = 0

    async def _serve(self, conn: psycopg.AsyncConnection[Any], stop: asyncio.Event) -> None:
        query = _queries()["watch_horizon"]
        self.horizon = None
        self.wake(None)
        interval = self.settings.watch_interval
        moved_at = time.monotonic()
        while not stop.is_set():
            with tracing.suppress_instrumentation():
                cur = await conn.execute(query)
                row = await cur.fetchone()
            self.ticks += 1
            horizon = (int(row[0]), int(row[1])) if row and row[0] is not None else (0, 0)
            if horizon != self.horizon:
                self.moves += 1
                self.horizon = horizon
                self.wake(horizon)
                interval = self.settings.watch_interval
                moved_at = time.monotonic()
            elif time.monotonic() - moved_at > self.settings.watch_hold:
                interval = min(interval * 1.5, self.settings.watch_idle_interval)
            await _wait(stop, None, interval)


class ProjectorDaemon:
    """Registers catalog projections and runs them until stopped."""

    def __init__(
        self, dsn: str, specs: Sequence[ProjectionSpec], settings: ProjectorSettings | None = None
    ) -> None:
        if not specs:
            raise CatalogError("no projections to run")
        self.dsn = dsn
        self.specs = tuple(specs)
        self.settings = settings or ProjectorSettings()
        self.runners = {
            spec.name: ProjectionRunner(
                dsn,
                spec.name,
                self.settings,
                dead_letter_queue=spec.error_handling.dead_letter_queue,
            )
            for spec in self.specs
            if spec.shadow_of is None  # shadow entries run as NAME__shadow (found below)
        }
        self.listener = (
            Listener(dsn, self.settings, self._wake_all) if self.settings.wake == "listen" else None
        )
        self.watcher = (
            LogWatcher(dsn, self.settings, self._wake_behind)
            if self.settings.wake == "watch"
            else None
        )
        self.registered: dict[str, str] = {}
        # The shadows of these projections (aura_pg.shadows), found at
        # registration and then every shadow_discovery_interval.
        self.shadow_runners: dict[str, ProjectionRunner] = {}

    def _wake_all(self) -> None:
        for runner in self.runners.values():
            runner.wake.set()

    def _wake_behind(self, horizon: tuple[int, int] | None) -> None:
        """Wake the runners whose checkpoint is before ``horizon`` (all of
        them when it is None)."""
        for runner in self.runners.values():
            if horizon is None or runner.checkpoint < horizon:
                runner.wake.set()

    async def register(self) -> dict[str, str]:
        async with await connect(self.dsn, self.settings, "projector setup") as conn:
            await check_log_origin(conn)
            self.registered = await register_projections(conn, self.specs)
            await self._discover_shadows(conn)
        return self.registered

    async def _discover_shadows(self, conn: psycopg.AsyncConnection[Any]) -> list[str]:
        """Add a runner for each shadow of these projections that has none
        yet; the new ones' names."""
        cur = await conn.execute(
            named_queries("queries/shadows.sql")["shadows_of"],
            {"names": [spec.shadow_of or spec.name for spec in self.specs]},
        )
        found = []
        for (shadow,) in await cur.fetchall():
            if shadow not in self.shadow_runners:
                self.shadow_runners[shadow] = ProjectionRunner(self.dsn, shadow, self.settings)
                self.runners[shadow] = self.shadow_runners[shadow]
                found.append(shadow)
        return found

    async def _run_shadow(self, runner: ProjectionRunner, stop: asyncio.Event) -> None:
        """A shadow runs until stopped. It is not served to readers, so
        when it fails, or its row goes (dropped), its runner ends and the
        daemon carries on with the live projections."""
        try:
            await runner.run(stop)
        except UnknownProjection:
            log.info("shadow %s is gone (dropped); no longer running it", runner.name)
        except Exception:
            log.exception("shadow %s failed; the live projections carry on", runner.name)
        if self.shadow_runners.get(runner.name) is runner:
            # Found again if it comes back (created anew).
            del self.shadow_runners[runner.name]
            self.runners.pop(runner.name, None)
        await stop.wait()

    async def _find_new_shadows(self, stop: asyncio.Event, tasks: list[asyncio.Task[None]]) -> None:
        """Start runners for shadows created while the daemon runs, over one
        connection kept between looks (opened again after a failure)."""
        conn: psycopg.AsyncConnection[Any] | None = None
        try:
            while not stop.is_set():
                await _wait(stop, None, self.settings.shadow_discovery_interval)
                if stop.is_set():
                    return
                try:
                    if conn is None or conn.closed:
                        conn = await connect(self.dsn, self.settings, "projector shadows")
                    found = await self._discover_shadows(conn)
                except psycopg.Error as exc:
                    log.warning("looking for new shadows failed (%s); trying again later", exc)
                    if conn is not None:
                        await conn.close()
                    conn = None
                    continue
                self._start_shadows(found, stop, tasks)
        finally:
            if conn is not None:
                await conn.close()

    def _start_shadows(
        self, found: list[str], stop: asyncio.Event, tasks: list[asyncio.Task[None]]
    ) -> None:
        for name in found:
            log.info("projector %s: running shadow %s", self.settings.owner, name)
            tasks.append(
                asyncio.create_task(
                    self._run_shadow(self.shadow_runners[name], stop), name=f"projection {name}"
                )
            )

    async def _register_when_reachable(self, stop: asyncio.Event) -> bool:
        """Register, waiting out a database that is down or restarting (a
        daemon started during an outage must not exit); False if stopped
        first. Any other failure (wrong credentials, no schema) is raised."""
        delay = 0.1
        while True:
            try:
                await self.register()
                return True
            except psycopg.OperationalError as exc:
                if transient_reason(exc) is None:
                    raise
                log.warning("database unreachable (%s); registering again in %.1fs", exc, delay)
            await _wait(stop, None, delay)
            if stop.is_set():
                return False
            delay = min(delay * 2, self.settings.reconnect_max_delay)

    async def run(self, stop: asyncio.Event) -> None:
        """Register, then run every projection until ``stop`` is set; the
        batches in flight finish and the locks are released on the way out,
        within ``shutdown_timeout``. If a projection's runner dies (its row
        was removed, an unexpected error), everything stops and the error is
        raised: a supervisor restarts the process, nothing runs half-way."""
        if not await self._register_when_reachable(stop):
            return
        log.info(
            "projector %s: running %s (%s)",
            self.settings.owner,
            ", ".join(self.runners),
            "poll only" if self.settings.wake == "poll" else f"{self.settings.wake} + poll",
        )
        tasks = [
            asyncio.create_task(
                self._run_shadow(runner, stop) if name in self.shadow_runners else runner.run(stop),
                name=f"projection {name}",
            )
            for name, runner in self.runners.items()
        ]
        shadow_finder = asyncio.create_task(self._find_new_shadows(stop, tasks), name="shadows")
        waker = self.listener or self.watcher
        listener_task = (
            asyncio.create_task(waker.run(stop), name=f"{self.settings.wake}er")
            if waker is not None
            else None
        )
        watched: list[asyncio.Future[Any]] = [*tasks, asyncio.ensure_future(stop.wait())]
        if listener_task is not None:
            watched.append(listener_task)
        failure: BaseException | None = None
        try:
            done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task not in tasks and task is not listener_task:
                    continue
                error = task.exception()
                if error is None and stop.is_set():
                    continue  # it saw the stop first: a normal shutdown
                failure = error or RuntimeError(f"{task.get_name()} ended")
                log.error("%s failed: %r; stopping the daemon", task.get_name(), failure)
        finally:
            stop.set()
            started = time.monotonic()
            running = [task for task in tasks if not task.done()]
            pending: set[asyncio.Task[None]] = set()
            if running:
                _, pending = await asyncio.wait(running, timeout=self.settings.shutdown_timeout)
            for task in pending:
                log.warning("%s did not stop in time; cancelling it", task.get_name())
                task.cancel()
            if listener_task is not None:
                listener_task.cancel()
            shadow_finder.cancel()
            await asyncio.gather(
                *pending,
                *([listener_task] if listener_task else []),
                shadow_finder,
                return_exceptions=True,
            )
            for watcher in watched:
                watcher.cancel()
            log.info("projector stopped in %.2fs", time.monotonic() - started)
        if failure is not None:
            raise failure
