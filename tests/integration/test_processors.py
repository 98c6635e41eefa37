"""Python processors against a real Postgres: daemons in the test's event
loop, handlers in this module, every effect checked against the log."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from aura_pg import NO_STREAM, EventStore, NewEvent, RecordedEvent
from aura_pg.errors import CatalogError, ProjectionError
from aura_pg.processors import idempotency_key, partition_of, python_processor
from aura_pg.projection import admin
from aura_pg.projection.catalog import CircuitBreakerPolicy, ErrorHandling, load_catalog
from aura_pg.projection.daemon import ProjectorDaemon
from aura_pg.projection.processor import queries as processor_queries
from aura_pg.projection.registration import register_projections
from aura_pg.projection.settings import ProjectorSettings
from aura_pg.upcasting import register_upcaster
from tests.helpers.projections import fixture_catalog, query, status_of, wait_for

SEEN_TABLE = """
CREATE TABLE public.seen (
    event_id   uuid PRIMARY KEY,
    stream_id  text NOT NULL,
    version    bigint NOT NULL,
    type       text NOT NULL,
    data       jsonb NOT NULL,
    processor  text NOT NULL,
    seq        bigserial
)"""
FAST_RETRIES = ErrorHandling(
    max_retries=1,
    retry_base_ms=10,
    retry_max_ms=20,
    circuit_breaker=CircuitBreakerPolicy(failure_threshold=50),
)


def _insert(events: list[RecordedEvent], conn: Any, processor: str) -> None:
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO public.seen (event_id, stream_id, version, type, data, processor)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            [
                (
                    e.event_id,
                    e.stream_id,
                    e.version,
                    e.type,
                    Jsonb(e.data),
                    processor,
                )
                for e in events
            ],
        )


def record(events: list[RecordedEvent], conn: psycopg.Connection[Any]) -> None:
    """Inserts each event once (a second application fails on the key)."""
    _insert(events, conn, "record")


async def record_async(events: list[RecordedEvent], conn: psycopg.AsyncConnection[Any]) -> None:
    async with conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO public.seen (event_id, stream_id, version, type, data, processor)"
            " VALUES (%s, %s, %s, %s, %s, 'record_async')",
            [(e.event_id, e.stream_id, e.version, e.type, Jsonb(e.data)) for e in events],
        )


def record_unless_poison(events: list[RecordedEvent], conn: psycopg.Connection[Any]) -> None:
    """Writes the batch first, then refuses it when it holds a poison event:
    the writes must roll back with it."""
    _insert(events, conn, "poison")
    if any(e.data.get("poison") for e in events):
        raise ValueError("poison event")


def hang_on_marked(events: list[RecordedEvent], conn: psycopg.Connection[Any]) -> None:
    _insert(events, conn, "hang")
    if any(e.data.get("hang") for e in events):
        time.sleep(30)


REACTIONS = EventStore()


def react(events: list[RecordedEvent], conn: psycopg.Connection[Any]) -> None:
    """A process manager: each ASKED gets one ANSWERED, appended in the
    batch's transaction, keyed by its cause."""
    for event in events:
        REACTIONS.append(
            f"answer-{event.stream_id}",
            [
                NewEvent(
                    "ANSWERED",
                    {"cause": str(event.event_id)},
                    idempotency_key=idempotency_key(event, "answer"),
                )
            ],
            conn=conn,
        )


CONFLICTS_LEFT = [0]


def conflict_at_first(events: list[RecordedEvent], conn: psycopg.Connection[Any]) -> None:
    """Loses the race for its reaction stream a few times (a real
    ConcurrencyError from the store), then wins."""
    for event in events:
        expected = 5 if CONFLICTS_LEFT[0] > 0 else NO_STREAM
        CONFLICTS_LEFT[0] -= 1
        REACTIONS.append(
            f"reaction-{event.event_id}", [NewEvent("REACTED", {})], expected, conn=conn
        )


def settings(**overrides: Any) -> ProjectorSettings:
    options: dict[str, Any] = {"poll_interval": 0.1, "shutdown_timeout": 10.0}
    options.update(overrides)
    return ProjectorSettings(**options)


async def run_until(daemon: ProjectorDaemon, check: Any, timeout: float = 20.0) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        await wait_for(check, timeout)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


def seen(dsn: str) -> list[tuple[Any, ...]]:
    return query(dsn, "SELECT event_id, stream_id, version FROM public.seen ORDER BY seq")


def log_ids(dsn: str, *types: str) -> set[Any]:
    return {
        row[0]
        for row in query(
            dsn, "SELECT event_id FROM aura.events WHERE type = ANY(%s)", (list(types),)
        )
    }


def all_caught_up(dsn: str, prefix: str) -> bool:
    rows = query(
        dsn,
        "SELECT events_behind FROM aura.projection_status WHERE split_part(name, '/', 1) = %s",
        (prefix,),
    )
    return bool(rows) and all(row[0] == 0 for row in rows)


def append(store: EventStore, count: int, streams: int = 7, type_: str = "A", **data: Any) -> None:
    for n in range(count):
        store.append(f"s-{n % streams}", [NewEvent(type_, {"n": n, **data})])


@pytest.fixture
def seen_table(dsn: str) -> None:
    query(dsn, SEEN_TABLE)


@pytest.mark.usefixtures("seen_table")
@pytest.mark.parametrize("handler", [record, record_async], ids=["sync", "async"])
async def test_processor_applies_each_event_once_with_its_checkpoint(
    dsn: str, store: EventStore, handler: Any
) -> None:
    append(store, 60)
    append(store, 10, type_="OTHER")
    spec = python_processor("audit", handler, source_events=["A"], batch_size=16)
    daemon = ProjectorDaemon(dsn, processors=[spec], settings=settings())
    await run_until(daemon, lambda: all_caught_up(dsn, "audit"))
    assert {row[0] for row in seen(dsn)} == log_ids(dsn, "A")
    assert len(seen(dsn)) == 60
    status = status_of(dsn, "audit")
    assert status["kind"] == "python"
    assert status["events_applied"] == 60
    assert status["schema_name"] is None
    # Events arrive in commit order: per stream, versions only go up.
    last: dict[str, int] = {}
    for _, stream, version in seen(dsn):
        assert version > last.get(stream, 0)
        last[stream] = version


@pytest.mark.usefixtures("seen_table")
async def test_poison_event_is_isolated_rolled_back_and_dead_lettered(
    dsn: str, store: EventStore
) -> None:
    append(store, 20)
    store.append("s-poison", [NewEvent("A", {"poison": True})])
    append(store, 20)
    spec = python_processor(
        "poisoned", record_unless_poison, batch_size=50, error_handling=FAST_RETRIES
    )
    daemon = ProjectorDaemon(dsn, processors=[spec], settings=settings())
    await run_until(daemon, lambda: all_caught_up(dsn, "poisoned"))
    poison = {
        row[0] for row in query(dsn, "SELECT event_id FROM aura.events WHERE data ? 'poison'")
    }
    assert {row[0] for row in seen(dsn)} == log_ids(dsn, "A") - poison
    letters = admin.dead_letters(dsn, "poisoned")
    assert {letter["event_id"] for letter in letters} == poison
    # The handler's exception is the dead letter's error.
    assert "ValueError: poison event" in letters[0]["error"]


async def test_a_conflict_in_the_handler_is_retried_not_dead_lettered(
    dsn: str, store: EventStore
) -> None:
    store.append("s-1", [NewEvent("A", {})])
    CONFLICTS_LEFT[0] = 3
    spec = python_processor(
        "conflicted",
        conflict_at_first,
        source_events=["A"],
        error_handling=ErrorHandling(max_retries=0, retry_base_ms=10, retry_max_ms=20),
    )
    daemon = ProjectorDaemon(dsn, processors=[spec], settings=settings())
    await run_until(daemon, lambda: all_caught_up(dsn, "conflicted"))
    assert admin.dead_letters(dsn, "conflicted") == []
    assert len(query(dsn, "SELECT 1 FROM aura.events WHERE type = 'REACTED'")) == 1


@pytest.mark.usefixtures("seen_table")
async def test_partitions_split_streams_and_keep_each_in_order(dsn: str, store: EventStore) -> None:
    append(store, 90, streams=11)
    spec = python_processor("split", record, partitions=3, batch_size=10)
    daemon = ProjectorDaemon(dsn, processors=[spec], settings=settings())
    assert sorted(daemon.runners) == ["split/0", "split/1", "split/2"]
    await run_until(daemon, lambda: all_caught_up(dsn, "split"))
    assert {row[0] for row in seen(dsn)} == log_ids(dsn, "A")
    assert len(seen(dsn)) == 90
    applied = {
        row[0]: row[1]
        for row in query(
            dsn, "SELECT name, events_applied FROM aura.projection_status WHERE kind = 'python'"
        )
    }
    expected = {f"split/{k}": 0 for k in range(3)}
    for _, stream, _ in seen(dsn):
        expected[f"split/{partition_of(stream, 3)}"] += 1
    assert applied == expected
    # The SQL function agrees with the Python one.
    for stream in {row[1] for row in seen(dsn)}:
        [(sql_partition,)] = query(dsn, "SELECT aura.stream_partition(%s, 3)", (stream,))
        assert sql_partition == partition_of(stream, 3)


@pytest.mark.usefixtures("seen_table")
async def test_hung_handler_times_out_and_other_processors_carry_on(
    dsn: str, store: EventStore
) -> None:
    store.append("s-hang", [NewEvent("H", {"hang": True})])
    append(store, 5)
    hung = python_processor(
        "hung",
        hang_on_marked,
        source_events=["H"],
        batch_timeout_seconds=0.5,
        error_handling=ErrorHandling(max_retries=0, retry_base_ms=10, retry_max_ms=20),
    )
    steady = python_processor("steady", record, source_events=["A"])
    daemon = ProjectorDaemon(dsn, processors=[hung, steady], settings=settings())
    await run_until(
        daemon,
        lambda: all_caught_up(dsn, "hung") and all_caught_up(dsn, "steady"),
        timeout=30,
    )
    assert [letter["event_type"] for letter in admin.dead_letters(dsn, "hung")] == ["H"]
    assert "did not finish within 0.5s" in admin.dead_letters(dsn, "hung")[0]["error"]
    # The hung batch's insert was rolled back; the other processor applied all.
    assert {row[0] for row in seen(dsn)} == log_ids(dsn, "A")
    assert daemon.runners["hung"].timeouts >= 1  # type: ignore[attr-defined]


async def test_reactions_commit_with_the_checkpoint_exactly_once(
    dsn: str, store: EventStore
) -> None:
    for n in range(12):
        store.append(f"q-{n % 3}", [NewEvent("ASKED", {"n": n})])
    spec = python_processor("answers", react, source_events=["ASKED"], batch_size=5)
    daemon = ProjectorDaemon(dsn, processors=[spec], settings=settings())
    await run_until(daemon, lambda: all_caught_up(dsn, "answers"))
    causes = query(dsn, "SELECT data->>'cause' FROM aura.events WHERE type = 'ANSWERED'")
    assert sorted(row[0] for row in causes) == sorted(str(i) for i in log_ids(dsn, "ASKED"))
    # Replayed from the start (a reset), every reaction is a recorded
    # duplicate: no second answer.
    admin.reset(dsn, "answers")
    daemon = ProjectorDaemon(dsn, processors=[spec], settings=settings())
    await run_until(
        daemon,
        lambda: status_of(dsn, "answers")["events_applied"] == 12 and all_caught_up(dsn, "answers"),
    )
    assert len(query(dsn, "SELECT 1 FROM aura.events WHERE type = 'ANSWERED'")) == 12


@pytest.mark.usefixtures("seen_table")
def test_an_overtaken_batch_rolls_back_what_its_handler_wrote(dsn: str, store: EventStore) -> None:
    """Two daemons read the same batch; the second to advance is refused
    (AU006) and its handler's writes go with it."""
    append(store, 3)
    asyncio.run(_register(dsn, python_processor("raced", record)))
    params = {
        "name": "raced",
        "transaction_id": "0",
        "position": 0,
        "limit": None,
        "generation": None,
        "owner": "test",
    }
    with (
        psycopg.connect(dsn, autocommit=True) as first,
        psycopg.connect(dsn, autocommit=True) as second,
    ):
        first.execute("BEGIN")
        second.execute("BEGIN")
        rows_first = first.execute(processor_queries()["batch"], params).fetchall()
        rows_second = second.execute(processor_queries()["batch"], params).fetchall()
        assert len(rows_first) == len(rows_second) == 3
        next_tx, next_position = rows_first[0][0], rows_first[0][1]
        advance = {
            **params,
            "next_transaction_id": next_tx,
            "next_position": next_position,
            "applied": 3,
            "last_position": None,
            "last_recorded_at": None,
        }
        first.execute(
            "INSERT INTO public.seen SELECT event_id, stream_id, version, type, data, 'first'"
            " FROM aura.events"
        )
        first.execute(processor_queries()["advance"], advance)
        first.execute("COMMIT")
        second.execute(
            "INSERT INTO public.seen (event_id, stream_id, version, type, data, processor)"
            " SELECT gen_random_uuid(), 'x', 1, 'x', '{}', 'second'"
        )
        with pytest.raises(psycopg.Error) as refused:
            second.execute(processor_queries()["advance"], advance)
        assert refused.value.sqlstate == "AU006"
        second.execute("ROLLBACK")
    assert {row[0] for row in query(dsn, "SELECT DISTINCT processor FROM public.seen")} == {"first"}


async def _register(dsn: str, *specs: Any) -> dict[str, str]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        return await register_projections(conn, specs)


@pytest.mark.usefixtures("seen_table")
async def test_repartition_hands_streams_over_without_skip_or_repeat(
    dsn: str, store: EventStore
) -> None:
    append(store, 60, streams=13)
    two = python_processor("moved", record, partitions=2, batch_size=7)
    await _register(dsn, two)
    # Partition 0 runs ahead; partition 1 stays at the start.
    daemon = ProjectorDaemon(dsn, processors=[two], settings=settings())
    daemon.runners.pop("moved/1")
    await run_until(daemon, lambda: status_of(dsn, "moved/0")["events_behind"] == 0)
    append(store, 30, streams=13)
    three = python_processor("moved", record, partitions=3, batch_size=7)
    with pytest.raises(CatalogError, match=r"runs in 2 partitions, not 3.*repartition"):
        await _register(dsn, three)
    assert admin.repartition(dsn, "moved", 3) == "repartitioned"
    daemon = ProjectorDaemon(dsn, processors=[three], settings=settings())
    await run_until(daemon, lambda: all_caught_up(dsn, "moved"))
    assert len(seen(dsn)) == 90
    assert {row[0] for row in seen(dsn)} == log_ids(dsn, "A")
    last: dict[str, int] = {}
    for _, stream, version in seen(dsn):
        assert version > last.get(stream, 0)
        last[stream] = version
    # And back to one partition.
    assert admin.repartition(dsn, "moved", 1) == "repartitioned"
    append(store, 10, streams=13)
    one = python_processor("moved", record, batch_size=7)
    daemon = ProjectorDaemon(dsn, processors=[one], settings=settings())
    await run_until(daemon, lambda: all_caught_up(dsn, "moved"))
    assert {row[0] for row in seen(dsn)} == log_ids(dsn, "A")


@pytest.mark.usefixtures("seen_table")
async def test_dead_letter_retry_and_replay_run_the_python_handler(
    dsn: str, store: EventStore
) -> None:
    store.append("s-poison", [NewEvent("A", {"poison": True})])
    spec = python_processor(
        "fixable", record_unless_poison, error_handling=FAST_RETRIES, batch_size=10
    )
    daemon = ProjectorDaemon(dsn, processors=[spec], settings=settings())
    await run_until(daemon, lambda: admin.dead_letters(dsn, "fixable"))
    [letter] = admin.dead_letters(dsn, "fixable")
    # Still poison: the retry fails and changes nothing.
    with pytest.raises(ProjectionError, match="poison event"):
        admin.retry_dead_letter(dsn, letter["id"])
    assert admin.dead_letters(dsn, "fixable") and seen(dsn) == []
    # The SQL function refuses to run a Python handler, saying what does.
    with pytest.raises(psycopg.Error, match="Python processor"):
        query(dsn, "SELECT aura.retry_dead_letter(%s)", (letter["id"],))
    query(
        dsn,
        "UPDATE aura.projection_checkpoints SET handler = %s WHERE name = 'fixable'",
        (f"{__name__}:record",),
    )
    assert admin.retry_dead_letter(dsn, letter["id"]) == "retried"
    assert len(seen(dsn)) == 1 and admin.dead_letters(dsn, "fixable") == []
    # A replay hands the stream's applied events to the handler again.
    append(store, 4, streams=1)
    daemon = ProjectorDaemon(dsn, processors=[spec], settings=settings())
    await run_until(daemon, lambda: all_caught_up(dsn, "fixable"))
    query(dsn, "DELETE FROM public.seen WHERE stream_id = 's-0'")
    assert admin.replay_stream(dsn, "fixable", "s-0") == 4
    assert len([row for row in seen(dsn) if row[1] == "s-0"]) == 4


@register_upcaster("RENAMED", 1)
def _renamed_v1(data: dict[str, Any]) -> dict[str, Any]:
    return {"title": data["name"]}


@pytest.mark.usefixtures("seen_table")
async def test_events_arrive_upcast(dsn: str, store: EventStore) -> None:
    store.append("r-1", [NewEvent("RENAMED", {"name": "old"})])
    store.append("r-1", [NewEvent("RENAMED", {"title": "new"}, {"schema_version": 2})])
    spec = python_processor("upcast", record, source_events=["RENAMED"])
    daemon = ProjectorDaemon(dsn, processors=[spec], settings=settings())
    await run_until(daemon, lambda: all_caught_up(dsn, "upcast"))
    assert [row[0] for row in query(dsn, "SELECT data FROM public.seen ORDER BY seq")] == [
        {"title": "old"},
        {"title": "new"},
    ]


def test_catalog_entries_of_kind_python(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(
        "projections:\n"
        "  - name: audit_log\n"
        "    kind: python\n"
        "    handler: my_service.audit:handle\n"
        "    source_events: all\n"
        "    partitions: 4\n"
        "    batch_timeout_seconds: 5\n"
    )
    [spec] = load_catalog(catalog).projections
    assert spec.row_names == ("audit_log/0", "audit_log/1", "audit_log/2", "audit_log/3")
    assert spec.source_events is None and spec.batch_timeout_seconds == 5
    for bad, message in (
        ("    handler: not a reference\n", "is not 'package.module:callable'"),
        ("    handler: m:f\n    sql: x.sql\n", "sql: not a setting of a kind python entry"),
        ("    handler: m:f\n    partitions: 65\n", "partitions"),
    ):
        catalog.write_text("projections:\n  - name: p\n    kind: python\n" + bad)
        with pytest.raises(CatalogError, match=message):
            load_catalog(catalog)
    catalog.write_text(
        "projections:\n  - name: p\n    sql: p.sql\n    handler: h\n    partitions: 2\n"
    )
    with pytest.raises(CatalogError, match="partitions: not a setting of a kind sql entry"):
        load_catalog(catalog)
    with pytest.raises(CatalogError, match="cannot import"):
        ProjectorDaemon("", processors=[python_processor("x", "no_such_module:handle")])


def test_partition_of_is_stable() -> None:
    # Fixed values: a change would move streams between partitions.
    assert [partition_of(f"stream-{n}", 4) for n in range(8)] == [3, 0, 0, 1, 2, 3, 3, 3]
    assert [partition_of(f"stream-{n}", 64) for n in range(4)] == [23, 60, 56, 5]
    assert partition_of("debate-1", 1) == 0
    with pytest.raises(ValueError, match="between 1 and 64"):
        partition_of("x", 0)


async def test_sql_and_python_names_do_not_collide(dsn: str) -> None:
    await _register(dsn, python_processor("tally_set", record))
    with pytest.raises(CatalogError, match="is a Python processor"):
        await _register(dsn, *fixture_catalog().select(["tally_set"]))
    await _register(dsn, *fixture_catalog().select(["tally_each"]))
    with pytest.raises(CatalogError, match="is a SQL projection"):
        await _register(dsn, python_processor("tally_each", record))
