"""SQL injection through every name a user can pass (issue 8).

Each test plants a canary (a table and a schema the store never touches)
and snapshots the database's structure, then pushes hostile names through
the store, the SQL functions, projection administration, the catalog and
the CLI. Valid names must be stored verbatim and read back equal; invalid
ones must get a typed error and write nothing; and afterwards the canary,
the structure and every row except the intended ones must be unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import unicodedata
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from aura_pg import (
    NO_STREAM,
    AsyncEventStore,
    EventStore,
    EventValidationError,
    NewEvent,
)
from aura_pg.cli import build_parser, main
from aura_pg.errors import (
    AuraPgError,
    CatalogError,
    ProjectionError,
    UnknownProjection,
)
from aura_pg.projection import admin
from aura_pg.projection.catalog import load_catalog
from aura_pg.projection.connection import translate_projection_error
from aura_pg.projection.rebuild import abort_rebuild
from aura_pg.projection.registration import register_projections
from aura_pg.store import operations as ops
from tests.helpers.projections import FIXTURE_CATALOG, fixture_catalog
from tests.security._support import (
    HOSTILE,
    INVALID_NAMES,
    Snapshot,
    counts,
    event_rows,
    snapshot,
)

TALLY_SQL = (FIXTURE_CATALOG.parent / "tally.sql").read_text(encoding="utf-8")


def _payload(name: str) -> dict[str, Any]:
    return {name: name, "nested": {name: [name, {name: name}]}, "k": name}


def _register_fixture_projections(dsn: str, names: tuple[str, ...] = ("tally_set",)) -> None:
    async def register() -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await register_projections(conn, fixture_catalog().select(list(names)))

    asyncio.run(register())


def _checkpoint_rows(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [
            tuple(r)
            for r in conn.execute(
                "SELECT name, status, schema_name, handler, transaction_id::text,"
                " global_position, events_applied, definition_hash, description"
                " FROM aura.projection_checkpoints ORDER BY name"
            ).fetchall()
        ]


def _raw_append(
    conn: psycopg.Connection[Any], stream_id: Any, events: Any, expected: Any = "any"
) -> list[tuple[Any, ...]]:
    """aura.append_events called directly, with raw JSON text; a refusal is
    translated as the store translates it (None: no typed error)."""
    statement = ops.Statement(
        "SELECT * FROM aura.append_events(%(stream_id)s, %(events)s::jsonb, %(expected_version)s)",
        {"stream_id": stream_id, "events": events, "expected_version": expected},
    )
    try:
        return [tuple(r) for r in conn.execute(statement.sql, statement.params).fetchall()]
    except psycopg.Error as exc:
        typed = ops.translate_error(exc, statement)
        if typed is None:
            raise AssertionError(f"untyped database error {exc.sqlstate}: {exc}") from exc
        raise typed from exc


# --- the store -------------------------------------------------------------


def test_hostile_names_are_stored_verbatim(store: EventStore, dsn: str, canary: Snapshot) -> None:
    started = time.monotonic()
    for name in HOSTILE:
        event = NewEvent(name, _payload(name), metadata={name: name}, idempotency_key=name)
        result = store.append(name, event, NO_STREAM)
        assert result.stream_id == name and result.version == 1 and not result.duplicate

        (read,) = store.read_stream(name)
        assert read.stream_id == name
        assert read.type == name
        assert read.idempotency_key == name
        assert read.event_id == event.event_id
        assert read.data == _payload(name)
        assert read.metadata.get(name) == name
        assert store.stream_version(name) == 1

        page = store.read_all(types=[name])
        assert [e.event_id for e in page.events] == [event.event_id]

        # The retry is recognised under the hostile key, and writes nothing.
        again = store.append(name, event, NO_STREAM)
        assert again.duplicate and again.events == result.events
    # No pg_sleep ran (a payload asks for five seconds).
    assert time.monotonic() - started < 5

    rows = event_rows(dsn)
    assert sorted(r[3] for r in rows if r[0] == "event") == sorted(HOSTILE)
    assert sorted((r[1], r[2]) for r in rows if r[0] == "stream") == sorted(
        (name, 1) for name in HOSTILE
    )
    assert snapshot(dsn) == canary


def test_lookalike_names_are_distinct_streams(
    store: EventStore, dsn: str, canary: Snapshot
) -> None:
    """No normalisation anywhere: look-alikes are other streams and keys."""
    names = [
        "aura",
        "\u0430\u0443\u0440\u0430",
        "\uff41\uff55\uff52\uff41",
        "aura\u200b",
        "AURA",
        "é",
        "e\u0301",
        "ﬁ",
        "fi",
    ]
    assert len({unicodedata.normalize("NFKC", n).casefold() for n in names}) < len(names)
    for name in names:
        store.append(name, NewEvent("T", {"name": name}, idempotency_key="same"), NO_STREAM)
    for name in names:
        (event,) = store.read_stream(name)
        assert event.data == {"name": name} and event.stream_id == name
    store.append("aura", NewEvent("T", {"x": 1}, idempotency_key="\u0430\u0443\u0440\u0430"))
    store.append("aura", NewEvent("T", {"x": 1}, idempotency_key="\uff41\uff55\uff52\uff41"))
    assert store.stream_version("aura") == 3
    with psycopg.connect(dsn) as conn:
        assert counts(conn)[:2] == (len(names) + 2, len(names))
    assert snapshot(dsn) == canary


@pytest.mark.parametrize("role", ["stream_id", "type", "idempotency_key"])
def test_invalid_names_get_a_typed_error_and_write_nothing(
    store: EventStore, dsn: str, canary: Snapshot, role: str
) -> None:
    store.append("existing", NewEvent("T", {"v": 1}))
    with psycopg.connect(dsn, autocommit=True) as conn:
        before = counts(conn)
        for name in INVALID_NAMES:
            stream, event = "s", NewEvent("T", {"v": 1})
            if role == "stream_id":
                stream = name
            elif role == "type":
                event = NewEvent(name, {"v": 1})
            else:
                event = NewEvent("T", {"v": 1}, idempotency_key=name)
            with pytest.raises(EventValidationError):
                store.append(stream, [NewEvent("OK", {}), event])
            assert counts(conn) == before, f"{role} {name[:30]!r} wrote something"
    assert snapshot(dsn) == canary


@pytest.mark.parametrize("name", INVALID_NAMES, ids=lambda n: repr(n[:12]))
def test_invalid_names_on_reads_get_a_typed_error(store: EventStore, name: str) -> None:
    with pytest.raises(EventValidationError):
        store.read_stream(name)
    with pytest.raises(EventValidationError):
        store.stream_version(name)
    with pytest.raises(EventValidationError):
        store.read_all(types=["OK", name])


@pytest.mark.parametrize(
    "value",
    [
        "nul \x00 inside",
        "surrogate \udcff inside",
        "\ud83d",  # half of an emoji
    ],
    ids=["nul", "surrogate", "half-emoji"],
)
@pytest.mark.parametrize("where", ["data key", "data value", "metadata key", "metadata value"])
def test_payloads_jsonb_cannot_hold_get_a_typed_error(
    store: EventStore, dsn: str, canary: Snapshot, value: str, where: str
) -> None:
    payload = {value: 1} if where.endswith("key") else {"k": ["ok", {"deep": value}]}
    event = (
        NewEvent("T", payload) if where.startswith("data") else NewEvent("T", {}, metadata=payload)
    )
    with pytest.raises(EventValidationError):
        store.append("s", [NewEvent("OK", {}), event])
    with psycopg.connect(dsn) as conn:
        assert counts(conn) == (0, 0, 0)
    assert snapshot(dsn) == canary


def test_event_ids_must_be_uuids(store: EventStore, dsn: str, canary: Snapshot) -> None:
    for bad in ("x'; DROP TABLE aura.events; --", "00000000-0000-0000-0000-000000000000'", 7):
        with pytest.raises(EventValidationError):
            NewEvent("T", {}, event_id=bad)  # type: ignore[arg-type]
    # Through SQL, the uuid type refuses the text (a typed error in Python).
    with psycopg.connect(dsn, autocommit=True) as conn:
        for bad in ("x'; DROP TABLE aura.events; --", "'; SELECT pg_sleep(5); --", "", "%s"):
            events = json.dumps([{"type": "T", "data": {}, "event_id": bad}])
            with pytest.raises(EventValidationError):
                _raw_append(conn, "s", events)
        assert counts(conn) == (0, 0, 0)
    assert snapshot(dsn) == canary


def test_sql_functions_take_hostile_names_as_values(dsn: str, canary: Snapshot) -> None:
    """aura.append_events, read_stream, stream_version and read_all called
    from SQL with hostile names (what a psql user or another client does)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name in HOSTILE:
            events = json.dumps(
                [
                    {
                        "type": name,
                        "data": _payload(name),
                        "metadata": {name: name},
                        "idempotency_key": name,
                    }
                ],
                ensure_ascii=False,
            )
            rows = _raw_append(conn, name, events, "no_stream")
            assert [(r[1], r[3]) for r in rows] == [(1, False)]
            got = conn.execute(
                "SELECT stream_id, type, idempotency_key, data, metadata"
                " FROM aura.read_stream(%s, 1, NULL, false)",
                (name,),
            ).fetchall()
            assert got == [(name, name, name, _payload(name), {name: name})]
            assert conn.execute("SELECT aura.stream_version(%s)", (name,)).fetchone() == (1,)
            typed = conn.execute(
                "SELECT count(*) FROM aura.read_all('0', 0, 1000, %s::text[])", ([name],)
            ).fetchone()
            assert typed == (1,)
        for expected in ("any'; DROP TABLE public.canary; --", "1; DROP", "-1", "1e3", "ANY"):
            with pytest.raises(EventValidationError):
                _raw_append(conn, "s", '[{"type": "T", "data": {}}]', expected)
        assert counts(conn) == (len(HOSTILE), len(HOSTILE), len(HOSTILE))
    assert snapshot(dsn) == canary


# --- projection administration ---------------------------------------------


def test_projection_admin_takes_hostile_names_as_values(dsn: str, canary: Snapshot) -> None:
    _register_fixture_projections(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute('SELECT * FROM aura.append_events(\'s\', \'[{"type":"T","data":{}}]\')')
    structure = snapshot(dsn)
    checkpoints = _checkpoint_rows(dsn)
    events = event_rows(dsn)
    for name in (*HOSTILE, "tally_set__rebuild", "tally_set'", "TALLY_SET", "tally_set "):
        for operation in (
            admin.pause,
            admin.resume,
            admin.reset,
            abort_rebuild,
        ):
            with pytest.raises(UnknownProjection):
                operation(dsn, name)
        with pytest.raises(UnknownProjection):
            admin.replay_stream(dsn, name, "s")
        assert admin.dead_letters(dsn, name) == []
        # A real projection and a hostile stream: the forget handler and the
        # replay take the stream id as a value.
        assert admin.replay_stream(dsn, "tally_set", name) == 0
    assert _checkpoint_rows(dsn) == checkpoints
    assert event_rows(dsn) == events
    assert snapshot(dsn) == structure
    assert structure.canary == canary.canary


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", "x'; DROP TABLE public.canary; --"),
        ("name", 'bad"name'),
        ("schema", '"; DROP SCHEMA aura CASCADE; --'),
        ("schema", "aura"),
        ("schema", "public"),
        ("schema", "pg_catalog"),
        ("handler", "h'; DROP"),
        ("handler_kind", "set_based'; DROP"),
    ],
)
def test_register_projection_refuses_hostile_definitions(
    dsn: str, canary: Snapshot, field: str, value: str
) -> None:
    params: dict[str, Any] = {
        "name": "hostile",
        "schema": "hostile",
        "handler": "apply_batch",
        "handler_kind": "set_based",
        "forget_handler": None,
    }
    params[field] = value
    with psycopg.connect(dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as caught:
            conn.execute(
                "SELECT aura.register_projection(%(name)s, '', %(schema)s, %(handler)s,"
                " %(handler_kind)s, NULL, %(forget_handler)s, %(sql)s, 10, 1, 10, 20, 3, 1)",
                {**params, "sql": TALLY_SQL},
            )
        assert isinstance(translate_projection_error(caught.value), ProjectionError)
    assert snapshot(dsn) == canary
    assert _checkpoint_rows(dsn) == []


def test_register_projection_quotes_handler_names(dsn: str, canary: Snapshot) -> None:
    """The handler names are not checked by a pattern in SQL: they must
    only ever be quoted identifiers, so a hostile one is a missing function."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for handler, forget in (
            ('apply_batch"(NULL); DROP TABLE public.canary; --', None),
            ("apply_batch", 'forget_stream"(NULL); DROP TABLE public.canary; --'),
            ("apply_batch", "forget_stream'); DROP TABLE public.canary; --"),
        ):
            with pytest.raises(psycopg.Error) as caught:
                conn.execute(
                    "SELECT aura.register_projection('hostile', '', 'hostile', %s, 'set_based',"
                    " NULL, %s, %s, 10, 1, 10, 20, 3, 1)",
                    (handler, forget, TALLY_SQL),
                )
            assert isinstance(translate_projection_error(caught.value), ProjectionError)
    assert snapshot(dsn) == canary
    assert _checkpoint_rows(dsn) == []


def _dead_letter(dsn: str, stream_id: str) -> int:
    """A pending dead letter of tally_set for a new event of the stream."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            'SELECT * FROM aura.append_events(%s, \'[{"type": "T", "data": {}}]\')',
            (stream_id,),
        )
        row = conn.execute(
            "INSERT INTO aura.dead_letters (projection, global_position, transaction_id,"
            " event_id, stream_id, event_type, error, attempts, first_failed_at, last_failed_at)"
            " SELECT 'tally_set', e.global_position, e.transaction_id, e.event_id, e.stream_id,"
            " e.type, %s, 1, now(), now() FROM aura.events e WHERE e.stream_id = %s"
            " ORDER BY e.global_position DESC LIMIT 1 RETURNING id",
            (f"error about {stream_id}", stream_id),
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_dead_letter_notes_are_stored_verbatim(dsn: str, canary: Snapshot) -> None:
    _register_fixture_projections(dsn)
    for note in HOSTILE:
        letter = _dead_letter(dsn, note)
        (listed,) = [d for d in admin.dead_letters(dsn, "tally_set") if d["id"] == letter]
        assert listed["stream_id"] == note and listed["error"] == f"error about {note}"
        assert admin.skip_dead_letter(dsn, letter, note) == "skipped"
        with psycopg.connect(dsn, autocommit=True) as conn:
            stored = conn.execute(
                "SELECT status, resolution_note FROM aura.dead_letters WHERE id = %s", (letter,)
            ).fetchone()
        assert stored == ("skipped", note)
        with pytest.raises(ProjectionError):
            admin.skip_dead_letter(dsn, letter, note)
    with pytest.raises(UnknownProjection):
        admin.skip_dead_letter(dsn, 10**12, "x'; DROP TABLE public.canary; --")
    with pytest.raises(UnknownProjection):
        admin.retry_dead_letter(dsn, -1)
    assert snapshot(dsn).canary == canary.canary


# --- the catalog -----------------------------------------------------------


def _entry(**changes: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": "hostile",
        "sql": "tally.sql",
        "source_events": "all",
        "handler": "apply_batch",
        "forget_handler": "forget_stream",
    }
    entry.update(changes)
    return {k: v for k, v in entry.items() if v is not None}


def _write_catalog(tmp_path: Path, *entries: dict[str, Any]) -> Path:
    (tmp_path / "tally.sql").write_text(TALLY_SQL, encoding="utf-8")
    path = tmp_path / "catalog.yaml"
    path.write_text(
        yaml.safe_dump({"projections": list(entries)}, allow_unicode=True), encoding="utf-8"
    )
    return path


CATALOG_INJECTIONS: list[tuple[str, Any]] = [
    # (HOSTILE's "null" is a fine name: lower-case letters only.)
    *(("name", n) for n in HOSTILE if n != "null"),
    *(("schema", n) for n in HOSTILE if n != "null"),
    *(("handler", n) for n in HOSTILE),
    *(("forget_handler", n) for n in HOSTILE),
    ("name", "tally\n"),
    ("name", "tally\nx"),
    ("name", "Tally"),
    ("name", "tally__rebuild"),
    ("name", "tally_"),
    ("name", "a" * 41),
    ("name", "\uff54\uff41\uff4c\uff4c\uff59"),
    ("name", "tally\u0131"),
    ("name", 7),
    ("schema", "aura"),
    ("schema", "public"),
    ("schema", "pg_catalog"),
    ("schema", "information_schema"),
    ("schema", "s" * 41),
    ("schema", "canary_nest\n"),
    ("handler", "apply_batch\n"),
    ("handler", "h" * 64),
    ("source_events", ["x'; DROP TABLE aura.events; --"]),
    ("source_events", ["A", "A"]),
    ("source_events", []),
    ("source_events", "A"),
    ("sql", "../../../../etc/passwd"),
    ("sql", "/etc/passwd"),
    ("sql", "missing.sql"),
    ("handler_kind", "set_based'; DROP"),
    ("storage", "postgres; DROP"),
    ("unknown_key", "x"),
]


def test_hostile_catalog_entries_are_refused(tmp_path: Path) -> None:
    refused = 0
    for field, value in CATALOG_INJECTIONS:
        path = _write_catalog(tmp_path, _entry(**{field: value}))
        with pytest.raises(CatalogError) as caught:
            load_catalog(path)
        message = str(caught.value)
        assert "entry 1" in message, message
        refused += 1
    assert refused == len(CATALOG_INJECTIONS)


def test_hostile_catalog_through_the_cli_touches_nothing(
    dsn: str, canary: Snapshot, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for field, value in CATALOG_INJECTIONS[:: max(1, len(CATALOG_INJECTIONS) // 25)]:
        path = _write_catalog(tmp_path, _entry(**{field: value}))
        code = main(["projections", "register", "--catalog", str(path), "--dsn", dsn])
        assert code == 1
        assert capsys.readouterr().err.startswith("aura-pg: ")
    assert snapshot(dsn) == canary
    assert _checkpoint_rows(dsn) == []


def test_free_text_catalog_fields_are_stored_verbatim(
    dsn: str, canary: Snapshot, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    description = "x'; DROP TABLE public.canary; -- $$ %I %s \"; DROP SCHEMA aura CASCADE; --"
    path = _write_catalog(
        tmp_path,
        _entry(description=description, source_events=["Weird.Type:x-1", "A"]),
    )
    assert main(["projections", "register", "--catalog", str(path), "--dsn", dsn]) == 0
    assert "hostile: created" in capsys.readouterr().out
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT description, event_types FROM aura.projection_checkpoints"
            " WHERE name = 'hostile'"
        ).fetchone()
    assert row == (description, ["Weird.Type:x-1", "A"])
    after = snapshot(dsn)
    assert after.canary == canary.canary
    new = set(after.structure) - set(canary.structure)
    # Its schema's objects, and its own role (aura_projector_hostile).
    outside = [entry for entry in new if not entry[1].endswith("hostile") and entry[0] != "grant"]
    assert new and not outside, outside[:10]
    assert set(canary.structure) <= set(after.structure)


# --- the CLI ---------------------------------------------------------------


def _cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse
        assert exc.code == 2, argv
        return 2


def test_cli_takes_hostile_names_as_values(
    dsn: str, canary: Snapshot, capsys: pytest.CaptureFixture[str]
) -> None:
    _register_fixture_projections(dsn)
    letter = _dead_letter(dsn, "s")
    structure = snapshot(dsn)
    checkpoints = _checkpoint_rows(dsn)
    events = event_rows(dsn)
    # Each command opens its own connections: a sample of the names (the
    # functions behind them took every one above).
    for name in (*HOSTILE[:10], *HOSTILE[10::4]):
        if name.startswith("-"):
            name = f"x{name}"  # an option to argparse, not a name
        for argv in (
            ["projections", "pause", name],
            ["projections", "resume", name],
            ["projections", "reset", name, "--yes"],
            ["projections", "replay", name, "s"],
            ["projections", "rebuild", name, "--abort"],
            ["projections", "rebuild", name],
        ):
            assert _cli([*argv, "--dsn", dsn]) == 1, argv
            err = capsys.readouterr().err
            assert err.startswith("aura-pg: ") and "Traceback" not in err
        assert _cli(["dlq", "list", name, "--dsn", dsn]) == 0
        assert capsys.readouterr().out.strip() == "(none)"
        assert _cli(["projections", "replay", "tally_set", name, "--dsn", dsn]) == 0
        assert f"replayed 0 events of {name}" in capsys.readouterr().out
        assert _cli(["dlq", "list", name, "--json", "--dsn", dsn]) == 0
        assert json.loads(capsys.readouterr().out) == []
    assert _checkpoint_rows(dsn) == checkpoints
    assert event_rows(dsn) == events
    assert snapshot(dsn) == structure

    note = "x'; DROP TABLE public.canary; -- %s $$"
    assert _cli(["dlq", "skip", str(letter), "--note", note, "--dsn", dsn]) == 0
    capsys.readouterr()
    assert _cli(["projections", "status", "--json", "--dsn", dsn]) == 0
    assert {row["name"] for row in json.loads(capsys.readouterr().out)} == {"tally_set"}
    with psycopg.connect(dsn, autocommit=True) as conn:
        stored = conn.execute(
            "SELECT resolution_note FROM aura.dead_letters WHERE id = %s", (letter,)
        ).fetchone()
    assert stored == (note,)
    assert snapshot(dsn).canary == canary.canary


def test_cli_stream_command_takes_hostile_ids_as_values(
    store: EventStore, dsn: str, canary: Snapshot, capsys: pytest.CaptureFixture[str]
) -> None:
    """``aura-pg stream`` (where the CLI has one): hostile stream ids read
    nothing and change nothing."""
    commands = {
        name
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
        for name in action.choices
    }
    if "stream" not in commands:
        pytest.skip("this CLI has no `stream` command")
    store.append("s", NewEvent("T", {}))
    events = event_rows(dsn)
    for name in HOSTILE:
        if name.startswith("-"):
            name = f"x{name}"
        code = _cli(["stream", name, "--dsn", dsn])
        assert isinstance(code, int)
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err
    assert event_rows(dsn) == events
    assert snapshot(dsn) == canary


# --- product bugs found here, fixed since ---------------------------------


def test_idempotency_keys_are_scoped_to_their_stream_even_with_colons(
    store: EventStore, dsn: str
) -> None:
    store.append("a:b", NewEvent("T", {"x": 1}, idempotency_key="c"))
    store.append("a", NewEvent("T", {"x": 0}))
    # A different event of stream 'a' whose key happens to be 'b:c': it must
    # be appended (the docs: "keys are scoped to their stream"); today it is
    # answered as a duplicate of the event of stream 'a:b', and nothing is
    # written.
    result = store.append("a", NewEvent("T", {"x": 1}, idempotency_key="b:c"))
    assert not result.duplicate
    assert [e.idempotency_key for e in store.read_stream("a")][-1] == "b:c"


@pytest.mark.parametrize("name", ["tally\x00", "tally\udcff"], ids=["nul", "surrogate"])
def test_projection_admin_refuses_unencodable_names_with_a_typed_error(dsn: str, name: str) -> None:
    for operation in (
        lambda: admin.pause(dsn, name),
        lambda: admin.dead_letters(dsn, name),
        lambda: admin.skip_dead_letter(dsn, 1, name),
    ):
        with pytest.raises(AuraPgError):
            operation()


def test_read_all_type_filters_are_values(store: EventStore, dsn: str, canary: Snapshot) -> None:
    store.append("s", [NewEvent("A", {}), NewEvent("B", {})])
    for name in HOSTILE:
        assert store.read_all(types=[name, "A"]).events[0].type == "A"
        assert len(store.read_all(types=[name, "A", "B", name]).events) == 2
    assert snapshot(dsn) == canary
    # The unique event ids stayed what the client sent.
    assert all(isinstance(e.event_id, uuid.UUID) for e in store.read_stream("s"))


async def test_async_store_refuses_unencodable_names_typed(async_store: AsyncEventStore) -> None:
    """The same validation in AsyncEventStore (shared operations)."""
    for stream, event in (
        ("lone \udcff", NewEvent("T", {})),
        ("s", NewEvent("T\ud800", {})),
        ("s", NewEvent("T", {"k": "\udcff"})),
        ("s", NewEvent("T", {}, metadata={"\udcff": 1})),
        ("s", NewEvent("T", nested_deeper_than_python())),
    ):
        with pytest.raises(EventValidationError):
            await async_store.append(stream, [NewEvent("OK", {}), event])
    with pytest.raises(EventValidationError):
        await async_store.read_stream("\udcff")
    with pytest.raises(EventValidationError):
        await async_store.read_all(types=["\udcff"])
    assert (await async_store.read_all(limit=2**40)).events == ()


def nested_deeper_than_python() -> dict[str, Any]:
    value: Any = 1
    for _ in range(sys.getrecursionlimit() + 10):
        value = {"d": value}
    return value  # type: ignore[no-any-return]
