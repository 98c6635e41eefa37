"""The append path writes only the events: aura.streams becomes a view over
the log (appends read a stream's version through its index), and
idempotency hashes are stored only for events appended with a key of their
own.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07
"""

from __future__ import annotations

from aura_pg.migrate import run_migration_sql

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_sql("0013_append_path.sql")


def downgrade() -> None:
    raise NotImplementedError("aura-pg migrations are forward-only: restore from a backup")
