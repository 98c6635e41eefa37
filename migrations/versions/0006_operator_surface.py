"""Operators and handler isolation: every read model schema belongs to a role
of its own that its handlers run as (SECURITY DEFINER), so a handler writes
its own read model and, through aura.publish_to_outbox, the outbox, nothing
else; aura.projection_status shows whether each owner is alive and how long
the oldest unapplied event has waited; aura.stream_categories and
aura.list_dead_letters; aura.debug = on makes the append and the projection
batch explain themselves in NOTICEs; aura.max_batch_events bounds an append;
idempotency keys of stream ids with ':' are hashed unambiguously
(aura.idempotency_hash) and their recorded events rehashed.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""

from __future__ import annotations

from aura_pg.migrate import run_migration_sql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_sql("0006_operator_surface.sql")


def downgrade() -> None:
    raise NotImplementedError("aura-pg migrations are forward-only: restore from a backup")
