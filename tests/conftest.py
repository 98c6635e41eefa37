"""Test fixtures: the aura-pg pytest plugin (aura_pg.testing.plugin, loaded
through its pytest11 entry point) provides the server, the migrated
template and one fresh database per test cloned from it; the names the
suite has always used are aliases of the plugin's fixtures.

By default the session starts a private cluster with TimescaleDB preloaded
on a free port and removes it afterwards. Set AURA_PG_TEST_HOST and
AURA_PG_TEST_PORT (and AURA_PG_TEST_USER), or the plugin's --aura-pg-*
options, to use a running server instead.
"""

from __future__ import annotations

import pytest
from pytest_postgresql.executors import NoopExecutor

from aura_pg import AsyncEventStore, EventStore

# The names below are the plugin's fixtures under the suite's old names.


@pytest.fixture(scope="session")
def pg_server(aura_pg_server: NoopExecutor) -> NoopExecutor:
    """The session's server (a pytest-postgresql NoopExecutor)."""
    return aura_pg_server


@pytest.fixture(scope="session")
def postgresql_template(aura_pg_template: NoopExecutor) -> NoopExecutor:
    """The migrated template database that every test database is cloned from."""
    return aura_pg_template


@pytest.fixture
def dsn(aura_dsn: str) -> str:
    """Connection string of this test's own migrated database."""
    return aura_dsn


@pytest.fixture
def empty_dsn(aura_empty_dsn: str) -> str:
    """A fresh database with no schema at all (for migration tests)."""
    return aura_empty_dsn


@pytest.fixture
def store(event_store: EventStore) -> EventStore:
    return event_store


@pytest.fixture
def async_store(async_event_store: AsyncEventStore) -> AsyncEventStore:
    return async_event_store
