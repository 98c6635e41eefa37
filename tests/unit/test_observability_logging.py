"""structlog as the daemons configure it: JSON lines with the bound context
and trace ids, stdlib loggers (psycopg's, alembic's) routed through it, and
connection-string passwords masked."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, use_span

from aura_pg.config import mask_text
from aura_pg.observability.logging import bound, configure_logging


@pytest.fixture
def output() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    stream = io.StringIO()
    configure_logging(logging.INFO, json_lines=True, stream=stream)
    yield stream
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved_handlers:
        root.addHandler(handler)
    root.setLevel(saved_level)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("host=db password=s3cret user=a", "host=db password=*** user=a"),
        ("password = 's3 cr\\'et' dbname=x", "password = *** dbname=x"),
        ("PASSWORD=abc", "PASSWORD=***"),
        ("postgresql://aura:s3cret@db:5432/aura", "postgresql://aura:***@db:5432/aura"),
        ("see postgres://u:p%40ss@h/d now", "see postgres://u:***@h/d now"),
        ("postgresql://aura@db/aura", "postgresql://aura@db/aura"),
        ("no secrets here", "no secrets here"),
    ],
)
def test_passwords_are_masked_in_both_dsn_forms(text: str, masked: str) -> None:
    assert mask_text(text) == masked


def test_stdlib_records_become_json_lines_with_bound_context(output: io.StringIO) -> None:
    with bound(projection="debate_state", event_id="e-1"):
        logging.getLogger("aura_pg.projector").warning("batch after %s failed", "7/3")
    logging.getLogger("aura_pg.projector").info("outside")
    first, second = lines(output)
    assert first["event"] == "batch after 7/3 failed"
    assert first["level"] == "warning"
    assert first["logger"] == "aura_pg.projector"
    assert first["projection"] == "debate_state"
    assert first["event_id"] == "e-1"
    assert "timestamp" in first
    assert "projection" not in second


def test_psycopg_and_alembic_logs_go_through_structlog_with_passwords_masked(
    output: io.StringIO,
) -> None:
    logging.getLogger("psycopg.pool").warning("error connecting in 'pool-1': password=hunter2")
    logging.getLogger("alembic.runtime.migration").info(
        "Context impl PostgresqlImpl for postgresql://aura:hunter2@db/aura"
    )
    psycopg_line, alembic_line = lines(output)
    assert psycopg_line["logger"] == "psycopg.pool"
    assert "hunter2" not in output.getvalue()
    assert psycopg_line["event"] == "error connecting in 'pool-1': password=***"
    assert alembic_line["event"].endswith("postgresql://aura:***@db/aura")  # type: ignore[union-attr]


def test_lines_written_inside_a_span_carry_its_trace_and_span_ids(output: io.StringIO) -> None:
    context = SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=False,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    with use_span(NonRecordingSpan(context)):
        logging.getLogger("aura_pg.store").info("appended")
    (line,) = lines(output)
    assert line["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert line["span_id"] == "b7ad6b7169203331"


def test_exceptions_are_rendered_into_the_json_line(output: io.StringIO) -> None:
    try:
        raise RuntimeError("connection to password=topsecret failed")
    except RuntimeError:
        logging.getLogger("aura_pg.relay").exception("sink failed")
    (line,) = lines(output)
    assert "RuntimeError" in str(line["exception"])
    assert "topsecret" not in output.getvalue()


def test_console_output_on_a_terminal_is_not_json() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = list(root.handlers)
    try:
        configure_logging(logging.INFO, json_lines=False, stream=stream)
        logging.getLogger("aura_pg").info("hello password=abc")
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved:
            root.addHandler(handler)
    text = stream.getvalue()
    assert "hello password=***" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
