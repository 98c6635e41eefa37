"""Event store core: events, streams, append and read functions, operator views.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

from aura_pg.migrate import run_sql_files

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_files(
        [
            "schema.sql",
            "tables/streams.sql",
            "tables/events.sql",
            "triggers/append_only.sql",
            "functions/append_events.sql",
            "functions/read.sql",
            "views/read_horizon_status.sql",
        ]
    )


def downgrade() -> None:
    raise NotImplementedError("aura-pg migrations are forward-only: restore from a backup")
