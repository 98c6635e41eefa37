"""The projector daemon: registers catalog projections and runs each with a
runner of its own (one per partition for a Python processor), beside the
wake-up connection and the shadows of those projections, until stopped.

One asyncio process runs many projections; each is owned by one daemon at a
time (the runner's advisory lock), so a second daemon is a stand-by.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import psycopg

from aura_pg._resources import named_queries
from aura_pg._runtime import can_resend, wait
from aura_pg.errors import CatalogError, UnknownProjection
from aura_pg.models import Checkpoint
from aura_pg.projection.catalog import ProjectionSpec
from aura_pg.projection.connection import connect
from aura_pg.projection.processor import PythonProcessorRunner, handler_of
from aura_pg.projection.registration import check_log_origin, register_projections
from aura_pg.projection.runner import ProjectionRunner
from aura_pg.projection.settings import ProjectorSettings
from aura_pg.projection.wakeups import Listener, LogWatcher

log = logging.getLogger("aura_pg.projector")


class ProjectorDaemon:
    """Registers catalog projections and runs them until stopped."""

    def __init__(
        self,
        dsn: str,
        specs: Sequence[ProjectionSpec] = (),
        settings: ProjectorSettings | None = None,
        *,
        processors: Sequence[ProjectionSpec] = (),
    ) -> None:
        """``specs``: catalog entries of either kind; ``processors``: more
        Python processors (``aura_pg.processors.python_processor``). Their
        handlers are imported here, so a wrong reference fails at once."""
        self.specs = (*specs, *processors)
        if not self.specs:
            raise CatalogError("no projections to run")
        names = [spec.name for spec in self.specs]
        if len(set(names)) != len(names):
            raise CatalogError(
                f"projections named twice: {sorted(n for n in set(names) if names.count(n) > 1)}"
            )
        self.dsn = dsn
        self.settings = settings or ProjectorSettings()
        self.runners: dict[str, ProjectionRunner] = {}
        for spec in self.specs:
            if spec.shadow_of is not None:
                continue  # shadow entries run as NAME__shadow (found below)
            if spec.is_python:
                handler = handler_of(spec)
                for row in spec.row_names:
                    self.runners[row] = PythonProcessorRunner(
                        dsn,
                        row,
                        self.settings,
                        handler=handler,
                        batch_timeout=spec.batch_timeout_seconds,
                        dead_letter_queue=spec.error_handling.dead_letter_queue,
                    )
            else:
                self.runners[spec.name] = ProjectionRunner(
                    dsn,
                    spec.name,
                    self.settings,
                    dead_letter_queue=spec.error_handling.dead_letter_queue,
                )
        self.listener = (
            Listener(dsn, self.settings, self._wake_all) if self.settings.wake == "listen" else None
        )
        self.watcher = (
            LogWatcher(dsn, self.settings, self._wake_behind)
            if self.settings.wake == "watch"
            else None
        )
        self.registered: dict[str, str] = {}
        # The shadows of these projections (aura_pg.projection.shadows), found at
        # registration and then every shadow_discovery_interval.
        self.shadow_runners: dict[str, ProjectionRunner] = {}

    def _wake_all(self) -> None:
        for runner in self.runners.values():
            runner.wake.set()

    def _wake_behind(self, horizon: Checkpoint | None) -> None:
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
            {"names": [spec.shadow_of or spec.name for spec in self.specs if not spec.is_python]},
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
                await wait(stop, self.settings.shadow_discovery_interval)
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
        reconnect = self.settings.reconnect_backoff()
        failures = 0
        while True:
            try:
                await self.register()
                return True
            except psycopg.OperationalError as exc:
                if not can_resend(exc):
                    raise
                failures += 1
                delay = reconnect.delay(failures)
                log.warning("database unreachable (%s); registering again in %.1fs", exc, delay)
            await wait(stop, delay)
            if stop.is_set():
                return False

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
