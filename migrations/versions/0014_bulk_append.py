"""The bulk path: aura.append_many appends batches to many streams in one
call (EventStore.append_many, aura-pg import jsonl), with the validation,
idempotency, expected versions and per-stream locks of aura.append_events;
executable by the writer role.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07
"""

from __future__ import annotations

from aura_pg.migrate import run_migration_sql

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_sql("0014_bulk_append.sql")


def downgrade() -> None:
    raise NotImplementedError("aura-pg migrations are forward-only: restore from a backup")
