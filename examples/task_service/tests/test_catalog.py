"""The service's catalog run by a real daemon: the SQL read model of open
tasks per agent, and the processor's notices, exactly once."""

from __future__ import annotations

from collections.abc import Callable

from aura_pg import EventStore, NewEvent
from task_service.events import INBOX_EVENTS, TaskCompletionNoticed
from task_service.notifications import inbox_stream
from task_service.service import TaskService
from task_service.tests.conftest import Clock, RunCatalog

Query = Callable[..., list[tuple[object, ...]]]


def busy_day(service: TaskService, store: EventStore, clock: Clock) -> None:
    for n in range(1, 7):
        service.create(f"t{n}", f"task {n}", requested_by="ada", claim_timeout_seconds=60)
    store.append("task-t7", [NewEvent("TASK_CREATED", {"title": "task 7 (v1)"})])
    service.claim("t2", "agent-a")
    service.claim("t3", "agent-a")
    service.claim("t4", "agent-b")
    service.complete("t4", "agent-b", "done")
    service.claim("t5", "agent-a")
    service.claim("t7", "agent-c")
    clock.advance(60)
    service.claim("t5", "agent-b")  # taken over from agent-a
    service.claim("t6", "agent-c")
    service.complete("t6", "agent-c", "done")


async def test_the_read_model_holds_open_tasks_per_agent(
    service: TaskService, store: EventStore, clock: Clock, run_catalog: RunCatalog, query: Query
) -> None:
    busy_day(service, store, clock)
    await run_catalog("open_tasks")

    rows = query(
        "SELECT task_id, title, agent, claim_timeout_seconds, claims"
        " FROM open_tasks.tasks ORDER BY task_id"
    )
    assert rows == [
        ("t1", "task 1", None, 60, 0),
        ("t2", "task 2", "agent-a", 60, 1),
        ("t3", "task 3", "agent-a", 60, 1),
        ("t5", "task 5", "agent-b", 60, 2),
        ("t7", "task 7 (v1)", "agent-c", 300, 1),
    ]
    # The read model agrees with the aggregates, task by task.
    for task_id, _, agent, _, claims in rows:
        task = service.get(str(task_id))
        assert task.status != "completed"
        assert (task.agent, task.claims) == (agent, claims)
    for n in (4, 6):
        assert service.get(f"t{n}").status == "completed"
    assert query("SELECT agent, open_tasks FROM open_tasks.per_agent ORDER BY agent") == [
        ("agent-a", 2),
        ("agent-b", 1),
        ("agent-c", 1),
    ]

    # Later events are folded in by the next run.
    service.complete("t5", "agent-b", "done")
    service.claim("t1", "agent-c")
    await run_catalog("open_tasks")
    assert query("SELECT agent, open_tasks FROM open_tasks.per_agent ORDER BY agent") == [
        ("agent-a", 2),
        ("agent-c", 2),
    ]


def notices(store: EventStore, requester: str) -> list[TaskCompletionNoticed]:
    decoded = [INBOX_EVENTS.decode(event) for event in store.read_stream(inbox_stream(requester))]
    assert all(isinstance(notice, TaskCompletionNoticed) for notice in decoded)
    return sorted(
        (notice for notice in decoded if isinstance(notice, TaskCompletionNoticed)),
        key=lambda notice: notice.task_id,
    )


async def test_each_completion_is_noticed_exactly_once(
    service: TaskService, store: EventStore, clock: Clock, run_catalog: RunCatalog, query: Query
) -> None:
    busy_day(service, store, clock)
    service.create("b1", "for bob", requested_by="bob")
    service.claim("b1", "agent-d")
    service.complete("b1", "agent-d", "sent")
    service.claim("t7", "agent-c")
    service.complete("t7", "agent-c", "old but done")  # requester unknown (v1)

    await run_catalog()
    expected_ada = [
        TaskCompletionNoticed(task_id="t4", title="task 4", completed_by="agent-b", result="done"),
        TaskCompletionNoticed(task_id="t6", title="task 6", completed_by="agent-c", result="done"),
    ]
    assert notices(store, "ada") == expected_ada
    assert notices(store, "bob") == [
        TaskCompletionNoticed(task_id="b1", title="for bob", completed_by="agent-d", result="sent")
    ]
    assert [n.task_id for n in notices(store, "unknown")] == ["t7"]

    # Deliver every completion again (an operator's reset): each notice is a
    # recorded duplicate, not a second one.
    query("SELECT aura.reset_projection('task_notifications')")
    assert query(
        "SELECT events_behind FROM aura.projection_status WHERE name = 'task_notifications'"
    ) == [(4,)]
    await run_catalog("task_notifications")
    assert notices(store, "ada") == expected_ada
    assert len(notices(store, "bob")) == 1
    assert len(notices(store, "unknown")) == 1
    assert query("SELECT count(*) FROM aura.events WHERE type = 'TASK_COMPLETION_NOTICED'") == [
        (4,)
    ]
