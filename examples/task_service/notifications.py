"""A Python processor (catalog entry ``task_notifications``): when a task is
completed, append a notice to its requester's inbox stream.

It reads the task through a ``Repository`` bound to the batch's
connection (snapshots included) and appends on that connection, so the
notice commits with the processor's checkpoint; it keys the notice by its
cause (``idempotency_key``): a redelivered completion (a reset, a replay,
a dead-letter retry) is a recorded duplicate, never a second notice.
"""

from __future__ import annotations

from typing import Any

import psycopg

from aura_pg import EventStore, RecordedEvent
from aura_pg.aggregates import Repository
from aura_pg.processors import idempotency_key

from .aggregate import Task
from .events import INBOX_EVENTS, TASK_EVENTS, TaskCompleted, TaskCompletionNoticed

STORE = EventStore()  # no pool: every call passes the batch's connection


def inbox_stream(requester: str) -> str:
    return f"inbox-{requester}"


def notify_requester(events: list[RecordedEvent], conn: psycopg.Connection[Any]) -> None:
    tasks = Repository(STORE, Task, conn=conn)
    for event in events:  # TASK_COMPLETED only (the catalog's source_events)
        completed = TASK_EVENTS.decode_as(event, TaskCompleted)
        task_id = Task.aggregate_id(event.stream_id)
        if task_id is None:
            continue  # a TASK_COMPLETED outside a task stream is not ours
        task = tasks.load(task_id)
        notice = TaskCompletionNoticed(
            task_id=task_id,
            title=task.title,
            completed_by=completed.agent,
            result=completed.result,
        )
        STORE.append(
            inbox_stream(task.requested_by),
            [INBOX_EVENTS.encode(notice, idempotency_key=idempotency_key(event, "notify"))],
            conn=conn,
        )
