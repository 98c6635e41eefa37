"""Build your own domain on aura-pg: versioned events, aggregates, and
repositories with conflict retries and snapshots (docs/aggregates.md)."""

from aura_pg.aggregates.aggregate import Aggregate, applies
from aura_pg.aggregates.events import RECORDED, Event, EventRegistry, is_recorded
from aura_pg.aggregates.repository import (
    AsyncRepository,
    CommandResult,
    Repository,
    RetryPolicy,
)
from aura_pg.errors import DomainError

__all__ = [
    "RECORDED",
    "Aggregate",
    "AsyncRepository",
    "CommandResult",
    "DomainError",
    "Event",
    "EventRegistry",
    "Repository",
    "RetryPolicy",
    "applies",
    "is_recorded",
]
