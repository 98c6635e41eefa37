"""Operating projections: status, pause, resume, reset, replay, dead
letters, and the blue/green rebuild. Each is a thin call of the SQL
function of the same name, so psql users and the CLI do the same thing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import dict_row

from aura_pg._resources import named_queries
from aura_pg.catalog import ProjectionSpec
from aura_pg.errors import ProjectionError, StaleCheckpoint, UnknownProjection
from aura_pg.projector import (
    ProjectionReplaced,
    ProjectionRunner,
    ProjectorSettings,
    connect,
    register_projections,
    translate_projection_error,
)
from aura_pg.store.validation import encodable

log = logging.getLogger("aura_pg.rebuild")


def _queries() -> dict[str, Any]:
    return named_queries("queries/projector.sql")


def _checked(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` if every text in it can reach the server: Postgres text
    holds no NUL, and a lone surrogate (undecodable bytes in argv) is not
    UTF-8. Refused with a typed error before anything is sent."""
    for key, value in params.items():
        if isinstance(value, str) and ("\x00" in value or not encodable(value)):
            raise ProjectionError(
                f"invalid {key} {value!r}: it must be UTF-8 text without NUL characters"
            )
    return params


def call_function(dsn: str, query: str, params: dict[str, Any]) -> Any:
    """One operator function's value (first column of the first row), its
    text arguments checked first and its refusals typed."""
    _checked(params)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute(query, params).fetchone()
    except psycopg.Error as exc:
        raise translate_projection_error(exc) or exc from None
    return row[0] if row else None


def status(dsn: str) -> list[dict[str, Any]]:
    """The rows of ``aura.projection_status``."""
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        return conn.execute(_queries()["status"]).fetchall()


def pause(dsn: str, name: str) -> str:
    return str(call_function(dsn, _queries()["pause"], {"name": name}))


def resume(dsn: str, name: str) -> str:
    return str(call_function(dsn, _queries()["resume"], {"name": name}))


def reset(dsn: str, name: str) -> str:
    return str(call_function(dsn, _queries()["reset"], {"name": name}))


def replay_stream(dsn: str, name: str, stream_id: str, from_version: int = 1) -> int:
    return int(
        call_function(
            dsn,
            _queries()["replay_stream"],
            {"name": name, "stream_id": stream_id, "from_version": from_version},
        )
    )


def dead_letters(dsn: str, projection: str | None = None) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        return conn.execute(
            _queries()["dead_letters"], _checked({"projection": projection})
        ).fetchall()


def retry_dead_letter(dsn: str, dead_letter_id: int) -> str:
    return str(call_function(dsn, _queries()["retry_dead_letter"], {"id": dead_letter_id}))


def skip_dead_letter(dsn: str, dead_letter_id: int, note: str | None = None) -> str:
    params = {"id": dead_letter_id, "note": note}
    return str(call_function(dsn, _queries()["skip_dead_letter"], params))


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
                cur = await conn.execute(_queries()["begin_rebuild"], {"name": spec.name})
                row = await cur.fetchone()
                assert row is not None
                shadow = str(row[0])
                cur = await conn.execute(_queries()["generation"], {"name": shadow})
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
                _queries()["finish_rebuild"],
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
                    cur = await watch_conn.execute(_queries()["events_behind"], {"name": shadow})
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
    return str(call_function(dsn, _queries()["abort_rebuild"], {"name": name}))
