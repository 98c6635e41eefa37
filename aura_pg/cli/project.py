"""``aura-pg project``: the projector daemon (aura_pg.projection), and the
projector options ``projections rebuild`` and ``shadow`` share with it."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from aura_pg._runtime import serve_until_signal
from aura_pg.cli import exit_codes
from aura_pg.cli._argtypes import positive_seconds
from aura_pg.cli._connection import add_connection_options, connection
from aura_pg.cli._daemon import (
    add_logging_options,
    configure_logging,
    logging_settings,
    observed,
)
from aura_pg.cli.settings import ProjectSettings, flags_given
from aura_pg.projection.catalog import load_catalog
from aura_pg.projection.daemon import ProjectorDaemon
from aura_pg.projection.settings import (
    WAKE_SOURCES,
    ProjectorSettings,
    WakeSource,
    default_owner,
)


def add_projector_options(p: argparse.ArgumentParser) -> None:
    """The options of a command that runs projections (``AURA_PG_PROJECT_*``)."""
    p.add_argument(
        "--catalog",
        help="catalog.yaml (default: $AURA_PG_PROJECT_CATALOG, else the shipped projections/)",
    )
    defaults = ProjectSettings.model_fields
    p.add_argument(
        "--poll-interval",
        type=positive_seconds,
        metavar="SECONDS",
        help="poll for new events this often besides the wake-ups "
        f"(default {defaults['poll_interval'].default})",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=positive_seconds,
        metavar="SECONDS",
        help="after SIGTERM/SIGINT, how long the batches in flight may take "
        f"(default {defaults['shutdown_timeout'].default})",
    )
    p.add_argument("--owner", help="name in checkpoint rows (default: host:pid)")
    p.add_argument(
        "--async-commit",
        action=argparse.BooleanOptionalAction,
        help="commit batches without waiting for the WAL flush (a crash loses the last "
        "batches together with their checkpoint; they are applied again)",
    )


def project_settings(args: argparse.Namespace) -> ProjectSettings:
    """The projector options given over ``AURA_PG_PROJECT_*`` over the defaults."""
    return ProjectSettings.resolve(**flags_given(args, ProjectSettings))


def projector_settings(
    settings: ProjectSettings, wake: WakeSource | None = None
) -> ProjectorSettings:
    """What the runners take; ``wake`` overrides the configured wake-up."""
    return ProjectorSettings(
        poll_interval=settings.poll_interval,
        wake=wake or settings.wake,
        shutdown_timeout=settings.shutdown_timeout,
        owner=settings.owner or default_owner(),
        synchronous_commit=not settings.async_commit,
    )


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "project",
        help="run projections (all in the catalog, or the named ones)",
        description="Run projections until SIGTERM/SIGINT. Every option has an "
        "AURA_PG_PROJECT_* variable (e.g. AURA_PG_PROJECT_POLL_INTERVAL); a flag wins over it.",
    )
    add_connection_options(p)
    add_projector_options(p)
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument(
        "--wake",
        choices=WAKE_SOURCES,
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
    add_logging_options(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    logs = logging_settings(args)
    settings = project_settings(args)
    configure_logging(logs)
    specs = load_catalog(settings.catalog).select(args.names)
    dsn = connection(args).conninfo
    # Python processors' handlers are imported from the working directory
    # (as `python -m` would) or PYTHONPATH.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    daemon = ProjectorDaemon(dsn, specs, projector_settings(settings))
    with observed(dsn, logs, "projector", list(daemon.runners)) as heartbeat:
        asyncio.run(serve_until_signal(daemon.run, heartbeat=heartbeat))
    return exit_codes.OK
