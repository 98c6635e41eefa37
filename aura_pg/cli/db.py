"""``aura-pg db start|stop|status|destroy``: a private local Postgres
cluster for development (aura_pg.devtools.localdb)."""

from __future__ import annotations

import argparse
from pathlib import Path

from aura_pg.cli import exit_codes
from aura_pg.cli._argtypes import port_number
from aura_pg.config import mask_dsn
from aura_pg.devtools.localdb import LocalCluster

DEFAULT_DATA_DIR = Path(".aura-pg/cluster/data")
DEFAULT_PORT = 54329


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "db",
        help="a private local Postgres cluster for development",
        description="A private local Postgres cluster for development. `status` exits "
        f"{exit_codes.OK} when it runs, {exit_codes.UNHEALTHY} when it does not.",
    )
    p.add_argument("action", choices=["start", "stop", "status", "destroy"])
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    p.add_argument("--port", type=port_number, default=DEFAULT_PORT)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    cluster = LocalCluster(Path(args.data_dir), port=args.port)
    if args.action == "start":
        cluster.start()
        print(mask_dsn(cluster.dsn()))
    elif args.action == "stop":
        cluster.stop()
    elif args.action == "destroy":
        cluster.destroy()
    else:
        running = cluster.initialized and cluster.is_running()
        print(
            f"{'running' if running else 'stopped'}: {cluster.data_dir} ({mask_dsn(cluster.dsn())})"
        )
        return exit_codes.OK if running else exit_codes.UNHEALTHY
    return exit_codes.OK
