"""Versioned event payloads: pydantic models registered per event type,
read through the upcasters of older schema versions.

An ``Event`` subclass names its stored type (``TYPE``) and its schema
version (``VERSION``); an ``EventRegistry`` maps types to models. Encoding
records the version in the event's metadata (``schema_version``);
decoding carries an older event up through the upcasters registered with
``aura_pg.upcasting.register_upcaster`` (or ``EventRegistry.upcaster``)
and validates it with the current model, so the append-only log is never
rewritten to change a payload's shape.

Decoding validates with the context ``{RECORDED: True}``: a model can hold
recorded facts to the rules of the day they were written and new events
to today's (``is_recorded(info)`` in a validator).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Final, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo

from aura_pg.errors import EventValidationError
from aura_pg.models import NewEvent, RecordedEvent
from aura_pg.upcasting import (
    SCHEMA_VERSION_KEY,
    Upcaster,
    register_upcaster,
    schema_version,
    upcast_data,
)

E = TypeVar("E", bound="type[Event]")
P = TypeVar("P", bound="Event")

RECORDED: Final = "recorded"
"""The validation context key ``decode`` sets: the data is a recorded fact."""


def is_recorded(info: ValidationInfo) -> bool:
    """In a pydantic validator: is this a recorded event being decoded
    (rather than a new one being made)?"""
    return bool(info.context and info.context.get(RECORDED))


class Event(BaseModel):
    """An event payload: subclass it, set ``TYPE`` (the stored type) and,
    when its shape changes, raise ``VERSION`` and register an upcaster
    from the previous one."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    TYPE: ClassVar[str]
    VERSION: ClassVar[int] = 1


class EventRegistry:
    """The event types an aggregate (or a service) reads and writes."""

    def __init__(self, *models: type[Event]) -> None:
        self._models: dict[str, type[Event]] = {}
        for model in models:
            self.register(model)

    def register(self, model: E) -> E:
        """Register ``model`` (usable as a class decorator). ValueError for
        a model without ``TYPE``, a version below 1, or a type taken."""
        event_type = getattr(model, "TYPE", None)
        if not isinstance(event_type, str) or not event_type:
            raise ValueError(f"{model.__name__} has no TYPE (the event type it is stored as)")
        version = model.VERSION
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"{model.__name__}.VERSION must be an int >= 1, not {version!r}")
        taken = self._models.get(event_type)
        if taken is not None and taken is not model:
            raise ValueError(f"event type {event_type!r} is {taken.__name__}'s already")
        self._models[event_type] = model
        return model

    def upcaster(self, event_type: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Register an upcaster from ``from_version`` of ``event_type``
        (``aura_pg.upcasting.register_upcaster``)."""
        return register_upcaster(event_type, from_version)

    def __contains__(self, event_type: object) -> bool:
        return event_type in self._models

    @property
    def types(self) -> tuple[str, ...]:
        return tuple(self._models)

    @property
    def models(self) -> tuple[type[Event], ...]:
        return tuple(self._models.values())

    def __or__(self, other: EventRegistry) -> EventRegistry:
        """The types of both (a service reading two aggregates' streams)."""
        return EventRegistry(*self.models, *other.models)

    def encode(
        self,
        payload: Event,
        *,
        idempotency_key: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> NewEvent:
        """The event to append for ``payload``, its version in the metadata."""
        model = self._models.get(payload.TYPE)
        if model is not type(payload):
            raise EventValidationError(
                f"{type(payload).__name__} ({payload.TYPE}) is not a registered event type"
            )
        return NewEvent(
            payload.TYPE,
            payload.model_dump(mode="json"),
            {**(metadata or {}), SCHEMA_VERSION_KEY: payload.VERSION},
            idempotency_key=idempotency_key,
        )

    def decode(self, event: RecordedEvent) -> Event:
        """A recorded event read through its current model: EventValidationError
        for an unknown type, a version newer than the model, or data the
        model refuses."""
        model = self._models.get(event.type)
        if model is None:
            raise EventValidationError(f"event {event.event_id}: unknown event type {event.type!r}")
        version = schema_version(event)
        if version > model.VERSION:
            raise EventValidationError(
                f"event {event.event_id}: {event.type} v{version} is newer than this code "
                f"(v{model.VERSION})"
            )
        data, _ = upcast_data(event.type, dict(event.data), version, model.VERSION)
        try:
            return model.model_validate(data, context={RECORDED: True})
        except ValidationError as exc:
            raise EventValidationError(f"event {event.event_id} ({event.type}): {exc}") from None

    def decode_as(self, event: RecordedEvent, model: type[P]) -> P:
        """``decode`` for an event known to be a ``model``: typed, and
        EventValidationError when it is of another type."""
        if event.type != model.TYPE:
            raise EventValidationError(
                f"event {event.event_id} is a {event.type}, not a {model.TYPE}"
            )
        payload = self.decode(event)
        assert isinstance(payload, model), f"{model.TYPE} is registered as {type(payload)}"
        return payload
