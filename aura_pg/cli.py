"""The ``aura-pg`` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

from aura_pg import migrate
from aura_pg.errors import AuraPgError
from aura_pg.localdb import LocalCluster, free_port
from aura_pg.models import NO_STREAM, NewEvent
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
        return {
            "stream": stream,
            "appended_versions": [e.version for e in first.events],
            "retry_was_duplicate": retry.duplicate,
            "retry_positions_equal": retry.events == first.events,
            "read_back_types": [e.type for e in read_back],
            "stream_version": store.stream_version(stream),
            "read_all_checkpoint": str(page.checkpoint),
        }


def cmd_smoke(args: argparse.Namespace) -> int:
    if not args.local:
        print(json.dumps(smoke(_dsn(args)), indent=2))
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="aura-pg-smoke-"))
    workdir.chmod(0o755)
    cluster = LocalCluster(workdir / "data", port=free_port())
    try:
        cluster.start()
        print(json.dumps(smoke(cluster.dsn()), indent=2))
    finally:
        cluster.destroy()
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
