"""``aura-pg dlq list|retry|skip``: the dead letters of the projections
(``aura.pending_dead_letters``, ``aura.retry_dead_letter``,
``aura.skip_dead_letter`` from psql)."""

from __future__ import annotations

import argparse

from aura_pg.cli import exit_codes
from aura_pg.cli._connection import add_connection_options, connection, preflight
from aura_pg.cli._output import print_rows
from aura_pg.projection import admin as projection_admin

DEAD_LETTER_COLUMNS = (
    "id",
    "projection",
    "global_position",
    "stream_id",
    "event_type",
    "attempts",
    "error",
)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("dlq", help="dead letters: list, retry, skip")
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("list", help="pending dead letters, oldest first")
    a.add_argument("projection", nargs="?", metavar="PROJECTION")
    a.add_argument("--json", action="store_true")
    a = actions.add_parser("retry", help="apply a dead letter's event now")
    a.add_argument("id", type=int)
    a = actions.add_parser("skip", help="give up on a dead letter")
    a.add_argument("id", type=int)
    a.add_argument("--note", help="why, kept with the dead letter")
    for a in actions.choices.values():
        add_connection_options(a, bounded=True)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    resolved = connection(args, bounded=True)
    preflight(resolved)
    dsn = resolved.conninfo
    if args.action == "list":
        print_rows(
            projection_admin.dead_letters(dsn, args.projection), args.json, DEAD_LETTER_COLUMNS
        )
    elif args.action == "retry":
        print(f"dead letter {args.id}: {projection_admin.retry_dead_letter(dsn, args.id)}")
    else:
        print(
            f"dead letter {args.id}: {projection_admin.skip_dead_letter(dsn, args.id, args.note)}"
        )
    return exit_codes.OK
