"""The projector daemon: runs catalog projections, each owned by one daemon.

One asyncio process runs many projections. Each projection gets a runner
with its own connection, which holds the projection's advisory lock (the
ownership: when the process dies, Postgres releases it and another daemon
takes over) and sends ``aura.project_batch``, which applies a batch and
advances the checkpoint in one statement, hence one transaction, with a
compare-and-set on the checkpoint. A listener connection wakes the runners
on ``NOTIFY aura_events``; each runner also polls, so a lost notification,
a dropped listener or a pooler in between delays it by one poll interval
at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, LiteralString

import psycopg

from aura_pg._resources import named_queries
from aura_pg.catalog import ProjectionSpec
from aura_pg.errors import CatalogError, ProjectionError, StaleCheckpoint, UnknownProjection

log = logging.getLogger("aura_pg.projector")

NOTIFY_CHANNEL = "aura_events"


def _queries() -> dict[str, LiteralString]:
    return named_queries("queries/projector.sql")


def default_owner() -> str:
    """How this process names itself in checkpoint rows: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class ProjectorSettings:
    poll_interval: float = 1.0
    listen: bool = True
    shutdown_timeout: float = 30.0
    owner: str = field(default_factory=default_owner)
    statement_timeout_ms: int = 60_000
    lock_timeout_ms: int = 10_000
    reconnect_max_delay: float = 10.0
    # How often the listener proves its connection alive when no
    # notification comes.
    listen_keepalive: float = 5.0

    def __post_init__(self) -> None:
        if not self.poll_interval > 0:
            raise ValueError(f"poll_interval must be > 0, not {self.poll_interval!r}")
        if not self.shutdown_timeout > 0:
            raise ValueError(f"shutdown_timeout must be > 0, not {self.shutdown_timeout!r}")


@dataclass(frozen=True)
class BatchResult:
    applied: int
    transaction_id: str
    position: int
    caught_up: bool
    status: str


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
    return ceiling / 2 + random.uniform(0, ceiling / 2)


async def connect(
    dsn: str, settings: ProjectorSettings, purpose: str
) -> psycopg.AsyncConnection[Any]:
    """An autocommit connection with the daemon's timeouts."""
    conn = await psycopg.AsyncConnection.connect(
        dsn, autocommit=True, application_name=f"aura-pg {purpose}"[:63]
    )
    await conn.execute(
        "SELECT set_config('statement_timeout', %s, false), set_config('lock_timeout', %s, false)",
        (str(settings.statement_timeout_ms), str(settings.lock_timeout_ms)),
    )
    return conn


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


async def register_projections(
    conn: psycopg.AsyncConnection[Any], specs: Sequence[ProjectionSpec]
) -> dict[str, str]:
    """Install or update the catalog entries in the database.

    Returns, per projection, 'created', 'unchanged' or 'changed' (a changed
    definition waits for a rebuild). A definition that fails to install is
    a CatalogError naming the projection.
    """
    outcomes: dict[str, str] = {}
    for spec in specs:
        try:
            async with conn.transaction():
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
        outcomes[spec.name] = outcome
        if outcome == "changed":
            log.warning(
                "projection %s: its definition changed; the live read model keeps the old one "
                "until `aura-pg projections rebuild %s` swaps the new one in",
                spec.name,
                spec.name,
            )
    return outcomes


@dataclass
class _PoisonCandidate:
    transaction_id: str
    position: int
    attempts: int = 0
    first_failed_at: datetime = field(default_factory=lambda: datetime.now(UTC))


class ProjectionRunner:
    """Runs one projection (or a rebuild's shadow) while it owns it."""

    def __init__(
        self,
        dsn: str,
        name: str,
        settings: ProjectorSettings,
        *,
        dead_letter_queue: bool = True,
        on_caught_up: Callable[[psycopg.AsyncConnection[Any]], Awaitable[bool]] | None = None,
    ) -> None:
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
        self.transaction_id = "0"
        self.position = 0
        self._batch_size = 1
        self._max_retries = 0
        self._retry_base_ms = 100
        self._retry_max_ms = 10_000
        self._isolate_remaining = 0
        self._poison: _PoisonCandidate | None = None
        self._stop = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Own and run the projection until ``stop`` is set; survives
        connection loss, database restarts and losing the ownership."""
        self._stop = stop
        delay = 0.1
        while not stop.is_set() and not self.finished:
            conn: psycopg.AsyncConnection[Any] | None = None
            try:
                conn = await connect(self.dsn, self.settings, f"projector {self.name}")
                if not await self._acquire(conn, stop):
                    return
                delay = 0.1
                await self._work(conn, stop)
                if not conn.closed:
                    await self._release(conn)
            except psycopg.OperationalError as exc:
                log.warning("projection %s: connection lost (%s); reconnecting", self.name, exc)
                await _wait(stop, None, delay)
                delay = min(delay * 2, self.settings.reconnect_max_delay)
            except UnknownProjection:
                raise
            except Exception:
                log.exception("projection %s: runner failed; restarting it", self.name)
                await _wait(stop, None, delay)
                delay = min(delay * 2, self.settings.reconnect_max_delay)
            finally:
                self.owning = False
                if conn is not None:
                    await conn.close()

    async def _acquire(self, conn: psycopg.AsyncConnection[Any], stop: asyncio.Event) -> bool:
        waiting_logged = False
        while not stop.is_set():
            cur = await conn.execute(_queries()["try_lock"], {"name": self.name})
            row = await cur.fetchone()
            if row and row[0]:
                cur = await conn.execute(
                    _queries()["claim"], {"name": self.name, "owner": self.settings.owner}
                )
                self._load(await cur.fetchone())
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

    def _load(self, row: tuple[Any, ...] | None) -> None:
        if row is None:
            raise UnknownProjection(f"projection {self.name!r} is not registered")
        (
            self.transaction_id,
            self.position,
            _status,
            self._batch_size,
            self._max_retries,
            self._retry_base_ms,
            self._retry_max_ms,
            _circuit_state,
            _circuit_open_until,
        ) = row

    async def _reload(self, conn: psycopg.AsyncConnection[Any]) -> None:
        cur = await conn.execute(_queries()["load"], {"name": self.name})
        self._load(await cur.fetchone())
        self._poison = None
        self._isolate_remaining = 0

    async def _work(self, conn: psycopg.AsyncConnection[Any], stop: asyncio.Event) -> None:
        while not stop.is_set():
            outcome = await self.step(conn)
            if outcome is StepOutcome.FINISHED:
                self.finished = True
                return
            if outcome is StepOutcome.IDLE:
                await _wait(stop, self.wake, self.settings.poll_interval)

    async def step(self, conn: psycopg.AsyncConnection[Any]) -> StepOutcome:
        """One batch: apply it, or handle its failure."""
        limit = 1 if self._isolate_remaining > 0 else None
        params = {
            "name": self.name,
            "transaction_id": self.transaction_id,
            "position": self.position,
            "owner": self.settings.owner,
            "limit": limit,
        }
        try:
            cur = await conn.execute(_queries()["project_batch"], params)
            row = await cur.fetchone()
        except psycopg.OperationalError:
            raise
        except psycopg.Error as exc:
            typed = translate_projection_error(exc)
            if isinstance(typed, StaleCheckpoint):
                log.warning("projection %s: %s; reloading", self.name, typed)
                await self._reload(conn)
                return StepOutcome.BUSY
            if typed is not None:
                raise typed from exc
            return await self._failed(conn, exc, isolated=limit == 1)
        assert row is not None
        result = BatchResult(*row)
        self.transaction_id, self.position = result.transaction_id, result.position
        if result.applied:
            self.events_applied += result.applied
            self.batches += 1
            self._poison = None
            self._isolate_remaining = max(self._isolate_remaining - result.applied, 0)
        if result.caught_up and result.status in ("running", "rebuilding"):
            self._isolate_remaining = 0
            if self.on_caught_up is not None and await self.on_caught_up(conn):
                return StepOutcome.FINISHED
            return StepOutcome.IDLE
        if result.applied == 0:
            return StepOutcome.IDLE  # paused, or the circuit is open
        return StepOutcome.BUSY

    async def _failed(
        self, conn: psycopg.AsyncConnection[Any], exc: psycopg.Error, *, isolated: bool
    ) -> StepOutcome:
        error = (exc.diag.message_primary if exc.diag else None) or str(exc)
        sqlstate = exc.sqlstate
        if not isolated and self._batch_size > 1:
            # Find the poison event: retry the batch's events one at a time.
            log.warning(
                "projection %s: batch after %s/%s failed (%s: %s); applying one event at a time",
                self.name,
                self.transaction_id,
                self.position,
                sqlstate,
                error,
            )
            self._isolate_remaining = self._batch_size
            return StepOutcome.BUSY
        at = (self.transaction_id, self.position)
        if self._poison is None or (self._poison.transaction_id, self._poison.position) != at:
            self._poison = _PoisonCandidate(*at)
        self._poison.attempts += 1
        try:
            cur = await conn.execute(
                _queries()["record_failure"],
                {
                    "name": self.name,
                    "transaction_id": self.transaction_id,
                    "position": self.position,
                    "owner": self.settings.owner,
                    "error": error,
                    "sqlstate": sqlstate,
                },
            )
            failures, circuit_state, _ = await cur.fetchone() or (0, "closed", None)
        except psycopg.OperationalError:
            raise
        except psycopg.Error as record_exc:
            if isinstance(translate_projection_error(record_exc), StaleCheckpoint):
                await self._reload(conn)
                return StepOutcome.BUSY
            raise
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
        )
        if self._poison.attempts > self._max_retries and self.dead_letter_queue:
            return await self._dead_letter(conn, error, sqlstate)
        delay = backoff_delay(self._poison.attempts, self._retry_base_ms, self._retry_max_ms)
        await _wait(self._stop, None, delay)
        return StepOutcome.BUSY

    async def _dead_letter(
        self, conn: psycopg.AsyncConnection[Any], error: str, sqlstate: str | None
    ) -> StepOutcome:
        assert self._poison is not None
        cur = await conn.execute(_queries()["next_event"], {"name": self.name})
        event = await cur.fetchone()
        if event is None:
            self._poison = None
            return StepOutcome.BUSY
        event_id, global_position, event_type = event
        try:
            cur = await conn.execute(
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
                },
            )
            row = await cur.fetchone()
        except psycopg.OperationalError:
            raise
        except psycopg.Error as exc:
            if translate_projection_error(exc) is not None:
                await self._reload(conn)
                return StepOutcome.BUSY
            raise
        assert row is not None
        dead_letter_id, self.transaction_id, self.position = row
        self.dead_lettered += 1
        log.error(
            "projection %s: event %s (%s, position %s) dead-lettered as #%s after %d attempts: %s",
            self.name,
            event_id,
            event_type,
            global_position,
            dead_letter_id,
            self._poison.attempts,
            error,
        )
        self._poison = None
        self._isolate_remaining = max(self._isolate_remaining - 1, 0)
        return StepOutcome.BUSY


class Listener:
    """LISTEN aura_events on its own connection; wakes the runners.

    Reconnects with backoff when the connection drops, and wakes everyone
    on each (re)connect, since notifications sent while it was away are
    lost.
    """

    def __init__(self, dsn: str, settings: ProjectorSettings, wake: Callable[[], None]) -> None:
        self.dsn = dsn
        self.settings = settings
        self.wake = wake
        self.connected = False
        self.notifications = 0
        self.reconnects = 0

    async def run(self, stop: asyncio.Event) -> None:
        delay = 0.1
        while not stop.is_set():
            conn: psycopg.AsyncConnection[Any] | None = None
            try:
                conn = await connect(self.dsn, self.settings, "projector listener")
                await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                self.connected = True
                delay = 0.1
                self.wake()
                while not stop.is_set():
                    async for _ in conn.notifies(timeout=self.settings.listen_keepalive):
                        self.notifications += 1
                        self.wake()
                    await conn.execute("SELECT 1")
            except psycopg.OperationalError as exc:
                if stop.is_set():
                    return
                self.reconnects += 1
                log.warning("listener: connection lost (%s); reconnecting in %.1fs", exc, delay)
                await _wait(stop, None, delay)
                delay = min(delay * 2, self.settings.reconnect_max_delay)
            finally:
                self.connected = False
                if conn is not None:
                    await conn.close()


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
        }
        self.listener = (
            Listener(dsn, self.settings, self._wake_all) if self.settings.listen else None
        )
        self.registered: dict[str, str] = {}

    def _wake_all(self) -> None:
        for runner in self.runners.values():
            runner.wake.set()

    async def register(self) -> dict[str, str]:
        async with await connect(self.dsn, self.settings, "projector setup") as conn:
            self.registered = await register_projections(conn, self.specs)
        return self.registered

    async def run(self, stop: asyncio.Event) -> None:
        """Register, then run every projection until ``stop`` is set; the
        batches in flight finish and the locks are released on the way out,
        within ``shutdown_timeout``."""
        await self.register()
        log.info(
            "projector %s: running %s (%s)",
            self.settings.owner,
            ", ".join(self.runners),
            "listen + poll" if self.listener else "poll only",
        )
        tasks = [
            asyncio.create_task(runner.run(stop), name=f"projection {name}")
            for name, runner in self.runners.items()
        ]
        listener_task = (
            asyncio.create_task(self.listener.run(stop), name="listener") if self.listener else None
        )
        try:
            await stop.wait()
        finally:
            stop.set()
            started = time.monotonic()
            done, pending = await asyncio.wait(tasks, timeout=self.settings.shutdown_timeout)
            for task in pending:
                log.warning("%s did not stop in time; cancelling it", task.get_name())
                task.cancel()
            if listener_task is not None:
                listener_task.cancel()
            await asyncio.gather(
                *pending, *([listener_task] if listener_task else []), return_exceptions=True
            )
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    log.error("%s ended with %r", task.get_name(), task.exception())
            log.info("projector stopped in %.2fs", time.monotonic() - started)
