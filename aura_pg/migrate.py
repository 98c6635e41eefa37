"""Schema migrations: alembic revisions, each running its own frozen SQL
(``migrations/sql/``); ``sql/`` holds the current schema."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import sqlalchemy
from alembic import command, context
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError

from aura_pg._resources import migrations_path
from aura_pg.errors import MigrationError

VERSION_TABLE_SCHEMA = "aura"


def run_migration_sql(file_name: str) -> None:
    """Run a revision's frozen SQL (``migrations/sql/<file_name>``) inside
    the current migration.

    Called from revision scripts. A revision never runs the live files
    under ``sql/``: those show the current schema and change with it, while
    what a released migration ran must stay what it runs. The text is sent
    as it is, without parameter parsing, so an operator reads exactly what
    runs; with ``--sql`` it is printed instead.
    """
    text = (migrations_path() / "sql" / file_name).read_text(encoding="utf-8")
    if context.is_offline_mode():
        context.get_context().impl.static_output(text)
    else:
        # The psycopg connection itself: with no parameters it parses no
        # placeholders, so '%' in plpgsql RAISE formats stays as written.
        driver = context.get_bind().connection.driver_connection
        if not isinstance(driver, psycopg.Connection):
            raise MigrationError("aura-pg migrations run on a psycopg connection")
        driver.execute(text)


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_path()))
    return config


def _engine(conninfo: str) -> sqlalchemy.Engine:
    # The libpq connection string goes to psycopg untouched (any form libpq
    # accepts, PG* variables included); SQLAlchemy only drives alembic.
    return sqlalchemy.create_engine(
        "postgresql+psycopg://",
        creator=lambda: psycopg.connect(conninfo),
        poolclass=sqlalchemy.pool.NullPool,
    )


def upgrade(conninfo: str, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (all of them by default)."""
    config = _config()
    engine = _engine(conninfo)
    try:
        with engine.begin() as connection, _known_revision(revision):
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    finally:
        engine.dispose()


def upgrade_sql(revision: str = "head") -> str:
    """The SQL that ``upgrade`` would run on an empty database, for a DBA."""
    config = _config()
    buffer = io.StringIO()
    config.output_buffer = buffer
    with _known_revision(revision):
        command.upgrade(config, revision, sql=True)
    return buffer.getvalue()


@contextmanager
def _known_revision(revision: str) -> Iterator[None]:
    """alembic's complaint about a revision it does not know, as a
    MigrationError (no traceback in the CLI)."""
    try:
        yield
    except CommandError as exc:
        if "revision" not in str(exc).lower():
            raise
        raise MigrationError(
            f"unknown revision {revision!r}: use head or one of {', '.join(known_revisions())}"
        ) from None


def known_revisions() -> list[str]:
    """Every revision this code knows, oldest first."""
    script = ScriptDirectory.from_config(_config())
    return [r.revision for r in reversed(list(script.walk_revisions()))]


def head_revision() -> str:
    head = ScriptDirectory.from_config(_config()).get_current_head()
    if head is None:
        raise MigrationError("no migrations found")
    return head


def current_revision(conninfo: str) -> str | None:
    """The revision the database is at, None when never migrated."""
    engine = _engine(conninfo)
    try:
        with engine.connect() as connection:
            migration = MigrationContext.configure(
                connection, opts={"version_table_schema": VERSION_TABLE_SCHEMA}
            )
            return migration.get_current_revision()
    finally:
        engine.dispose()


def check_current(conninfo: str) -> None:
    """Raise MigrationError unless the database is at the newest revision."""
    current, head = current_revision(conninfo), head_revision()
    if current != head:
        raise behind(current)


def behind(current: str | None) -> MigrationError:
    """The error for a database at ``current`` (None: never migrated) when
    this code needs the head revision."""
    return MigrationError(
        f"database schema is at revision {current or 'none'}, this code needs "
        f"{head_revision()}: run `aura-pg migrate`"
    )
