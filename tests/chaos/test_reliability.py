"""The reliability suite, short: load/reliability.py injects every kind of
fault twice under writers and two daemons, on a cluster of its own, and
verifies no loss, no duplicates, exact read models and dead letters that
are exactly the poison events. Its checks are shown to catch each kind of
damage on a database tampered with on purpose."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from aura_pg import EventStore, NewEvent
from aura_pg.projection.catalog import load_catalog
from tests.helpers.projections import query, running_daemon, wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]
FAULTS = {"kill_daemon", "restart_postgres", "terminate_backends", "latency", "connection_loss"}


@pytest.mark.slow
def test_the_short_suite_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    out = tmp_path / "reliability.json"
    process = subprocess.Popen(
        [sys.executable, "load/reliability.py", "--rounds", "10", "--interval", "2",
         "--writers", "3", "--rate", "100", "--poison-every", "500",
         "--out", str(out), "--log-dir", str(tmp_path / "logs")],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        process.terminate()  # the script stops its daemons, writers and cluster
        try:
            stdout, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
        pytest.fail(f"the suite took over 240 s:\n{stdout}\n{stderr[-5000:]}")
    assert process.returncode == 0, stdout + stderr[-5000:]
    assert stdout.splitlines()[-1] == "verified", stdout
    figures = json.loads(out.read_text())
    summary = figures["summary"]
    assert set(summary["by_fault"]) == FAULTS
    assert all(kind["injected"] == 2 for kind in summary["by_fault"].values())
    assert summary["not_recovered"] == 0
    assert all(r["recovery_s"] is not None for r in figures["rounds"])
    events = figures["events"]
    assert events["events_stored"] > 1000
    assert events["lost"] == events["duplicated"] == events["phantom"] == 0
    assert events["poison_events"] > 0
    for model in figures["read_models"].values():
        assert model["applied"] == events["events_stored"] - events["poison_events"]
    # The recovery table is printed per fault kind.
    for kind in FAULTS:
        assert any(line.startswith(kind) for line in stdout.splitlines()), kind


@pytest.fixture(scope="module")
def reliability() -> Iterator[ModuleType]:
    sys.path.insert(0, str(REPO_ROOT / "load"))
    try:
        import reliability

        yield reliability
    finally:
        sys.path.remove(str(REPO_ROOT / "load"))


def write_log(path: Path, entries: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(entry) + "\n" for entry in entries) + '{"ids": ["cut')
    return path


def test_the_event_checks_catch_loss_duplicates_and_phantoms(
    reliability: ModuleType, store: EventStore, dsn: str, tmp_path: Path
) -> None:
    events = [NewEvent("A", {"w": 0, "n": n}) for n in range(3)]
    result = store.append("rel-0-0", events)
    ids = [str(e.event_id) for e in events]
    positions = [e.global_position for e in result.events]
    good = {"ids": ids, "positions": positions, "duplicate": False}
    logs = reliability.read_writer_logs([write_log(tmp_path / "w.jsonl", [good])])
    figures, problems = reliability.verify_log(dsn, logs)
    assert problems == []
    assert figures["events_reported"] == 3

    # A reported event missing, one at another position, one stored twice
    # under a new id, one stored that nobody sent.
    lost = {"ids": [str(uuid.uuid4())], "positions": [999], "duplicate": False}
    moved = {**good, "positions": [positions[0], positions[2], positions[1]]}
    store.append("rel-0-0", [NewEvent("A", {"w": 0, "n": 0})])  # (0, 0) again
    logs = reliability.read_writer_logs([write_log(tmp_path / "w.jsonl", [moved, lost])])
    figures, problems = reliability.verify_log(dsn, logs)
    assert (figures["lost"], figures["misplaced"], figures["duplicated"]) == (1, 2, 1)
    assert figures["phantom"] == 1
    assert len(problems) == 4

    # Events of an append that gave up may be stored (once) without phantoms.
    unknown = {"unknown": [row[0] for row in query(dsn, "SELECT event_id::text FROM aura.events")]}
    logs = reliability.read_writer_logs([write_log(tmp_path / "w.jsonl", [good, unknown])])
    figures, _ = reliability.verify_log(dsn, logs)
    assert figures["phantom"] == 0
    assert figures["unknown_outcome_stored"] == 1


async def test_the_read_model_checks_catch_gaps_extras_and_wrong_dead_letters(
    reliability: ModuleType, store: EventStore, dsn: str
) -> None:
    catalog = load_catalog(reliability.CATALOG)
    for n in range(20):
        store.append(
            f"rel-0-{n % 3}", [NewEvent("A", {"w": 0, "n": n, **({"poison": 1} if n == 7 else {})})]
        )
    async with running_daemon(dsn, reliability.PROJECTIONS, catalog=catalog):
        await wait_for(lambda: reliability.projections_past(dsn, reliability.log_head(dsn)))
    figures, problems = reliability.verify_read_models(dsn)
    assert problems == []
    assert figures["rel_set"]["applied"] == 19

    query(dsn, "DELETE FROM rel_set.applied_events WHERE global_position = 3")
    query(dsn, "INSERT INTO rel_each.applied_events VALUES (1000, 'rel-0-0', 99)")
    query(dsn, "UPDATE aura.dead_letters SET status = 'skipped' WHERE projection = 'rel_each'")
    figures, problems = reliability.verify_read_models(dsn)
    assert figures["rel_set"]["missing"] == 1
    assert figures["rel_set"]["streams_off"] == 0
    assert figures["rel_each"]["extra"] == 1
    assert figures["rel_each"]["poison_not_dead_lettered"] == 1
    assert len(problems) == 3
