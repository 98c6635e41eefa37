"""The database enforces its rules itself, for callers that bypass Python
(psql, other languages): the append function validates and the table has
CHECK constraints."""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from aura_pg import ConcurrencyError, EventStore, NewEvent


def call_append(
    conn: psycopg.Connection[Any], stream: Any, events: Any, expected: Any = "any"
) -> Any:
    return conn.execute(
        "SELECT * FROM aura.append_events(%s, %s::jsonb, %s)",
        (stream, None if events is None else json.dumps(events), expected),
    ).fetchall()


@pytest.mark.parametrize(
    ("stream", "events", "expected", "message"),
    [
        ("", [{"type": "T", "data": {}}], "any", "invalid stream id"),
        ("x" * 201, [{"type": "T", "data": {}}], "any", "invalid stream id"),
        ("a\nb", [{"type": "T", "data": {}}], "any", "invalid stream id"),
        (None, [{"type": "T", "data": {}}], "any", "invalid stream id"),
        ("s", [], "any", "non-empty JSON array"),
        ("s", {"type": "T"}, "any", "non-empty JSON array"),
        ("s", None, "any", "non-empty JSON array"),
        ("s", [{"type": "T", "data": {}}], "-1", "invalid expected version"),
        ("s", [{"type": "T", "data": {}}], "soon", "invalid expected version"),
        ("s", [{"type": "T", "data": {}}], None, "invalid expected version"),
        ("s", [1], "any", "event 1: must be a JSON object"),
        ("s", [{"data": {}}], "any", "type must be a string"),
        ("s", [{"type": "", "data": {}}], "any", "events_type_valid"),
        ("s", [{"type": "T\x07", "data": {}}], "any", "events_type_valid"),
        ("s", [{"type": "T", "data": [1]}], "any", "data must be a JSON object"),
        ("s", [{"type": "T"}], "any", "data must be a JSON object"),
        ("s", [{"type": "T", "data": {}, "metadata": 3}], "any", "metadata must be"),
        ("s", [{"type": "T", "data": {}, "idempotency_key": 7}], "any", "must be a string"),
        ("s", [{"type": "T", "data": {}, "idempotency_key": ""}], "any", "idempotency_key_valid"),
        (
            "s",
            [{"type": "T", "data": {}, "event_id": "nope"}],
            "any",
            "invalid input syntax for type uuid",
        ),
        ("s", [{"type": "T", "data": {}, "event_id": 7}], "any", "event_id must be a UUID"),
        (
            "s",
            [{"type": "T", "data": {}, "idempotency_key": "k"}] * 2,
            "any",
            "keys repeat within the batch",
        ),
    ],
)
def test_append_function_rejects_bad_input(
    store: EventStore, stream: Any, events: Any, expected: Any, message: str
) -> None:
    with store.pool.connection() as conn:
        with pytest.raises(psycopg.Error, match=message) as info:
            call_append(conn, stream, events, expected)
        # The function's own checks raise AU003; lengths and control
        # characters are the table's CHECK constraints, the UUID format the
        # uuid type's.
        assert info.value.sqlstate in ("AU003", "23514", "22P02")
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM aura.events").fetchone() == (0,)


def test_event_id_repeated_in_a_batch_is_refused(store: EventStore) -> None:
    batch = [
        {"type": "T", "data": {}, "idempotency_key": key,
         "event_id": "6f1c2a59-4a59-4b8e-9c11-0f3c1d2e3f40"}
        for key in ("a", "b")
    ]  # fmt: skip
    with store.pool.connection() as conn:
        with pytest.raises(psycopg.Error, match="event ids repeat within the batch") as info:
            call_append(conn, "s", batch)
        assert info.value.sqlstate == "AU003"
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM aura.events").fetchone() == (0,)


def set_database_limits(dsn: str, **limits: int) -> None:
    """ALTER DATABASE ... SET aura.<name> = value for the test's database."""
    database = conninfo_to_dict(dsn)["dbname"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        for setting, value in limits.items():
            conn.execute(
                sql.SQL("ALTER DATABASE {} SET {} = {}").format(
                    sql.Identifier(str(database)),
                    sql.Identifier("aura", setting),
                    sql.Literal(str(value)),
                )
            )


def test_payload_limit_setting_in_sql(store: EventStore) -> None:
    with store.pool.connection() as conn:
        conn.execute("SET aura.max_payload_bytes = 50")
        call_append(conn, "s", [{"type": "T", "data": {"x": "y" * 10}}])
        with pytest.raises(psycopg.Error, match="over the limit of 50"):
            call_append(conn, "s", [{"type": "T", "data": {"x": "y" * 60}}])


def test_a_session_cannot_raise_the_limits_above_the_databases(store: EventStore, dsn: str) -> None:
    """A session may lower aura.max_payload_bytes and aura.max_batch_events,
    but only ALTER DATABASE ... SET raises them above the defaults: a writer
    cannot lift the limits on itself (the append runs as the schema's owner,
    the setting is the caller's)."""
    big = {"x": "y" * 1_100_000}
    many = [{"type": "T", "data": {}}] * 10_001
    with store.pool.connection() as conn:
        conn.execute("SET aura.max_payload_bytes = 100000000")
        conn.execute("SET aura.max_batch_events = 1000000")
        with pytest.raises(psycopg.Error, match="over the limit of 1048576"):
            call_append(conn, "big", [{"type": "T", "data": big}])
        conn.rollback()
        with pytest.raises(psycopg.Error, match="10001 events, over the limit of 10000"):
            call_append(conn, "many", many)
        conn.rollback()
        conn.execute("SET aura.max_batch_events = 2")
        with pytest.raises(psycopg.Error, match="3 events, over the limit of 2"):
            call_append(conn, "few", many[:3])
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM aura.events").fetchone() == (0,)
    set_database_limits(dsn, max_payload_bytes=2_000_000, max_batch_events=20_000)
    with psycopg.connect(dsn) as conn:
        call_append(conn, "big", [{"type": "T", "data": big}])
        call_append(conn, "many", many)
        conn.commit()
        assert conn.execute("SELECT count(*) FROM aura.events").fetchone() == (10_002,)


def test_append_from_sql_defaults_key_to_event_id_and_hashes_only_own_keys(
    store: EventStore,
) -> None:
    """An event without a key of its own is keyed and deduplicated by its
    id (no hash stored); one with a key stores sha256(stream:key)."""
    with store.pool.connection() as conn:
        (keyless, keyed) = call_append(
            conn,
            "s-1",
            [{"type": "T", "data": {}}, {"type": "T", "data": {}, "idempotency_key": "k"}],
            "no_stream",
        )
        assert (keyless[1], keyless[3], keyed[1]) == (1, False, 2)
        rows = conn.execute(
            "SELECT idempotency_key, idempotency_hash FROM aura.events ORDER BY version"
        ).fetchall()
    assert rows[0] == (str(keyless[0]), None)
    assert rows[1][0] == "k"
    assert bytes(rows[1][1]) == hashlib.sha256(b"s-1:k").digest()


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("stream_id", "''"),
        ("stream_id", "E'a\\tb'"),
        ("type", "''"),
        ("version", "0"),
        ("data", "'[1]'::jsonb"),
        ("metadata", "'\"x\"'::jsonb"),
        ("idempotency_key", "repeat('k', 256)"),
        ("idempotency_hash", "'\\x00'::bytea"),
    ],
)
def test_table_check_constraints(store: EventStore, column: str, value: str) -> None:
    values = {
        "event_id": "gen_random_uuid()",
        "stream_id": "'s'",
        "version": "1",
        "type": "'T'",
        "data": "'{}'::jsonb",
        "metadata": "'{}'::jsonb",
        "idempotency_key": "'k'",
        "idempotency_hash": "sha256('s:k')",
    }
    values[column] = value
    statement = (
        f"INSERT INTO aura.events ({', '.join(values)}) VALUES ({', '.join(values.values())})"
    )
    with store.pool.connection() as conn:
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(statement)  # type: ignore[arg-type]
        conn.rollback()
        values[column] = {
            "stream_id": "'s'", "type": "'T'", "version": "1", "data": "'{}'::jsonb",
            "metadata": "'{}'::jsonb", "idempotency_key": "'k'",
            "idempotency_hash": "sha256('s:k')",
        }[column]  # fmt: skip
        ok = f"INSERT INTO aura.events ({', '.join(values)}) VALUES ({', '.join(values.values())})"
        conn.execute(ok)  # type: ignore[arg-type]


def test_a_resend_probes_the_idempotency_index_instead_of_scanning_the_log(
    store: EventStore,
) -> None:
    """aura.recorded_for_batch, which answers every resend, looks each key up
    in the unique index, whatever the planner thinks of the table's size.
    (A plain join was planned as a scan of the events table for a log of a
    few thousand events.)"""
    for n in range(30):
        store.append(f"s-{n}", [NewEvent("T", {"i": i}) for i in range(100)])
    with store.pool.connection() as conn:
        conn.execute("ANALYZE aura.events")
        ((plan,),) = conn.execute(
            "EXPLAIN (FORMAT JSON) SELECT * FROM aura.recorded_for_batch("
            '\'s-1\', \'[{"type": "T", "data": {}, "idempotency_key": "k"}]\')'
        ).fetchall()
    nodes = []

    def walk(node: dict[str, Any]) -> None:
        nodes.append((node["Node Type"], node.get("Relation Name"), node.get("Index Name")))
        for child in node.get("Plans", []):
            walk(child)

    walk(plan[0]["Plan"])
    assert ("Seq Scan", "events", None) not in nodes
    assert ("Index Scan", "events", "events_idempotency_hash_key") in nodes


def test_a_session_cannot_lift_limits_the_database_lowered(store: EventStore, dsn: str) -> None:
    """ALTER DATABASE ... SET below the defaults binds every session: SET
    back up to the default (or beyond) in a writer's session lifts nothing."""
    set_database_limits(dsn, max_payload_bytes=1000, max_batch_events=5)
    with psycopg.connect(dsn) as conn:
        conn.execute("SET aura.max_batch_events = 10000")
        conn.execute("SET aura.max_payload_bytes = 1048576")
        with pytest.raises(psycopg.Error, match="6 events, over the limit of 5"):
            call_append(conn, "many", [{"type": "T", "data": {}}] * 6)
        conn.rollback()
        with pytest.raises(psycopg.Error, match="over the limit of 1000"):
            call_append(conn, "big", [{"type": "T", "data": {"x": "y" * 500_000}}])
        conn.rollback()
        call_append(conn, "few", [{"type": "T", "data": {}}] * 5)
        conn.commit()
    assert [row for row in store.read_stream("many")] == []
    assert len(store.read_stream("few")) == 5


@pytest.mark.parametrize(
    "spelling", [str.upper, lambda text: "{" + text + "}", lambda text: text.replace("-", "")]
)
def test_a_resend_with_the_event_id_spelled_otherwise_is_a_duplicate(
    store: EventStore, spelling: Any
) -> None:
    """The uuid type accepts several spellings of one id; the recorded key
    is its canonical text, so every spelling of a resend finds it."""
    event_id = "0b6f2a7e-5c1d-4e8a-9f3b-2d4c6e8a0b1c"
    first = [{"type": "T", "data": {"n": 1}, "event_id": event_id}]
    resend = [{"type": "T", "data": {"n": 1}, "event_id": spelling(event_id)}]
    with store.pool.connection() as conn:
        ((_, version, position, duplicate),) = call_append(conn, "ids", first, "no_stream")
        assert not duplicate
        for expected in ("no_stream", "any", "1"):
            rows = call_append(conn, "ids", resend, expected)
            assert rows == [(uuid.UUID(event_id), version, position, True)]
        # Two spellings of one id in one batch are one key, repeated.
        other = str(uuid.uuid4())
        with pytest.raises(psycopg.Error, match="repeat within the batch"):
            call_append(
                conn,
                "ids-2",
                [{"type": "T", "data": {}, "event_id": s} for s in (other, spelling(other))],
            )
    assert len(store.read_stream("ids")) == 1


def test_an_expected_version_beyond_eighteen_digits_is_a_version_conflict(
    store: EventStore,
) -> None:
    store.append("far", NewEvent("T", {}))
    for expected in (10**18, 2**63 - 1):
        with pytest.raises(ConcurrencyError) as conflict:
            store.append("far", NewEvent("T", {}), expected)
        assert (conflict.value.expected, conflict.value.actual) == (expected, 1)
    with store.pool.connection() as conn, pytest.raises(psycopg.Error, match="invalid expected"):
        call_append(conn, "far", [{"type": "T", "data": {}}], str(2**63))
