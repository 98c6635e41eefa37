"""Input validation happens before any connection is taken."""

from __future__ import annotations

import json
import math
import uuid
from typing import Any

import pytest
from pydantic import BaseModel

from aura_pg import (
    ANY,
    FORWARDS,
    NO_STREAM,
    AuraPgError,
    EventValidationError,
    NewEvent,
)
from aura_pg.store import operations as ops


def start(op: ops.Operation) -> ops.Statement:
    """Run an operation up to its first statement (validation included)."""
    statement = next(op)
    assert isinstance(statement, ops.Statement)
    return statement


def append(
    stream: Any = "s", events: Any = None, expected: Any = ANY, limit: int = 1024
) -> ops.Statement:
    if events is None:
        events = [NewEvent("T", {"x": 1})]
    return start(ops.append(stream, events, expected, limit))


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        ("", "1 to 200"),
        ("x" * 201, "1 to 200"),
        ("a\x00b", "control"),
        ("a\nb", "control"),
        ("a\x85b", "control"),
        (None, "must be a str"),
        (42, "must be a str"),
    ],
)
def test_bad_stream_ids(stream: Any, message: str) -> None:
    with pytest.raises(EventValidationError, match=message):
        append(stream)


@pytest.mark.parametrize(
    ("events", "message"),
    [
        ([], "at least one event"),
        ((), "at least one event"),
        ("T", "iterable of NewEvent"),
        ({"type": "T"}, "iterable of NewEvent"),
        ([{"type": "T", "data": {}}], "must be a NewEvent"),
        ([NewEvent("", {})], "type must have 1 to 200"),
        ([NewEvent("T" * 201, {})], "type must have 1 to 200"),
        ([NewEvent("T\t", {})], "control"),
        ([NewEvent("T", {}, idempotency_key="")], "idempotency_key must have 1 to 255"),
        ([NewEvent("T", {}, idempotency_key="k" * 256)], "idempotency_key must have 1 to 255"),
        ([NewEvent("T", {}, idempotency_key="k\x1f")], "control"),
        (
            [NewEvent("T", {}, idempotency_key="k"), NewEvent("T", {}, idempotency_key="k")],
            "repeats within the batch",
        ),
        ([NewEvent("T", [1, 2])], "mapping or a pydantic model"),  # type: ignore[arg-type]
        ([NewEvent("T", {"x": object()})], "not JSON-serialisable"),
        ([NewEvent("T", {"x": math.nan})], "not JSON-serialisable"),
        ([NewEvent("T", {"x": math.inf})], "not JSON-serialisable"),
        ([NewEvent("T", {"x": "a\x00b"})], "NUL"),
        ([NewEvent("T", {"a\x00": 1})], "NUL"),
        ([NewEvent("T", {}, metadata={"x": {1, 2}})], "metadata is not JSON-serialisable"),
        ([NewEvent("T", {"x": "y" * 2000})], "over the limit of 1024"),
        ([NewEvent("T", {}, metadata={"x": "é" * 600})], "metadata is 1208 bytes"),
    ],
)
def test_bad_events(events: Any, message: str) -> None:
    with pytest.raises(EventValidationError, match=message):
        append(events=events)


def test_repeated_event_id_in_a_batch() -> None:
    shared = uuid.uuid4()
    batch = [
        NewEvent("T", {}, idempotency_key="a", event_id=shared),
        NewEvent("T", {}, idempotency_key="b", event_id=shared),
    ]
    with pytest.raises(EventValidationError, match=r"event id .* repeats"):
        append(events=batch)


def test_event_id_must_be_a_uuid() -> None:
    with pytest.raises(EventValidationError, match=r"uuid\.UUID"):
        NewEvent("T", {}, event_id="not-a-uuid")  # type: ignore[arg-type]


@pytest.mark.parametrize("expected", [-1, True, 1.0, "3", None])
def test_bad_expected_versions(expected: Any) -> None:
    with pytest.raises(EventValidationError, match="expected_version"):
        append(expected=expected)


def test_validation_errors_are_value_errors_and_aura_errors() -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the point is the base class
        append("")
    assert issubclass(EventValidationError, AuraPgError)


def test_an_escaped_backslash_before_u0000_is_not_a_nul() -> None:
    append(events=[NewEvent("T", {"path": "C:\\u0000"})])


def test_batch_encoding_carries_every_field() -> None:
    class Payload(BaseModel):
        topic: str

    event = NewEvent(
        "DEBATE_STARTED", Payload(topic="t"), metadata={"actor": "a"}, idempotency_key="k"
    )
    statement = append("debate-1", [event], NO_STREAM)
    assert statement.params["stream_id"] == "debate-1"
    assert statement.params["expected_version"] == "no_stream"

    (encoded,) = json.loads(statement.params["events"])
    assert encoded == {
        "event_id": str(event.event_id),
        "type": "DEBATE_STARTED",
        "idempotency_key": "k",
        "data": {"topic": "t"},
        "metadata": {"actor": "a"},
    }


def test_key_defaults_to_event_id() -> None:
    event = NewEvent("T", {})
    assert event.key == str(event.event_id)
    # Left to the server, which takes the event id: not sent twice.
    (encoded,) = json.loads(append(events=event).params["events"])
    assert "idempotency_key" not in encoded
    assert encoded["event_id"] == str(event.event_id)


def test_single_event_is_accepted_without_a_list() -> None:
    statement = append(events=NewEvent("T", {}))
    assert statement.params["events"].startswith("[{")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: ops.read_all(None, 0, None), "limit"),
        (lambda: ops.read_all(None, 10, []), "at least one"),
        (lambda: ops.read_all(None, 10, ["T\n"]), "control"),
        (lambda: ops.read_stream("s", -1, FORWARDS, None), "from_version"),
        (lambda: ops.read_stream("s", None, FORWARDS, -5), "limit"),
        (lambda: ops.stream_version(""), "1 to 200"),
    ],
)
def test_bad_read_arguments(call: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        start(call())
