"""The projection benchmark runs end to end (quick mode, briefly) and
verifies its read models.

Speed itself is not asserted here: figures come from full runs of
load/bench_projection.py, reported in docs/performance.md.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_projection_quick_verifies_its_read_models(empty_dsn: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [
            sys.executable, "load/bench_projection.py", "--quick", "--dsn", empty_dsn,
            "--events", "3000", "--duration", "2", "--json", str(out),
        ],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "verified" in run.stdout.splitlines()[-1]
    figures = json.loads(out.read_text())
    assert figures["verified"] is True
    assert figures["log_events"] == 3000
    assert [(r["projection"], r["events"]) for r in figures["catch_up"]] == [
        ("bench_each_invoker", 3000),
        ("bench_each", 3000),
        ("bench_set_500", 3000),
        ("bench_set_5000", 3000),
    ]
    assert [(r["wake_up"], r["notify"]) for r in figures["latency"]] == [
        ("watch + poll 1s", False),
        ("listen + poll 1s", True),
        ("poll only 1s", False),
        ("poll only 0.1s", False),
    ]
    assert all(r["events"] > 0 and math.isfinite(r["p95_ms"]) for r in figures["latency"])
    # The reference runs the same handler as the daemon's role; bench_each
    # as its read model's role.
    with psycopg.connect(empty_dsn) as conn:
        definer = conn.execute(
            "SELECT n.nspname, p.prosecdef FROM pg_proc p"
            " JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE p.proname = 'aura_run_handler' AND n.nspname LIKE 'bench_each%' ORDER BY 1"
        ).fetchall()
    assert definer == [("bench_each", True), ("bench_each_invoker", False)]
    watching, listening = figures["latency"][:2]
    assert watching["wake_ups"] > 0 and watching["watch_ticks"] >= watching["wake_ups"]
    assert listening["wake_ups"] > 0 and listening["watch_ticks"] == 0
