"""The blue/green rebuild: build ``NAME__rebuild`` from the first event
while the live model keeps serving, then swap it in atomically."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from aura_pg.errors import ProjectionError, StaleCheckpoint, UnknownProjection
from aura_pg.projection.admin import call_function
from aura_pg.projection.catalog import ProjectionSpec
from aura_pg.projection.connection import connect, queries, translate_projection_error
from aura_pg.projection.registration import register_projections
from aura_pg.projection.runner import ProjectionReplaced, ProjectionRunner
from aura_pg.projection.settings import ProjectorSettings

log = logging.getLogger("aura_pg.rebuild")


@dataclass(frozen=True)
class RebuildProgress:
    applied: int
    remaining: int
    events_per_second: float
    elapsed: float

    @property
    def eta_seconds(self) -> float | None:
        if self.events_per_second <= 0:
            return None
        return self.remaining / self.events_per_second


@dataclass(frozen=True)
class RebuildResult:
    name: str
    events_applied: int
    seconds: float


async def rebuild(
    dsn: str,
    spec: ProjectionSpec,
    settings: ProjectorSettings | None = None,
    *,
    progress: Callable[[RebuildProgress], None] | None = None,
    progress_interval: float = 1.0,
    stop: asyncio.Event | None = None,
) -> RebuildResult | None:
    """Rebuild a projection blue/green: build ``NAME__rebuild`` from the
    first event while the live model keeps serving, then swap it in
    atomically (``aura.finish_rebuild``). Resumes an interrupted rebuild.
    Returns None when stopped before the swap (the shadow stays, to resume).
    Raises ProjectionError when another process restarts the rebuild (with
    another definition) or aborts it meanwhile: only the process that began
    a rebuild swaps it in.
    """
    settings = settings or ProjectorSettings(wake="poll", poll_interval=0.2)
    stop = stop or asyncio.Event()
    started = time.monotonic()
    async with await connect(dsn, settings, f"rebuild {spec.name}") as conn:
        await register_projections(conn, [spec])
        try:
            # One transaction: the generation read is the rebuild begun.
            async with conn.transaction():
                cur = await conn.execute(queries()["begin_rebuild"], {"name": spec.name})
                row = await cur.fetchone()
                assert row is not None
                shadow = str(row[0])
                cur = await conn.execute(queries()["generation"], {"name": shadow})
                generation_row = await cur.fetchone()
        except psycopg.Error as exc:
            raise translate_projection_error(exc) or exc from None
        assert generation_row is not None
        generation = int(generation_row[0])

    swapped = asyncio.Event()
    applied_in_swap = 0

    async def finish(runner_conn: psycopg.AsyncConnection[Any]) -> bool:
        nonlocal applied_in_swap
        try:
            cur = await runner_conn.execute(
                queries()["finish_rebuild"],
                {"name": spec.name, "owner": settings.owner, "generation": generation},
            )
            swap_row = await cur.fetchone()
            applied_in_swap = int(swap_row[0]) if swap_row else 0
        except psycopg.OperationalError:
            raise
        except psycopg.Error as exc:
            typed = translate_projection_error(exc)
            if isinstance(typed, StaleCheckpoint):
                raise ProjectionReplaced(str(typed)) from None  # another generation
            if typed is not None:
                # Refused (a schema in the way, outside dependents): trying
                # again would not help.
                raise typed from None
            # A failing event in the tail: the runner's own retry and
            # dead-letter path deals with it, then we try again.
            log.warning("rebuild of %s: the swap failed (%s); trying again", spec.name, exc)
            return False
        swapped.set()
        return True

    runner = ProjectionRunner(
        dsn,
        shadow,
        settings,
        dead_letter_queue=spec.error_handling.dead_letter_queue,
        on_caught_up=finish,
        generation=generation,
    )
    runner_stop = asyncio.Event()

    async def watch() -> None:
        async with await connect(dsn, settings, f"rebuild {spec.name} progress") as watch_conn:
            last_applied, last_time = 0, time.monotonic()
            rate = 0.0
            while not runner_stop.is_set():
                await asyncio.sleep(progress_interval)
                with contextlib.suppress(psycopg.Error):
                    cur = await watch_conn.execute(queries()["events_behind"], {"name": shadow})
                    behind = await cur.fetchone()
                    if behind is None:
                        continue
                    remaining, applied = int(behind[0]), int(behind[1])
                    now = time.monotonic()
                    if now > last_time and applied >= last_applied:
                        current = (applied - last_applied) / (now - last_time)
                        rate = current if rate == 0 else 0.5 * rate + 0.5 * current
                    last_applied, last_time = applied, now
                    if progress is not None:
                        progress(RebuildProgress(applied, remaining, rate, now - started))

    async def relay_stop() -> None:
        await stop.wait()
        runner_stop.set()

    watcher = asyncio.create_task(watch()) if progress is not None else None
    stopper = asyncio.create_task(relay_stop())
    try:
        await runner.run(runner_stop)
    except ProjectionReplaced:
        raise ProjectionError(
            f"the rebuild of {spec.name!r} was restarted by another process (another "
            "definition, or a reset) while this one ran: this one is not swapped in; see "
            "`aura-pg projections status`"
        ) from None
    except UnknownProjection:
        # The shadow row is gone: another rebuild swapped it in, or someone
        # aborted it, while this one stood by or was reconnecting.
        raise ProjectionError(
            f"the rebuild of {spec.name!r} was finished or aborted by another process; "
            "see `aura-pg projections status`"
        ) from None
    finally:
        runner_stop.set()
        stopper.cancel()
        if watcher is not None:
            watcher.cancel()
        await asyncio.gather(stopper, *([watcher] if watcher else []), return_exceptions=True)
    if not swapped.is_set():
        return None
    return RebuildResult(
        spec.name, runner.events_applied + applied_in_swap, time.monotonic() - started
    )


def abort_rebuild(dsn: str, name: str) -> str:
    return str(call_function(dsn, queries()["abort_rebuild"], {"name": name}))
