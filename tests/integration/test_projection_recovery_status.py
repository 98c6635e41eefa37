"""A projection that recovers shows no error: the batch that ends a run of
failures clears last_error in aura.projection_status (which `aura-pg
status` and `aura-pg doctor` read); a dead-lettered event keeps its error
with the dead letter."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

from aura_pg import EventStore, NewEvent
from aura_pg._resources import named_queries
from aura_pg.projection.registration import register_projections
from tests.helpers.projections import (
    assert_exact_fold,
    caught_up,
    fixture_catalog,
    query,
    running_daemon,
    status_of,
    wait_for,
)


def health(dsn: str, name: str) -> tuple[Any, ...]:
    """The failure columns of the projection's row and of its status."""
    ((table_error, table_error_at),) = query(
        dsn,
        "SELECT last_error, last_error_at FROM aura.projection_checkpoints WHERE name = %s",
        (name,),
    )
    status = status_of(dsn, name)
    return (
        status["consecutive_failures"],
        status["last_error"],
        status["last_error_at"],
        table_error,
        table_error_at,
    )


def cli_status(dsn: str, name: str) -> dict[str, Any]:
    """The row `aura-pg projections status` prints for ``name``."""
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        rows = conn.execute(named_queries("queries/projector.sql")["status"]).fetchall()
    (row,) = [r for r in rows if r["name"] == name]
    return row


async def test_a_projection_that_recovers_shows_no_error(dsn: str, store: EventStore) -> None:
    """Its handler fails until the cause is removed: the error shows while
    the projection fails (its circuit opens), and is gone once the batches
    apply again."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await register_projections(conn, fixture_catalog().select(["tally_strict"]))
    query(dsn, "INSERT INTO tally_strict.switches VALUES ('broken')")
    for n in range(6):
        store.append(f"s-{n % 2}", [NewEvent("A", {"n": n})])
    async with running_daemon(dsn, ["tally_strict"]):
        failing = await wait_for(
            lambda: (s := status_of(dsn, "tally_strict"))["status"] == "failed" and s,
            what="the circuit to open",
        )
        assert "tally is switched to broken" in failing["last_error"]
        assert failing["last_error_at"] is not None
        assert "tally is switched to broken" in cli_status(dsn, "tally_strict")["last_error"]

        query(dsn, "DELETE FROM tally_strict.switches")
        await wait_for(lambda: caught_up(dsn, "tally_strict"), what="recovery")
        await wait_for(
            lambda: status_of(dsn, "tally_strict")["status"] == "running", what="running"
        )
    assert health(dsn, "tally_strict") == (0, None, None, None, None)
    assert cli_status(dsn, "tally_strict")["last_error"] is None
    assert_exact_fold(dsn, "tally_strict")


async def test_a_dead_lettered_event_keeps_its_error_with_the_dead_letter(
    dsn: str, store: EventStore
) -> None:
    """The projection moves past a poison event and applies the events after
    it: its status shows no error, the dead letter has it."""
    poison = store.append("p-1", [NewEvent("A", {"poison": True})]).events[0]
    for n in range(5):
        store.append(f"after-{n}", [NewEvent("B", {"n": n})])
    async with running_daemon(dsn, ["tally_set"]):
        await wait_for(lambda: caught_up(dsn, "tally_set"))
        await wait_for(
            lambda: status_of(dsn, "tally_set")["consecutive_failures"] == 0, what="a good batch"
        )
    assert health(dsn, "tally_set") == (0, None, None, None, None)
    assert status_of(dsn, "tally_set")["dead_letters"] == 1
    ((event_id, error),) = query(
        dsn, "SELECT event_id, error FROM aura.dead_letters WHERE projection = 'tally_set'"
    )
    assert event_id == poison.event_id
    assert "poison event" in error
    assert_exact_fold(dsn, "tally_set", exclude=[poison.global_position])


async def test_the_error_shows_until_a_batch_is_applied(dsn: str, store: EventStore) -> None:
    """In SQL, without a daemon: a recorded failure shows; resuming (which
    closes the circuit) or a paused batch does not clear it; the first
    applied batch does."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await register_projections(conn, fixture_catalog().select(["tally_set"]))
    store.append("s-1", [NewEvent("A", {}), NewEvent("B", {})])
    failure = query(
        dsn,
        "SELECT consecutive_failures, circuit_state FROM aura.record_projection_failure("
        "'tally_set', '0', 0, 'test:1', 'handler broke', 'XX000')",
    )
    assert failure == [(1, "closed")]
    recorded = health(dsn, "tally_set")
    assert recorded[:2] == (1, "XX000: handler broke")
    assert recorded[2] is not None and recorded[3:] == (recorded[1], recorded[2])

    query(dsn, "SELECT aura.resume_projection('tally_set')")
    assert health(dsn, "tally_set") == (0, *recorded[1:])  # not recovered yet
    query(dsn, "SELECT aura.pause_projection('tally_set')")
    paused = query(dsn, "SELECT applied FROM aura.project_batch('tally_set', '0', 0)")
    assert paused == [(0,)]
    assert health(dsn, "tally_set") == (0, *recorded[1:])

    query(dsn, "SELECT aura.resume_projection('tally_set')")
    applied = query(dsn, "SELECT applied FROM aura.project_batch('tally_set', '0', 0)")
    assert applied == [(2,)]
    assert health(dsn, "tally_set") == (0, None, None, None, None)
