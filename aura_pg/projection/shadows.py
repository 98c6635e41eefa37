"""Shadow projections: a new version of a projection built from the first
event into its own schema and kept live beside the current one, compared
with it exactly (both at one checkpoint, inside one transaction) and
swapped in atomically, the old version staying beside it for a rollback.

Each function is a thin call of the SQL function of the same name
(sql/functions/shadows.sql), so psql users and the CLI do the same thing:
``aura.begin_shadow``, ``aura.diff_shadow``, ``aura.promote_shadow``,
``aura.drop_shadow``. Daemons run the shadows of their projections
(:class:`aura_pg.projection.daemon.ProjectorDaemon`); ``aura-pg projections shadow``
runs one until stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from psycopg.rows import dict_row

from aura_pg._resources import named_queries
from aura_pg.errors import ProjectionError
from aura_pg.projection.admin import call_function
from aura_pg.projection.catalog import ProjectionSpec
from aura_pg.projection.connection import translate_projection_error

log = logging.getLogger("aura_pg.shadows")

SHADOW_SUFFIX = "__shadow"


def shadow_name(name: str) -> str:
    """The projection that runs ``name``'s shadow."""
    return name + SHADOW_SUFFIX


def _queries() -> dict[str, Any]:
    return named_queries("queries/shadows.sql")


def shadow_params(live: str, spec: ProjectionSpec) -> dict[str, Any]:
    """The parameters of aura.begin_shadow for ``spec`` as ``live``'s next
    version (queries/shadows.sql "begin_shadow")."""
    return {
        "name": live,
        "definition_sql": spec.definition_sql,
        "handler": spec.handler,
        "handler_kind": spec.handler_kind,
        "event_types": list(spec.source_events) if spec.source_events is not None else None,
        "forget_handler": spec.forget_handler,
    }


def begin(dsn: str, live: str, spec: ProjectionSpec) -> str:
    """Start (or resume) the shadow of ``live`` with ``spec``'s definition:
    'created', 'restarted' (a shadow of another definition was dropped) or
    'unchanged'. The shadow keeps the live projection's schema name, with
    ``__shadow`` appended, and its settings."""
    if not spec.definition_sql:
        raise ProjectionError(f"the new definition of {live} has no SQL")
    return str(call_function(dsn, _queries()["begin_shadow"], shadow_params(live, spec)))


def drop(dsn: str, live: str) -> str:
    """Drop ``live``'s shadow: its schema, row, dead letters and last diff."""
    return str(call_function(dsn, _queries()["drop_shadow"], {"name": live}))


def promote(dsn: str, live: str) -> str:
    """Swap ``live``'s shadow in; the old version becomes the shadow (so a
    second promote rolls back)."""
    return str(call_function(dsn, _queries()["promote_shadow"], {"name": live}))


@dataclass(frozen=True)
class Difference:
    """One row that differs, or a schema difference (see aura.diff_shadow)."""

    table: str
    difference: str
    total: int
    key: Any
    columns: list[str] | None
    live: Any
    shadow: Any


@dataclass(frozen=True)
class TableDiff:
    """What one table's comparison found."""

    table: str
    live_rows: int | None
    shadow_rows: int | None
    only_live: int = 0
    only_shadow: int = 0
    differs: int = 0
    missing_from: str | None = None  # 'live' or 'shadow' when the table is in one only
    column_differences: list[str] = field(default_factory=list)

    @property
    def differing_rows(self) -> int:
        return self.only_live + self.only_shadow + self.differs


@dataclass(frozen=True)
class ShadowDiff:
    """A comparison of a live read model with its shadow's at one checkpoint."""

    projection: str
    checkpoint: str | None
    tables: list[TableDiff]
    differences: list[Difference]

    @property
    def differing_rows(self) -> int:
        return sum(t.differing_rows for t in self.tables)

    @property
    def identical(self) -> bool:
        return self.differing_rows == 0 and not any(
            t.missing_from or t.column_differences for t in self.tables
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "projection": self.projection,
            "checkpoint": self.checkpoint,
            "identical": self.identical,
            "differing_rows": self.differing_rows,
            "tables": [{**asdict(t), "differing_rows": t.differing_rows} for t in self.tables],
            "differences": [asdict(d) for d in self.differences],
        }


def diff(dsn: str, live: str, limit: int = 100) -> ShadowDiff:
    """Compare ``live`` with its shadow (``aura.diff_shadow``): at most
    ``limit`` rows of each kind per table in ``differences``, the counts of
    all in ``tables``. The one behind is first brought to the other's
    checkpoint, in the same transaction as the comparison."""
    try:
        with psycopg.connect(dsn, row_factory=dict_row) as conn, conn.transaction():
            params = {"name": live, "limit": limit}
            rows = conn.execute(_queries()["diff_shadow"], params).fetchall()
    except psycopg.Error as exc:
        raise translate_projection_error(exc) or exc from None
    return _assemble(live, rows)


def _assemble(live: str, rows: Sequence[dict[str, Any]]) -> ShadowDiff:
    checkpoint: str | None = None
    tables: dict[str, TableDiff] = {}
    columns: dict[str, list[str]] = {}
    differences: list[Difference] = []
    for row in rows:
        table, kind, total = row["table_name"], row["difference"], int(row["total"] or 0)
        if kind == "table":
            checkpoint = row["key"]["checkpoint"]
            tables[table] = TableDiff(
                table,
                int(row["live"]["rows"]),
                int(row["shadow"]["rows"]),
                only_live=int(row["live"]["only_live"]),
                only_shadow=int(row["shadow"]["only_shadow"]),
                differs=int(row["live"]["differs"]),
                column_differences=columns.get(table, []),
            )
        elif kind in ("table_only_live", "table_only_shadow"):
            checkpoint = row["key"]["checkpoint"]
            in_live = kind == "table_only_live"
            tables[table] = TableDiff(
                table,
                total if in_live else None,
                None if in_live else total,
                only_live=total if in_live else 0,
                only_shadow=0 if in_live else total,
                missing_from="shadow" if in_live else "live",
            )
        else:
            if kind == "columns":
                columns[table] = list(row["columns"] or [])
            differences.append(
                Difference(
                    table, kind, total, row["key"], row["columns"], row["live"], row["shadow"]
                )
            )
    return ShadowDiff(live, checkpoint, sorted(tables.values(), key=lambda t: t.table), differences)


def status(dsn: str, live: str | None = None) -> list[dict[str, Any]]:
    """The rows of ``aura.shadow_status`` (of one projection, or all)."""
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        return conn.execute(_queries()["shadow_status"], {"name": live}).fetchall()
