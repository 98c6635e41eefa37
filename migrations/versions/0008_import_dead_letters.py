"""Imports: aura.import_dead_letters keeps the messages `aura-pg import` could
not import (unmappable, or refused by the store) with the reason, once per
source message, so that nothing is dropped silently and nothing blocks the
source stream.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29
"""

from __future__ import annotations

from aura_pg.migrate import run_migration_sql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_sql("0008_import_dead_letters.sql")


def downgrade() -> None:
    raise NotImplementedError("aura-pg migrations are forward-only: restore from a backup")
