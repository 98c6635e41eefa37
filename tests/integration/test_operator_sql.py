"""The psql operator surface (migration 0006): owner liveness and lag in
aura.projection_status, aura.stream_categories, aura.list_dead_letters and
the aura.debug NOTICEs of the append and the projection batch."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from aura_pg import EventStore, NewEvent
from aura_pg.projection.registration import register_projections
from tests.helpers.projections import (
    caught_up,
    fixture_catalog,
    query,
    running_daemon,
    status_of,
    wait_for,
)


async def register(dsn: str, *names: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await register_projections(conn, fixture_catalog().select(list(names)))


def checkpoint_of(dsn: str, name: str) -> tuple[str, int]:
    ((tx, pos),) = query(
        dsn,
        "SELECT transaction_id::text, global_position FROM aura.projection_checkpoints"
        " WHERE name = %s",
        (name,),
    )
    return tx, pos


async def test_owner_alive_follows_the_ownership_lock(dsn: str, store: EventStore) -> None:
    store.append("s-1", [NewEvent("A", {})])
    async with running_daemon(dsn, ["tally_set"]):
        await wait_for(lambda: caught_up(dsn, "tally_set"))
        row = status_of(dsn, "tally_set")
        assert row["owner"] is not None
        assert row["owner_alive"] is True
    # Released on a clean stop: no owner, so no liveness to speak of.
    row = status_of(dsn, "tally_set")
    assert (row["owner"], row["owner_alive"]) == (None, None)
    # An owner named but holding no lock (a daemon killed with -9).
    query(
        dsn, "UPDATE aura.projection_checkpoints SET owner = 'gone:4242' WHERE name = 'tally_set'"
    )
    assert status_of(dsn, "tally_set")["owner_alive"] is False
    # The lock is what counts, taken here by hand with the daemon's key.
    with psycopg.connect(dsn, autocommit=True) as holder:
        holder.execute(
            "SELECT pg_advisory_lock(('x' || left(md5('aura-pg projection:' || %s), 16))"
            "::bit(64)::bigint)",
            ("tally_set",),
        )
        assert status_of(dsn, "tally_set")["owner_alive"] is True
    assert status_of(dsn, "tally_set")["owner_alive"] is False


async def test_seconds_behind_is_the_age_of_the_oldest_unapplied_event(
    dsn: str, store: EventStore
) -> None:
    await register(dsn, "tally_set")
    query(dsn, "SELECT aura.pause_projection('tally_set')")
    store.append("s-1", [NewEvent("A", {})])
    first = status_of(dsn, "tally_set")
    assert first["events_behind"] == 1
    await asyncio.sleep(1.1)
    # Nothing new was written, and the lag still grows.
    later = status_of(dsn, "tally_set")
    assert later["seconds_behind"] >= first["seconds_behind"] + 1
    query(dsn, "SELECT aura.resume_projection('tally_set')")
    async with running_daemon(dsn, ["tally_set"]):
        await wait_for(lambda: caught_up(dsn, "tally_set"))
    assert status_of(dsn, "tally_set")["seconds_behind"] == 0


def test_stream_categories_summarise_streams_by_the_prefix_of_their_id(
    dsn: str, store: EventStore
) -> None:
    assert query(dsn, "SELECT * FROM aura.stream_categories") == []
    store.append("debate-1", [NewEvent("A", {}), NewEvent("B", {})])
    store.append("debate-2", [NewEvent("A", {})])
    store.append("decision-1-x", [NewEvent("A", {})])
    store.append("loner", [NewEvent("A", {})])
    store.append("debate-1", [NewEvent("C", {})])
    rows = query(
        dsn,
        "SELECT c.category, c.streams, c.events, c.last_event_at = ("
        "    SELECT max(e.recorded_at) FROM aura.events e"
        "     WHERE split_part(e.stream_id, '-', 1) = c.category)"
        " FROM aura.stream_categories c",
    )
    assert rows == [
        ("debate", 2, 4, True),
        ("decision", 1, 1, True),
        ("loner", 1, 1, True),
    ]


async def test_list_dead_letters_by_projection_and_status(dsn: str, store: EventStore) -> None:
    poison = store.append("p-1", [NewEvent("A", {"poison": True}), NewEvent("A", {})])
    async with running_daemon(dsn, ["tally_set"]):
        await wait_for(lambda: caught_up(dsn, "tally_set"))
    listed = query(dsn, "SELECT event_id, status FROM aura.list_dead_letters('tally_set')")
    assert listed == [(poison.events[0].event_id, "pending")]
    assert query(dsn, "SELECT count(*) FROM aura.list_dead_letters()") == [(1,)]
    ((letter_id,),) = query(dsn, "SELECT id FROM aura.list_dead_letters('tally_set')")
    query(dsn, "SELECT aura.skip_dead_letter(%s, 'not ours')", (letter_id,))
    assert query(dsn, "SELECT * FROM aura.list_dead_letters('tally_set')") == []
    assert query(
        dsn, "SELECT status, resolution_note FROM aura.list_dead_letters('tally_set', 'skipped')"
    ) == [("skipped", "not ours")]
    assert query(dsn, "SELECT count(*) FROM aura.list_dead_letters(NULL, NULL)") == [(1,)]
    with psycopg.connect(dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as unknown:
            conn.execute("SELECT * FROM aura.list_dead_letters('no_such_projection')")
        assert unknown.value.sqlstate == "AU005"
        with pytest.raises(psycopg.Error) as bad_status:
            conn.execute("SELECT * FROM aura.list_dead_letters(NULL, 'lost')")
        assert bad_status.value.sqlstate == "AU007"


def notices_of(conn: psycopg.Connection[Any]) -> list[str]:
    seen: list[str] = []
    conn.add_notice_handler(lambda diag: seen.append(diag.message_primary or ""))
    return seen


async def test_debug_setting_makes_append_and_batch_explain_themselves(dsn: str) -> None:
    await register(dsn, "tally_set")
    append = (
        "SELECT * FROM aura.append_events('d-1',"
        ' \'[{"type": "A", "data": {}, "idempotency_key": "k-1"}]\', %s)'
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        seen = notices_of(conn)
        conn.execute(append, ("no_stream",))
        assert seen == []  # off by default
        conn.execute("SET aura.debug = on")
        conn.execute('SELECT * FROM aura.append_events(\'d-2\', \'[{"type": "A", "data": {}}]\')')
        conn.execute(append, ("no_stream",))  # a resend: answered as a duplicate
        with pytest.raises(psycopg.Error, match="is at version 1"):
            conn.execute(
                "SELECT * FROM aura.append_events('d-1', '[{\"type\": \"B\", \"data\": {}}]', '0')"
            )
        tx, pos = checkpoint_of(dsn, "tally_set")
        conn.execute("SELECT * FROM aura.project_batch('tally_set', %s, %s)", (tx, pos))
        tx, pos = checkpoint_of(dsn, "tally_set")
        conn.execute("SELECT * FROM aura.project_batch('tally_set', %s, %s)", (tx, pos))
        conn.execute("SELECT aura.pause_projection('tally_set')")
        conn.execute("SELECT * FROM aura.project_batch('tally_set', %s, %s)", (tx, pos))
    assert len(seen) == 6, seen
    assert (
        "stream 'd-2' was at version 0, expected any: appended 1 events as versions 1 to 1"
        in (seen[0])
    )
    assert "answered as a duplicate, nothing written" in seen[1]
    assert "stream 'd-1' is at version 1, expected 0" in seen[2]
    assert "refusing" in seen[2]
    assert "'tally_set' applied 2 events" in seen[3]
    assert f"-> {tx}/{pos}" in seen[3]
    assert "'tally_set' is caught up" in seen[4]
    assert "'tally_set' applies nothing: it is paused" in seen[5]
