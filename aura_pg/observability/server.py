"""The daemons' HTTP endpoints: /metrics, /health (liveness), /ready.

A small WSGI dispatcher served by a threading WSGI server on its own thread,
so a scrape never waits for the daemon's event loop and a busy loop never
delays a scrape. /metrics is prometheus_client's own WSGI app (gzip when the
scraper accepts it, the OpenMetrics format when it asks for it, ``name[]``
filters); the dispatcher adds HEAD (the headers of a GET, no body) and
keeps /health and /ready.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any, Final
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.registry import Collector

log = logging.getLogger("aura_pg.metrics")

# What a WSGI application is given and returns (PEP 3333).
Environ = dict[str, Any]
StartResponse = Callable[..., Any]
Headers = list[tuple[str, str]]

_JSON: Final = "application/json"
_TEXT: Final = "text/plain; charset=utf-8"
_STATUS: Final = {
    200: "200 OK",
    404: "404 Not Found",
    405: "405 Method Not Allowed",
    500: "500 Internal Server Error",
    503: "503 Service Unavailable",
}


@dataclass(frozen=True, slots=True)
class Check:
    """The outcome of a liveness or readiness check."""

    ok: bool
    reasons: tuple[str, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)


class Endpoints:
    """The WSGI application: /metrics (prometheus_client's app), /health and
    /healthz, /ready and /readyz; GET and HEAD."""

    def __init__(
        self,
        metrics: Collector,
        liveness: Callable[[], Check],
        readiness: Callable[[], Check],
    ) -> None:
        self.metrics_app = make_wsgi_app(metrics)
        self.liveness = liveness
        self.readiness = readiness

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method in ("GET", "HEAD"):
            status, headers, body = self._get(environ)
        else:
            status, headers, body = (
                _STATUS[405],
                [("Content-Type", _TEXT), ("Allow", "GET, HEAD")],
                f"method {method} not allowed: use GET or HEAD\n".encode(),
            )
        if not any(name.lower() == "content-length" for name, _ in headers):
            headers = [*headers, ("Content-Length", str(len(body)))]
        start_response(status, headers)
        # HEAD: the headers a GET would have, Content-Length included.
        return [] if method == "HEAD" else [body]

    def _get(self, environ: Environ) -> tuple[str, Headers, bytes]:
        path = environ.get("PATH_INFO", "")
        try:
            if path == "/metrics":
                return self._metrics(environ)
            if path in ("/health", "/healthz"):
                return self._check(self.liveness())
            if path in ("/ready", "/readyz"):
                return self._check(self.readiness())
            return _STATUS[404], [("Content-Type", _TEXT)], b"not found: try /metrics\n"
        except Exception as exc:  # a failing check is a 500, never a dead server
            log.exception("metrics server: %s failed", path)
            body = json.dumps({"status": "error", "reasons": [repr(exc)]}).encode()
            return _STATUS[500], [("Content-Type", _JSON)], body

    def _metrics(self, environ: Environ) -> tuple[str, Headers, bytes]:
        answer: list[tuple[str, Headers]] = []

        def start_response(status: str, headers: Headers, exc_info: Any = None) -> None:
            answer.append((status, list(headers)))

        # prometheus_client's app answers GET only: it is asked for the GET
        # that a HEAD stands for.
        chunks = self.metrics_app({**environ, "REQUEST_METHOD": "GET"}, start_response)
        body = b"".join(chunks)
        (status, headers), *_ = answer
        return status, headers, body

    def _check(self, check: Check) -> tuple[str, Headers, bytes]:
        body = {
            "status": "ok" if check.ok else "unavailable",
            "reasons": list(check.reasons),
            **check.details,
        }
        status = _STATUS[200 if check.ok else 503]
        return status, [("Content-Type", _JSON)], json.dumps(body).encode()


class _Handler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics server: " + format, *args)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


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
        self.app = Endpoints(metrics, liveness, readiness)
        self._server = make_server(
            host, port, self.app, server_class=_Server, handler_class=_Handler
        )
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
