"""Shadow projections: a new version of a projection runs beside the live one
(NAME__shadow, in SCHEMA__shadow), is compared with it at one checkpoint
(aura.diff_shadow) and swapped in atomically (aura.promote_shadow), the old
version staying beside it as the shadow for a rollback until dropped.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29
"""

from __future__ import annotations

from aura_pg.migrate import run_migration_sql

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_sql("0007_shadow_projections.sql")


def downgrade() -> None:
    raise NotImplementedError("aura-pg migrations are forward-only: restore from a backup")
