"""``aura-pg import nats`` in a subprocess, as an operator runs it: beside
a publisher that keeps writing, killed with SIGKILL half-way and started
again, then run once more from a new consumer."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import psycopg
import pytest

from aura_pg.devtools.localdb import free_port
from tests.helpers.metrics import answering, scrape, value
from tests.helpers.nats import (
    assert_imported_exactly_once,
    dead_letters,
    event_body,
    publish_events,
    running_nats_server,
    stored_events,
)
from tests.helpers.projections import wait_for_sync

REPO_ROOT = Path(__file__).resolve().parents[2]
# `aura-pg import nats`, run by this interpreter.
IMPORT = [sys.executable, "-m", "aura_pg", "import", "nats"]
STREAM = "OLD"


@pytest.fixture
def nats_url() -> Iterator[str]:
    with running_nats_server() as server:

        async def create_stream() -> None:
            nc = await nats.connect(server.url, allow_reconnect=False)
            try:
                await nc.jetstream().add_stream(name=STREAM, subjects=["old.>"])
            finally:
                await nc.close()

        asyncio.run(create_stream())
        yield server.url


def start_import(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*IMPORT, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
    )  # fmt: skip


def run_import(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*IMPORT, *args],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120, check=False, env=env,
    )  # fmt: skip


def event_count(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM aura.events").fetchone()
    return int(row[0]) if row else 0


def publish_raw(url: str, messages: list[tuple[str, bytes]]) -> None:
    async def send() -> None:
        nc = await nats.connect(url, allow_reconnect=False)
        try:
            js = nc.jetstream()
            for subject, data in messages:
                await js.publish(subject, data)
        finally:
            await nc.close()

    asyncio.run(send())


def test_killed_and_restarted_beside_a_live_publisher_imports_each_message_once_in_order(
    dsn: str, nats_url: str
) -> None:
    port = free_port()
    common = ["--dsn", dsn, "--server", nats_url, "--stream", STREAM, "--ack-wait", "2"]
    began = time.monotonic()
    # The first importer takes one message at a time (--window 1, the
    # importer before the window), so that it is still behind the publisher
    # when killed; the default window keeps up with it. The restart uses
    # the default window: it widens the consumer's max_ack_pending, and
    # waits (the barrier) for the message the killed importer held.
    first = start_import(
        *common, "--fetch-timeout", "0.2", "--lag-interval", "0.5", "--window", "1",
        "--metrics-port", str(port), "--metrics-host", "127.0.0.1",
    )  # fmt: skip
    try:
        wait_for_sync(lambda: answering(port), 60, "the importer's metrics server")
        # The old system keeps publishing while the import runs (shadow mode).
        published = asyncio.run(
            publish_events(
                nats_url, STREAM, "old", messages=3000, aggregates=50,
                duplicate_msg_id_every=40, republish_every=30, reject_every=100,
            )
        )  # fmt: skip
        wait_for_sync(lambda: event_count(dsn) >= 800, 60, "800 events imported")
        samples = scrape(port)
        assert value(samples, "aura_import_lag_messages", source="nats", stream=STREAM) > 0
        appended = value(
            samples, "aura_import_messages_total", source="nats", stream=STREAM, outcome="appended"
        )
        assert appended >= 800
    finally:
        first.send_signal(signal.SIGKILL)
        _, first_log = first.communicate(timeout=20)
    assert first.returncode == -signal.SIGKILL
    assert "messages behind" in first_log
    imported_before_kill = event_count(dsn)
    assert imported_before_kill < published.logical, "the import finished before the kill"
    assert published.dropped_by_jetstream == 75
    assert published.republished == 100
    assert len(published.rejected) == 30

    second = run_import(*common, "--until-end", "--fetch-timeout", "0.2")
    assert second.returncode == 0, second.stderr
    summary = json.loads(second.stdout)
    assert summary["appended"] == published.logical - imported_before_kill
    assert summary["last_sequence"] == published.stored
    assert summary["lag"] == 0
    assert_imported_exactly_once(dsn, published)
    assert len(dead_letters(dsn)) == 30
    took = time.monotonic() - began

    # The whole stream again through a new consumer: nothing new.
    third = run_import(*common, "--until-end", "--consumer", "recheck", "--fetch-timeout", "0.2")
    assert third.returncode == 0, third.stderr
    assert json.loads(third.stdout) == {
        "appended": 0,
        "duplicates": published.stored,
        "rejected": 0,
        "last_sequence": published.stored,
        "lag": 0,
    }
    assert_imported_exactly_once(dsn, published)
    print(
        f"\n{published.stored} messages ({published.logical} events): imported with a kill "
        f"in {took:.1f} s; re-checked in {time.monotonic() - began - took:.1f} s"
    )


def consumer_state(url: str, consumer: str) -> tuple[int, int]:
    """The consumer's (unacknowledged messages, max_ack_pending)."""

    async def read() -> tuple[int, int]:
        nc = await nats.connect(url, allow_reconnect=False)
        try:
            info = await nc.jetstream().consumer_info(STREAM, consumer)
        finally:
            await nc.close()
        return info.num_ack_pending or 0, info.config.max_ack_pending or 0

    return asyncio.run(read())


def test_killed_twice_with_a_window_in_flight_each_message_once_in_order(
    dsn: str, nats_url: str
) -> None:
    """A backlog of many aggregates interleaved, imported with a window of
    messages in flight: SIGKILL twice while messages are delivered and not
    acknowledged (some appended, some not), then a run to the end. Every
    message lands once, each aggregate in publish order."""
    published = asyncio.run(
        publish_events(
            nats_url, STREAM, "old", messages=6000, aggregates=300,
            duplicate_msg_id_every=50, republish_every=40, reject_every=150,
        )
    )  # fmt: skip
    common = ["--dsn", dsn, "--server", nats_url, "--stream", STREAM, "--ack-wait", "2"]
    common += ["--fetch-timeout", "0.2", "--window", "300"]
    in_flight_at_kill = []
    for until in (1500, 3500):
        running = start_import(*common)
        try:
            wait_for_sync(lambda: event_count(dsn) >= until, 120, f"{until} events imported")
        finally:
            running.send_signal(signal.SIGKILL)
            running.communicate(timeout=20)
        assert running.returncode == -signal.SIGKILL
        unacknowledged, window = consumer_state(nats_url, "aura-import-OLD")
        assert window == 300
        in_flight_at_kill.append(unacknowledged)
    assert event_count(dsn) < published.logical, "the import finished before the kills"
    # Killed with messages delivered and not acknowledged: the next run
    # waits for them (the barrier) before it appends anything newer.
    assert max(in_flight_at_kill) > 1, in_flight_at_kill

    done = run_import(*common, "--until-end")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["last_sequence"] == published.stored
    assert summary["lag"] == 0
    assert "appending resumes once JetStream has delivered them again" in done.stderr
    assert_imported_exactly_once(dsn, published)
    assert len(dead_letters(dsn)) == len(published.rejected)


def test_a_second_importer_on_the_consumer_stands_by_and_takes_over(
    dsn: str, nats_url: str
) -> None:
    """Two importers started on one consumer: the second stands by (the
    database lock the first holds) instead of appending beside it, and takes
    over when the first is killed. Every message lands once, in order."""
    published = asyncio.run(publish_events(nats_url, STREAM, "old", messages=3000, aggregates=100))
    common = ["--dsn", dsn, "--server", nats_url, "--stream", STREAM, "--ack-wait", "2"]
    common += ["--fetch-timeout", "0.2"]
    first = start_import(*common, "--window", "1")  # slow: still busy when the second starts
    second: subprocess.Popen[str] | None = None
    try:
        wait_for_sync(lambda: event_count(dsn) >= 300, 60, "300 events imported")
        second = start_import(*common, "--until-end")
        time.sleep(2)
        assert second.poll() is None
        assert event_count(dsn) < published.logical, "the first finished too early"
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=20)
        _, stderr = second.communicate(timeout=120)
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.communicate(timeout=20)
    assert second.returncode == 0, stderr
    assert "another importer is importing through consumer aura-import-OLD: standing by" in stderr
    assert "consumer aura-import-OLD is free: this importer takes over" in stderr
    assert stderr.index("standing by") < stderr.index("takes over")
    assert_imported_exactly_once(dsn, published)


def test_until_end_summary_and_sigterm(dsn: str, nats_url: str) -> None:
    messages = [
        (f"old.agg-{i % 3}", json.dumps(event_body(i, f"agg-{i % 3}", i // 3 + 1)).encode())
        for i in range(12)
    ]
    publish_raw(nats_url, [*messages, ("old.bad", b"not json"), ("old.bad", b"[]")])
    common = ["--dsn", dsn, "--server", nats_url, "--stream", STREAM, "--fetch-timeout", "0.2"]
    done = run_import(*common, "--until-end", "--stream-prefix", "legacy-")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "appended": 12,
        "duplicates": 0,
        "rejected": 2,
        "last_sequence": 14,
        "lag": 0,
    }
    assert sorted(stored_events(dsn)) == ["legacy-agg-0", "legacy-agg-1", "legacy-agg-2"]
    assert [letter["reason"] for letter in dead_letters(dsn)] == [
        "rejected by the mapping: the body is not JSON: Expecting value: line 1 column 1 (char 0)",
        "rejected by the mapping: the body must be a JSON object, not array",
    ]

    # As a daemon: waits for more, and SIGTERM ends it cleanly.
    daemon = start_import(*common, "--stream-prefix", "legacy-")
    try:
        publish_raw(nats_url, [("old.agg-9", json.dumps(event_body(99, "agg-9", 1)).encode())])
        wait_for_sync(lambda: "legacy-agg-9" in stored_events(dsn), 30, "the new event")
        daemon.send_signal(signal.SIGTERM)
        _, stderr = daemon.communicate(timeout=20)
    finally:
        daemon.kill()
    assert daemon.returncode == 0, stderr
    assert "stopped" in stderr
    assert "Traceback" not in stderr


def test_a_python_mapping_and_a_mapping_file(dsn: str, nats_url: str, tmp_path: Path) -> None:
    (tmp_path / "legacy_mapping_cli.py").write_text(
        "from aura_pg.importer import ImportedEvent\n"
        "\n"
        "def to_event(message):\n"
        "    body = message.json_object()\n"
        "    return ImportedEvent('py-' + body['user'], 'USER_' + body['did'], {'n': body['n']})\n"
    )
    (tmp_path / "mapping.yaml").write_text(
        "stream_id: 'file-{user}'\ntype: 'USER_{did}'\nidempotency_key: '{user}-{n}'\n"
    )
    publish_raw(
        nats_url,
        [
            ("old.u", b'{"user": "ann", "did": "JOINED", "n": 1}'),
            ("old.u", b'{"user": "ann", "did": "LEFT", "n": 2}'),
            ("old.u", b'{"user": "bob"}'),
        ],
    )
    common = ["--dsn", dsn, "--server", nats_url, "--stream", STREAM, "--until-end"]
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    by_function = run_import(
        *common, "--mapping", "legacy_mapping_cli:to_event", "--consumer", "py", env=env
    )
    assert by_function.returncode == 0, by_function.stderr
    assert json.loads(by_function.stdout)["appended"] == 2
    by_file = run_import(
        *common, "--mapping-file", str(tmp_path / "mapping.yaml"), "--consumer", "file"
    )
    assert by_file.returncode == 0, by_file.stderr
    assert json.loads(by_file.stdout)["appended"] == 2
    events = stored_events(dsn)
    assert [(e["type"], e["data"]) for e in events["py-ann"]] == [
        ("USER_JOINED", {"n": 1}),
        ("USER_LEFT", {"n": 2}),
    ]
    assert [(e["type"], e["key"]) for e in events["file-ann"]] == [
        ("USER_JOINED", "ann-1"),
        ("USER_LEFT", "ann-2"),
    ]
    # Sequence 3 was rejected by both mappings: one dead letter.
    assert [(letter["sequence"], letter["reason"]) for letter in dead_letters(dsn)] == [
        (3, "the mapping raised KeyError: 'did'"),
    ]


def test_usage_and_setup_errors(dsn: str, empty_dsn: str, nats_url: str, tmp_path: Path) -> None:
    base = ["--server", nats_url, "--stream", STREAM]
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text("stream_id: 'x-{'\ntype: T\n")
    for args, message in [
        ([*base, "--dsn", dsn, "--mapping-file", str(bad_file)], "unmatched '{'"),
        ([*base, "--dsn", dsn, "--mapping", "nowhere:f"], "cannot import nowhere"),
        ([*base, "--dsn", dsn, "--mapping", "m:f", "--stream-prefix", "p-"], "default mapping"),
        (["--server", nats_url, "--stream", "a.b"], "is not a JetStream name"),
        (["--stream", STREAM], "--server"),
    ]:
        done = run_import(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr
    missing = run_import("--dsn", dsn, "--server", nats_url, "--stream", "NOPE", "--until-end")
    assert missing.returncode == 1
    assert "JetStream has no stream 'NOPE'" in missing.stderr
    unmigrated = run_import("--dsn", empty_dsn, *base, "--until-end")
    assert unmigrated.returncode == 1
    assert "aura-pg migrate" in unmigrated.stderr
    assert "Traceback" not in missing.stderr + unmigrated.stderr
