"""``aura-pg demo``: simulate debates end to end and print the read models
(aura_pg.devtools.demo), on a throw-away local Postgres unless given one;
``--reactive``: the agents are Python processors and carry the debates on
by themselves (aura_pg.devtools.reactive_demo)."""

from __future__ import annotations

import argparse
import sys

from aura_pg.cli import exit_codes
from aura_pg.cli._argtypes import positive_count
from aura_pg.cli._connection import connection, connection_settings
from aura_pg.config import ConfigurationError
from aura_pg.observability.tracing import configure_tracing

MINIMUM_AGENTS = 3


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="simulate debates end to end and print the read models "
        "(on a throw-away local Postgres unless --dsn or $AURA_PG_DSN)",
    )
    p.add_argument("--dsn", help="an existing database (default: start a local one)")
    p.add_argument(
        "--password-file",
        metavar="PATH",
        help="read the password from this file (default: $AURA_PG_PASSWORD_FILE)",
    )
    p.add_argument("--debates", type=positive_count, default=50)
    p.add_argument("--agents", type=positive_count, default=5, help=f"at least {MINIMUM_AGENTS}")
    p.add_argument(
        "--workers",
        type=positive_count,
        default=8,
        help="debates run at once (not with --reactive: the agents' processors set the pace)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--reactive",
        action="store_true",
        help="run each agent as a Python processor in the daemon: the demo only starts "
        "the debates, the agents' reactions do the rest",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.agents < MINIMUM_AGENTS:
        raise ConfigurationError(f"--agents must be at least {MINIMUM_AGENTS}, not {args.agents}")
    # Imported here: the simulator is not needed by the other commands, and
    # the daemons start (and install their signal handlers) sooner without it.
    from aura_pg.devtools.demo import run_demo
    from aura_pg.devtools.reactive_demo import run_reactive_demo

    # No DSN from the flag or AURA_PG_DSN: a throw-away local cluster.
    given = "dsn" in connection_settings(args).model_fields_set
    dsn = connection(args).conninfo if given else None
    provider = configure_tracing("aura-pg-demo")  # OTEL_TRACES_EXPORTER=console shows spans
    try:
        if args.reactive:
            run_reactive_demo(dsn, debates=args.debates, agents=args.agents, seed=args.seed)
        else:
            run_demo(
                dsn, debates=args.debates, agents=args.agents, seed=args.seed, workers=args.workers
            )
    except KeyboardInterrupt:
        print("\naura-pg demo: interrupted", file=sys.stderr)
        return exit_codes.INTERRUPTED
    finally:
        if provider is not None:
            provider.shutdown()
    return exit_codes.OK
