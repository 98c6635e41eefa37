"""The load scenarios run end to end (briefly, at a modest rate, against the
test server): real debates through the store, two projector daemons, the
per-second series, the plot, and the script's own verification (every event
reported recorded is stored exactly once, every read model equals a fresh
rebuild).

Speed itself is not asserted here: figures come from full runs of
load/scenario.py on a throw-away cluster.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.projections import query

REPO_ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DEBATE_PROJECTIONS = {"stream_summary", "event_type_counts", "debate_state", "agent_performance"}


def run_scenario(dsn: str, tmp_path: Path, *args: str) -> tuple[str, dict[str, Any], Path]:
    out = tmp_path / "scenario.json"
    run = subprocess.run(
        [
            sys.executable, "load/scenario.py", *args, "--dsn", dsn, "--out", str(out),
            "--writers", "2", "--in-flight", "2", "--drain-timeout", "30",
        ],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=150, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.splitlines()[-1] == "verified", run.stdout
    return run.stdout, json.loads(out.read_text()), out.with_suffix(".png")


def check_figures(dsn: str, figures: dict[str, Any], png: Path) -> None:
    assert png.read_bytes()[:8] == PNG_MAGIC
    names = figures["projections"]
    assert set(names) == DEBATE_PROJECTIONS
    assert len(figures["daemons"]) == 2
    assert all(d["exit_code"] == 0 for d in figures["daemons"])

    rows = figures["series"]
    assert [r["t"] for r in rows] == list(range(len(rows)))
    [(stored,)] = query(dsn, "SELECT count(*) FROM aura.events")
    assert stored > 0
    assert sum(r["appended"] for r in rows) == stored

    appended = 0
    applied = dict.fromkeys(names, 0)
    for row in rows:
        for key in ("offered_debates", "debates_started", "debates_completed", "appends",
                    "appended", "commands", "conflicts", "duplicates", "errors"):  # fmt: skip
            assert row[key] >= 0, (key, row)
        assert row["duplicates"] == 0 and row["errors"] == 0, row
        appended += row["appended"]
        for name in names:
            assert row["applied"][name] >= 0, row
            assert row["events_behind"][name] >= 0, row
            assert row["seconds_behind"][name] >= 0, row
            assert row["oldest_unapplied_s"][name] >= 0, row
            applied[name] += row["applied"][name]
            # Rows are bounded by the samples, appends counted when they start:
            # nothing can be applied before it was appended.
            assert applied[name] <= appended, (name, row)
        for latency in ("append_ms", "command_ms", "e2e_histogram_ms"):
            present = [
                row[latency][q] for q in ("p50", "p95", "p99") if row[latency][q] is not None
            ]
            assert present == sorted(present), row
            assert all(value >= 0 for value in present), row
        assert all(mib is not None and mib > 10 for mib in row["rss_mib"].values()), row
    # The projections that fold every event applied every one; the others some.
    assert applied["stream_summary"] == applied["event_type_counts"] == stored
    assert 0 < applied["agent_performance"] < applied["debate_state"] < stored

    summary = figures["summary"]
    assert summary["events_appended"] == stored
    assert summary["caught_up"] is True
    assert summary["debates_started"] == summary["debates_completed"] > 0
    assert summary["debates_not_started"] == 0
    assert summary["failed_debates"] == summary["failed_commands"] == 0
    assert summary["duplicates"] == 0 and summary["dead_letters"] == 0
    assert summary["events_per_debate"] > 5
    assert summary["append_ms"]["samples"] >= stored / 10
    assert 0 < summary["append_ms"]["p50"] <= summary["append_ms"]["p99"]
    histogram = summary["e2e_histogram_ms"]["all"]
    assert histogram["samples"] > 0 and 0 < histogram["p50"] <= histogram["p99"]

    verification = figures["verification"]
    assert verification["verified"] is True and verification["problems"] == []
    assert verification["events"]["stored"] == verification["events"]["reported"] == stored
    tables = {(t["projection"], t["table"]) for t in verification["read_models"]}
    assert {("debate_state", "debate_fold"), ("agent_performance", "agent_activity")} <= tables
    rows_of = {(t["projection"], t["table"]): t["rows"] for t in verification["read_models"]}
    for table in (("stream_summary", "streams"), ("debate_state", "debate_fold"),
                  ("agent_performance", "agent_activity")):  # fmt: skip
        assert rows_of[table] > 0, table


@pytest.mark.slow
def test_sustained_scenario_verifies_and_reports_every_second(dsn: str, tmp_path: Path) -> None:
    stdout, figures, png = run_scenario(
        dsn, tmp_path, "sustained", "--rate", "3600", "--duration", "8"
    )
    assert "events per debate" in stdout
    assert figures["scenario"] == "sustained"
    # 3,600 debates/h for 8 s: one due every second, half a second in.
    assert figures["summary"]["debates_offered"] == 8
    assert sum(r["offered_debates"] for r in figures["series"]) == 8
    check_figures(dsn, figures, png)


@pytest.mark.slow
def test_spike_scenario_ramps_up_and_verifies(dsn: str, tmp_path: Path) -> None:
    stdout, figures, png = run_scenario(
        dsn, tmp_path, "spike", "--from-rate", "360", "--to-rate", "7200", "--ramp", "8"
    )
    assert "offered" in stdout
    # (360 + 7,200) / 2 debates/h for 8 s: 8.4 debates, more of them late.
    offered = [r["offered_debates"] for r in figures["series"]]
    assert sum(offered) == figures["summary"]["debates_offered"] == 8
    assert sum(offered[:4]) < sum(offered[4:])
    check_figures(dsn, figures, png)
