"""What the daemon commands (``aura-pg project``, ``relay``, ``import``)
share: their logging, tracing and metrics-server set-up (their options are
in aura_pg/cli/_daemon.py)."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def observed_daemon(
    dsn: str,
    service: str,
    projections: Sequence[str] = (),
    *,
    metrics_host: str = "0.0.0.0",
    metrics_port: int | None = None,
) -> Iterator[Heartbeat]:
    """Tracing from the ``OTEL_*`` environment, and /metrics, /health and
    /ready when a metrics port is given. Yields the heartbeat the daemon's
    event loop must run (``await heartbeat.run(stop)``)."""
    provider = configure_tracing(f"aura-pg-{service}")
    heartbeat = Heartbeat()
    try:
        if metrics_port is None:
            yield heartbeat
            return
        try:
            endpoints = DaemonEndpoints(
                dsn,
                service=service,
                host=metrics_host,
                port=metrics_port,
                heartbeat=heartbeat,
                projections=projections,
            )
        except OSError as exc:
            raise AuraPgError(
                f"cannot serve metrics on {metrics_host}:{metrics_port}: "
                f"{exc.strerror or exc} (choose another --metrics-port)"
            ) from exc
        with endpoints.serving():
            yield heartbeat
    finally:
        if provider is not None:
            provider.shutdown()
