"""OpenTelemetry traces: the appending span's W3C ``traceparent`` travels in
the event's metadata, and the projector's span for each event continues
that trace, so one trace runs from the producer through the read model.

The library only calls the OpenTelemetry API: with no SDK configured it is
the no-op implementation. :func:`configure_tracing` (called by the CLI)
installs the SDK when the standard ``OTEL_*`` variables ask for an exporter.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger("aura_pg.tracing")

TRACEPARENT: Final = "traceparent"
# Links from one batch span to the appending spans of its events (one per
# appending span); more would bloat the span for no reader.
MAX_BATCH_LINKS: Final = 32

_PROPAGATOR: Final = TraceContextTextMapPropagator()
_tracer = trace.get_tracer("aura_pg")

__all__ = [
    "TRACEPARENT",
    "append_span",
    "configure_tracing",
    "current_traceparent",
    "event_attributes",
    "producer_context",
    "record_batch_spans",
    "record_error",
    "recording",
    "suppress_instrumentation",
    "tracer",
]


def tracer() -> trace.Tracer:
    return _tracer


def recording() -> bool:
    """Whether spans go anywhere: an SDK tracer provider is installed. The
    projector asks for the per-event details only then."""
    return not isinstance(
        trace.get_tracer_provider(), trace.ProxyTracerProvider | trace.NoOpTracerProvider
    )


def current_traceparent() -> str | None:
    """The W3C traceparent of the current span, or None outside any trace."""
    if not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get(TRACEPARENT)


def producer_context(traceparent: str | None) -> otel_context.Context | None:
    """The context a traceparent names, or None if it is absent or invalid."""
    if not traceparent:
        return None
    ctx = _PROPAGATOR.extract({TRACEPARENT: traceparent})
    if not trace.get_current_span(ctx).get_span_context().is_valid:
        return None
    return ctx


@contextmanager
def suppress_instrumentation() -> Iterator[None]:
    """No spans from instrumented libraries (psycopg) inside: for the
    daemons' housekeeping queries. The instrumentation package is imported
    on first use, not by every importer of the store."""
    from opentelemetry.instrumentation.utils import suppress_instrumentation as suppressed

    with suppressed():
        yield


@contextmanager
def handler_span(processor: str, events: int) -> Iterator[None]:
    """A live span around a Python processor's handler: the handler's own
    statements (psycopg's spans) and spans get it as their parent. The
    batch and per-event spans are recorded after the batch, as for SQL."""
    with _tracer.start_as_current_span(
        "aura.processor.handle",
        kind=SpanKind.INTERNAL,
        attributes={"aura.projection": processor, "aura.batch.size": events},
    ):
        yield


def record_error(span: Span, exc: BaseException) -> None:
    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


def event_attributes(
    event_id: object, event_type: str, stream_id: str, version: int
) -> dict[str, str | int]:
    """The attributes the hardening plan names for an event."""
    return {
        "event.id": str(event_id),
        "event.type": event_type,
        "event.aggregate_id": stream_id,
        "event.version": version,
    }


def record_batch_spans(
    projection: str,
    start_ns: int,
    end_ns: int,
    events: Sequence[tuple[object, str, str, int, str | None]],
    *,
    error: BaseException | None = None,
    attributes: Mapping[str, str | int] | None = None,
) -> None:
    """After the fact, since the batch ran inside one SQL statement: a span
    for the batch, and one per applied event that continues the producer's
    trace (its parent is the appending span) and links to the batch span.

    ``events`` holds (event id, type, stream id, version, traceparent).
    Does nothing unless a recording tracer is configured."""
    batch_attributes: dict[str, str | int] = {
        "aura.projection": projection,
        "aura.batch.size": len(events),
        **(attributes or {}),
    }
    batch = _tracer.start_span(
        "aura.projection.batch",
        kind=SpanKind.CONSUMER,
        start_time=start_ns,
        attributes=batch_attributes,
    )
    if not batch.is_recording():
        return
    if error is not None:
        record_error(batch, error)
    batch_link = Link(batch.get_span_context())
    batch_ctx = trace.set_span_in_context(batch)
    linked: set[int] = set()  # producers' span ids: one link per appending span
    for event_id, event_type, stream_id, version, traceparent in events:
        producer = producer_context(traceparent)
        if producer is not None:
            producer_span = trace.get_current_span(producer).get_span_context()
            if producer_span.span_id not in linked and len(linked) < MAX_BATCH_LINKS:
                linked.add(producer_span.span_id)
                batch.add_link(producer_span)
        span = _tracer.start_span(
            f"aura.projection.apply {event_type}",
            context=producer or batch_ctx,
            kind=SpanKind.CONSUMER,
            start_time=start_ns,
            links=[batch_link] if producer is not None else None,
            attributes={
                "aura.projection": projection,
                **event_attributes(event_id, event_type, stream_id, version),
            },
        )
        span.end(end_time=end_ns)
    batch.end(end_time=end_ns)


@contextmanager
def append_span(stream_id: str, event_count: int) -> Iterator[Span]:
    """The producer's span around one append."""
    with _tracer.start_as_current_span(
        "aura.append",
        kind=SpanKind.PRODUCER,
        attributes={"event.aggregate_id": stream_id, "aura.batch.size": event_count},
        record_exception=True,
        set_status_on_exception=True,
    ) as span:
        yield span


def _exporters() -> list[str]:
    names = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if names:
        return [name.strip() for name in names.split(",") if name.strip() not in ("", "none")]
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    return ["otlp"] if endpoint else []


def configure_tracing(service_name: str) -> Any | None:
    """Install the OpenTelemetry SDK if the environment asks for an exporter
    (``OTEL_TRACES_EXPORTER=otlp|console``, or an ``OTEL_EXPORTER_OTLP_*``
    endpoint), and instrument psycopg. ``OTEL_SERVICE_NAME``,
    ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER`` and the exporter's
    own variables apply as usual. Returns the tracer provider (shut it down
    to flush), or None when tracing stays off."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    exporters = _exporters()
    if not exporters:
        return None
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
    provider = TracerProvider(resource=Resource.create(attributes))
    for name in exporters:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        elif name == "console":
            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        else:
            log.warning("tracing: unknown OTEL_TRACES_EXPORTER %r ignored", name)
    trace.set_tracer_provider(provider)
    PsycopgInstrumentor().instrument()
    log.info("tracing: exporting spans (%s)", ", ".join(exporters))
    return provider
