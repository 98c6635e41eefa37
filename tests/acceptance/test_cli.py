"""The aura-pg command in a subprocess, as an operator runs it."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg

from aura_pg import migrate
from aura_pg.devtools.localdb import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


def aura_pg(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aura_pg", *args],
        capture_output=True, text=True, check=check, cwd=REPO_ROOT, timeout=300,
    )  # fmt: skip


def test_migrate_check_and_smoke(empty_dsn: str) -> None:
    check = aura_pg("migrate", "--check", "--dsn", empty_dsn, check=False)
    assert check.returncode == 3
    assert "run `aura-pg migrate`" in check.stderr

    done = aura_pg("migrate", "--dsn", empty_dsn)
    assert f"schema at revision {migrate.head_revision()}" in done.stdout
    assert aura_pg("migrate", "--check", "--dsn", empty_dsn).returncode == 0

    smoke = json.loads(aura_pg("smoke", "--dsn", empty_dsn).stdout)
    assert smoke["appended_versions"] == [1, 2]
    assert smoke["retry_was_duplicate"] is True
    assert smoke["retry_positions_equal"] is True
    assert smoke["stream_version"] == 2
    assert smoke["stream_summary_row"] == [2, 2, "DEBATE_ARGUMENT_ADDED"]
    with psycopg.connect(empty_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM aura.events").fetchone() == (2,)


def test_migrate_sql_needs_no_database() -> None:
    printed = aura_pg("migrate", "--sql", "--dsn", "host=/nonexistent")
    assert "CREATE TABLE aura.events" in printed.stdout


def test_dsn_from_environment(empty_dsn: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "aura_pg", "migrate"],
        capture_output=True, text=True, check=True, cwd=REPO_ROOT,
        env={"AURA_PG_DSN": empty_dsn, "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert f"schema at revision {migrate.head_revision()}" in result.stdout


def test_db_start_status_stop_destroy() -> None:
    # Not pytest's tmp_path: the server runs as the postgres user, which
    # cannot enter a root-only directory.
    workdir = Path(tempfile.mkdtemp(prefix="aura-pg-cli-"))
    workdir.chmod(0o755)
    data_dir = workdir / "cluster" / "data"
    args = ["--data-dir", str(data_dir), "--port", str(free_port())]
    started = aura_pg("db", "start", *args)
    try:
        dsn = started.stdout.strip()
        with psycopg.connect(dsn) as conn:
            preload = conn.execute("SHOW shared_preload_libraries").fetchone()
        assert preload == ("timescaledb",)
        assert aura_pg("db", "status", *args).stdout.startswith("running")
        aura_pg("db", "start", *args)  # already running: nothing to do
        aura_pg("db", "stop", *args)
        stopped = aura_pg("db", "status", *args, check=False)
        assert stopped.returncode == 3
        assert stopped.stdout.startswith("stopped")
    finally:
        aura_pg("db", "destroy", *args)
    assert not data_dir.exists()
    shutil.rmtree(workdir)


def test_version_and_python_dash_m() -> None:
    expected = f"aura-pg {importlib.metadata.version('aura-pg')}"
    assert aura_pg("--version").stdout.strip() == expected
    for module in ("aura_pg", "aura_pg.cli"):
        helped = subprocess.run(
            [sys.executable, "-m", module, "--help"],
            capture_output=True, text=True, check=True, cwd=REPO_ROOT, timeout=60,
        )  # fmt: skip
        assert helped.stdout.startswith("usage: aura-pg "), module
        assert "dlq" in helped.stdout and "doctor" in helped.stdout


def test_a_bad_daemon_number_is_a_usage_error_not_a_traceback() -> None:
    for args in (["--poll-interval", "0"], ["--poll-interval", "-1"], ["--poll-interval", "x"]):
        done = aura_pg("project", "--dsn", "host=/nonexistent", *args, check=False)
        assert done.returncode == 2, done.stderr
        assert "argument --poll-interval: " in done.stderr and "Traceback" not in done.stderr
    env = {"PATH": "/usr/bin:/bin", "AURA_PG_PROJECT_POLL_INTERVAL": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "aura_pg", "project", "--dsn", "host=/nonexistent"],
        capture_output=True, text=True, check=False, cwd=REPO_ROOT, env=env, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "aura-pg: invalid configuration: AURA_PG_PROJECT_POLL_INTERVAL: "
        "must be a positive number, not 0"
    )
