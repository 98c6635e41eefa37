"""Projection engine and transactional outbox: checkpoints, dead letters,
the batch/rebuild/operator functions, the append notification, the outbox.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

from aura_pg.migrate import run_migration_sql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_sql("0002_projections_outbox.sql")


def downgrade() -> None:
    raise NotImplementedError("aura-pg migrations are forward-only: restore from a backup")
