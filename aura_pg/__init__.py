"""aura-pg: a Postgres-native event store with SQL-first projections."""

from aura_pg.errors import (
    AuraPgError,
    ConcurrencyError,
    EventValidationError,
    IdempotencyConflict,
    MigrationError,
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
from aura_pg.store import AsyncEventStore, EventStore

__all__ = [
    "ANY",
    "BACKWARDS",
    "FORWARDS",
    "NO_STREAM",
    "START",
    "STREAM_EXISTS",
    "AppendResult",
    "AppendedEvent",
    "AsyncEventStore",
    "AuraPgError",
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
    "RecordedEvent",
    "StreamState",
    "uuid7",
]
