"""What the daemon commands (``project``, ``relay``, ``import nats``) share:
the same logging and metrics flags, logging set-up, and running until
SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

from aura_pg.cli._argtypes import argtype
from aura_pg.cli.settings import LOG_LEVELS, LoggingSettings, flags_given
from aura_pg.config import port_number
from aura_pg.observability.command import (
    LOG_FORMATS,
    configure_command_logging,
    observed_daemon,
)
from aura_pg.observability.endpoint import Heartbeat

T = TypeVar("T")


def add_logging_options(p: argparse.ArgumentParser) -> None:
    """``-v``/``--log-level``, ``--log-format``, ``--metrics-port``, ``--metrics-host``."""
    p.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        type=str.lower,
        help="the least severe messages logged (default: $AURA_PG_LOG_LEVEL, else info)",
    )
    p.add_argument(
        "-v",
        "--verbose",
        dest="log_level",
        action="store_const",
        const="debug",
        help="the same as --log-level debug",
    )
    p.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help="json lines, console, or auto: json unless stderr is a terminal "
        "(default: $AURA_PG_LOG_FORMAT, else auto)",
    )
    p.add_argument(
        "--metrics-port",
        type=argtype(port_number),
        metavar="PORT",
        help="serve /metrics, /health and /ready on PORT (0: any free port; "
        "default: $AURA_PG_METRICS_PORT, else no server)",
    )
    p.add_argument(
        "--metrics-host",
        help="address to serve them on (default: $AURA_PG_METRICS_HOST, else 0.0.0.0)",
    )


def logging_settings(args: argparse.Namespace) -> LoggingSettings:
    return LoggingSettings.resolve(**flags_given(args, LoggingSettings))


def configure_logging(settings: LoggingSettings) -> None:
    configure_command_logging(settings.log_level.upper(), settings.log_format)


def configure_quiet_logging() -> None:
    """Logging of the commands that run a projector for a while (rebuild,
    shadow) without daemon flags: info, JSON unless on a terminal."""
    configure_command_logging(logging.INFO)


@contextmanager
def observed(
    dsn: str, settings: LoggingSettings, service: str, projections: Sequence[str] = ()
) -> Iterator[Heartbeat]:
    """Tracing, and the metrics server when a port is set, around a daemon."""
    with observed_daemon(
        dsn,
        service,
        projections,
        metrics_host=settings.metrics_host,
        metrics_port=settings.metrics_port,
    ) as heartbeat:
        yield heartbeat
