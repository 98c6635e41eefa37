"""The ``Task`` aggregate: a task is created, claimed by one agent at a
time, and completed by the agent that holds it.

The claim rule: a claim holds for the task's ``claim_timeout_seconds``.
While it holds, another agent's claim is refused (``claim_held``); once
it has timed out, another agent's claim reassigns the task. A claim never
lapses by itself: until someone takes the task over, its holder may still
complete it late. Racing claims are settled by the repository's
optimistic concurrency: the loser's command runs again on the winner's
state and is refused.

Commands never read the clock: the service passes ``now``, so a command
is a function of the state and its arguments (it may run several times).
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Any, Literal, Self

from aura_pg import NewEvent
from aura_pg.aggregates import Aggregate, DomainError, applies

from .events import TASK_EVENTS, TaskClaimed, TaskCompleted, TaskCreated, TaskReassigned

Status = Literal["new", "open", "claimed", "completed"]


class Task(Aggregate):
    events = TASK_EVENTS
    stream_prefix = "task"  # task "42" lives in stream "task-42"
    snapshot_every = 5  # reassignments pile up on a task nobody finishes
    snapshot_version = 1
    snapshot_type = "task"  # the same whether imported as task_service or examples.task_service

    def __init__(self, aggregate_id: str) -> None:
        super().__init__(aggregate_id)
        self.status: Status = "new"
        self.title = ""
        self.requested_by = ""
        self.claim_timeout = timedelta(seconds=0)
        self.agent: str | None = None
        self.claimed_at: datetime | None = None
        self.claims = 0
        self.result: str | None = None

    # -- appliers: the only place the state changes --------------------------

    @applies(TaskCreated)
    def _created(self, event: TaskCreated) -> None:
        self.status = "open"
        self.title = event.title
        self.requested_by = event.requested_by
        self.claim_timeout = timedelta(seconds=event.claim_timeout_seconds)

    @applies(TaskClaimed, TaskReassigned)
    def _claimed(self, event: TaskClaimed | TaskReassigned) -> None:
        self.status = "claimed"
        self.agent = event.agent
        self.claimed_at = event.claimed_at
        self.claims += 1

    @applies(TaskCompleted)
    def _completed(self, event: TaskCompleted) -> None:
        self.status = "completed"
        self.agent = event.agent
        self.result = event.result

    # -- commands: check the rules, return events or raise DomainError -------

    def create(
        self, title: str, *, requested_by: str, claim_timeout_seconds: float
    ) -> list[NewEvent]:
        if self.status != "new":
            raise DomainError(f"task {self.id} exists already", code="already_created")
        if not title.strip():
            raise DomainError("a task needs a title", code="invalid_title")
        if not math.isfinite(claim_timeout_seconds) or claim_timeout_seconds <= 0:
            raise DomainError(
                f"claim timeout must be a positive number of seconds, not {claim_timeout_seconds}",
                code="invalid_timeout",
            )
        created = TaskCreated(
            title=title, requested_by=requested_by, claim_timeout_seconds=claim_timeout_seconds
        )
        return [self.new_event(created)]

    def claim(self, agent: str, *, now: datetime) -> list[NewEvent]:
        """Take the task for ``agent``: an open task, or one whose claim has
        timed out. Claiming a task one holds already changes nothing."""
        self._require_exists()
        if self.status == "completed":
            raise DomainError(f"task {self.id} is completed", code="already_completed")
        if self.status == "open":
            return [self.new_event(TaskClaimed(agent=agent, claimed_at=now))]
        if self.agent == agent:
            return []
        assert self.agent is not None
        assert self.claimed_at is not None
        expires = self.claimed_at + self.claim_timeout
        if now < expires:
            raise DomainError(
                f"task {self.id} is held by {self.agent} until {expires.isoformat()}",
                code="claim_held",
            )
        reassigned = TaskReassigned(agent=agent, previous_agent=self.agent, claimed_at=now)
        return [self.new_event(reassigned)]

    def complete(self, agent: str, result: str, *, now: datetime) -> list[NewEvent]:
        """Finish the task: only the agent that holds it may."""
        self._require_exists()
        if self.status == "completed":
            raise DomainError(f"task {self.id} is completed", code="already_completed")
        if self.status == "open":
            raise DomainError(f"task {self.id} is not claimed", code="not_claimed")
        if self.agent != agent:
            raise DomainError(f"task {self.id} is held by {self.agent}", code="not_claimant")
        return [self.new_event(TaskCompleted(agent=agent, result=result, completed_at=now))]

    def _require_exists(self) -> None:
        if self.status == "new":
            raise DomainError(f"task {self.id} does not exist", code="unknown_task")

    # -- snapshots -----------------------------------------------------------

    def snapshot_state(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "title": self.title,
            "requested_by": self.requested_by,
            "claim_timeout_seconds": self.claim_timeout.total_seconds(),
            "agent": self.agent,
            "claimed_at": self.claimed_at.isoformat() if self.claimed_at else None,
            "claims": self.claims,
            "result": self.result,
        }

    @classmethod
    def restore_snapshot(cls, aggregate_id: str, version: int, state: dict[str, Any]) -> Self:
        task = cls(aggregate_id)
        task.status = state["status"]
        task.title = state["title"]
        task.requested_by = state["requested_by"]
        task.claim_timeout = timedelta(seconds=state["claim_timeout_seconds"])
        task.agent = state["agent"]
        claimed_at = state["claimed_at"]
        task.claimed_at = datetime.fromisoformat(claimed_at) if claimed_at else None
        task.claims = state["claims"]
        task.result = state["result"]
        task.version = version
        return task
