"""`aura-pg doctor` without a database: report formatting, exit codes, the
command's options and the rules that turn query results into checks."""

from __future__ import annotations

import argparse
import json

import pytest

from aura_pg import cli
from aura_pg.cli import doctor as doctor_command
from aura_pg.cli import exit_codes
from aura_pg.cli._connection import connection_settings
from aura_pg.cli.doctor import exit_code
from aura_pg.doctor import Check, checks, format_json, format_report, verdicts

OK = Check("connect", "ok", "connected to u@h:5432/db")
WARN = Check("durability", "warn", "fsync is off", "turn it on")
FAIL = Check("migrations", "fail", "no aura schema", "run aura-pg migrate")


@pytest.mark.parametrize(
    ("checks", "strict", "code"),
    [
        ([OK], False, 0),
        ([OK], True, 0),
        ([OK, WARN], False, 0),
        ([OK, WARN], True, 3),
        ([OK, FAIL], False, 3),
        ([OK, WARN, FAIL], True, 3),
        ([], False, 0),
    ],
)
def test_exit_code_rules(checks: list[Check], strict: bool, code: int) -> None:
    assert exit_code(checks, strict=strict) == code


def test_the_report_has_one_line_per_check_with_hints_for_warn_and_fail() -> None:
    ok_with_hint = Check("clock_skew", "ok", "in sync", "never shown")
    text = format_report([OK, ok_with_hint, WARN, FAIL])
    lines = text.splitlines()
    assert text.endswith("\n")
    assert lines[0] == "OK    connect     connected to u@h:5432/db"
    assert lines[1] == "OK    clock_skew  in sync"
    assert lines[2] == "WARN  durability  fsync is off  -- hint: turn it on"
    assert lines[3] == "FAIL  migrations  no aura schema  -- hint: run aura-pg migrate"
    assert "not run" not in text  # connect succeeded: the rest were left out on purpose
    assert lines[-1] == "doctor: fail (2 ok, 1 warn, 1 fail)"


def test_every_check_is_named() -> None:
    assert ("connect", *(name for name, _ in checks._CHECKS)) == verdicts.CHECK_NAMES


def test_a_multi_line_detail_stays_on_its_line() -> None:
    text = format_report([Check("connect", "fail", "refused\n  Is it running?", "look\nhere")])
    assert text.splitlines()[0] == "FAIL  connect  refused Is it running?  -- hint: look here"


def test_a_failed_connection_lists_the_checks_that_did_not_run() -> None:
    failed = Check("connect", "fail", "cannot connect: refused", "check --dsn")
    lines = format_report([failed]).splitlines()
    assert lines[1] == "not run (no connection): " + ", ".join(verdicts.CHECK_NAMES[1:])
    assert lines[-1] == "doctor: fail (0 ok, 0 warn, 1 fail)"
    document = json.loads(format_json([failed], exit_code=exit_codes.UNHEALTHY))
    assert document["not_run"] == list(verdicts.CHECK_NAMES[1:])


def test_json_carries_every_field_and_the_exit_code() -> None:
    document = json.loads(format_json([OK, WARN], exit_code=exit_code([OK, WARN], strict=True)))
    assert document == {
        "status": "warn",
        "exit_code": 3,
        "checks": [
            {"name": "connect", "status": "ok", "detail": OK.detail, "hint": None},
            {
                "name": "durability",
                "status": "warn",
                "detail": "fsync is off",
                "hint": "turn it on",
            },
        ],
        "not_run": [],
    }
    assert json.loads(format_json([OK, WARN], exit_code=exit_code([OK, WARN])))["exit_code"] == 0


def test_the_doctor_command_registers_on_a_subparsers_object() -> None:
    parser = argparse.ArgumentParser(prog="aura-pg")
    sub = parser.add_subparsers(dest="command", required=True)
    doctor_command.add_parser(sub)
    args = parser.parse_args(["doctor"])
    assert args.command == "doctor"
    assert args.handler is doctor_command.run
    assert args.dsn is None
    assert (args.json, args.strict) == (False, False)
    assert args.max_transaction_age == checks.DEFAULT_MAX_TRANSACTION_AGE
    assert args.connect_timeout == checks.DEFAULT_CONNECT_TIMEOUT

    args = parser.parse_args(
        ["doctor", "--dsn", "dbname=x", "--json", "--strict", "--max-transaction-age", "0.5"]
    )
    assert (args.dsn, args.json, args.strict, args.max_transaction_age) == (
        "dbname=x",
        True,
        True,
        0.5,
    )


@pytest.mark.parametrize("value", ["-1", "soon", "inf"])
def test_a_bad_max_transaction_age_is_a_usage_error(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["doctor", "--max-transaction-age", value])
    assert exited.value.code == 2
    assert "--max-transaction-age" in capsys.readouterr().err


def test_the_dsn_defaults_to_aura_pg_dsn_then_libpq(monkeypatch: pytest.MonkeyPatch) -> None:
    """doctor takes the connection options of every command (aura_pg.config)."""
    parser = argparse.ArgumentParser()
    doctor_command.add_parser(parser.add_subparsers())

    def dsn(*argv: str) -> str:
        return connection_settings(parser.parse_args(["doctor", *argv])).dsn

    monkeypatch.setenv("AURA_PG_DSN", "dbname=from_env")
    assert dsn() == "dbname=from_env"
    assert dsn("--dsn", "dbname=given") == "dbname=given"
    monkeypatch.delenv("AURA_PG_DSN")
    assert dsn() == ""  # libpq reads PG*
    assert parser.parse_args(["doctor", "--password-file", "pw"]).password_file == "pw"


@pytest.mark.parametrize(
    ("version_num", "status"), [(130012, "fail"), (140011, "warn"), (150020, "ok"), (170000, "ok")]
)
def test_server_version_rules(version_num: int, status: str) -> None:
    assert verdicts.server_version_check(version_num, "x").status == status


def test_timescaledb_rules() -> None:
    assert verdicts.timescaledb_check("2.19.3", "2.19.3", "timescaledb").status == "ok"
    assert verdicts.timescaledb_check(
        "2.19.3", "2.19.3", "pg_stat_statements,timescaledb"
    ).status == ("ok")
    assert verdicts.timescaledb_check("2.19.3", "2.19.3", None).status == "ok"  # not visible
    assert verdicts.timescaledb_check("2.19.3", "2.19.3", "pg_stat_statements").status == "fail"
    assert verdicts.timescaledb_check(None, "2.19.3", "timescaledb").status == "warn"
    missing = verdicts.timescaledb_check(None, None, "")
    assert missing.status == "warn"
    assert "not installed on the server" in missing.detail


def test_migrations_rules() -> None:
    def known(revision: str) -> bool:
        return revision in {"0001", "0002"}

    def check(schema: bool, table: bool, versions: list[str]) -> Check:
        return verdicts.migrations_check(schema, table, versions, "0002", known)

    assert check(True, True, ["0002"]).status == "ok"
    behind = check(True, True, ["0001"])
    assert (behind.status, behind.hint) == ("fail", "run aura-pg migrate")
    ahead = check(True, True, ["0099"])
    assert ahead.status == "fail"
    assert "upgrade aura-pg" in (ahead.hint or "")
    never = check(False, False, [])
    assert (never.status, never.hint) == ("fail", "run aura-pg migrate")
    assert "no aura schema" in never.detail
    assert check(True, True, []).status == "fail"
    assert check(True, False, []).status == "warn"  # sql/install.sql records no version


def _role(kind: str, **overrides: object) -> dict[str, object]:
    row: dict[str, object] = {
        "kind": kind,
        "role_name": f"aura_{kind}",
        "role_exists": True,
        "can_login": False,
        "is_superuser": False,
        "bypasses_rls": False,
        "current_user_member": False,
    }
    row.update(overrides)
    return row


def test_roles_rules() -> None:
    kinds = ["owner", "writer", "projector", "reader"]
    healthy = [_role(k) for k in kinds]
    ok = verdicts.roles_check(healthy, [], "postgres", True)
    assert ok.status == "ok"
    assert "connected as postgres (superuser), in no aura role" in ok.detail

    member = verdicts.roles_check(
        [_role(k, current_user_member=k == "writer") for k in kinds], [], "api", False
    )
    assert "connected as api, member of aura_writer" in member.detail

    login = verdicts.roles_check([*healthy[:3], _role("reader", can_login=True)], [], "u", False)
    assert login.status == "warn"
    assert "aura_reader can log in" in login.detail

    for bad in (_role("owner", is_superuser=True), _role("owner", role_exists=False)):
        assert verdicts.roles_check([bad, *healthy[1:]], [], "u", False).status == "fail"

    public_schema = [{"object_kind": "schema", "object_name": "aura", "privilege_type": "USAGE"}]
    schema = verdicts.roles_check(healthy, public_schema, "u", False)
    assert schema.status == "fail"
    assert "REVOKE ALL ON SCHEMA aura FROM PUBLIC" in (schema.hint or "")
    public_function = [
        {"object_kind": "function", "object_name": "aura.f", "privilege_type": "EXECUTE"}
    ]
    assert verdicts.roles_check(healthy, public_function, "u", False).status == "warn"


def test_idle_timeout_rules() -> None:
    off = verdicts.idle_timeout_check("0", "ms", "default", "aura")
    assert off.status == "warn"
    assert "ALTER DATABASE aura SET idle_in_transaction_session_timeout" in (off.hint or "")
    on = verdicts.idle_timeout_check("60000", "ms", "database", "aura")
    assert (on.status, on.detail) == (
        "ok",
        "idle_in_transaction_session_timeout = 60000 ms (from database)",
    )


def _transaction(age: float, pid: int = 7, kind: str = "session") -> dict[str, object]:
    return {
        "kind": kind,
        "pid": pid if kind == "session" else None,
        "gid": "tx-1" if kind == "prepared" else None,
        "user_name": "app",
        "application_name": "api",
        "database": "aura",
        "state": "idle in transaction",
        "age_seconds": age,
    }


def test_long_transaction_rules() -> None:
    assert verdicts.long_transactions_check([], 60).status == "ok"
    assert verdicts.long_transactions_check([_transaction(59)], 60).status == "ok"
    warn = verdicts.long_transactions_check([_transaction(61, pid=4242)], 60)
    assert warn.status == "warn"
    assert "pid 4242 ('api', user app, database aura, idle in transaction) open 61.0 s" in (
        warn.detail
    )
    assert verdicts.long_transactions_check([_transaction(601)], 60).status == "fail"
    prepared = verdicts.long_transactions_check([_transaction(90, kind="prepared")], 60)
    assert "prepared transaction 'tx-1'" in prepared.detail
    assert "ROLLBACK PREPARED" in (prepared.hint or "")
    many = verdicts.long_transactions_check([_transaction(100 - i, pid=i) for i in range(5)], 60)
    assert many.detail.count("pid ") == 3
    assert "and 2 more" in many.detail
    partial = verdicts.long_transactions_check([], 60, sees_all=False)
    assert "pg_read_all_stats" in partial.detail


@pytest.mark.parametrize(
    ("skew", "uncertainty", "status"),
    [
        (0.01, 0.001, "ok"),
        (-0.9, 0.001, "ok"),
        (1.5, 0.001, "warn"),
        (-1.5, 0.001, "warn"),
        (1.5, 0.6, "ok"),  # a slow round trip cannot tell
        (11.0, 0.001, "fail"),
    ],
)
def test_clock_skew_rules(skew: float, uncertainty: float, status: str) -> None:
    check = verdicts.clock_skew_check(skew, uncertainty)
    assert check.status == status
    assert ("ahead of" if skew >= 0 else "behind") in check.detail


def test_projection_rules() -> None:
    healthy = {"name": "p", "status": "running", "circuit": "closed", "dead_letters": 0}
    assert verdicts.projections_check([]).detail == "no projection registered"
    assert verdicts.projections_check([healthy]).status == "ok"
    # owner_alive is optional: absent, nothing is said about owners.
    assert verdicts.projections_check([{**healthy, "owner": "h:1"}]).status == "ok"
    gone = verdicts.projections_check([{**healthy, "owner": "h:1", "owner_alive": False}])
    assert (gone.status, gone.detail) == ("warn", "p: owner h:1 is gone (its session ended)")
    alive = {**healthy, "owner": "h:1", "owner_alive": True}
    assert verdicts.projections_check([alive]).status == "ok"
    assert verdicts.projections_check([{**healthy, "dead_letters": 2}]).status == "warn"
    assert verdicts.projections_check([{**healthy, "status": "paused"}]).status == "warn"
    assert verdicts.projections_check([{**healthy, "circuit": "half_open"}]).status == "warn"
    assert verdicts.projections_check([{**healthy, "status": "failed"}]).status == "fail"
    open_circuit = {**healthy, "circuit": "open", "consecutive_failures": 5, "last_error": "x"}
    failed = verdicts.projections_check([open_circuit, {**healthy, "name": "q", "dead_letters": 1}])
    assert failed.status == "fail"
    assert failed.detail == (
        "p: failing (circuit open, 5 consecutive failures, last error: x); "
        "q: 1 pending dead letter(s)"
    )
    half_open_failed = {**open_circuit, "status": "failed", "circuit": "half_open"}
    assert verdicts.projections_check([half_open_failed]).status == "fail"


def test_connection_and_durability_rules() -> None:
    assert verdicts.connections_check(100, 3, 0, 10).status == "ok"
    assert verdicts.connections_check(100, 3, 0, 80).status == "warn"
    assert verdicts.connections_check(100, 3, 0, 95).status == "fail"
    durable = {"fsync": "on", "full_page_writes": "on", "synchronous_commit": "on"}
    assert verdicts.durability_check(durable).status == "ok"
    assert verdicts.durability_check({**durable, "synchronous_commit": "local"}).status == "ok"
    lax = verdicts.durability_check({**durable, "synchronous_commit": "off"})
    assert lax.status == "warn"
    assert "synchronous_commit is off" in lax.detail


def test_stream_order_rules() -> None:
    assert verdicts.stream_order_check(0, []).status == "ok"
    found = verdicts.stream_order_check(5, ["a", "b", "c"])
    assert found.status == "warn"
    assert "5 stream(s)" in found.detail
    assert "'a', 'b', 'c' and 2 more" in found.detail
    assert found.hint is not None and "aura.stream_order_inversions" in found.hint
