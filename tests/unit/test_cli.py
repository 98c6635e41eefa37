"""The ``aura-pg`` command without a database: its shape (argparse only
under aura_pg/cli, one surface for dead letters, the same logging flags on
every daemon), its exit codes, and the daemons' flags with their
``AURA_PG_*`` variables (flag over variable over default, checked alike)."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path
from typing import Any, get_args

import pytest

import aura_pg
from aura_pg.cli import build_parser, exit_codes, main
from aura_pg.cli.project import project_settings
from aura_pg.cli.settings import (
    ImportSettings,
    LogFormat,
    LoggingSettings,
    ProjectSettings,
    RelaySettings,
    flags_given,
)
from aura_pg.config import CommandSettings, Settings
from aura_pg.observability.command import LOG_FORMATS

PACKAGE = Path(aura_pg.__file__).parent
ROOT = PACKAGE.parent
DAEMONS = {
    ("project",): ProjectSettings,
    ("relay",): RelaySettings,
    ("import", "nats"): ImportSettings,
}


def _imports_argparse(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import) and any(
            a.name.split(".")[0] == "argparse" for a in node.names
        ):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "argparse":
            return True
    return False


def test_only_the_cli_package_imports_argparse() -> None:
    cli = PACKAGE / "cli"
    modules = sorted(PACKAGE.rglob("*.py"))
    outside = [
        p.relative_to(ROOT) for p in modules if cli not in p.parents and _imports_argparse(p)
    ]
    assert outside == []
    assert _imports_argparse(cli / "__init__.py")  # the walk does see an import


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _command(*path: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        parser = _subparsers(parser)[name]
    return parser


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {
        option: action
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--") and option not in ("--help",)
    }


def test_dead_letters_have_one_surface() -> None:
    assert set(_subparsers(_command("dlq"))) == {"list", "retry", "skip"}
    projections = set(_subparsers(_command("projections")))
    assert not {a for a in projections if "dead" in a}, projections


@pytest.mark.parametrize("path", list(DAEMONS))
def test_every_daemon_flag_has_a_setting_and_so_a_variable(path: tuple[str, ...]) -> None:
    fields = {**Settings.model_fields, **LoggingSettings.model_fields, **DAEMONS[path].model_fields}
    for option, action in _options(_command(*path)).items():
        if option.startswith("--no-") and option != "--no-listen":
            continue  # the negative of a --flag/--no-flag pair
        assert action.dest in fields, option


def test_every_daemon_takes_the_same_logging_flags() -> None:
    logging_flags = {"--log-level", "--verbose", "--log-format", "--metrics-port", "--metrics-host"}
    for path in DAEMONS:
        assert logging_flags <= set(_options(_command(*path))), path
        assert "-v" in _command(*path)._option_string_actions


def test_the_log_format_setting_offers_what_logging_configures() -> None:
    assert get_args(LogFormat) == LOG_FORMATS


def test_exit_codes_are_distinct_and_documented() -> None:
    codes = {name: value for name, value in vars(exit_codes).items() if name.isupper()}
    assert codes == {
        "OK": 0, "ERROR": 1, "USAGE": 2, "UNHEALTHY": 3, "DIFFERENT": 4, "INTERRUPTED": 130
    }  # fmt: skip
    guide = (ROOT / "docs" / "operators.md").read_text(encoding="utf-8")
    for value in codes.values():
        assert f"\n| {value} |" in guide, value


def _clean(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    import os

    for name in list(os.environ):
        if name.startswith("AURA_PG_"):
            monkeypatch.delenv(name)
    return monkeypatch


SAMPLES: dict[type[CommandSettings], dict[str, tuple[str, Any]]] = {
    # field: (what the variable says, what the setting becomes)
    ProjectSettings: {
        "catalog": ("/etc/aura/catalog.yaml", Path("/etc/aura/catalog.yaml")),
        "poll_interval": ("2.5", 2.5),
        "shutdown_timeout": ("7", 7.0),
        "owner": ("blue", "blue"),
        "async_commit": ("true", True),
        "wake": ("listen", "listen"),
    },
    RelaySettings: {
        "nats_server": ("nats://n:4222", "nats://n:4222"),
        "webhook": ('["h=http://127.0.0.1/x"]', [("h", "http://127.0.0.1/x")]),
        "batch_size": ("7", 7),
        "poll_interval": ("0.25", 0.25),
        "max_attempts": ("3", 3),
        "backoff_base": ("0.5", 0.5),
        "backoff_max": ("9", 9.0),
        "publish_timeout": ("4", 4.0),
        "shutdown_timeout": ("6", 6.0),
        "once": ("1", True),
    },
    ImportSettings: {
        "server": ("nats://n:4222", "nats://n:4222"),
        "stream": ("ORDERS", "ORDERS"),
        "subject": ("orders.>", "orders.>"),
        "consumer": ("c1", "c1"),
        "mapping": ("m:f", "m:f"),
        "mapping_file": ("m.yaml", "m.yaml"),
        "stream_prefix": ("p-", "p-"),
        "until_end": ("yes", True),
        "ack_wait": ("12", 12.0),
        "fetch_timeout": ("0.5", 0.5),
        "lag_interval": ("3", 3.0),
        "window": ("64", 64),
    },
    LoggingSettings: {
        "log_level": ("DEBUG", "debug"),
        "log_format": ("json", "json"),
        "metrics_port": ("9187", 9187),
        "metrics_host": ("127.0.0.1", "127.0.0.1"),
    },
}


@pytest.mark.parametrize("settings", list(SAMPLES), ids=lambda s: s.__name__)
def test_every_setting_has_a_variable_below_its_flag(
    settings: type[CommandSettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    samples = SAMPLES[settings]
    assert set(samples) == set(settings.model_fields)
    prefix = str(settings.model_config.get("env_prefix"))
    defaults = settings.resolve()
    monkeypatch = _clean(monkeypatch)
    for field, (text, _) in samples.items():
        monkeypatch.setenv(f"{prefix}{field}".upper(), text)
    from_env = settings.resolve()
    for field, (_, value) in samples.items():
        assert getattr(from_env, field) == value, field
        assert getattr(defaults, field) != value, field
    # A flag given wins over its variable; None (a flag not given) leaves it.
    for field, (_, value) in samples.items():
        default = getattr(defaults, field)
        assert getattr(settings.resolve(**{field: None}), field) == value, field
        if default is not None:
            assert getattr(settings.resolve(**{field: default}), field) == default, field


def test_project_flags_over_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch = _clean(monkeypatch)
    monkeypatch.setenv("AURA_PG_PROJECT_POLL_INTERVAL", "5")
    monkeypatch.setenv("AURA_PG_PROJECT_WAKE", "poll")
    parse = build_parser().parse_args
    assert project_settings(parse(["project"])).poll_interval == 5.0
    given = project_settings(parse(["project", "--poll-interval", "0.2", "--wake", "watch"]))
    assert (given.poll_interval, given.wake) == (0.2, "watch")
    assert project_settings(parse(["project", "--no-listen"])).wake == "poll"
    monkeypatch.setenv("AURA_PG_PROJECT_ASYNC_COMMIT", "true")
    assert project_settings(parse(["project"])).async_commit is True
    assert project_settings(parse(["project", "--no-async-commit"])).async_commit is False
    logs = LoggingSettings.resolve(**flags_given(parse(["relay", "-v"]), LoggingSettings))
    assert logs.log_level == "debug"


NUMERIC_FLAGS = [
    (("project",), "--poll-interval", "AURA_PG_PROJECT_POLL_INTERVAL"),
    (("project",), "--shutdown-timeout", "AURA_PG_PROJECT_SHUTDOWN_TIMEOUT"),
    (("project",), "--metrics-port", "AURA_PG_METRICS_PORT"),
    (("relay",), "--poll-interval", "AURA_PG_RELAY_POLL_INTERVAL"),
    (("relay",), "--batch-size", "AURA_PG_RELAY_BATCH_SIZE"),
    (("relay",), "--max-attempts", "AURA_PG_RELAY_MAX_ATTEMPTS"),
    (("relay",), "--backoff-base", "AURA_PG_RELAY_BACKOFF_BASE"),
    (("relay",), "--backoff-max", "AURA_PG_RELAY_BACKOFF_MAX"),
    (("relay",), "--publish-timeout", "AURA_PG_RELAY_PUBLISH_TIMEOUT"),
    (("relay",), "--shutdown-timeout", "AURA_PG_RELAY_SHUTDOWN_TIMEOUT"),
    (("import", "nats"), "--ack-wait", "AURA_PG_IMPORT_ACK_WAIT"),
    (("import", "nats"), "--fetch-timeout", "AURA_PG_IMPORT_FETCH_TIMEOUT"),
    (("import", "nats"), "--lag-interval", "AURA_PG_IMPORT_LAG_INTERVAL"),
]
REQUIRED = {
    ("project",): [],
    ("relay",): ["--webhook", "h=http://127.0.0.1:1/"],
    ("import", "nats"): ["--server", "nats://127.0.0.1:1", "--stream", "S"],
}
BAD_VALUES = ["0", "-1", "soon", "inf", "nan", ""]


@pytest.mark.parametrize(("path", "flag", "variable"), NUMERIC_FLAGS)
@pytest.mark.parametrize("value", BAD_VALUES)
def test_a_bad_number_is_a_usage_error_from_a_flag_and_from_the_environment(
    path: tuple[str, ...],
    flag: str,
    variable: str,
    value: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if value == "0" and flag == "--metrics-port":
        value = "65536"  # 0 is a port: any free one
    monkeypatch = _clean(monkeypatch)
    argv = [*path, *REQUIRED[path], "--dsn", "host=/nonexistent"]
    with pytest.raises(SystemExit) as exited:
        main([*argv, flag, value])
    assert exited.value.code == exit_codes.USAGE
    err = capsys.readouterr().err
    assert f"error: argument {flag}: " in err and "Traceback" not in err

    if value == "":
        return  # an empty variable counts as not set
    monkeypatch.setenv(variable, value)
    assert main(argv) == exit_codes.USAGE
    err = capsys.readouterr().err
    assert f"invalid configuration: {variable}: " in err and "Traceback" not in err
