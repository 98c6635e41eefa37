"""Given / when / then for aggregates (aura_pg.testing.AggregateScenario):
each test runs in memory and through a Repository over the test's
database, and the failing expectations fail with messages that say why."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import pytest

from aura_pg import AsyncEventStore, EventStore, NewEvent
from aura_pg.aggregates import Aggregate, DomainError, Event, EventRegistry, applies
from aura_pg.testing import AggregateScenario

TASK_EVENTS = EventRegistry()


@TASK_EVENTS.register
class TaskCreated(Event):
    TYPE: ClassVar[str] = "SCENARIO_TASK_CREATED"
    VERSION: ClassVar[int] = 2
    title: str
    priority: int


@TASK_EVENTS.upcaster("SCENARIO_TASK_CREATED", 1)
def _created_v1(data: dict[str, Any]) -> dict[str, Any]:
    """v1 had no priority: 3."""
    return {**data, "priority": 3}


@TASK_EVENTS.register
class TaskRenamed(Event):
    TYPE: ClassVar[str] = "SCENARIO_TASK_RENAMED"
    title: str


class Task(Aggregate):
    events = TASK_EVENTS
    stream_prefix = "scenario_task"

    def __init__(self, aggregate_id: str) -> None:
        super().__init__(aggregate_id)
        self.title: str | None = None
        self.priority = 0

    @applies(TaskCreated)
    def _created(self, event: TaskCreated) -> None:
        self.title, self.priority = event.title, event.priority

    @applies(TaskRenamed)
    def _renamed(self, event: TaskRenamed) -> None:
        self.title = event.title

    def create(self, title: str, priority: int = 1) -> list[NewEvent]:
        if self.title is not None:
            raise DomainError(f"task {self.id} exists", code="already_created")
        return [self.new_event(TaskCreated(title=title, priority=priority))]

    def rename(self, title: str) -> list[NewEvent]:
        if self.title is None:
            raise DomainError(f"no task {self.id}", code="not_found")
        if title == self.title:
            return []
        return [self.new_event(TaskRenamed(title=title))]


Scenario = Callable[..., AggregateScenario[Task]]


@pytest.fixture(params=["memory", "database"])
def scenario(request: pytest.FixtureRequest) -> Scenario:
    """A scenario for a Task: in memory, or through the plugin's
    aggregate_scenario fixture (a Repository over this test's database)."""
    if request.param == "memory":
        return lambda aggregate_id="1": AggregateScenario(Task, aggregate_id)
    make: Callable[..., AggregateScenario[Task]] = request.getfixturevalue("aggregate_scenario")
    return lambda aggregate_id="1": make(Task, aggregate_id)


def test_then_the_events_of_the_command(scenario: Scenario) -> None:
    recorded = (
        scenario("7")
        .given(TaskCreated(title="draft", priority=2))
        .when(lambda task: task.rename("final"))
        .then(TaskRenamed(title="final"))
    )
    assert recorded == (("SCENARIO_TASK_RENAMED", {"title": "final"}),)


def test_without_given_events_the_aggregate_is_new(scenario: Scenario) -> None:
    scenario().when(lambda task: task.create("first")).then(
        NewEvent("SCENARIO_TASK_CREATED", {"title": "first", "priority": 1})
    )


def test_then_nothing(scenario: Scenario) -> None:
    scenario().given(TaskCreated(title="same", priority=1)).when(
        lambda task: task.rename("same")
    ).then()


def test_then_fails_with_the_domain_errors_code(scenario: Scenario) -> None:
    error = (
        scenario("9")
        .given(TaskCreated(title="x", priority=1))
        .when(lambda task: task.create("x"))
        .then_fails("already_created", match="task 9 exists")
    )
    assert isinstance(error, DomainError)


def test_given_an_older_schema_version_goes_through_the_upcaster(scenario: Scenario) -> None:
    def old() -> NewEvent:
        return NewEvent("SCENARIO_TASK_CREATED", {"title": "old"}, {"schema_version": 1})

    task = scenario().given(old()).state()
    assert (task.title, task.priority, task.version) == ("old", 3, 1)
    scenario("2").given(old()).when(lambda t: t.rename("new")).then(TaskRenamed(title="new"))


# -- failing expectations fail, saying why ----------------------------------------


def test_other_events_than_expected_fail(scenario: Scenario) -> None:
    run = scenario().given(TaskCreated(title="a", priority=1)).when(lambda t: t.rename("b"))
    with pytest.raises(AssertionError, match="expected events:") as caught:
        run.then(TaskRenamed(title="c"))
    assert "SCENARIO_TASK_RENAMED {'title': 'c'}" in str(caught.value)
    assert "got:\n  SCENARIO_TASK_RENAMED {'title': 'b'}" in str(caught.value)


def test_expecting_events_of_a_refused_command_fails(scenario: Scenario) -> None:
    run = scenario().when(lambda t: t.rename("b"))
    with pytest.raises(AssertionError, match=r"was refused: DomainError\(code='not_found'\)"):
        run.then(TaskRenamed(title="b"))


def test_expecting_a_refusal_of_a_command_that_succeeds_fails(scenario: Scenario) -> None:
    run = scenario().when(lambda t: t.create("new"))
    with pytest.raises(AssertionError, match="expected the command to be refused"):
        run.then_fails("already_created")


def test_expecting_another_code_or_message_fails(scenario: Scenario) -> None:
    with pytest.raises(AssertionError, match="expected DomainError code 'gone', got"):
        scenario().when(lambda t: t.rename("b")).then_fails("gone")
    with pytest.raises(AssertionError, match="expected 'vanished' in the refusal"):
        scenario("2").when(lambda t: t.rename("b")).then_fails("not_found", match="vanished")


def test_then_without_when_is_a_mistake(scenario: Scenario) -> None:
    with pytest.raises(ValueError, match="no command"):
        scenario().given(TaskCreated(title="a", priority=1)).then()


# -- through a repository: what then() saw is what the stream holds -----------------


def test_through_a_repository_the_events_are_in_the_stream(
    aggregate_scenario: Callable[..., AggregateScenario[Task]], event_store: EventStore
) -> None:
    aggregate_scenario(Task, "5").given(TaskCreated(title="a", priority=1)).when(
        lambda t: t.rename("b")
    ).then(TaskRenamed(title="b"))
    stored = [(e.version, e.type, e.data) for e in event_store.read_stream("scenario_task-5")]
    assert stored == [
        (1, "SCENARIO_TASK_CREATED", {"title": "a", "priority": 1}),
        (2, "SCENARIO_TASK_RENAMED", {"title": "b"}),
    ]


def test_a_refused_command_appends_nothing(
    aggregate_scenario: Callable[..., AggregateScenario[Task]], event_store: EventStore
) -> None:
    aggregate_scenario(Task, "6").given(TaskCreated(title="a", priority=1)).when(
        lambda t: t.create("again")
    ).then_fails("already_created")
    assert event_store.stream_version("scenario_task-6") == 1


def test_the_repository_must_hold_the_scenarios_aggregate(event_store: EventStore) -> None:
    from aura_pg.aggregates import Repository

    class Other(Task):
        pass

    with pytest.raises(ValueError, match="holds Other, not Task"):
        AggregateScenario(Task, repository=Repository(event_store, Other))  # type: ignore[arg-type]


def test_given_takes_events_only() -> None:
    with pytest.raises(TypeError, match="neither an Event nor a NewEvent"):
        AggregateScenario(Task).given({"title": "x"})  # type: ignore[arg-type]


# -- through an AsyncRepository -----------------------------------------------------


async def test_async_then_and_then_fails(
    async_aggregate_scenario: Callable[..., AggregateScenario[Task]],
    async_event_store: AsyncEventStore,
) -> None:
    await (
        async_aggregate_scenario(Task, "a")
        .given(TaskCreated(title="a", priority=1))
        .when(lambda t: t.rename("b"))
        .then_async(TaskRenamed(title="b"))
    )
    assert await async_event_store.stream_version("scenario_task-a") == 2
    error = await (
        async_aggregate_scenario(Task, "a")
        .when(lambda t: t.create("again"))
        .then_fails_async("already_created")
    )
    assert error.code == "already_created"
    task = await async_aggregate_scenario(Task, "a").state_async()
    assert (task.title, task.version) == ("b", 2)


async def test_async_failing_expectations_fail(
    async_aggregate_scenario: Callable[..., AggregateScenario[Task]],
) -> None:
    run = async_aggregate_scenario(Task, "b").when(lambda t: t.create("x"))
    with pytest.raises(AssertionError, match="got:\n  SCENARIO_TASK_CREATED"):
        await run.then_async(TaskCreated(title="y", priority=1))
    # The first attempt created it: now the command is refused.
    with pytest.raises(AssertionError, match="was refused"):
        await run.then_async(TaskCreated(title="x", priority=1))
    with pytest.raises(AssertionError, match="expected DomainError code 'nope'"):
        await run.then_fails_async("nope")


async def test_sync_and_async_calls_need_their_kind_of_repository(
    async_aggregate_scenario: Callable[..., AggregateScenario[Task]],
) -> None:
    with pytest.raises(TypeError, match="need an AsyncRepository"):
        await AggregateScenario(Task).when(lambda t: t.create("x")).then_async()
    with pytest.raises(TypeError, match="is an AsyncRepository"):
        async_aggregate_scenario(Task).when(lambda t: t.create("x")).then()
