"""The append benchmark runs end to end (briefly) and prints its ratios.

Speed itself is not asserted here: figures come from full runs of
load/bench_append.py, reported in docs/performance.md.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_append_prints_figures_and_ratios(empty_dsn: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [
            sys.executable, "load/bench_append.py", "--dsn", empty_dsn, "--duration", "0.3",
            "--rounds", "1", "--batch", "1", "3", "--writers", "2", "--json", str(out),
            "--targets", "store", "watched", "notify", "plain", "bare", "eventsourcing",
        ],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    assert "store/plain" in run.stdout
    assert "store/eventsourcing" in run.stdout
    figures = json.loads(out.read_text())
    assert {(c["target"], c["batch"]) for c in figures["cells"]} == {
        (target, batch)
        for target in ("store", "watched", "notify", "plain", "bare", "eventsourcing")
        for batch in (1, 3)
    }
    assert figures["median_store_vs_eventsourcing"] > 0
    assert figures["median_notify_vs_store"] > 0 and figures["median_watched_vs_store"] > 0
    assert "notify/store from" in run.stdout and "watched/store from" in run.stdout
    assert all(c["events_per_second"] > 0 for c in figures["cells"])
    assert [(r["batch"], r["writers"]) for r in figures["ratios"]] == [(1, 2), (3, 2)]


def test_bench_webhook_prints_figures_and_ratios() -> None:
    """load/bench_webhook.py (issue 23): both schemes, both targets, every
    POST received (the script exits non-zero otherwise)."""
    run = subprocess.run(
        [sys.executable, "load/bench_webhook.py", "--messages", "20", "--rounds", "1"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    summary = run.stdout.split("\n\n")[-1]
    schemes = ("http", "https") if shutil.which("openssl") else ("http",)  # openssl: the cert
    for scheme in schemes:
        for target in ("per-connection", "sink"):
            assert f"{scheme} {target}: " in summary, run.stdout
        assert f"x {scheme} per-connection)" in summary
