"""``aura-pg doctor``: check a database and its server for what aura-pg needs.

Each check runs a read-only query (``sql/queries/doctor.sql``) and says
``ok``, ``warn`` or ``fail``, with a hint for the last two. A check that
cannot run (a permission, a missing view) is reported as such and the others
still run; a database that cannot be reached is one failing ``connect``
check. The exit code is 0 when nothing failed (1 with ``--strict`` when
something warned), 1 when something failed. docs/doctor.md is the guide.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal, LiteralString, TypeAlias

import psycopg
from psycopg.rows import DictRow, dict_row

from aura_pg import migrate
from aura_pg._argtypes import non_negative_float, positive_int
from aura_pg._resources import named_queries
from aura_pg.config import Connection as ConnectionInfo
from aura_pg.config import Settings, add_connection_options
from aura_pg.errors import AuraPgError

Status: TypeAlias = Literal["ok", "warn", "fail"]
Connection: TypeAlias = psycopg.Connection[DictRow]

APPLICATION_NAME: Final = "aura-pg doctor"
DEFAULT_MAX_TRANSACTION_AGE: Final = 60.0
DEFAULT_CONNECT_TIMEOUT: Final = 10

MINIMUM_SERVER_VERSION: Final = 140000
TESTED_SERVER_VERSION: Final = 150000
CLOCK_SKEW_WARN: Final = 1.0
CLOCK_SKEW_FAIL: Final = 10.0
TRANSACTION_AGE_FAIL_FACTOR: Final = 10.0
CONNECTIONS_WARN: Final = 0.8
CONNECTIONS_FAIL: Final = 0.95
# Open transactions and PUBLIC privileges named in one detail line at most.
_LISTED: Final = 3

CHECK_NAMES: Final = (
    "connect",
    "server_version",
    "timescaledb",
    "migrations",
    "roles",
    "idle_in_transaction_timeout",
    "long_transactions",
    "clock_skew",
    "projections",
    "stream_order",
    "connections",
    "durability",
)

_SEVERITY: Final[Mapping[Status, int]] = {"ok": 0, "warn": 1, "fail": 2}
_PRELOADED = re.compile(r"(^|[\s,\"/])timescaledb([\s,\"]|$)")


def _queries() -> dict[str, LiteralString]:
    return named_queries("queries/doctor.sql")


@dataclass(frozen=True, slots=True)
class Check:
    """The outcome of one check."""

    name: str
    status: Status
    detail: str
    hint: str | None = None


# ---------------------------------------------------------------- verdicts
# Pure functions from what the database said to a Check: the queries are in
# the _check_* functions below, the rules here (and unit-tested).


def server_version_check(version_num: int, version: str) -> Check:
    detail = f"PostgreSQL {version}"
    if version_num < MINIMUM_SERVER_VERSION:
        return Check(
            "server_version",
            "fail",
            f"{detail}: older than 14",
            "aura-pg needs PostgreSQL 14 or newer; upgrade the server",
        )
    if version_num < TESTED_SERVER_VERSION:
        return Check(
            "server_version",
            "warn",
            f"{detail}: supported, but aura-pg is tested on 15",
            "upgrade to PostgreSQL 15 or newer, the version the test suite runs on",
        )
    return Check("server_version", "ok", detail)


def timescaledb_check(
    installed_version: str | None, available_version: str | None, preload: str | None
) -> Check:
    preloaded = None if preload is None else bool(_PRELOADED.search(preload))
    preload_note = {
        True: "in shared_preload_libraries",
        False: "not in shared_preload_libraries",
        None: "shared_preload_libraries not visible to this user",
    }[preloaded]
    add_preload = (
        "add timescaledb to shared_preload_libraries in postgresql.conf and restart the server"
    )
    if installed_version is not None:
        detail = f"TimescaleDB {installed_version} installed, {preload_note}"
        if preloaded is False:
            return Check("timescaledb", "fail", detail, add_preload)
        return Check("timescaledb", "ok", detail)
    if available_version is None:
        return Check(
            "timescaledb",
            "warn",
            "TimescaleDB is not installed on the server: the agent_performance read models need it",
            "install TimescaleDB (scripts/install-system.sh does), "
            f"{add_preload}, then run aura-pg migrate",
        )
    detail = (
        f"TimescaleDB {available_version} is available but not created in this database, "
        f"{preload_note}"
    )
    if preloaded is False:
        return Check("timescaledb", "warn", detail, f"{add_preload}, then run aura-pg migrate")
    return Check(
        "timescaledb",
        "warn",
        detail,
        "run aura-pg migrate (it creates the extension where the server preloads it)",
    )


def migrations_check(
    has_schema: bool,
    has_version_table: bool,
    versions: Sequence[str],
    head: str,
    known: Callable[[str], bool],
) -> Check:
    run_migrate = "run aura-pg migrate"
    if not has_schema:
        return Check(
            "migrations",
            "fail",
            f"no aura schema: this database was never migrated (this aura-pg needs {head})",
            run_migrate,
        )
    if not has_version_table:
        return Check(
            "migrations",
            "warn",
            "the aura schema has no aura.alembic_version table (installed with "
            "sql/install.sql?): its version cannot be checked",
            "prefer aura-pg migrate, which records the version; compare the schema with "
            "aura-pg migrate --sql",
        )
    if not versions:
        return Check(
            "migrations",
            "fail",
            f"aura.alembic_version is empty: no revision applied (this aura-pg needs {head})",
            run_migrate,
        )
    current = ", ".join(versions)
    if list(versions) == [head]:
        return Check("migrations", "ok", f"at revision {head} (head)")
    if all(known(v) for v in versions):
        return Check(
            "migrations",
            "fail",
            f"database at revision {current}, this aura-pg needs {head}",
            run_migrate,
        )
    return Check(
        "migrations",
        "fail",
        f"database at revision {current}, which this aura-pg (head {head}) does not know: "
        "a newer aura-pg migrated it",
        "upgrade aura-pg to the version that migrated this database",
    )


def roles_check(
    roles: Sequence[Mapping[str, Any]],
    public_privileges: Sequence[Mapping[str, Any]],
    user_name: str,
    user_is_superuser: bool,
) -> Check:
    fails: list[str] = []
    warns: list[str] = []
    hints: list[str] = []
    for role in roles:
        name = role["role_name"]
        if not role["role_exists"]:
            fails.append(f"{role['kind']} role {name} does not exist")
            hints.append(
                f"CREATE ROLE {name} NOLOGIN, then rerun sql/roles/grants.sql as the migrating role"
            )
            continue
        if role["is_superuser"] or role["bypasses_rls"]:
            fails.append(f"{name} is a superuser or bypasses row security")
            hints.append(f"ALTER ROLE {name} NOSUPERUSER NOBYPASSRLS")
        if role["can_login"]:
            warns.append(f"{name} can log in")
            hints.append(
                f"ALTER ROLE {name} NOLOGIN; log in as users created IN ROLE {name} "
                "(docs/operators.md)"
            )
    if not roles:
        fails.append("aura.role_names is empty")
        hints.append("run aura-pg migrate on a fresh database")
    on_schema = [p["privilege_type"] for p in public_privileges if p["object_kind"] == "schema"]
    on_objects = sorted(
        {
            f"{p['privilege_type']} on {p['object_name']}"
            for p in public_privileges
            if p["object_kind"] != "schema"
        }
    )
    if on_schema:
        fails.append(f"PUBLIC has {', '.join(on_schema)} on schema aura")
        hints.append("REVOKE ALL ON SCHEMA aura FROM PUBLIC")
    if on_objects:
        listed = ", ".join(on_objects[:_LISTED])
        more = f" and {len(on_objects) - _LISTED} more" if len(on_objects) > _LISTED else ""
        warns.append(f"PUBLIC has {listed}{more}")
        hints.append("revoke PUBLIC's privileges on aura objects; rerun sql/roles/grants.sql")
    member = [r["role_name"] for r in roles if r["current_user_member"]]
    user = f"connected as {user_name}{' (superuser)' if user_is_superuser else ''}, " + (
        f"member of {', '.join(member)}" if member else "in no aura role"
    )
    if fails or warns:
        return Check(
            "roles",
            "fail" if fails else "warn",
            "; ".join([*fails, *warns, user]),
            "; ".join(hints),
        )
    names = ", ".join(r["role_name"] for r in roles)
    return Check(
        "roles",
        "ok",
        f"{names} exist, NOLOGIN, not superuser; PUBLIC has no privilege in schema aura; {user}",
    )


def idle_timeout_check(setting: str, unit: str | None, source: str, database: str) -> Check:
    if setting.strip() in ("0", ""):
        return Check(
            "idle_in_transaction_timeout",
            "warn",
            f"idle_in_transaction_session_timeout is 0 (disabled; from {source}): a session "
            "forgotten in an open transaction holds back every projection and global reader "
            "(aura.read_horizon_status) until someone ends it",
            f"ALTER DATABASE {database} SET idle_in_transaction_session_timeout = '5min' "
            "(or ALTER ROLE ... SET for the application roles); docs/doctor.md",
        )
    value = f"{setting} {unit}" if unit else setting
    return Check(
        "idle_in_transaction_timeout",
        "ok",
        f"idle_in_transaction_session_timeout = {value} (from {source})",
    )


def _describe_transaction(row: Mapping[str, Any]) -> str:
    age = f"open {row['age_seconds']:.1f} s"
    where = f"user {row['user_name']}, database {row['database']}"
    if row["kind"] == "prepared":
        return f"prepared transaction {row['gid']!r} ({where}) {age}"
    app = row["application_name"] or "no application name"
    return f"pid {row['pid']} ({app!r}, {where}, {row['state']}) {age}"


def long_transactions_check(
    rows: Sequence[Mapping[str, Any]], max_age: float, sees_all: bool = True
) -> Check:
    visibility = (
        ""
        if sees_all
        else " (only this user's sessions are visible: grant pg_read_all_stats to see all)"
    )
    aged = [r for r in rows if r["age_seconds"] is not None]
    old = [r for r in aged if r["age_seconds"] > max_age]
    if not old:
        if not aged:
            return Check("long_transactions", "ok", f"no open writing transaction{visibility}")
        oldest = aged[0]
        return Check(
            "long_transactions",
            "ok",
            f"{len(aged)} open writing transaction(s), none older than {max_age:g} s "
            f"(oldest {oldest['age_seconds']:.1f} s){visibility}",
        )
    status: Status = "warn"
    if any(r["age_seconds"] > max_age * TRANSACTION_AGE_FAIL_FACTOR for r in old):
        status = "fail"
    listed = "; ".join(_describe_transaction(r) for r in old[:_LISTED])
    more = f"; and {len(old) - _LISTED} more" if len(old) > _LISTED else ""
    hint = (
        "an open transaction holds back every projection and global reader until it ends: "
        "end it, or SELECT pg_terminate_backend(pid); set idle_in_transaction_session_timeout"
    )
    if any(r["kind"] == "prepared" for r in old):
        hint += "; finish prepared transactions with COMMIT PREPARED or ROLLBACK PREPARED 'gid'"
    return Check(
        "long_transactions",
        status,
        f"{len(old)} writing transaction(s) older than {max_age:g} s: {listed}{more}{visibility}",
        hint,
    )


def clock_skew_check(skew: float, uncertainty: float) -> Check:
    """``skew``: server clock minus client clock (seconds); ``uncertainty``:
    half the round trip, within which the skew cannot be told apart."""
    direction = "ahead of" if skew >= 0 else "behind"
    detail = f"server clock {abs(skew):.3f} s {direction} this machine (±{uncertainty:.3f} s)"
    measured = abs(skew) - uncertainty
    hint = (
        "synchronise both clocks (NTP, chrony): recorded_at, seconds_behind and the "
        "lag metrics compare the server's time with the clients'"
    )
    if measured > CLOCK_SKEW_FAIL:
        return Check("clock_skew", "fail", detail, hint)
    if measured > CLOCK_SKEW_WARN:
        return Check("clock_skew", "warn", detail, hint)
    return Check("clock_skew", "ok", detail)


def _projection_problems(row: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    fails: list[str] = []
    warns: list[str] = []
    circuit = row.get("circuit")
    if row.get("status") == "failed" or circuit == "open":
        # The engine marks a projection failed when its circuit opens; the
        # view shows half_open once the pause is over and a retry is due.
        error = f", last error: {row['last_error']}" if row.get("last_error") else ""
        fails.append(
            f"failing (circuit {circuit}, {row.get('consecutive_failures')} consecutive "
            f"failures{error})"
        )
    elif circuit == "half_open":
        warns.append("circuit half open (recovering)")
    if row.get("status") == "paused":
        warns.append("paused")
    dead_letters = row.get("dead_letters") or 0
    if dead_letters:
        warns.append(f"{dead_letters} pending dead letter(s)")
    if row.get("owner") and row.get("owner_alive") is False:
        warns.append(f"owner {row['owner']} is gone (its session ended)")
    if row.get("rebuild_needed"):
        warns.append("definition changed, waiting for a rebuild")
    return fails, warns


def projections_check(rows: Sequence[Mapping[str, Any]]) -> Check:
    if not rows:
        return Check("projections", "ok", "no projection registered")
    failing: list[str] = []
    warning: list[str] = []
    for row in rows:
        fails, warns = _projection_problems(row)
        if fails or warns:
            (failing if fails else warning).append(f"{row['name']}: {', '.join(fails + warns)}")
    if not failing and not warning:
        return Check(
            "projections",
            "ok",
            f"{len(rows)} projection(s), none failing, no dead letters",
        )
    hint = (
        "aura-pg projections status; fix the cause, then aura-pg projections resume NAME, "
        "retry-dead-letter ID or skip-dead-letter ID, or rebuild NAME (docs/projections.md)"
    )
    return Check("projections", "fail" if failing else "warn", "; ".join(failing + warning), hint)


def stream_order_check(streams: int, listed: Sequence[str]) -> Check:
    if not streams:
        return Check("stream_order", "ok", "every stream is read in version order")
    shown = ", ".join(repr(s) for s in listed)
    more = f" and {streams - len(listed)} more" if streams > len(listed) else ""
    return Check(
        "stream_order",
        "warn",
        f"{streams} stream(s) recorded before migration 0009 are read out of version order: "
        f"{shown}{more}",
        "SELECT * FROM aura.stream_order_inversions; projections folded their events in read "
        "order: rebuild those whose fold depends on order, or aura.replay_stream each stream "
        "(docs/event-store.md, per-stream order)",
    )


def connections_check(
    max_connections: int, superuser_reserved: int, reserved: int, client_connections: int
) -> Check:
    available = max(max_connections - superuser_reserved - reserved, 1)
    share = client_connections / available
    detail = (
        f"{client_connections} of {available} connection slots in use ({share:.0%}; "
        f"max_connections {max_connections}, {superuser_reserved + reserved} reserved)"
    )
    hint = (
        "raise max_connections (restart) or pool connections (pgbouncer, smaller pools); "
        "look for idle sessions in pg_stat_activity"
    )
    if share >= CONNECTIONS_FAIL:
        return Check("connections", "fail", detail, hint)
    if share >= CONNECTIONS_WARN:
        return Check("connections", "warn", detail, hint)
    return Check("connections", "ok", detail)


_DURABILITY_RISKS: Final[Mapping[str, str]] = {
    "fsync": "fsync is off: a server or OS crash can corrupt the database",
    "full_page_writes": "full_page_writes is off: a crash can leave torn pages",
    "synchronous_commit": (
        "synchronous_commit is off: a crash loses the last acknowledged commits, so "
        "appends reported as recorded (and outbox messages already published) can vanish"
    ),
}


def durability_check(settings: Mapping[str, str]) -> Check:
    risks = [risk for name, risk in _DURABILITY_RISKS.items() if settings.get(name, "on") == "off"]
    if risks:
        return Check(
            "durability",
            "warn",
            "; ".join(risks),
            "turn them on in postgresql.conf (or ALTER SYSTEM) unless this is a throw-away "
            "test server",
        )
    values = ", ".join(f"{name} {settings.get(name, '?')}" for name in sorted(_DURABILITY_RISKS))
    return Check("durability", "ok", values)


# ---------------------------------------------------------------- queries


def _one(
    conn: Connection, query: LiteralString, params: Mapping[str, Any] | None = None
) -> DictRow:
    row = conn.execute(query, params).fetchone()
    if row is None:
        raise LookupError("the query returned no row")
    return row


def _schema_state(conn: Connection) -> DictRow:
    return _one(conn, _queries()["schema_state"])


def _not_migrated(name: str) -> Check:
    return Check(
        name, "warn", "not checked: no aura schema in this database", "run aura-pg migrate"
    )


def _check_server_version(conn: Connection, _: _Options) -> Check:
    row = _one(conn, _queries()["server"])
    return server_version_check(int(row["version_num"]), str(row["version"]))


def _check_timescaledb(conn: Connection, _: _Options) -> Check:
    row = _one(conn, _queries()["timescaledb"])
    return timescaledb_check(row["installed_version"], row["available_version"], row["preload"])


def _check_migrations(conn: Connection, _: _Options) -> Check:
    state = _schema_state(conn)
    versions: list[str] = []
    if state["has_version_table"]:
        versions = [str(r["version_num"]) for r in conn.execute(_queries()["alembic_version"])]
    known = set(migrate.known_revisions())
    return migrations_check(
        bool(state["has_schema"]),
        bool(state["has_version_table"]),
        versions,
        migrate.head_revision(),
        known.__contains__,
    )


def _check_roles(conn: Connection, _: _Options) -> Check:
    state = _schema_state(conn)
    if not state["has_schema"]:
        return _not_migrated("roles")
    if not state["has_role_names"]:
        return Check(
            "roles",
            "warn",
            "not checked: aura.role_names is missing (the roles migration has not run)",
            "run aura-pg migrate",
        )
    roles = conn.execute(_queries()["aura_roles"]).fetchall()
    public = conn.execute(_queries()["public_privileges"]).fetchall()
    user = _one(conn, _queries()["current_user"])
    return roles_check(roles, public, str(user["user_name"]), bool(user["is_superuser"]))


def _check_idle_timeout(conn: Connection, _: _Options) -> Check:
    row = _one(conn, _queries()["setting"], {"name": "idle_in_transaction_session_timeout"})
    return idle_timeout_check(
        str(row["setting"]), row["unit"], str(row["source"]), str(conn.info.dbname)
    )


def _check_long_transactions(conn: Connection, options: _Options) -> Check:
    rows = conn.execute(_queries()["open_transactions"]).fetchall()
    sees_all = bool(_one(conn, _queries()["sees_all_sessions"])["sees_all"])
    return long_transactions_check(rows, options.max_transaction_age, sees_all)


def _check_clock_skew(conn: Connection, _: _Options) -> Check:
    before = time.time()
    row = _one(conn, _queries()["clock"])
    after = time.time()
    server: datetime = row["server_time"]
    client = datetime.fromtimestamp((before + after) / 2, tz=UTC)
    return clock_skew_check((server - client).total_seconds(), (after - before) / 2)


def _check_projections(conn: Connection, _: _Options) -> Check:
    missing = _view_missing(conn, "projections", "has_projection_status", "projection_status")
    if missing is not None:
        return missing
    return projections_check(conn.execute(_queries()["projection_status"]).fetchall())


def _view_missing(conn: Connection, name: str, flag: str, view: str) -> Check | None:
    """The warning of check ``name`` when the aura schema, or the view it
    reads (``flag`` of schema_state), is missing; None when both exist."""
    state = _schema_state(conn)
    if not state["has_schema"]:
        return _not_migrated(name)
    if not state[flag]:
        return Check(name, "warn", f"not checked: aura.{view} is missing", "run aura-pg migrate")
    return None


def _check_stream_order(conn: Connection, _: _Options) -> Check:
    missing = _view_missing(
        conn, "stream_order", "has_stream_order_view", "stream_order_inversions"
    )
    if missing is not None:
        return missing
    try:
        with conn.transaction():
            conn.execute(_queries()["longer_statement_timeout"])
            row = _one(conn, _queries()["stream_order_inversions"])
    except psycopg.errors.QueryCanceled:
        return Check(
            "stream_order",
            "warn",
            "not checked: reading the whole log took over 30 s",
            "run SELECT * FROM aura.stream_order_inversions off-peak",
        )
    return stream_order_check(int(row["streams"]), list(row["listed"] or []))


def _check_connections(conn: Connection, _: _Options) -> Check:
    row = _one(conn, _queries()["connections"])
    return connections_check(
        int(row["max_connections"]),
        int(row["superuser_reserved"]),
        int(row["reserved"]),
        int(row["client_connections"]),
    )


def _check_durability(conn: Connection, _: _Options) -> Check:
    rows = conn.execute(_queries()["durability"]).fetchall()
    return durability_check({str(r["name"]): str(r["setting"]) for r in rows})


@dataclass(frozen=True, slots=True)
class _Options:
    max_transaction_age: float


_CHECKS: Final[Sequence[tuple[str, Callable[[Connection, _Options], Check]]]] = (
    ("server_version", _check_server_version),
    ("timescaledb", _check_timescaledb),
    ("migrations", _check_migrations),
    ("roles", _check_roles),
    ("idle_in_transaction_timeout", _check_idle_timeout),
    ("long_transactions", _check_long_transactions),
    ("clock_skew", _check_clock_skew),
    ("projections", _check_projections),
    ("stream_order", _check_stream_order),
    ("connections", _check_connections),
    ("durability", _check_durability),
)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _error_text(exc: BaseException, connection: ConnectionInfo) -> str:
    lines = [_one_line(line) for line in (str(exc) or type(exc).__name__).splitlines()]
    return connection.mask("; ".join(line for line in lines if line))


def _connect(dsn: str, connect_timeout: int) -> Connection:
    conn = psycopg.connect(
        dsn,
        autocommit=True,
        row_factory=dict_row,
        connect_timeout=connect_timeout,
        application_name=APPLICATION_NAME,
    )
    try:
        conn.execute(_queries()["session_setup"])
    except BaseException:
        conn.close()
        raise
    return conn


def run_checks(
    dsn: str,
    *,
    max_transaction_age: float = DEFAULT_MAX_TRANSACTION_AGE,
    connect_timeout: int = DEFAULT_CONNECT_TIMEOUT,
) -> list[Check]:
    """Run every check against ``dsn``; never raises for a failing check.

    When the database cannot be reached the result is a single failing
    ``connect`` check (the others did not run).
    """
    connection = ConnectionInfo.of(dsn)
    try:
        conn = _connect(dsn, connect_timeout)
    except Exception as exc:
        return [
            Check(
                "connect",
                "fail",
                f"cannot connect: {_error_text(exc, connection)}",
                "check --dsn / $AURA_PG_DSN / the PG* variables, that the server runs, "
                "listens there and lets this user in (pg_hba.conf)",
            )
        ]
    options = _Options(max_transaction_age=max_transaction_age)
    with conn:
        info = conn.info
        where = f"{info.user}@{info.host}:{info.port}/{info.dbname}"
        checks = [Check("connect", "ok", f"connected to {where}")]
        for name, check in _CHECKS:
            try:
                checks.append(check(conn, options))
            except psycopg.errors.InsufficientPrivilege as exc:
                checks.append(
                    Check(
                        name,
                        "warn",
                        f"not checked: {_error_text(exc, connection)}",
                        "run aura-pg doctor as the migrating role or a superuser "
                        "(docs/doctor.md: what a less privileged user sees)",
                    )
                )
            except Exception as exc:
                checks.append(
                    Check(name, "fail", f"could not check: {_error_text(exc, connection)}", None)
                )
    return checks


# ---------------------------------------------------------------- report


def overall_status(checks: Sequence[Check]) -> Status:
    worst: Status = "ok"
    for check in checks:
        if _SEVERITY[check.status] > _SEVERITY[worst]:
            worst = check.status
    return worst


def exit_code(checks: Sequence[Check], *, strict: bool = False) -> int:
    """0 when nothing failed (nor warned, with ``strict``), else 1."""
    status = overall_status(checks)
    if status == "fail" or (status == "warn" and strict):
        return 1
    return 0


def not_run(checks: Sequence[Check]) -> list[str]:
    """The checks that did not run: all but ``connect`` when it failed."""
    if not any(c.name == "connect" and c.status == "fail" for c in checks):
        return []
    ran = {c.name for c in checks}
    return [name for name in CHECK_NAMES if name not in ran]


def format_report(checks: Sequence[Check]) -> str:
    """One line per check (status, name, detail, and the hint unless ok),
    then the skipped checks and a summary line."""
    width = max((len(c.name) for c in checks), default=0)
    lines = []
    for check in checks:
        line = f"{check.status.upper():<4}  {check.name:<{width}}  {_one_line(check.detail)}"
        if check.hint and check.status != "ok":
            line += f"  -- hint: {_one_line(check.hint)}"
        lines.append(line)
    skipped = not_run(checks)
    if skipped:
        lines.append(f"not run (no connection): {', '.join(skipped)}")
    counts = {status: sum(c.status == status for c in checks) for status in _SEVERITY}
    lines.append(
        f"doctor: {overall_status(checks)} ({counts['ok']} ok, {counts['warn']} warn, "
        f"{counts['fail']} fail)"
    )
    return "\n".join(lines) + "\n"


def format_json(checks: Sequence[Check], *, strict: bool = False) -> str:
    return (
        json.dumps(
            {
                "status": overall_status(checks),
                "exit_code": exit_code(checks, strict=strict),
                "checks": [dataclasses.asdict(c) for c in checks],
                "not_run": not_run(checks),
            },
            indent=2,
        )
        + "\n"
    )


# ---------------------------------------------------------------- command


def cmd_doctor(args: argparse.Namespace) -> int:
    try:
        conninfo = Settings.from_args(args).connection().conninfo
    except AuraPgError as exc:  # an unreadable password file, a bad setting
        print(f"aura-pg: {exc}", file=sys.stderr)
        return 1
    checks = run_checks(
        conninfo,
        max_transaction_age=args.max_transaction_age,
        connect_timeout=args.connect_timeout,
    )
    if args.json:
        sys.stdout.write(format_json(checks, strict=args.strict))
    else:
        sys.stdout.write(format_report(checks))
    return exit_code(checks, strict=args.strict)


def add_doctor_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``aura-pg doctor`` on the CLI's subparsers."""
    p = sub.add_parser(
        "doctor",
        help="check the database and server for what aura-pg needs",
        description="Check the server version, TimescaleDB, migrations, roles, settings, "
        "open transactions, clock skew and projections; exit 1 when a check fails "
        "(or, with --strict, warns). See docs/doctor.md.",
    )
    add_connection_options(p)
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    p.add_argument(
        "--max-transaction-age",
        type=non_negative_float,
        default=DEFAULT_MAX_TRANSACTION_AGE,
        metavar="SECONDS",
        help="warn about writing transactions open longer, fail at 10 times it "
        "(default %(default)s)",
    )
    p.add_argument(
        "--connect-timeout",
        type=positive_int,
        default=DEFAULT_CONNECT_TIMEOUT,
        metavar="SECONDS",
        help="give up connecting after this long (default %(default)s)",
    )
    p.set_defaults(handler=cmd_doctor)
