"""Python processors: projection rows of kind 'python' (the daemon runs
their handler between aura.processor_batch and aura.advance_processor, in
one transaction), partitions NAME/INDEX with aura.stream_partition, and
aura.repartition_processor's handover. SQL projections are unchanged; the
projection status view gains the kind and counts a partition's own backlog.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07
"""

from __future__ import annotations

from aura_pg.migrate import run_migration_sql

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_migration_sql("0011_python_processors.sql")


def downgrade() -> None:
    raise NotImplementedError("aura-pg migrations are forward-only: restore from a backup")
