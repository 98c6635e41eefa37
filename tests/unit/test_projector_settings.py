"""ProjectorSettings refuses settings a daemon could not run with."""

from __future__ import annotations

from typing import Any

import pytest

from aura_pg.cli import build_parser
from aura_pg.cli.project import project_settings, projector_settings
from aura_pg.projection.settings import WAKE_SOURCES, ProjectorSettings


def test_the_defaults_watch_the_log_every_10_ms_and_poll_every_second() -> None:
    settings = ProjectorSettings()
    assert settings.wake == "watch"
    assert (settings.watch_interval, settings.watch_idle_interval) == (0.01, 0.05)
    assert settings.poll_interval == 1.0
    assert WAKE_SOURCES == ("watch", "listen", "poll")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"wake": "notify"}, "wake must be one of watch, listen, poll"),
        ({"poll_interval": 0}, "poll_interval must be > 0"),
        ({"watch_interval": 0}, "need 0 < watch_interval <= watch_idle_interval"),
        ({"watch_interval": 0.2, "watch_idle_interval": 0.1}, "need 0 < watch_interval"),
        ({"watch_hold": -1}, "watch_hold must be >= 0"),
        ({"shutdown_timeout": 0}, "shutdown_timeout must be > 0"),
    ],
)
def test_bad_settings_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ProjectorSettings(**changes)


@pytest.mark.parametrize(
    ("argv", "wake"),
    [
        ([], "watch"),
        (["--wake", "listen"], "listen"),
        (["--wake", "poll"], "poll"),
        (["--no-listen"], "poll"),
    ],
)
def test_aura_pg_project_chooses_its_wake_up(argv: list[str], wake: str) -> None:
    settings = project_settings(build_parser().parse_args(["project", *argv]))
    assert settings.wake == wake
    assert projector_settings(settings).wake == wake
