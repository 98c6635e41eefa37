"""The task service's events: pydantic payloads in a registry, one of them
versioned with an upcaster from its first shape."""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from aura_pg.aggregates import Event, EventRegistry

DEFAULT_CLAIM_TIMEOUT_SECONDS = 300.0
"""How long a claim holds when the task does not say (and for tasks created
before TASK_CREATED v2, which had no timeout)."""

TASK_EVENTS = EventRegistry()
"""What the ``Task`` aggregate writes and folds."""

INBOX_EVENTS = EventRegistry()
"""What the notification processor appends to a requester's inbox."""


@TASK_EVENTS.register
class TaskCreated(Event):
    """v2 added who asked for the task and how long a claim holds."""

    TYPE: ClassVar[str] = "TASK_CREATED"
    VERSION: ClassVar[int] = 2
    title: str
    requested_by: str
    claim_timeout_seconds: float


@TASK_EVENTS.upcaster("TASK_CREATED", 1)
def _created_v1(data: dict[str, Any]) -> dict[str, Any]:
    """v1 was ``{"title": ...}``: nobody was notified and claims held for
    the default timeout."""
    return {
        **data,
        "requested_by": "unknown",
        "claim_timeout_seconds": DEFAULT_CLAIM_TIMEOUT_SECONDS,
    }


@TASK_EVENTS.register
class TaskClaimed(Event):
    """An open task taken by an agent."""

    TYPE: ClassVar[str] = "TASK_CLAIMED"
    agent: str
    claimed_at: datetime


@TASK_EVENTS.register
class TaskReassigned(Event):
    """A task whose claim had timed out, taken by another agent."""

    TYPE: ClassVar[str] = "TASK_REASSIGNED"
    agent: str
    previous_agent: str
    claimed_at: datetime


@TASK_EVENTS.register
class TaskCompleted(Event):
    TYPE: ClassVar[str] = "TASK_COMPLETED"
    agent: str
    result: str
    completed_at: datetime


@INBOX_EVENTS.register
class TaskCompletionNoticed(Event):
    """Appended to ``inbox-<requester>`` once per completed task."""

    TYPE: ClassVar[str] = "TASK_COMPLETION_NOTICED"
    task_id: str
    title: str
    completed_by: str
    result: str
