"""The plugin as a user's project meets it: a pytest session of its own
(pytester, in a subprocess) that loads aura_pg.testing through its entry
point, with its options pointing at this session's server."""

from __future__ import annotations

import psycopg
import pytest
from pytest_postgresql.executors import NoopExecutor

from aura_pg.testing.databases import dsn_of

pytest_plugins = ["pytester"]

USER_TESTS = """
import psycopg
from aura_pg import NO_STREAM, NewEvent

def test_first_gets_a_migrated_database(event_store, aura_dsn):
    event_store.append("user-1", [NewEvent("A", {})], NO_STREAM)
    with psycopg.connect(aura_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM aura.events").fetchone() == (1,)

def test_second_gets_a_fresh_one(event_store):
    # The first test's event is not here: the stream is new again.
    event_store.append("user-1", [NewEvent("A", {})], NO_STREAM)

async def test_async_store(async_event_store):
    await async_event_store.append("user-2", [NewEvent("B", {})], NO_STREAM)

def test_projections(event_store, run_projections):
    event_store.append("user-3", [NewEvent("C", {})])
    (row,) = run_projections("stream_summary")
    assert row["events_behind"] == 0

def test_a_failing_expectation_fails(event_store):
    event_store.append("user-4", [NewEvent("D", {})], NO_STREAM)
    assert event_store.stream_version("user-4") == 2
"""

USER_SCENARIOS = """
from typing import ClassVar
from aura_pg.aggregates import Aggregate, DomainError, Event, EventRegistry, applies
from aura_pg.testing import AggregateScenario

EVENTS = EventRegistry()

@EVENTS.register
class Opened(Event):
    TYPE: ClassVar[str] = "DOOR_OPENED"

class Door(Aggregate):
    events = EVENTS
    stream_prefix = "door"
    def __init__(self, aggregate_id):
        super().__init__(aggregate_id)
        self.open = False
    @applies(Opened)
    def _opened(self, event):
        self.open = True
    def push(self):
        if self.open:
            raise DomainError("already open", code="already_open")
        return [self.new_event(Opened())]

def test_opens_in_memory():
    AggregateScenario(Door, "d").when(lambda door: door.push()).then(Opened())

def test_refuses_through_the_database(aggregate_scenario):
    door = aggregate_scenario(Door, "d").given(Opened())
    door.when(lambda d: d.push()).then_fails("already_open")

def test_wrong_expectation_fails(aggregate_scenario):
    aggregate_scenario(Door, "d").given(Opened()).when(lambda d: d.push()).then(Opened())
"""


def test_a_projects_session_uses_the_plugins_fixtures(
    pytester: pytest.Pytester, aura_pg_server: NoopExecutor
) -> None:
    pytester.makeini(
        "[pytest]\n"
        "asyncio_mode = auto\n"
        "asyncio_default_fixture_loop_scope = function\n"
        "aura_pg_dbname = aura_user_project\n"
    )
    pytester.makepyfile(test_user=USER_TESTS, test_user_scenarios=USER_SCENARIOS)

    server = [
        f"--aura-pg-host={aura_pg_server.host}",
        f"--aura-pg-port={aura_pg_server.port}",
        f"--aura-pg-user={aura_pg_server.user}",
    ]
    if aura_pg_server.password:
        server.append(f"--aura-pg-password={aura_pg_server.password}")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *server)

    result.assert_outcomes(passed=6, failed=2)
    result.stdout.fnmatch_lines(["*test_a_failing_expectation_fails*", "*assert 1 == 2*"])
    result.stdout.fnmatch_lines(
        [
            "*test_wrong_expectation_fails*",
            "*expected events:*",
            "*DOOR_OPENED {}*",
            "*but the command was refused: DomainError(code='already_open'): already open*",
        ]
    )
    # The session's template (named after aura_pg_dbname) is gone with it.
    with psycopg.connect(dsn_of(aura_pg_server, "postgres")) as conn:
        left = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'aura_user_project%'"
        ).fetchall()
    assert left == []


def test_the_options_are_documented_in_pytest_help(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--help")
    result.stdout.fnmatch_lines(
        [
            "aura-pg: a private Postgres*",
            "*--aura-pg-host=HOST*",
            "*AURA_PG_TEST_HOST*",
            "*--aura-pg-bindir=*",
            "*--aura-pg-no-timescaledb*",
            "*aura_pg_server_settings*",
        ]
    )
