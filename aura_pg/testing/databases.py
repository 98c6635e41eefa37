"""The test server and its databases: the plugin's options, a private
cluster or a running server, the migrated template and its clones.

Built on pytest-postgresql: ``NoopExecutor`` describes the server,
``DatabaseJanitor`` makes the template and each test's database.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

if TYPE_CHECKING:
    from pytest_postgresql.executors import NoopExecutor

# Durability is not under test; speed is welcome.
DEFAULT_SERVER_SETTINGS: dict[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}
DEFAULT_DBNAME = "aura_test"
DEFAULT_USER = "postgres"
DEFAULT_EXISTING_PORT = 5432


@dataclass(frozen=True)
class ServerOptions:
    """Where the tests' databases live.

    ``host`` set: a running server (``port`` default 5432); otherwise a
    private throw-away cluster of the server in ``bindir`` on ``port``
    (default: a free one), TimescaleDB preloaded unless
    ``timescaledb`` is false, with ``settings`` in its postgresql.conf.
    """

    host: str | None = None
    port: int | None = None
    user: str = DEFAULT_USER
    password: str | None = None
    bindir: Path | None = None
    timescaledb: bool = True
    settings: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_SERVER_SETTINGS))
    dbname: str = DEFAULT_DBNAME


def parse_settings(lines: list[str]) -> dict[str, str]:
    """``key = value`` lines (postgresql.conf syntax) as a mapping."""
    settings: dict[str, str] = {}
    for line in lines:
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        key, sep, value = text.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"aura_pg_server_settings: {line!r} is not 'name = value'")
        settings[key.strip()] = value.strip()
    return settings


def dsn_of(server: NoopExecutor, dbname: str) -> str:
    """A libpq connection string for ``dbname`` on ``server``."""
    parts = [
        f"host={server.host}",
        f"port={server.port}",
        f"user={server.user}",
        f"dbname={dbname}",
    ]
    if server.password:
        parts.append(f"password={server.password}")
    return " ".join(parts)


@contextmanager
def server_for(options: ServerOptions) -> Iterator[NoopExecutor]:
    """The server described by ``options``: the running one, or a private
    cluster started here and removed on exit."""
    from pytest_postgresql.executors import NoopExecutor

    from aura_pg.devtools.localdb import temporary_cluster

    if options.host:
        yield NoopExecutor(
            host=options.host,
            port=options.port or DEFAULT_EXISTING_PORT,
            user=options.user,
            password=options.password,
            options="",
            dbname=options.dbname,
        )
        return
    with temporary_cluster(
        options.settings,
        prefix="aura-pg-test-",
        port=options.port,
        bindir=options.bindir,
        preload_timescaledb=options.timescaledb,
    ) as cluster:
        yield NoopExecutor(
            host="127.0.0.1",
            port=cluster.port,
            user="postgres",
            options="",
            dbname=options.dbname,
        )


def _migrate(
    host: str, port: int, user: str, dbname: str, password: str | None = None, **_: Any
) -> None:
    from aura_pg import migrate

    dsn = f"host={host} port={port} user={user} dbname={dbname}"
    migrate.upgrade(f"{dsn} password={password}" if password else dsn)


@contextmanager
def migrated_template(server: NoopExecutor) -> Iterator[NoopExecutor]:
    """The template database (``server.template_dbname``), migrated once,
    that each test's database is cloned from; dropped on exit."""
    from pytest_postgresql.janitor import DatabaseJanitor

    janitor = DatabaseJanitor(
        user=server.user,
        host=server.host,
        port=server.port,
        dbname=server.template_dbname,
        password=server.password,
        as_template=True,
    )
    janitor.drop()
    with janitor:
        janitor.load(_migrate)
        # Cloning needs a template nobody is connected to, and TimescaleDB's
        # background-worker scheduler connects to every database it may.
        with janitor.cursor() as cur:
            cur.execute(
                sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(
                    sql.Identifier(server.template_dbname)
                )
            )
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (server.template_dbname,),
            )
        yield server


@contextmanager
def cloned_database(template: NoopExecutor) -> Iterator[str]:
    """A database cloned from the migrated template (``template.dbname``),
    dropped on exit; yields its connection string."""
    from pytest_postgresql.janitor import DatabaseJanitor

    janitor = DatabaseJanitor(
        user=template.user,
        host=template.host,
        port=template.port,
        dbname=template.dbname,
        template_dbname=template.template_dbname,
        password=template.password,
    )
    with janitor:
        yield dsn_of(template, template.dbname)


@contextmanager
def empty_database(server: NoopExecutor) -> Iterator[str]:
    """A database with no schema at all (for migration tests), dropped on
    exit; yields its connection string."""
    from aura_pg.devtools.localdb import free_port

    name = f"aura_empty_{os.getpid()}_{free_port()}"
    admin = dsn_of(server, "postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield dsn_of(server, name)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
