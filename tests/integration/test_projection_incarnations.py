"""Issue 24, items 2 and 3: a batch read under one definition or incarnation
of a projection never commits into another (a shadow restarted by
aura.begin_shadow, a rebuild restarted by aura.begin_rebuild), and a swap
of a live projection with its shadow keeps each side's dead letters, also
when both hold one for the same event.

A batch is held between its read of its projection's row and its read of
the events by a lock the test holds on aura.events' commit-order index
(REINDEX: the planner of the batch read must open every index of the table,
while aura.begin_shadow and aura.begin_rebuild need none of them); the test
restarts the projection meanwhile."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from psycopg import sql

from aura_pg import EventStore, NewEvent, migrate
from aura_pg.errors import ProjectionError
from aura_pg.projection import admin, shadows
from aura_pg.projection.catalog import ProjectionSpec
from aura_pg.projection.rebuild import rebuild
from aura_pg.projection.registration import register_projections
from aura_pg.projection.runner import ProjectionRunner
from aura_pg.projection.settings import ProjectorSettings
from tests.helpers.projections import (
    applied_positions,
    caught_up,
    fixture_catalog,
    log_positions,
    query,
    running_daemon,
    wait_for,
)
from tests.integration.test_migrations import catalog

OWNERSHIP_KEY = "SELECT ('x' || left(md5('aura-pg projection:' || %s), 16))::bit(64)::bigint"


def tally_all() -> ProjectionSpec:
    return fixture_catalog().get("tally_set")


def tally_a_only() -> ProjectionSpec:
    """The same SQL folding only A events: another definition (hash)."""
    return tally_all().model_copy(update={"source_events": ("A",)})


def settings() -> ProjectorSettings:
    # A runner held on the test's lock must wait for it, not time out.
    return ProjectorSettings(wake="poll", poll_interval=0.1, lock_timeout_ms=60_000)


async def register(dsn: str, spec: ProjectionSpec) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await register_projections(conn, [spec])


def append_mixed(store: EventStore) -> None:
    store.append("s-1", [NewEvent(t, {}) for t in ("A", "B", "A", "B", "A")])
    store.append("s-2", [NewEvent(t, {}) for t in ("B", "A", "B")])


@contextmanager
def events_locked(dsn: str) -> Iterator[None]:
    """An ACCESS EXCLUSIVE lock on an index of aura.events until the block
    ends: a batch read (a new session plans it) waits for it after
    aura.project_batch has read its projection's row. The table itself is
    only SHARE locked: readers of its row type (a handler's definition) go
    on; appends wait."""
    with psycopg.connect(dsn) as conn:
        conn.execute("REINDEX INDEX aura.events_commit_order_idx")
        try:
            yield
        finally:
            conn.rollback()


def waiting_on_events(dsn: str) -> list[str]:
    """application_name of each session waiting for the index of aura.events."""
    rows = query(
        dsn,
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE NOT l.granted AND l.relation = 'aura.events_commit_order_idx'::regclass",
    )
    return [row[0] for row in rows]


def project_once(dsn: str, name: str, application_name: str) -> Any:
    """One aura.project_batch from checkpoint 0/0: its count, or its error."""
    try:
        with psycopg.connect(dsn, autocommit=True, application_name=application_name) as conn:
            row = conn.execute(
                "SELECT applied FROM aura.project_batch(%s, '0', 0)", (name,)
            ).fetchone()
            return row[0] if row else None
    except psycopg.Error as exc:
        return exc


def generation(dsn: str, name: str) -> int:
    rows = query(dsn, "SELECT generation FROM aura.projection_checkpoints WHERE name = %s", (name,))
    return int(rows[0][0])


def applied_types(dsn: str, schema: str) -> set[str]:
    rows = query(dsn, f"SELECT DISTINCT type FROM {schema}.applied_events")  # test schema names
    return {row[0] for row in rows}


async def test_a_batch_read_before_a_shadow_restart_is_refused_by_the_new_shadow(
    dsn: str, store: EventStore
) -> None:
    await register(dsn, tally_all())
    append_mixed(store)
    assert shadows.begin(dsn, "tally_set", tally_all()) == "created"
    before = generation(dsn, "tally_set__shadow")
    with events_locked(dsn):
        batch = asyncio.create_task(
            asyncio.to_thread(project_once, dsn, "tally_set__shadow", "held batch")
        )
        await wait_for(lambda: "held batch" in waiting_on_events(dsn), what="the held batch")
        # Restarted with types A only: a fresh row at checkpoint 0/0, which
        # is where the held batch expects its projection to be.
        assert shadows.begin(dsn, "tally_set", tally_a_only()) == "restarted"
    outcome = await batch
    assert isinstance(outcome, psycopg.Error), f"the stale batch applied {outcome} events"
    assert outcome.sqlstate == "AU006"
    assert generation(dsn, "tally_set__shadow") != before
    assert applied_positions(dsn, "tally_set__shadow") == []
    # Read again under the new definition: only A events.
    assert project_once(dsn, "tally_set__shadow", "fresh batch") == len(log_positions(dsn, ["A"]))
    assert applied_positions(dsn, "tally_set__shadow") == log_positions(dsn, ["A"])


async def test_a_dropped_and_begun_again_shadow_never_takes_its_predecessors_generation(
    dsn: str,
) -> None:
    await register(dsn, tally_all())
    seen = set()
    for spec in (tally_all(), tally_a_only(), tally_all()):
        shadows.begin(dsn, "tally_set", spec)
        seen.add(generation(dsn, "tally_set__shadow"))
        shadows.drop(dsn, "tally_set")
    assert len(seen) == 3
    assert generation(dsn, "tally_set") not in seen


async def test_a_batch_read_before_a_rebuild_restart_is_refused_and_the_old_swap_too(
    dsn: str, store: EventStore
) -> None:
    await register(dsn, tally_all())
    append_mixed(store)
    assert query(dsn, "SELECT aura.begin_rebuild('tally_set')") == [("tally_set__rebuild",)]
    first = generation(dsn, "tally_set__rebuild")
    with events_locked(dsn):
        batch = asyncio.create_task(
            asyncio.to_thread(project_once, dsn, "tally_set__rebuild", "held batch")
        )
        await wait_for(lambda: "held batch" in waiting_on_events(dsn), what="the held batch")
        await register(dsn, tally_a_only())  # the catalog changed: A only
        assert query(dsn, "SELECT aura.begin_rebuild('tally_set')") == [("tally_set__rebuild",)]
    outcome = await batch
    assert isinstance(outcome, psycopg.Error), f"the stale batch applied {outcome} events"
    assert outcome.sqlstate == "AU006"
    assert applied_positions(dsn, "tally_set__rebuild") == []
    # The process that began the first rebuild may not swap in the second.
    with pytest.raises(psycopg.Error) as refused:
        query(dsn, "SELECT aura.finish_rebuild('tally_set', NULL, %s)", (first,))
    assert refused.value.sqlstate == "AU006"
    assert "restarted" in str(refused.value)
    second = generation(dsn, "tally_set__rebuild")
    query(dsn, "SELECT aura.finish_rebuild('tally_set', NULL, %s)", (second,))
    assert applied_positions(dsn, "tally_set") == log_positions(dsn, ["A"])
    assert query(dsn, "SELECT event_types FROM aura.projection_checkpoints") == [(["A"],)]


async def test_a_shadow_runner_held_across_a_restart_folds_only_the_new_definition(
    dsn: str, store: EventStore
) -> None:
    await register(dsn, tally_all())
    append_mixed(store)
    shadows.begin(dsn, "tally_set", tally_all())
    runner = ProjectionRunner(dsn, "tally_set__shadow", settings())
    stop = asyncio.Event()
    with events_locked(dsn):
        task = asyncio.create_task(runner.run(stop))
        app = "aura-pg projector tally_set__shadow"
        await wait_for(lambda: app in waiting_on_events(dsn), what="the runner's first batch")
        assert shadows.begin(dsn, "tally_set", tally_a_only()) == "restarted"
    try:
        await wait_for(lambda: caught_up(dsn, "tally_set__shadow"))
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
    assert applied_types(dsn, "tally_set__shadow") == {"A"}
    assert applied_positions(dsn, "tally_set__shadow") == log_positions(dsn, ["A"])


async def test_a_rebuild_restarted_under_it_does_not_report_rebuilt_and_swapped_in(
    dsn: str, store: EventStore
) -> None:
    """`projections rebuild` with every type; meanwhile another process
    restarts the rebuild with types A only. The first one must not swap in
    (nor report) a rebuild it did not start, folding the wrong set."""
    await register(dsn, tally_all())
    append_mixed(store)
    with psycopg.connect(dsn, autocommit=True) as owner:
        # Hold the rebuild's ownership so that its runner stands by until
        # the events are locked.
        ((key,),) = owner.execute(OWNERSHIP_KEY, ("tally_set__rebuild",)).fetchall()
        owner.execute("SELECT pg_advisory_lock(%s)", (key,))
        first = asyncio.create_task(rebuild(dsn, tally_all(), settings()))
        await wait_for(lambda: query(dsn, "SELECT 1 FROM aura.projection_checkpoints"
                                          " WHERE name = 'tally_set__rebuild'"))  # fmt: skip
        with events_locked(dsn):
            owner.execute("SELECT pg_advisory_unlock(%s)", (key,))
            app = "aura-pg projector tally_set__rebuild"
            await wait_for(lambda: app in waiting_on_events(dsn), what="the rebuild's first batch")
            await register(dsn, tally_a_only())
            query(dsn, "SELECT aura.begin_rebuild('tally_set')")
    with pytest.raises(ProjectionError, match="restarted"):
        await asyncio.wait_for(first, 30)
    # The live model is untouched; the second rebuild is there to finish.
    assert query(dsn, "SELECT event_types FROM aura.projection_checkpoints"
                      " WHERE name = 'tally_set'") == [(None,)]  # fmt: skip
    assert applied_positions(dsn, "tally_set") == []
    second = await rebuild(dsn, tally_a_only(), settings())
    assert second is not None
    assert applied_types(dsn, "tally_set") == {"A"}
    assert applied_positions(dsn, "tally_set") == log_positions(dsn, ["A"])


def pending_letters(dsn: str) -> dict[int, str]:
    rows = query(dsn, "SELECT id, projection FROM aura.dead_letters WHERE status = 'pending'")
    return dict(rows)


async def test_promote_and_rollback_keep_each_sides_dead_letters_for_the_same_event(
    dsn: str, store: EventStore
) -> None:
    await register(dsn, tally_all())
    store.append("s-1", [NewEvent("A", {}), NewEvent("A", {"poison": True}), NewEvent("A", {})])
    shadows.begin(dsn, "tally_set", tally_a_only())
    async with running_daemon(dsn, ["tally_set"]):
        await wait_for(lambda: len(pending_letters(dsn)) == 2, what="both dead letters")
        await wait_for(lambda: caught_up(dsn, "tally_set") and caught_up(dsn, "tally_set__shadow"))
    letters = pending_letters(dsn)
    live_letter = next(i for i, name in letters.items() if name == "tally_set")
    shadow_letter = next(i for i, name in letters.items() if name == "tally_set__shadow")
    poison = query(dsn, "SELECT DISTINCT global_position FROM aura.dead_letters")
    assert len(poison) == 1  # both for the same event

    assert shadows.promote(dsn, "tally_set") == "promoted"
    # Each letter follows the definition whose handler failed on it.
    assert pending_letters(dsn) == {live_letter: "tally_set__shadow", shadow_letter: "tally_set"}
    assert query(dsn, "SELECT event_types FROM aura.projection_checkpoints"
                      " WHERE name = 'tally_set'") == [(["A"],)]  # fmt: skip

    assert shadows.promote(dsn, "tally_set") == "promoted"  # the rollback
    assert pending_letters(dsn) == {live_letter: "tally_set", shadow_letter: "tally_set__shadow"}
    assert query(dsn, "SELECT event_types FROM aura.projection_checkpoints"
                      " WHERE name = 'tally_set'") == [(None,)]  # fmt: skip

    # A retry applies the letter with its own side's handler and schema.
    ((poison_position,),) = poison
    query(dsn, "INSERT INTO tally_set.cures SELECT event_id FROM aura.events"
               " WHERE global_position = %s", (poison_position,))  # fmt: skip
    assert admin.retry_dead_letter(dsn, live_letter) == "retried"
    assert poison_position in applied_positions(dsn, "tally_set")
    assert poison_position not in applied_positions(dsn, "tally_set__shadow")
    assert pending_letters(dsn) == {shadow_letter: "tally_set__shadow"}


async def test_upgrading_from_0008_takes_generations_past_the_old_ones(
    empty_dsn: str, dsn: str
) -> None:
    """A database at 0008 counted generations up from 0 and had no sequence.
    0009 adds it, past every generation in use, lets the projector role
    take values, and builds the catalog a fresh install builds."""
    migrate.upgrade(empty_dsn, "0008")
    await register(empty_dsn, tally_all())
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        # The migration files are today's: give the table 0008's shape.
        conn.execute("ALTER TABLE aura.projection_checkpoints ALTER generation SET DEFAULT 0")
        conn.execute("DROP SEQUENCE aura.projection_generation")
        conn.execute("UPDATE aura.projection_checkpoints SET generation = 7")
    migrate.upgrade(empty_dsn)
    # (but the registered read model's role's default privileges)
    assert [row for row in catalog(empty_dsn) if "tally_set" not in row[1]] == catalog(dsn)
    projector = query(empty_dsn, "SELECT role_name FROM aura.role_names WHERE kind = 'projector'")
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(projector[0][0])))
        assert conn.execute("SELECT aura.reset_projection('tally_set')").fetchone() == ("reset",)
    assert generation(empty_dsn, "tally_set") > 7
