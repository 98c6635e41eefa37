"""The plugin's options: a flag wins over its environment variable, which
wins over the ini option; the server settings' lines parse or are refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from aura_pg.testing.databases import DEFAULT_SERVER_SETTINGS, parse_settings
from aura_pg.testing.plugin import server_options


class FakeConfig:
    def __init__(self, flags: dict[str, Any], ini: dict[str, Any]) -> None:
        self.flags = flags
        self.ini = {
            "aura_pg_timescaledb": True,
            "aura_pg_server_settings": [f"{k} = {v}" for k, v in DEFAULT_SERVER_SETTINGS.items()],
            **ini,
        }

    def getoption(self, name: str) -> Any:
        return self.flags.get(name)

    def getini(self, name: str) -> Any:
        return self.ini.get(name)


def options(monkeypatch: pytest.MonkeyPatch, flags: dict[str, Any], ini: dict[str, Any]) -> Any:
    for variable in ("AURA_PG_TEST_HOST", "AURA_PG_TEST_PORT", "AURA_PG_TEST_USER"):
        monkeypatch.delenv(variable, raising=False)
    return server_options(FakeConfig(flags, ini))  # type: ignore[arg-type]


def test_defaults_start_a_private_cluster_with_timescaledb(monkeypatch: pytest.MonkeyPatch) -> None:
    chosen = options(monkeypatch, {}, {})
    assert chosen.host is None
    assert chosen.port is None
    assert chosen.user == "postgres"
    assert chosen.timescaledb is True
    assert dict(chosen.settings) == DEFAULT_SERVER_SETTINGS
    assert chosen.dbname == "aura_test"


def test_a_flag_wins_over_the_variable_which_wins_over_the_ini(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ini = {"aura_pg_host": "ini-host", "aura_pg_port": "1111", "aura_pg_user": "ini-user"}
    assert options(monkeypatch, {}, ini).host == "ini-host"
    monkeypatch.setenv("AURA_PG_TEST_HOST", "env-host")
    chosen = server_options(FakeConfig({}, ini))  # type: ignore[arg-type]
    assert (chosen.host, chosen.port, chosen.user) == ("env-host", 1111, "ini-user")
    chosen = server_options(
        FakeConfig({"aura_pg_host": "flag-host", "aura_pg_bindir": "/opt/pg/bin"}, ini)  # type: ignore[arg-type]
    )
    assert chosen.host == "flag-host"
    assert chosen.bindir == Path("/opt/pg/bin")


def test_timescaledb_is_off_by_flag_or_ini(monkeypatch: pytest.MonkeyPatch) -> None:
    assert options(monkeypatch, {"aura_pg_no_timescaledb": True}, {}).timescaledb is False
    assert options(monkeypatch, {}, {"aura_pg_timescaledb": False}).timescaledb is False


def test_server_settings_lines() -> None:
    assert parse_settings(["# speed", "", "fsync = off", "work_mem='64MB'"]) == {
        "fsync": "off",
        "work_mem": "'64MB'",
    }
    with pytest.raises(ValueError, match="is not 'name = value'"):
        parse_settings(["fsync off"])
