"""OpenTelemetry traces from the append through the projection.

Each traced run happens in a subprocess (tests/helpers/traced_pipeline.py):
the global tracer provider can be set once per process and would record
spans in every later test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.traced_pipeline import RESULT_PREFIX

ROOT = Path(__file__).resolve().parents[2]

Span = dict[str, Any]


def run_pipeline(dsn: str, scenario: str, **env: str) -> dict[str, Any]:
    """Run one scenario in a fresh interpreter with no OTEL_* variables but ``env``."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    environment.update(env)
    done = subprocess.run(
        [sys.executable, "-m", "tests.helpers.traced_pipeline", dsn, scenario],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, f"{scenario} failed:\n{done.stdout}\n{done.stderr}"
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    assert lines, f"{scenario} printed no result:\n{done.stdout}\n{done.stderr}"
    result: dict[str, Any] = json.loads(lines[-1].removeprefix(RESULT_PREFIX))
    return result


def traceparent_ids(traceparent: str) -> tuple[str, str]:
    """(trace id, span id) of a W3C traceparent ``00-<trace>-<span>-<flags>``."""
    version, trace_id, span_id, flags = traceparent.split("-")
    assert (version, len(trace_id), len(span_id), len(flags)) == ("00", 32, 16, 2)
    return trace_id, span_id


def named(spans: list[Span], name: str) -> list[Span]:
    return [span for span in spans if span["name"] == name]


def by_id(spans: list[Span]) -> dict[str, Span]:
    return {span["span_id"]: span for span in spans}


def linked_ids(span: Span) -> set[tuple[str, str]]:
    return {(link["trace_id"], link["span_id"]) for link in span["links"]}


def statement_of(span: Span) -> str:
    attributes = span["attributes"]
    return str(attributes.get("db.statement") or attributes.get("db.query.text") or "")


def test_one_trace_runs_from_the_append_through_each_projection(dsn: str) -> None:
    result = run_pipeline(dsn, "happy")
    spans: list[Span] = result["spans"]
    events: list[dict[str, Any]] = result["events"]
    assert [e["type"] for e in events] == ["A", "B", "A"]

    # The producer: the append span is a child of the caller's span.
    [request] = named(spans, "request")
    [append] = named(spans, "aura.append")
    assert append["kind"] == "PRODUCER"
    assert append["trace_id"] == request["trace_id"]
    assert append["parent_span_id"] == request["span_id"]
    assert append["attributes"]["event.aggregate_id"] == "order-1"
    assert append["attributes"]["aura.batch.size"] == 3
    assert append["status"]["code"] == "UNSET"

    # Each stored event carries the append span's context.
    for event in events:
        traceparent = event["metadata"].get("traceparent")
        assert traceparent, f"no traceparent stored with {event}"
        assert traceparent_ids(traceparent) == (append["trace_id"], append["span_id"])

    # psycopg's span for the append_events statement runs under the append span.
    db_spans = [
        s
        for s in spans
        if s["parent_span_id"] == append["span_id"] and "aura.append_events" in statement_of(s)
    ]
    assert len(db_spans) == 1, [(s["name"], statement_of(s)) for s in spans]
    assert db_spans[0]["kind"] == "CLIENT"
    assert db_spans[0]["name"] == "SELECT"  # named by the statement, not its comments
    assert db_spans[0]["trace_id"] == append["trace_id"]

    # The consumer: per projection, batch spans linking to the producer, and
    # one processing span per event continuing the producer's trace.
    batches = named(spans, "aura.projection.batch")
    spans_by_id = by_id(spans)
    for projection in result["projections"]:
        applied_batches = [
            b
            for b in batches
            if b["attributes"]["aura.projection"] == projection
            and b["attributes"]["aura.batch.size"] > 0
        ]
        assert applied_batches, f"no batch span for {projection}"
        assert sum(b["attributes"]["aura.batch.size"] for b in applied_batches) == len(events)
        for batch in applied_batches:
            assert batch["kind"] == "CONSUMER"
            assert batch["status"]["code"] == "UNSET"
            # One link per appending span, however many of its events.
            assert linked_ids(batch) == {(append["trace_id"], append["span_id"])}
            assert len(batch["links"]) == 1
            assert batch["attributes"]["aura.checkpoint"]
        applies = [
            s
            for s in spans
            if s["name"].startswith("aura.projection.apply ")
            and s["attributes"]["aura.projection"] == projection
        ]
        assert sorted(s["attributes"]["event.id"] for s in applies) == sorted(
            e["event_id"] for e in events
        )
        for event in events:
            [apply] = [s for s in applies if s["attributes"]["event.id"] == event["event_id"]]
            assert apply["name"] == f"aura.projection.apply {event['type']}"
            assert apply["kind"] == "CONSUMER"
            assert apply["trace_id"] == append["trace_id"]
            assert apply["parent_span_id"] == append["span_id"]
            assert apply["attributes"]["event.type"] == event["type"]
            assert apply["attributes"]["event.aggregate_id"] == event["stream_id"]
            assert apply["attributes"]["event.version"] == event["version"]
            [(trace_id, span_id)] = linked_ids(apply)
            batch = spans_by_id[span_id]
            assert batch["trace_id"] == trace_id
            assert batch in applied_batches


def test_a_python_handlers_statements_run_under_its_handler_span(dsn: str) -> None:
    result = run_pipeline(dsn, "happy")
    spans: list[Span] = result["spans"]
    handles = [
        s
        for s in named(spans, "aura.processor.handle")
        if s["attributes"]["aura.projection"] == "traced_python"
    ]
    assert sum(s["attributes"]["aura.batch.size"] for s in handles) == 3
    handle_ids = {s["span_id"] for s in handles}
    handled = [s for s in spans if "handled" in statement_of(s)]
    assert handled and all(s["parent_span_id"] in handle_ids for s in handled)
    # The processor's own statements leave no span.
    assert not [s for s in spans if "processor_batch" in statement_of(s)]
    assert not [s for s in spans if "advance_processor" in statement_of(s)]


def test_a_failing_batch_is_an_error_span_and_the_poison_event_gets_no_apply_span(
    dsn: str,
) -> None:
    result = run_pipeline(dsn, "poison")
    spans: list[Span] = result["spans"]
    events = {e["event_id"]: e for e in result["events"]}
    poison_id = result["poison_event_id"]

    failed = [s for s in named(spans, "aura.projection.batch") if s["status"]["code"] == "ERROR"]
    # The batch with both events, then (after the good event alone) the
    # poison event alone until it is dead-lettered: max_retries 2, three tries.
    assert len(failed) == 4, [s["status"] for s in named(spans, "aura.projection.batch")]
    for batch in failed:
        assert f"poison event {poison_id}" in batch["status"]["description"]
        exceptions = [e for e in batch["events"] if e["name"] == "exception"]
        assert len(exceptions) == 1
        assert f"poison event {poison_id}" in exceptions[0]["attributes"]["exception.message"]
        assert exceptions[0]["attributes"]["exception.type"]
        assert batch["attributes"]["aura.batch.size"] == 0

    applied = {
        s["attributes"]["event.id"]: s
        for s in spans
        if s["name"].startswith("aura.projection.apply ")
    }
    assert set(applied) == {result["good_event_id"]}
    # Appended outside any span: each append is the root of its own trace,
    # and the event's traceparent names it.
    appends = named(spans, "aura.append")
    assert len(appends) == 2
    assert all(s["parent_span_id"] is None and s["kind"] == "PRODUCER" for s in appends)
    producer_of = {
        event_id: next(
            s
            for s in appends
            if traceparent_ids(event["metadata"]["traceparent"]) == (s["trace_id"], s["span_id"])
        )
        for event_id, event in events.items()
    }
    assert producer_of[poison_id] is not producer_of[result["good_event_id"]]
    good_apply = applied[result["good_event_id"]]
    good_producer = producer_of[result["good_event_id"]]
    assert good_apply["parent_span_id"] == good_producer["span_id"]
    assert good_apply["trace_id"] == good_producer["trace_id"]


def test_without_an_sdk_nothing_is_recorded_and_no_traceparent_stored(dsn: str) -> None:
    result = run_pipeline(dsn, "untraced")
    [event] = result["events"]
    assert "traceparent" not in event["metadata"]
    assert result["current_traceparent"] is None
    assert result["provider"] == "ProxyTracerProvider"
    assert result["provider_module"] == "opentelemetry.trace"


@pytest.mark.parametrize(
    ("env", "installed"),
    [
        ({}, False),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "TRUE"}, False),
    ],
)
def test_configure_tracing_follows_the_otel_environment(
    env: dict[str, str], installed: bool
) -> None:
    result = run_pipeline("unused", "configure", **env)
    if installed:
        assert result["returned"] == "TracerProvider"
        assert result["returned_is_global"]
        assert result["probe_recorded"]
        assert result["psycopg_instrumented"]
        assert result["service_name"] == "aura-pg-test"
    else:
        assert result["returned"] is None
        assert result["global_provider"] == "ProxyTracerProvider"
        assert not result["probe_recorded"]
        assert not result["psycopg_instrumented"]
