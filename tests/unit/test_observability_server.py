"""The daemons' HTTP endpoints over real HTTP (aura_pg.observability.server):
/metrics through prometheus_client's WSGI app (gzip, OpenMetrics, HEAD),
/health and /ready as before."""

from __future__ import annotations

import gzip
import http.client
import json
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from aura_pg.observability.server import Check, ObservabilityServer


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class Served:
    server: ObservabilityServer
    live: list[Check]
    ready: list[Check]

    def request(self, method: str, path: str, **headers: str) -> Answer:
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=10)
        try:
            conn.request(method, path, headers={k.replace("_", "-"): v for k, v in headers.items()})
            response = conn.getresponse()
            body = response.read()
            return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, body)
        finally:
            conn.close()


@pytest.fixture
def served() -> Iterator[Served]:
    registry = CollectorRegistry()
    counter = Counter("aura_test_deliveries", "Deliveries", ["sink"], registry=registry)
    counter.labels(sink="webhook").inc(3)
    live = [Check(True, details={"last_beat_seconds_ago": 0.1})]
    ready = [Check(True, details={"schema_revision": "0013"})]
    server = ObservabilityServer("127.0.0.1", 0, registry, lambda: live[0], lambda: ready[0])
    server.start()
    try:
        yield Served(server, live, ready)
    finally:
        server.stop()


def samples(text: str) -> dict[str, float]:
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_in_the_prometheus_text_format_by_default(served: Served) -> None:
    answer = served.request("GET", "/metrics")
    assert answer.status == 200
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "content-encoding" not in answer.headers
    assert int(answer.headers["content-length"]) == len(answer.body)
    assert samples(answer.body.decode())["aura_test_deliveries_total"] == 3


def test_metrics_gzipped_when_the_scraper_accepts_gzip(served: Served) -> None:
    answer = served.request("GET", "/metrics", Accept_Encoding="gzip")
    assert answer.status == 200
    assert answer.headers["content-encoding"] == "gzip"
    assert int(answer.headers["content-length"]) == len(answer.body)
    text = gzip.decompress(answer.body).decode()
    assert samples(text)["aura_test_deliveries_total"] == 3


def test_openmetrics_when_the_scraper_asks_for_it(served: Served) -> None:
    answer = served.request(
        "GET", "/metrics", Accept="application/openmetrics-text; version=1.0.0; charset=utf-8"
    )
    assert answer.status == 200
    assert answer.headers["content-type"].startswith("application/openmetrics-text; version=1")
    text = answer.body.decode()
    assert text.endswith("# EOF\n")
    assert "aura_test_deliveries_total" in text


def test_head_gives_the_headers_of_a_get_without_a_body(served: Served) -> None:
    get = served.request("GET", "/metrics", Accept_Encoding="gzip")
    head = served.request("HEAD", "/metrics", Accept_Encoding="gzip")
    assert head.status == 200
    assert head.body == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    assert head.headers["content-encoding"] == "gzip"
    assert int(head.headers["content-length"]) > 0
    health = served.request("HEAD", "/health")
    assert (health.status, health.body) == (200, b"")


def test_health_and_ready_answer_as_before(served: Served) -> None:
    health = served.request("GET", "/health")
    assert (health.status, health.headers["content-type"]) == (200, "application/json")
    assert json.loads(health.body) == {
        "status": "ok", "reasons": [], "last_beat_seconds_ago": 0.1,
    }  # fmt: skip
    assert json.loads(served.request("GET", "/healthz").body)["status"] == "ok"
    ready = served.request("GET", "/ready")
    assert ready.status == 200
    assert json.loads(ready.body) == {"status": "ok", "reasons": [], "schema_revision": "0013"}

    served.ready[0] = Check(False, ("database unreachable: x",), {"schema_revision": None})
    served.live[0] = Check(False, ("not running",))
    not_ready = served.request("GET", "/readyz")
    assert not_ready.status == 503
    assert json.loads(not_ready.body) == {
        "status": "unavailable", "reasons": ["database unreachable: x"], "schema_revision": None,
    }  # fmt: skip
    dead = served.request("GET", "/health?verbose=1")
    assert dead.status == 503
    assert json.loads(dead.body) == {"status": "unavailable", "reasons": ["not running"]}


def test_a_failing_check_is_a_500_and_the_server_stays_up(served: Served) -> None:
    def broken() -> Check:
        raise RuntimeError("boom")

    served.server.app.readiness = broken
    answer = served.request("GET", "/ready")
    assert answer.status == 500
    assert json.loads(answer.body) == {"status": "error", "reasons": ["RuntimeError('boom')"]}
    assert served.request("GET", "/health").status == 200


def test_unknown_paths_and_methods(served: Served) -> None:
    missing = served.request("GET", "/nope")
    assert (missing.status, missing.body) == (404, b"not found: try /metrics\n")
    post = served.request("POST", "/metrics")
    assert post.status == 405
    assert post.headers["allow"] == "GET, HEAD"
