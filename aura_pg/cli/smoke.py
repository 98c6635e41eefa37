"""``aura-pg smoke``: migrate, append and read back a few events, run the
shipped projections until they caught up; the figures as JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid

import psycopg

from aura_pg import migrate
from aura_pg.cli import exit_codes
from aura_pg.cli._connection import add_connection_options, connection, preflight
from aura_pg.devtools.localdb import temporary_cluster
from aura_pg.errors import AuraPgError
from aura_pg.models import NO_STREAM, NewEvent
from aura_pg.projection import admin as projection_admin
from aura_pg.projection.catalog import load_catalog
from aura_pg.projection.daemon import ProjectorDaemon
from aura_pg.projection.settings import ProjectorSettings
from aura_pg.store import EventStore


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("smoke", help="migrate, append and read back a few events")
    add_connection_options(p)
    p.add_argument(
        "--local", action="store_true", help="on a throw-away local cluster started for the run"
    )
    p.set_defaults(handler=run)


def smoke(dsn: str) -> dict[str, object]:
    """Migrate, append and read back a few events; the figures as a dict."""
    migrate.upgrade(dsn)
    stream = f"smoke-{uuid.uuid4()}"
    with EventStore.connect(dsn, max_size=2) as store:
        events = [
            NewEvent("DEBATE_STARTED", {"topic": "Should agents vote?", "agents": 3}),
            NewEvent("DEBATE_ARGUMENT_ADDED", {"agent": "a1", "text": "yes"}),
        ]
        first = store.append(stream, events, NO_STREAM)
        retry = store.append(stream, events, NO_STREAM)
        read_back = store.read_stream(stream)
        page = store.read_all(types=["DEBATE_STARTED"])
        projected = asyncio.run(_project_until_caught_up(dsn))
        with psycopg.connect(dsn, autocommit=True) as conn:
            summary = conn.execute(
                "SELECT events, last_version, last_type FROM stream_summary.streams "
                "WHERE stream_id = %s",
                (stream,),
            ).fetchone()
        return {
            "stream": stream,
            "appended_versions": [e.version for e in first.events],
            "retry_was_duplicate": retry.duplicate,
            "retry_positions_equal": retry.events == first.events,
            "read_back_types": [e.type for e in read_back],
            "stream_version": store.stream_version(stream),
            "read_all_checkpoint": str(page.checkpoint),
            "projections_caught_up": projected,
            "stream_summary_row": list(summary) if summary else None,
        }


async def _project_until_caught_up(dsn: str, timeout: float = 60.0) -> list[str]:
    """Run the shipped projections until none is behind; their names."""
    specs = load_catalog().projections
    daemon = ProjectorDaemon(dsn, specs, ProjectorSettings(poll_interval=0.1, wake="poll"))
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    names = [spec.name for spec in specs]
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline and not task.done():
            rows = projection_admin.status(dsn)
            behind = {row["name"]: row["events_behind"] for row in rows}
            if all(behind.get(name) == 0 for name in names):
                break
            await asyncio.sleep(0.1)
        else:
            raise AuraPgError("the projections did not catch up in time")
    finally:
        stop.set()
        await task
    return names


def run(args: argparse.Namespace) -> int:
    if not args.local:
        resolved = connection(args)
        preflight(resolved, check_schema=False)
        print(json.dumps(smoke(resolved.conninfo), indent=2))
        return exit_codes.OK
    with temporary_cluster(prefix="aura-pg-smoke-") as cluster:
        print(json.dumps(smoke(cluster.dsn()), indent=2))
    return exit_codes.OK
