"""The projection benchmark runs end to end (quick mode, briefly) and
verifies its read models; its Python processors scenario runs and prints
every figure and target.

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
            "--events", "3000", "--duration", "2", "--json", str(out), "--scenarios", "sql",
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


@pytest.mark.slow
def test_bench_python_processors_runs_and_prints_its_figures(
    empty_dsn: str, tmp_path: Path
) -> None:
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [
            sys.executable, "load/bench_projection.py", "--dsn", empty_dsn,
            "--scenarios", "python", "--events", "1000", "--duration", "1", "--rate", "200",
            "--load-writers", "1", "--latency-writers", "1", "--io-partitions", "1", "4",
            "--io-window", "1",
            "--io-events", "1200", "--io-batch", "10", "--io-sleep-ms", "1",
            "--py-profile", str(tmp_path / "profile"), "--json", str(out),
        ],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert "verified" in lines[-1]
    figures = json.loads(out.read_text())["python"]
    assert figures["problems"] == []
    log_events = figures["log_events"]
    assert log_events >= 1000
    assert [(r["projection"], r["applied"]) for r in figures["catch_up"]] == [
        ("bench_ref_each", log_events),
        ("bench_ref_set", log_events),
        ("bench_py_noop", log_events),
        ("bench_py_noop_async", log_events),
        ("bench_py_insert", log_events),
        ("bench_py_insert_async", log_events),
        ("bench_py_noop_profiled", log_events),
    ]
    python_runs = [r for r in figures["catch_up"] if r["kind"] == "python"]
    assert all(r["handled_events"] == log_events for r in python_runs)
    assert figures["anatomy"]["events"] > 0
    assert (tmp_path / "profile" / "bench_py_noop_profiled.prof").exists()
    # The test server does not track commit timestamps: the end point is
    # the handler's clock, and the output says so.
    assert [(r["projection"], r["end_point"]) for r in figures["latency"]] == [
        ("bench_py_live", "handler clock_timestamp()"),
        ("bench_ref_live", "handler clock_timestamp()"),
    ]
    assert all(r["events"] > 0 and math.isfinite(r["p95_ms"]) for r in figures["latency"])
    assert [(r["projection"], r["partitions"], r["pinned"]) for r in figures["io"]] == [
        ("bench_py_io_pinned_1", 1, True),
        ("bench_py_io_pinned_4", 4, True),
        ("bench_py_io_free_1", 1, False),
        ("bench_py_io_free_4", 4, False),
    ]
    assert all(r["duplicates"] == 0 for r in figures["io"])
    # Pinned: each of the 4 daemons ran one partition.
    assert figures["io"][1]["partitions_per_daemon"] == [1, 1, 1, 1]
    targets = lines[lines.index("targets (Python processors):") + 1 :]
    for target in ("no-op catch-up >= 20000", "end-to-end p95 < 50 ms", "I/O-bound, 4 partitions"):
        line = next(line for line in targets if target in line)
        assert line.endswith(("PASS", "MISS")), line
