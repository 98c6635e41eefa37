"""aura-pg: a Postgres-native event store with SQL-first projections."""

from aura_pg.errors import (
    AuraPgError,
    CatalogError,
    ConcurrencyError,
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
    StreamState,
    uuid7,
)
from aura_pg.projection.catalog import Catalog, ProjectionSpec, load_catalog
from aura_pg.projection.daemon import ProjectorDaemon
from aura_pg.projection.settings import ProjectorSettings
from aura_pg.retry import AppendRetry
from aura_pg.store import AsyncEventStore, EventStore

__all__ = [
    "ANY",
    "BACKWARDS",
    "FORWARDS",
    "NO_STREAM",
    "START",
    "STREAM_EXISTS",
    "AppendResult",
    "AppendRetry",
    "AppendedEvent",
    "AsyncEventStore",
    "AuraPgError",
    "Catalog",
    "CatalogError",
    "Checkpoint",
    "ConcurrencyError",
    "Direction",
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
    "StaleCheckpoint",
    "StreamOrderConflict",
    "StreamState",
    "UnknownProjection",
    "load_catalog",
    "uuid7",
]
