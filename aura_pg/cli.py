"""The ``aura-pg`` command."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import decimal
import json
import logging
import os
import signal
import sys
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg
import sqlalchemy.exc
from psycopg.rows import dict_row

from aura_pg import migrate, shadow_command
from aura_pg._argtypes import positive_int
from aura_pg._resources import named_queries
from aura_pg.config import Connection, Settings, add_connection_options, mask_dsn, mask_text
from aura_pg.doctor import add_doctor_command
from aura_pg.errors import AuraPgError, MigrationError
from aura_pg.importer.nats import add_import_command
from aura_pg.localdb import LocalCluster, temporary_cluster
from aura_pg.models import NO_STREAM, START, Checkpoint, NewEvent
from aura_pg.observability.command import (
    add_observability_options,
    configure_command_logging,
    observed_daemon,
)
from aura_pg.observability.tracing import configure_tracing
from aura_pg.outbox.relay import add_relay_command
from aura_pg.projection import admin as projection_admin
from aura_pg.projection import rebuild as projection_rebuild
from aura_pg.projection.catalog import load_catalog
from aura_pg.projection.daemon import ProjectorDaemon
from aura_pg.projection.registration import register_projections
from aura_pg.projection.settings import WAKE_SOURCES, ProjectorSettings, WakeSource, default_owner
from aura_pg.store import EventStore
from aura_pg.store.validation import encodable

DEFAULT_DATA_DIR = Path(".aura-pg/cluster/data")
DEFAULT_PORT = 54329


EXIT_UNHEALTHY = 2
"""`aura-pg status`: at least one projection is unhealthy (red)."""

CONNECTION_HINT = (
    "check --dsn / AURA_PG_DSN, --password-file / AURA_PG_PASSWORD_FILE, "
    "and libpq's PG* variables, PGPASSFILE and service file"
)


class CannotConnect(AuraPgError):
    """The database cannot be reached with the configured connection."""

    hint = CONNECTION_HINT


def _connection(args: argparse.Namespace, *, bounded: bool = False) -> Connection:
    """The one place a command's connection is resolved: flags over
    ``AURA_PG_*`` over libpq's own defaults, the password file applied, and
    (``bounded``) the statement timeout. Remembered on ``args`` so that
    ``main`` can mask error text."""
    connection = Settings.from_args(args).connection(bounded=bounded)
    args.connection = connection
    return connection


def _dsn(args: argparse.Namespace) -> str:
    # An empty DSN lets libpq take everything from PG* variables.
    return _connection(args).conninfo


def _operator_queries() -> dict[str, Any]:
    return named_queries("queries/operator.sql")


def _check_schema(conn: psycopg.Connection[dict[str, Any]], connection: Connection) -> None:
    """Refuse a database that was never migrated or is at an older revision
    than this code; one at a newer revision (a newer release migrated it)
    is used as it is."""
    queries = _operator_queries()
    state = conn.execute(queries["schema_state"]).fetchone()
    assert state is not None
    if not state["schema_exists"]:
        raise MigrationError(
            f"the database at {connection.display} has no aura schema: run `aura-pg migrate`"
        )
    if not state["usable"]:
        raise MigrationError(
            f"role {state['user_name']!r} may not use the aura schema: grant it one of the "
            "aura roles (docs/operators.md)"
        )
    current = None
    if state["migrated"]:
        row = conn.execute(queries["schema_revision"]).fetchone()
        current = row["version_num"] if row else None
    head, known = migrate.head_revision(), migrate.known_revisions()
    if current != head and (current is None or current in known):
        raise migrate.behind(current)


@contextmanager
def _open(
    connection: Connection, *, check_schema: bool = True
) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """A connection (autocommit, rows as dicts) to a reachable database with
    a current schema, or a clear error."""
    try:
        conn = psycopg.connect(connection.conninfo, autocommit=True, row_factory=dict_row)
    except psycopg.OperationalError as exc:
        reason = " ".join(str(exc).removeprefix("connection failed: ").split())
        raise CannotConnect(
            f"cannot connect to {connection.display}: {connection.mask(reason)}"
        ) from None
    except psycopg.Error as exc:
        raise CannotConnect(
            f"invalid connection string {connection.display}: "
            f"{connection.mask(' '.join(str(exc).split()))}"
        ) from None
    with conn:
        if check_schema:
            _check_schema(conn, connection)
        yield conn


def _preflight(connection: Connection, *, check_schema: bool = True) -> None:
    """Fail early, and clearly, when the database is unreachable or not migrated."""
    with _open(connection, check_schema=check_schema):
        pass


def _cluster(args: argparse.Namespace) -> LocalCluster:
    return LocalCluster(Path(args.data_dir), port=args.port)


def cmd_migrate(args: argparse.Namespace) -> int:
    if args.sql:
        sys.stdout.write(migrate.upgrade_sql(args.revision))
        return 0
    connection = _connection(args)
    _preflight(connection, check_schema=False)
    dsn = connection.conninfo
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
        projected = asyncio.run(_project_until_caught_up(dsn))
        with psycopg.connect(dsn, autocommit=True) as conn:
            summary = conn.execute(
                "SELECT events, last_version, last_type FROM stream_summary.streams "
                "WHERE stream_id = %s",
                (stream,),
            ).fetchone()
        return {
            "stream": stream,
            "appended_versions": [e.version for e in first.events],
            "retry_was_duplicate": retry.duplicate,
            "retry_positions_equal": retry.events == first.events,
            "read_back_types": [e.type for e in read_back],
            "stream_version": store.stream_version(stream),
            "read_all_checkpoint": str(page.checkpoint),
            "projections_caught_up": projected,
            "stream_summary_row": list(summary) if summary else None,
        }


async def _project_until_caught_up(dsn: str, timeout: float = 60.0) -> list[str]:
    """Run the shipped projections until none is behind; their names."""
    specs = load_catalog().projections
    daemon = ProjectorDaemon(dsn, specs, ProjectorSettings(poll_interval=0.1, wake="poll"))
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    names = [spec.name for spec in specs]
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline and not task.done():
            rows = projection_admin.status(dsn)
            behind = {row["name"]: row["events_behind"] for row in rows}
            if all(behind.get(name) == 0 for name in names):
                break
            await asyncio.sleep(0.1)
        else:
            raise AuraPgError("the projections did not catch up in time")
    finally:
        stop.set()
        await task
    return names


def cmd_smoke(args: argparse.Namespace) -> int:
    if not args.local:
        connection = _connection(args)
        _preflight(connection, check_schema=False)
        print(json.dumps(smoke(connection.conninfo), indent=2))
        return 0
    with temporary_cluster(prefix="aura-pg-smoke-") as cluster:
        print(json.dumps(smoke(cluster.dsn()), indent=2))
    return 0


def _configure_logging(verbose: bool, log_format: str = "auto") -> None:
    configure_command_logging(logging.DEBUG if verbose else logging.INFO, log_format)


def _stop_on_signals() -> asyncio.Event:
    """An event that SIGTERM and SIGINT set: the daemon finishes its batches
    in flight, releases its projections and exits 0."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


def _settings(args: argparse.Namespace, wake: WakeSource) -> ProjectorSettings:
    return ProjectorSettings(
        poll_interval=args.poll_interval,
        wake=wake,
        shutdown_timeout=args.shutdown_timeout,
        owner=args.owner or default_owner(),
        synchronous_commit=not args.async_commit,
    )


def cmd_project(args: argparse.Namespace) -> int:
    _configure_logging(args.verbose, args.log_format)
    specs = load_catalog(args.catalog).select(args.names)
    dsn = _dsn(args)
    daemon = ProjectorDaemon(dsn, specs, _settings(args, wake=args.wake))

    projections = [spec.name for spec in specs]
    with observed_daemon(dsn, args, "projector", projections) as heartbeat:

        async def main() -> None:
            stop = _stop_on_signals()
            beating = asyncio.create_task(heartbeat.run(stop))
            try:
                await daemon.run(stop)
            finally:
                stop.set()
                await beating

        asyncio.run(main())
    return 0


def _json_value(value: Any) -> Any:
    """JSON for what psycopg returns: numbers stay numbers, timestamps are
    ISO 8601, intervals are seconds."""
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    return str(value)


def _dumps(value: Any, *, indent: int | None = None) -> str:
    return json.dumps(value, indent=indent, default=_json_value, ensure_ascii=False)


def _print_rows(rows: list[dict[str, Any]], as_json: bool, columns: Sequence[str]) -> None:
    if as_json:
        print(_dumps(rows, indent=2))
        return
    if not rows:
        print("(none)")
        return
    cells = [[("" if row[c] is None else str(row[c]))[:60] for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


STATUS_COLUMNS = (
    "name",
    "status",
    "circuit",
    "owner",
    "checkpoint",
    "events_applied",
    "events_behind",
    "seconds_behind",
    "consecutive_failures",
    "dead_letters",
    "rebuild_needed",
    "last_error",
)
DEAD_LETTER_COLUMNS = (
    "id",
    "projection",
    "global_position",
    "stream_id",
    "event_type",
    "attempts",
    "error",
)


def _rebuild_progress(interactive: bool) -> Any:
    log = logging.getLogger("aura_pg.rebuild")

    def show(p: projection_rebuild.RebuildProgress) -> None:
        total = p.applied + p.remaining
        percent = 100.0 * p.applied / total if total else 100.0
        eta = f"{p.eta_seconds:.0f}s" if p.eta_seconds is not None else "?"
        line = (
            f"{p.applied}/{total} events ({percent:.1f}%), "
            f"{p.events_per_second:.0f} events/s, ETA {eta}"
        )
        if interactive:
            filled = int(percent / 100 * 30)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {line}   ")
            sys.stderr.flush()
        else:
            log.info("rebuild progress: %s", line)

    return show


BOUNDED_PROJECTION_ACTIONS = frozenset(
    {"status", "list", "pause", "resume", "dead-letters", "retry-dead-letter", "skip-dead-letter"}
)


def cmd_projections(args: argparse.Namespace) -> int:
    action = args.action
    connection = _connection(args, bounded=action in BOUNDED_PROJECTION_ACTIONS)
    _preflight(connection)
    dsn = connection.conninfo
    if action in ("status", "list"):
        _print_rows(projection_admin.status(dsn), args.json, STATUS_COLUMNS)
    elif action == "register":
        specs = load_catalog(args.catalog).select(args.names)

        async def register() -> dict[str, str]:
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                return await register_projections(conn, specs)

        for name, outcome in asyncio.run(register()).items():
            print(f"{name}: {outcome}")
    elif action == "pause":
        print(f"{args.name}: {projection_admin.pause(dsn, args.name)}")
    elif action == "resume":
        print(f"{args.name}: {projection_admin.resume(dsn, args.name)}")
    elif action == "reset":
        if not args.yes:
            print(
                "reset empties the read model and replays it in place (readers see it refill); "
                "use `rebuild` for a swap readers never notice, or pass --yes",
                file=sys.stderr,
            )
            return 2
        print(f"{args.name}: {projection_admin.reset(dsn, args.name)}")
    elif action == "replay":
        count = projection_admin.replay_stream(dsn, args.name, args.stream_id, args.from_version)
        print(f"{args.name}: replayed {count} events of {args.stream_id}")
    elif action == "rebuild":
        return _rebuild(args, dsn)
    elif action in shadow_command.ACTIONS:
        if action == "shadow":
            _configure_logging(False)
        return shadow_command.run(args, dsn, lambda: _settings(args, wake="poll"), _stop_on_signals)
    elif action == "dead-letters":
        _print_rows(projection_admin.dead_letters(dsn, args.name), args.json, DEAD_LETTER_COLUMNS)
    elif action == "retry-dead-letter":
        print(f"dead letter {args.id}: {projection_admin.retry_dead_letter(dsn, args.id)}")
    elif action == "skip-dead-letter":
        print(
            f"dead letter {args.id}: {projection_admin.skip_dead_letter(dsn, args.id, args.note)}"
        )
    return 0


def _rebuild(args: argparse.Namespace, dsn: str) -> int:
    if args.abort:
        print(f"{args.name}: {projection_rebuild.abort_rebuild(dsn, args.name)}")
        return 0
    _configure_logging(False)
    spec = load_catalog(args.catalog).get(args.name)
    interactive = sys.stderr.isatty()

    async def main() -> projection_rebuild.RebuildResult | None:
        return await projection_rebuild.rebuild(
            dsn,
            spec,
            _settings(args, wake="poll"),
            progress=_rebuild_progress(interactive),
            stop=_stop_on_signals(),
        )

    result = asyncio.run(main())
    if interactive:
        sys.stderr.write("\n")
    if result is None:
        print(f"{args.name}: rebuild interrupted; run the command again to resume it")
        return 1
    print(
        f"{args.name}: rebuilt and swapped in ({result.events_applied} events in "
        f"{result.seconds:.1f}s)"
    )
    return 0


# --- aura-pg status ----------------------------------------------------------

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
    queries = _operator_queries()
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


def cmd_status(args: argparse.Namespace) -> int:
    """Projections with lag and health. Exit 0 when none is unhealthy,
    2 (EXIT_UNHEALTHY) when one is, 1 on errors."""
    connection = _connection(args, bounded=True)
    with _open(connection) as conn:
        rows = conn.execute(_operator_queries()["projection_status"]).fetchall()
        judged = []
        for row in rows:
            health, problems = projection_health(row, args.max_lag)
            judged.append({**row, "health": health, "problems": problems})
        counts = {h: 0 for h in (HEALTH_OK, HEALTH_DEGRADED, HEALTH_UNHEALTHY)}
        for row in judged:
            counts[row["health"]] += 1
        summary = None if args.json else _status_summary(conn, counts)
    if args.json:
        print(_dumps(judged, indent=2))
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
    return EXIT_UNHEALTHY if counts[HEALTH_UNHEALTHY] else 0


# --- aura-pg dlq -------------------------------------------------------------


def cmd_dlq(args: argparse.Namespace) -> int:
    connection = _connection(args, bounded=True)
    _preflight(connection)
    dsn = connection.conninfo
    if args.action == "list":
        _print_rows(
            projection_admin.dead_letters(dsn, args.projection), args.json, DEAD_LETTER_COLUMNS
        )
    elif args.action == "retry":
        print(f"dead letter {args.id}: {projection_admin.retry_dead_letter(dsn, args.id)}")
    else:
        print(
            f"dead letter {args.id}: {projection_admin.skip_dead_letter(dsn, args.id, args.note)}"
        )
    return 0


# --- aura-pg stream show -----------------------------------------------------

MAX_VERSION = 2**63 - 1


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def cmd_stream(args: argparse.Namespace) -> int:
    connection = _connection(args, bounded=True)
    queries = _operator_queries()
    with _open(connection) as conn:
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
        print(_dumps(events, indent=2))
        return 0
    print(f"stream {args.stream_id!r} at version {version}: {len(events)} events shown")
    for event in events:
        print(
            f"v{event['version']}  position {event['global_position']}  "
            f"{event['recorded_at'].isoformat()}  {event['type']}"
        )
        print(f"    data:     {_compact(event['data'])}")
        print(f"    metadata: {_compact(event['metadata'])}")
    return 0


# --- aura-pg tail ------------------------------------------------------------


def _tail_start(args: argparse.Namespace, conn: psycopg.Connection[dict[str, Any]]) -> Checkpoint:
    if args.from_start:
        return START
    if args.from_checkpoint is not None:
        try:
            return Checkpoint.parse(args.from_checkpoint)
        except ValueError as exc:
            raise AuraPgError(str(exc)) from None
    row = conn.execute(_operator_queries()["read_horizon"]).fetchone()
    if row is None or row["transaction_id"] is None:
        return START
    return Checkpoint(int(row["transaction_id"]), int(row["global_position"]))


def _tail_line(event: dict[str, Any], as_json: bool) -> str:
    checkpoint = f"{event['transaction_id']}/{event['global_position']}"
    if as_json:
        return _dumps(
            {
                "checkpoint": checkpoint,
                **event,
                "transaction_id": int(event["transaction_id"]),
            }
        )
    return (
        f"{checkpoint}  {event['recorded_at'].isoformat()}  "
        f"{event['stream_id']}@{event['version']}  {event['type']}  {_compact(event['data'])}"
    )


def cmd_tail(args: argparse.Namespace) -> int:
    """Follow the global log in commit order, from the current head (or the
    start, or a checkpoint), polling. Each event exactly once: the checkpoint
    is the (transaction id, position) of the last one printed, and read_all
    only returns events below every transaction still running."""
    connection = _connection(args, bounded=True)
    types = [t.strip() for t in args.types.split(",") if t.strip()] if args.types else None
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    printed = 0
    with _open(connection) as conn:
        after = _tail_start(args, conn)
        # On stderr, so stdout stays the events: where this run starts
        # (`--from` takes it, and each line's first field, to resume).
        print(f"aura-pg tail: following after {after}", file=sys.stderr, flush=True)
        while not stop.is_set():
            batch = args.batch if args.limit is None else min(args.batch, args.limit - printed)
            events = conn.execute(
                _operator_queries()["read_all"],
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
                    return 0
                after = Checkpoint(int(event["transaction_id"]), int(event["global_position"]))
                printed += 1
            if args.limit is not None and printed >= args.limit:
                break
            if len(events) < batch:
                stop.wait(args.interval)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from aura_pg.demo import run_demo

    provider = configure_tracing("aura-pg-demo")  # OTEL_TRACES_EXPORTER=console shows spans
    try:
        # No DSN from the flag or AURA_PG_DSN: a throw-away local cluster.
        given = "dsn" in Settings.from_args(args).model_fields_set
        run_demo(
            _connection(args).conninfo if given else None,
            debates=args.debates,
            agents=args.agents,
            seed=args.seed,
            workers=args.workers,
        )
    except KeyboardInterrupt:
        print("\naura-pg demo: interrupted", file=sys.stderr)
        return 130
    finally:
        if provider is not None:
            provider.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aura-pg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("migrate", help="apply the schema migrations")
    add_connection_options(p)
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
    add_connection_options(p)
    p.add_argument(
        "--local", action="store_true", help="on a throw-away local cluster started for the run"
    )
    p.set_defaults(handler=cmd_smoke)

    def with_daemon_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--catalog", help="catalog.yaml (default: the shipped projections/)")
        p.add_argument("--poll-interval", type=float, default=1.0, metavar="SECONDS")
        p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS")
        p.add_argument("--owner", help="name in checkpoint rows (default: host:pid)")
        p.add_argument(
            "--async-commit",
            action="store_true",
            help="commit batches without waiting for the WAL flush (a crash loses the last "
            "batches together with their checkpoint; they are applied again)",
        )

    p = sub.add_parser("project", help="run projections (all in the catalog, or the named ones)")
    add_connection_options(p)
    with_daemon_options(p)
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument(
        "--wake",
        choices=WAKE_SOURCES,
        default="watch",
        help="how runners learn of new events besides their poll: watch the read horizon "
        "every 10 ms (default), LISTEN for NOTIFY from writers with aura.notify = on, "
        "or poll only",
    )
    p.add_argument(
        "--no-listen",
        dest="wake",
        action="store_const",
        const="poll",
        help="the same as --wake poll (kept for older deployments)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    add_observability_options(p)
    p.set_defaults(handler=cmd_project)

    p = sub.add_parser(
        "status",
        help="projections with lag and health; exit 2 when one is unhealthy",
        description="Projections with lag and health (green ok, yellow degraded, red "
        "unhealthy), the outbox backlog and the oldest open transaction. Exit status: 0 no "
        "projection unhealthy, 1 error, 2 at least one unhealthy.",
    )
    add_connection_options(p, bounded=True)
    p.add_argument("--json", action="store_true", help="a JSON list of the projections")
    p.add_argument(
        "--max-lag",
        type=float,
        metavar="SECONDS",
        help="count a projection further behind than this as unhealthy (default: only warn)",
    )
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("projections", help="inspect and operate projections")
    actions = p.add_subparsers(dest="action", required=True)
    for action in ("list", "status"):
        a = actions.add_parser(action, help="status, checkpoint, backlog and errors")
        a.add_argument("--json", action="store_true")
    a = actions.add_parser("register", help="install or update catalog entries without running")
    a.add_argument("--catalog")
    a.add_argument("names", nargs="*", metavar="NAME")
    for action, text in (("pause", "stop applying events"), ("resume", "apply events again")):
        a = actions.add_parser(action, help=text)
        a.add_argument("name")
    a = actions.add_parser("reset", help="empty a read model and replay it in place")
    a.add_argument("name")
    a.add_argument("--yes", action="store_true")
    a = actions.add_parser("rebuild", help="rebuild into a shadow and swap it in atomically")
    a.add_argument("name")
    a.add_argument("--abort", action="store_true", help="drop a rebuild in progress")
    with_daemon_options(a)
    shadow_command.add_actions(actions, with_daemon_options)
    a = actions.add_parser("replay", help="apply one stream's events again (targeted repair)")
    a.add_argument("name")
    a.add_argument("stream_id")
    a.add_argument("--from-version", type=int, default=1)
    a = actions.add_parser("dead-letters", help="list pending dead letters")
    a.add_argument("name", nargs="?")
    a.add_argument("--json", action="store_true")
    a = actions.add_parser("retry-dead-letter", help="apply a dead letter's event now")
    a.add_argument("id", type=int)
    a = actions.add_parser("skip-dead-letter", help="give up on a dead letter")
    a.add_argument("id", type=int)
    a.add_argument("--note")
    for name, a in actions.choices.items():
        add_connection_options(a, bounded=name in BOUNDED_PROJECTION_ACTIONS)
    p.set_defaults(handler=cmd_projections)

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
    p.set_defaults(handler=cmd_dlq)

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
    a.add_argument("--limit", type=positive_int, metavar="N", help="at most N events")
    a.add_argument("--backwards", action="store_true", help="newest first")
    a.add_argument("--json", action="store_true")
    add_connection_options(a, bounded=True)
    p.set_defaults(handler=cmd_stream)

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
    p.add_argument("--limit", type=positive_int, metavar="N", help="stop after N events")
    p.add_argument("--interval", type=float, default=0.2, metavar="SECONDS", help="poll interval")
    p.add_argument("--batch", type=positive_int, default=500, help=argparse.SUPPRESS)
    add_connection_options(p, bounded=True)
    p.set_defaults(handler=cmd_tail)

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
    p.add_argument("--debates", type=int, default=50)
    p.add_argument("--agents", type=int, default=5)
    p.add_argument("--workers", type=int, default=8, help="debates run at once")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=cmd_demo)

    add_relay_command(sub)
    add_import_command(sub)
    add_doctor_command(sub)
    return parser


def _mask(args: argparse.Namespace, text: str) -> str:
    connection = getattr(args, "connection", None)
    return connection.mask(text) if isinstance(connection, Connection) else mask_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    for argument in arguments:
        if not encodable(argument):
            # Bytes that are not UTF-8 reach Python as lone surrogates.
            shown = argument.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            print(f"aura-pg: argument {shown!r} is not valid UTF-8", file=sys.stderr)
            return 2
    args = build_parser().parse_args(arguments)
    try:
        code: int = args.handler(args)
    except CannotConnect as exc:
        print(f"aura-pg: {_mask(args, str(exc))}\nhint: {exc.hint}", file=sys.stderr)
        return 1
    except AuraPgError as exc:
        print(f"aura-pg: {_mask(args, str(exc))}", file=sys.stderr)
        return 1
    except (psycopg.Error, sqlalchemy.exc.DBAPIError) as exc:
        # No traceback for what the database said; never a password.
        cause = getattr(exc, "orig", None) or exc
        text = " ".join(str(cause).split())
        print(f"aura-pg: database error: {_mask(args, text)}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
