"""Event store core: events, streams, append and read functions, operator views.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

from aura_pg.migrate import run_migration_sql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_sql("0001_event_store_core.sql")


def downgrade() -> None:
    raise NotImplementedError("aura-pg migrations are forward-only: restore from a backup")
