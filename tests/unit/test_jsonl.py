"""aura_pg.jsonl without a database: lines, chunks, the exported form."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import pytest

from aura_pg import NO_STREAM, EventValidationError, NewEvent, RecordedEvent, StreamAppend
from aura_pg.jsonl import JsonlError, chunks, event_line, parse_line
from aura_pg.store import operations as ops


def line(stream: str, version: int, **extra: object) -> str:
    item = {"stream_id": stream, "version": version, "type": "T", "data": {"v": version},
            "event_id": str(uuid.uuid4()), **extra}  # fmt: skip
    return json.dumps(item)


def test_a_key_equal_to_the_event_id_is_imported_as_no_key() -> None:
    event_id = uuid.uuid4()
    _, _, event = parse_line(1, line("s", 1, event_id=str(event_id), idempotency_key=str(event_id)))
    assert event.idempotency_key is None and event.event_id == event_id
    _, _, keyed = parse_line(1, line("s", 1, idempotency_key="k"))
    assert keyed.idempotency_key == "k"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "not JSON"),
        ("[1]", "not a JSON object"),
        ('{"stream_id": "s"}', "missing version"),
        (line("s", 0), "version must be an integer >= 1"),
        (line("s", 1, data=[]), "data and metadata"),
        (line("s", 1, event_id="x"), "not a UUID"),
        (line("s", 1, idempotency_key=3), "idempotency_key"),
    ],
)
def test_bad_lines_name_their_line(text: str, message: str) -> None:
    with pytest.raises(JsonlError, match=f"line 7: .*{message}"):
        parse_line(7, text)


def test_chunks_keep_versions_order_and_boundaries() -> None:
    lines = [line("a", 1), line("b", 1), line("a", 2), "", line("b", 2), line("a", 3)]
    got = list(chunks(lines, chunk_events=3, chunk_streams=10))
    assert [last for last, _ in got] == [3, 6]
    first = got[0][1]
    assert [(a.stream_id, a.expected_version, a.sequence) for a in first] == [
        ("a", 0, [1, 3]),
        ("b", 0, [2]),
    ]
    second = got[1][1]
    assert [(a.stream_id, a.expected_version, a.sequence) for a in second] == [
        ("b", 1, [5]),
        ("a", 2, [6]),
    ]
    # At most chunk_streams streams per chunk.
    assert [len(c) for _, c in chunks(lines, chunk_events=100, chunk_streams=1)] == [1, 1, 1, 1, 1]
    with pytest.raises(JsonlError, match="line 2: stream 'a' version 3 follows version 1"):
        list(chunks([line("a", 1), line("a", 3)], 10, 10))


def test_exported_lines_break_only_at_their_end() -> None:
    event = RecordedEvent(
        global_position=1, transaction_id=2, event_id=uuid.uuid4(), stream_id="s", version=1,
        type="T", data={"t": "a\u2028b\u2029c\x85d\ne"}, metadata={}, idempotency_key="k",
        recorded_at=dt.datetime(2026, 12, 7, tzinfo=dt.UTC),
    )  # fmt: skip
    text = event_line(event)
    assert len(text.splitlines()) == 1
    assert json.loads(text)["data"] == event.data


def test_append_many_checks_before_any_statement() -> None:
    ok = StreamAppend("s", [NewEvent("T", {})], NO_STREAM)
    for bad in (
        [ok, ok],
        [StreamAppend("s", [NewEvent("T", {})], sequence=[1, 2])],
        [StreamAppend("s", [NewEvent("T", {}), NewEvent("T", {})], sequence=[2, 2])],
    ):
        with pytest.raises(EventValidationError):
            ops.append_many(bad, 1024)
    with pytest.raises(ValueError, match="chunk_streams"):
        ops.append_many([ok], 1024, chunk_streams=10_001)


def test_append_many_chunks() -> None:
    appends = [StreamAppend(f"s-{i}", [NewEvent("T", {})]) for i in range(5)]
    operation = ops.append_many(appends, 1024, chunk_streams=2)
    copies = 0
    instruction = next(operation)
    while True:
        if isinstance(instruction, ops.Copy):
            copies += 1
            assert len(instruction.rows) <= 2
            instruction = operation.send([])
            continue
        assert isinstance(instruction, ops.Statement)
        staged = appends[(copies - 1) * 2 : copies * 2]
        rows = [(a.stream_id, 1, n, False, None) for n, a in enumerate(staged)]
        try:
            instruction = operation.send(rows)
        except StopIteration as done:
            results = done.value
            break
    assert copies == 3
    assert [r.stream_id for r in results] == [a.stream_id for a in appends]
