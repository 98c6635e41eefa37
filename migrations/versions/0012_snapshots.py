"""Aggregate snapshots: aura.snapshots, where the repositories of
aura_pg.aggregates store an aggregate's state every snapshot_every events
(a cache: safe to delete), and aura.drop_snapshots(aggregate_type).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07
"""

from __future__ import annotations

from aura_pg.migrate import run_migration_sql

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_sql("0012_snapshots.sql")


def downgrade() -> None:
    raise NotImplementedError("aura-pg migrations are forward-only: restore from a backup")
