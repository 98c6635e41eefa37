"""``aura-pg projections``: inspect and operate projections (list, register,
pause, resume, reset, replay, rebuild, repartition; shadow, diff and promote are in
aura_pg/cli/shadow.py). Dead letters are ``aura-pg dlq``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable

import psycopg

from aura_pg._runtime import stop_on_signals
from aura_pg.cli import exit_codes, shadow
from aura_pg.cli._argtypes import positive_count
from aura_pg.cli._connection import add_connection_options, connection, preflight
from aura_pg.cli._daemon import configure_quiet_logging
from aura_pg.cli._output import print_rows
from aura_pg.cli.project import add_projector_options, project_settings, projector_settings
from aura_pg.projection import admin as projection_admin
from aura_pg.projection import rebuild as projection_rebuild
from aura_pg.projection.catalog import load_catalog
from aura_pg.projection.registration import register_projections

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
# The short actions: bounded by --statement-timeout.
BOUNDED_ACTIONS = frozenset({"status", "list", "pause", "resume"})


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("projections", help="inspect and operate projections")
    actions = p.add_subparsers(dest="action", required=True)
    for action in ("list", "status"):
        a = actions.add_parser(action, help="status, checkpoint, backlog and errors")
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
    add_projector_options(a)
    a = actions.add_parser("replay", help="apply one stream's events again (targeted repair)")
    a.add_argument("name")
    a.add_argument("stream_id")
    a.add_argument("--from-version", type=positive_count, default=1, metavar="N")
    a = actions.add_parser(
        "repartition", help="split a Python processor into another number of partitions"
    )
    a.add_argument("name")
    a.add_argument("--catalog", help="the catalog whose entry gives the partitions")
    a.add_argument(
        "--partitions", type=positive_count, metavar="N", help="instead of the catalog's"
    )
    for name, a in actions.choices.items():
        add_connection_options(a, bounded=name in BOUNDED_ACTIONS)
        a.set_defaults(handler=run)
    shadow.add_parser(actions)


def run(args: argparse.Namespace) -> int:
    action = args.action
    resolved = connection(args, bounded=action in BOUNDED_ACTIONS)
    preflight(resolved)
    dsn = resolved.conninfo
    if action in ("status", "list"):
        print_rows(projection_admin.status(dsn), args.json, STATUS_COLUMNS)
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
            return exit_codes.USAGE
        print(f"{args.name}: {projection_admin.reset(dsn, args.name)}")
    elif action == "replay":
        count = projection_admin.replay_stream(dsn, args.name, args.stream_id, args.from_version)
        print(f"{args.name}: replayed {count} events of {args.stream_id}")
    elif action == "rebuild":
        return _rebuild(args, dsn)
    elif action == "repartition":
        partitions = args.partitions or load_catalog(args.catalog).get(args.name).partitions
        outcome = projection_admin.repartition(dsn, args.name, partitions)
        print(f"{args.name}: {outcome} ({partitions} partition{'s' * (partitions != 1)})")
    return exit_codes.OK


def _rebuild_progress(interactive: bool) -> Callable[[projection_rebuild.RebuildProgress], None]:
    log = logging.getLogger("aura_pg.rebuild")

    def show(p: projection_rebuild.RebuildProgress) -> None:
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


def _rebuild(args: argparse.Namespace, dsn: str) -> int:
    if args.abort:
        print(f"{args.name}: {projection_rebuild.abort_rebuild(dsn, args.name)}")
        return exit_codes.OK
    settings = project_settings(args)
    spec = load_catalog(settings.catalog).get(args.name)
    # Logs only once there is a rebuild to log (an unknown name logs nothing).
    configure_quiet_logging()
    interactive = sys.stderr.isatty()

    async def main() -> projection_rebuild.RebuildResult | None:
        with stop_on_signals(asyncio.Event()) as stop:
            return await projection_rebuild.rebuild(
                dsn,
                spec,
                projector_settings(settings, wake="poll"),
                progress=_rebuild_progress(interactive),
                stop=stop,
            )

    result = asyncio.run(main())
    if interactive:
        sys.stderr.write("\n")
    if result is None:
        print(f"{args.name}: rebuild interrupted; run the command again to resume it")
        return exit_codes.ERROR
    print(
        f"{args.name}: rebuilt and swapped in ({result.events_applied} events in "
        f"{result.seconds:.1f}s)"
    )
    return exit_codes.OK
