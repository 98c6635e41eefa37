"""Wiring of a daemon's /metrics, /health and /ready: the database
collector, the liveness heartbeat, the readiness checks, the server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any, Final

import psycopg
from psycopg.conninfo import conninfo_to_dict

from aura_pg._resources import named_queries
from aura_pg.config import mask_text
from aura_pg.observability.metrics import CombinedRegistry, DatabaseCollector
from aura_pg.observability.server import Check, ObservabilityServer

_QUERIES: Final = named_queries("queries/metrics.sql")


class Heartbeat:
    """Liveness: the daemon's event loop beats once a second; /health fails
    when it has not beaten for ``max_silence`` seconds (a blocked or dead
    loop) or the daemon is not running."""

    def __init__(self, max_silence: float = 15.0, interval: float = 1.0) -> None:
        self.max_silence = max_silence
        self.interval = interval
        self.last_beat: float | None = None
        self.running = False

    async def run(self, stop: asyncio.Event) -> None:
        self.running = True
        try:
            while not stop.is_set():
                self.last_beat = time.monotonic()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.interval)
        finally:
            self.running = False

    def check(self) -> Check:
        if not self.running or self.last_beat is None:
            return Check(False, ("not running",))
        silence = time.monotonic() - self.last_beat
        if silence > self.max_silence:
            return Check(False, (f"event loop silent for {silence:.1f}s",))
        return Check(True, details={"last_beat_seconds_ago": round(silence, 3)})


def _metrics_connection(dsn: str, service: str) -> psycopg.Connection[Any]:
    given = conninfo_to_dict(dsn)
    extra: dict[str, Any] = {}
    if "application_name" not in given:
        extra["application_name"] = f"aura-pg {service} metrics"
    if "connect_timeout" not in given:
        extra["connect_timeout"] = 3
    conn = psycopg.connect(dsn, autocommit=True, **extra)
    conn.execute(_QUERIES["session_settings"])
    return conn


class DaemonEndpoints:
    """/metrics, /health and /ready for one daemon, on ``host:port``."""

    def __init__(
        self,
        dsn: str,
        *,
        service: str,
        host: str,
        port: int,
        heartbeat: Heartbeat,
        projections: Sequence[str] = (),
    ) -> None:
        from aura_pg.migrate import head_revision

        self.head_revision = head_revision()
        self.projections = list(projections)
        self.heartbeat = heartbeat
        self.collector = DatabaseCollector(lambda: _metrics_connection(dsn, service))
        self.server = ObservabilityServer(
            host, port, CombinedRegistry(self.collector), heartbeat.check, self.readiness
        )

    @property
    def port(self) -> int:
        return self.server.port

    def readiness(self) -> Check:
        """Ready: the database answers, its schema is current, and none of
        this daemon's projections has failed (an open circuit)."""
        try:
            # A daemon without projections may run as a role that cannot
            # read the checkpoints (the importer as the writer).
            query = _QUERIES["ready"] if self.projections else _QUERIES["revision"]
            row = self.collector.query_one(query, {"projections": self.projections})
        except psycopg.errors.UndefinedTable:
            return Check(False, ("the aura schema is not installed: run `aura-pg migrate`",))
        except psycopg.Error as exc:
            return Check(False, (f"database unreachable: {mask_text(str(exc).strip())}",))
        revision, failed = row if row is not None else (None, [])
        reasons: list[str] = []
        if revision != self.head_revision:
            reasons.append(
                f"schema at revision {revision or 'none'}, this code needs "
                f"{self.head_revision}: run `aura-pg migrate`"
            )
        if failed:
            reasons.append(f"projections failed (circuit open): {', '.join(failed)}")
        if not self.heartbeat.check().ok:
            reasons.append("the daemon is not running")
        return Check(not reasons, tuple(reasons), {"schema_revision": revision})

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()
        self.collector.close()

    @contextlib.contextmanager
    def serving(self) -> Iterator[DaemonEndpoints]:
        self.start()
        try:
            yield self
        finally:
            self.stop()
