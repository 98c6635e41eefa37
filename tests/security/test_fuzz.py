"""Fuzzing of the append path and the CLI (issue 8).

Every fuzzed append must either succeed and read back exactly, or raise
one of the library's typed errors (AuraPgError) and write nothing: never a
bare psycopg error, never a UnicodeEncodeError or RecursionError, never a
partial batch. The SQL function is fuzzed directly too, with raw JSON text
(malformed shapes reach the server): every refusal must carry a SQLSTATE
the store translates into a typed error. The CLI, run in-process with
fuzzed arguments, must return an exit code (or exit 2 from argparse),
never raise.

One database per test function; each example uses its own stream ids.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import sys
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, assume, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from aura_pg import (
    ANY,
    BACKWARDS,
    FORWARDS,
    NO_STREAM,
    STREAM_EXISTS,
    AppendResult,
    Checkpoint,
    EventStore,
    EventValidationError,
    NewEvent,
)
from aura_pg.cli import build_parser, main
from aura_pg.errors import AuraPgError
from aura_pg.projection.registration import register_projections
from aura_pg.store import operations as ops
from aura_pg.store import validation
from tests.helpers.projections import fixture_catalog
from tests.security._support import (
    HOSTILE,
    INVALID_NAMES,
    counts,
    create_canary,
    json_equal,
    snapshot,
)

FUZZ = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)

_serial = itertools.count()


def unique(prefix: str = "") -> str:
    """A suffix that makes a fuzzed stream id this example's own."""
    return f"{prefix}#{next(_serial)}-{uuid.uuid4().hex[:8]}"


# --- strategies --------------------------------------------------------------

# Every code point, lone surrogates (which hypothesis leaves out unless
# asked for by category) and NUL included.
ANY_CHAR = st.one_of(
    st.characters(exclude_categories=[]),
    st.characters(categories=["Cs"]),
    st.sampled_from("\x00\x7f\x85\u2028\ufeff\ufffe\uffff"),
)
# What a command line or a psycopg parameter can carry (no lone surrogates).
ENCODABLE_CHAR = st.characters(codec="utf-8")
# What Postgres text can hold.
PG_TEXT_CHAR = st.characters(codec="utf-8", exclude_characters="\x00")

valid_names = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cc"]), min_size=1, max_size=12
)
names = st.one_of(
    st.text(ANY_CHAR, max_size=12),
    valid_names,
    valid_names,
    valid_names,
    st.sampled_from(HOSTILE + INVALID_NAMES[:-1]),
    st.text(ANY_CHAR, min_size=195, max_size=260),
)
keys = st.one_of(st.text(ANY_CHAR, max_size=10), st.sampled_from(HOSTILE[:10]))
numbers = st.one_of(
    st.integers(),
    st.integers(min_value=-(10**300), max_value=10**300),
    st.builds(lambda e, sign: sign * 10**e, st.integers(0, 5000), st.sampled_from([1, -1])),
    st.floats(),  # NaN and the infinities included
    st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=True),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(ANY_CHAR, max_size=20))
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=16,
)


def nested(depth: int) -> dict[str, Any]:
    value: Any = "bottom"
    for level in range(depth):
        value = {"d": value} if level % 2 else [value]
    return {"deep": value}


payloads = st.one_of(
    st.dictionaries(keys, json_values, max_size=5),
    st.integers(1, 1500).map(nested),
)
expected_versions = st.one_of(
    st.sampled_from([ANY, NO_STREAM, STREAM_EXISTS]),
    st.integers(-3, 6),
    st.sampled_from([2**63 - 1, 2**63, 2**64, -(2**63)]),
    st.sampled_from([True, "0", None, 1.0]),
)


# Values JSON and jsonb can both hold (no NUL, no lone surrogate, finite
# numbers within numeric's range), with every other character.
clean_text = st.text(PG_TEXT_CHAR, max_size=20)
clean_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(10**300), max_value=10**300),
        st.floats(allow_nan=False, allow_infinity=False),
        clean_text,
        st.sampled_from(HOSTILE),
    ),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(clean_text, inner, max_size=4),
    max_leaves=16,
)
clean_payloads = st.dictionaries(st.one_of(clean_text, st.sampled_from(HOSTILE)), clean_values)


def clean_events(key_pool: tuple[str, ...] = ("k1", "k2")) -> st.SearchStrategy[NewEvent]:
    """Valid events, with any text and numbers JSON can hold."""
    return st.builds(
        NewEvent,
        valid_names,
        clean_payloads,
        metadata=st.one_of(st.none(), clean_payloads),
        idempotency_key=st.one_of(st.none(), valid_names, st.sampled_from(key_pool)),
    )


@st.composite
def new_events(draw: st.DrawFn, key_pool: tuple[str, ...] = ("k1", "k2")) -> NewEvent:
    """An event: half of them valid, the others with something wrong or
    hostile anywhere."""
    if draw(st.booleans()):
        return draw(clean_events(key_pool))
    return NewEvent(
        draw(st.one_of(names, names, names, st.integers())),  # type: ignore[arg-type]
        draw(payloads),
        metadata=draw(st.one_of(st.none(), payloads)),
        idempotency_key=draw(st.one_of(st.none(), st.none(), names, st.sampled_from(key_pool))),
    )


# --- checks ------------------------------------------------------------------


def label(outcome: str) -> None:
    """Count the outcome in hypothesis' statistics (--hypothesis-show-statistics)."""
    if currently_in_test_context():
        event(outcome)


def _metadata_as_sent(event: NewEvent) -> dict[str, Any]:
    return dict(event.metadata or {})


def check_append(
    store: EventStore,
    conn: psycopg.Connection[Any],
    stream: Any,
    batch: list[NewEvent],
    expected: Any,
) -> AppendResult | None:
    """Append; on success the events read back exactly and the counts grew
    by the batch, on a typed refusal nothing changed. Any other exception
    escapes and fails the test."""
    before = counts(conn)
    try:
        result = store.append(stream, batch, expected)
    except AuraPgError as exc:
        label(f"append refused: {type(exc).__name__}")
        assert counts(conn) == before, "a refused append wrote something"
        return None
    label("append duplicate" if result.duplicate else "append ok")
    events, streams, versions = counts(conn)
    if result.duplicate:
        assert (events, streams, versions) == before
        return result
    assert events == before[0] + len(batch)
    assert versions == before[2] + len(batch)
    read = {e.version: e for e in store.read_stream(stream)}
    for sent, appended in zip(batch, result.events, strict=True):
        got = read[appended.version]
        assert got.event_id == sent.event_id == appended.event_id
        assert got.stream_id == stream
        assert got.type == sent.type
        assert got.idempotency_key == sent.key
        assert json_equal(got.data, dict(sent.data))
        metadata = dict(got.metadata)
        if "traceparent" not in _metadata_as_sent(sent):
            metadata.pop("traceparent", None)
        assert json_equal(metadata, _metadata_as_sent(sent))
    return result


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(dsn, autocommit=True) as connection:
        yield connection


# --- EventStore.append -------------------------------------------------------


@settings(FUZZ, max_examples=400)
@given(
    stream=st.one_of(valid_names, names),
    batch=st.one_of(
        st.lists(clean_events(), min_size=1, max_size=3),
        st.lists(new_events(), min_size=1, max_size=2),
        st.lists(new_events()),
    ),
    expected=st.one_of(st.sampled_from([ANY, NO_STREAM, 0]), expected_versions),
)
def test_fuzzed_appends_succeed_exactly_or_fail_typed_writing_nothing(
    store: EventStore,
    conn: psycopg.Connection[Any],
    stream: str,
    batch: list[NewEvent],
    expected: Any,
) -> None:
    # A fresh stream per example (when the fuzzed id is valid at all).
    if isinstance(stream, str) and 1 <= len(stream) <= 150:
        stream = stream + unique()
    check_append(store, conn, stream, batch, expected)


@settings(FUZZ, max_examples=120)
@given(
    steps=st.lists(
        st.tuples(
            st.lists(new_events(key_pool=("k1", "k2", "k3")), min_size=1, max_size=3),
            st.one_of(expected_versions, st.integers(0, 6)),
        ),
        min_size=1,
        max_size=5,
    ),
    resend=st.booleans(),
)
def test_fuzzed_append_sequences_keep_streams_contiguous(
    store: EventStore,
    conn: psycopg.Connection[Any],
    steps: list[tuple[list[NewEvent], Any]],
    resend: bool,
) -> None:
    """Several appends to one stream: wrong expected versions, keys reused
    across and within batches, resent batches. The stream stays exactly
    the events of the appends that succeeded, versions 1..n."""
    stream = unique("seq")
    appended = 0
    for batch, expected in steps:
        result = check_append(store, conn, stream, batch, expected)
        if result is not None and not result.duplicate:
            appended += len(batch)
        if resend and result is not None:
            again = check_append(store, conn, stream, batch, ANY)
            assert again is not None and again.duplicate
            assert again.events == result.events
        events = store.read_stream(stream)
        assert [e.version for e in events] == list(range(1, appended + 1))
        assert store.stream_version(stream) == appended


@settings(FUZZ, max_examples=200)
@given(
    limit=st.integers(2, 4000),
    unit=st.sampled_from(["x", "é", "€", "😀", "\\", '"', "\n"]),
    size=st.integers(0, 4000),
    shape=st.sampled_from(["string", "list", "keys"]),
    where=st.sampled_from(["data", "metadata"]),
)
def test_payload_limit_is_exact_and_typed(
    store: EventStore,
    conn: psycopg.Connection[Any],
    limit: int,
    unit: str,
    size: int,
    shape: str,
    where: str,
) -> None:
    """max_payload_bytes (the client's check): a payload whose JSON text
    takes more bytes is refused with a typed error, writing nothing."""
    if shape == "string":
        payload: dict[str, Any] = {"k": unit * size}
    elif shape == "list":
        payload = {"k": [unit] * (size // 4)}
    else:
        payload = {f"{unit}{i}": i for i in range(size // 8)}
    limited = EventStore(store.pool, max_payload_bytes=limit)
    event = (
        NewEvent("T", payload, metadata={})
        if where == "data"
        else NewEvent("T", {}, metadata=payload)
    )
    too_big = len(validation._dumps(payload).encode()) > limit
    stream = unique("limit")
    result = check_append(limited, conn, stream, [event], NO_STREAM)
    assert (result is None) == too_big


def test_payloads_at_the_server_limit(store: EventStore, conn: psycopg.Connection[Any]) -> None:
    """Around aura.max_payload_bytes (1 MiB): accepted or refused typed,
    never half-written; well over it, refused by the client already."""
    limit = validation.DEFAULT_MAX_PAYLOAD_BYTES
    for size in (limit - 64, limit - 12, limit - 11, limit - 8, limit, limit + 1, 2 * limit):
        payload = {"k": "x" * (size - len('{"k":""}'))}
        assert len(validation._dumps(payload).encode()) == size
        for big in (NewEvent("T", payload), NewEvent("T", {}, metadata=payload)):
            result = check_append(store, conn, unique("big"), [NewEvent("S", {}), big], ANY)
            if size > limit:
                assert result is None
    # The server's own limit, lower than the client's: typed, nothing written.
    conn.execute("SET aura.max_payload_bytes = 100")
    before = counts(conn)
    with pytest.raises(EventValidationError):
        raw_append(conn, unique("srv"), json.dumps([{"type": "T", "data": {"k": "x" * 200}}]))
    assert counts(conn) == before


def test_empty_and_huge_batches(store: EventStore, conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(EventValidationError):
        store.append(unique("empty"), [])
    with pytest.raises(EventValidationError):
        store.append(unique("empty"), iter(()))
    with pytest.raises(EventValidationError):
        raw_append(conn, unique("empty"), "[]")
    for size in (1000, 10_000, 10_001):
        batch = [NewEvent("T", {"i": i}) for i in range(size)]
        check_append(store, conn, unique("huge"), batch, NO_STREAM)
    # A batch whose last event is bad writes none of the others.
    batch = [NewEvent("T", {"i": i}) for i in range(5000)] + [NewEvent("T", {"bad": "\x00"})]
    assert check_append(store, conn, unique("huge"), batch, NO_STREAM) is None
    duplicated = [NewEvent("T", {"i": i}, idempotency_key=f"k{i % 4999}") for i in range(5000)]
    assert check_append(store, conn, unique("huge"), duplicated, NO_STREAM) is None


def test_payloads_deeper_than_python_recurses_get_a_typed_error(
    store: EventStore, conn: psycopg.Connection[Any]
) -> None:
    deep = nested(sys.getrecursionlimit() + 100)
    for bad in (NewEvent("T", deep), NewEvent("T", {}, metadata=deep)):
        assert check_append(store, conn, unique("deep"), [NewEvent("S", {}), bad], ANY) is None


# --- aura.append_events with raw JSON ----------------------------------------


def raw_append(
    conn: psycopg.Connection[Any], stream_id: Any, events: str, expected: Any = "any"
) -> list[tuple[Any, ...]]:
    """The store's own append statement with raw JSON text; a refusal is
    raised as the typed error the store would raise, or fails the test."""
    statement = ops.Statement(
        ops._QUERIES["append_events"],
        {"stream_id": stream_id, "events": events, "expected_version": expected},
    )
    try:
        return [tuple(r) for r in conn.execute(statement.sql, statement.params).fetchall()]
    except psycopg.Error as exc:
        typed = ops.translate_error(exc, statement)
        if typed is None:
            raise AssertionError(
                f"untyped database error {exc.sqlstate}: {' '.join(str(exc).split())[:300]}"
            ) from exc
        raise typed from exc


pg_text = st.text(PG_TEXT_CHAR, max_size=12)
wild = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**30), 10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    pg_text,
    st.sampled_from(HOSTILE),
    st.lists(pg_text, max_size=2),
    st.dictionaries(pg_text, pg_text, max_size=2),
)
raw_json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(10**30), 10**30),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(ANY_CHAR, max_size=10),
    ),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(pg_text, inner, max_size=3),
    max_leaves=10,
)
MISSING = object()


@st.composite
def raw_events(draw: st.DrawFn) -> Any:
    """An element of the events array: mostly event-shaped, with every
    field sometimes missing, of the wrong type or hostile."""
    if draw(st.integers(0, 9)) == 0:
        return draw(raw_json_values)
    element: dict[str, Any] = {}
    fields: dict[str, st.SearchStrategy[Any]] = {
        "type": st.one_of(st.text(ANY_CHAR, max_size=12), st.sampled_from(HOSTILE), wild),
        "data": st.one_of(st.dictionaries(pg_text, raw_json_values, max_size=3), wild),
        "metadata": st.one_of(st.dictionaries(pg_text, raw_json_values, max_size=2), wild),
        "idempotency_key": st.one_of(st.sampled_from(["k1", "k2"]), names, wild),
        "event_id": st.one_of(st.uuids().map(str), st.text(ANY_CHAR, max_size=40), wild),
    }
    for field, strategy in fields.items():
        value = draw(st.one_of(st.just(MISSING), strategy))
        if value is not MISSING:
            element[field] = value
    if draw(st.booleans()):
        element["type"] = draw(st.text(PG_TEXT_CHAR, min_size=1, max_size=20))
        element["data"] = draw(st.dictionaries(pg_text, raw_json_values, max_size=3))
    if draw(st.integers(0, 4)) == 0:
        element[draw(pg_text)] = draw(wild)
    return element


SPLICES: tuple[str, ...] = (
    "",
    "{",
    "}",
    "[",
    "]",
    '"',
    ",",
    ":",
    "\\",
    "\\u0000",
    "\\ud800",
    "\\udfff",
    "NaN",
)
SPLICES += ("Infinity", "-", "1e5", "1e999999", "nul", "\\x00", "'", "$$", "[" * 5000)


@st.composite
def clean_raw_events(draw: st.DrawFn) -> dict[str, Any]:
    """An event as a psql user would write it, optional fields included."""
    element: dict[str, Any] = {"type": draw(valid_names), "data": draw(clean_payloads)}
    for field, strategy in (
        ("metadata", st.one_of(st.none(), clean_payloads)),
        ("idempotency_key", st.one_of(st.none(), valid_names)),
        ("event_id", st.one_of(st.none(), st.uuids().map(str))),
        ("extra", clean_values),
    ):
        if draw(st.booleans()):
            element[field] = draw(strategy)
    return element


@st.composite
def raw_batches(draw: st.DrawFn) -> str:
    """JSON text for the events parameter, valid JSON or not."""
    kind = draw(st.integers(0, 9))
    if kind >= 6:
        value: Any = draw(st.lists(clean_raw_events(), min_size=1, max_size=4))
    else:
        value = draw(raw_json_values if kind == 0 else st.lists(raw_events(), max_size=4))
    text = json.dumps(value, ensure_ascii=draw(st.booleans()), separators=(",", ":"))
    if kind == 1:
        # Break the text: cut it, or splice in a character or an escape.
        position = draw(st.integers(0, len(text)))
        splice = draw(st.sampled_from(SPLICES))
        cut = draw(st.booleans())
        text = text[:position] + splice + ("" if cut else text[position:])
    if kind == 2:
        text = "[" * draw(st.integers(1, 3000)) + "]" * draw(st.integers(0, 3000))
    # Postgres text holds no NUL, psycopg sends no lone surrogate.
    return text.encode("utf-8", "replace").decode().replace("\x00", "\\u0000")


def _loads(text: str) -> Any:
    return json.loads(text, parse_float=Decimal, parse_int=Decimal)


@settings(FUZZ, max_examples=600)
@given(
    stream=st.one_of(
        valid_names, st.none(), st.text(PG_TEXT_CHAR, max_size=12), st.sampled_from(HOSTILE)
    ),
    events=raw_batches(),
    expected=st.one_of(
        st.sampled_from(["any", "no_stream", "0"]),
        st.sampled_from(["any", "no_stream", "stream_exists", "0", "1", None]),
        st.text(PG_TEXT_CHAR, max_size=20),
        st.integers(-5, 10**20).map(str),
    ),
)
def test_fuzzed_raw_json_is_appended_exactly_or_refused_typed(
    conn: psycopg.Connection[Any], stream: str | None, events: str, expected: str | None
) -> None:
    if stream is not None:
        stream = f"{stream}{unique()}"
    before = counts(conn)
    try:
        rows = raw_append(conn, stream, events, expected)
    except AuraPgError as exc:
        label(f"raw refused: {type(exc).__name__} {exc.__cause__.sqlstate!s}")  # type: ignore[union-attr]
        assert counts(conn) == before, "a refused append wrote something"
        return
    label("raw ok")
    # Accepted: Python reads the same JSON, and every element was recorded.
    sent = _loads(events)
    assert isinstance(sent, list) and len(rows) == len(sent) > 0
    after = counts(conn)
    if all(r[2] for r in rows):  # a duplicate: cannot be, the stream is new
        raise AssertionError("a new stream answered as a duplicate")
    assert after[0] == before[0] + len(sent) and after[1] == before[1] + 1
    recorded = conn.execute(
        "SELECT type, data::text, metadata::text, idempotency_key, event_id::text"
        " FROM aura.events WHERE stream_id = %s ORDER BY version",
        (stream,),
    ).fetchall()
    for element, (type_, data, metadata, key, event_id) in zip(sent, recorded, strict=True):
        assert type_ == element["type"]
        assert _loads(data) == element["data"]
        assert _loads(metadata) == (element.get("metadata") or {})
        if element.get("event_id") is not None:
            assert uuid.UUID(event_id) == uuid.UUID(element["event_id"])
        if element.get("idempotency_key") is not None:
            assert key == element["idempotency_key"]
        else:
            assert key == event_id


def test_numbers_beyond_numeric_range_get_a_typed_error(
    store: EventStore, conn: psycopg.Connection[Any]
) -> None:
    """Found by this suite: SQLSTATE 22003 escaped as a bare psycopg error."""
    with pytest.raises(EventValidationError):
        raw_append(conn, unique("num"), '[{"type": "T", "data": {"k": 1e999999}}]')
    digits = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)  # lifted: Python then sends any int
    try:
        assert (
            check_append(store, conn, unique("num"), [NewEvent("T", {"k": 10**140_000})], ANY)
            is None
        )
    finally:
        sys.set_int_max_str_digits(digits)
    assert counts(conn) == (0, 0, 0)


def test_json_deeper_than_the_server_stack_gets_a_typed_error(
    conn: psycopg.Connection[Any],
) -> None:
    """Found by this suite: SQLSTATE 54001 escaped as a bare psycopg error."""
    depth = 100_000
    text = '[{"type": "T", "data": {"k": ' + "[" * depth + "]" * depth + "}}]"
    with pytest.raises(EventValidationError):
        raw_append(conn, unique("deep"), text)
    assert counts(conn) == (0, 0, 0)


def test_read_limits_and_checkpoints_beyond_the_sql_types(store: EventStore) -> None:
    """Found by this suite: a limit over 2**31 - 1 or a position over
    2**63 - 1 reached the SQL functions and failed with UndefinedFunction."""
    store.append("s", [NewEvent("T", {}), NewEvent("U", {})])
    for limit in (2**31 - 1, 2**31, 10**30):
        assert len(store.read_all(limit=limit).events) == 2
        assert len(store.read_stream("s", limit=limit)) == 2
        assert len(list(store.iter_all(batch_size=limit))) == 2
    for after in (Checkpoint(0, 2**63), Checkpoint(2**64, 0), Checkpoint(-1, 0), Checkpoint(0, -1)):
        with pytest.raises(EventValidationError):
            store.read_all(after=after)
    assert store.read_all(after=Checkpoint(2**64 - 1, 2**63 - 1)).events == ()


@settings(FUZZ, max_examples=200)
@given(
    stream=names,
    limit=st.one_of(st.none(), st.integers(), st.sampled_from([0, -1, True, 1.5, "10"])),
    from_version=st.one_of(st.none(), st.integers(), st.sampled_from([True, 1.5, "1"])),
    backwards=st.booleans(),
    types=st.one_of(st.none(), st.lists(names, max_size=3), st.sampled_from(["T", b"T"])),
    after=st.one_of(
        st.none(),
        st.builds(Checkpoint, st.integers(), st.integers()),
        st.sampled_from(["0/0", 0]),
    ),
)
def test_fuzzed_reads_answer_or_refuse_with_a_value_error(
    store: EventStore,
    stream: str,
    limit: Any,
    from_version: Any,
    backwards: bool,
    types: Any,
    after: Any,
) -> None:
    """Reads never hit the database with what it cannot take: they answer,
    or refuse with ValueError (EventValidationError is one)."""
    direction = BACKWARDS if backwards else FORWARDS
    for read in (
        lambda: store.read_stream(stream, from_version, direction, limit),
        lambda: store.stream_version(stream),
        lambda: store.read_all(after, 1000 if limit is None else limit, types),
    ):
        with contextlib.suppress(ValueError):
            read()


# --- the CLI -------------------------------------------------------------------


def _commands() -> set[str]:
    return {
        name
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
        for name in action.choices
    }


cli_text = st.one_of(
    st.text(ENCODABLE_CHAR, max_size=12),
    st.sampled_from(HOSTILE),
    st.sampled_from(["tally_set", "tally_each", "s", "-", "--", "-1", "--json"]),
)
cli_ints = st.one_of(st.integers(-5, 5), st.integers(), st.sampled_from([2**63 - 1, 2**63]))
garbage = st.lists(
    st.one_of(
        st.sampled_from(["--json", "--bogus", "-x", "--", "", "-", "--yes", "--note", "-1"]),
        st.text(ENCODABLE_CHAR, max_size=6),
    ),
    max_size=2,
)


@st.composite
def cli_argvs(draw: st.DrawFn) -> list[str]:
    name, stream, note = draw(cli_text), draw(cli_text), draw(cli_text)
    number = str(draw(cli_ints))
    templates: list[list[str]] = [
        ["projections", "status"],
        ["projections", "status", "--json"],
        ["projections", "pause", name],
        ["projections", "resume", name],
        ["dlq", "list", name, "--json"],
        ["dlq", "list"],
        ["projections", "replay", name, stream],
        ["projections", "replay", name, stream, "--from-version", number],
        ["projections", "reset", name],
        ["projections", "rebuild", name, "--abort"],
        ["migrate", "--check"],
        ["projections", name],
        [name],
    ]
    commands = _commands()
    if "stream" in commands:
        templates += [
            ["stream", "show", stream],
            ["stream", "show", stream, "--json", "--from-version", number],
            ["stream", "show", stream, "--limit", number, "--backwards"],
        ]
    if "dlq" in commands:
        templates += [
            ["dlq", "list", name],
            ["dlq", "skip", number, "--note", note],
            ["dlq", "retry", number],
        ]
    if "status" in commands:
        templates += [["status"], ["status", "--json"]]
    argv = [*draw(st.sampled_from(templates)), *draw(garbage)]
    # Nothing that runs a daemon, follows the log, or rebuilds for real.
    assume(argv[0] in READ_OR_OPERATE or argv[0] not in commands)
    assume(argv[0] != "migrate" or ("--check" in argv and not any("-s" in a for a in argv)))
    assume(
        argv[:1] != ["projections"]
        or len(argv) < 2
        or argv[1] not in ("register", "rebuild", "reset")
        or "--abort" in argv
        or (argv[1] == "reset" and "--yes" not in argv)
    )
    return argv


READ_OR_OPERATE = frozenset({"projections", "migrate", "stream", "dlq", "status"})


def _run_cli(argv: list[str]) -> int:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse: a usage error, or --help
        asked_for_help = any(token.startswith(("-h", "--h")) for token in argv)
        assert exc.code == 2 or (asked_for_help and exc.code == 0), (argv, exc.code)
        return int(exc.code or 0)
    assert isinstance(code, int), argv
    return code


@settings(FUZZ, max_examples=200)
@given(argv=cli_argvs())
def test_fuzzed_cli_returns_an_exit_code(
    dsn: str, cli_database: None, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code = _run_cli([*argv, "--dsn", dsn])
    label(f"cli {argv[0][:12]!r} exit {code}")
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err


@pytest.fixture
def cli_database(dsn: str) -> Iterator[None]:
    """The tally projections registered, a few events, a canary; after the
    fuzzing, no event changed and the canary is whole."""
    create_canary(dsn)

    async def register() -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn:
            await register_projections(aconn, fixture_catalog().select(["tally_set", "tally_each"]))

    asyncio.run(register())
    with psycopg.connect(dsn, autocommit=True) as conn:
        for stream in ("s", *HOSTILE[:5]):
            raw_append(conn, stream, json.dumps([{"type": "T", "data": {"s": stream}}]))
        events = conn.execute("SELECT * FROM aura.events ORDER BY global_position").fetchall()
    before = snapshot(dsn)
    yield
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT * FROM aura.events ORDER BY global_position").fetchall() == (
            events
        )
    assert snapshot(dsn).canary == before.canary


def test_cli_survives_undecodable_arguments(dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    # What `aura-pg projections pause $'\xff'` puts in sys.argv.
    name = b"\xff".decode("utf-8", "surrogateescape")
    # A usage error, as argparse's own (exit 2), before anything connects.
    assert _run_cli(["projections", "pause", name, "--dsn", dsn]) == 2
    assert "is not valid UTF-8" in capsys.readouterr().err


def test_cli_migrate_sql_with_an_unknown_revision(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run_cli(["migrate", "--sql", "--revision", "x'; DROP TABLE aura.events; --"]) == 1
