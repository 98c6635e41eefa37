"""`aura-pg projections ...` in a subprocess, as an operator runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from aura_pg import EventStore, NewEvent
from tests.helpers.projections import FIXTURE_CATALOG, applied_positions, log_positions, query

ROOT = Path(__file__).resolve().parents[2]


def aura_pg(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aura_pg", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=check,
        timeout=120,
    )


def test_operator_commands(dsn: str, store: EventStore) -> None:
    catalog = ["--catalog", str(FIXTURE_CATALOG)]
    registered = aura_pg("projections", "register", "tally_set", *catalog, "--dsn", dsn)
    assert registered.stdout.strip() == "tally_set: created"
    poison = store.append("cli-1", [NewEvent("A", {"poison": True})]).events[0]
    store.append("cli-2", [NewEvent("B", {}) for _ in range(5)])

    status = json.loads(aura_pg("projections", "status", "--json", "--dsn", dsn).stdout)
    assert [(s["name"], s["events_behind"], s["status"]) for s in status] == [
        ("tally_set", 6, "running")
    ]
    table = aura_pg("projections", "status", "--dsn", dsn).stdout
    assert table.splitlines()[0].split()[:3] == ["name", "status", "circuit"]

    assert aura_pg("projections", "pause", "tally_set", "--dsn", dsn).stdout.strip() == (
        "tally_set: paused"
    )
    assert aura_pg("projections", "resume", "tally_set", "--dsn", dsn).stdout.strip() == (
        "tally_set: running"
    )

    # A rebuild (no daemon running) applies everything, dead-letters the
    # poison event, and swaps in.
    rebuilt = aura_pg("projections", "rebuild", "tally_set", *catalog, "--dsn", dsn)
    assert "tally_set: rebuilt and swapped in" in rebuilt.stdout
    assert applied_positions(dsn, "tally_set") == log_positions(
        dsn, exclude=[poison.global_position]
    )
    letters = json.loads(aura_pg("dlq", "list", "--json", "--dsn", dsn).stdout)
    assert [(d["projection"], d["event_id"]) for d in letters] == [
        ("tally_set", str(poison.event_id))
    ]
    query(dsn, "INSERT INTO tally_set.cures VALUES (%s)", (poison.event_id,))
    retried = aura_pg("dlq", "retry", str(letters[0]["id"]), "--dsn", dsn)
    assert retried.stdout.strip() == f"dead letter {letters[0]['id']}: retried"
    assert applied_positions(dsn, "tally_set") == log_positions(dsn)
    assert aura_pg("dlq", "list", "--dsn", dsn).stdout.strip() == "(none)"

    replayed = aura_pg("projections", "replay", "tally_set", "cli-2", "--dsn", dsn)
    assert replayed.stdout.strip() == "tally_set: replayed 5 events of cli-2"

    refused = aura_pg("projections", "reset", "tally_set", "--dsn", dsn, check=False)
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert "reset" in aura_pg("projections", "reset", "tally_set", "--yes", "--dsn", dsn).stdout

    unknown = aura_pg("projections", "pause", "nope", "--dsn", dsn, check=False)
    assert unknown.returncode == 1
    assert "unknown projection 'nope'" in unknown.stderr
    skipped = aura_pg("dlq", "skip", "999", "--dsn", dsn, check=False)
    assert skipped.returncode == 1 and "unknown dead letter 999" in skipped.stderr


def test_bad_catalog_entry_is_reported_by_name(dsn: str, tmp_path: Path) -> None:
    (tmp_path / "m.sql").write_text("CREATE TABLE t (x int);\n")
    (tmp_path / "catalog.yaml").write_text(
        "projections:\n  - name: broken_one\n    sql: m.sql\n    handler: apply_events\n"
    )
    result = aura_pg(
        "project", "--catalog", str(tmp_path / "catalog.yaml"), "--dsn", dsn, check=False
    )
    assert result.returncode == 1
    assert "entry 1 ('broken_one'): handler 'apply_events' is not created by m.sql" in result.stderr
