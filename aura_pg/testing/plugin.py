"""The aura-pg pytest plugin (entry point ``pytest11: aura_pg``).

Fixtures (all against a real Postgres):

``aura_dsn``            a fresh migrated database per test (its connection string)
``event_store``         an EventStore on it
``async_event_store``   an AsyncEventStore on it
``run_projections``     run catalog entries until they have caught up
``aggregate_scenario``  given/when/then for an aggregate through a Repository
``async_aggregate_scenario``  the same through an AsyncRepository
``aura_empty_dsn``      a fresh database with no schema (migration tests)
``aura_pg_server``      the session's server (a pytest-postgresql NoopExecutor)
``aura_pg_template``    the migrated template every test database is cloned from

The session starts a private cluster (TimescaleDB preloaded; as the
``postgres`` user when run as root) on first use and removes it at the
end; the migrations run once, into a template that each test's database
is cloned from. Options: ``pytest --help`` under "aura-pg", or
docs/testing.md.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from aura_pg.testing.databases import (
    DEFAULT_DBNAME,
    DEFAULT_SERVER_SETTINGS,
    DEFAULT_USER,
    ServerOptions,
    cloned_database,
    empty_database,
    migrated_template,
    parse_settings,
    server_for,
)
from aura_pg.testing.projections import DEFAULT_TIMEOUT, run_until_caught_up

if TYPE_CHECKING:
    from pytest_postgresql.executors import NoopExecutor

    from aura_pg import AsyncEventStore, EventStore
    from aura_pg.aggregates import Aggregate
    from aura_pg.projection.catalog import Catalog, ProjectionSpec
    from aura_pg.testing.scenarios import AggregateScenario

try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - the plugin's extra installs it
    pytest_asyncio = None  # type: ignore[assignment]

# (option, environment variable, help); each is a command-line flag
# --aura-pg-NAME, an ini option aura_pg_NAME and the variable, in that order
# of precedence.
_VALUE_OPTIONS: tuple[tuple[str, str, str], ...] = (
    (
        "host",
        "AURA_PG_TEST_HOST",
        "use the running Postgres server on this host instead of starting a private cluster",
    ),
    (
        "port",
        "AURA_PG_TEST_PORT",
        "port of that server (default 5432), or of the private cluster (default: a free port)",
    ),
    ("user", "AURA_PG_TEST_USER", f"user on a running server (default {DEFAULT_USER})"),
    ("password", "AURA_PG_TEST_PASSWORD", "password on a running server (default none)"),
    (
        "bindir",
        "AURA_PG_TEST_BINDIR",
        "bin directory of the Postgres server for the private cluster (pg_ctl, initdb; "
        "default: the newest /usr/lib/postgresql/*/bin, then pg_ctl on PATH)",
    ),
    (
        "dbname",
        "AURA_PG_TEST_DBNAME",
        f"name of each test's database; the template is NAME_tmpl (default {DEFAULT_DBNAME})",
    ),
    (
        "catalog",
        "AURA_PG_TEST_CATALOG",
        "projection catalog that run_projections looks names up in "
        "(default: the catalog shipped with aura-pg)",
    ),
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("aura-pg", "aura-pg: a private Postgres with the aura schema")
    for name, variable, text in _VALUE_OPTIONS:
        flag = "--aura-pg-" + name
        group.addoption(
            flag,
            dest="aura_pg_" + name,
            metavar=name.upper(),
            default=None,
            help=f"{text} [{variable}]",
        )
        parser.addini("aura_pg_" + name, f"{text} [{flag}, {variable}]", default=None)
    group.addoption(
        "--aura-pg-no-timescaledb",
        dest="aura_pg_no_timescaledb",
        action="store_true",
        default=False,
        help="do not preload TimescaleDB in the private cluster",
    )
    parser.addini(
        "aura_pg_timescaledb",
        "preload TimescaleDB in the private cluster (default true)",
        type="bool",
        default=True,
    )
    parser.addini(
        "aura_pg_server_settings",
        "postgresql.conf lines 'name = value' for the private cluster (default: "
        + ", ".join(f"{k} = {v}" for k, v in DEFAULT_SERVER_SETTINGS.items())
        + ")",
        type="linelist",
        default=[f"{key} = {value}" for key, value in DEFAULT_SERVER_SETTINGS.items()],
    )


def option(config: pytest.Config, name: str) -> str | None:
    """The value of option ``name``: its flag, its environment variable,
    then its ini option."""
    variable = next(v for n, v, _ in _VALUE_OPTIONS if n == name)
    value = config.getoption("aura_pg_" + name) or os.environ.get(variable)
    if value:
        return str(value)
    ini = config.getini("aura_pg_" + name)
    return str(ini) if ini else None


def server_options(config: pytest.Config) -> ServerOptions:
    """The plugin's options as ServerOptions."""
    port = option(config, "port")
    bindir = option(config, "bindir")
    return ServerOptions(
        host=option(config, "host"),
        port=int(port) if port else None,
        user=option(config, "user") or DEFAULT_USER,
        password=option(config, "password"),
        bindir=Path(bindir) if bindir else None,
        timescaledb=bool(config.getini("aura_pg_timescaledb"))
        and not config.getoption("aura_pg_no_timescaledb"),
        settings=parse_settings(config.getini("aura_pg_server_settings")),
        dbname=option(config, "dbname") or DEFAULT_DBNAME,
    )


@pytest.fixture(scope="session")
def aura_pg_server(pytestconfig: pytest.Config) -> Iterator[NoopExecutor]:
    """The session's Postgres server: a private cluster started on first
    use and removed at the end, or the running one the options name."""
    with server_for(server_options(pytestconfig)) as server:
        yield server


@pytest.fixture(scope="session")
def aura_pg_template(aura_pg_server: NoopExecutor) -> Iterator[NoopExecutor]:
    """The migrated template database every test database is cloned from
    (migrated once per session)."""
    with migrated_template(aura_pg_server) as template:
        yield template


@pytest.fixture
def aura_dsn(aura_pg_template: NoopExecutor) -> Iterator[str]:
    """Connection string of this test's own fresh, migrated database."""
    with cloned_database(aura_pg_template) as dsn:
        yield dsn


@pytest.fixture
def aura_empty_dsn(aura_pg_server: NoopExecutor) -> Iterator[str]:
    """A fresh database with no schema at all (for migration tests)."""
    with empty_database(aura_pg_server) as dsn:
        yield dsn


@pytest.fixture
def event_store(aura_dsn: str) -> Iterator[EventStore]:
    """An EventStore (a pool of up to 20 connections) on this test's database."""
    from aura_pg import EventStore

    with EventStore.connect(aura_dsn, max_size=20) as store:
        yield store


if pytest_asyncio is not None:

    @pytest_asyncio.fixture
    async def async_event_store(aura_dsn: str) -> AsyncIterator[AsyncEventStore]:
        """An AsyncEventStore (up to 10 connections) on this test's database."""
        from aura_pg import AsyncEventStore

        async with await AsyncEventStore.connect(aura_dsn, max_size=10) as store:
            yield store

else:  # pragma: no cover

    @pytest.fixture
    def async_event_store() -> None:
        """Needs pytest-asyncio."""
        raise pytest.UsageError(
            "async_event_store needs pytest-asyncio (pip install pytest-asyncio)"
        )


RunProjections = Callable[..., list[dict[str, Any]]]


@pytest.fixture
def run_projections(aura_dsn: str, pytestconfig: pytest.Config) -> RunProjections:
    """``run_projections(*entries, catalog=None, timeout=30.0,
    allow_dead_letters=False)``: run catalog entries (ProjectionSpecs of
    either kind, e.g. ``python_processor(...)``, or names in ``catalog``,
    default the ``aura_pg_catalog`` option, then the shipped catalog) in a
    ProjectorDaemon on this test's database until each has
    ``events_behind = 0`` in ``aura.projection_status``; returns their
    status rows. Fails the test on timeout or a dead-lettered event."""
    configured = option(pytestconfig, "catalog")
    default_catalog = Path(pytestconfig.rootpath, configured) if configured else None

    def run(
        *entries: ProjectionSpec | str,
        catalog: Catalog | Path | str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        allow_dead_letters: bool = False,
    ) -> list[dict[str, Any]]:
        return run_until_caught_up(
            aura_dsn,
            *entries,
            catalog=catalog if catalog is not None else default_catalog,
            timeout=timeout,
            allow_dead_letters=allow_dead_letters,
        )

    return run


@pytest.fixture
def aggregate_scenario(
    event_store: EventStore,
) -> Callable[..., AggregateScenario[Any]]:
    """``aggregate_scenario(Task, "42")``: an AggregateScenario whose
    given events are appended to this test's database and whose command
    runs through a Repository (``.given(...).when(...).then(...)``)."""
    from aura_pg.aggregates import Repository
    from aura_pg.testing.scenarios import AggregateScenario

    def make(aggregate: type[Aggregate], aggregate_id: str = "1") -> AggregateScenario[Any]:
        return AggregateScenario(
            aggregate, aggregate_id, repository=Repository(event_store, aggregate)
        )

    return make


@pytest.fixture
def async_aggregate_scenario(
    async_event_store: AsyncEventStore,
) -> Callable[..., AggregateScenario[Any]]:
    """``async_aggregate_scenario(Task, "42")``: an AggregateScenario
    through an AsyncRepository on this test's database
    (``await ....then_async(...)``, ``await ....then_fails_async(code)``)."""
    from aura_pg.aggregates import AsyncRepository
    from aura_pg.testing.scenarios import AggregateScenario

    def make(aggregate: type[Aggregate], aggregate_id: str = "1") -> AggregateScenario[Any]:
        return AggregateScenario(
            aggregate, aggregate_id, repository=AsyncRepository(async_event_store, aggregate)
        )

    return make
