"""Values, checkpoints, ids and the shipped SQL, without a database."""

from __future__ import annotations

import time
import uuid

import pytest

import aura_pg
from aura_pg import START, Checkpoint, uuid7
from aura_pg._resources import named_queries, resource_dir


def test_checkpoints_order_by_transaction_then_position() -> None:
    assert Checkpoint(5, 100) < Checkpoint(6, 1) < Checkpoint(6, 2)
    assert Checkpoint(0, 0) == START
    assert max(Checkpoint(7, 1), Checkpoint(3, 9)) == Checkpoint(7, 1)


def test_checkpoint_text_round_trip() -> None:
    checkpoint = Checkpoint(123456789012, 42)
    assert Checkpoint.parse(str(checkpoint)) == checkpoint
    for bad in ("", "1", "1/2/3", "a/b", "-1/2"):
        with pytest.raises(ValueError, match="not a checkpoint"):
            Checkpoint.parse(bad)


def test_uuid7_is_version_7_and_time_ordered() -> None:
    ids = []
    for _ in range(5):
        ids.append(uuid7())
        time.sleep(0.002)
    assert all(i.version == 7 and i.variant == uuid.RFC_4122 for i in ids)
    assert ids == sorted(ids, key=lambda u: u.bytes)
    assert len(set(ids)) == len(ids)
    stamp_ms = int.from_bytes(ids[0].bytes[:6], "big")
    assert abs(stamp_ms / 1000 - time.time()) < 60


def test_public_api_is_exported() -> None:
    for name in (
        "EventStore", "AsyncEventStore", "NewEvent", "RecordedEvent", "ANY", "NO_STREAM",
        "STREAM_EXISTS", "FORWARDS", "BACKWARDS", "ConcurrencyError", "IdempotencyConflict",
        "EventValidationError", "AuraPgError",
    ):  # fmt: skip
        assert name in aura_pg.__all__
        assert getattr(aura_pg, name) is not None


def test_store_queries_are_loaded_by_name() -> None:
    queries = named_queries("queries/store.sql")
    bulk = {"bulk_staging", "bulk_truncate", "bulk_copy", "append_many"}
    assert set(queries) == {"append_events", "read_all", "read_stream", "stream_version", *bulk}
    first_words = {"bulk_staging": "CREATE TEMPORARY TABLE IF NOT EXISTS aura_bulk_staging",
                   "bulk_truncate": "TRUNCATE pg_temp.", "bulk_copy": "COPY pg_temp.",
                   "append_many": "WITH"}  # fmt: skip
    for name, query in queries.items():
        code = [line for line in query.splitlines() if not line.startswith("--")]
        assert code[0].startswith(first_words.get(name, "SELECT"))
    assert not any(q.rstrip().endswith(";") for q in queries.values())


def test_install_manifest_lists_every_schema_file() -> None:
    sql = resource_dir("sql")
    manifest = (sql / "install.sql").read_text()
    listed = {line.split()[1] for line in manifest.splitlines() if line.startswith("\\ir ")}
    on_disk = {
        f"{folder.name}/{f.name}"
        for folder in sql.iterdir()
        if folder.is_dir() and folder.name != "queries"
        for f in folder.iterdir()
        if f.name.endswith(".sql")
    } | {"schema.sql"}
    assert listed == on_disk
