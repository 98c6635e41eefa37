"""What a program that only appends pays for at import: the store, not the
projector daemon, the catalog's YAML, the migrations, the tracing SDK or the
metrics client. Each check runs in a fresh interpreter, since this one has
imported everything already."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import aura_pg

# Loaded by the projector, the catalog, the migrations, the CLI's tracing
# setup and the metrics endpoint; an importer of the store needs none.
NOT_FOR_THE_STORE = (
    "aura_pg.projection",
    "aura_pg.projection.catalog",
    "aura_pg.observability.metrics",
    "yaml",
    "alembic",
    "sqlalchemy",
    "opentelemetry.sdk",
    "opentelemetry.instrumentation",
    "prometheus_client",
)


def modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    done = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return set(json.loads(done.stdout.splitlines()[-1]))


def loaded(modules: set[str], name: str) -> bool:
    return name in modules or any(module.startswith(f"{name}.") for module in modules)


@pytest.mark.parametrize(
    "code",
    [
        "from aura_pg import EventStore",
        "from aura_pg import AsyncEventStore, AppendRetry, NewEvent",
        "from aura_pg.store import EventStore",
    ],
)
def test_importing_the_store_loads_no_daemon_yaml_migrations_sdk_or_metrics(code: str) -> None:
    modules = modules_after(code)
    assert "aura_pg.store" in modules
    assert [name for name in NOT_FOR_THE_STORE if loaded(modules, name)] == []


def test_importing_the_package_loads_no_database_driver() -> None:
    modules = modules_after("import aura_pg")
    assert [name for name in ("psycopg", "aura_pg.store") if loaded(modules, name)] == []


def test_creating_a_store_registers_its_metrics() -> None:
    """The append metrics show on the application's /metrics once a store
    exists, before its first append, as they did when they were imported
    with the store."""
    modules = modules_after(
        "from psycopg_pool import ConnectionPool\n"
        "from aura_pg import EventStore\n"
        "EventStore(ConnectionPool('', open=False))"
    )
    assert "aura_pg.observability.metrics" in modules


def test_every_public_name_is_importable_and_listed() -> None:
    for name in aura_pg.__all__:
        assert getattr(aura_pg, name) is not None, name
    assert set(aura_pg.__all__) <= set(dir(aura_pg))
    with pytest.raises(AttributeError, match="no_such_name"):
        aura_pg.no_such_name  # type: ignore[attr-defined]  # noqa: B018
