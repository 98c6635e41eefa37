"""What the daemon commands (``aura-pg project``, ``aura-pg relay``) share:
their logging, tracing and metrics-server options and set-up."""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Final

from aura_pg.errors import AuraPgError
from aura_pg.observability.endpoint import DaemonEndpoints, Heartbeat
from aura_pg.observability.logging import configure_logging
from aura_pg.observability.tracing import configure_tracing

LOG_FORMATS: Final = ("auto", "json", "console")


def configure_command_logging(level: int | str, log_format: str = "auto") -> None:
    """structlog: JSON lines unless stderr is a terminal (``auto``)."""
    configure_logging(level, json_lines=None if log_format == "auto" else log_format == "json")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, not {port}")
    return port


def add_observability_options(p: argparse.ArgumentParser) -> None:
    """--metrics-port, --metrics-host and --log-format."""
    p.add_argument(
        "--metrics-port",
        type=_port,
        default=os.environ.get("AURA_PG_METRICS_PORT") or None,
        metavar="PORT",
        help="serve /metrics, /health and /ready on PORT (0: any free port; "
        "default: $AURA_PG_METRICS_PORT, else no server)",
    )
    p.add_argument(
        "--metrics-host",
        default=os.environ.get("AURA_PG_METRICS_HOST", "0.0.0.0"),
        help="address to serve them on (default: $AURA_PG_METRICS_HOST, else %(default)s)",
    )
    p.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=os.environ.get("AURA_PG_LOG_FORMAT", "auto"),
        help="json lines, console, or auto: json unless stderr is a terminal",
    )


@contextlib.contextmanager
def observed_daemon(
    dsn: str, args: argparse.Namespace, service: str, projections: Sequence[str] = ()
) -> Iterator[Heartbeat]:
    """Tracing from the ``OTEL_*`` environment, and /metrics, /health and
    /ready when a metrics port is given. Yields the heartbeat the daemon's
    event loop must run (``await heartbeat.run(stop)``)."""
    provider = configure_tracing(f"aura-pg-{service}")
    heartbeat = Heartbeat()
    try:
        if args.metrics_port is None:
            yield heartbeat
            return
        try:
            endpoints = DaemonEndpoints(
                dsn,
                service=service,
                host=args.metrics_host,
                port=args.metrics_port,
                heartbeat=heartbeat,
                projections=projections,
            )
        except OSError as exc:
            raise AuraPgError(
                f"cannot serve metrics on {args.metrics_host}:{args.metrics_port}: "
                f"{exc.strerror or exc} (choose another --metrics-port)"
            ) from exc
        with endpoints.serving():
            yield heartbeat
    finally:
        if provider is not None:
            provider.shutdown()
