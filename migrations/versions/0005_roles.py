"""Least-privilege group roles: aura_owner owns the schema, aura_writer
appends (through the SECURITY DEFINER aura.append_events) and reads,
aura_projector runs projections, aura_reader reads read models and the
operator views; PUBLIC loses its default privileges. Read models get their
grants when they are created. Role names come from the settings
aura.owner_role, aura.writer_role, aura.projector_role, aura.reader_role
(docs/operators.md).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

from aura_pg.migrate import run_migration_sql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_sql("0005_roles.sql")


def downgrade() -> None:
    raise NotImplementedError("aura-pg migrations are forward-only: restore from a backup")
