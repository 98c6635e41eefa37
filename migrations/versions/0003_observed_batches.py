"""aura.project_batch returns the applied events' ids, types, streams,
versions, recording times and trace contexts, for metrics and traces; the
timescaledb extension is created up front where the server preloads it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

from aura_pg.migrate import run_migration_sql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_sql("0003_observed_batches.sql")


def downgrade() -> None:
    raise NotImplementedError("aura-pg migrations are forward-only: restore from a backup")
