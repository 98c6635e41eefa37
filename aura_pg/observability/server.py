"""The daemons' HTTP endpoints: /metrics, /health (liveness), /ready.

A stdlib threading HTTP server on its own thread, so a scrape never waits
for the daemon's event loop and a busy loop never delays a scrape.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

log = logging.getLogger("aura_pg.metrics")


@dataclass(frozen=True, slots=True)
class Check:
    """The outcome of a liveness or readiness check."""

    ok: bool
    reasons: tuple[str, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(self.server.metrics))
            elif path in ("/health", "/healthz"):
                self._send_check(self.server.liveness())
            elif path in ("/ready", "/readyz"):
                self._send_check(self.server.readiness())
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found: try /metrics\n")
        except Exception as exc:  # a failing check is a 500, never a dead server
            log.exception("metrics server: %s failed", path)
            body = json.dumps({"status": "error", "reasons": [repr(exc)]}).encode()
            self._send(500, "application/json", body)

    def _send_check(self, check: Check) -> None:
        body = {
            "status": "ok" if check.ok else "unavailable",
            "reasons": list(check.reasons),
            **check.details,
        }
        self._send(200 if check.ok else 503, "application/json", json.dumps(body).encode())

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics server: " + format, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        metrics: Collector,
        liveness: Callable[[], Check],
        readiness: Callable[[], Check],
    ) -> None:
        super().__init__(address, _Handler)
        self.metrics = metrics
        self.liveness = liveness
        self.readiness = readiness


class ObservabilityServer:
    """Serves the endpoints on ``host:port`` (port 0: any free port; see
    ``port`` after ``start``) until ``stop``."""

    def __init__(
        self,
        host: str,
        port: int,
        metrics: Collector,
        liveness: Callable[[], Check],
        readiness: Callable[[], Check],
    ) -> None:
        self._server = _Server((host, port), metrics, liveness, readiness)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="aura-pg metrics server", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()
        log.info("metrics server: /metrics, /health and /ready on port %d", self.port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
