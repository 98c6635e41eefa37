"""The aura-pg pytest plugin (aura_pg.testing), tested by use: its fixtures
here, under their public names, and the projection runner's verdicts."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from pytest_postgresql.executors import NoopExecutor

from aura_pg import NO_STREAM, AsyncEventStore, EventStore, NewEvent, migrate
from aura_pg.models import RecordedEvent
from aura_pg.processors import python_processor
from aura_pg.projection.catalog import ErrorHandling
from aura_pg.testing import ProjectionsNotCaughtUp

QUICK_ERRORS = ErrorHandling(max_retries=1, retry_base_ms=1, retry_max_ms=5)


def _one(dsn: str, query: str, *params: Any) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query, params).fetchone()
        assert row is not None
        return row[0]


def test_aura_dsn_is_a_fresh_clone_of_the_migrated_template(
    aura_dsn: str, aura_pg_template: NoopExecutor
) -> None:
    assert migrate.current_revision(aura_dsn) == migrate.head_revision()
    assert _one(aura_dsn, "SELECT count(*) FROM aura.events") == 0
    assert _one(aura_dsn, "SELECT current_database()") == aura_pg_template.dbname
    # The template is kept free of sessions, so it can be cloned any time.
    assert (
        _one(
            aura_dsn,
            "SELECT datallowconn FROM pg_database WHERE datname = %s",
            aura_pg_template.template_dbname,
        )
        is False
    )


def test_aura_empty_dsn_has_no_schema(aura_empty_dsn: str) -> None:
    assert migrate.current_revision(aura_empty_dsn) is None
    assert _one(aura_empty_dsn, "SELECT count(*) FROM pg_namespace WHERE nspname = 'aura'") == 0


def test_event_store_writes_to_this_tests_database(event_store: EventStore, aura_dsn: str) -> None:
    event_store.append("plugin-1", [NewEvent("PLUGIN_TESTED", {"n": 1})], NO_STREAM)
    assert _one(aura_dsn, "SELECT count(*) FROM aura.events WHERE stream_id = 'plugin-1'") == 1


async def test_async_event_store_writes_to_this_tests_database(
    async_event_store: AsyncEventStore, aura_dsn: str
) -> None:
    await async_event_store.append("plugin-2", [NewEvent("PLUGIN_TESTED", {"n": 2})], NO_STREAM)
    assert [e.data for e in await async_event_store.read_stream("plugin-2")] == [{"n": 2}]


def test_the_suites_old_names_are_the_plugins_fixtures(
    dsn: str, aura_dsn: str, store: EventStore, event_store: EventStore
) -> None:
    assert dsn == aura_dsn
    assert store is event_store


def test_run_projections_runs_sql_and_python_entries_until_caught_up(
    event_store: EventStore, run_projections: Any, aura_dsn: str
) -> None:
    seen: list[RecordedEvent] = []

    def handle(events: list[RecordedEvent], conn: psycopg.Connection[Any]) -> None:
        seen.extend(events)

    recorder = python_processor("recorder", handle, reference=f"{__name__}:handle")
    for stream, count in (("order-1", 3), ("order-2", 2)):
        event_store.append(stream, [NewEvent("ORDER_LINE", {"i": i}) for i in range(count)])

    status = run_projections("stream_summary", recorder)

    assert {row["name"]: row["events_behind"] for row in status} == {
        "recorder": 0,
        "stream_summary": 0,
    }
    assert len(seen) == 5
    with psycopg.connect(aura_dsn) as conn:
        rows = conn.execute(
            "SELECT stream_id, events FROM stream_summary.streams ORDER BY stream_id"
        ).fetchall()
    assert rows == [("order-1", 3), ("order-2", 2)]

    # Run again after more events: it carries on from its checkpoint.
    event_store.append("order-3", [NewEvent("ORDER_LINE", {"i": 0})])
    run_projections("stream_summary", recorder)
    assert len(seen) == 6
    assert _one(aura_dsn, "SELECT count(*) FROM stream_summary.streams") == 3


def test_run_projections_fails_when_an_event_is_dead_lettered(
    event_store: EventStore, run_projections: Any
) -> None:
    def refuse(events: list[RecordedEvent], conn: psycopg.Connection[Any]) -> None:
        if any(e.type == "POISON" for e in events):
            raise ValueError("poison")

    poisoned = python_processor(
        "poisoned",
        refuse,
        batch_size=1,
        error_handling=QUICK_ERRORS,
        reference=f"{__name__}:refuse",
    )
    event_store.append("p-1", [NewEvent("FINE", {}), NewEvent("POISON", {})])

    with pytest.raises(ProjectionsNotCaughtUp, match="dead-lettered"):
        run_projections(poisoned)
    (row,) = run_projections(poisoned, allow_dead_letters=True)
    assert row["dead_letters"] == 1
    assert row["events_behind"] == 0


def test_run_projections_fails_when_it_does_not_catch_up_in_time(
    event_store: EventStore, run_projections: Any
) -> None:
    def refuse(events: list[RecordedEvent], conn: psycopg.Connection[Any]) -> None:
        raise ValueError("always")

    stuck = python_processor(
        "stuck",
        refuse,
        error_handling=QUICK_ERRORS.model_copy(update={"dead_letter_queue": False}),
        reference=f"{__name__}:refuse",
    )
    event_store.append("s-1", [NewEvent("ANY", {})])

    with pytest.raises(ProjectionsNotCaughtUp, match=r"not caught up after 1\.0s") as caught:
        run_projections(stuck, timeout=1.0)
    assert "stuck: " in str(caught.value)
    assert "1 behind" in str(caught.value)


def test_run_projections_names_an_unknown_entry(run_projections: Any) -> None:
    with pytest.raises(Exception, match="no projection named 'nope'"):
        run_projections("nope")
