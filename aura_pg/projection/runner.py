"""One projection (a live one, a shadow or a rebuild), run while this
process owns it.

The runner holds the projection's advisory lock on its own connection (the
ownership: when the process dies, Postgres releases it and another daemon
takes over). Each step is one batch: ``aura.project_batch`` reads the
events after the checkpoint, applies them and advances the checkpoint in
one statement, hence one transaction, with a compare-and-set on the
checkpoint and the generation. A failed batch goes through the isolation
state machine (:mod:`aura_pg.projection.isolation`), which says what to do
next; the checkpoint row stays the durable truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import psycopg

from aura_pg._runtime import Backoff, is_momentary, wait
from aura_pg.errors import ProjectionError, StaleCheckpoint, UnknownProjection
from aura_pg.models import START, Checkpoint
from aura_pg.observability import metrics, tracing
from aura_pg.observability.logging import bind
from aura_pg.projection.connection import ConnectionLost, connect, fetch_one, queries
from aura_pg.projection.isolation import BatchFailure, DeadLetter, Isolation, RetryPolicy, Suspect
from aura_pg.projection.settings import ProjectorSettings

if TYPE_CHECKING:
    from aura_pg.projection.balance import PartitionShare

log = logging.getLogger("aura_pg.projector")


@dataclass(frozen=True)
class BatchResult:
    """What one ``project_batch`` call applied (the row of its query)."""

    applied: int
    checkpoint: Checkpoint
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

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> BatchResult:
        applied, transaction_id, position, *rest = row
        return cls(applied, Checkpoint(int(transaction_id), position), *rest)

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


class ProjectionReplaced(ProjectionError):
    """A runner pinned to one generation of its projection (a rebuild's, by
    the process that began it) found another: the projection was restarted
    with another definition, reset or swapped. Nothing of the old one was
    applied to the new one; the runner stops."""


class BatchFailed(Exception):
    """A batch failed in the handler (not the connection): what the
    isolation state machine records, with the SQLSTATE when there is one."""

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate


def _reason(error: str, sqlstate: str | None) -> str:
    """A failure for the log: the error, after its SQLSTATE when it has one."""
    return f"{sqlstate}: {error}" if sqlstate else error


def retry_backoff(base_ms: int, max_ms: int) -> Backoff:
    """The wait before a failed event is tried again, from the catalog's
    ``retry_base_ms`` and ``retry_max_ms``: half fixed, half random, and
    never under 10 ms, whatever the catalog says (no tight retry loop)."""
    cap = max_ms / 1000.0
    return Backoff(base=min(base_ms / 1000.0, cap), cap=cap, jitter=0.5, floor=0.01)


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
        self.on_caught_up = on_caught_up
        self.wake = asyncio.Event()
        self.owning = False
        self.finished = False
        self.events_applied = 0
        self.batches = 0
        self.dead_lettered = 0
        self.reconnects = 0
        self.checkpoint: Checkpoint = START
        # Sent with the checkpoint: generations never repeat, so a batch,
        # failure or dead letter of a replaced projection is refused (AU006)
        # even at the checkpoint its successor starts from.
        self.generation: int | None = generation
        self._pinned_generation = generation
        self.policy = RetryPolicy(dead_letter_queue=dead_letter_queue)
        self.isolation = Isolation()
        self._settings_loaded_at = 0.0
        self._stop = asyncio.Event()
        # A partition's share among the daemons running its processor
        # (aura_pg.projection.balance); None: take it whenever it is free.
        self.share: PartitionShare | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Own and run the projection until ``stop`` is set; survives
        connection loss, database restarts and losing the ownership.
        Raises UnknownProjection when the projection's row is gone."""
        self._stop = stop
        bind(projection=self.name)  # this task's log lines name the projection
        reconnect = self.settings.reconnect_backoff()
        failures = 0
        while not stop.is_set() and not self.finished:
            conn: psycopg.AsyncConnection[Any] | None = None
            try:
                if self.share is not None and not self.share.may_take():
                    # Our share is full: wait for it to grow, holding no connection.
                    await wait(stop, self.settings.poll_interval)
                    continue
                conn = await connect(self.dsn, self.settings, f"projector {self.name}")
                if not await self._acquire(conn, stop):
                    if stop.is_set():
                        return
                    continue  # our share filled up meanwhile (the connection is closed)
                applied_before = self.events_applied
                owned_at = time.monotonic()
                try:
                    await self._work(conn, stop)
                finally:
                    # It worked for a while: reconnect quickly next time. (A
                    # connection that fails at once keeps backing off.)
                    if self.events_applied > applied_before or time.monotonic() - owned_at > 10:
                        failures = 0
                await self._release(conn)
            except ProjectionReplaced:
                if conn is not None:
                    await self._release(conn)  # claimed the successor: not ours
                raise
            except (psycopg.OperationalError, ConnectionLost) as exc:
                self.owning = False  # not while it waits to reconnect
                self.reconnects += 1
                failures += 1
                delay = reconnect.delay(failures)
                metrics.record_projection_error(self.name, "connection")
                log.warning(
                    "projection %s: connection lost (%s); reconnecting in %.1fs",
                    self.name,
                    exc,
                    delay,
                )
                await wait(stop, delay)
            finally:
                self.owning = False
                if conn is not None:
                    await conn.close()

    def _at_checkpoint(self) -> dict[str, Any]:
        """The parameters that name where this runner is: every write sends
        them, for the database's compare-and-set."""
        return {
            "name": self.name,
            "transaction_id": str(self.checkpoint.transaction_id),
            "position": self.checkpoint.global_position,
            "owner": self.settings.owner,
            "generation": self.generation,
        }

    async def _acquire(self, conn: psycopg.AsyncConnection[Any], stop: asyncio.Event) -> bool:
        waiting_logged = False
        while not stop.is_set():
            if self.share is not None and not self.share.may_take():
                return False
            row = await fetch_one(conn, queries()["try_lock"], {"name": self.name})
            if row and row[0]:
                claimed = await fetch_one(
                    conn, queries()["claim"], {"name": self.name, "owner": self.settings.owner}
                )
                self._load(claimed)
                self.owning = True
                log.info(
                    "projection %s: owned by %s from checkpoint %s",
                    self.name,
                    self.settings.owner,
                    self.checkpoint,
                )
                return True
            if not waiting_logged:
                log.info("projection %s: owned by another daemon; standing by", self.name)
                waiting_logged = True
            await wait(stop, self.settings.poll_interval)
        return False

    async def _release(self, conn: psycopg.AsyncConnection[Any]) -> None:
        with contextlib.suppress(psycopg.Error):
            await conn.execute(
                queries()["release"], {"name": self.name, "owner": self.settings.owner}
            )
            await conn.execute(queries()["unlock"], {"name": self.name})
        log.info("projection %s: released", self.name)

    def _load(self, row: tuple[Any, ...] | None, *, settings_only: bool = False) -> None:
        """Take the checkpoint row (``claim`` or ``load``): the settings, and
        unless ``settings_only`` the checkpoint, generation and circuit, with
        the isolation state afresh."""
        if row is None or row[0] is None:
            raise UnknownProjection(f"unknown projection {self.name!r}")
        (
            transaction_id,
            position,
            _status,
            batch_size,
            max_retries,
            retry_base_ms,
            retry_max_ms,
            circuit_state,
            _circuit_open_until,
            generation,
        ) = row
        self.policy = replace(
            self.policy,
            batch_size=batch_size,
            max_retries=max_retries,
            retry_base_ms=retry_base_ms,
            retry_max_ms=retry_max_ms,
        )
        self._settings_loaded_at = time.monotonic()
        if not settings_only:
            if self._pinned_generation is not None and generation != self._pinned_generation:
                raise ProjectionReplaced(
                    f"projection {self.name!r} was restarted, reset or swapped (generation "
                    f"{generation}, not {self._pinned_generation})"
                )
            self.checkpoint = Checkpoint(int(transaction_id), position)
            self.generation = generation
            self.isolation = Isolation.loaded(circuit_state)

    async def _reload(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._load(await fetch_one(conn, queries()["load"], {"name": self.name}))

    async def _work(self, conn: psycopg.AsyncConnection[Any], stop: asyncio.Event) -> None:
        while not stop.is_set():
            outcome = await self.step(conn)
            if outcome is StepOutcome.FINISHED:
                self.finished = True
                return
            if self.share is not None and self.share.should_yield(self):
                log.info(
                    "projection %s: handed back to spread %s's partitions over its daemons",
                    self.name,
                    self.share.processor,
                )
                return
            if outcome is StepOutcome.IDLE:
                if time.monotonic() - self._settings_loaded_at > self.SETTINGS_REFRESH_SECONDS:
                    row = await fetch_one(conn, queries()["load"], {"name": self.name})
                    self._load(row, settings_only=True)
                await wait(stop, self.settings.poll_interval, self.wake)

    async def step(self, conn: psycopg.AsyncConnection[Any]) -> StepOutcome:
        """One batch: apply it, or handle its failure."""
        params = {
            **self._at_checkpoint(),
            "limit": self.isolation.batch_limit(),
            "traced": tracing.recording(),
            "bounds": len(metrics.LATENCY_BOUNDS),
            "negated_bounds": metrics.NEGATED_LATENCY_BOUNDS,
        }
        start_ns = time.time_ns()
        started = time.perf_counter()
        try:
            result = await self._apply_batch(conn, params)
        except StaleCheckpoint as exc:
            metrics.record_projection_error(self.name, "stale_checkpoint")
            tracing.record_batch_spans(self.name, start_ns, time.time_ns(), (), error=exc)
            log.warning("projection %s: %s; reloading", self.name, exc)
            await self._reload(conn)
            return StepOutcome.BUSY
        except BatchFailed as exc:
            tracing.record_batch_spans(self.name, start_ns, time.time_ns(), (), error=exc)
            return await self._failed(conn, exc.message, exc.sqlstate)
        except psycopg.Error as exc:
            tracing.record_batch_spans(self.name, start_ns, time.time_ns(), (), error=exc)
            message = (exc.diag.message_primary if exc.diag else None) or str(exc)
            return await self._failed(conn, message, exc.sqlstate)
        duration = time.perf_counter() - started
        self.checkpoint = result.checkpoint
        if result.applied:
            metrics.record_applied_batch(
                self.name, result.counts_by_type(), duration, result.end_to_end()
            )
            tracing.record_batch_spans(
                self.name,
                start_ns,
                time.time_ns(),
                result.traced_events(),
                attributes={"aura.checkpoint": str(result.checkpoint)},
            )
        if result.status == "paused":
            self.isolation = self.isolation.paused()
            return StepOutcome.IDLE
        if result.applied:
            self.events_applied += result.applied
            self.batches += 1
            self.isolation = self.isolation.applied(result.applied)
        if result.caught_up and result.status in ("running", "rebuilding"):
            self.isolation = self.isolation.caught_up()
            if self.on_caught_up is not None and await self.on_caught_up(conn):
                return StepOutcome.FINISHED
            return StepOutcome.IDLE
        if result.applied == 0:
            return StepOutcome.IDLE  # the circuit is open
        return StepOutcome.BUSY

    async def _apply_batch(
        self, conn: psycopg.AsyncConnection[Any], params: dict[str, Any]
    ) -> BatchResult:
        """Apply the next batch and advance the checkpoint, in one
        transaction: here ``aura.project_batch``, one statement."""
        # Our own spans describe the batch; an idle poll leaves no trace.
        with tracing.suppress_instrumentation():
            row = await fetch_one(conn, queries()["project_batch"], params)
        assert row is not None
        return BatchResult.from_row(row)

    async def _failed(
        self, conn: psycopg.AsyncConnection[Any], error: str, sqlstate: str | None
    ) -> StepOutcome:
        """The batch failed: narrow it down to the failing event, or deal
        with that event's failure (the isolation state machine decides)."""
        transient = is_momentary(sqlstate)
        self.isolation, failure = self.isolation.batch_failed()
        if failure is BatchFailure.EVENT:
            return await self._event_failed(conn, error, sqlstate, transient)
        if failure is BatchFailure.MEASURE:
            row = await fetch_one(
                conn,
                queries()["pending_events"],
                {"name": self.name, "limit": self.policy.batch_size},
            )
            self.isolation = self.isolation.measured(int(row[0]) if row else 1)
            log.warning(
                "projection %s: batch after %s failed (%s); "
                "retrying it in halves to find the failing event",
                self.name,
                self.checkpoint,
                _reason(error, sqlstate),
            )
        metrics.record_projection_error(self.name, "transient" if transient else "handler")
        return StepOutcome.BUSY

    async def _event_failed(
        self,
        conn: psycopg.AsyncConnection[Any],
        error: str,
        sqlstate: str | None,
        transient: bool,
    ) -> StepOutcome:
        """One event failed: record it, then retry it after a backoff or
        dead-letter it."""
        self.isolation = self.isolation.event_failed(
            self.checkpoint, transient=transient, now=datetime.now(UTC)
        )
        if self.isolation.needs_identity:
            event = await fetch_one(conn, queries()["next_event"], {"name": self.name})
            if event is not None:
                event_id, _, event_type = event
                self.isolation = self.isolation.identified(event_id, event_type)
        suspect = self.isolation.suspect
        assert suspect is not None
        metrics.record_projection_error(
            self.name, "transient" if transient else "handler", suspect.event_type
        )
        try:
            recorded = await fetch_one(
                conn,
                queries()["record_failure"],
                {**self._at_checkpoint(), "error": error, "sqlstate": sqlstate},
            )
        except StaleCheckpoint:
            await self._reload(conn)
            return StepOutcome.BUSY
        failures, circuit_state, _ = recorded or (0, "closed", None)
        self.isolation, verdict = self.isolation.failure_recorded(
            failures, circuit_state, transient=transient, policy=self.policy
        )
        log.warning(
            "projection %s: event after %s failed (attempt %d, %d failures in a row, "
            "circuit %s): %s",
            self.name,
            self.checkpoint,
            suspect.attempts,
            failures,
            circuit_state,
            _reason(error, sqlstate),
            extra={"event_id": str(suspect.event_id), "event_type": suspect.event_type},
        )
        if isinstance(verdict, DeadLetter):
            return await self._dead_letter(conn, verdict.suspect, error, sqlstate)
        delay = retry_backoff(self.policy.retry_base_ms, self.policy.retry_max_ms).delay(
            verdict.attempt
        )
        await wait(self._stop, delay)
        return StepOutcome.BUSY

    async def _dead_letter(
        self,
        conn: psycopg.AsyncConnection[Any],
        suspect: Suspect,
        error: str,
        sqlstate: str | None,
    ) -> StepOutcome:
        event = await fetch_one(conn, queries()["next_event"], {"name": self.name})
        if event is None:
            self.isolation = self.isolation.suspect_gone()
            return StepOutcome.BUSY
        event_id, global_position, event_type = event
        try:
            row = await fetch_one(
                conn,
                queries()["dead_letter_next"],
                {
                    **self._at_checkpoint(),
                    "event_id": event_id,
                    "error": error,
                    "sqlstate": sqlstate,
                    "attempts": suspect.attempts,
                    "first_failed_at": suspect.first_failed_at,
                },
            )
        except ProjectionError as exc:  # StaleCheckpoint too
            log.warning("projection %s: not dead-lettered (%s); reloading", self.name, exc)
            await self._reload(conn)
            return StepOutcome.BUSY
        assert row is not None
        dead_letter_id, transaction_id, position = row
        self.checkpoint = Checkpoint(int(transaction_id), position)
        self.dead_lettered += 1
        metrics.record_dead_lettered(event_type)
        log.error(
            "projection %s: event %s (%s, position %s) dead-lettered as #%s after %d attempts: %s",
            self.name,
            event_id,
            event_type,
            global_position,
            dead_letter_id,
            suspect.attempts,
            error,
            extra={"event_id": str(event_id), "event_type": event_type},
        )
        self.isolation = self.isolation.dead_lettered()
        return StepOutcome.BUSY
