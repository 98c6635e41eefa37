"""The wheel ships the SQL, the migrations and the projections, and asks
for what the package runs on: no test, lint, benchmark or chaos tool."""

from __future__ import annotations

import email.parser
import re
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hatchling.builders.wheel import WheelBuilder
from packaging.requirements import Requirement

REPO_ROOT = Path(__file__).resolve().parents[2]
PYPROJECT: dict[str, Any] = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())

# Development tools: in dependency groups, never required by the package.
DEV_TOOLS = {
    "pytest",
    "pytest-postgresql",
    "pytest-asyncio",
    "pytest-timeout",
    "hypothesis",
    "ruff",
    "mypy",
    "types-pyyaml",
    "eventsourcing",
    "matplotlib",
    "py-spy",
    "hatchling",
}
CHAOS_TOOLKIT = {"chaostoolkit", "chaostoolkit-lib"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zipfile.ZipFile]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SOURCE_DATE_EPOCH", "1700000000")
        builder = WheelBuilder(str(REPO_ROOT))
        (built,) = list(
            builder.build(directory=str(tmp_path_factory.mktemp("wheel")), versions=["standard"])
        )
    with zipfile.ZipFile(built) as archive:
        yield archive


def requirements(wheel: zipfile.ZipFile) -> tuple[list[Requirement], set[str]]:
    """The wheel's Requires-Dist and Provides-Extra."""
    (metadata_path,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    metadata = email.parser.Parser().parsestr(wheel.read(metadata_path).decode())
    required = [Requirement(text) for text in metadata.get_all("Requires-Dist") or []]
    return required, set(metadata.get_all("Provides-Extra") or [])


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_wheel_contains_sql_and_migrations(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    for expected in (
        "aura_pg/_sql/install.sql",
        "aura_pg/_sql/functions/append_events.sql",
        "aura_pg/_sql/queries/store.sql",
        "aura_pg/_migrations/env.py",
        "aura_pg/_migrations/versions/0001_event_store_core.py",
        "aura_pg/_migrations/versions/0002_projections_outbox.py",
        "aura_pg/_migrations/versions/0003_observed_batches.py",
        "aura_pg/_migrations/versions/0004_notify_opt_in.py",
        "aura_pg/_sql/triggers/notify_events.sql",
        "aura_pg/_migrations/sql/0004_notify_opt_in.sql",
        "aura_pg/_migrations/sql/0010_projection_recovery.sql",
        "aura_pg/_migrations/versions/0010_projection_recovery.py",
        "aura_pg/_sql/functions/project_batch.sql",
        "aura_pg/_sql/queries/metrics.sql",
        "aura_pg/observability/names.py",
        "aura_pg/_sql/queries/projector.sql",
        "aura_pg/_sql/queries/relay.sql",
        "aura_pg/_projections/catalog.yaml",
        "aura_pg/_projections/stream_summary.sql",
        "aura_pg/py.typed",
        "aura_pg/store/__init__.py",
        "aura_pg/store/event_store.py",
        "aura_pg/store/operations.py",
    ):
        assert expected in names, expected
    assert not any(name.startswith(("tests/", "load/")) for name in names)


def test_installing_the_package_installs_no_dev_tool_and_no_chaos_toolkit(
    wheel: zipfile.ZipFile,
) -> None:
    required, _ = requirements(wheel)
    always = {normalized(r.name) for r in required if r.marker is None}
    assert {"psycopg", "psycopg-pool", "pydantic", "prometheus-client"} <= always
    assert always & (DEV_TOOLS | CHAOS_TOOLKIT) == set()


def test_the_extras_are_binary_nats_webhook_chaos_and_testing(wheel: zipfile.ZipFile) -> None:
    required, extras = requirements(wheel)
    assert extras == {"binary", "nats", "webhook", "chaos", "testing"}
    by_extra = {
        extra: {
            normalized(r.name)
            for r in required
            if r.marker is not None and r.marker.evaluate({"extra": extra})
        }
        for extra in extras
    }
    assert by_extra == {
        "binary": {"psycopg"},
        "nats": {"nats-py"},
        "webhook": {"httpx", "sniffio"},
        "chaos": CHAOS_TOOLKIT,
        "testing": {"pytest", "pytest-postgresql", "pytest-asyncio"},
    }


def test_the_pytest_plugin_is_registered_as_an_entry_point(wheel: zipfile.ZipFile) -> None:
    (path,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    text = wheel.read(path).decode()
    section = text.split("[pytest11]", 1)[1].split("[", 1)[0]
    assert [line.strip() for line in section.splitlines() if line.strip()] == [
        "aura_pg = aura_pg.testing.plugin"
    ]


def test_dev_tools_are_dependency_groups_and_dev_includes_them_all() -> None:
    groups: dict[str, list[Any]] = PYPROJECT["dependency-groups"]
    listed = {
        normalized(Requirement(item).name)
        for name, items in groups.items()
        for item in items
        if isinstance(item, str)
    }
    assert listed >= DEV_TOOLS
    assert groups["dev"] == [{"include-group": name} for name in ("test", "lint", "bench")]


def test_the_install_script_installs_every_extra_and_the_dev_group() -> None:
    script = (REPO_ROOT / "scripts" / "install-system.sh").read_text()
    assert '-e "$ROOT[binary,nats,webhook,chaos,testing]"' in script
    assert '--group "$ROOT/pyproject.toml:dev"' in script
    assert '--upgrade "pip>=25.1"' in script  # pip learnt --group in 25.1
