"""`aura-pg doctor` in a subprocess (`python -m aura_pg doctor`), against
real databases: a migrated one per test, and an empty one."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from aura_pg.devtools.localdb import free_port
from aura_pg.doctor import CHECK_NAMES
from aura_pg.projection.connection import connect
from aura_pg.projection.registration import register_projections
from aura_pg.projection.settings import ProjectorSettings
from tests.helpers.projections import fixture_catalog, query

ROOT = Path(__file__).resolve().parents[2]


def doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aura_pg", "doctor", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def report(*args: str) -> tuple[int, dict[str, dict[str, Any]]]:
    """Exit code and the checks by name, from --json."""
    done = doctor(*args, "--json")
    assert done.stderr == ""
    document = json.loads(done.stdout)
    assert document["exit_code"] == done.returncode
    return done.returncode, {c["name"]: c for c in document["checks"]}


def test_a_healthy_database_passes_every_check(dsn: str) -> None:
    done = doctor("--dsn", dsn)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    by_name = {line.split()[1]: line.split()[0] for line in lines[:-1]}
    assert list(by_name) == list(CHECK_NAMES)
    assert set(by_name.values()) <= {"OK", "WARN"}
    for name in ("connect", "server_version", "timescaledb", "migrations", "roles"):
        assert by_name[name] == "OK", done.stdout
    assert by_name["long_transactions"] == "OK"
    assert by_name["projections"] == "OK"
    assert lines[-1].startswith("doctor: ")

    code, checks = report("--dsn", dsn)
    assert code == 0
    assert list(checks) == list(CHECK_NAMES)
    assert checks["migrations"]["detail"].endswith("(head)")
    assert "aura_owner" in checks["roles"]["detail"]
    assert "TimescaleDB" in checks["timescaledb"]["detail"]


def test_strict_turns_warnings_into_exit_3(dsn: str) -> None:
    # The test server runs with fsync and synchronous_commit off: a warning.
    code, checks = report("--dsn", dsn)
    assert checks["durability"]["status"] == "warn"
    assert code == 0
    strict = doctor("--dsn", dsn, "--strict")
    assert strict.returncode == 3
    assert "WARN  durability" in strict.stdout


def test_an_unmigrated_database_fails_migrations_with_the_hint(empty_dsn: str) -> None:
    done = doctor("--dsn", empty_dsn)
    assert done.returncode == 3
    line = next(x for x in done.stdout.splitlines() if x.split()[1] == "migrations")
    assert line.startswith("FAIL")
    assert "no aura schema" in line
    assert "hint: run aura-pg migrate" in line

    code, checks = report("--dsn", empty_dsn)
    assert code == 3
    assert checks["migrations"]["hint"] == "run aura-pg migrate"
    assert checks["connect"]["status"] == "ok"
    assert checks["roles"]["detail"].startswith("not checked")
    assert checks["projections"]["detail"].startswith("not checked")


def test_a_long_open_writing_transaction_is_named(dsn: str) -> None:
    with psycopg.connect(dsn, application_name="forgotten-session") as holder:
        holder.execute("SELECT pg_current_xact_id()")  # an xid: holds the horizon
        pid = holder.info.backend_pid
        # Past the threshold, and far from ten times it even when a loaded
        # machine makes the doctor slow to start (it reads the age later).
        time.sleep(2.2)
        code, checks = report("--dsn", dsn, "--max-transaction-age", "2")
        holder.rollback()
    check = checks["long_transactions"]
    assert check["status"] == "warn", check
    assert code == 0
    assert f"pid {pid} ('forgotten-session'" in check["detail"]
    assert "idle in transaction" in check["detail"]
    assert "pg_terminate_backend" in check["hint"]

    # Ten times the threshold: a failure.
    with psycopg.connect(dsn, application_name="forgotten-session") as holder:
        holder.execute("SELECT pg_current_xact_id()")
        time.sleep(0.3)
        code, checks = report("--dsn", dsn, "--max-transaction-age", "0.01")
        holder.rollback()
    assert checks["long_transactions"]["status"] == "fail"
    assert code == 3

    # Ended: nothing to report.
    code, checks = report("--dsn", dsn, "--max-transaction-age", "2")
    assert checks["long_transactions"]["status"] == "ok"


def test_idle_in_transaction_timeout_set_on_the_database_is_ok(dsn: str) -> None:
    _, checks = report("--dsn", dsn)
    assert checks["idle_in_transaction_timeout"]["status"] == "warn"
    assert "ALTER DATABASE" in checks["idle_in_transaction_timeout"]["hint"]

    database = conninfo_to_dict(dsn)["dbname"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET idle_in_transaction_session_timeout = '5min'").format(
                sql.Identifier(database)
            )
        )
    _, checks = report("--dsn", dsn)
    check = checks["idle_in_transaction_timeout"]
    assert check["status"] == "ok", check
    assert check["detail"] == ("idle_in_transaction_session_timeout = 300000 ms (from database)")


def test_an_unreachable_server_is_one_failed_check_without_traceback() -> None:
    port = free_port()  # nothing listens there
    secret = "s3cret-doctor-pw"
    target = f"host=127.0.0.1 port={port} user=postgres password={secret} dbname=x"
    done = doctor("--dsn", target, "--connect-timeout", "5")
    assert done.returncode == 3
    assert "Traceback" not in done.stdout + done.stderr
    assert secret not in done.stdout + done.stderr
    assert done.stdout.startswith("FAIL  connect  cannot connect: ")
    assert f"port {port} failed" in done.stdout
    assert "not run (no connection): server_version" in done.stdout

    uri = f"postgresql://postgres:{secret}@127.0.0.1:{port}/x"
    code, checks = report("--dsn", uri, "--connect-timeout", "5")
    assert code == 3
    assert list(checks) == ["connect"]
    assert checks["connect"]["status"] == "fail"
    assert secret not in json.dumps(checks)


def test_the_dsn_defaults_to_aura_pg_dsn(dsn: str) -> None:
    env = {**os.environ, "AURA_PG_DSN": dsn}
    done = subprocess.run(
        [sys.executable, "-m", "aura_pg", "doctor", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env=env,
    )
    checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    assert checks["migrations"]["status"] == "ok"
    database = dsn.split("dbname=")[1].split()[0]
    assert checks["connect"]["detail"].endswith(f"/{database}")


async def _register(dsn: str, names: list[str]) -> None:
    async with await connect(dsn, ProjectorSettings(), "test") as conn:
        await register_projections(conn, fixture_catalog().select(names))


def test_projection_trouble_is_reported(dsn: str) -> None:
    asyncio.run(_register(dsn, ["tally_set", "tally_each", "tally_filtered"]))
    _, checks = report("--dsn", dsn)
    assert checks["projections"]["status"] == "ok"
    assert checks["projections"]["detail"].startswith("3 projection(s)")

    # tally_each: a pending dead letter (a warning).
    query(
        dsn,
        "INSERT INTO aura.dead_letters (projection, global_position, transaction_id, event_id, "
        "stream_id, event_type, error, attempts, first_failed_at, last_failed_at) "
        "VALUES ('tally_each', 1, '1', gen_random_uuid(), 's-1', 'A', 'boom', 3, now(), now())",
    )
    code, checks = report("--dsn", dsn)
    check = checks["projections"]
    assert check["status"] == "warn", check
    assert code == 0
    assert check["detail"] == "tally_each: 1 pending dead letter(s)"
    assert "dead-letter" in check["hint"]

    # tally_set: failed, its circuit opened after repeated failures, as
    # aura.record_projection_failure leaves it (a failure).
    query(
        dsn,
        "UPDATE aura.projection_checkpoints SET status = 'failed', circuit_state = 'open', "
        "circuit_open_until = now() + interval '1 hour', consecutive_failures = 4, "
        "last_error = 'division by zero', last_error_at = now() WHERE name = 'tally_set'",
    )
    code, checks = report("--dsn", dsn)
    check = checks["projections"]
    assert check["status"] == "fail", check
    assert code == 3
    assert check["detail"].startswith(
        "tally_set: failing (circuit open, 4 consecutive failures, last error: division by zero)"
    )
    assert "tally_each: 1 pending dead letter(s)" in check["detail"]

    text = doctor("--dsn", dsn).stdout
    line = next(x for x in text.splitlines() if x.split()[1] == "projections")
    assert line.startswith("FAIL  projections")
    assert "-- hint: aura-pg projections status" in line


def test_an_owner_whose_session_is_gone_is_reported(dsn: str) -> None:
    asyncio.run(_register(dsn, ["tally_filtered"]))
    columns = query(
        dsn,
        "SELECT attname FROM pg_attribute "
        "WHERE attrelid = 'aura.projection_status'::regclass AND attnum > 0",
    )
    query(
        dsn,
        "UPDATE aura.projection_checkpoints SET owner = 'ghost-host:4242', "
        "owner_since = now() WHERE name = 'tally_filtered'",
    )
    _, checks = report("--dsn", dsn)
    check = checks["projections"]
    if ("owner_alive",) in columns:
        assert check["status"] == "warn", check
        assert "owner ghost-host:4242 is gone" in check["detail"]
    else:  # a schema without the column: nothing to say about owners
        assert check["status"] == "ok", check
