"""Alembic environment for aura-pg.

Run through ``aura-pg migrate`` (aura_pg.migrate), which hands over either a
connection (online) or nothing (``--sql``: print the SQL for a DBA).
"""

from __future__ import annotations

from alembic import context

SCHEMA = "aura"
# Two `aura-pg migrate` runs at once queue on this lock instead of racing.
MIGRATION_LOCK_KEY = 0x61757261  # "aura"


def run_offline() -> None:
    context.configure(
        dialect_name="postgresql",
        version_table_schema=SCHEMA,
        literal_binds=True,
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.get_context().impl.static_output(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA};\n")
        context.run_migrations()


def run_online() -> None:
    connection = context.config.attributes["connection"]
    connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})")
    connection.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
    context.configure(
        connection=connection,
        version_table_schema=SCHEMA,
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
