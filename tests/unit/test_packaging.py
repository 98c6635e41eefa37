"""The wheel ships the SQL, the migrations and the projections."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from hatchling.builders.wheel import WheelBuilder

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_wheel_contains_sql_and_migrations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    builder = WheelBuilder(str(REPO_ROOT))
    (wheel,) = list(builder.build(directory=str(tmp_path), versions=["standard"]))
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "aura_pg/_sql/install.sql",
        "aura_pg/_sql/functions/append_events.sql",
        "aura_pg/_sql/queries/store.sql",
        "aura_pg/_migrations/env.py",
        "aura_pg/_migrations/versions/0001_event_store_core.py",
        "aura_pg/_migrations/versions/0002_projections_outbox.py",
        "aura_pg/_migrations/versions/0003_observed_batches.py",
        "aura_pg/_migrations/versions/0004_notify_opt_in.py",
        "aura_pg/_sql/triggers/notify_opt_in.sql",
        "aura_pg/_sql/functions/project_batch.sql",
        "aura_pg/_sql/queries/metrics.sql",
        "aura_pg/observability/names.py",
        "aura_pg/_sql/queries/projector.sql",
        "aura_pg/_sql/queries/relay.sql",
        "aura_pg/_projections/catalog.yaml",
        "aura_pg/_projections/stream_summary.sql",
        "aura_pg/py.typed",
        "aura_pg/store/event_store.py",
        "aura_pg/store/operations.py",
    ):
        assert expected in names, expected
    assert not any(name.startswith(("tests/", "load/")) for name in names)
