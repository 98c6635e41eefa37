"""``aura-pg migrate``: apply the schema migrations, print their SQL, or
check that the schema is current."""

from __future__ import annotations

import argparse
import sys

from aura_pg import migrate
from aura_pg.cli import exit_codes
from aura_pg.cli._connection import add_connection_options, connection, preflight
from aura_pg.errors import MigrationError


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("migrate", help="apply the schema migrations")
    add_connection_options(p)
    p.add_argument("--sql", action="store_true", help="print the SQL instead of running it")
    p.add_argument(
        "--check",
        action="store_true",
        help=f"exit {exit_codes.UNHEALTHY} unless the schema is current (nothing is changed)",
    )
    p.add_argument("--revision", default="head")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.sql:
        sys.stdout.write(migrate.upgrade_sql(args.revision))
        return exit_codes.OK
    resolved = connection(args)
    preflight(resolved, check_schema=False)
    dsn = resolved.conninfo
    if args.check:
        try:
            migrate.check_current(dsn)
        except MigrationError as exc:
            print(f"aura-pg: {resolved.mask(str(exc))}", file=sys.stderr)
            return exit_codes.UNHEALTHY
        print(f"schema is current (revision {migrate.head_revision()})")
        return exit_codes.OK
    migrate.upgrade(dsn, args.revision)
    print(f"schema at revision {migrate.current_revision(dsn)}")
    return exit_codes.OK
