"""aura-pg: a Postgres-native event store with SQL-first projections."""

import importlib
from typing import TYPE_CHECKING, Any, Final

from aura_pg.errors import (
    AuraPgError,
    CatalogError,
    ConcurrencyError,
    DomainError,
    EventValidationError,
    IdempotencyConflict,
    MigrationError,
    ProjectionError,
    StaleCheckpoint,
    StreamOrderConflict,
    UnknownProjection,
)
from aura_pg.models import (
    ANY,
    BACKWARDS,
    FORWARDS,
    NO_STREAM,
    START,
    STREAM_EXISTS,
    AppendedEvent,
    AppendResult,
    Checkpoint,
    Direction,
    ExpectedVersion,
    NewEvent,
    Page,
    RecordedEvent,
    StreamAppend,
    StreamState,
    uuid7,
)

if TYPE_CHECKING:
    from aura_pg.aggregates import (
        Aggregate,
        AsyncRepository,
        Event,
        EventRegistry,
        Repository,
        applies,
    )
    from aura_pg.processors import idempotency_key, partition_of, python_processor
    from aura_pg.projection.catalog import Catalog, ProjectionSpec, load_catalog
    from aura_pg.projection.daemon import ProjectorDaemon
    from aura_pg.projection.settings import ProjectorSettings
    from aura_pg.store import AppendRetry, AsyncEventStore, EventStore

# Public names whose modules are costly to import (psycopg for the store,
# PyYAML for the catalog, the whole daemon for the projector): each is
# imported on first use, so a program pays only for what it uses.
_LAZY_MODULES: Final = {
    "Aggregate": "aura_pg.aggregates",
    "AsyncRepository": "aura_pg.aggregates",
    "Event": "aura_pg.aggregates",
    "EventRegistry": "aura_pg.aggregates",
    "Repository": "aura_pg.aggregates",
    "applies": "aura_pg.aggregates",
    "AppendRetry": "aura_pg.store",
    "AsyncEventStore": "aura_pg.store",
    "EventStore": "aura_pg.store",
    "Catalog": "aura_pg.projection.catalog",
    "ProjectionSpec": "aura_pg.projection.catalog",
    "load_catalog": "aura_pg.projection.catalog",
    "ProjectorDaemon": "aura_pg.projection.daemon",
    "ProjectorSettings": "aura_pg.projection.settings",
    "idempotency_key": "aura_pg.processors",
    "partition_of": "aura_pg.processors",
    "python_processor": "aura_pg.processors",
}

__all__ = [
    "ANY",
    "BACKWARDS",
    "FORWARDS",
    "NO_STREAM",
    "START",
    "STREAM_EXISTS",
    "Aggregate",
    "AppendResult",
    "AppendRetry",
    "AppendedEvent",
    "AsyncEventStore",
    "AsyncRepository",
    "AuraPgError",
    "Catalog",
    "CatalogError",
    "Checkpoint",
    "ConcurrencyError",
    "Direction",
    "DomainError",
    "Event",
    "EventRegistry",
    "EventStore",
    "EventValidationError",
    "ExpectedVersion",
    "IdempotencyConflict",
    "MigrationError",
    "NewEvent",
    "Page",
    "ProjectionError",
    "ProjectionSpec",
    "ProjectorDaemon",
    "ProjectorSettings",
    "RecordedEvent",
    "Repository",
    "StaleCheckpoint",
    "StreamAppend",
    "StreamOrderConflict",
    "StreamState",
    "UnknownProjection",
    "applies",
    "idempotency_key",
    "load_catalog",
    "partition_of",
    "python_processor",
    "uuid7",
]


def __getattr__(name: str) -> Any:
    module = _LAZY_MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_MODULES})
