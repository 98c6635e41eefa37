"""Fixes of the append path, the projection engine, read model roles and
the importer.

- Events of one stream reach the global read in version order: a per-stream
  append lock taken before the transaction has an id, and a retryable
  refusal (40001) for a transaction whose id is older than the stream's
  head; aura.stream_order_inversions finds streams recorded out of order
  before this revision. Event ids in any uuid spelling are one key; the
  database's append limits bind every session.
- Projection generations come from a sequence and never repeat, so a batch
  read under one incarnation of a shadow or rebuild cannot commit into
  another; promote and rollback keep each side's dead letters.
- Read model roles are named <projector role>/<schema>, one per schema
  (shadows and rebuilds included), handed over at every swap.
- Import dead letters are identified by sequence and content hash; the
  lives of a recreated JetStream stream keep their sequence keys apart.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from __future__ import annotations

from aura_pg.migrate import run_migration_sql

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_sql("0009_defect_fixes.sql")


def downgrade() -> None:
    raise NotImplementedError("aura-pg migrations are forward-only: restore from a backup")
