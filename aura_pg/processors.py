"""Python processors: user code that reacts to events with the guarantees
of SQL projections (docs/python-processors.md).

A processor is a catalog entry with ``kind: python`` or, in code,
``python_processor(...)``; ``ProjectorDaemon`` and ``aura-pg project`` run
it. Its handler gets a batch of events and the connection of the
transaction that advances its checkpoint::

    def handle(events: list[RecordedEvent], conn: psycopg.Connection) -> None: ...
    async def handle(events: list[RecordedEvent], conn: psycopg.AsyncConnection) -> None: ...

What it writes through ``conn`` (appends included: ``store.append(...,
conn=conn)``) commits with the checkpoint, exactly once. Effects outside
the database are at least once: key them with ``idempotency_key``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from typing import Any

from aura_pg.errors import CatalogError
from aura_pg.models import RecordedEvent
from aura_pg.projection.catalog import (
    MAX_PARTITIONS,
    PYTHON_HANDLER,
    ErrorHandling,
    ProjectionSpec,
)


def idempotency_key(event: RecordedEvent, purpose: str = "") -> str:
    """The key of an effect of ``event``: its id, with ``purpose`` when one
    event causes several effects. Send it with an HTTP call or a message
    (the receiver drops a repeat), or as the ``idempotency_key`` of an
    event appended in reaction (a repeat is then a recorded duplicate)."""
    return f"{event.event_id}:{purpose}" if purpose else str(event.event_id)


def partition_of(stream_id: str, partitions: int) -> int:
    """The partition of ``stream_id`` among ``partitions``: the first 32
    bits of its md5, modulo; ``aura.stream_partition`` in SQL."""
    if not 1 <= partitions <= MAX_PARTITIONS:
        raise ValueError(f"partitions must be between 1 and {MAX_PARTITIONS}, not {partitions}")
    digest = hashlib.md5(stream_id.encode("utf-8"), usedforsecurity=False).hexdigest()
    return int(digest[:8], 16) % partitions


def _reference(handler: Callable[..., Any]) -> str:
    module = getattr(handler, "__module__", None)
    qualname = getattr(handler, "__qualname__", None)
    reference = f"{module}:{qualname}"
    if module is None or qualname is None or re.fullmatch(PYTHON_HANDLER, reference) is None:
        raise CatalogError(
            f"handler {handler!r} has no importable name (define it at module level, or pass "
            "reference='package.module:callable'): `aura-pg dlq retry` and `projections replay` "
            "import it by that name"
        )
    return reference


def python_processor(
    name: str,
    handler: Callable[..., Any] | str,
    *,
    source_events: Sequence[str] | None = None,
    batch_size: int = 500,
    partitions: int = 1,
    batch_timeout_seconds: float = 30.0,
    error_handling: ErrorHandling | None = None,
    description: str = "",
    reference: str | None = None,
) -> ProjectionSpec:
    """A Python processor's catalog entry, for ``ProjectorDaemon``.

    ``handler`` is the function or its ``"package.module:callable"`` name;
    ``reference`` names where a function given here can be imported from
    (default: its module and qualified name). Raises CatalogError for an
    invalid entry, naming the setting."""
    if callable(handler):
        handler_name = reference or _reference(handler)
        function: Callable[..., Any] | None = handler
    else:
        handler_name, function = handler, None
    fields: dict[str, Any] = {
        "name": name,
        "kind": "python",
        "handler": handler_name,
        "source_events": tuple(source_events) if source_events is not None else None,
        "batch_size": batch_size,
        "partitions": partitions,
        "batch_timeout_seconds": batch_timeout_seconds,
        "description": description,
        "handler_function": function,
    }
    if error_handling is not None:
        fields["error_handling"] = error_handling
    try:
        return ProjectionSpec.model_validate(fields)
    except ValueError as exc:  # pydantic's ValidationError is one
        raise CatalogError(f"processor {name!r}: {exc}") from None
