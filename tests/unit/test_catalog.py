"""Catalog loading: every bad entry is a CatalogError that names it."""

from __future__ import annotations

from pathlib import Path

import pytest

from aura_pg.errors import CatalogError
from aura_pg.projection.catalog import default_catalog_path, load_catalog

HANDLER_SQL = (
    "CREATE FUNCTION apply_events(batch aura.events[]) RETURNS void LANGUAGE sql AS $$ $$;\n"
)

GOOD_ENTRY = """
  - name: {name}
    sql: model.sql
    source_events: [DEBATE_STARTED, DEBATE_FAILED]
    handler: apply_events
"""


def write_catalog(tmp_path: Path, body: str, sql: str = HANDLER_SQL) -> Path:
    (tmp_path / "model.sql").write_text(sql)
    path = tmp_path / "catalog.yaml"
    path.write_text(body)
    return path


def test_the_shipped_catalog_loads() -> None:
    catalog = load_catalog(default_catalog_path())
    names = [spec.name for spec in catalog.projections]
    assert "stream_summary" in names
    for spec in catalog.projections:
        assert spec.definition_sql.strip()


def test_a_good_entry_loads_with_defaults(tmp_path: Path) -> None:
    catalog = load_catalog(write_catalog(tmp_path, "projections:" + GOOD_ENTRY.format(name="m")))
    (spec,) = catalog.projections
    assert spec.read_model_schema == "m"
    assert spec.source_events == ("DEBATE_STARTED", "DEBATE_FAILED")
    assert spec.handler_kind == "set_based"
    assert spec.error_handling.max_retries == 3
    assert spec.error_handling.dead_letter_queue is True
    assert spec.definition_sql == HANDLER_SQL


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            GOOD_ENTRY.format(name="m") + GOOD_ENTRY.format(name="m"),
            r"entry 2 \('m'\): duplicate name",
        ),
        (GOOD_ENTRY.format(name="Bad-Name"), r"entry 1 \('Bad-Name'\): name"),
        (GOOD_ENTRY.format(name="two__underscores"), "two__underscores"),
        (
            GOOD_ENTRY.format(name="m").replace("DEBATE_FAILED", "not a type!"),
            r"'m'.*source_events",
        ),
        (
            GOOD_ENTRY.format(name="m").replace("apply_events", "nowhere"),
            "handler 'nowhere' is not created",
        ),
        (GOOD_ENTRY.format(name="m") + "    handler_kind: sometimes\n", "handler_kind"),
        (GOOD_ENTRY.format(name="m") + "    colour: blue\n", "colour"),
        (GOOD_ENTRY.format(name="m") + "    schema: aura\n", "reserved"),
        (
            GOOD_ENTRY.format(name="m").replace("[DEBATE_STARTED, DEBATE_FAILED]", "[]"),
            "at least one",
        ),
        (GOOD_ENTRY.format(name="m").replace("model.sql", "../outside.sql"), "must be inside"),
        (
            GOOD_ENTRY.format(name="m").replace("model.sql", "missing.sql"),
            "cannot read missing.sql",
        ),
        (
            GOOD_ENTRY.format(name="m")
            + "    error_handling:\n      retry_base_ms: 500\n      retry_max_ms: 100\n",
            "retry_max_ms",
        ),
        (
            GOOD_ENTRY.format(name="m") + GOOD_ENTRY.format(name="n") + "    schema: m\n",
            r"entry 2 \('n'\): schema 'm' is also used",
        ),
    ],
)
def test_bad_entries_are_named(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(CatalogError, match=message):
        load_catalog(write_catalog(tmp_path, "projections:" + body))


def test_bad_documents(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="not valid YAML"):
        load_catalog(write_catalog(tmp_path, "projections: [\n"))
    with pytest.raises(CatalogError, match="'projections' list"):
        load_catalog(write_catalog(tmp_path, "- just a list\n"))
    with pytest.raises(CatalogError, match="unknown top-level"):
        load_catalog(write_catalog(tmp_path, "projections: []\nextra: 1\n"))
    with pytest.raises(CatalogError, match="cannot read"):
        load_catalog(tmp_path / "nope.yaml")


def test_select_names_unknown_projections(tmp_path: Path) -> None:
    catalog = load_catalog(write_catalog(tmp_path, "projections:" + GOOD_ENTRY.format(name="m")))
    assert catalog.select([]) == catalog.projections
    with pytest.raises(CatalogError, match="no projection named 'x'"):
        catalog.select(["x"])


SHADOW_ENTRY = """
  - name: {name}
    sql: model.sql
    handler: apply_events
    shadow_of: {target}
"""


def test_a_shadow_entry_shares_its_target_schema_and_comes_with_it(tmp_path: Path) -> None:
    body = (
        "projections:"
        + SHADOW_ENTRY.format(name="m_v2", target="m")
        + GOOD_ENTRY.format(name="m")
        + GOOD_ENTRY.format(name="other")
    )
    catalog = load_catalog(write_catalog(tmp_path, body))
    assert [spec.name for spec in catalog.select(["m"])] == ["m_v2", "m"]
    assert catalog.get("m").name == "m"  # not the shadow listed before it
    assert [spec.name for spec in catalog.select(["other"])] == ["other"]
    shadow = catalog.shadow_entry("m")
    assert shadow is not None and shadow.shadow_of == "m"
    assert catalog.shadow_entry("other") is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (SHADOW_ENTRY.format(name="m_v2", target="nope"), "shadow_of 'nope' is not a"),
        (
            SHADOW_ENTRY.format(name="m_v2", target="m")
            + SHADOW_ENTRY.format(name="m_v3", target="m"),
            r"entry 3 \('m_v3'\): 'm' has a shadow already",
        ),
        (
            SHADOW_ENTRY.format(name="m_v2", target="m")
            + SHADOW_ENTRY.format(name="m_v3", target="m_v2"),
            "shadow_of 'm_v2' is not a",
        ),
        (
            SHADOW_ENTRY.format(name="m_v2", target="m") + "    schema: elsewhere\n",
            "a shadow has no schema of its own",
        ),
    ],
)
def test_bad_shadow_entries_are_refused(tmp_path: Path, body: str, message: str) -> None:
    path = write_catalog(tmp_path, "projections:" + GOOD_ENTRY.format(name="m") + body)
    with pytest.raises(CatalogError, match=message):
        load_catalog(path)
