"""The producer's side: a span, metrics and the trace context for one append.

The metrics module (prometheus_client) is imported when a store is created
(:func:`register_append_metrics`), not when the store is imported: a
program that only imports aura_pg does not pay for it, and one that creates
a store shows the append metrics on its ``/metrics`` from then on.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from aura_pg.errors import ConcurrencyError
from aura_pg.models import AppendResult, NewEvent
from aura_pg.observability import tracing


@dataclass(slots=True)
class AppendObservation:
    """Handed to the append: the trace context to store in the events'
    metadata, and a place for the result."""

    traceparent: str | None
    result: AppendResult | None = None


def register_append_metrics() -> None:
    """Create the append metrics in prometheus_client's default registry
    (once per process; later calls cost a dictionary lookup)."""
    from aura_pg.observability import metrics  # noqa: F401  (registers on import)


@contextmanager
def observed_append(stream_id: str, batch: Sequence[NewEvent]) -> Iterator[AppendObservation]:
    """Time and trace one append; count what it recorded, its duplicates and
    its version conflicts. Errors are recorded on the span and re-raised."""
    from aura_pg.observability import metrics

    started = time.perf_counter()
    with tracing.append_span(stream_id, len(batch)) as span:
        observation = AppendObservation(tracing.current_traceparent())
        try:
            yield observation
        except ConcurrencyError:
            metrics.APPEND_CONFLICTS.inc()
            raise
        finally:
            metrics.APPEND_DURATION.observe(time.perf_counter() - started)
        result = observation.result
        if result is None:
            return
        if result.duplicate:
            metrics.APPEND_DUPLICATES.inc(len(batch))
        else:
            for event_type, count in Counter(event.type for event in batch).items():
                metrics.EVENTS_APPENDED.labels(event_type).inc(count)
        if span.is_recording():
            span.set_attribute("aura.duplicate", result.duplicate)
            if len(batch) == 1:
                recorded = result.events[0]
                span.set_attributes(
                    tracing.event_attributes(
                        recorded.event_id, batch[0].type, stream_id, recorded.version
                    )
                )
