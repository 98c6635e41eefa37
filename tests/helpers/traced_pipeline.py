"""Traced runs of the pipeline, each in its own process (the OpenTelemetry
global tracer provider can be set only once per process, and would record
spans in every later test of the session).

    python -m tests.helpers.traced_pipeline DSN SCENARIO

Scenarios:

    happy      installs the SDK (in-memory exporter) and instruments psycopg;
               under a user span "request" appends 3 events to one stream,
               runs the tally_set and tally_each projections and the Python
               processor traced_python until they caught up
    poison     the same set-up; appends a good event and a poison event
               (each outside any span) and runs tally_set until the poison
               event is dead-lettered
    untraced   no SDK at all: appends one event outside any span
    configure  calls aura_pg.observability.tracing.configure_tracing with the
               process's OTEL_* environment (DSN unused), and ends a "probe"
               span

The last line of stdout is "RESULT " and a JSON object: the finished spans,
the stored events, and what the scenario observed.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace

from aura_pg import EventStore, NewEvent
from aura_pg.models import RecordedEvent
from aura_pg.observability import tracing
from aura_pg.processors import python_processor
from aura_pg.projection.daemon import ProjectorDaemon
from aura_pg.projection.settings import ProjectorSettings
from tests.helpers.projections import caught_up, fixture_catalog, wait_for

RESULT_PREFIX = "RESULT "


def _hex_trace(trace_id: int) -> str:
    return format(trace_id, "032x")


def _hex_span(span_id: int) -> str:
    return format(span_id, "016x")


def span_json(span: Any) -> dict[str, Any]:
    """A finished SDK span as plain JSON."""
    context = span.get_span_context()
    return {
        "name": span.name,
        "trace_id": _hex_trace(context.trace_id),
        "span_id": _hex_span(context.span_id),
        "parent_span_id": _hex_span(span.parent.span_id) if span.parent is not None else None,
        "kind": span.kind.name,
        "status": {
            "code": span.status.status_code.name,
            "description": span.status.description,
        },
        "attributes": dict(span.attributes or {}),
        "events": [
            {"name": event.name, "attributes": dict(event.attributes or {})}
            for event in span.events
        ],
        "links": [
            {
                "trace_id": _hex_trace(link.context.trace_id),
                "span_id": _hex_span(link.context.span_id),
            }
            for link in span.links
        ],
    }


def event_json(event: RecordedEvent) -> dict[str, Any]:
    return {
        "event_id": str(event.event_id),
        "stream_id": event.stream_id,
        "version": event.version,
        "type": event.type,
        "global_position": event.global_position,
        "metadata": event.metadata,
    }


def _install_sdk() -> Any:
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    PsycopgInstrumentor().instrument()
    return exporter


def _stored_events(store: EventStore) -> list[dict[str, Any]]:
    return [event_json(event) for event in store.iter_all()]


def touch(events: list[RecordedEvent], conn: Any) -> None:
    """traced_python's handler: one statement of its own, traced."""
    conn.execute("SELECT %s::integer AS handled", (len(events),))


async def _project_until_caught_up(
    dsn: str, names: Sequence[str], processors: Sequence[str] = ()
) -> None:
    specs = fixture_catalog().select(names)
    daemon = ProjectorDaemon(
        dsn,
        specs,
        ProjectorSettings(poll_interval=0.1),
        processors=[python_processor(name, touch) for name in processors],
    )
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        await wait_for(
            lambda: all(caught_up(dsn, name) for name in (*names, *processors)), 30, "catch-up"
        )
    finally:
        stop.set()
        await task


def happy(dsn: str) -> dict[str, Any]:
    exporter = _install_sdk()
    with EventStore.connect(dsn, max_size=2) as store:
        with trace.get_tracer("tests.traced_pipeline").start_as_current_span("request"):
            store.append("order-1", [NewEvent(t, {"n": n}) for n, t in enumerate("ABA")])
        projections = ("tally_set", "tally_each")
        asyncio.run(_project_until_caught_up(dsn, projections, ["traced_python"]))
        events = _stored_events(store)
    return {
        "spans": [span_json(span) for span in exporter.get_finished_spans()],
        "events": events,
        "projections": [*projections, "traced_python"],
    }


def poison(dsn: str) -> dict[str, Any]:
    exporter = _install_sdk()
    with EventStore.connect(dsn, max_size=2) as store:
        good = store.append("ok-1", NewEvent("A", {"n": 1})).events[0]
        bad = store.append("p-1", NewEvent("A", {"poison": True})).events[0]
        asyncio.run(_project_until_caught_up(dsn, ["tally_set"]))
        events = _stored_events(store)
    return {
        "spans": [span_json(span) for span in exporter.get_finished_spans()],
        "events": events,
        "good_event_id": str(good.event_id),
        "poison_event_id": str(bad.event_id),
    }


def untraced(dsn: str) -> dict[str, Any]:
    with EventStore.connect(dsn, max_size=1) as store:
        store.append("plain-1", NewEvent("A", {"n": 1}))
        events = _stored_events(store)
    provider = trace.get_tracer_provider()
    return {
        "events": events,
        "provider": type(provider).__name__,
        "provider_module": type(provider).__module__,
        "current_traceparent": tracing.current_traceparent(),
    }


def configure(_dsn: str) -> dict[str, Any]:
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor

    provider = tracing.configure_tracing("aura-pg-test")
    with tracing.tracer().start_as_current_span("probe") as span:
        recording = span.is_recording()
    global_provider = trace.get_tracer_provider()
    result = {
        "returned": None if provider is None else type(provider).__name__,
        "returned_is_global": provider is not None and provider is global_provider,
        "global_provider": type(global_provider).__name__,
        "probe_recorded": recording,
        "psycopg_instrumented": PsycopgInstrumentor().is_instrumented_by_opentelemetry,
        "service_name": (
            None if provider is None else provider.resource.attributes.get("service.name")
        ),
    }
    if provider is not None:
        provider.shutdown()
    return result


SCENARIOS = {
    "happy": happy,
    "poison": poison,
    "untraced": untraced,
    "configure": configure,
}


def main(argv: Sequence[str]) -> None:
    dsn, scenario = argv
    result = SCENARIOS[scenario](dsn)
    sys.stdout.flush()
    print(RESULT_PREFIX + json.dumps(result, default=str), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
