"""Upcasters: reading an event recorded under an older schema version as
the current one, without rewriting the append-only log.

An event's schema version is ``metadata["schema_version"]`` (1 when
absent). ``register_upcaster(type, n)`` registers a function turning the
data of version ``n`` into version ``n + 1``; ``upcast`` chains them for a
recorded event. The debate domain registers its own; Python processors
receive their events through ``upcast``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Final

from aura_pg.errors import EventValidationError
from aura_pg.models import RecordedEvent

SCHEMA_VERSION_KEY: Final = "schema_version"

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]

_UPCASTERS: dict[tuple[str, int], Upcaster] = {}


def register_upcaster(event_type: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
    """Register a function turning ``event_type`` data of ``from_version``
    into ``from_version + 1``."""

    def register(function: Upcaster) -> Upcaster:
        key = (event_type, from_version)
        if key in _UPCASTERS:
            raise ValueError(f"an upcaster for {event_type} v{from_version} is registered already")
        _UPCASTERS[key] = function
        return function

    return register


def schema_version(event: RecordedEvent) -> int:
    """The schema version an event was recorded with; EventValidationError
    when its metadata holds something that is not one."""
    version = event.metadata.get(SCHEMA_VERSION_KEY, 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise EventValidationError(f"event {event.event_id}: invalid schema_version {version!r}")
    return version


def upcast_data(
    event_type: str, data: dict[str, Any], version: int, target: int | None = None
) -> tuple[dict[str, Any], int]:
    """``data`` of ``version`` carried up to ``target`` (None: as far as
    registered upcasters go); the data and the version reached.
    EventValidationError when an upcaster on the way to ``target`` is missing."""
    while target is None or version < target:
        upcaster = _UPCASTERS.get((event_type, version))
        if upcaster is None:
            if target is None:
                break
            raise EventValidationError(f"no upcaster for {event_type} v{version}")
        data = upcaster(data)
        version += 1
    return data, version


def upcast(event: RecordedEvent) -> RecordedEvent:
    """The event with its data carried up through every registered
    upcaster of its type (itself when none applies); its metadata then
    names the version reached."""
    version = schema_version(event)
    if (event.type, version) not in _UPCASTERS:
        return event  # the common case: nothing to do, nothing copied
    data, reached = upcast_data(event.type, dict(event.data), version)
    return dataclasses.replace(
        event, data=data, metadata={**event.metadata, SCHEMA_VERSION_KEY: reached}
    )
