"""The event store: EventStore and AsyncEventStore over one core free of I/O.

- ``event_store``: the sync and async drivers (pools, connections, sleeping)
- ``operations``: what each call runs and returns, typed errors, resending
- ``validation``: checks and JSON encoding of events and arguments
- ``retry``: AppendRetry, the policy for resending an append after a
  transient failure, and which failures are transient
"""

from aura_pg.store.event_store import AsyncEventStore, EventStore
from aura_pg.store.retry import AppendRetry

__all__ = ["AppendRetry", "AsyncEventStore", "EventStore"]
