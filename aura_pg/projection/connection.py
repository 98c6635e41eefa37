"""The daemon's connections and what their errors mean: the session every
daemon connection gets, the projection functions' typed refusals, and
whether a failure lost the connection or only the statement."""

from __future__ import annotations

import logging
from typing import Any, LiteralString

import psycopg

from aura_pg._resources import named_queries
from aura_pg.errors import ProjectionError, StaleCheckpoint, UnknownProjection
from aura_pg.projection.settings import ProjectorSettings

log = logging.getLogger("aura_pg.projector")


def queries() -> dict[str, LiteralString]:
    """The statements of sql/queries/projector.sql, by name."""
    return named_queries("queries/projector.sql")


class ConnectionLost(Exception):
    """The runner's connection is unusable: reconnect."""


def translate_projection_error(exc: psycopg.Error) -> Exception | None:
    """The typed error for the projection functions' own SQLSTATEs."""
    message = (exc.diag.message_primary if exc.diag else None) or str(exc)
    if exc.sqlstate == "AU005":
        return UnknownProjection(message)
    if exc.sqlstate == "AU006":
        return StaleCheckpoint(message)
    if exc.sqlstate == "AU007":
        return ProjectionError(message)
    return None


def session_params(settings: ProjectorSettings) -> dict[str, str]:
    """The parameters of the session_settings statement every daemon
    connection runs first."""
    return {
        "statement_timeout": str(settings.statement_timeout_ms),
        "lock_timeout": str(settings.lock_timeout_ms),
        "synchronous_commit": "on" if settings.synchronous_commit else "off",
    }


async def connect(
    dsn: str, settings: ProjectorSettings, purpose: str
) -> psycopg.AsyncConnection[Any]:
    """An autocommit connection with the daemon's timeouts and keepalives.

    Keepalives on both ends make a vanished peer (host crash, partition)
    show within about half a minute: the daemon reconnects, and the server
    ends the dead daemon's session, which releases its projection locks so
    a stand-by can take over.
    """
    conn = await psycopg.AsyncConnection.connect(
        dsn,
        autocommit=True,
        application_name=f"aura-pg {purpose}"[:63],
        keepalives=1,
        keepalives_idle=10,
        keepalives_interval=5,
        keepalives_count=3,
    )
    conn.add_notice_handler(_log_notice)
    try:
        await conn.execute(queries()["session_settings"], session_params(settings))
    except BaseException:  # failed or cancelled half-way: not left open
        await conn.close()
        raise
    return conn


def _log_notice(diagnostic: psycopg.errors.Diagnostic) -> None:
    """Server notices and warnings (from projection definitions, rebuilds)
    go to the daemon's log instead of being dropped."""
    severity = diagnostic.severity_nonlocalized or diagnostic.severity or "NOTICE"
    level = logging.WARNING if severity == "WARNING" else logging.INFO
    log.log(level, "postgres %s: %s", severity, diagnostic.message_primary)


def is_connection_state(sqlstate: str) -> bool:
    """Whether a SQLSTATE is of a lost connection: class 08 (connection
    exceptions), 57P01-57P03 (admin shutdown, crash shutdown, cannot
    connect now)."""
    return sqlstate.startswith("08") or sqlstate in ("57P01", "57P02", "57P03")


async def is_connection_failure(exc: psycopg.Error, conn: psycopg.AsyncConnection[Any]) -> bool:
    """Whether ``exc`` means the connection is gone (reconnect), as opposed
    to a failure of the statement (the handler's, a timeout, a deadlock:
    handled as a failed batch). psycopg files both under OperationalError.
    A connection-class SQLSTATE on a connection that still answers came from
    inside the statement (a handler using dblink, say): a failed batch."""
    if conn.closed or conn.broken:
        return True
    state = exc.sqlstate
    if state is None:
        return isinstance(exc, psycopg.OperationalError)
    if not is_connection_state(state):
        return False
    try:
        await conn.execute("SELECT 1")
    except psycopg.Error:
        return True
    return False


async def fetch_one(
    conn: psycopg.AsyncConnection[Any], query: LiteralString, params: dict[str, Any]
) -> tuple[Any, ...] | None:
    """One statement, its first row; connection loss as ConnectionLost, the
    projection functions' own errors typed."""
    try:
        cur = await conn.execute(query, params)
        return await cur.fetchone()
    except psycopg.Error as exc:
        if await is_connection_failure(exc, conn):
            raise ConnectionLost(str(exc)) from exc
        typed = translate_projection_error(exc)
        if typed is not None:
            raise typed from exc
        raise
