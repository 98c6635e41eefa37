"""A projector daemon's /metrics, /health and /ready, scraped over real HTTP
from a real `aura-pg project` process, checked against the database after a
known workload."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aura_pg import EventStore, NewEvent
from aura_pg.devtools.localdb import free_port
from aura_pg.observability import names
from aura_pg.observability.health import DEAD_LETTER_WEIGHT, DEAD_LETTERS_FULL
from tests.helpers.metrics import Samples, answering, http_get, scrape, value
from tests.helpers.projections import FIXTURE_CATALOG, caught_up, query, wait_for_sync

ROOT = Path(__file__).resolve().parents[2]
AURA_PG = str(Path(sys.executable).with_name("aura-pg"))


class Daemon:
    def __init__(self, dsn: str, log_path: Path, *projections: str) -> None:
        self.port = free_port()
        self.log_path = log_path
        with log_path.open("w") as log:
            self.process = subprocess.Popen(
                [
                    AURA_PG, "project", *projections, "--dsn", dsn,
                    "--catalog", str(FIXTURE_CATALOG), "--poll-interval", "0.2",
                    "--metrics-port", str(self.port), "--metrics-host", "127.0.0.1",
                    "--log-format", "json",
                ],
                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, text=True,
            )  # fmt: skip

    def get(self, path: str) -> tuple[int, str]:
        return http_get(self.port, path)

    def samples(self) -> Samples:
        return scrape(self.port)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(20)


@pytest.fixture
def start_daemon(dsn: str, tmp_path: Path) -> Iterator[Any]:
    started: list[Daemon] = []

    def start(*projections: str) -> Daemon:
        daemon = Daemon(dsn, tmp_path / f"daemon-{len(started)}.log", *projections)
        started.append(daemon)
        wait_for_sync(lambda: answering(daemon.port), 60, "the metrics server")
        return daemon

    yield start
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait(10)


def head_position(dsn: str) -> int:
    return int(query(dsn, "SELECT max(global_position) FROM aura.events")[0][0])


def test_metrics_agree_with_the_database_after_a_known_workload(
    dsn: str, store: EventStore, start_daemon: Any
) -> None:
    daemon = start_daemon("tally_set", "tally_each")
    for i in range(30):
        store.append(f"order-{i % 6}", NewEvent(type="A" if i % 3 else "B", data={"i": i}))
    wait_for_sync(lambda: caught_up(dsn, "tally_set") and caught_up(dsn, "tally_each"), 60)
    samples = daemon.samples()
    head = head_position(dsn)

    # 20 A and 10 B, each applied by both projections.
    processed = names.EVENTS_PROCESSED
    assert value(samples, processed, event_type="A", status="success") == 40
    assert value(samples, processed, event_type="B", status="success") == 20
    duration_count = names.EVENT_PROCESSING_DURATION + "_count"
    assert value(samples, duration_count, event_type="A") == 40
    for projection in ("tally_set", "tally_each"):
        assert value(samples, names.EVENT_END_TO_END + "_count", projection_name=projection) == 30
        assert value(samples, names.PROJECTION_CHECKPOINT, projection_name=projection) == head
        assert value(samples, names.PROJECTION_LAG, projection_name=projection) == 0
        assert value(samples, names.PROJECTION_EVENTS_BEHIND, projection_name=projection) == 0
        assert value(samples, names.PROJECTION_DEAD_LETTERS, projection_name=projection) == 0
        circuit = names.PROJECTION_CIRCUIT_STATE
        assert value(samples, circuit, projection_name=projection, state="closed") == 1
        assert value(samples, circuit, projection_name=projection, state="open") == 0
        status = names.PROJECTION_STATUS
        assert value(samples, status, projection_name=projection, status="running") == 1
    assert value(samples, names.EVENT_STORE_HEAD) == head
    assert value(samples, names.DATABASE_UP) == 1
    assert value(samples, names.SYSTEM_HEALTH_SCORE) == 100
    # Appends happened in the test process, not the daemon.
    assert value(samples, names.APPEND_DURATION + "_count") == 0

    status_code, body = daemon.get("/ready")
    assert status_code == 200, body
    assert json.loads(body)["schema_revision"] is not None
    assert daemon.stop() == 0


def test_a_poison_event_shows_in_errors_dead_letters_and_the_health_score(
    dsn: str, store: EventStore, start_daemon: Any
) -> None:
    daemon = start_daemon("tally_set")
    store.append("order-1", [NewEvent(type="A", data={"i": i}) for i in range(5)])
    # Applied first, so the failing batch holds only the poison event (and
    # maybe the B after it): one failed batch, then the poison event alone.
    wait_for_sync(lambda: caught_up(dsn, "tally_set"), 60, "catch-up before the poison")
    poison = store.append("order-2", NewEvent(type="A", data={"poison": True}))
    store.append("order-3", NewEvent(type="B", data={}))
    wait_for_sync(lambda: caught_up(dsn, "tally_set"), 60, "catch-up past the poison")
    samples = daemon.samples()

    assert value(samples, names.PROJECTION_DEAD_LETTERS, projection_name="tally_set") == 1
    processed = names.EVENTS_PROCESSED
    assert value(samples, processed, event_type="A", status="dead_lettered") == 1
    # tally_set: max_retries 2, so three failed attempts of the poison event.
    assert value(samples, processed, event_type="A", status="failed") == 3
    assert value(samples, processed, event_type="A", status="success") == 5
    assert value(samples, processed, event_type="B", status="success") == 1
    errors = names.PROJECTION_ERRORS
    # The failed batch, then the three isolated attempts.
    assert value(samples, errors, projection_name="tally_set", error_type="handler") == 4
    score = value(samples, names.SYSTEM_HEALTH_SCORE)
    assert score <= 100 - DEAD_LETTER_WEIGHT * 1 / DEAD_LETTERS_FULL
    assert daemon.stop() == 0

    # The JSON log lines name the projection and the event.
    lines = [json.loads(line) for line in daemon.log_path.read_text().splitlines()]
    (dead_lettered,) = [line for line in lines if "dead-lettered" in line["event"]]
    assert dead_lettered["level"] == "error"
    assert dead_lettered["projection"] == "tally_set"
    assert dead_lettered["event_id"] == str(poison.events[0].event_id)
    assert dead_lettered["event_type"] == "A"


def test_ready_fails_while_a_projection_has_failed_and_recovers(
    dsn: str, store: EventStore, start_daemon: Any
) -> None:
    daemon = start_daemon("tally_strict")
    store.append("order-1", NewEvent(type="A", data={"i": 1}))
    wait_for_sync(lambda: caught_up(dsn, "tally_strict"), 60)
    assert daemon.get("/ready")[0] == 200

    # tally_strict never dead-letters: the poison event opens its circuit.
    poison = store.append("order-2", NewEvent(type="A", data={"poison": True}))
    wait_for_sync(lambda: daemon.get("/ready")[0] == 503, 60, "not ready")
    status_code, body = daemon.get("/ready")
    assert status_code == 503
    assert "tally_strict" in json.loads(body)["reasons"][0]
    samples = daemon.samples()
    assert value(samples, names.PROJECTION_STATUS, projection_name="tally_strict", status="failed")
    assert value(samples, names.SYSTEM_HEALTH_SCORE) < 100
    # Liveness is unaffected: the process is fine, the projection is not.
    assert daemon.get("/health")[0] == 200

    query(
        dsn,
        "INSERT INTO tally_strict.cures (event_id) VALUES (%s)",
        [poison.events[0].event_id],
    )
    wait_for_sync(lambda: daemon.get("/ready")[0] == 200, 60, "ready again")
    assert daemon.stop() == 0


def test_ready_fails_when_the_schema_is_not_current(
    dsn: str, store: EventStore, start_daemon: Any
) -> None:
    daemon = start_daemon("tally_set")
    assert daemon.get("/ready")[0] == 200
    query(dsn, "UPDATE aura.alembic_version SET version_num = '0002'")
    status_code, body = daemon.get("/ready")
    assert status_code == 503
    assert "aura-pg migrate" in json.loads(body)["reasons"][0]
    assert daemon.stop() == 0


def test_a_metrics_port_in_use_is_a_clear_error(dsn: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [AURA_PG, "project", "tally_set", "--dsn", dsn, "--catalog", str(FIXTURE_CATALOG),
             "--metrics-port", str(port), "--metrics-host", "127.0.0.1"],
            cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr
