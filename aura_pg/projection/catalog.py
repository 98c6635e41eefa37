"""The projection catalog: ``projections/catalog.yaml`` and its SQL files.

A projection is declared by an entry (name, source events, handler, error
policy, ...) and defined by a ``.sql`` file that creates its read-model
tables and handler functions. Loading validates every entry and names the
entry in each error, before anything touches a database.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from aura_pg._resources import resource_dir
from aura_pg.errors import CatalogError

PROJECTION_NAME = r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$"
SQL_IDENTIFIER = r"^[a-z_][a-z0-9_]{0,62}$"
EVENT_TYPE = r"^[A-Za-z][A-Za-z0-9_.:-]{0,199}$"

ProjectionName = Annotated[str, StringConstraints(pattern=PROJECTION_NAME, max_length=40)]
SqlIdentifier = Annotated[str, StringConstraints(pattern=SQL_IDENTIFIER)]
EventType = Annotated[str, StringConstraints(pattern=EVENT_TYPE)]

_RESERVED_SCHEMAS = frozenset({"aura", "public", "pg_catalog", "information_schema"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CircuitBreakerPolicy(_Strict):
    failure_threshold: int = Field(default=5, ge=1, le=1000)
    recovery_timeout_seconds: int = Field(default=30, ge=0, le=86400)


class ErrorHandling(_Strict):
    retry_policy: Literal["exponential_backoff"] = "exponential_backoff"
    max_retries: int = Field(default=3, ge=0, le=100)
    retry_base_ms: int = Field(default=100, ge=0, le=3_600_000)
    retry_max_ms: int = Field(default=10_000, ge=0, le=3_600_000)
    # false: a poison event is retried (with backoff, circuit breaker) until
    # an operator steps in, instead of being dead-lettered and skipped.
    dead_letter_queue: bool = True
    circuit_breaker: CircuitBreakerPolicy = CircuitBreakerPolicy()


class ProjectionSpec(_Strict):
    """One catalog entry."""

    name: ProjectionName
    description: str = ""
    sql: str = Field(min_length=1, description="the definition file, relative to the catalog")
    schema_name: SqlIdentifier | None = Field(default=None, alias="schema")
    # None (or the string "all"): every event type.
    source_events: tuple[EventType, ...] | None = None
    handler: SqlIdentifier
    handler_kind: Literal["per_event", "set_based"] = "set_based"
    forget_handler: SqlIdentifier | None = None
    output_model: str = ""
    storage: Literal["postgres", "timescaledb"] = "postgres"
    update_strategy: Literal["upsert", "append", "replace"] = "upsert"
    batch_size: int = Field(default=500, ge=1, le=100_000)
    error_handling: ErrorHandling = ErrorHandling()
    # The next version of another entry: registered and run as that
    # projection's shadow (NAME__shadow, docs/shadows.md), not on its own.
    shadow_of: ProjectionName | None = None
    # Filled in by load_catalog: the text of the definition file.
    definition_sql: str = ""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @property
    def read_model_schema(self) -> str:
        """The read model's schema (the projection's name unless set)."""
        return self.schema_name or self.name


class Catalog(_Strict):
    projections: tuple[ProjectionSpec, ...]

    def select(self, names: Sequence[str]) -> tuple[ProjectionSpec, ...]:
        """The named entries (all when ``names`` is empty), in catalog order,
        with the shadow entries of the named ones."""
        if not names:
            return self.projections
        known = {spec.name for spec in self.projections}
        unknown = [name for name in names if name not in known]
        if unknown:
            raise CatalogError(
                f"no projection named {', '.join(map(repr, unknown))} in the catalog "
                f"(it has {', '.join(sorted(known)) or 'none'})"
            )
        wanted = set(names)
        return tuple(
            spec for spec in self.projections if spec.name in wanted or spec.shadow_of in wanted
        )

    def get(self, name: str) -> ProjectionSpec:
        return next(spec for spec in self.select([name]) if spec.name == name)

    def shadow_entry(self, name: str) -> ProjectionSpec | None:
        """The entry that is the next version of ``name``, if any."""
        return next((spec for spec in self.projections if spec.shadow_of == name), None)


def default_catalog_path() -> Path:
    """The catalog shipped with aura-pg (``projections/catalog.yaml``)."""
    return Path(str(resource_dir("projections"))) / "catalog.yaml"


def _entry_label(index: int, raw: Any) -> str:
    name = raw.get("name") if isinstance(raw, dict) else None
    return f"entry {index + 1}" + (f" ({name!r})" if isinstance(name, str) else "")


def _defines_function(sql_text: str, function: str) -> bool:
    pattern = rf"CREATE\s+(OR\s+REPLACE\s+)?FUNCTION\s+(\w+\.)?\"?{re.escape(function)}\"?\s*\("
    return re.search(pattern, sql_text, re.IGNORECASE) is not None


def _check_entry(spec: ProjectionSpec, sql_text: str) -> list[str]:
    problems = []
    if spec.read_model_schema in _RESERVED_SCHEMAS:
        problems.append(f"schema {spec.read_model_schema!r} is reserved")
    if len(spec.read_model_schema) > 40:
        problems.append("schema must have at most 40 characters")
    if spec.source_events is not None and not spec.source_events:
        problems.append("source_events must name at least one type (or be 'all')")
    if spec.source_events is not None and len(set(spec.source_events)) != len(spec.source_events):
        problems.append("source_events lists a type twice")
    for role, function in (("handler", spec.handler), ("forget_handler", spec.forget_handler)):
        if function is not None and not _defines_function(sql_text, function):
            problems.append(f"{role} {function!r} is not created by {spec.sql}")
    policy = spec.error_handling
    if policy.retry_max_ms < policy.retry_base_ms:
        problems.append("error_handling.retry_max_ms is below retry_base_ms")
    return problems


def load_catalog(path: Path | str | None = None) -> Catalog:
    """Load and validate a catalog file; raises CatalogError naming the entry."""
    catalog_path = Path(path) if path is not None else default_catalog_path()
    try:
        document = yaml.safe_load(catalog_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CatalogError(f"cannot read the projection catalog {catalog_path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise CatalogError(f"{catalog_path} is not valid YAML: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("projections"), list):
        raise CatalogError(f"{catalog_path}: expected a mapping with a 'projections' list")
    unknown_keys = set(document) - {"projections"}
    if unknown_keys:
        raise CatalogError(f"{catalog_path}: unknown top-level keys {sorted(unknown_keys)}")

    specs: list[ProjectionSpec] = []
    labels: dict[str, str] = {}
    seen_names: dict[str, str] = {}
    seen_schemas: dict[str, str] = {}
    for index, raw in enumerate(document["projections"]):
        label = f"{catalog_path}: {_entry_label(index, raw)}"
        if isinstance(raw, dict) and raw.get("source_events") == "all":
            raw = {**raw, "source_events": None}
        try:
            spec = ProjectionSpec.model_validate(raw)
        except ValidationError as exc:
            details = "; ".join(
                f"{'.'.join(str(part) for part in error['loc']) or 'entry'}: {error['msg']}"
                for error in exc.errors()
            )
            raise CatalogError(f"{label}: {details}") from None
        if spec.name in seen_names:
            raise CatalogError(f"{label}: duplicate name, also {seen_names[spec.name]}")
        schema = spec.read_model_schema
        if spec.shadow_of is not None and spec.schema_name is not None:
            raise CatalogError(
                f"{label}: a shadow has no schema of its own (it builds "
                f"{spec.shadow_of}'s schema with __shadow appended)"
            )
        if spec.shadow_of is None and schema in seen_schemas:
            raise CatalogError(f"{label}: schema {schema!r} is also used by {seen_schemas[schema]}")
        sql_path = (catalog_path.parent / spec.sql).resolve()
        if not sql_path.is_relative_to(catalog_path.parent.resolve()):
            raise CatalogError(f"{label}: sql {spec.sql!r} must be inside {catalog_path.parent}")
        try:
            sql_text = sql_path.read_text(encoding="utf-8")
        except OSError as exc:
            raise CatalogError(f"{label}: cannot read {spec.sql}: {exc}") from None
        problems = _check_entry(spec, sql_text)
        if problems:
            raise CatalogError(f"{label}: {'; '.join(problems)}")
        seen_names[spec.name] = _entry_label(index, raw)
        labels[spec.name] = label
        if spec.shadow_of is None:
            seen_schemas[spec.read_model_schema] = _entry_label(index, raw)
        specs.append(spec.model_copy(update={"definition_sql": sql_text}))
    _check_shadows(specs, labels)
    return Catalog(projections=tuple(specs))


def _check_shadows(specs: Sequence[ProjectionSpec], labels: dict[str, str]) -> None:
    """Each shadow entry names a live entry of the catalog, one at most."""
    live = {spec.name for spec in specs if spec.shadow_of is None}
    shadowed: dict[str, str] = {}
    for spec in specs:
        if spec.shadow_of is None:
            continue
        label = labels[spec.name]
        if spec.shadow_of not in live:
            raise CatalogError(
                f"{label}: shadow_of {spec.shadow_of!r} is not a (live) entry of the catalog"
            )
        if spec.shadow_of in shadowed:
            raise CatalogError(
                f"{label}: {spec.shadow_of!r} has a shadow already ({shadowed[spec.shadow_of]})"
            )
        shadowed[spec.shadow_of] = spec.name
