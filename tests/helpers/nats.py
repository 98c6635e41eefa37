"""A real nats-server with JetStream for tests, started on a free port
(the relay's and the importer's tests)."""

from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import nats
import psycopg
from psycopg.rows import dict_row

from aura_pg.devtools.localdb import free_port

NATS_SERVER = "/usr/sbin/nats-server"


class NatsServer:
    """A nats-server with JetStream on a free port; its store survives restarts."""

    def __init__(self) -> None:
        self.port = free_port()
        self.store_dir = tempfile.mkdtemp(prefix="aura-pg-nats-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [NATS_SERVER, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", self.store_dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.process.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        shutil.rmtree(self.store_dir, ignore_errors=True)


@contextmanager
def running_nats_server() -> Iterator[NatsServer]:
    """A started nats-server, stopped and removed afterwards."""
    server = NatsServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


# -- a stream of messages shaped like the hardening plan's Event model ------


@dataclass
class Published:
    """What a test published, and what the store must hold after the import."""

    expected: dict[str, list[tuple[str, dict[str, Any]]]] = field(default_factory=dict)
    """Stream id to its events' (idempotency key, payload), in version order."""
    rejected: dict[int, str] = field(default_factory=dict)
    """Stream sequence to what is wrong with that message."""
    stored: int = 0
    """Messages the JetStream stream holds."""
    dropped_by_jetstream: int = 0
    """Publishes JetStream answered as duplicates (same Nats-Msg-Id)."""
    republished: int = 0
    """Bodies published again under a new Nats-Msg-Id (the store drops them)."""

    @property
    def logical(self) -> int:
        return sum(len(events) for events in self.expected.values())


def event_body(index: int, aggregate: str, version: int) -> dict[str, Any]:
    return {
        "id": f"evt-{index}",
        "idempotency_key": f"key-{index}",
        "type": "THING_HAPPENED" if version > 1 else "THING_STARTED",
        "aggregate_id": aggregate,
        "version": version,
        "payload": {"n": index, "version": version},
        "metadata": {"producer": "old-system"},
    }


async def publish_events(
    url: str,
    stream: str,
    subject_prefix: str,
    *,
    messages: int,
    aggregates: int,
    seed: int = 7,
    duplicate_msg_id_every: int = 0,
    republish_every: int = 0,
    reject_every: int = 0,
) -> Published:
    """Publish ``messages`` logical events over ``aggregates`` aggregates
    (subject ``<prefix>.<aggregate>``), each with ``Nats-Msg-Id`` msg-<i>.
    Every ``duplicate_msg_id_every``-th is published twice with the same
    Nats-Msg-Id (JetStream drops the second); every ``republish_every``-th is
    published again later under a new Nats-Msg-Id (the stream stores both,
    the store must keep one); every ``reject_every``-th is followed by a
    message the default mapping or the store must reject."""
    rng = random.Random(seed)
    published = Published()
    versions: dict[str, int] = {}
    republish: list[tuple[str, dict[str, Any], int]] = []
    nc = await nats.connect(url, allow_reconnect=False)
    try:
        js = nc.jetstream()

        async def send(subject: str, data: bytes, msg_id: str) -> int | None:
            ack = await js.publish(subject, data, headers={"Nats-Msg-Id": msg_id})
            if ack.duplicate:
                published.dropped_by_jetstream += 1
                return None
            published.stored += 1
            return ack.seq

        for index in range(messages):
            aggregate = f"agg-{rng.randrange(aggregates):03d}"
            version = versions[aggregate] = versions.get(aggregate, 0) + 1
            body = event_body(index, aggregate, version)
            subject = f"{subject_prefix}.{aggregate}"
            data = json.dumps(body).encode()
            await send(subject, data, f"msg-{index}")
            published.expected.setdefault(aggregate, []).append(
                (body["idempotency_key"], body["payload"])
            )
            if duplicate_msg_id_every and index % duplicate_msg_id_every == 3:
                assert await send(subject, data, f"msg-{index}") is None
            if republish_every and index % republish_every == 5:
                republish.append((subject, body, index))
            while len(republish) > 3 or (republish and index == messages - 1):
                # Some time later, after newer events of the same aggregate.
                again_subject, again, again_index = republish.pop(0)
                await send(again_subject, json.dumps(again).encode(), f"again-{again_index}")
                published.republished += 1
            if reject_every and index % reject_every == reject_every - 1:
                kind = (index // reject_every) % 5
                bad: bytes
                if kind == 0:
                    bad, why = b"{not json", "bad JSON"
                elif kind == 1:
                    bad = json.dumps({**event_body(10**6 + index, aggregate, 0)}).encode()
                    bad = bad.replace(b'"aggregate_id"', b'"aggregate"')
                    why = "no aggregate_id"
                elif kind == 2:
                    bad = json.dumps({**body, "idempotency_key": f"bad-{index}", "type": "A\x01B"})
                    bad, why = bad.encode(), "a type the store refuses"
                elif kind == 3:
                    bad = json.dumps({**body, "idempotency_key": f"bad-{index}", "payload": [1]})
                    bad, why = bad.encode(), "payload not an object"
                else:
                    # The key of the event just published, with other data.
                    bad = json.dumps({**body, "payload": {"other": True}}).encode()
                    why = "idempotency key reused with other data"
                seq = await send(subject, bad, f"bad-{index}")
                assert seq is not None
                published.rejected[seq] = why
    finally:
        await nc.close()
    return published


def stored_events(dsn: str) -> dict[str, list[dict[str, Any]]]:
    """The store's events by stream, in version order."""
    by_stream: dict[str, list[dict[str, Any]]] = {}
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT stream_id, version, type, data, metadata, idempotency_key"
            " FROM aura.events ORDER BY stream_id, version"
        ).fetchall()
    for stream_id, version, event_type, data, metadata, key in rows:
        by_stream.setdefault(stream_id, []).append(
            {"version": version, "type": event_type, "data": data, "metadata": metadata,
             "key": key}
        )  # fmt: skip
    return by_stream


def dead_letters(dsn: str) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        return conn.execute(
            "SELECT source, stream, subject, sequence, message_id, headers, payload, reason"
            " FROM aura.import_dead_letters ORDER BY sequence"
        ).fetchall()


def assert_imported_exactly_once(dsn: str, published: Published, stream_prefix: str = "") -> None:
    """The store holds each logical event once, per aggregate in publish
    order, and the dead letters are exactly the rejected messages, once each."""
    events = stored_events(dsn)
    assert set(events) == {stream_prefix + aggregate for aggregate in published.expected}
    for aggregate, expected in published.expected.items():
        stored = events[stream_prefix + aggregate]
        assert [(e["key"], e["data"]) for e in stored] == expected, aggregate
        assert [e["metadata"]["original_version"] for e in stored] == list(
            range(1, len(expected) + 1)
        ), aggregate
    letters = dead_letters(dsn)
    assert [letter["sequence"] for letter in letters] == sorted(published.rejected)
