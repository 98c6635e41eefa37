"""``aura-pg doctor``: check the database and its server (aura_pg.doctor);
docs/doctor.md."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from aura_pg.cli import exit_codes
from aura_pg.cli._argtypes import non_negative_seconds, positive_count
from aura_pg.cli._connection import add_connection_options, connection_settings
from aura_pg.doctor import Check, format_json, format_report, overall_status, run_checks
from aura_pg.doctor.checks import DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_TRANSACTION_AGE


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "doctor",
        help="check the database and server for what aura-pg needs",
        description="Check the server version, TimescaleDB, migrations, roles, settings, "
        "open transactions, clock skew and projections. Exit 0 when no check fails, 3 when "
        "one does (or, with --strict, warns), 1 when the settings cannot be used. "
        "See docs/doctor.md.",
    )
    add_connection_options(p)
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.add_argument("--strict", action="store_true", help="exit 3 on warnings too")
    p.add_argument(
        "--max-transaction-age",
        type=non_negative_seconds,
        default=DEFAULT_MAX_TRANSACTION_AGE,
        metavar="SECONDS",
        help="warn about writing transactions open longer, fail at 10 times it "
        "(default %(default)s)",
    )
    p.add_argument(
        "--connect-timeout",
        type=positive_count,
        default=DEFAULT_CONNECT_TIMEOUT,
        metavar="SECONDS",
        help="give up connecting after this long (default %(default)s)",
    )
    p.set_defaults(handler=run)


def exit_code(checks: Sequence[Check], *, strict: bool = False) -> int:
    """0 when nothing failed (nor warned, with ``strict``), else 3 (unhealthy)."""
    status = overall_status(checks)
    if status == "fail" or (status == "warn" and strict):
        return exit_codes.UNHEALTHY
    return exit_codes.OK


def run(args: argparse.Namespace) -> int:
    # An unreadable password file or a bad setting: main reports it.
    conninfo = connection_settings(args).connection().conninfo
    checks = run_checks(
        conninfo,
        max_transaction_age=args.max_transaction_age,
        connect_timeout=args.connect_timeout,
    )
    code = exit_code(checks, strict=args.strict)
    if args.json:
        sys.stdout.write(format_json(checks, exit_code=code))
    else:
        sys.stdout.write(format_report(checks))
    return code
