"""``aura-pg status``: projections with lag and health, the outbox backlog
and the oldest open transaction; exit 3 when a projection is unhealthy."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import psycopg

from aura_pg.cli import exit_codes
from aura_pg.cli._argtypes import non_negative_seconds
from aura_pg.cli._connection import (
    add_connection_options,
    connection,
    open_database,
    operator_queries,
)
from aura_pg.cli._output import dumps


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "status",
        help=f"projections with lag and health; exit {exit_codes.UNHEALTHY} when one is unhealthy",
        description="Projections with lag and health (green ok, yellow degraded, red "
        "unhealthy), the outbox backlog and the oldest open transaction. Exit status: "
        f"{exit_codes.OK} no projection unhealthy, {exit_codes.ERROR} error, "
        f"{exit_codes.UNHEALTHY} at least one unhealthy.",
    )
    add_connection_options(p, bounded=True)
    p.add_argument("--json", action="store_true", help="a JSON list of the projections")
    p.add_argument(
        "--max-lag",
        type=non_negative_seconds,
        metavar="SECONDS",
        help="count a projection further behind than this as unhealthy (default: only warn)",
    )
    p.set_defaults(handler=run)


HEALTH_OK, HEALTH_DEGRADED, HEALTH_UNHEALTHY = "ok", "degraded", "unhealthy"
_COLOURS = {HEALTH_OK: "\033[32m", HEALTH_DEGRADED: "\033[33m", HEALTH_UNHEALTHY: "\033[31m"}
_RESET = "\033[0m"


def _use_colour() -> bool:
    """ANSI colour only on a terminal, and never with NO_COLOR set (no-color.org)."""
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def _number(value: Any) -> float:
    return float(value) if value is not None else 0.0


def projection_health(row: dict[str, Any], max_lag: float | None = None) -> tuple[str, list[str]]:
    """A projection's health and why: unhealthy (red) when failed, its
    circuit is open, it has dead letters, its owner's session is gone, or
    (with ``max_lag``) it is further behind than that; degraded (yellow)
    when behind, paused, rebuilding, half-open or retrying; ok (green)
    otherwise. Reads ``owner_alive`` only where the view has it."""
    red: list[str] = []
    yellow: list[str] = []
    status, circuit = row.get("status"), row.get("circuit")
    if status == "failed":
        red.append("failed")
    elif status in ("paused", "rebuilding"):
        yellow.append(str(status))
    if circuit == "open":
        red.append("circuit open")
    elif circuit == "half_open":
        yellow.append("circuit half-open")
    dead_letters = int(_number(row.get("dead_letters")))
    if dead_letters:
        red.append(f"{dead_letters} dead letter{'s' if dead_letters != 1 else ''}")
    if row.get("owner_alive") is False:
        red.append("owner not alive")
    behind = int(_number(row.get("events_behind")))
    lag = _number(row.get("seconds_behind"))
    if behind:
        if max_lag is not None and lag > max_lag:
            red.append(f"{lag:g}s behind (over {max_lag:g}s)")
        else:
            yellow.append(f"{behind} event{'s' if behind != 1 else ''} behind")
    failures = int(_number(row.get("consecutive_failures")))
    if failures and status != "failed" and circuit != "open":
        yellow.append(f"retrying ({failures} failures)")
    if row.get("rebuild_needed"):
        yellow.append("rebuild needed")
    if red:
        return HEALTH_UNHEALTHY, red + yellow
    if yellow:
        return HEALTH_DEGRADED, yellow
    return HEALTH_OK, []


def _owner_cell(row: dict[str, Any]) -> str:
    owner = row.get("owner")
    if not owner:
        return "-"
    alive = row.get("owner_alive")
    return f"{owner} (gone)" if alive is False else str(owner)


def _print_table(header: Sequence[str], cells: list[list[str]], colours: list[str]) -> None:
    """Columns padded to the widest cell; ``colours`` (ANSI, or "") wrap a
    row's second cell, after padding, so alignment holds."""
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    for row, colour in zip(cells, colours, strict=True):
        padded = [v.ljust(w) for v, w in zip(row, widths, strict=True)]
        if colour:
            padded[1] = f"{colour}{padded[1]}{_RESET}"
        print("  ".join(padded).rstrip())


def _status_summary(conn: psycopg.Connection[dict[str, Any]], counts: dict[str, int]) -> str:
    queries = operator_queries()
    outbox = conn.execute(queries["outbox_summary"]).fetchone() or {}
    horizon = conn.execute(queries["horizon_summary"]).fetchone() or {}
    parts = [", ".join(f"{n} {health}" for health, n in counts.items() if n) or "no projections"]
    pending = int(_number(outbox.get("pending")))
    text = f"outbox {pending} pending"
    if pending and outbox.get("oldest_pending_seconds") is not None:
        text += f" (oldest {_number(outbox['oldest_pending_seconds']):.1f}s)"
    dead = int(_number(outbox.get("dead")))
    parts.append(text + (f", {dead} dead" if dead else ""))
    if int(_number(horizon.get("open_transactions"))):
        parts.append(
            f"oldest open transaction {_number(horizon.get('oldest_seconds')):.1f}s "
            f"(pid {horizon.get('oldest_pid')})"
        )
    else:
        parts.append("no open writing transaction")
    return " | ".join(parts)


def run(args: argparse.Namespace) -> int:
    """Projections with lag and health. Exit 0 when none is unhealthy,
    3 (UNHEALTHY) when one is, 1 on errors."""
    with open_database(connection(args, bounded=True)) as conn:
        rows = conn.execute(operator_queries()["projection_status"]).fetchall()
        judged = []
        for row in rows:
            health, problems = projection_health(row, args.max_lag)
            judged.append({**row, "health": health, "problems": problems})
        counts = {h: 0 for h in (HEALTH_OK, HEALTH_DEGRADED, HEALTH_UNHEALTHY)}
        for row in judged:
            counts[row["health"]] += 1
        summary = None if args.json else _status_summary(conn, counts)
    if args.json:
        print(dumps(judged, indent=2))
    elif not judged:
        print("no projections registered (aura-pg projections register)")
        print(summary)
    else:
        colour = _use_colour()
        header = (
            "NAME", "HEALTH", "STATUS", "CIRCUIT", "OWNER", "BEHIND", "LAG_S", "FAILURES",
            "DEAD_LETTERS", "PROBLEMS",
        )  # fmt: skip
        cells = [
            [
                str(row["name"]),
                str(row["health"]),
                str(row.get("status") or ""),
                str(row.get("circuit") or ""),
                _owner_cell(row),
                str(int(_number(row.get("events_behind")))),
                f"{_number(row.get('seconds_behind')):.1f}",
                str(int(_number(row.get("consecutive_failures")))),
                str(int(_number(row.get("dead_letters")))),
                "; ".join(row["problems"]) or "-",
            ]
            for row in judged
        ]
        colours = [_COLOURS[row["health"]] if colour else "" for row in judged]
        _print_table(header, cells, colours)
        print()
        print(summary)
    return exit_codes.UNHEALTHY if counts[HEALTH_UNHEALTHY] else exit_codes.OK
