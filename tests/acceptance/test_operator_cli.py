"""The operator side of `aura-pg` in a subprocess, as an operator runs it:
status, dlq, stream show, tail, and the connection configuration
(AURA_PG_* variables, password files, masking, helpful errors)."""

from __future__ import annotations

import datetime as dt
import json
import os
import pty
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import psycopg
import pytest
from alembic.script import ScriptDirectory
from psycopg import sql

from aura_pg import EventStore, NewEvent, migrate
from aura_pg._resources import migrations_path
from aura_pg.devtools.localdb import free_port
from tests.helpers.projections import FIXTURE_CATALOG, query

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "aura_pg"]
ESC = "\x1b["


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without anything that configures aura-pg or colour."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("AURA_PG_") and k not in ("NO_COLOR", "PGPASSWORD")
    }
    env["PGPASSFILE"] = "/nonexistent/pgpass"
    env.update(extra)
    return env


def aura_pg(
    *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        cwd=ROOT, capture_output=True, text=True, check=check, timeout=120,
        env=env if env is not None else clean_env(),
    )  # fmt: skip


def register(dsn: str, *names: str) -> None:
    aura_pg("projections", "register", *names, "--catalog", str(FIXTURE_CATALOG), "--dsn", dsn)


def status_json(dsn: str, *extra: str) -> tuple[int, dict[str, dict[str, Any]]]:
    result = aura_pg("status", "--json", "--dsn", dsn, *extra, check=False)
    assert result.returncode in (0, 3), result.stderr
    return result.returncode, {row["name"]: row for row in json.loads(result.stdout)}


def test_status_table_json_and_exit_codes(dsn: str, store: EventStore) -> None:
    register(dsn, "tally_set", "tally_each")
    poison = store.append("op-1", [NewEvent("A", {"poison": True})]).events[0]
    store.append("op-2", [NewEvent("B", {}) for _ in range(3)])
    time.sleep(1.1)
    store.append("op-2", [NewEvent("B", {}) for _ in range(2)])
    # tally_set applies everything but dead-letters the poison event;
    # tally_each stays behind (no daemon runs).
    aura_pg("projections", "rebuild", "tally_set", "--catalog", str(FIXTURE_CATALOG), "--dsn", dsn)

    code, rows = status_json(dsn)
    assert code == 3  # a dead letter makes tally_set unhealthy
    dead, behind = rows["tally_set"], rows["tally_each"]
    assert (dead["health"], dead["dead_letters"], dead["events_behind"]) == ("unhealthy", 1, 0)
    assert "1 dead letter" in dead["problems"]
    assert (behind["health"], behind["events_behind"]) == ("degraded", 6)
    assert behind["problems"] == ["6 events behind"]
    # Numbers are numbers, timestamps ISO 8601.
    assert isinstance(behind["seconds_behind"], int | float)
    assert isinstance(dead["events_applied"], int)
    assert dt.datetime.fromisoformat(dead["updated_at"]).tzinfo is not None

    table = aura_pg("status", "--dsn", dsn, check=False)
    assert table.returncode == 3
    assert ESC not in table.stdout  # not a terminal: no colour
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["NAME", "HEALTH", "STATUS", "CIRCUIT"]
    by_name = {line.split()[0]: line.split() for line in lines[1:3]}
    assert by_name["tally_set"][1] == "unhealthy"
    assert by_name["tally_each"][1:3] == ["degraded", "running"]
    summary = lines[-1]
    assert "1 degraded, 1 unhealthy" in summary
    assert "outbox 0 pending" in summary
    assert "no open writing transaction" in summary

    # --max-lag turns a projection that is too far behind into a failure.
    lagging = rows["tally_each"]["seconds_behind"]
    assert lagging >= 1.0
    _, strict = status_json(dsn, "--max-lag", "0.5")
    assert strict["tally_each"]["health"] == "unhealthy"

    # Once the dead letter is dealt with, being behind is a warning only.
    aura_pg("dlq", "skip", str(dead_letter_id(dsn, poison.global_position)), "--dsn", dsn)
    aura_pg("projections", "pause", "tally_each", "--dsn", dsn)
    code, rows = status_json(dsn)
    assert code == 0
    assert rows["tally_set"]["health"] == "ok" and rows["tally_set"]["problems"] == []
    assert rows["tally_each"]["problems"] == ["paused", "6 events behind"]

    # An owner recorded whose session is gone (a daemon killed -9), where the
    # view tells (owner_alive, migration 0006).
    query(dsn, "UPDATE aura.projection_checkpoints SET owner = 'ghost:1' WHERE name = 'tally_set'")
    code, rows = status_json(dsn)
    if "owner_alive" in rows["tally_set"]:
        assert code == 3
        assert rows["tally_set"]["problems"] == ["owner not alive"]
        table = aura_pg("status", "--dsn", dsn, check=False).stdout
        assert "ghost:1 (gone)" in table

    # `projections list` is `projections status` under the name operators expect.
    listed = json.loads(aura_pg("projections", "list", "--json", "--dsn", dsn).stdout)
    old = json.loads(aura_pg("projections", "status", "--json", "--dsn", dsn).stdout)
    assert [r["name"] for r in listed] == [r["name"] for r in old] == ["tally_each", "tally_set"]


def dead_letter_id(dsn: str, global_position: int) -> int:
    rows = query(
        dsn, "SELECT id FROM aura.dead_letters WHERE global_position = %s", (global_position,)
    )
    return int(rows[0][0])


def read_tty(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run the CLI with stdout on a pseudo-terminal; its exit code and output."""
    master, slave = pty.openpty()
    with subprocess.Popen(
        [*CLI, *args], cwd=ROOT, stdout=slave, stderr=subprocess.DEVNULL, env=env
    ) as proc:
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the terminal's other side is closed
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(master)
        return proc.wait(timeout=60), b"".join(chunks).decode()


def test_status_colour_only_on_a_terminal_without_no_color(dsn: str, store: EventStore) -> None:
    register(dsn, "tally_set", "tally_each")
    store.append("c-1", [NewEvent("A", {})])
    aura_pg("projections", "rebuild", "tally_set", "--catalog", str(FIXTURE_CATALOG), "--dsn", dsn)
    code, output = read_tty(["status", "--dsn", dsn], clean_env())
    assert code == 0
    assert "\x1b[32mok" in output  # tally_set: green
    assert "\x1b[33mdegraded" in output  # tally_each: yellow
    code, output = read_tty(["status", "--dsn", dsn], clean_env(NO_COLOR="1"))
    assert code == 0 and "degraded" in output and ESC not in output


def test_dlq_list_retry_skip(dsn: str, store: EventStore) -> None:
    register(dsn, "tally_set")
    cured = store.append("dlq-1", [NewEvent("A", {"poison": True})]).events[0]
    given_up = store.append("dlq-2", [NewEvent("A", {"poison": True})]).events[0]
    store.append("dlq-3", [NewEvent("B", {})])
    aura_pg("projections", "rebuild", "tally_set", "--catalog", str(FIXTURE_CATALOG), "--dsn", dsn)

    letters = json.loads(aura_pg("dlq", "list", "--json", "--dsn", dsn).stdout)
    assert [(d["projection"], d["event_id"]) for d in letters] == [
        ("tally_set", str(cured.event_id)),
        ("tally_set", str(given_up.event_id)),
    ]
    assert all(isinstance(d["id"], int) for d in letters)
    assert dt.datetime.fromisoformat(letters[0]["first_failed_at"])
    assert json.loads(aura_pg("dlq", "list", "other", "--json", "--dsn", dsn).stdout) == []
    table = aura_pg("dlq", "list", "tally_set", "--dsn", dsn).stdout.splitlines()
    assert table[0].split()[:2] == ["id", "projection"] and len(table) == 3
    # One surface for dead letters: `projections` has none.
    for action in ("dead-letters", "retry-dead-letter", "skip-dead-letter"):
        gone = aura_pg("projections", action, "--dsn", dsn, check=False)
        assert gone.returncode == 2 and "invalid choice" in gone.stderr, action

    first, second = letters[0]["id"], letters[1]["id"]
    query(dsn, "INSERT INTO tally_set.cures VALUES (%s)", (cured.event_id,))
    retried = aura_pg("dlq", "retry", str(first), "--dsn", dsn)
    assert retried.stdout.strip() == f"dead letter {first}: retried"
    skipped = aura_pg("dlq", "skip", str(second), "--note", "bad payload", "--dsn", dsn)
    assert skipped.stdout.strip() == f"dead letter {second}: skipped"
    assert aura_pg("dlq", "list", "--dsn", dsn).stdout.strip() == "(none)"
    resolved = query(dsn, "SELECT status, resolution_note FROM aura.dead_letters ORDER BY id")
    assert [r[0] for r in resolved] == ["retried", "skipped"]
    assert resolved[1][1] == "bad payload"
    applied = query(dsn, "SELECT count(*) FROM tally_set.applied_events WHERE stream_id = 'dlq-1'")
    assert applied == [(1,)]

    unknown = aura_pg("dlq", "retry", "999", "--dsn", dsn, check=False)
    assert unknown.returncode == 1 and "unknown dead letter 999" in unknown.stderr
    assert "Traceback" not in unknown.stderr


def test_stream_show(dsn: str, store: EventStore) -> None:
    events = [
        NewEvent("ORDER_PLACED", {"order": 1, "note": "café"}, metadata={"user": "ada"}),
        NewEvent("ORDER_PAID", {"order": 1, "amount": 12.5}),
        NewEvent("ORDER_SHIPPED", {"order": 1}),
    ]
    recorded = store.append("order-1", events).events
    store.append("order-2", [NewEvent("ORDER_PLACED", {"order": 2})])

    shown = json.loads(aura_pg("stream", "show", "order-1", "--json", "--dsn", dsn).stdout)
    assert [e["version"] for e in shown] == [1, 2, 3]
    assert [e["global_position"] for e in shown] == [r.global_position for r in recorded]
    assert [e["type"] for e in shown] == ["ORDER_PLACED", "ORDER_PAID", "ORDER_SHIPPED"]
    assert shown[0]["data"] == {"order": 1, "note": "café"}
    assert shown[0]["metadata"]["user"] == "ada"
    assert shown[1]["data"]["amount"] == 12.5
    assert shown[0]["event_id"] == str(recorded[0].event_id)
    assert dt.datetime.fromisoformat(shown[0]["recorded_at"]).tzinfo is not None

    def versions(*extra: str) -> list[int]:
        out = aura_pg("stream", "show", "order-1", "--json", *extra, "--dsn", dsn).stdout
        return [e["version"] for e in json.loads(out)]

    assert versions("--from-version", "2") == [2, 3]
    assert versions("--limit", "2") == [1, 2]
    assert versions("--backwards") == [3, 2, 1]
    assert versions("--backwards", "--limit", "2") == [3, 2]
    assert versions("--backwards", "--from-version", "2") == [2, 1]
    assert versions("--from-version", "9") == []

    text = aura_pg("stream", "show", "order-1", "--dsn", dsn).stdout.splitlines()
    assert text[0] == "stream 'order-1' at version 3: 3 events shown"
    assert text[1].startswith(f"v1  position {recorded[0].global_position}  ")
    assert text[1].endswith("  ORDER_PLACED")
    assert text[2].split(None, 1) == ["data:", '{"note":"café","order":1}']
    assert text[3].startswith("    metadata: {") and '"user":"ada"' in text[3]

    unknown = aura_pg("stream", "show", "no-such-stream", "--dsn", dsn, check=False)
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == "aura-pg: unknown stream 'no-such-stream' (it has no events)"
    assert unknown.stdout == ""


class Lines:
    """A pipe read line by line on a thread, so a test can wait with a timeout."""

    def __init__(self, pipe: IO[str]) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe: IO[str]) -> None:
        for line in pipe:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next(self, timeout: float = 30.0) -> str | None:
        return self.lines.get(timeout=timeout)

    def join(self) -> None:
        self._thread.join(10)

    def rest(self, timeout: float = 30.0) -> list[str]:
        out = []
        while (line := self.next(timeout)) is not None:
            out.append(line)
        return out


Started = list[tuple[subprocess.Popen[str], Lines]]


@pytest.fixture
def tail_process() -> Iterator[Started]:
    started: Started = []
    yield started
    for proc, lines in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        lines.join()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def start_tail(started: Started, dsn: str, *args: str) -> tuple[subprocess.Popen[str], Lines]:
    proc = subprocess.Popen(
        [*CLI, "tail", "--dsn", dsn, "--interval", "0.05", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(),
    )  # fmt: skip
    assert proc.stderr is not None and proc.stdout is not None
    lines = Lines(proc.stdout)
    started.append((proc, lines))
    first = proc.stderr.readline()  # printed once the start is fixed
    assert first.startswith("aura-pg tail: following after "), first
    return proc, lines


def test_tail_follows_new_events_in_order_once(
    dsn: str, store: EventStore, tail_process: Started
) -> None:
    store.append("before", [NewEvent("OLD", {"n": -1})])
    proc, lines = start_tail(tail_process, dsn, "--json", "--limit", "9")

    appended = []
    # Two transactions overlap: the later one commits first, yet tail shows
    # each event once, in (transaction id, position) order.
    with psycopg.connect(dsn) as slow, psycopg.connect(dsn) as quick:
        appended += store.append(
            "t-slow", [NewEvent("A", {"n": 0}), NewEvent("A", {})], conn=slow
        ).events
        appended += store.append("t-quick", [NewEvent("B", {"n": 2})], conn=quick).events
        quick.commit()
        appended += store.append("t-other", [NewEvent("C", {"n": 3})]).events
        time.sleep(0.3)
        slow.commit()
    for n in range(5):
        appended += store.append(f"t-{n}", [NewEvent("D", {"n": n})]).events
        time.sleep(0.02)

    printed = [json.loads(line) for line in lines.rest()]
    assert proc.wait(30) == 0
    assert len(printed) == 9
    ids = [p["event_id"] for p in printed]
    assert len(set(ids)) == 9
    assert set(ids) == {str(e.event_id) for e in appended}
    order = [(p["transaction_id"], p["global_position"]) for p in printed]
    assert order == sorted(order)
    assert all(p["checkpoint"] == f"{t}/{g}" for p, (t, g) in zip(printed, order, strict=True))
    assert printed[0]["stream_id"] == "t-slow"  # the older transaction comes first
    assert "before" not in {p["stream_id"] for p in printed}
    assert {"version", "type", "recorded_at", "data", "metadata"} <= printed[0].keys()


def test_tail_from_start_types_checkpoint_and_signals(
    dsn: str, store: EventStore, tail_process: Started
) -> None:
    first = store.append("x-1", [NewEvent("A", {"k": 1}), NewEvent("B", {})]).events
    second = store.append("x-2", [NewEvent("A", {"k": 2})]).events

    out = aura_pg("tail", "--from-start", "--types", "A", "--limit", "2", "--json", "--dsn", dsn)
    shown = [json.loads(line) for line in out.stdout.splitlines()]
    assert [s["event_id"] for s in shown] == [str(first[0].event_id), str(second[0].event_id)]

    resumed = aura_pg(
        "tail", "--from", shown[0]["checkpoint"], "--limit", "2", "--json", "--dsn", dsn
    )
    rest = [json.loads(line)["event_id"] for line in resumed.stdout.splitlines()]
    assert rest == [str(first[1].event_id), str(second[0].event_id)]

    text = aura_pg("tail", "--from-start", "--limit", "1", "--dsn", dsn).stdout.splitlines()
    assert len(text) == 1
    fields = text[0].split("  ")
    assert fields[0] == shown[0]["checkpoint"]
    assert fields[2:] == ["x-1@1", "A", '{"k":1}']

    bad = aura_pg("tail", "--from", "nonsense", "--dsn", dsn, check=False)
    assert bad.returncode == 1 and "not a checkpoint" in bad.stderr

    for signum in (signal.SIGINT, signal.SIGTERM):
        proc, lines = start_tail(tail_process, dsn)
        store.append("x-3", [NewEvent("LIVE", {})])
        line = lines.next()
        assert line is not None and "x-3@" in line
        proc.send_signal(signum)
        assert proc.wait(10) == 0
        assert lines.rest() == []


def test_connection_error_is_helpful_and_masked() -> None:
    port = free_port()
    for dsn in (
        f"host=127.0.0.1 port={port} user=bob password=secret dbname=aura",
        f"postgresql://bob:secret@127.0.0.1:{port}/aura",
    ):
        for command in (["status"], ["dlq", "list"], ["stream", "show", "x"], ["migrate"]):
            result = aura_pg(*command, "--dsn", dsn, check=False)
            assert result.returncode == 1, command
            assert "secret" not in result.stderr + result.stdout
            assert "Traceback" not in result.stderr
            first, hint = result.stderr.strip().splitlines()
            assert first.startswith("aura-pg: cannot connect to ")
            assert "***" in first and f"port {port} failed" in first
            assert "AURA_PG_DSN" in hint and "PG*" in hint


def test_unmigrated_database_says_to_migrate(empty_dsn: str) -> None:
    for command in (["status"], ["dlq", "list"], ["projections", "list"], ["tail"]):
        result = aura_pg(*command, "--dsn", empty_dsn, check=False)
        assert result.returncode == 1
        assert "has no aura schema: run `aura-pg migrate`" in result.stderr
        assert "Traceback" not in result.stderr

    head = migrate.head_revision()
    previous = ScriptDirectory(str(migrations_path())).get_revision(head).down_revision
    assert isinstance(previous, str)
    migrate.upgrade(empty_dsn, previous)
    result = aura_pg("status", "--dsn", empty_dsn, check=False)
    assert result.returncode == 1
    assert (
        f"database schema is at revision {previous}, this code needs {head}: "
        "run `aura-pg migrate`" in result.stderr
    )


def test_role_without_aura_rights_is_told_so(dsn: str) -> None:
    role = f"aura_none_{uuid.uuid4().hex[:10]}"
    query(dsn, sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        result = aura_pg("status", "--dsn", f"{dsn} user={role}", check=False)
        assert result.returncode == 1
        assert f"role '{role}' may not use the aura schema" in result.stderr
    finally:
        query(dsn, sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_dsn_from_environment_and_flag_precedence(dsn: str) -> None:
    closed = f"host=127.0.0.1 port={free_port()} dbname=nothing"
    from_env = aura_pg("status", env=clean_env(AURA_PG_DSN=dsn))
    assert "no projections registered" in from_env.stdout
    # The flag wins over the environment, both ways.
    assert aura_pg("status", "--dsn", dsn, env=clean_env(AURA_PG_DSN=closed)).returncode == 0
    refused = aura_pg("status", "--dsn", closed, env=clean_env(AURA_PG_DSN=dsn), check=False)
    assert refused.returncode == 1 and "dbname=nothing" in refused.stderr
    # An empty DSN hands everything to libpq's PG* variables.
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    pg_env = clean_env(
        PGHOST=str(info["host"]),
        PGPORT=str(info["port"]),
        PGUSER=str(info["user"]),
        PGDATABASE=str(info["dbname"]),
    )
    assert aura_pg("status", env=pg_env).returncode == 0
    assert aura_pg("status", env={**pg_env, "AURA_PG_DSN": ""}).returncode == 0
    # Settings are checked, and named.
    env = clean_env(AURA_PG_DSN=dsn, AURA_PG_STATEMENT_TIMEOUT="soon")
    bad = aura_pg("status", env=env, check=False)
    assert bad.returncode == 2  # a usage error, as the flag's
    assert bad.stderr.startswith("aura-pg: invalid configuration: AURA_PG_STATEMENT_TIMEOUT: ")
    flag = aura_pg("status", "--statement-timeout", "soon", env=env, check=False)
    assert flag.returncode == 2 and "--statement-timeout: statement timeout 'soon'" in flag.stderr
    env["AURA_PG_STATEMENT_TIMEOUT"] = "30s"
    assert aura_pg("status", env=env).returncode == 0


@pytest.fixture
def password_role(dsn: str) -> Iterator[tuple[str, str]]:
    """A LOGIN role (aura_reader) with a password; its name and password."""
    role = f"aura_pw_{uuid.uuid4().hex[:10]}"
    password = f"pw-{uuid.uuid4().hex}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE aura_reader").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
    try:
        yield role, password
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.fixture
def password_required(dsn: str, password_role: tuple[str, str]) -> Iterator[bool]:
    """Make the (private, trust) test cluster ask this role for its password
    over TCP, when its pg_hba.conf is ours to change; False when it is not."""
    role = password_role[0]
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SHOW hba_file").fetchone()
    hba = Path(str(row[0])) if row else None
    if hba is None or not hba.exists() or not os.access(hba, os.W_OK):
        yield False
        return
    original = hba.read_text()
    rule = f"host all {role} 127.0.0.1/32 scram-sha-256\n"
    with hba.open("w") as handle:
        handle.write(rule + original)
    try:
        query(dsn, "SELECT pg_reload_conf()")
        time.sleep(0.3)
        yield True
    finally:
        with hba.open("w") as handle:
            handle.write(original)
        query(dsn, "SELECT pg_reload_conf()")


def test_password_from_a_file(
    dsn: str, password_role: tuple[str, str], password_required: bool, tmp_path: Path
) -> None:
    role, password = password_role
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    login = f"host=127.0.0.1 port={info['port']} dbname={info['dbname']} user={role}"
    secret_file = tmp_path / "password"
    secret_file.write_text(password + "\n")  # a trailing newline, as editors leave it
    wrong_file = tmp_path / "wrong"
    wrong_file.write_text("not-the-password\n")

    # The private cluster the fixtures start is ours to configure.
    assert password_required or os.environ.get("AURA_PG_TEST_HOST")
    if password_required:
        without = aura_pg("status", "--dsn", login, check=False)
        assert without.returncode == 1 and "cannot connect to" in without.stderr
        assert "password" in without.stderr
        wrong = aura_pg("status", "--dsn", login, "--password-file", str(wrong_file), check=False)
        assert wrong.returncode == 1
        assert "password authentication failed" in wrong.stderr
        assert "not-the-password" not in wrong.stderr

    # From the flag, from AURA_PG_PASSWORD_FILE, and over a password in the DSN.
    ok = aura_pg("status", "--dsn", login, "--password-file", str(secret_file))
    assert "no projections registered" in ok.stdout
    env = clean_env(AURA_PG_DSN=login, AURA_PG_PASSWORD_FILE=str(secret_file))
    assert aura_pg("status", env=env).returncode == 0
    in_dsn = f"{login} password=stale"
    assert aura_pg("status", "--dsn", in_dsn, "--password-file", str(secret_file)).returncode == 0

    # Never printed: not in a connection error, not in the DSN shown.
    closed = f"host=127.0.0.1 port={free_port()} user={role}"
    failed = aura_pg("status", "--dsn", closed, "--password-file", str(secret_file), check=False)
    assert failed.returncode == 1 and "cannot connect to" in failed.stderr
    assert password not in failed.stderr + failed.stdout

    missing = aura_pg(
        "status", "--dsn", login, "--password-file", str(tmp_path / "no"), check=False
    )
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"aura-pg: password file '{tmp_path / 'no'}' does not exist"
    (tmp_path / "empty").write_text("\n")
    empty = aura_pg(
        "status", "--dsn", login, "--password-file", str(tmp_path / "empty"), check=False
    )
    assert empty.returncode == 1 and "is empty" in empty.stderr
