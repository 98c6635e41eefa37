"""The ``Aggregate`` base class: state folded from one stream's events, and
commands that check invariants against it and return new events.

A subclass names its events (``events``, an ``EventRegistry``), its
streams (``stream_prefix``: the aggregate ``42`` of prefix ``order`` lives
in ``order-42``) and one applier per event type, a method marked
``@applies(EventModel)``. Commands never change the aggregate: they return
``NewEvent``s (``self.new_event(payload)``) for a repository to append at
the aggregate's version; the state changes only by applying recorded
events, so the events are the single source of truth.

With ``snapshot_every = N`` a repository stores the state every N events;
the subclass then says how to write and read it (``snapshot_state``,
``restore_snapshot``) and raises ``snapshot_version`` when that shape
changes, so an older snapshot is ignored rather than misread.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Self, TypeVar

from aura_pg.aggregates.events import Event, EventRegistry
from aura_pg.errors import EventValidationError
from aura_pg.models import NewEvent, RecordedEvent

F = TypeVar("F", bound=Callable[..., None])

_STREAM_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9_.:]{0,99}")
_APPLIES = "__aura_applies__"


def applies(*models: type[Event]) -> Callable[[F], F]:
    """Mark a method as the applier of ``models``: ``def _(self, payload)``,
    or ``def _(self, payload, event)`` to see the recorded event too (its
    ``recorded_at``, ``metadata``...)."""
    if not models:
        raise ValueError("@applies needs at least one event model")

    def mark(method: F) -> F:
        positional = [
            parameter
            for parameter in inspect.signature(method).parameters.values()
            if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
        ]
        if len(positional) not in (2, 3):
            raise TypeError(
                f"@applies method {method.__qualname__} takes (self, payload) "
                "or (self, payload, event)"
            )
        setattr(method, _APPLIES, (models, len(positional) == 3))
        return method

    return mark


class Aggregate:
    """Subclass with ``events``, ``stream_prefix`` and ``@applies`` methods."""

    events: ClassVar[EventRegistry]
    stream_prefix: ClassVar[str]
    snapshot_every: ClassVar[int | None] = None
    """Store the state every this many events (None: never)."""
    snapshot_version: ClassVar[int] = 1
    """The shape of ``snapshot_state``: snapshots of another are ignored."""
    snapshot_type: ClassVar[str | None] = None
    """What snapshots are filed under (None: the class's module and name).
    Set it to keep a class's snapshots valid when the class moves."""
    _appliers: ClassVar[dict[type[Event], tuple[Callable[..., None], bool]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        appliers: dict[type[Event], tuple[Callable[..., None], bool]] = {}
        for klass in reversed(cls.__mro__):
            for member in vars(klass).values():
                models, with_event = getattr(member, _APPLIES, ((), False))
                for model in models:
                    appliers[model] = (member, with_event)
        cls._appliers = appliers
        prefix = getattr(cls, "stream_prefix", None)
        if prefix is not None and not _STREAM_PREFIX.fullmatch(prefix):
            raise TypeError(f"{cls.__name__}.stream_prefix {prefix!r} is not a stream name prefix")
        every = cls.snapshot_every
        if every is not None:
            if isinstance(every, bool) or not isinstance(every, int) or every < 1:
                raise TypeError(f"{cls.__name__}.snapshot_every must be an int >= 1 or None")
            if (
                cls.snapshot_state is Aggregate.snapshot_state
                or cls.restore_snapshot.__func__ is Aggregate.restore_snapshot.__func__  # type: ignore[attr-defined]
            ):
                raise TypeError(
                    f"{cls.__name__} takes snapshots: define snapshot_state and restore_snapshot"
                )

    def __init__(self, aggregate_id: str) -> None:
        self.id = aggregate_id
        self.version = 0

    @classmethod
    def stream_id(cls, aggregate_id: str) -> str:
        """The stream of aggregate ``aggregate_id``: ``<stream_prefix>-<id>``."""
        return f"{cls.stream_prefix}-{aggregate_id}"

    @classmethod
    def aggregate_id(cls, stream_id: str) -> str | None:
        """The id of the aggregate whose stream is ``stream_id``, or None for
        another class's stream (in a processor: which aggregate an event is of)."""
        prefix = f"{cls.stream_prefix}-"
        if not stream_id.startswith(prefix) or len(stream_id) == len(prefix):
            return None
        return stream_id[len(prefix) :]

    @classmethod
    def type_name(cls) -> str:
        """What snapshots are filed under: ``snapshot_type``, or the class's
        module and name."""
        return cls.snapshot_type or f"{cls.__module__}.{cls.__qualname__}"

    @classmethod
    def fold(cls, aggregate_id: str, events: Iterable[RecordedEvent]) -> Self:
        aggregate = cls(aggregate_id)
        aggregate.apply_all(events)
        return aggregate

    def apply_all(self, events: Iterable[RecordedEvent]) -> None:
        for event in events:
            self.apply(event)

    def apply(self, event: RecordedEvent) -> None:
        """Fold one recorded event: the next version of this stream, of a
        type with an applier (EventValidationError otherwise)."""
        if event.stream_id != self.stream_id(self.id) or event.version != self.version + 1:
            raise EventValidationError(
                f"event {event.event_id} ({event.stream_id} v{event.version}) is not the next "
                f"event of {self.stream_id(self.id)} (at v{self.version})"
            )
        self.when(self.events.decode(event), event)
        self.version = event.version

    def when(self, payload: Event, event: RecordedEvent) -> None:
        """Run ``payload``'s applier. Override it (calling ``super().when``)
        to check what every event must satisfy, e.g. that the first one
        creates the aggregate."""
        found = self._appliers.get(type(payload))
        if found is None:
            raise EventValidationError(
                f"{type(self).__name__} has no applier for {event.type} (@applies)"
            )
        applier, with_event = found
        if with_event:
            applier(self, payload, event)
        else:
            applier(self, payload)

    def new_event(
        self,
        payload: Event,
        *,
        key: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> NewEvent:
        """The event a command returns for ``payload``. ``key``: what makes
        it the same event when the command is sent again (e.g. a request
        id); it becomes ``<stream>:<key>``, so a resend is recorded as a
        duplicate instead of a second effect. Without it the event's id is
        the key (a resend of this very event is a duplicate)."""
        idempotency_key = self.idempotency_key(key) if key is not None else None
        return self.events.encode(payload, idempotency_key=idempotency_key, metadata=metadata)

    def idempotency_key(self, key: str) -> str:
        """The stored idempotency key of a command's ``key``:
        ``<stream>:<key>``, unique in the whole log."""
        return f"{self.stream_id(self.id)}:{key}"

    def snapshot_state(self) -> dict[str, Any]:
        """The state as JSON (with ``snapshot_every``)."""
        raise NotImplementedError(f"{type(self).__name__} does not take snapshots")

    @classmethod
    def restore_snapshot(cls, aggregate_id: str, version: int, state: dict[str, Any]) -> Self:
        """The aggregate at ``version`` from ``snapshot_state``'s output."""
        raise NotImplementedError(f"{cls.__name__} does not take snapshots")
