"""The task service's commands, each run through a ``Repository``: load the
task, check the rules, append at the loaded version, retry on conflicts."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from aura_pg import EventStore
from aura_pg.aggregates import CommandResult, Repository, RetryPolicy

from .aggregate import Task
from .events import DEFAULT_CLAIM_TIMEOUT_SECONDS


def utc_now() -> datetime:
    return datetime.now(UTC)


class TaskService:
    """Create, claim and complete tasks. ``clock`` is read once per command,
    before it runs, so a command rerun after a conflict decides on the same
    instant."""

    def __init__(
        self,
        store: EventStore,
        *,
        clock: Callable[[], datetime] = utc_now,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.tasks = Repository(store, Task, retry=retry)
        self._clock = clock

    def create(
        self,
        task_id: str,
        title: str,
        *,
        requested_by: str,
        claim_timeout_seconds: float = DEFAULT_CLAIM_TIMEOUT_SECONDS,
    ) -> CommandResult:
        return self.tasks.execute(
            task_id,
            lambda task: task.create(
                title, requested_by=requested_by, claim_timeout_seconds=claim_timeout_seconds
            ),
        )

    def claim(self, task_id: str, agent: str) -> CommandResult:
        """Refused with ``claim_held`` while another agent's claim holds."""
        now = self._clock()
        return self.tasks.execute(task_id, lambda task: task.claim(agent, now=now))

    def complete(self, task_id: str, agent: str, result: str) -> CommandResult:
        now = self._clock()
        return self.tasks.execute(task_id, lambda task: task.complete(agent, result, now=now))

    def get(self, task_id: str) -> Task:
        return self.tasks.load(task_id)
