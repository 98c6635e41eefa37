"""A Python processor operated with the CLI, as an operator would: the
daemon in a subprocess, then status, dead letters, pause and repartition
by the processor's name."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from aura_pg import EventStore, NewEvent
from tests.acceptance.test_projections_cli import ROOT, aura_pg
from tests.helpers.projections import query, wait_for_sync
from tests.integration.test_processors import SEEN_TABLE

ENTRY = """projections:
  - name: audit
    kind: python
    handler: tests.integration.test_processors:{handler}
    source_events: [A]
    batch_size: 20
    partitions: {partitions}
    error_handling: {{max_retries: 0, retry_base_ms: 10, retry_max_ms: 20}}
"""


def write_catalog(path: Path, handler: str, partitions: int) -> str:
    path.write_text(ENTRY.format(handler=handler, partitions=partitions))
    return str(path)


@pytest.mark.timeout(180)
def test_processor_operated_from_the_cli(dsn: str, store: EventStore, tmp_path: Path) -> None:
    query(dsn, SEEN_TABLE)
    catalog = write_catalog(tmp_path / "catalog.yaml", "record_unless_poison", 2)
    registered = aura_pg("projections", "register", "--catalog", catalog, "--dsn", dsn)
    assert registered.stdout.strip() == "audit: created"
    poison = store.append("p-1", [NewEvent("A", {"poison": True})]).events[0]
    for n in range(30):
        store.append(f"s-{n % 4}", [NewEvent("A", {"n": n})])

    daemon = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aura_pg",
            "project",
            "--catalog",
            catalog,
            "--dsn",
            dsn,
            "--poll-interval",
            "0.1",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_sync(
            lambda: query(
                dsn,
                "SELECT bool_and(events_behind = 0) AND count(*) = 2 FROM aura.projection_status"
                " WHERE kind = 'python'",
            )[0][0],
            what="both partitions caught up",
        )
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, errors = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, errors
    assert len(query(dsn, "SELECT 1 FROM public.seen")) == 30

    status = json.loads(aura_pg("projections", "status", "--json", "--dsn", dsn).stdout)
    assert sorted(row["name"] for row in status) == ["audit/0", "audit/1"]
    letters = json.loads(aura_pg("dlq", "list", "audit/0", "--json", "--dsn", dsn).stdout)
    letters += json.loads(aura_pg("dlq", "list", "audit/1", "--json", "--dsn", dsn).stdout)
    assert [letter["event_id"] for letter in letters] == [str(poison.event_id)]

    # The fix ships: the catalog names a handler that takes the event, and
    # the retry runs it.
    catalog = write_catalog(tmp_path / "catalog.yaml", "record", 2)
    changed = aura_pg("projections", "register", "--catalog", catalog, "--dsn", dsn)
    assert changed.stdout.strip() == "audit: changed"
    retried = aura_pg("dlq", "retry", str(letters[0]["id"]), "--dsn", dsn)
    assert retried.stdout.strip() == f"dead letter {letters[0]['id']}: retried"
    assert len(query(dsn, "SELECT 1 FROM public.seen")) == 31

    # The processor's name stands for its partitions.
    assert aura_pg("projections", "pause", "audit", "--dsn", dsn).stdout.strip() == "audit: paused"
    assert {
        row[0]
        for row in query(dsn, "SELECT status FROM aura.projection_status WHERE kind = 'python'")
    } == {"paused"}

    # Another number of partitions takes a repartition, never a silent skip.
    catalog = write_catalog(tmp_path / "catalog.yaml", "record", 3)
    refused = aura_pg("projections", "register", "--catalog", catalog, "--dsn", dsn, check=False)
    assert refused.returncode != 0
    assert "runs in 2 partitions, not 3" in refused.stderr
    assert "repartition" in refused.stderr
    moved = aura_pg("projections", "repartition", "audit", "--catalog", catalog, "--dsn", dsn)
    assert moved.stdout.strip() == "audit: repartitioned (3 partitions)"
    assert [
        row[0]
        for row in query(
            dsn, "SELECT name FROM aura.projection_status WHERE kind = 'python' ORDER BY name"
        )
    ] == ["audit/0", "audit/1", "audit/2"]
    assert {
        row[0]
        for row in query(dsn, "SELECT status FROM aura.projection_status WHERE kind = 'python'")
    } == {"paused"}  # paused as a whole, it stays paused
    registered = aura_pg("projections", "register", "--catalog", catalog, "--dsn", dsn)
    assert registered.stdout.strip() == "audit: unchanged"
    assert aura_pg("projections", "resume", "audit", "--dsn", dsn).stdout.strip() == (
        "audit: running"
    )
