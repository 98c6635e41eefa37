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

from aura_pg.migrate import run_sql_files

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_files(
        [
            "functions/append_events.sql",
            "roles/append_definer.sql",
            # The importer: dead letters identified by sequence and content
            # hash; the source streams' lives for sequence keys.
            "upgrades/0009_import_dead_letter_identity.sql",
            "tables/import_stream_lives.sql",
            "views/stream_order_inversions.sql",
            # Projections and read model roles. projections.sql still holds
            # 0002's project_batch, apply_handler and
            # install_projection_schema: project_batch.sql,
            # read_model_grants.sql and read_model_roles.sql must run after
            # it (and after shadows.sql), then the role renames.
            "functions/projections.sql",
            "functions/project_batch.sql",
            # Generations that never repeat (the
            # functions first, then the sequence, the column default and
            # the new signatures' owner and privileges); promote's dead
            # letters through a temporary name. shadows.sql can run again.
            "functions/shadows.sql",
            "upgrades/0009_projection_incarnations.sql",
            "functions/read_model_grants.sql",
            "roles/read_model_roles.sql",
            "upgrades/0009_read_model_role_names.sql",
        ]
    )


def downgrade() -> None:
    raise NotImplementedError("aura-pg migrations are forward-only: restore from a backup")
