"""A real Prometheus scrapes a real `aura-pg project` daemon: the exported
series are what the dashboards and alert rules query, with the values the
database and the daemon's work imply."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aura_pg import EventStore, NewEvent
from aura_pg.devtools.localdb import free_port
from tests.helpers.metrics import fetch
from tests.helpers.projections import FIXTURE_CATALOG, caught_up, query, wait_for_sync

ROOT = Path(__file__).resolve().parents[2]
AURA_PG = str(Path(sys.executable).with_name("aura-pg"))
PROMETHEUS = Path("/usr/bin/prometheus")
JOB = "aura-projector"
PORT_LOGGED = re.compile(r"^metrics server: /metrics, /health and /ready on port (\d+)$")


class Processes:
    """Processes started by the test, each logging to a file in tmp_path."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: dict[str, subprocess.Popen[str]] = {}

    def start(self, name: str, args: list[str]) -> subprocess.Popen[str]:
        with self.log_path(name).open("w") as log:
            process = subprocess.Popen(
                args, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log, text=True
            )
        self.started[name] = process
        return process

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def log(self, name: str) -> str:
        path = self.log_path(name)
        return path.read_text(errors="replace") if path.exists() else ""

    def assert_running(self, name: str) -> None:
        code = self.started[name].poll()
        assert code is None, f"{name} exited with {code}:\n{self.log(name)}"

    def print_logs(self) -> None:
        for name, process in self.started.items():
            print(f"----- {name} (exit code {process.poll()}) -----\n{self.log(name)}")

    def stop_all(self) -> None:
        for process in self.started.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.started.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    running = Processes(tmp_path)
    try:
        yield running
    finally:
        running.stop_all()


def http_get(url: str) -> tuple[int, bytes]:
    """(status, body); status 0 while nothing listens yet."""
    try:
        return fetch(url, timeout=5)
    except OSError:
        return 0, b""


def answers(processes: Processes, name: str, url: str) -> bool:
    """Whether ``url`` answers 200; fails at once if process ``name`` died."""
    processes.assert_running(name)
    return http_get(url)[0] == 200


def logged_metrics_port(processes: Processes, name: str) -> int | None:
    """The port the daemon's JSON log says its metrics server listens on."""
    processes.assert_running(name)
    for line in processes.log(name).splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            match = PORT_LOGGED.match(str(entry.get("event", "")))
            if match:
                return int(match.group(1))
    return None


def prometheus_query(port: int, promql: str) -> dict[str, float]:
    """An instant query: each series' value by its labels (``{}`` printed
    as the empty string for a single unlabelled result)."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    status, body = http_get(url)
    if status != 200:
        return {}
    answer: dict[str, Any] = json.loads(body)
    assert answer["status"] == "success", answer
    return {
        series_key(**result["metric"]): float(result["value"][1])
        for result in answer["data"]["result"]
    }


def series_key(**labels: str) -> str:
    return ",".join(f"{name}={value}" for name, value in sorted(labels.items()))


def prometheus_config(target_port: int) -> str:
    return f"""\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: {JOB}
    static_configs:
      - targets: ["127.0.0.1:{target_port}"]
"""


def append_events(store: EventStore) -> dict[str, int]:
    """40 events in 8 appends: 25 of type A, 15 of type B."""
    counts = {"A": 0, "B": 0}
    for batch in range(8):
        events = [NewEvent("A" if (batch + n) % 8 < 5 else "B", {"n": n}) for n in range(5)]
        store.append(f"scraped-{batch % 3}", events)
        for event in events:
            counts[event.type] += 1
    return counts


def test_prometheus_scrapes_the_projector_daemon(
    dsn: str, store: EventStore, processes: Processes, tmp_path: Path
) -> None:
    if not PROMETHEUS.exists():
        pytest.fail(f"{PROMETHEUS} is missing: install it with scripts/install-system.sh")
    processes.start(
        "projector",
        [
            AURA_PG,
            "project",
            "tally_set",
            "--dsn",
            dsn,
            "--catalog",
            str(FIXTURE_CATALOG),
            "--poll-interval",
            "0.2",
            "--metrics-port",
            "0",
            "--metrics-host",
            "127.0.0.1",
            "--log-format",
            "json",
        ],
    )
    try:
        metrics_port = wait_for_sync(
            lambda: logged_metrics_port(processes, "projector"), 20, "the metrics port in the log"
        )
        wait_for_sync(
            lambda: answers(processes, "projector", f"http://127.0.0.1:{metrics_port}/ready"),
            20,
            "/ready",
        )
        appended = append_events(store)
        assert appended == {"A": 25, "B": 15}
        wait_for_sync(lambda: caught_up(dsn, "tally_set"), 20, "catch-up")
        [(head,)] = query(dsn, "SELECT max(global_position) FROM aura.events")
        assert head is not None

        config = tmp_path / "prometheus.yml"
        config.write_text(prometheus_config(metrics_port))
        prometheus_port = free_port()
        processes.start(
            "prometheus",
            [
                str(PROMETHEUS),
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
            ],
        )
        wait_for_sync(
            lambda: answers(processes, "prometheus", f"http://127.0.0.1:{prometheus_port}/-/ready"),
            20,
            "Prometheus ready",
        )

        job = f'job="{JOB}"'
        target = {"job": JOB, "instance": f"127.0.0.1:{metrics_port}"}
        expected = {
            # Three scrapes at least, every one of them successful.
            f"sum(count_over_time(up{{{job}}}[1m]) >= bool 3)": {"": 1.0},
            f"sum(min_over_time(up{{{job}}}[1m]))": {"": 1.0},
            f"up{{{job}}}": {series_key(__name__="up", **target): 1.0},
            f'sum(aura_events_processed_total{{{job},status="success"}})': {"": 40.0},
            f'sum by (event_type) (aura_events_processed_total{{{job},status="success"}})': {
                series_key(event_type=event_type): float(count)
                for event_type, count in appended.items()
            },
            f'sum(aura_events_processed_total{{{job},status!="success"}}) or vector(0)': {"": 0.0},
            f'aura_projection_checkpoint_position{{{job},projection_name="tally_set"}}': {
                series_key(
                    __name__="aura_projection_checkpoint_position",
                    projection_name="tally_set",
                    **target,
                ): float(head)
            },
            f"aura_event_store_head_position{{{job}}}": {
                series_key(__name__="aura_event_store_head_position", **target): float(head)
            },
            f'sum(aura_projection_events_behind{{{job},projection_name="tally_set"}})': {"": 0.0},
            f"sum(aura_database_up{{{job}}})": {"": 1.0},
            f"sum(aura_system_health_score{{{job}}})": {"": 100.0},
        }

        def observed() -> dict[str, dict[str, float]]:
            return {promql: prometheus_query(prometheus_port, promql) for promql in expected}

        last: dict[str, dict[str, float]] = {}

        def as_expected() -> bool:
            nonlocal last
            processes.assert_running("projector")
            last = observed()
            return last == expected

        with contextlib.suppress(AssertionError):
            wait_for_sync(as_expected, 20, "the expected series in Prometheus")
        assert last == expected
    except BaseException:
        processes.print_logs()
        raise
