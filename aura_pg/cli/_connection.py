"""How a command connects: the connection options every database command
takes, their resolution (flags over ``AURA_PG_*`` over libpq's defaults),
and a connection to a reachable database with a current schema."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.rows import dict_row

from aura_pg import migrate
from aura_pg._resources import named_queries
from aura_pg.cli._argtypes import statement_timeout
from aura_pg.config import Connection, Settings
from aura_pg.errors import AuraPgError, MigrationError

CONNECTION_HINT = (
    "check --dsn / AURA_PG_DSN, --password-file / AURA_PG_PASSWORD_FILE, "
    "and libpq's PG* variables, PGPASSFILE and service file"
)


class CannotConnect(AuraPgError):
    """The database cannot be reached with the configured connection."""

    hint = CONNECTION_HINT


def add_connection_options(parser: argparse.ArgumentParser, *, bounded: bool = False) -> None:
    """The connection options every database command takes; ``bounded``
    adds the statement timeout of the short operator commands."""
    parser.add_argument("--dsn", help="libpq connection string (default: $AURA_PG_DSN, then PG*)")
    parser.add_argument(
        "--password-file",
        metavar="PATH",
        help="read the password from this file (default: $AURA_PG_PASSWORD_FILE)",
    )
    if bounded:
        parser.add_argument(
            "--statement-timeout",
            type=statement_timeout,
            metavar="DURATION",
            help="bound each statement, e.g. 30s (default: $AURA_PG_STATEMENT_TIMEOUT)",
        )


def connection_settings(args: argparse.Namespace) -> Settings:
    """The settings of :func:`add_connection_options`' flags over ``AURA_PG_*``."""
    return Settings.resolve(
        dsn=getattr(args, "dsn", None),
        password_file=getattr(args, "password_file", None),
        statement_timeout=getattr(args, "statement_timeout", None),
    )


def connection(args: argparse.Namespace, *, bounded: bool = False) -> Connection:
    """The one place a command's connection is resolved, the password file
    applied and (``bounded``) the statement timeout. Remembered on ``args``
    so that ``main`` can mask error text."""
    resolved = connection_settings(args).connection(bounded=bounded)
    args.connection = resolved
    return resolved


def operator_queries() -> dict[str, Any]:
    return named_queries("queries/operator.sql")


def _check_schema(conn: psycopg.Connection[dict[str, Any]], connection: Connection) -> None:
    """Refuse a database that was never migrated or is at an older revision
    than this code; one at a newer revision (a newer release migrated it)
    is used as it is."""
    queries = operator_queries()
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
def open_database(
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


def preflight(connection: Connection, *, check_schema: bool = True) -> None:
    """Fail early, and clearly, when the database is unreachable or not migrated."""
    with open_database(connection, check_schema=check_schema):
        pass
