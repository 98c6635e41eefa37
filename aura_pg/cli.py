"""The ``aura-pg`` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg

from aura_pg import migrate, projection_admin
from aura_pg.catalog import load_catalog
from aura_pg.errors import AuraPgError
from aura_pg.localdb import LocalCluster, temporary_cluster
from aura_pg.models import NO_STREAM, NewEvent
from aura_pg.observability.command import (
    add_observability_options,
    configure_command_logging,
    observed_daemon,
)
from aura_pg.observability.tracing import configure_tracing
from aura_pg.projector import (
    WAKE_SOURCES,
    ProjectorDaemon,
    ProjectorSettings,
    WakeSource,
    default_owner,
    register_projections,
)
from aura_pg.relay import add_relay_command
from aura_pg.store import EventStore

DEFAULT_DATA_DIR = Path(".aura-pg/cluster/data")
DEFAULT_PORT = 54329


def _dsn(args: argparse.Namespace) -> str:
    # An empty string lets libpq take everything from PG* variables.
    return str(args.dsn if args.dsn is not None else os.environ.get("AURA_PG_DSN", ""))


def _cluster(args: argparse.Namespace) -> LocalCluster:
    return LocalCluster(Path(args.data_dir), port=args.port)


def cmd_migrate(args: argparse.Namespace) -> int:
    if args.sql:
        sys.stdout.write(migrate.upgrade_sql(args.revision))
        return 0
    dsn = _dsn(args)
    if args.check:
        migrate.check_current(dsn)
        print(f"schema is current (revision {migrate.head_revision()})")
        return 0
    migrate.upgrade(dsn, args.revision)
    print(f"schema at revision {migrate.current_revision(dsn)}")
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    if args.action == "start":
        cluster.start()
        print(cluster.dsn())
    elif args.action == "stop":
        cluster.stop()
    elif args.action == "destroy":
        cluster.destroy()
    else:
        running = cluster.initialized and cluster.is_running()
        print(f"{'running' if running else 'stopped'}: {cluster.data_dir} ({cluster.dsn()})")
        return 0 if running else 3
    return 0


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


def cmd_smoke(args: argparse.Namespace) -> int:
    if not args.local:
        print(json.dumps(smoke(_dsn(args)), indent=2))
        return 0
    with temporary_cluster(prefix="aura-pg-smoke-") as cluster:
        print(json.dumps(smoke(cluster.dsn()), indent=2))
    return 0


def _configure_logging(verbose: bool, log_format: str = "auto") -> None:
    configure_command_logging(logging.DEBUG if verbose else logging.INFO, log_format)


def _stop_on_signals() -> asyncio.Event:
    """An event that SIGTERM and SIGINT set: the daemon finishes its batches
    in flight, releases its projections and exits 0."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


def _settings(args: argparse.Namespace, wake: WakeSource) -> ProjectorSettings:
    return ProjectorSettings(
        poll_interval=args.poll_interval,
        wake=wake,
        shutdown_timeout=args.shutdown_timeout,
        owner=args.owner or default_owner(),
        synchronous_commit=not args.async_commit,
    )


def cmd_project(args: argparse.Namespace) -> int:
    _configure_logging(args.verbose, args.log_format)
    specs = load_catalog(args.catalog).select(args.names)
    daemon = ProjectorDaemon(_dsn(args), specs, _settings(args, wake=args.wake))

    projections = [spec.name for spec in specs]
    with observed_daemon(_dsn(args), args, "projector", projections) as heartbeat:

        async def main() -> None:
            stop = _stop_on_signals()
            beating = asyncio.create_task(heartbeat.run(stop))
            try:
                await daemon.run(stop)
            finally:
                stop.set()
                await beating

        asyncio.run(main())
    return 0


def _print_rows(rows: list[dict[str, Any]], as_json: bool, columns: Sequence[str]) -> None:
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        print("(none)")
        return
    cells = [[("" if row[c] is None else str(row[c]))[:60] for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


STATUS_COLUMNS = (
    "name",
    "status",
    "circuit",
    "owner",
    "checkpoint",
    "events_applied",
    "events_behind",
    "seconds_behind",
    "consecutive_failures",
    "dead_letters",
    "rebuild_needed",
    "last_error",
)
DEAD_LETTER_COLUMNS = (
    "id",
    "projection",
    "global_position",
    "stream_id",
    "event_type",
    "attempts",
    "error",
)


def _rebuild_progress(interactive: bool) -> Any:
    log = logging.getLogger("aura_pg.rebuild")

    def show(p: projection_admin.RebuildProgress) -> None:
        total = p.applied + p.remaining
        percent = 100.0 * p.applied / total if total else 100.0
        eta = f"{p.eta_seconds:.0f}s" if p.eta_seconds is not None else "?"
        line = (
            f"{p.applied}/{total} events ({percent:.1f}%), "
            f"{p.events_per_second:.0f} events/s, ETA {eta}"
        )
        if interactive:
            filled = int(percent / 100 * 30)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {line}   ")
            sys.stderr.flush()
        else:
            log.info("rebuild progress: %s", line)

    return show


def cmd_projections(args: argparse.Namespace) -> int:
    dsn = _dsn(args)
    action = args.action
    if action == "status":
        _print_rows(projection_admin.status(dsn), args.json, STATUS_COLUMNS)
    elif action == "register":
        specs = load_catalog(args.catalog).select(args.names)

        async def register() -> dict[str, str]:
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                return await register_projections(conn, specs)

        for name, outcome in asyncio.run(register()).items():
            print(f"{name}: {outcome}")
    elif action == "pause":
        print(f"{args.name}: {projection_admin.pause(dsn, args.name)}")
    elif action == "resume":
        print(f"{args.name}: {projection_admin.resume(dsn, args.name)}")
    elif action == "reset":
        if not args.yes:
            print(
                "reset empties the read model and replays it in place (readers see it refill); "
                "use `rebuild` for a swap readers never notice, or pass --yes",
                file=sys.stderr,
            )
            return 2
        print(f"{args.name}: {projection_admin.reset(dsn, args.name)}")
    elif action == "replay":
        count = projection_admin.replay_stream(dsn, args.name, args.stream_id, args.from_version)
        print(f"{args.name}: replayed {count} events of {args.stream_id}")
    elif action == "rebuild":
        return _rebuild(args, dsn)
    elif action == "dead-letters":
        _print_rows(projection_admin.dead_letters(dsn, args.name), args.json, DEAD_LETTER_COLUMNS)
    elif action == "retry-dead-letter":
        print(f"dead letter {args.id}: {projection_admin.retry_dead_letter(dsn, args.id)}")
    elif action == "skip-dead-letter":
        print(
            f"dead letter {args.id}: {projection_admin.skip_dead_letter(dsn, args.id, args.note)}"
        )
    return 0


def _rebuild(args: argparse.Namespace, dsn: str) -> int:
    if args.abort:
        print(f"{args.name}: {projection_admin.abort_rebuild(dsn, args.name)}")
        return 0
    _configure_logging(False)
    spec = load_catalog(args.catalog).get(args.name)
    interactive = sys.stderr.isatty()

    async def main() -> projection_admin.RebuildResult | None:
        return await projection_admin.rebuild(
            dsn,
            spec,
            _settings(args, wake="poll"),
            progress=_rebuild_progress(interactive),
            stop=_stop_on_signals(),
        )

    result = asyncio.run(main())
    if interactive:
        sys.stderr.write("\n")
    if result is None:
        print(f"{args.name}: rebuild interrupted; run the command again to resume it")
        return 1
    print(
        f"{args.name}: rebuilt and swapped in ({result.events_applied} events in "
        f"{result.seconds:.1f}s)"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from aura_pg.demo import run_demo

    provider = configure_tracing("aura-pg-demo")  # OTEL_TRACES_EXPORTER=console shows spans
    try:
        run_demo(
            args.dsn if args.dsn is not None else os.environ.get("AURA_PG_DSN"),
            debates=args.debates,
            agents=args.agents,
            seed=args.seed,
            workers=args.workers,
        )
    except KeyboardInterrupt:
        print("\naura-pg demo: interrupted", file=sys.stderr)
        return 130
    finally:
        if provider is not None:
            provider.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aura-pg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_dsn(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dsn", help="libpq connection string (default: $AURA_PG_DSN, then PG*)")

    p = sub.add_parser("migrate", help="apply the schema migrations")
    with_dsn(p)
    p.add_argument("--sql", action="store_true", help="print the SQL instead of running it")
    p.add_argument("--check", action="store_true", help="exit 1 unless the schema is current")
    p.add_argument("--revision", default="head")
    p.set_defaults(handler=cmd_migrate)

    p = sub.add_parser("db", help="a private local Postgres cluster for development")
    p.add_argument("action", choices=["start", "stop", "status", "destroy"])
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.set_defaults(handler=cmd_db)

    p = sub.add_parser("smoke", help="migrate, append and read back a few events")
    with_dsn(p)
    p.add_argument(
        "--local", action="store_true", help="on a throw-away local cluster started for the run"
    )
    p.set_defaults(handler=cmd_smoke)

    def with_daemon_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--catalog", help="catalog.yaml (default: the shipped projections/)")
        p.add_argument("--poll-interval", type=float, default=1.0, metavar="SECONDS")
        p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS")
        p.add_argument("--owner", help="name in checkpoint rows (default: host:pid)")
        p.add_argument(
            "--async-commit",
            action="store_true",
            help="commit batches without waiting for the WAL flush (a crash loses the last "
            "batches together with their checkpoint; they are applied again)",
        )

    p = sub.add_parser("project", help="run projections (all in the catalog, or the named ones)")
    with_dsn(p)
    with_daemon_options(p)
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument(
        "--wake",
        choices=WAKE_SOURCES,
        default="watch",
        help="how runners learn of new events besides their poll: watch the read horizon "
        "every 10 ms (default), LISTEN for NOTIFY from writers with aura.notify = on, "
        "or poll only",
    )
    p.add_argument(
        "--no-listen",
        dest="wake",
        action="store_const",
        const="poll",
        help="the same as --wake poll (kept for older deployments)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    add_observability_options(p)
    p.set_defaults(handler=cmd_project)

    p = sub.add_parser("projections", help="inspect and operate projections")
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("status", help="status, checkpoint, backlog and errors")
    a.add_argument("--json", action="store_true")
    a = actions.add_parser("register", help="install or update catalog entries without running")
    a.add_argument("--catalog")
    a.add_argument("names", nargs="*", metavar="NAME")
    for action, text in (("pause", "stop applying events"), ("resume", "apply events again")):
        a = actions.add_parser(action, help=text)
        a.add_argument("name")
    a = actions.add_parser("reset", help="empty a read model and replay it in place")
    a.add_argument("name")
    a.add_argument("--yes", action="store_true")
    a = actions.add_parser("rebuild", help="rebuild into a shadow and swap it in atomically")
    a.add_argument("name")
    a.add_argument("--abort", action="store_true", help="drop a rebuild in progress")
    with_daemon_options(a)
    a = actions.add_parser("replay", help="apply one stream's events again (targeted repair)")
    a.add_argument("name")
    a.add_argument("stream_id")
    a.add_argument("--from-version", type=int, default=1)
    a = actions.add_parser("dead-letters", help="list pending dead letters")
    a.add_argument("name", nargs="?")
    a.add_argument("--json", action="store_true")
    a = actions.add_parser("retry-dead-letter", help="apply a dead letter's event now")
    a.add_argument("id", type=int)
    a = actions.add_parser("skip-dead-letter", help="give up on a dead letter")
    a.add_argument("id", type=int)
    a.add_argument("--note")
    for a in actions.choices.values():
        with_dsn(a)
    p.set_defaults(handler=cmd_projections)

    p = sub.add_parser(
        "demo",
        help="simulate debates end to end and print the read models "
        "(on a throw-away local Postgres unless --dsn or $AURA_PG_DSN)",
    )
    p.add_argument("--dsn", help="an existing database (default: start a local one)")
    p.add_argument("--debates", type=int, default=50)
    p.add_argument("--agents", type=int, default=5)
    p.add_argument("--workers", type=int, default=8, help="debates run at once")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=cmd_demo)

    add_relay_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except AuraPgError as exc:
        print(f"aura-pg: {exc}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
