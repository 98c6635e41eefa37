"""Given / when / then for aggregates: given these events of an aggregate,
when this command runs, then these events are recorded, or the command is
refused with this DomainError code.

Without a repository the scenario folds the given events in memory and
calls the command on the aggregate (no database); with one (a
``Repository`` over a test database, e.g. the plugin's
``aggregate_scenario`` fixture) it appends them to the aggregate's stream
and runs the command through ``Repository.execute``, then reads back what
was recorded; with an ``AsyncRepository`` (``async_aggregate_scenario``)
the same is awaited: ``then_async``, ``then_fails_async``, ``state_async``.

    AggregateScenario(Task, "42").given(TaskCreated(title="x")).when(
        lambda task: task.rename("y")
    ).then(TaskRenamed(title="y"))

Events are compared by type and data: a payload model (``Event``) stands
for its type and its JSON dump, a ``NewEvent`` for its type and data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, Self, TypeVar

from aura_pg.aggregates import Aggregate, AsyncRepository, DomainError, Event, Repository
from aura_pg.models import ANY, NewEvent, RecordedEvent

A = TypeVar("A", bound=Aggregate)
Command = Callable[[A], Sequence[NewEvent]]


@dataclass(frozen=True)
class _Outcome:
    events: tuple[tuple[str, dict[str, Any]], ...] = ()
    refusal: DomainError | None = None
    version_before: int = 0
    version_after: int = 0


def _shape(event: Event | NewEvent | RecordedEvent) -> tuple[str, dict[str, Any]]:
    if isinstance(event, Event):
        return (event.TYPE, event.model_dump(mode="json"))
    return (event.type, dict(event.data))


def _listing(events: Sequence[tuple[str, dict[str, Any]]]) -> str:
    if not events:
        return "  (no events)"
    return "\n".join(f"  {event_type} {data}" for event_type, data in events)


def _refusal(error: DomainError) -> str:
    return f"DomainError(code={error.code!r}): {error}"


class AggregateScenario(Generic[A]):
    """given / when / then for one aggregate of class ``aggregate``,
    ``aggregate_id``; in memory, or through ``repository``."""

    def __init__(
        self,
        aggregate: type[A],
        aggregate_id: str = "1",
        *,
        repository: Repository[A] | AsyncRepository[A] | None = None,
    ) -> None:
        if repository is not None and repository.aggregate is not aggregate:
            raise ValueError(
                f"the repository holds {repository.aggregate.__name__}, not {aggregate.__name__}"
            )
        self.aggregate = aggregate
        self.aggregate_id = aggregate_id
        self.repository = repository
        self._given: list[Event | NewEvent] = []
        self._command: Command[A] | None = None

    def given(self, *events: Event | NewEvent) -> Self:
        """The aggregate's history before the command (added to any given
        before): payload models, or NewEvents (e.g. an older schema version,
        to test an upcaster)."""
        for event in events:
            if not isinstance(event, Event | NewEvent):
                raise TypeError(f"given: {event!r} is neither an Event nor a NewEvent")
        self._given.extend(events)
        return self

    def when(self, command: Command[A]) -> Self:
        """The command: called with the aggregate, returns its new events
        (``lambda task: task.rename("y")``)."""
        self._command = command
        return self

    def _new_events(self) -> list[NewEvent]:
        registry = self.aggregate.events
        return [
            registry.encode(event) if isinstance(event, Event) else event for event in self._given
        ]

    def _recorded(self) -> list[RecordedEvent]:
        stream_id = self.aggregate.stream_id(self.aggregate_id)
        now = datetime.now(UTC)
        return [
            RecordedEvent(
                global_position=version,
                transaction_id=1,
                event_id=event.event_id,
                stream_id=stream_id,
                version=version,
                type=event.type,
                data=dict(event.data),
                metadata=dict(event.metadata or {}),
                idempotency_key=event.idempotency_key or str(event.event_id),
                recorded_at=now,
            )
            for version, event in enumerate(self._new_events(), start=1)
        ]

    def _sync_repository(self) -> Repository[A] | None:
        if isinstance(self.repository, AsyncRepository):
            raise TypeError("the repository is an AsyncRepository: await .then_async() etc.")
        return self.repository

    def _async_repository(self) -> AsyncRepository[A]:
        if not isinstance(self.repository, AsyncRepository):
            raise TypeError("then_async() etc. need an AsyncRepository (use then() otherwise)")
        return self.repository

    def _in_memory(self, command: Command[A]) -> _Outcome:
        aggregate = self.aggregate.fold(self.aggregate_id, self._recorded())
        try:
            events = tuple(_shape(e) for e in command(aggregate))
        except DomainError as error:
            return _Outcome(
                refusal=error, version_before=aggregate.version, version_after=aggregate.version
            )
        return _Outcome(
            events=events, version_before=aggregate.version, version_after=aggregate.version
        )

    def _take_given(self) -> list[NewEvent]:
        """The given events not appended yet, now counted as appended."""
        given = self._new_events()
        self._given.clear()
        return given

    def _command_or_fail(self) -> Command[A]:
        if self._command is None:
            raise ValueError("no command: call .when(command) before .then()")
        return self._command

    # -- sync (in memory, or a Repository) ---------------------------------------

    def state(self) -> A:
        """The aggregate folded from the given events (in memory), or as
        loaded through the repository after appending them."""
        repository = self._sync_repository()
        if repository is None:
            return self.aggregate.fold(self.aggregate_id, self._recorded())
        self._append_given(repository)
        return repository.load(self.aggregate_id)

    def _append_given(self, repository: Repository[A]) -> None:
        given = self._take_given()
        if given:
            repository.store.append(self.aggregate.stream_id(self.aggregate_id), given, ANY)

    def _run(self) -> _Outcome:
        command = self._command_or_fail()
        repository = self._sync_repository()
        if repository is None:
            return self._in_memory(command)
        store = repository.store
        stream_id = self.aggregate.stream_id(self.aggregate_id)
        self._append_given(repository)
        before = store.stream_version(stream_id)
        try:
            repository.execute(self.aggregate_id, command)
        except DomainError as error:
            after = store.stream_version(stream_id)
            return _Outcome(refusal=error, version_before=before, version_after=after)
        recorded = store.read_stream(stream_id, from_version=before + 1)
        return _Outcome(
            events=tuple(_shape(e) for e in recorded),
            version_before=before,
            version_after=before + len(recorded),
        )

    def then(self, *expected: Event | NewEvent) -> tuple[tuple[str, dict[str, Any]], ...]:
        """Assert that the command returned (and, with a repository,
        recorded) exactly ``expected``, in order (none: no events).
        Returns the events as (type, data) pairs."""
        return _check_events(self._run(), expected)

    def then_fails(self, code: str, *, match: str | None = None) -> DomainError:
        """Assert that the command was refused with DomainError ``code``
        (and a message containing ``match``), and, with a repository, that
        nothing was appended. Returns the error."""
        return _check_refusal(self._run(), code, match)

    # -- async (an AsyncRepository) ------------------------------------------------

    async def state_async(self) -> A:
        """``state()`` through an AsyncRepository."""
        repository = self._async_repository()
        await self._append_given_async(repository)
        return await repository.load(self.aggregate_id)

    async def _append_given_async(self, repository: AsyncRepository[A]) -> None:
        given = self._take_given()
        if given:
            await repository.store.append(self.aggregate.stream_id(self.aggregate_id), given, ANY)

    async def _run_async(self) -> _Outcome:
        command = self._command_or_fail()
        repository = self._async_repository()
        store = repository.store
        stream_id = self.aggregate.stream_id(self.aggregate_id)
        await self._append_given_async(repository)
        before = await store.stream_version(stream_id)
        try:
            await repository.execute(self.aggregate_id, command)
        except DomainError as error:
            after = await store.stream_version(stream_id)
            return _Outcome(refusal=error, version_before=before, version_after=after)
        recorded = await store.read_stream(stream_id, from_version=before + 1)
        return _Outcome(
            events=tuple(_shape(e) for e in recorded),
            version_before=before,
            version_after=before + len(recorded),
        )

    async def then_async(
        self, *expected: Event | NewEvent
    ) -> tuple[tuple[str, dict[str, Any]], ...]:
        """``then()`` through an AsyncRepository."""
        return _check_events(await self._run_async(), expected)

    async def then_fails_async(self, code: str, *, match: str | None = None) -> DomainError:
        """``then_fails()`` through an AsyncRepository."""
        return _check_refusal(await self._run_async(), code, match)


def _check_events(
    outcome: _Outcome, expected: Sequence[Event | NewEvent]
) -> tuple[tuple[str, dict[str, Any]], ...]:
    wanted = tuple(_shape(e) for e in expected)
    if outcome.refusal is not None:
        raise AssertionError(
            f"expected events:\n{_listing(wanted)}\n"
            f"but the command was refused: {_refusal(outcome.refusal)}"
        )
    if outcome.events != wanted:
        raise AssertionError(
            f"expected events:\n{_listing(wanted)}\ngot:\n{_listing(outcome.events)}"
        )
    return outcome.events


def _check_refusal(outcome: _Outcome, code: str, match: str | None) -> DomainError:
    error = outcome.refusal
    if error is None:
        raise AssertionError(
            f"expected the command to be refused ({code!r}), but it returned:\n"
            f"{_listing(outcome.events)}"
        )
    if error.code != code:
        raise AssertionError(f"expected DomainError code {code!r}, got {_refusal(error)}")
    if match is not None and match not in str(error):
        raise AssertionError(f"expected {match!r} in the refusal, got {_refusal(error)}")
    if outcome.version_after != outcome.version_before:
        raise AssertionError(
            f"the command was refused ({code!r}) but the stream moved from "
            f"v{outcome.version_before} to v{outcome.version_after}"
        )
    return error


def scenario(
    aggregate: type[A],
    aggregate_id: str = "1",
    *,
    repository: Repository[A] | AsyncRepository[A] | None = None,
) -> AggregateScenario[A]:
    """``AggregateScenario(aggregate, aggregate_id, repository=repository)``."""
    return AggregateScenario(aggregate, aggregate_id, repository=repository)
