"""NOTIFY on append becomes opt-in (SET aura.notify = on): projector daemons
watch the read horizon instead, so appends no longer serialise their commits
on the cluster-wide notification lock.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

from aura_pg.migrate import run_migration_sql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_sql("0004_notify_opt_in.sql")


def downgrade() -> None:
    raise NotImplementedError("aura-pg migrations are forward-only: restore from a backup")
