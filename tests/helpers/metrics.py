"""Reading a daemon's /metrics, /health and /ready over real HTTP."""

from __future__ import annotations

import urllib.error
import urllib.request

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def fetch(url: str, timeout: float = 10) -> tuple[int, bytes]:
    """(status, body) of a GET; error statuses included, connection errors raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def http_get(port: int, path: str) -> tuple[int, str]:
    """(status, body) of a GET on 127.0.0.1:port."""
    status, body = fetch(f"http://127.0.0.1:{port}{path}")
    return status, body.decode()


def answering(port: int) -> bool:
    try:
        return http_get(port, "/health")[0] == 200
    except OSError:
        return False


def scrape(port: int) -> Samples:
    status, text = http_get(port, "/metrics")
    assert status == 200, text
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def retries_counted(reason: str | None = None) -> float:
    """aura_append_retries_total of this process, for ``reason`` or all."""
    return sum(
        sample.value
        for family in REGISTRY.collect()
        if family.name == "aura_append_retries"
        for sample in family.samples
        if sample.name == "aura_append_retries_total"
        and (reason is None or sample.labels["reason"] == reason)
    )
