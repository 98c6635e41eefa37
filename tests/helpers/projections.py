"""Shared helpers for projection tests: the test catalog, a daemon running
in the test's event loop, and the checks that a read model is exactly the
fold of the log (nothing skipped, nothing applied twice)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from aura_pg.projection.catalog import Catalog, load_catalog
from aura_pg.projection.daemon import ProjectorDaemon
from aura_pg.projection.settings import ProjectorSettings

FIXTURE_CATALOG = (
    Path(__file__).resolve().parent.parent / "fixtures" / "projections" / "catalog.yaml"
)


def fixture_catalog() -> Catalog:
    return load_catalog(FIXTURE_CATALOG)


class RunningDaemon:
    """A projector daemon running as a task of the test's event loop."""

    def __init__(
        self, dsn: str, names: Sequence[str], *, catalog: Catalog | None = None, **settings: Any
    ) -> None:
        options: dict[str, Any] = {"poll_interval": 0.2, "shutdown_timeout": 10.0}
        options.update(settings)
        specs = (catalog or fixture_catalog()).select(names)
        self.daemon = ProjectorDaemon(dsn, specs, ProjectorSettings(**options))
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self.daemon.run(self._stop))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.wait_for(self._task, 20)


@asynccontextmanager
async def running_daemon(
    dsn: str, names: Sequence[str], *, catalog: Catalog | None = None, **settings: Any
) -> AsyncIterator[ProjectorDaemon]:
    """A daemon for the named projections of ``catalog`` (the tests' own by
    default) while the block runs."""
    running = RunningDaemon(dsn, names, catalog=catalog, **settings)
    try:
        yield running.daemon
    finally:
        await running.stop()


async def wait_for(check: Callable[[], Any], timeout: float = 15.0, what: str = "") -> Any:
    """Poll ``check`` (sync, run in a thread) until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(check)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or check}")
        await asyncio.sleep(0.05)


def wait_for_sync(check: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or check}")
        time.sleep(0.05)


def query(dsn: str, statement: sql.Composable | str, params: Sequence[Any] = ()) -> list[Any]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(statement, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description is not None else []


def applied_positions(dsn: str, schema: str) -> list[int]:
    rows = query(
        dsn,
        sql.SQL("SELECT global_position FROM {}.applied_events ORDER BY 1").format(
            sql.Identifier(schema)
        ),
    )
    return [row[0] for row in rows]


def log_positions(
    dsn: str, types: Sequence[str] | None = None, exclude: Sequence[int] = ()
) -> list[int]:
    rows = query(
        dsn,
        "SELECT global_position FROM aura.events "
        "WHERE (%s::text[] IS NULL OR type = ANY(%s::text[])) ORDER BY 1",
        (list(types) if types else None, list(types) if types else None),
    )
    return [row[0] for row in rows if row[0] not in set(exclude)]


def stream_counts(dsn: str, schema: str) -> dict[str, tuple[int, int]]:
    rows = query(
        dsn,
        sql.SQL("SELECT stream_id, events, last_version FROM {}.streams").format(
            sql.Identifier(schema)
        ),
    )
    return {row[0]: (row[1], row[2]) for row in rows}


def fold_streams(dsn: str, exclude: Sequence[int] = ()) -> dict[str, tuple[int, int]]:
    """The tally's stream table computed in Python from the log."""
    folded: dict[str, tuple[int, int]] = {}
    for stream_id, version, position in query(
        dsn, "SELECT stream_id, version, global_position FROM aura.events ORDER BY 3"
    ):
        if position in set(exclude):
            continue
        events, last = folded.get(stream_id, (0, 0))
        folded[stream_id] = (events + 1, max(last, version))
    return folded


def assert_exact_fold(dsn: str, schema: str, exclude: Sequence[int] = ()) -> None:
    """The tally in ``schema`` holds every event of the log once (but those
    at the ``exclude``d positions), and only those."""
    assert applied_positions(dsn, schema) == log_positions(dsn, exclude=exclude)
    assert stream_counts(dsn, schema) == fold_streams(dsn, exclude=exclude)


def status_of(dsn: str, name: str) -> dict[str, Any]:
    with psycopg.connect(dsn, autocommit=True, row_factory=psycopg.rows.dict_row) as conn:
        row = conn.execute(
            "SELECT * FROM aura.projection_status WHERE name = %s", (name,)
        ).fetchone()
    assert row is not None, f"no projection {name}"
    return row


def caught_up(dsn: str, name: str) -> bool:
    """Registered, and no event of its types after its checkpoint."""
    rows = query(dsn, "SELECT events_behind FROM aura.projection_status WHERE name = %s", (name,))
    return bool(rows) and rows[0][0] == 0
