"""``aura-pg export``: the log as JSON Lines, one event per line in commit
order (aura_pg.jsonl, docs/import-export.md)."""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from typing import IO

from aura_pg import jsonl
from aura_pg.cli import exit_codes
from aura_pg.cli._connection import add_connection_options, connection, preflight
from aura_pg.errors import AuraPgError
from aura_pg.models import Checkpoint
from aura_pg.store import EventStore


def checkpoint(text: str) -> Checkpoint:
    try:
        return Checkpoint.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "export",
        help="write the log as JSON Lines (one event per line, in commit order)",
        description="Write every event (after --after) as one JSON object per line, in "
        "commit order: stream_id, version, type, data, metadata, event_id, "
        "idempotency_key, recorded_at. `aura-pg import jsonl` reads it back; see "
        "docs/import-export.md. The last event's checkpoint goes to stderr, for a "
        "later --after.",
    )
    p.add_argument(
        "--output", "-o", metavar="FILE", help="write to FILE (default: standard output)"
    )
    p.add_argument(
        "--after",
        type=checkpoint,
        metavar="CHECKPOINT",
        help="only events after this checkpoint (TRANSACTION/POSITION, as printed by an "
        "earlier export)",
    )
    add_connection_options(p)
    p.set_defaults(handler=run, prog="aura-pg export")


def run(args: argparse.Namespace) -> int:
    conninfo = connection(args)
    preflight(conninfo)
    target: IO[str]
    try:
        opened = open(args.output, "w", encoding="utf-8") if args.output else None  # noqa: SIM115
    except OSError as exc:
        raise AuraPgError(f"cannot write {args.output}: {exc.strerror}") from None
    with (
        opened or nullcontext(sys.stdout) as target,
        EventStore.connect(conninfo.conninfo, max_size=1) as store,
    ):
        count, last = jsonl.export(store, target, args.after)
    where = f" to {args.output}" if args.output else ""
    after = f"; continue with --after {last}" if last is not None else ""
    print(f"aura-pg export: {count} events{where}{after}", file=sys.stderr)
    return exit_codes.OK
