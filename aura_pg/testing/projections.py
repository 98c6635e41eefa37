"""Run catalog entries until they have caught up with the log: the
``run_projections`` fixture's engine."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.rows import dict_row

if TYPE_CHECKING:
    from aura_pg.projection.catalog import Catalog, ProjectionSpec

DEFAULT_TIMEOUT = 30.0


class ProjectionsNotCaughtUp(AssertionError):
    """The projections did not catch up in time, or dead-lettered events."""


def resolve_entries(
    entries: Sequence[ProjectionSpec | str], catalog: Catalog | Path | str | None
) -> tuple[ProjectionSpec, ...]:
    """Catalog entries: given ones as they are, names looked up in
    ``catalog`` (a Catalog, a catalog file, default the shipped one)."""
    from aura_pg.projection.catalog import Catalog, load_catalog

    names = [entry for entry in entries if isinstance(entry, str)]
    named: dict[str, ProjectionSpec] = {}
    if names:
        loaded = catalog if isinstance(catalog, Catalog) else load_catalog(catalog)
        named = {spec.name: spec for spec in loaded.select(names)}
    specs = [named[entry] if isinstance(entry, str) else entry for entry in entries]
    # The shadow entries that Catalog.select adds come along.
    specs += [spec for spec in named.values() if spec not in specs]
    if not specs:
        raise ValueError("run_projections: name at least one catalog entry")
    return tuple(specs)


def _status(dsn: str, rows: Sequence[str]) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        return conn.execute(
            "SELECT name, status, events_applied, events_behind, dead_letters,"
            " consecutive_failures, last_error FROM aura.projection_status"
            " WHERE name = ANY(%s) ORDER BY name",
            (list(rows),),
        ).fetchall()


def _describe(status: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"  {row['name']}: {row['status']}, {row['events_behind']} behind, "
        f"{row['dead_letters']} dead letters, last error: {row['last_error']}"
        for row in status
    )


async def _run(dsn: str, specs: tuple[ProjectionSpec, ...], timeout: float) -> list[dict[str, Any]]:
    from aura_pg.projection.daemon import ProjectorDaemon
    from aura_pg.projection.settings import ProjectorSettings

    rows = [row for spec in specs if spec.shadow_of is None for row in spec.row_names]
    daemon = ProjectorDaemon(
        dsn,
        specs,
        ProjectorSettings(poll_interval=0.05, wake="poll", shutdown_timeout=10.0),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    deadline = time.monotonic() + timeout
    status: list[dict[str, Any]] = []
    try:
        while True:
            if task.done():
                task.result()  # the daemon's failure, raised here
                raise ProjectionsNotCaughtUp("the projector daemon stopped before catching up")
            status = await asyncio.to_thread(_status, dsn, rows)
            if len(status) == len(rows) and all(row["events_behind"] == 0 for row in status):
                return status
            if time.monotonic() > deadline:
                raise ProjectionsNotCaughtUp(
                    f"not caught up after {timeout}s:\n{_describe(status)}"
                )
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def run_until_caught_up(
    dsn: str,
    *entries: ProjectionSpec | str,
    catalog: Catalog | Path | str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    allow_dead_letters: bool = False,
) -> list[dict[str, Any]]:
    """Run ``entries`` (catalog entries of either kind, or names in
    ``catalog``) in a ``ProjectorDaemon`` until every one of them has
    ``events_behind = 0`` in ``aura.projection_status``, then stop it.

    Returns their status rows. Raises ProjectionsNotCaughtUp after
    ``timeout`` seconds, or when an event was dead-lettered (unless
    ``allow_dead_letters``). The daemon runs on its own event loop in a
    worker thread, so this works from sync and async tests alike.
    """
    specs = resolve_entries(entries, catalog)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="aura-pg-projections") as pool:
        status = pool.submit(asyncio.run, _run(dsn, specs, timeout)).result()
    if not allow_dead_letters and any(row["dead_letters"] for row in status):
        raise ProjectionsNotCaughtUp(f"events were dead-lettered:\n{_describe(status)}")
    return status
