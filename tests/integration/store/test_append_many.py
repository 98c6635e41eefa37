"""The bulk path: EventStore.append_many and aura.append_many, with the
guarantees of a single append for every stream and all or nothing per
chunk (one transaction)."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import psycopg
import pytest

from aura_pg import (
    ANY,
    NO_STREAM,
    STREAM_EXISTS,
    ConcurrencyError,
    EventStore,
    EventValidationError,
    IdempotencyConflict,
    NewEvent,
    StreamAppend,
)
from tests.helpers.projections import query
from tests.helpers.store_drivers import StoreDriver
from tests.integration.store.test_append import count_events


def events(n: int, *, prefix: str = "e", **kwargs: Any) -> list[NewEvent]:
    return [NewEvent(type="THING_HAPPENED", data={"n": i, "p": prefix}, **kwargs) for i in range(n)]


def log(dsn: str) -> list[tuple[Any, ...]]:
    return query(
        dsn,
        "SELECT stream_id, version, event_id, type, data, metadata, idempotency_key"
        " FROM aura.events ORDER BY transaction_id, global_position",
    )


def test_many_streams_in_one_call(store: EventStore, dsn: str) -> None:
    store.append("s-2", events(2))
    appends = [
        StreamAppend("s-1", events(3), NO_STREAM),
        StreamAppend("s-2", events(2, prefix="more"), 2),
        StreamAppend("s-3", events(1)),
    ]
    results = store.append_many(appends)
    assert [r.stream_id for r in results] == ["s-1", "s-2", "s-3"]
    assert [[e.version for e in r.events] for r in results] == [[1, 2, 3], [3, 4], [1]]
    assert not any(r.duplicate for r in results)
    for append, result in zip(appends, results, strict=True):
        assert [e.event_id for e in result.events] == [e.event_id for e in append.events]  # type: ignore[union-attr]
        recorded = store.read_stream(append.stream_id)
        assert [
            (e.event_id, e.version, e.global_position) for e in recorded[-len(result.events) :]
        ] == [(e.event_id, e.version, e.global_position) for e in result.events]
    # One transaction, in call order.
    rows = query(
        dsn,
        "SELECT count(DISTINCT transaction_id) FROM aura.events WHERE global_position > %s",
        (results[0].events[0].global_position - 1,),
    )
    assert rows == [(1,)]
    positions = [e.global_position for r in results for e in r.events]
    assert positions == sorted(positions)


def test_a_resent_call_is_answered_as_duplicates(store: EventStore, dsn: str) -> None:
    appends = [StreamAppend(f"r-{i}", events(3, idempotency_key=None), NO_STREAM) for i in range(4)]
    appends.append(
        StreamAppend("r-keys", [NewEvent("T", {"k": i}, idempotency_key=f"k{i}") for i in range(3)])
    )
    first = store.append_many(appends)
    before = log(dsn)
    again = store.append_many(appends)
    assert log(dsn) == before
    assert all(r.duplicate for r in again)
    assert [r.events for r in again] == [r.events for r in first]
    # The same keys with new event ids (a resend built again) too.
    rebuilt = [
        StreamAppend("r-keys", [NewEvent("T", {"k": i}, idempotency_key=f"k{i}") for i in range(3)])
    ]
    assert store.append_many(rebuilt)[0].duplicate
    assert log(dsn) == before


def test_a_conflict_anywhere_writes_nothing(store: EventStore, dsn: str) -> None:
    store.append("c-1", [NewEvent("T", {"a": 1}, idempotency_key="k")])
    before = log(dsn)
    with pytest.raises(IdempotencyConflict) as conflict:
        store.append_many(
            [
                StreamAppend("c-0", events(5)),
                StreamAppend("c-1", [NewEvent("T", {"a": 2}, idempotency_key="k")]),
                StreamAppend("c-2", events(5)),
            ]
        )
    assert conflict.value.stream_id == "c-1"
    # Recorded and new keys in one stream's batch.
    with pytest.raises(IdempotencyConflict):
        store.append_many(
            [
                StreamAppend("c-0", events(5)),
                StreamAppend(
                    "c-1",
                    [NewEvent("T", {"a": 1}, idempotency_key="k"), NewEvent("T", {})],
                    ANY,
                ),
            ]
        )
    assert log(dsn) == before


@pytest.mark.parametrize(
    ("expected", "exists"),
    [(NO_STREAM, True), (STREAM_EXISTS, False), (3, True), (1, False), (0, True)],
)
def test_expected_versions_refuse_the_whole_call(
    store: EventStore, dsn: str, expected: Any, exists: bool
) -> None:
    if exists:
        store.append("v-1", events(2))
    before = log(dsn)
    with pytest.raises(ConcurrencyError) as refused:
        store.append_many(
            [StreamAppend("v-0", events(2), NO_STREAM), StreamAppend("v-1", events(1), expected)]
        )
    assert refused.value.stream_id == "v-1"
    assert refused.value.actual == (2 if exists else 0)
    assert log(dsn) == before


def test_invalid_input_is_a_typed_error_and_writes_nothing(store: EventStore, dsn: str) -> None:
    before = log(dsn)
    shared = NewEvent("T", {})
    bad: list[list[StreamAppend]] = [
        [StreamAppend("ok", events(1)), StreamAppend("", events(1))],
        [StreamAppend("ok", events(1)), StreamAppend("ok", events(1))],
        [StreamAppend("ok", events(1)), StreamAppend("b", [])],
        [StreamAppend("ok", events(1)), StreamAppend("b", [NewEvent("x" * 201, {})])],
        [StreamAppend("ok", events(1)), StreamAppend("b", [NewEvent("T", {"x": "\u0000"})])],
        [StreamAppend("a", [shared]), StreamAppend("b", [shared])],
        [StreamAppend("ok", events(1)), StreamAppend("b", events(1), -1)],
    ]
    for call in bad:
        with pytest.raises(EventValidationError):
            store.append_many(call)
    with pytest.raises(EventValidationError):
        store.append_many([("s", events(1))])  # type: ignore[list-item]
    assert log(dsn) == before


@pytest.mark.parametrize(
    ("batches", "message"),
    [
        ('{"[{\\"type\\": \\"T\\", \\"data\\": []}]"}', "data must be a JSON object"),
        ('{"[{\\"type\\": 1, \\"data\\": {}}]"}', "type must be a string"),
        ('{"[]"}', "non-empty JSON array"),
        ('{"[{\\"type\\": \\"T\\", \\"data\\": {}, \\"event_id\\": \\"x\\"}]"}', "uuid"),
    ],
)
def test_the_function_checks_what_it_is_given(dsn: str, batches: str, message: str) -> None:
    """aura.append_many called directly (as SQL clients may): AU003 or the
    uuid type's own error, nothing written."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as failed:
            conn.execute(
                "SELECT * FROM aura.append_many(ARRAY['ok', 'bad'], ARRAY['any', 'any'],"
                ' ARRAY[\'[{"type": "T", "data": {}}]\'::jsonb] || %s::jsonb[])',
                (batches,),
            )
        assert failed.value.sqlstate in ("AU003", "22P02")
        assert message in str(failed.value)
        with pytest.raises(psycopg.Error) as too_long:
            conn.execute(
                "SELECT * FROM aura.append_many(ARRAY['ok'], ARRAY['any'],"
                " ARRAY[jsonb_build_array(jsonb_build_object("
                "'type', repeat('x', 201), 'data', '{}'::jsonb))])"
            )
        assert too_long.value.sqlstate == "23514"
        with pytest.raises(psycopg.Error) as repeated:
            conn.execute(
                "SELECT * FROM aura.append_many(ARRAY['a', 'b'], ARRAY['any', 'any'],"
                ' ARRAY[\'[{"type": "T", "data": {},'
                ' "event_id": "00000000-0000-0000-0000-000000000001"}]\'::jsonb,'
                ' \'[{"type": "T", "data": {},'
                ' "event_id": "00000000-0000-0000-0000-000000000001"}]\'::jsonb])'
            )
        assert repeated.value.sqlstate == "AU003"
        assert conn.execute("SELECT count(*) FROM aura.events").fetchone() == (0,)


def test_chunks_commit_one_by_one_and_a_resend_completes(store: EventStore, dsn: str) -> None:
    store.append("k-4", events(1))  # k-4 will be refused (NO_STREAM)
    appends = [StreamAppend(f"k-{i}", events(3), NO_STREAM) for i in range(6)]
    with pytest.raises(ConcurrencyError):
        store.append_many(appends, chunk_streams=2)
    # Chunks (k-0, k-1) and (k-2, k-3) committed; (k-4, k-5) did not.
    assert [count_events(store, f"k-{i}") for i in range(6)] == [3, 3, 3, 3, 1, 0]
    appends[4] = StreamAppend("k-4", events(3), 1)
    results = store.append_many(appends, chunk_streams=2, chunk_events=5)
    assert [r.duplicate for r in results] == [True, True, True, True, False, False]
    assert [count_events(store, f"k-{i}") for i in range(6)] == [3, 3, 3, 3, 4, 3]


def test_in_the_callers_transaction(store: EventStore, driver: StoreDriver, dsn: str) -> None:
    with driver.connection(dsn) as conn:
        store.append_many(
            [StreamAppend("t-1", events(2)), StreamAppend("t-2", events(2))], conn=conn
        )
        conn.rollback()
    assert count_events(store) == 0
    with driver.connection(dsn) as conn:
        results = store.append_many([StreamAppend("t-1", events(2))], conn=conn)
        conn.commit()
    assert results[0].version == 2 and count_events(store) == 2
    with driver.connection(dsn) as conn, pytest.raises(EventValidationError):
        store.append_many(
            [StreamAppend(f"t-{i}", events(1)) for i in range(3)], conn=conn, chunk_streams=2
        )


def test_a_borrowed_pool_without_autocommit(driver: StoreDriver, dsn: str) -> None:
    with driver.pool(dsn) as pool:
        borrowed = driver.borrow(pool)
        results = borrowed.append_many(
            [StreamAppend("p-1", events(2)), StreamAppend("p-2", events(1))]
        )
    assert [r.version for r in results] == [2, 1]
    assert query(dsn, "SELECT count(*) FROM aura.events") == [(3,)]


def test_overlapping_calls_in_opposite_orders_do_not_deadlock(dsn: str) -> None:
    """Locks go in one order whatever the order of the call's streams."""
    names = [f"d-{i}" for i in range(50)]
    failures: list[BaseException] = []

    def load(order: list[str]) -> None:
        try:
            with EventStore.connect(dsn, max_size=1) as store:
                for _ in range(10):
                    store.append_many([StreamAppend(name, events(2)) for name in order])
        except BaseException as exc:
            failures.append(exc)

    threads = [
        threading.Thread(target=load, args=(names,)),
        threading.Thread(target=load, args=(names[::-1],)),
        threading.Thread(target=load, args=(names[25:] + names[:25],)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    rows = query(
        dsn,
        "SELECT count(*), count(DISTINCT (stream_id, version)), max(version) FROM aura.events",
    )
    assert rows == [(50 * 2 * 30, 50 * 2 * 30, 60)]
    # Every stream's versions in commit order.
    inversions = query(
        dsn,
        "SELECT count(*) FROM (SELECT version, lag(version) OVER (PARTITION BY stream_id"
        " ORDER BY transaction_id, global_position) AS previous FROM aura.events) v"
        " WHERE version <> previous + 1",
    )
    assert inversions == [(0,)]


def test_event_ids_given_are_kept(store: EventStore) -> None:
    given = uuid.uuid4()
    result = store.append_many([StreamAppend("i-1", NewEvent("T", {}, event_id=given))])
    assert result[0].events[0].event_id == given
    assert store.read_stream("i-1")[0].event_id == given


def test_sequence_orders_the_call_across_streams(store: EventStore, dsn: str) -> None:
    results = store.append_many(
        [
            StreamAppend("q-a", events(3, prefix="a"), sequence=[1, 4, 5]),
            StreamAppend("q-b", events(2, prefix="b"), sequence=[2, 3]),
        ]
    )
    order = query(dsn, "SELECT stream_id, version FROM aura.events ORDER BY global_position")
    assert order == [("q-a", 1), ("q-b", 1), ("q-b", 2), ("q-a", 2), ("q-a", 3)]
    assert [e.version for e in results[0].events] == [1, 2, 3]
    for sequence in ([2, 1, 3], [1, 2], [1, 1, 2], [-1, 0, 1], ["1", "2", "3"]):
        with pytest.raises(EventValidationError):
            store.append_many([StreamAppend("q-c", events(3), sequence=sequence)])


def test_the_function_checks_sequences(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for batch in (
            '[{"type": "T", "data": {}, "sequence": 2}, {"type": "T", "data": {}, "sequence": 1}]',
            '[{"type": "T", "data": {}, "sequence": 2}, {"type": "T", "data": {}}]',
            '[{"type": "T", "data": {}, "sequence": "x"}]',
            '[{"type": "T", "data": {}, "sequence": 1.5}]',
        ):
            with pytest.raises(psycopg.Error) as failed:
                conn.execute(
                    "SELECT * FROM aura.append_many(ARRAY['s'], ARRAY['any'], ARRAY[%s::jsonb])",
                    (batch,),
                )
            assert failed.value.sqlstate == "AU003", batch
        assert conn.execute("SELECT count(*) FROM aura.events").fetchone() == (0,)


def test_only_this_calls_staged_rows_whole_are_appended(dsn: str) -> None:
    """As if another client shared the session between the COPY and the
    call (a transaction-mode pooler): rows of another token are never
    appended, and a call missing some of its rows writes nothing."""
    from aura_pg.errors import AuraPgError
    from aura_pg.store import operations as ops

    appends = [StreamAppend("x-1", events(1)), StreamAppend("x-2", events(1))]
    with (
        EventStore.connect(dsn, max_size=1) as store,
        psycopg.connect(dsn, autocommit=True) as conn,
    ):
        operation = ops.append_many(appends, store.max_payload_bytes)
        copy = next(operation)
        assert isinstance(copy, ops.Copy)
        store._copy(copy, conn)
        # Another call's row, and one of this call's rows gone.
        conn.execute(
            "INSERT INTO pg_temp.aura_bulk_staging VALUES (gen_random_uuid(), 0, 'other', 'any',"
            ' \'[{"type": "T", "data": {}}]\')'
        )
        conn.execute("DELETE FROM pg_temp.aura_bulk_staging WHERE stream_id = 'x-2'")
        statement = operation.send([])
        assert isinstance(statement, ops.Statement)
        with pytest.raises(psycopg.Error) as refused:
            conn.execute(statement.sql, statement.params)
        with pytest.raises(AuraPgError, match="staged batches incomplete"):
            operation.throw(refused.value)
    assert query(dsn, "SELECT count(*) FROM aura.events") == [(0,)]


def test_limits_apply_to_each_streams_batch(dsn: str) -> None:
    """aura.max_batch_events and aura.max_payload_bytes as for aura.append_events:
    a session may lower them, not lift them past the database's ceiling."""
    three = '[{"type": "T", "data": {}}, {"type": "T", "data": {}}, {"type": "T", "data": {}}]'
    call = "SELECT * FROM aura.append_many(ARRAY['s'], ARRAY['any'], ARRAY[%s::jsonb])"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET aura.max_batch_events = 2")
        with pytest.raises(psycopg.Error, match="over the limit of 2") as refused:
            conn.execute(call, (three,))
        assert refused.value.sqlstate == "AU003"
        conn.execute("SET aura.max_batch_events = 20000")
        conn.execute("SET aura.max_payload_bytes = 10")
        with pytest.raises(psycopg.Error, match="over the limit of 10") as too_big:
            conn.execute(call, ('[{"type": "T", "data": {"x": "0123456789abcdef"}}]',))
        assert too_big.value.sqlstate == "AU003"
        conn.execute("RESET aura.max_payload_bytes")
        assert len(conn.execute(call, (three,)).fetchall()) == 3
