"""Appending: versions, optimistic concurrency, idempotency, atomicity."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest
from pydantic import BaseModel

from aura_pg import (
    ANY,
    NO_STREAM,
    STREAM_EXISTS,
    ConcurrencyError,
    EventStore,
    EventValidationError,
    IdempotencyConflict,
    NewEvent,
)
from tests.helpers.store_drivers import StoreDriver, sync_only


def count_events(store: EventStore, stream_id: str | None = None) -> int:
    with store.pool.connection() as conn:
        if stream_id is None:
            row = conn.execute("SELECT count(*) FROM aura.events").fetchone()
        else:
            row = conn.execute(
                "SELECT count(*) FROM aura.events WHERE stream_id = %s", (stream_id,)
            ).fetchone()
    assert row is not None
    return int(row[0])


def event(n: int = 0, **kwargs: Any) -> NewEvent:
    return NewEvent(type=kwargs.pop("type", "THING_HAPPENED"), data={"n": n}, **kwargs)


def test_first_append_starts_the_stream_at_version_1(store: EventStore) -> None:
    result = store.append("s-1", [event(1), event(2), event(3)], NO_STREAM)
    assert [e.version for e in result.events] == [1, 2, 3]
    assert not result.duplicate
    assert result.version == 3
    positions = [e.global_position for e in result.events]
    assert positions == sorted(positions)
    assert store.stream_version("s-1") == 3
    assert store.stream_version("never-written") == 0


def test_appended_events_read_back_exactly(store: EventStore) -> None:
    first = NewEvent(
        "DEBATE_STARTED",
        {"topic": "ünïcode ✓", "nested": {"list": [1, 2.5, None, True]}},
        metadata={"correlation_id": "c-1", "actor": "agent-7"},
        idempotency_key="start-1",
    )
    result = store.append("debate-1", first)
    (recorded,) = store.read_stream("debate-1")
    assert recorded.event_id == first.event_id == result.events[0].event_id
    assert recorded.type == "DEBATE_STARTED"
    assert recorded.data == first.data
    assert recorded.metadata == first.metadata
    assert recorded.idempotency_key == "start-1"
    assert recorded.version == 1
    assert recorded.global_position == result.events[0].global_position
    assert recorded.recorded_at.tzinfo is not None


def test_pydantic_payloads_are_stored_as_json(store: EventStore) -> None:
    class Started(BaseModel):
        topic: str
        agents: list[str]

    store.append("debate-p", NewEvent("DEBATE_STARTED", Started(topic="t", agents=["a", "b"])))
    (recorded,) = store.read_stream("debate-p")
    assert recorded.data == {"topic": "t", "agents": ["a", "b"]}


@pytest.mark.parametrize(
    ("expected", "stream_exists", "ok"),
    [
        (ANY, False, True),
        (ANY, True, True),
        (NO_STREAM, False, True),
        (NO_STREAM, True, False),
        (0, False, True),
        (0, True, False),
        (STREAM_EXISTS, False, False),
        (STREAM_EXISTS, True, True),
        (2, True, True),
        (1, True, False),
        (3, True, False),
        (1, False, False),
    ],
)
def test_expected_version(store: EventStore, expected: Any, stream_exists: bool, ok: bool) -> None:
    if stream_exists:
        store.append("s", [event(1), event(2)])
    before = count_events(store)
    if ok:
        result = store.append("s", event(3), expected)
        assert result.version == (3 if stream_exists else 1)
        assert count_events(store) == before + 1
    else:
        with pytest.raises(ConcurrencyError) as info:
            store.append("s", event(3), expected)
        assert info.value.stream_id == "s"
        assert info.value.expected == expected
        assert info.value.actual == (2 if stream_exists else 0)
        assert count_events(store) == before
        assert store.stream_version("s") == (2 if stream_exists else 0)


def test_retry_with_same_keys_is_a_harmless_duplicate(store: EventStore) -> None:
    batch = [event(1, idempotency_key="k1"), event(2, idempotency_key="k2")]
    first = store.append("s", batch, NO_STREAM)
    store.append("s", event(3))  # the stream moves on
    # The retry carries new event ids and new metadata (a new trace) and an
    # expected version that is stale by now: still a duplicate.
    retry = [
        NewEvent("THING_HAPPENED", {"n": 1}, metadata={"traceparent": "x"}, idempotency_key="k1"),
        NewEvent("THING_HAPPENED", {"n": 2}, idempotency_key="k2"),
    ]
    again = store.append("s", retry, NO_STREAM)
    assert again.duplicate
    assert again.events == first.events
    assert count_events(store, "s") == 3
    assert store.stream_version("s") == 3


def test_retrying_the_same_new_event_objects_is_a_duplicate(store: EventStore) -> None:
    batch = [event(1), event(2)]  # keys default to the event ids
    first = store.append("s", batch)
    again = store.append("s", batch)
    assert again.duplicate and again.events == first.events
    assert count_events(store) == 2


def test_same_key_with_other_data_is_a_conflict(store: EventStore) -> None:
    store.append("s", event(1, idempotency_key="k"))
    with pytest.raises(IdempotencyConflict) as info:
        store.append("s", event(99, idempotency_key="k"))
    assert info.value.stream_id == "s"
    assert count_events(store) == 1


def test_same_key_with_other_type_is_a_conflict(store: EventStore) -> None:
    store.append("s", event(1, idempotency_key="k"))
    with pytest.raises(IdempotencyConflict):
        store.append("s", event(1, idempotency_key="k", type="OTHER_THING"))
    assert count_events(store) == 1


def test_batch_mixing_recorded_and_new_keys_is_a_conflict(store: EventStore) -> None:
    store.append("s", event(1, idempotency_key="k1"))
    with pytest.raises(IdempotencyConflict, match="1 of 2"):
        store.append("s", [event(1, idempotency_key="k1"), event(2, idempotency_key="k2")])
    assert count_events(store) == 1
    assert store.stream_version("s") == 1


def test_idempotency_keys_are_scoped_to_their_stream(store: EventStore) -> None:
    a = store.append("a", event(1, idempotency_key="k"))
    b = store.append("b", event(1, idempotency_key="k"))
    assert not a.duplicate and not b.duplicate
    assert count_events(store) == 2


def test_event_id_recorded_in_another_stream_is_a_conflict(store: EventStore) -> None:
    shared_id = uuid.uuid4()
    store.append("a", NewEvent("T", {}, event_id=shared_id))
    with pytest.raises(IdempotencyConflict):
        store.append("b", NewEvent("T", {}, event_id=shared_id))
    assert count_events(store) == 1


def test_batch_is_all_or_nothing(store: EventStore, dsn: str) -> None:
    store.append("a", NewEvent("T", {}, event_id=(taken := uuid.uuid4())))
    with pytest.raises(IdempotencyConflict):
        store.append("b", [event(1), event(2), NewEvent("T", {"x": 1}, event_id=taken)])
    assert count_events(store, "b") == 0
    assert store.stream_version("b") == 0


def test_append_in_the_callers_transaction_commits_with_it(store: EventStore) -> None:
    with store.pool.connection() as conn:
        conn.execute("CREATE TABLE orders (id int PRIMARY KEY)")
        conn.commit()
        with conn.transaction():
            conn.execute("INSERT INTO orders VALUES (1)")
            store.append("order-1", event(1), NO_STREAM, conn=conn)
            assert store.stream_version("order-1", conn=conn) == 1
            assert store.stream_version("order-1") == 0  # not committed yet
        assert store.stream_version("order-1") == 1


def test_append_in_the_callers_transaction_rolls_back_with_it(store: EventStore) -> None:
    with store.pool.connection() as conn:
        conn.execute("CREATE TABLE orders (id int PRIMARY KEY)")
        conn.commit()

        class Abort(Exception):
            pass

        with pytest.raises(Abort), conn.transaction():
            conn.execute("INSERT INTO orders VALUES (1)")
            store.append("order-1", event(1), NO_STREAM, conn=conn)
            raise Abort
        row = conn.execute("SELECT count(*) FROM orders").fetchone()
        assert row == (0,)
    assert store.stream_version("order-1") == 0
    assert count_events(store) == 0


def test_a_failed_append_in_the_callers_transaction_leaves_nothing(store: EventStore) -> None:
    store.append("s", event(1))
    with store.pool.connection() as conn:
        with pytest.raises(ConcurrencyError), conn.transaction():
            conn.execute("CREATE TABLE business (x int)")
            store.append("s", event(2), NO_STREAM, conn=conn)
        assert conn.execute("SELECT to_regclass('business')").fetchone() == (None,)


@sync_only
def test_events_table_refuses_update_delete_truncate(store: EventStore) -> None:
    store.append("s", event(1))
    with store.pool.connection() as conn:
        for statement in (
            "UPDATE aura.events SET type = 'X'",
            "DELETE FROM aura.events",
            "TRUNCATE aura.events",
            "DELETE FROM aura.events WHERE false",
        ):
            with pytest.raises(psycopg.Error, match="append-only") as info, conn.transaction():
                conn.execute(statement)  # type: ignore[arg-type]
            assert info.value.sqlstate == "AU004"
    assert count_events(store) == 1


@sync_only
def test_streams_are_read_from_the_log_and_cannot_be_changed(store: EventStore) -> None:
    """aura.streams is a view of the log: a stream's version is its last
    event's, and nothing can change or remove it but the log itself."""
    store.append("s", [event(1), event(2)])
    store.append("t", event(3))
    with store.pool.connection() as conn:
        rows = conn.execute("SELECT stream_id, version FROM aura.streams ORDER BY 1").fetchall()
        assert rows == [("s", 2), ("t", 1)]
        for statement in (
            "DELETE FROM aura.streams",
            "TRUNCATE aura.streams",
            "UPDATE aura.streams SET version = 9",
            "INSERT INTO aura.streams (stream_id, version) VALUES ('u', 1)",
        ):
            with pytest.raises(psycopg.Error) as info, conn.transaction():
                conn.execute(statement)  # type: ignore[arg-type]
            assert info.value.sqlstate in ("55000", "42809"), statement  # not updatable
    assert store.stream_version("s") == 2


def test_payload_limit_is_configurable(driver: StoreDriver, dsn: str) -> None:
    with driver.connect(dsn, max_payload_bytes=100) as small:
        small.append("s", NewEvent("T", {"text": "x" * 50}))
        with pytest.raises(EventValidationError, match="over the limit of 100"):
            small.append("s", NewEvent("T", {"text": "x" * 200}))
        with pytest.raises(EventValidationError, match="metadata"):
            small.append("s", NewEvent("T", {}, metadata={"text": "x" * 200}))
        assert small.stream_version("s") == 1


def test_default_payload_limit_is_one_mebibyte(store: EventStore) -> None:
    store.append("s", NewEvent("T", {"text": "x" * (1024 * 1024 - 100)}))
    with pytest.raises(EventValidationError):
        store.append("s", NewEvent("T", {"text": "x" * (1024 * 1024)}))
    assert store.stream_version("s") == 1
