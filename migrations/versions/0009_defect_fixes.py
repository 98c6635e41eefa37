"""Defect fixes: events of one stream reach the global read in version order
(a per-stream append lock taken before the transaction has an id, and a
retryable refusal for a transaction whose id is older than the stream's
head), aura.stream_order_inversions to find streams recorded out of order
before this revision, and the fixes of issues 24 and 25 that change SQL.

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
        ]
    )


def downgrade() -> None:
    raise NotImplementedError("aura-pg migrations are forward-only: restore from a backup")
