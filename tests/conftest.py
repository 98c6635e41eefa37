"""Test fixtures: a real Postgres with TimescaleDB preloaded, one fresh
database per test, cloned from a template that the migrations built once.

By default the session starts a private cluster (aura_pg.devtools.localdb) on a free
port and removes it afterwards. Set AURA_PG_TEST_HOST and AURA_PG_TEST_PORT
(and AURA_PG_TEST_USER) to use a running server instead.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
from pytest_postgresql import factories
from pytest_postgresql.executors import NoopExecutor
from pytest_postgresql.janitor import DatabaseJanitor

from aura_pg import AsyncEventStore, EventStore, migrate
from aura_pg.devtools.localdb import free_port, temporary_cluster

TEST_SETTINGS = {
    # Durability is not under test here; speed is welcome.
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}


@pytest.fixture(scope="session")
def pg_server() -> Iterator[NoopExecutor]:
    host = os.environ.get("AURA_PG_TEST_HOST")
    if host:
        yield NoopExecutor(
            host=host,
            port=int(os.environ.get("AURA_PG_TEST_PORT", "5432")),
            user=os.environ.get("AURA_PG_TEST_USER", "postgres"),
            options="",
            dbname="aura_test",
        )
        return
    with temporary_cluster(TEST_SETTINGS, prefix="aura-pg-test-") as cluster:
        yield NoopExecutor(
            host="127.0.0.1", port=cluster.port, user="postgres", options="", dbname="aura_test"
        )


def _migrate_template(host: str, port: int, user: str, dbname: str, **_: Any) -> None:
    migrate.upgrade(f"host={host} port={port} user={user} dbname={dbname}")


@pytest.fixture(scope="session")
def postgresql_template(pg_server: NoopExecutor) -> Iterator[NoopExecutor]:
    """The migrated template database that every test database is cloned from."""
    janitor = DatabaseJanitor(
        user=pg_server.user,
        host=pg_server.host,
        port=pg_server.port,
        dbname=pg_server.template_dbname,
        as_template=True,
    )
    janitor.drop()
    with janitor:
        janitor.load(_migrate_template)
        # Cloning needs a template nobody is connected to, and TimescaleDB's
        # background-worker scheduler connects to every database it may.
        with janitor.cursor() as cur:
            cur.execute(
                psycopg.sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(
                    psycopg.sql.Identifier(pg_server.template_dbname)
                )
            )
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (pg_server.template_dbname,),
            )
        yield pg_server


postgresql = factories.postgresql("postgresql_template")


def conninfo(conn: psycopg.Connection[Any]) -> str:
    info = conn.info
    return f"host={info.host} port={info.port} user={info.user} dbname={info.dbname}"


@pytest.fixture
def dsn(postgresql: psycopg.Connection[Any]) -> str:
    """Connection string of this test's own migrated database."""
    return conninfo(postgresql)


@pytest.fixture
def empty_dsn(pg_server: NoopExecutor) -> Iterator[str]:
    """A fresh database with no schema at all (for migration tests)."""
    name = f"aura_empty_{os.getpid()}_{free_port()}"
    admin = f"host={pg_server.host} port={pg_server.port} user={pg_server.user} dbname=postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
    try:
        yield f"host={pg_server.host} port={pg_server.port} user={pg_server.user} dbname={name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(
                psycopg.sql.SQL("DROP DATABASE {} WITH (FORCE)").format(
                    psycopg.sql.Identifier(name)
                )
            )


@pytest.fixture
def store(dsn: str) -> Iterator[EventStore]:
    with EventStore.connect(dsn, max_size=20) as event_store:
        yield event_store


@pytest.fixture
async def async_store(dsn: str) -> AsyncIterator[AsyncEventStore]:
    async with await AsyncEventStore.connect(dsn, max_size=10) as event_store:
        yield event_store
