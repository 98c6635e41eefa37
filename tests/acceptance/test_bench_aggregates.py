"""The aggregates benchmark runs end to end (its quick mode) and prints its
figures, ratios and verdicts.

Speed itself is not asserted here: figures come from full runs of
load/bench_aggregates.py, reported in docs/performance.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_aggregates_quick_prints_figures_and_verdicts(empty_dsn: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [
            sys.executable, "load/bench_aggregates.py", "--dsn", empty_dsn, "--quick",
            "--sizes", "10", "300", "--duration", "0.3", "--warmup", "0.1", "--loads", "4",
            "--profile", "--json", str(out),
        ],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    assert "toolkit/eventsourcing" in run.stdout
    assert run.stdout.count("PASS") + run.stdout.count("MISS") == 3
    assert "--- profile: toolkit:" in run.stdout and "--- profile: eventsourcing:" in run.stdout
    figures = json.loads(out.read_text())
    assert {(c["implementation"], c["events"], c["snapshots"]) for c in figures["loads"]} == {
        (implementation, size, snapshots)
        for implementation in ("toolkit", "eventsourcing")
        for size in (10, 300)
        for snapshots in (True, False)
    }
    assert all(c["samples"] >= 3 and c["p50_ms"] > 0 for c in figures["loads"])
    assert {(c["implementation"], c["layout"]) for c in figures["commands"]} == {
        (implementation, layout)
        for implementation in ("toolkit", "eventsourcing")
        for layout in ("uncontended", "contended")
    }
    assert all(c["commands"] > 0 for c in figures["commands"])
    assert set(figures["targets"]) == {"load_p95", "load_ratio", "uncontended_vs_eventsourcing"}
