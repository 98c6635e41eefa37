"""``aura-pg relay`` in a subprocess, as an operator runs it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from aura_pg.devtools.localdb import free_port
from aura_pg.observability import names
from tests.helpers.metrics import answering, http_get, scrape, value
from tests.helpers.projections import wait_for_sync
from tests.helpers.slow_http import DripServer
from tests.integration.test_relay import WebhookServer, add_route, append, outbox

REPO_ROOT = Path(__file__).resolve().parents[2]
# `aura-pg relay`, run by this interpreter.
RELAY = [sys.executable, "-m", "aura_pg", "relay"]


@pytest.fixture
def webhook_server() -> Iterator[WebhookServer]:
    server = WebhookServer()
    try:
        yield server
    finally:
        server.close()


def start_relay(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*RELAY, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
    )  # fmt: skip


def run_relay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RELAY, *args], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60, check=False
    )


def relay_connected(dsn: str) -> bool:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            """SELECT count(*) FROM pg_stat_activity
               WHERE application_name = 'aura-pg relay' AND datname = current_database()"""
        ).fetchone()
    return row is not None and row[0] > 0


def test_sigterm_finishes_the_batch_in_flight_and_exits_0(
    dsn: str, webhook_server: WebhookServer
) -> None:
    add_route(dsn, "hook", "webhook", "hook")
    ids = append(dsn, "T", "T", "T")
    webhook_server.hold = {"/hook"}
    webhook_server.hold_first_only = True  # the first POST waits for the test
    relay = start_relay(
        "--dsn", dsn, "--webhook", f"hook={webhook_server.url('/hook')}",
        "--poll-interval", "0.1", "--publish-timeout", "30",
    )  # fmt: skip
    try:
        assert webhook_server.arrived.wait(20), "the relay sent nothing"
        relay.send_signal(signal.SIGTERM)
        time.sleep(0.2)  # the signal lands while the batch waits for the answer
        webhook_server.release.set()
        _, stderr = relay.communicate(timeout=20)
    finally:
        relay.kill()
    assert relay.returncode == 0, stderr
    assert "stopped" in stderr
    assert [r.headers["Idempotency-Key"] for r in webhook_server.received] == ids
    assert {row["status"] for row in outbox(dsn)} == {"delivered"}


def test_idle_relay_exits_0_on_sigint(dsn: str, webhook_server: WebhookServer) -> None:
    relay = start_relay("--dsn", dsn, "--webhook", f"hook={webhook_server.url('/')}")
    try:
        deadline = time.monotonic() + 20
        while not relay_connected(dsn):
            assert relay.poll() is None, relay.communicate()
            assert time.monotonic() < deadline, "the relay never connected"
            time.sleep(0.05)
        relay.send_signal(signal.SIGINT)
        _, stderr = relay.communicate(timeout=20)
    finally:
        relay.kill()
    assert relay.returncode == 0, stderr
    assert "Traceback" not in stderr


def test_once_drains_and_prints_a_summary(dsn: str, webhook_server: WebhookServer) -> None:
    add_route(dsn, "hook", "webhook", "hook")
    append(dsn, "T", "T")
    args = ["--dsn", dsn, "--webhook", f"hook={webhook_server.url('/h')}", "--once"]
    done = run_relay(*args, "--batch-size", "1")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"batches": 2, "delivered": 2, "failed": 0, "dead": 0}
    again = run_relay(*args)
    assert json.loads(again.stdout) == {"batches": 0, "delivered": 0, "failed": 0, "dead": 0}
    assert len(webhook_server.received) == 2


def test_metrics_count_deliveries_failures_and_the_backlog(
    dsn: str, webhook_server: WebhookServer
) -> None:
    add_route(dsn, "hook", "webhook", "hook")
    append(dsn, "T", "T", "T")
    port = free_port()
    relay = start_relay(
        "--dsn", dsn, "--webhook", f"hook={webhook_server.url('/h')}", "--poll-interval", "0.1",
        "--metrics-port", str(port), "--metrics-host", "127.0.0.1", "--backoff-base", "30",
    )  # fmt: skip
    try:
        wait_for_sync(lambda: answering(port), 60, "the relay's metrics server")
        wait_for_sync(lambda: len(webhook_server.received) == 3, 30, "three deliveries")
        wait_for_sync(
            lambda: all(row["status"] == "delivered" for row in outbox(dsn)), 30, "delivered"
        )
        samples = scrape(port)
        assert value(samples, names.OUTBOX_PUBLISHED, sink="webhook") == 3
        assert value(samples, names.OUTBOX_PUBLISH_DURATION + "_count", sink="webhook") == 3
        assert value(samples, names.OUTBOX_PENDING, sink="webhook", topic="hook") == 0

        webhook_server.status = 500
        append(dsn, "T")
        wait_for_sync(lambda: len(webhook_server.received) == 4, 30, "the failing delivery")
        wait_for_sync(lambda: outbox(dsn)[-1]["attempts"] == 1, 30, "the failure recorded")
        samples = scrape(port)
        assert value(samples, names.OUTBOX_PUBLISH_FAILURES, sink="webhook") == 1
        assert value(samples, names.OUTBOX_PENDING, sink="webhook", topic="hook") == 1
        assert value(samples, names.OUTBOX_OLDEST_PENDING_AGE) > 0
        assert value(samples, names.SYSTEM_HEALTH_SCORE) < 100  # 1 failure in 4 attempts
        assert http_get(port, "/ready")[0] == 200
    finally:
        relay.send_signal(signal.SIGTERM)
        _, stderr = relay.communicate(timeout=20)
    assert relay.returncode == 0, stderr


def test_dsn_from_environment(dsn: str, webhook_server: WebhookServer) -> None:
    add_route(dsn, "hook", "webhook", "hook")
    append(dsn, "T")
    done = subprocess.run(
        [*RELAY, "--webhook", f"hook={webhook_server.url('/')}", "--once"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=60, check=False,
        env={"AURA_PG_DSN": dsn, "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["delivered"] == 1


def test_usage_errors_exit_2() -> None:
    no_sink = run_relay("--dsn", "host=/nonexistent", "--once")
    assert no_sink.returncode == 2
    assert "no sink" in no_sink.stderr
    bad_webhook = run_relay("--webhook", "hook=ftp://example.com/x", "--once")
    assert bad_webhook.returncode == 2
    assert "must be http:// or https://" in bad_webhook.stderr
    bad_size = run_relay("--webhook", "h=http://127.0.0.1/", "--batch-size", "0")
    assert bad_size.returncode == 2


def test_unreachable_database_with_once_exits_1() -> None:
    dsn = f"host=127.0.0.1 port={free_port()} user=postgres dbname=x connect_timeout=2"
    done = run_relay("--dsn", dsn, "--webhook", "h=http://127.0.0.1:1/", "--once")
    assert done.returncode == 1
    assert "aura-pg relay: connection failed" in done.stderr
    assert "Traceback" not in done.stderr


def test_unmigrated_database_exits_1(empty_dsn: str) -> None:
    done = run_relay("--dsn", empty_dsn, "--webhook", "h=http://127.0.0.1:1/")
    assert done.returncode == 1
    assert 'relation "aura.outbox" does not exist' in done.stderr
    assert "Traceback" not in done.stderr


# -- a receiver that drips its answer (issue 25) ----------------------------


@pytest.fixture
def drip_server() -> Iterator[DripServer]:
    """Answers ``200 OK``, then a header one byte every 0.8 s (48 s in all)."""
    server = DripServer(interval=0.8)
    try:
        yield server
    finally:
        server.close()


def test_publish_timeout_bounds_a_dripping_answer(dsn: str, drip_server: DripServer) -> None:
    add_route(dsn, "hook", "webhook", "hook")
    append(dsn, "T", "T")
    started = time.monotonic()
    done = run_relay(
        "--dsn", dsn, "--webhook", f"hook={drip_server.url('/hook')}",
        "--publish-timeout", "2", "--once",
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    # 2 s and the interpreter's start, with room for a loaded machine; the
    # answer itself takes 48 s.
    assert elapsed < 12, f"the relay took {elapsed:.1f} s"
    assert json.loads(done.stdout) == {"batches": 1, "delivered": 0, "failed": 1, "dead": 0}
    first, second = outbox(dsn)
    assert (first["status"], first["attempts"]) == ("pending", 1)
    assert "no complete answer within 2 s" in first["last_error"]
    assert (second["status"], second["attempts"]) == ("pending", 0)  # the webhook paused


def wait_for_request(relay: subprocess.Popen[str], drip_server: DripServer) -> None:
    deadline = time.monotonic() + 30
    while not drip_server.arrived.wait(0.1):
        assert relay.poll() is None, relay.communicate()
        assert time.monotonic() < deadline, "the relay sent nothing"


def terminate_while_dripping(
    relay: subprocess.Popen[str], drip_server: DripServer
) -> tuple[float, str]:
    """SIGTERM once the receiver has the request: seconds until the relay
    exited, and what it wrote to stderr."""
    try:
        wait_for_request(relay, drip_server)
        relay.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        _, stderr = relay.communicate(timeout=20)
        return time.monotonic() - signalled, stderr
    finally:
        relay.kill()


def test_sigterm_during_a_dripping_answer_ends_within_the_publish_timeout(
    dsn: str, drip_server: DripServer
) -> None:
    add_route(dsn, "hook", "webhook", "hook")
    append(dsn, "T")
    relay = start_relay(
        "--dsn", dsn, "--webhook", f"hook={drip_server.url('/hook')}",
        "--poll-interval", "0.1", "--publish-timeout", "3",
    )  # fmt: skip
    elapsed, stderr = terminate_while_dripping(relay, drip_server)
    assert relay.returncode == 0, stderr
    assert elapsed < 8, f"SIGTERM took {elapsed:.1f} s"
    [row] = outbox(dsn)
    assert (row["status"], row["attempts"]) == ("pending", 1)
    assert "timed out" in row["last_error"]


def test_sigterm_abandons_a_publish_after_the_shutdown_timeout(
    dsn: str, drip_server: DripServer
) -> None:
    add_route(dsn, "hook", "webhook", "hook")
    append(dsn, "T", "T")
    relay = start_relay(
        "--dsn", dsn, "--webhook", f"hook={drip_server.url('/hook')}",
        "--poll-interval", "0.1", "--publish-timeout", "120", "--shutdown-timeout", "1",
    )  # fmt: skip
    elapsed, stderr = terminate_while_dripping(relay, drip_server)
    assert relay.returncode == 0, stderr
    assert elapsed < 6, f"SIGTERM took {elapsed:.1f} s"
    assert "shutdown timeout" in stderr
    # Neither row was recorded: both are published again later.
    assert [(row["status"], row["attempts"]) for row in outbox(dsn)] == [("pending", 0)] * 2
    assert not relay_connected(dsn)
