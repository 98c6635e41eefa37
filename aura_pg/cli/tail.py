"""``aura-pg tail``: follow the global log live, in commit order."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

import psycopg

from aura_pg.cli import exit_codes
from aura_pg.cli._argtypes import positive_count, positive_seconds
from aura_pg.cli._connection import (
    add_connection_options,
    connection,
    open_database,
    operator_queries,
)
from aura_pg.cli._output import compact, dumps
from aura_pg.errors import AuraPgError
from aura_pg.models import START, Checkpoint


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("tail", help="follow the global log live, in commit order (Ctrl-C to stop)")
    start = p.add_mutually_exclusive_group()
    start.add_argument(
        "--from-start", action="store_true", help="from the first event (default: from now)"
    )
    start.add_argument(
        "--from",
        dest="from_checkpoint",
        metavar="CHECKPOINT",
        help="after this checkpoint (TRANSACTION/POSITION, as tail prints it)",
    )
    p.add_argument("--types", metavar="T,...", help="only these event types")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--limit", type=positive_count, metavar="N", help="stop after N events")
    p.add_argument(
        "--interval", type=positive_seconds, default=0.2, metavar="SECONDS", help="poll interval"
    )
    p.add_argument("--batch", type=positive_count, default=500, help=argparse.SUPPRESS)
    add_connection_options(p, bounded=True)
    p.set_defaults(handler=run)


def _tail_start(args: argparse.Namespace, conn: psycopg.Connection[dict[str, Any]]) -> Checkpoint:
    if args.from_start:
        return START
    if args.from_checkpoint is not None:
        try:
            return Checkpoint.parse(args.from_checkpoint)
        except ValueError as exc:
            raise AuraPgError(str(exc)) from None
    row = conn.execute(operator_queries()["read_horizon"]).fetchone()
    if row is None or row["transaction_id"] is None:
        return START
    return Checkpoint(int(row["transaction_id"]), int(row["global_position"]))


def _tail_line(event: dict[str, Any], as_json: bool) -> str:
    checkpoint = f"{event['transaction_id']}/{event['global_position']}"
    if as_json:
        return dumps(
            {
                "checkpoint": checkpoint,
                **event,
                "transaction_id": int(event["transaction_id"]),
            }
        )
    return (
        f"{checkpoint}  {event['recorded_at'].isoformat()}  "
        f"{event['stream_id']}@{event['version']}  {event['type']}  {compact(event['data'])}"
    )


def run(args: argparse.Namespace) -> int:
    """Follow the global log in commit order, from the current head (or the
    start, or a checkpoint), polling. Each event exactly once: the checkpoint
    is the (transaction id, position) of the last one printed, and read_all
    only returns events below every transaction still running."""
    resolved = connection(args, bounded=True)
    types = [t.strip() for t in args.types.split(",") if t.strip()] if args.types else None
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    printed = 0
    with open_database(resolved) as conn:
        after = _tail_start(args, conn)
        # On stderr, so stdout stays the events: where this run starts
        # (`--from` takes it, and each line's first field, to resume).
        print(f"aura-pg tail: following after {after}", file=sys.stderr, flush=True)
        while not stop.is_set():
            batch = args.batch if args.limit is None else min(args.batch, args.limit - printed)
            events = conn.execute(
                operator_queries()["read_all"],
                {
                    "transaction_id": str(after.transaction_id),
                    "position": after.global_position,
                    "limit": batch,
                    "types": types,
                },
            ).fetchall()
            for event in events:
                try:
                    print(_tail_line(event, args.json), flush=True)
                except BrokenPipeError:
                    # The reader went away (| head): stop quietly.
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                    return exit_codes.OK
                after = Checkpoint(int(event["transaction_id"]), int(event["global_position"]))
                printed += 1
            if args.limit is not None and printed >= args.limit:
                break
            if len(events) < batch:
                stop.wait(args.interval)
    return exit_codes.OK
