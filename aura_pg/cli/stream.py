"""``aura-pg stream show ID``: a stream's events, as ``aura.read_stream``
returns them."""

from __future__ import annotations

import argparse

from aura_pg.cli import exit_codes
from aura_pg.cli._argtypes import positive_count
from aura_pg.cli._connection import (
    add_connection_options,
    connection,
    open_database,
    operator_queries,
)
from aura_pg.cli._output import compact, dumps
from aura_pg.errors import AuraPgError


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("stream", help="inspect a stream")
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("show", help="a stream's events (aura.read_stream)")
    a.add_argument("stream_id", metavar="ID")
    a.add_argument(
        "--from-version",
        type=int,
        metavar="N",
        help="first version to show (default: 1, or the last with --backwards)",
    )
    a.add_argument("--limit", type=positive_count, metavar="N", help="at most N events")
    a.add_argument("--backwards", action="store_true", help="newest first")
    a.add_argument("--json", action="store_true")
    add_connection_options(a, bounded=True)
    a.set_defaults(handler=run)


MAX_VERSION = 2**63 - 1


def run(args: argparse.Namespace) -> int:
    queries = operator_queries()
    with open_database(connection(args, bounded=True)) as conn:
        row = conn.execute(queries["stream_version"], {"stream_id": args.stream_id}).fetchone()
        version = int(row["stream_version"]) if row else 0
        if version == 0:
            raise AuraPgError(f"unknown stream {args.stream_id!r} (it has no events)")
        from_version = args.from_version
        if from_version is None:
            from_version = MAX_VERSION if args.backwards else 1
        events = conn.execute(
            queries["read_stream"],
            {
                "stream_id": args.stream_id,
                "from_version": from_version,
                "limit": args.limit,
                "backwards": args.backwards,
            },
        ).fetchall()
    if args.json:
        print(dumps(events, indent=2))
        return exit_codes.OK
    print(f"stream {args.stream_id!r} at version {version}: {len(events)} events shown")
    for event in events:
        print(
            f"v{event['version']}  position {event['global_position']}  "
            f"{event['recorded_at'].isoformat()}  {event['type']}"
        )
        print(f"    data:     {compact(event['data'])}")
        print(f"    metadata: {compact(event['metadata'])}")
    return exit_codes.OK
