"""The checks of ``aura-pg doctor``: each runs a read-only query
(``sql/queries/doctor.sql``) and hands the answer to its rule in
:mod:`aura_pg.doctor.verdicts`. A check that cannot run (a permission, a
missing view) is reported as such and the others still run; a database that
cannot be reached is one failing ``connect`` check."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, LiteralString, TypeAlias

import psycopg
from psycopg.rows import DictRow, dict_row

from aura_pg import migrate
from aura_pg._resources import named_queries
from aura_pg.config import Connection as ConnectionInfo
from aura_pg.doctor.report import one_line
from aura_pg.doctor.verdicts import (
    Check,
    clock_skew_check,
    connections_check,
    durability_check,
    idle_timeout_check,
    long_transactions_check,
    migrations_check,
    projections_check,
    roles_check,
    server_version_check,
    stream_order_check,
    timescaledb_check,
)

Connection: TypeAlias = psycopg.Connection[DictRow]

APPLICATION_NAME: Final = "aura-pg doctor"
DEFAULT_MAX_TRANSACTION_AGE: Final = 60.0
DEFAULT_CONNECT_TIMEOUT: Final = 10


def _queries() -> dict[str, LiteralString]:
    return named_queries("queries/doctor.sql")


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


def _error_text(exc: BaseException, connection: ConnectionInfo) -> str:
    lines = [one_line(line) for line in (str(exc) or type(exc).__name__).splitlines()]
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
