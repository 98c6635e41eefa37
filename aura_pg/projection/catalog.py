"""The projection catalog: ``projections/catalog.yaml`` and its SQL files.

A projection is declared by an entry (name, source events, handler, error
policy, ...). A SQL projection (``kind: sql``, the default) is defined by a
``.sql`` file that creates its read-model tables and handler functions; a
Python processor (``kind: python``) names a ``module:callable`` the daemon
imports. Loading validates every entry and names the entry in each error,
before anything touches a database.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from aura_pg._resources import resource_dir
from aura_pg.errors import CatalogError

PROJECTION_NAME = r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$"
SQL_IDENTIFIER = r"^[a-z_][a-z0-9_]{0,62}$"
EVENT_TYPE = r"^[A-Za-z][A-Za-z0-9_.:-]{0,199}$"
_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
# A Python processor's handler: "package.module:callable" (aura.projection_checkpoints
# checks the same pattern).
PYTHON_HANDLER = rf"^{_DOTTED}:{_DOTTED}$"
MAX_PARTITIONS = 64
# The settings only one kind of entry has: named in the error when set on the other.
_SQL_ONLY = (
    "sql",
    "schema_name",
    "handler_kind",
    "forget_handler",
    "shadow_of",
    "output_model",
    "storage",
    "update_strategy",
)
_PYTHON_ONLY = ("partitions", "batch_timeout_seconds")

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
    # sql: a read model folded by SQL functions; python: a processor whose
    # handler the daemon runs (docs/python-processors.md).
    kind: Literal["sql", "python"] = "sql"
    sql: str | None = Field(
        default=None, min_length=1, description="the definition file, relative to the catalog"
    )
    schema_name: SqlIdentifier | None = Field(default=None, alias="schema")
    # None (or the string "all"): every event type.
    source_events: tuple[EventType, ...] | None = None
    # A function of the definition file (sql), or "module:callable" (python).
    handler: str = Field(min_length=1, max_length=300)
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
    # Python processors: split by stream into this many partitions
    # (NAME/0 .. NAME/N-1), each with its own checkpoint and owner.
    partitions: int = Field(default=1, ge=1, le=MAX_PARTITIONS)
    # Python processors: a batch whose handler runs longer fails (rolled back).
    batch_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    # Filled in by load_catalog: the text of the definition file.
    definition_sql: str = ""
    # A processor given in code (aura_pg.processors.python_processor): its
    # handler itself, so that it need not be importable by name.
    handler_function: Any = Field(default=None, exclude=True, repr=False)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _fits_kind(self) -> Self:
        other = _SQL_ONLY if self.kind == "python" else _PYTHON_ONLY
        misplaced = sorted(
            ("schema" if field == "schema_name" else field)
            for field in self.model_fields_set & set(other)
        )
        if misplaced:
            raise ValueError(f"{', '.join(misplaced)}: not a setting of a kind {self.kind} entry")
        if self.kind == "sql":
            if self.sql is None:
                raise ValueError("sql: a SQL projection needs its definition file")
            if re.fullmatch(SQL_IDENTIFIER, self.handler) is None:
                raise ValueError(f"handler: {self.handler!r} is not a SQL function name")
        elif re.fullmatch(PYTHON_HANDLER, self.handler) is None:
            raise ValueError(f"handler: {self.handler!r} is not 'package.module:callable'")
        return self

    @property
    def is_python(self) -> bool:
        return self.kind == "python"

    @property
    def read_model_schema(self) -> str:
        """The read model's schema (the projection's name unless set)."""
        return self.schema_name or self.name

    @property
    def row_names(self) -> tuple[str, ...]:
        """Its rows in aura.projection_checkpoints: the name, or one per
        partition (NAME/0 .. NAME/N-1)."""
        if self.partitions == 1:
            return (self.name,)
        return tuple(f"{self.name}/{index}" for index in range(self.partitions))


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


def _check_source_events(spec: ProjectionSpec) -> list[str]:
    problems = []
    if spec.source_events is not None and not spec.source_events:
        problems.append("source_events must name at least one type (or be 'all')")
    if spec.source_events is not None and len(set(spec.source_events)) != len(spec.source_events):
        problems.append("source_events lists a type twice")
    policy = spec.error_handling
    if policy.retry_max_ms < policy.retry_base_ms:
        problems.append("error_handling.retry_max_ms is below retry_base_ms")
    return problems


def _check_entry(spec: ProjectionSpec, sql_text: str) -> list[str]:
    problems = []
    if spec.read_model_schema in _RESERVED_SCHEMAS:
        problems.append(f"schema {spec.read_model_schema!r} is reserved")
    if len(spec.read_model_schema) > 40:
        problems.append("schema must have at most 40 characters")
    problems.extend(_check_source_events(spec))
    for role, function in (("handler", spec.handler), ("forget_handler", spec.forget_handler)):
        if function is not None and not _defines_function(sql_text, function):
            problems.append(f"{role} {function!r} is not created by {spec.sql}")
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
        if spec.is_python:
            problems = _check_source_events(spec)
            if problems:
                raise CatalogError(f"{label}: {'; '.join(problems)}")
            seen_names[spec.name] = _entry_label(index, raw)
            labels[spec.name] = label
            specs.append(spec)
            continue
        assert spec.sql is not None  # a sql entry has its file (_fits_kind)
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
    live = {spec.name for spec in specs if spec.shadow_of is None and not spec.is_python}
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
