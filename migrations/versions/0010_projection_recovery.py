"""A projection that recovers shows no error: the batch that ends a run of
failures clears last_error (aura.projection_status, `aura-pg status`); a
dead-lettered event keeps its error in aura.dead_letters. Read model schemas
are given to their roles without checking for a function every database
has had since 0006; aura.role_names' comment names the handler role.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

from __future__ import annotations

from aura_pg.migrate import run_migration_sql

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_sql("0010_projection_recovery.sql")


def downgrade() -> None:
    raise NotImplementedError("aura-pg migrations are forward-only: restore from a backup")
