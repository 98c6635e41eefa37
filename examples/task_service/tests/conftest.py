"""Fixtures for the task service's tests: a migrated database per test
(``aura_dsn`` and ``event_store`` of the aura-pg pytest plugin,
``aura_pg.testing``, loaded by its entry point), the service with a clock
the test moves, and a daemon that runs this service's catalog until
caught up."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import LiteralString

import psycopg
import pytest

from aura_pg import EventStore, ProjectorDaemon, ProjectorSettings, load_catalog
from task_service.service import TaskService

CATALOG = Path(__file__).resolve().parent.parent / "catalog.yaml"

RunCatalog = Callable[..., Awaitable[None]]


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def dsn(aura_dsn: str) -> str:
    return aura_dsn


@pytest.fixture
def store(event_store: EventStore) -> EventStore:
    return event_store


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def service(store: EventStore, clock: Clock) -> TaskService:
    return TaskService(store, clock=clock)


def _status(dsn: str, names: Sequence[str]) -> list[tuple[str, int, int, str]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(
            "SELECT name, events_behind, dead_letters, status FROM aura.projection_status"
            " WHERE split_part(name, '/', 1) = ANY(%s) ORDER BY name",
            (list(names),),
        ).fetchall()


@pytest.fixture
def run_catalog(dsn: str) -> RunCatalog:
    """``await run_catalog()`` runs the catalog's entries (or those named) in a
    daemon until each has applied every event of its types, then stops it.
    A dead letter fails the test: caught up must mean applied."""

    async def run(*names: str, timeout: float = 30.0) -> None:
        catalog = load_catalog(CATALOG)
        specs = catalog.select(names) if names else catalog.projections
        wanted = [spec.name for spec in specs]
        daemon = ProjectorDaemon(
            dsn, specs, ProjectorSettings(poll_interval=0.1, shutdown_timeout=10.0)
        )
        stop = asyncio.Event()
        running = asyncio.create_task(daemon.run(stop))
        deadline = time.monotonic() + timeout
        try:
            while True:
                if running.done():
                    running.result()
                    raise AssertionError("the daemon stopped before catching up")
                rows = await asyncio.to_thread(_status, dsn, wanted)
                assert all(dead == 0 for _, _, dead, _ in rows), f"dead letters: {rows}"
                if len(rows) == len(wanted) and all(
                    behind == 0 and status == "running" for _, behind, _, status in rows
                ):
                    return
                if time.monotonic() > deadline:
                    raise AssertionError(f"not caught up after {timeout}s: {rows}")
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await asyncio.wait_for(running, 20)

    return run


@pytest.fixture
def query(dsn: str) -> Iterator[Callable[..., list[tuple[object, ...]]]]:
    """Run a statement on the test's database, autocommit, and fetch its rows."""
    with psycopg.connect(dsn, autocommit=True) as conn:

        def run(statement: LiteralString, *params: object) -> list[tuple[object, ...]]:
            cur = conn.execute(statement, params)
            return cur.fetchall() if cur.description is not None else []

        yield run
