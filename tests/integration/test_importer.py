"""The NATS importer against real services: Postgres and a nats-server with
JetStream started per test. Crashes are simulated where they matter: a
consumer that fetched and never acknowledged, an append that committed
before its acknowledgement was sent, the importer's database sessions
terminated while it works."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC
from pathlib import Path
from typing import Any

import nats
import psycopg
import pytest
from nats.js.api import AckPolicy, ConsumerConfig
from prometheus_client import REGISTRY

from aura_pg import AppendRetry
from aura_pg.importer import (
    EventModelMapping,
    FileMapping,
    ImportConfigError,
    NatsImporter,
    RejectedMessage,
    SourceMessage,
    SourceUnavailable,
    load_callable,
)
from tests.helpers.metrics import retries_counted
from tests.helpers.nats import (
    assert_imported_exactly_once,
    dead_letters,
    event_body,
    publish_events,
    running_nats_server,
    stored_events,
)

STREAM = "OLD"


@pytest.fixture
async def nats_url() -> AsyncIterator[str]:
    with running_nats_server() as server:
        nc = await nats.connect(server.url, allow_reconnect=False)
        try:
            await nc.jetstream().add_stream(name=STREAM, subjects=["old.>"])
        finally:
            await nc.close()
        yield server.url


def importer(dsn: str, url: str, **options: Any) -> NatsImporter:
    mapping = options.pop("mapping", EventModelMapping())
    options.setdefault("fetch_timeout", 0.2)
    return NatsImporter(dsn, [url], STREAM, mapping, **options)


async def run_until_end(dsn: str, url: str, **options: Any) -> Any:
    async with importer(dsn, url, **options) as running:
        return await running.run(until_end=True)


async def publish(url: str, subject: str, data: bytes, headers: dict[str, str]) -> int:
    nc = await nats.connect(url, allow_reconnect=False)
    try:
        ack = await nc.jetstream().publish(subject, data, headers=headers)
        return ack.seq
    finally:
        await nc.close()


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, {"source": "nats", "stream": STREAM, **labels}) or 0.0


async def test_imports_each_message_once_in_order_and_dead_letters_the_rest(
    dsn: str, nats_url: str
) -> None:
    published = await publish_events(
        nats_url, STREAM, "old", messages=400, aggregates=12,
        duplicate_msg_id_every=25, republish_every=20, reject_every=50,
    )  # fmt: skip
    assert published.dropped_by_jetstream == 16
    assert published.republished == 20
    assert len(published.rejected) == 8
    appended_before = sample("aura_import_messages_total", outcome="appended")

    stats = await run_until_end(dsn, nats_url)

    assert (stats.appended, stats.duplicates, stats.rejected) == (
        published.logical,
        published.republished,
        len(published.rejected),
    )
    assert stats.last_sequence == published.stored
    assert stats.lag == 0
    assert sample("aura_import_messages_total", outcome="appended") - appended_before == 400
    assert_imported_exactly_once(dsn, published)

    first = stored_events(dsn)["agg-000"][0]
    assert first["type"] == "THING_STARTED"
    assert first["key"] == first["metadata"]["original_id"].replace("evt", "key")
    assert first["metadata"]["original_version"] == 1
    assert first["metadata"]["producer"] == "old-system"
    assert first["metadata"]["nats_stream"] == STREAM
    assert first["metadata"]["nats_subject"] == "old.agg-000"
    assert first["metadata"]["nats_msg_id"] == first["metadata"]["original_id"].replace(
        "evt", "msg"
    )
    assert isinstance(first["metadata"]["nats_sequence"], int)

    letters = dead_letters(dsn)
    reasons = {letter["sequence"]: letter["reason"] for letter in letters}
    expected_words = {
        "bad JSON": "not JSON",
        "no aggregate_id": "'aggregate_id' is missing",
        "a type the store refuses": "control characters",
        "payload not an object": "'payload' must be an object, not array",
        "idempotency key reused with other data": "the store refused the event",
    }
    for sequence, why in published.rejected.items():
        assert expected_words[why] in reasons[sequence], (why, reasons[sequence])
    bad_json = next(letter for letter in letters if "not JSON" in letter["reason"])
    assert bytes(bad_json["payload"]) == b"{not json"
    assert bad_json["source"] == "nats"
    assert bad_json["stream"] == STREAM
    assert bad_json["headers"]["Nats-Msg-Id"] == bad_json["message_id"]
    assert bad_json["subject"].startswith("old.agg-")

    # A second pass through a new consumer reads everything again: nothing new.
    again = await run_until_end(dsn, nats_url, consumer="second-pass")
    assert (again.appended, again.duplicates, again.rejected) == (0, published.stored, 0)
    assert again.last_sequence == published.stored
    assert_imported_exactly_once(dsn, published)

    # The first consumer has nothing left.
    rest = await run_until_end(dsn, nats_url)
    assert (rest.appended, rest.duplicates, rest.rejected, rest.last_sequence) == (0, 0, 0, None)


async def test_a_message_held_by_a_crashed_consumer_comes_back_before_anything_newer(
    dsn: str, nats_url: str
) -> None:
    published = await publish_events(nats_url, STREAM, "old", messages=30, aggregates=2)
    async with importer(dsn, nats_url, ack_wait=1.0) as first:
        await first.ensure_consumer()
    # A consumer that dies holding the first message: fetched, never acknowledged.
    nc = await nats.connect(nats_url, allow_reconnect=False)
    try:
        crashed = await nc.jetstream().pull_subscribe_bind(durable="aura-import-OLD", stream=STREAM)
        held = await crashed.fetch(1, timeout=2)
        assert held[0].metadata.sequence.stream == 1
    finally:
        await nc.close()

    started = time.monotonic()
    stats = await run_until_end(dsn, nats_url, ack_wait=1.0)
    waited = time.monotonic() - started

    assert stats.appended == 30
    # JetStream delivered nothing newer while sequence 1 waited for its ack wait.
    assert waited > 0.8
    assert_imported_exactly_once(dsn, published)


async def test_a_consumer_with_another_window_is_adjusted_and_other_settings_are_refused(
    dsn: str, nats_url: str
) -> None:
    # Before the window, a consumer allowing more than one unacknowledged
    # message was refused; the importer keeps each aggregate's order itself
    # now, and sets max_ack_pending to its window (consumers made by earlier
    # versions have 1).
    published = await publish_events(nats_url, STREAM, "old", messages=20, aggregates=3)
    nc = await nats.connect(nats_url, allow_reconnect=False)
    try:
        js = nc.jetstream()
        await js.add_consumer(
            STREAM,
            config=ConsumerConfig(
                durable_name="parallel", ack_policy=AckPolicy.EXPLICIT, max_ack_pending=1
            ),
        )
        await js.add_consumer(
            STREAM,
            config=ConsumerConfig(durable_name="acks-all", ack_policy=AckPolicy.ALL),
        )
    finally:
        await nc.close()
    stats = await run_until_end(dsn, nats_url, consumer="parallel", window=64)
    assert stats.appended == 20
    assert_imported_exactly_once(dsn, published)
    nc = await nats.connect(nats_url, allow_reconnect=False)
    try:
        info = await nc.jetstream().consumer_info(STREAM, "parallel")
    finally:
        await nc.close()
    assert info.config.max_ack_pending == 64
    with pytest.raises(ImportConfigError, match="ack policy"):
        await run_until_end(dsn, nats_url, consumer="acks-all")
    with pytest.raises(ImportConfigError, match="subject filter"):
        await run_until_end(dsn, nats_url, consumer="parallel", subject="old.a")
    with pytest.raises(ImportConfigError, match="no stream 'MISSING'"):
        async with NatsImporter(dsn, [nats_url], "MISSING", EventModelMapping()) as missing:
            await missing.run(until_end=True)


async def test_an_append_committed_before_the_crash_is_answered_as_a_duplicate(
    dsn: str, nats_url: str
) -> None:
    published = await publish_events(nats_url, STREAM, "old", messages=5, aggregates=1)
    nc = await nats.connect(nats_url, allow_reconnect=False)
    try:
        raw = await nc.jetstream().get_msg(STREAM, 1)
    finally:
        await nc.close()
    assert raw.subject is not None
    assert raw.data is not None
    message = SourceMessage(STREAM, raw.subject, 1, raw.data, dict(raw.headers or {}))
    # The importer appended, then died before acknowledging.
    async with importer(dsn, nats_url) as crashed:
        assert await crashed.import_message(message) == "appended"

    stats = await run_until_end(dsn, nats_url)
    assert (stats.appended, stats.duplicates) == (4, 1)
    assert_imported_exactly_once(dsn, published)


@pytest.mark.parametrize(
    "retry",
    [AppendRetry(), AppendRetry(attempts=1)],
    ids=["append-retry", "importer-keeps-the-message"],
)
async def test_terminated_database_sessions_are_retried_and_land_once(
    dsn: str, nats_url: str, retry: AppendRetry
) -> None:
    # With attempts=1 the store gives up at once, and the importer itself
    # holds the message and sends the same event again.
    published = await publish_events(
        nats_url, STREAM, "old", messages=600, aggregates=5, reject_every=60
    )
    retries_before = retries_counted()
    running = importer(dsn, nats_url, retry=retry)
    async with running:
        task = asyncio.create_task(running.run(until_end=True))
        terminated = 0
        with psycopg.connect(dsn, autocommit=True) as admin:
            # Six faults, each after the importer made some progress again.
            while not task.done() and terminated < 6:
                before = running.stats.appended
                while not task.done() and running.stats.appended < before + 40:
                    await asyncio.sleep(0.01)
                row = admin.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE application_name = 'aura-pg import' AND datname = current_database()"
                ).fetchone()
                terminated += row[0] if row else 0
        stats = await asyncio.wait_for(task, 120)
    assert terminated >= 4, "the import ended before the faults"
    if retry.attempts > 1:
        assert retries_counted() > retries_before
    else:
        assert retries_counted() == retries_before
    assert stats.appended == published.logical
    assert stats.rejected == len(published.rejected)
    assert_imported_exactly_once(dsn, published)


async def test_lag_is_what_the_consumer_has_left(dsn: str, nats_url: str) -> None:
    await publish_events(nats_url, STREAM, "old", messages=50, aggregates=3)
    async with importer(dsn, nats_url) as running:
        await running.ensure_consumer()
        assert await running.lag() == 50
        assert sample("aura_import_lag_messages") == 50
        stats = await running.run(until_end=True)
    assert stats.lag == 0
    assert sample("aura_import_lag_messages") == 0
    assert stats.appended == 50


async def test_subject_filter_imports_only_what_it_matches(dsn: str, nats_url: str) -> None:
    for aggregate in ("a", "b"):
        body = event_body(1, aggregate, 1)
        await publish(nats_url, f"old.{aggregate}", json.dumps(body).encode(), {})
    stats = await run_until_end(dsn, nats_url, subject="old.b", consumer="only-b")
    assert stats.appended == 1
    assert list(stored_events(dsn)) == ["b"]
    # Without a Nats-Msg-Id or a key in the body the key is the stream sequence.
    body = {k: v for k, v in event_body(2, "c", 1).items() if k not in ("id", "idempotency_key")}
    sequence = await publish(nats_url, "old.c", json.dumps(body).encode(), {})
    stats = await run_until_end(dsn, nats_url, mapping=EventModelMapping("thing-"))
    assert stats.appended == 3
    assert stored_events(dsn)["thing-c"][0]["key"] == f"nats:{STREAM}:{sequence}"


async def test_a_mapping_file(dsn: str, nats_url: str, tmp_path: Path) -> None:
    path = tmp_path / "mapping.yaml"
    path.write_text(
        "stream_id: 'order-{order.id}'\n"
        "type: '{header:Event-Type}'\n"
        "data: body\n"
        "metadata: meta\n"
        "metadata_headers: [Trace-Id]\n"
        "idempotency_key: '{nats:subject:1}/{event_id}'\n"
    )
    mapping = FileMapping.load(path)

    def order(event_id: str, order_id: int, n: int) -> bytes:
        return json.dumps(
            {"event_id": event_id, "order": {"id": order_id}, "body": {"n": n}, "meta": {"m": 1}}
        ).encode()

    headers = {"Event-Type": "ORDER_PLACED", "Trace-Id": "t-1"}
    await publish(nats_url, "old.shop.placed", order("e1", 7, 1), headers)
    await publish(nats_url, "old.shop.placed", order("e2", 7, 2), {"Event-Type": "ORDER_PAID"})
    await publish(nats_url, "old.shop.placed", order("e1", 7, 1), headers)  # same key: duplicate
    await publish(nats_url, "old.shop.placed", order("e3", 8, 3), {})  # no Event-Type header
    await publish(nats_url, "old.shop.placed", b'{"order": {}}', headers)  # no order.id

    stats = await run_until_end(dsn, nats_url, mapping=mapping)

    assert (stats.appended, stats.duplicates, stats.rejected) == (2, 1, 2)
    events = stored_events(dsn)["order-7"]
    assert [(e["type"], e["data"], e["key"]) for e in events] == [
        ("ORDER_PLACED", {"n": 1}, "shop/e1"),
        ("ORDER_PAID", {"n": 2}, "shop/e2"),
    ]
    assert events[0]["metadata"]["m"] == 1
    assert events[0]["metadata"]["Trace-Id"] == "t-1"
    assert "Trace-Id" not in events[1]["metadata"]
    assert [letter["reason"] for letter in dead_letters(dsn)] == [
        "rejected by the mapping: header 'Event-Type' is missing",
        "rejected by the mapping: field 'order.id' is missing",
    ]


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ({"type": "T"}, "'stream_id' is required"),
        ({"stream_id": "s", "type": "T", "extra": 1}, "unknown keys extra"),
        ({"stream_id": "s-{id", "type": "T"}, "unmatched '{'"),
        ({"stream_id": "s-{nats:seq}", "type": "T"}, "unknown placeholder"),
        ({"stream_id": "s-{a b}", "type": "T"}, "is not a field path"),
        ({"stream_id": "s", "type": "T", "data": "a..b"}, "is not a field path"),
        ({"stream_id": "s", "type": "T", "metadata_headers": "X"}, "list of header names"),
        (["stream_id"], "a mapping is a YAML object"),
    ],
)
def test_mapping_file_errors(spec: object, error: str) -> None:
    with pytest.raises(ImportConfigError, match=error):
        FileMapping.from_dict(spec)


def test_template_braces_and_subject_tokens() -> None:
    mapping = FileMapping.from_dict(
        {"stream_id": "{{x}}-{nats:subject:2}-{nats:sequence}", "type": "{kind}"}
    )
    message = SourceMessage(STREAM, "old.a.b", 9, b'{"kind": "K", "v": 1}', {})
    event = mapping(message)
    assert (event.stream_id, event.type, event.data, event.idempotency_key) == (
        "{x}-b-9", "K", {"kind": "K", "v": 1}, None,
    )  # fmt: skip
    with pytest.raises(RejectedMessage, match="no token 3"):
        FileMapping.from_dict({"stream_id": "{nats:subject:3}", "type": "T"})(message)


async def test_a_python_mapping(
    dsn: str, nats_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "legacy_mapping_integration.py").write_text(
        "from aura_pg.importer import ImportedEvent, RejectedMessage\n"
        "\n"
        "def to_event(message):\n"
        "    body = message.json_object()\n"
        "    if body.get('skip'):\n"
        "        raise RejectedMessage('told to skip')\n"
        "    if body.get('dict'):\n"
        "        return {'stream_id': 's', 'type': 'T', 'data': {}}\n"
        "    return ImportedEvent('legacy-' + body['who'], body['what'].upper(),\n"
        "                         {'seq': message.sequence}, {'from': message.subject})\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    mapping = load_callable("legacy_mapping_integration:to_event")
    await publish(nats_url, "old.x", b'{"who": "ann", "what": "joined"}', {"Nats-Msg-Id": "m1"})
    await publish(nats_url, "old.x", b'{"skip": true}', {})
    await publish(nats_url, "old.x", b'{"who": "bob"}', {})  # KeyError in the mapping
    await publish(nats_url, "old.x", b'{"dict": true}', {})
    await publish(nats_url, "old.x", b'{"who": "ann", "what": "left"}', {})

    stats = await run_until_end(dsn, nats_url, mapping=mapping)

    assert (stats.appended, stats.rejected) == (2, 3)
    events = stored_events(dsn)["legacy-ann"]
    assert [(e["type"], e["data"], e["key"]) for e in events] == [
        ("JOINED", {"seq": 1}, "m1"),
        ("LEFT", {"seq": 5}, f"nats:{STREAM}:5"),
    ]
    assert events[0]["metadata"]["from"] == "old.x"
    assert [letter["reason"] for letter in dead_letters(dsn)] == [
        "rejected by the mapping: told to skip",
        "the mapping raised KeyError: 'what'",
        "the mapping returned dict, not an ImportedEvent",
    ]

    for spec, error in [
        ("no_colon", "expected MODULE:FUNCTION"),
        ("legacy_mapping_absent_module:f", "cannot import"),
        ("legacy_mapping_integration:absent", "has no absent"),
        ("legacy_mapping_integration:ImportedEvent.__doc__", "is not callable"),
    ]:
        with pytest.raises(ImportConfigError, match=error):
            load_callable(spec)


async def test_unreachable_nats_is_a_clear_error(dsn: str) -> None:
    from aura_pg.devtools.localdb import free_port

    unreachable = NatsImporter(
        dsn, [f"nats://127.0.0.1:{free_port()}"], STREAM, EventModelMapping(), connect_timeout=1
    )
    with pytest.raises(SourceUnavailable, match="cannot connect to NATS"):
        async with unreachable:
            pass


def test_dead_letters_belong_to_the_owner_and_the_writer_records_them(dsn: str) -> None:
    insert = (
        "INSERT INTO aura.import_dead_letters"
        " (source, stream, subject, sequence, payload, reason, content_hash)"
        " VALUES ('nats', 'S', 's.x', 1, '\\x00ff', 'r', '\\x01') ON CONFLICT DO NOTHING"
        " RETURNING id"
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        owner = conn.execute(
            "SELECT pg_get_userbyid(relowner) FROM pg_class"
            " WHERE oid = 'aura.import_dead_letters'::regclass"
        ).fetchone()
        assert owner == ("aura_owner",)
        conn.execute("SET ROLE aura_writer")
        assert conn.execute(insert).fetchone() is not None
        assert conn.execute(insert).fetchone() is None  # once per sequence and content
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM aura.import_dead_letters")
        for role in ("aura_projector", "aura_reader"):
            conn.execute(f"SET ROLE {role}")  # type: ignore[arg-type]
            row = conn.execute("SELECT payload FROM aura.import_dead_letters").fetchone()
            assert row is not None
            assert bytes(row[0]) == b"\x00\xff"
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(insert.replace("1, '", "2, '"))  # type: ignore[arg-type]
        conn.execute("RESET ROLE")
        public = conn.execute(
            "SELECT has_table_privilege('public', 'aura.import_dead_letters', 'SELECT')"
        ).fetchone()
        assert public == (False,)


# -- a stream deleted and created again under its name -----------


async def recreate_stream(url: str) -> None:
    """Delete the stream and create it again: its sequences start over at 1."""
    nc = await nats.connect(url, allow_reconnect=False)
    try:
        js = nc.jetstream()
        await js.delete_stream(STREAM)
        await js.add_stream(name=STREAM, subjects=["old.>"])
    finally:
        await nc.close()


def body(aggregate: str, n: int) -> bytes:
    """An event without a key of its own (no id, no idempotency_key)."""
    return json.dumps({"type": "T", "aggregate_id": aggregate, "payload": {"n": n}}).encode()


async def test_a_reject_in_a_recreated_stream_is_dead_lettered_too(dsn: str, nats_url: str) -> None:
    assert await publish(nats_url, "old.x", b"first {not json", {}) == 1
    first = await run_until_end(dsn, nats_url)
    assert (first.appended, first.duplicates, first.rejected) == (0, 0, 1)

    await recreate_stream(nats_url)
    assert await publish(nats_url, "old.x", b"second {not json", {}) == 1
    second = await run_until_end(dsn, nats_url)
    # Before 0009 this was a "duplicate": acknowledged and recorded nowhere.
    assert (second.appended, second.duplicates, second.rejected) == (0, 0, 1)
    letters = dead_letters(dsn)
    assert [(letter["sequence"], bytes(letter["payload"])) for letter in letters] == [
        (1, b"first {not json"),
        (1, b"second {not json"),
    ]

    # The same message delivered again (a new consumer) is still stored once.
    again = await run_until_end(dsn, nats_url, consumer="again")
    assert (again.appended, again.duplicates, again.rejected) == (0, 1, 0)
    assert len(dead_letters(dsn)) == 2


async def test_sequence_keys_of_a_recreated_stream_do_not_meet_the_old_ones(
    dsn: str, nats_url: str
) -> None:
    """Messages without a key of their own are keyed by their sequence. A
    recreated stream's sequence 1 is a new event, whether its content equals
    the old sequence 1 (it was answered as a duplicate) or not (refused as an
    idempotency conflict); keys imported from the first life stay valid."""
    for n in (1, 2):
        await publish(nats_url, "old.a", body("a-1", n), {})
    first = await run_until_end(dsn, nats_url)
    assert (first.appended, first.duplicates, first.rejected) == (2, 0, 0)
    assert [e["key"] for e in stored_events(dsn)["a-1"]] == ["nats:OLD:1", "nats:OLD:2"]

    # A database upgraded from migration 0008 knows no life of the stream
    # yet: the life it imports first keeps the plain keys it imported with.
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM aura.import_stream_lives")
    rerun = await run_until_end(dsn, nats_url, consumer="rerun")
    assert (rerun.appended, rerun.duplicates, rerun.rejected) == (0, 2, 0)

    await recreate_stream(nats_url)
    await publish(nats_url, "old.a", body("a-1", 1), {})  # as the old sequence 1
    await publish(nats_url, "old.a", body("a-1", 3), {})  # other data than the old 2
    second = await run_until_end(dsn, nats_url)
    assert (second.appended, second.duplicates, second.rejected) == (2, 0, 0)
    assert dead_letters(dsn) == []
    events = stored_events(dsn)["a-1"]
    assert [e["data"] for e in events] == [{"n": 1}, {"n": 2}, {"n": 1}, {"n": 3}]
    with psycopg.connect(dsn) as conn:
        lives = conn.execute(
            "SELECT created, plain_keys FROM aura.import_stream_lives"
            " WHERE source = 'nats' AND stream = %s ORDER BY first_seen_at",
            (STREAM,),
        ).fetchall()
    assert [plain for _, plain in lives] == [True, False]
    created = lives[1][0].astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert [e["key"] for e in events[2:]] == [f"nats:OLD@{created}:1", f"nats:OLD@{created}:2"]
    assert events[2]["metadata"]["nats_stream_created"] == created

    # The second life read again: duplicates, under its own keys.
    again = await run_until_end(dsn, nats_url, consumer="again")
    assert (again.appended, again.duplicates, again.rejected) == (0, 2, 0)
    assert len(stored_events(dsn)["a-1"]) == 4


def test_upgrading_from_0008_keeps_old_dead_letters_deduplicated(empty_dsn: str) -> None:
    """Migration 0009 hashes the dead letters recorded before it as the
    importer hashes a message, so an old reject delivered again is still
    stored once, while another message at its sequence is stored too."""
    from psycopg.types.json import Jsonb

    from aura_pg import migrate
    from aura_pg.importer.store import _QUERIES

    migrate.upgrade(empty_dsn, "0008")
    headers = {"Nats-Msg-Id": "m-1", "Ünï": "cödé"}
    params = {
        "source": "nats", "stream": STREAM, "subject": "old.x", "sequence": 1,
        "message_id": "m-1", "headers": Jsonb(headers), "payload": b"{bad \xff",
        "reason": "rejected by the mapping: x",
    }  # fmt: skip
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        # The table as migration 0008 made it (a fresh install runs today's file).
        conn.execute("ALTER TABLE aura.import_dead_letters DROP CONSTRAINT import_dead_letter_once")
        conn.execute("ALTER TABLE aura.import_dead_letters DROP COLUMN content_hash")
        conn.execute(
            "ALTER TABLE aura.import_dead_letters"
            " ADD CONSTRAINT import_dead_letter_once UNIQUE (source, stream, sequence)"
        )
        conn.execute(
            "INSERT INTO aura.import_dead_letters"
            " (source, stream, subject, sequence, message_id, headers, payload, reason)"
            " VALUES (%(source)s, %(stream)s, %(subject)s, %(sequence)s, %(message_id)s,"
            " %(headers)s, %(payload)s, %(reason)s)",
            params,
        )
    migrate.upgrade(empty_dsn)
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert conn.execute(_QUERIES["record_dead_letter"], params).fetchone() is None
        other = {**params, "payload": b"another message at sequence 1"}
        assert conn.execute(_QUERIES["record_dead_letter"], other).fetchone() is not None
        rows = conn.execute(
            "SELECT sequence, octet_length(content_hash) FROM aura.import_dead_letters"
        ).fetchall()
    assert rows == [(1, 32), (1, 32)]


# -- the window: many messages in flight ------------------------------------


def transactions_by_stream(dsn: str) -> tuple[dict[str, list[int]], list[str]]:
    """Per stream, the writing transaction of each event (version order);
    and the stream of each event in log order."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT stream_id, transaction_id::text::bigint FROM aura.events"
            " ORDER BY global_position"
        ).fetchall()
    by_stream: dict[str, list[int]] = {}
    for stream_id, transaction in rows:
        by_stream.setdefault(stream_id, []).append(transaction)
    return by_stream, [stream_id for stream_id, _ in rows]


async def test_each_aggregate_keeps_its_order_with_many_messages_in_flight(
    dsn: str, nats_url: str
) -> None:
    published = await publish_events(
        nats_url, STREAM, "old", messages=3000, aggregates=150,
        duplicate_msg_id_every=35, republish_every=25, reject_every=70,
    )  # fmt: skip
    stats = await run_until_end(dsn, nats_url, window=600, concurrent_appends=6)

    assert (stats.appended, stats.duplicates, stats.rejected) == (
        published.logical,
        published.republished,
        len(published.rejected),
    )
    assert stats.last_sequence == published.stored
    assert stats.lag == 0
    assert_imported_exactly_once(dsn, published)
    # In flight together: several events of one aggregate in one append
    # (one transaction), and the aggregates' appends interleaved in the log.
    by_stream, log_order = transactions_by_stream(dsn)
    batched = sum(len(t) - len(set(t)) for t in by_stream.values())
    assert batched > 100, batched
    switches = sum(1 for a, b in itertools.pairwise(log_order) if a != b)
    assert switches > 150, switches
    # The consumer allows the window.
    nc = await nats.connect(nats_url, allow_reconnect=False)
    try:
        info = await nc.jetstream().consumer_info(STREAM, "aura-import-OLD")
    finally:
        await nc.close()
    assert info.config.max_ack_pending == 600


async def test_a_failed_append_is_not_acknowledged_and_comes_back_in_order(
    dsn: str, nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A database error that is not transient stops the import: the message
    whose append failed, and every later message of its aggregate, are not
    acknowledged; the next run gets them again (after the ack wait, behind
    the barrier) and the log ends up whole and in order."""
    published = await publish_events(nats_url, STREAM, "old", messages=1200, aggregates=30)
    failing = "agg-007"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION public.refuse_one() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN IF NEW.stream_id = 'agg-007'"
            " AND (NEW.metadata->>'original_version')::int = 12 THEN"
            " RAISE EXCEPTION 'refused by the test' USING ERRCODE = '42501'; END IF;"
            " RETURN NEW; END $$"
        )
        conn.execute(
            "CREATE TRIGGER refuse_one BEFORE INSERT ON aura.events"
            " FOR EACH ROW EXECUTE FUNCTION public.refuse_one()"
        )
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        await run_until_end(dsn, nats_url, ack_wait=1.0, window=300)
    stored = stored_events(dsn).get(failing, [])
    versions = [e["metadata"]["original_version"] for e in stored]
    assert versions == list(range(1, len(versions) + 1))
    assert len(versions) < 12
    nc = await nats.connect(nats_url, allow_reconnect=False)
    try:
        info = await nc.jetstream().consumer_info(STREAM, "aura-import-OLD")
    finally:
        await nc.close()
    assert (info.num_ack_pending or 0) > 0
    assert info.ack_floor.stream_seq < published.stored

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TRIGGER refuse_one ON aura.events")
    imported_before = sum(len(events) for events in stored_events(dsn).values())
    with caplog.at_level("DEBUG", logger="aura_pg.importer"):
        stats = await run_until_end(dsn, nats_url, ack_wait=1.0, window=300)
    assert stats.appended == published.logical - imported_before
    assert_imported_exactly_once(dsn, published)
    # The message refused the first time was delivered again.
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT (metadata->>'nats_sequence')::bigint FROM aura.events"
            " WHERE stream_id = %s AND (metadata->>'original_version')::int = 12",
            (failing,),
        ).fetchone()
    assert row is not None
    assert f"sequence {row[0]} delivered 2 times: appended" in caplog.text
    assert "appending resumes once JetStream has delivered them again" in caplog.text


async def test_deliveries_taken_by_another_client_hold_the_appends_until_they_come_back(
    dsn: str, nats_url: str
) -> None:
    """Messages of the consumer delivered elsewhere (a second client that
    fetches and dies) leave a gap in the delivery sequence: the importer
    stops appending until they are back, so no aggregate's later event
    overtakes them."""
    published = await publish_events(nats_url, STREAM, "old", messages=2000, aggregates=10)
    running = importer(dsn, nats_url, ack_wait=1.0, window=40, concurrent_appends=2)
    async with running:
        task = asyncio.create_task(running.run(until_end=True))
        while not task.done() and running.stats.appended < 200:
            await asyncio.sleep(0.01)
        nc = await nats.connect(nats_url, allow_reconnect=False)
        try:
            other = await nc.jetstream().pull_subscribe_bind(
                durable="aura-import-OLD", stream=STREAM
            )
            taken = await other.fetch(5, timeout=2)
        finally:
            await nc.close()
        stats = await asyncio.wait_for(task, 120)
    assert len(taken) == 5
    assert stats.appended == published.logical
    assert_imported_exactly_once(dsn, published)
