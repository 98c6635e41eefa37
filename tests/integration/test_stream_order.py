"""Per-stream order in the global read: a reader (and so every projection
batch, replay and rebuild) meets the events of one stream in version order,
whatever the writers do: many of them on a few hot streams, single events
and batches, expected versions `any` and exact, and appends inside
transactions that wrote something first."""

from __future__ import annotations

import asyncio
import random
import threading
from collections import defaultdict
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from aura_pg import (
    ANY,
    START,
    ConcurrencyError,
    EventStore,
    NewEvent,
    StreamOrderConflict,
    doctor,
    load_catalog,
)
from aura_pg.projection import admin
from aura_pg.projection.rebuild import rebuild
from tests.helpers.projections import caught_up, query, running_daemon, wait_for
from tests.helpers.threads import run_together

ORDER_CATALOG = Path(__file__).resolve().parent.parent / "fixtures" / "projections" / "order.yaml"
HOT_STREAMS = ("hot-a", "hot-b", "hot-c")


def read_order(store: EventStore) -> list[tuple[str, int]]:
    """(stream, version) of the whole log in global read order, page by page."""
    seen: list[tuple[str, int]] = []
    checkpoint = START
    while True:
        page = store.read_all(after=checkpoint, limit=97)
        seen.extend((e.stream_id, e.version) for e in page.events)
        if not page.events:
            return seen
        checkpoint = page.checkpoint


def out_of_order(order: list[tuple[str, int]]) -> list[tuple[str, int, int]]:
    """Each (stream, version, previous version) where a stream's version
    comes after a version that is not the one before it."""
    last: dict[str, int] = defaultdict(int)
    wrong = []
    for stream_id, version in order:
        if version != last[stream_id] + 1:
            wrong.append((stream_id, version, last[stream_id]))
        last[stream_id] = version
    return wrong


def test_a_transaction_that_wrote_first_cannot_append_behind_a_later_one(
    store: EventStore, dsn: str
) -> None:
    # T1 writes (and so takes its transaction id) first; T2 appends version
    # 1 and commits; T1 then appends version 2. Read by transaction id, T1's
    # event would come before version 1.
    with psycopg.connect(dsn) as t1:
        t1.execute("SELECT pg_current_xact_id()")
        store.append("two-tx", NewEvent("T", {"by": "t2"}))
        with pytest.raises(StreamOrderConflict) as refused:
            store.append("two-tx", NewEvent("T", {"by": "t1"}), conn=t1)
        t1.rollback()
    assert isinstance(refused.value, ConcurrencyError)  # reload-and-retry code handles it
    assert refused.value.actual == 1
    assert [(e.version, e.data["by"]) for e in store.read_stream("two-tx")] == [(1, "t2")]

    # Run again, the same transaction appends in version order.
    with psycopg.connect(dsn) as t1:
        t1.execute("SELECT pg_current_xact_id()")
        store.append("two-tx", NewEvent("T", {"by": "t1"}), conn=t1)
    assert out_of_order(read_order(store)) == []
    assert [e.data["by"] for e in store.read_stream("two-tx")] == ["t2", "t1"]


def test_a_transaction_that_wrote_first_appends_where_nobody_overtook_it(
    store: EventStore, dsn: str
) -> None:
    store.append("quiet", NewEvent("T", {}))
    with psycopg.connect(dsn) as conn:
        conn.execute("SELECT pg_current_xact_id()")
        store.append("quiet", NewEvent("T", {"n": 2}), conn=conn)
        store.append("quiet", NewEvent("T", {"n": 3}), conn=conn)  # its own head
        store.append("fresh", NewEvent("T", {}), conn=conn)
    assert [e.version for e in store.read_stream("quiet")] == [1, 2, 3]


def test_a_resend_in_a_transaction_that_wrote_first_is_still_a_duplicate(
    store: EventStore, dsn: str
) -> None:
    first = NewEvent("T", {"n": 1}, idempotency_key="once")
    store.append("resent", first)
    with psycopg.connect(dsn) as conn:
        conn.execute("SELECT pg_current_xact_id()")
        store.append("resent", NewEvent("T", {"n": 2}))  # a later transaction
        again = store.append("resent", first, conn=conn)
    assert again.duplicate
    assert again.version == 1


def test_the_sql_function_refuses_with_a_serialization_failure(dsn: str) -> None:
    # psql and other clients: 40001, which retry loops treat as transient.
    append = """SELECT * FROM aura.append_events('sql-order', '[{"type": "T", "data": {}}]')"""
    with psycopg.connect(dsn) as t1, psycopg.connect(dsn, autocommit=True) as t2:
        t1.execute("SELECT pg_current_xact_id()")
        t2.execute(append)
        with pytest.raises(psycopg.errors.SerializationFailure) as refused:
            t1.execute(append)
        assert "retry this transaction" in str(refused.value)


def _write_under_contention(store: EventStore, dsn: str, rounds: int = 40) -> dict[str, int]:
    """Writers of every kind on the hot streams at once; what each kind did."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS public.side_effects (n bigint)")
    counts: dict[str, int] = defaultdict(int)
    lock = threading.Lock()

    def count(kind: str, n: int = 1) -> None:
        with lock:
            counts[kind] += n

    def any_writer(i: int) -> None:
        rng = random.Random(i)
        for n in range(rounds):
            store.append(rng.choice(HOT_STREAMS), NewEvent("Single", {"w": i, "n": n}), ANY)
            count("single")

    def batch_writer(i: int) -> None:
        rng = random.Random(100 + i)
        for n in range(rounds // 2):
            size = rng.randint(2, 6)
            batch = [NewEvent("Batch", {"w": i, "n": n, "k": k}) for k in range(size)]
            store.append(rng.choice(HOT_STREAMS), batch, ANY)
            count("batched", size)

    def exact_writer(i: int) -> None:
        rng = random.Random(200 + i)
        for n in range(rounds // 2):
            stream = rng.choice(HOT_STREAMS)
            while True:
                try:
                    store.append(
                        stream, NewEvent("Exact", {"w": i, "n": n}), store.stream_version(stream)
                    )
                    break
                except ConcurrencyError:
                    count("exact_conflicts")
            count("exact")

    def transaction_writer(i: int) -> None:
        # "Append inside your own transaction": a business row first, then
        # the events; the whole transaction again when refused.
        rng = random.Random(300 + i)
        for n in range(rounds // 2):
            stream = rng.choice(HOT_STREAMS)
            while True:
                try:
                    with store.pool.connection() as conn, conn.transaction():
                        conn.execute("INSERT INTO public.side_effects VALUES (%s)", (n,))
                        store.append(stream, NewEvent("InTx", {"w": i, "n": n}), ANY, conn=conn)
                    break
                except StreamOrderConflict:
                    count("transactions_refused")
            count("in_transaction")

    writers = [any_writer] * 4 + [batch_writer] * 2 + [exact_writer] * 2 + [transaction_writer] * 3
    outcomes = run_together(len(writers), lambda i: writers[i](i))
    assert not any(isinstance(o, Exception) for o in outcomes), outcomes
    return dict(counts)


def test_many_writers_on_hot_streams_are_read_in_version_order(store: EventStore, dsn: str) -> None:
    counts = _write_under_contention(store, dsn)
    order = read_order(store)
    total = counts["single"] + counts["batched"] + counts["exact"] + counts["in_transaction"]
    assert len(order) == total
    assert out_of_order(order) == []
    assert query(dsn, "SELECT count(*) FROM aura.stream_order_inversions") == [(0,)]


def _folded(dsn: str, schema: str) -> dict[str, list[int]]:
    rows = query(
        dsn,
        sql.SQL("SELECT stream_id, versions FROM {}.folded ORDER BY 1").format(
            sql.Identifier(schema)
        ),
    )
    return {row[0]: list(row[1]) for row in rows}


async def test_projections_replays_and_rebuilds_fold_hot_streams_in_version_order(
    store: EventStore, dsn: str
) -> None:
    catalog = load_catalog(ORDER_CATALOG)
    names = ["order_each", "order_set"]
    async with running_daemon(dsn, names, catalog=catalog, poll_interval=0.05):
        # The daemons apply while the writers write, so batches end
        # mid-stream and at every kind of boundary.
        await asyncio.to_thread(_write_under_contention, store, dsn, 30)
        for name in names:
            await wait_for(lambda name=name: caught_up(dsn, name), 60, f"{name} caught up")

    expected = {stream: list(range(1, store.stream_version(stream) + 1)) for stream in HOT_STREAMS}
    live = {name: _folded(dsn, name) for name in names}
    assert live == {name: expected for name in names}

    # A replay applies each stream in version order: it must change nothing.
    for name in names:
        for stream in HOT_STREAMS:
            admin.replay_stream(dsn, name, stream)
        assert _folded(dsn, name) == expected

    # A rebuild reads the log as the daemon did: the same model again.
    result = await rebuild(dsn, catalog.select(["order_set"])[0])
    assert result is not None
    assert _folded(dsn, "order_set") == expected


def test_inverted_streams_recorded_before_the_fix_are_found(dsn: str) -> None:
    # A log written before migration 0009 may hold inverted pairs: forge one
    # as the old append could (version 2 in an older transaction than 1).
    with psycopg.connect(dsn) as older, psycopg.connect(dsn) as newer:
        older.execute("SELECT pg_current_xact_id()")
        newer.execute("SELECT pg_current_xact_id()")
        for conn, version in ((newer, 1), (older, 2)):
            conn.execute(
                "INSERT INTO aura.events (event_id, stream_id, version, type, data, "
                "idempotency_key, idempotency_hash) VALUES (gen_random_uuid(), 'legacy', %s, "
                "'T', '{}', %s, aura.idempotency_hash('legacy', %s))",
                (version, f"k{version}", f"k{version}"),
            )
            conn.commit()
    rows = query(
        dsn,
        "SELECT stream_id, inverted_pairs, first_inverted_version "
        "FROM aura.stream_order_inversions",
    )
    assert rows == [("legacy", 1, 2)]


def test_doctor_reports_inverted_streams(dsn: str) -> None:
    checks = {c.name: c for c in doctor.run_checks(dsn)}
    assert checks["stream_order"].status == "ok"
    test_inverted_streams_recorded_before_the_fix_are_found(dsn)
    checks = {c.name: c for c in doctor.run_checks(dsn)}
    assert checks["stream_order"].status == "warn"
    assert "'legacy'" in checks["stream_order"].detail
