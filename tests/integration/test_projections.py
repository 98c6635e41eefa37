"""The projection engine against a real Postgres: daemons in the test's
event loop, handlers in SQL, every read model checked against the log."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from aura_pg import EventStore, NewEvent
from aura_pg.errors import CatalogError, ProjectionError, UnknownProjection
from aura_pg.projection import admin
from aura_pg.projection.connection import connect
from aura_pg.projection.daemon import ProjectorDaemon
from aura_pg.projection.rebuild import RebuildProgress, RebuildResult, abort_rebuild, rebuild
from aura_pg.projection.registration import register_projections
from aura_pg.projection.settings import ProjectorSettings
from tests.helpers.projections import (
    RunningDaemon,
    applied_positions,
    assert_exact_fold,
    caught_up,
    fixture_catalog,
    log_positions,
    query,
    running_daemon,
    status_of,
    wait_for,
)


def append_spread(store: EventStore, count: int, prefix: str = "s", **data: Any) -> None:
    for n in range(count):
        store.append(f"{prefix}-{n % 5}", [NewEvent("A" if n % 2 else "B", {"n": n, **data})])


async def test_daemon_applies_every_event_once_per_event_and_set_based(
    dsn: str, store: EventStore
) -> None:
    append_spread(store, 120)
    async with running_daemon(dsn, ["tally_set", "tally_each"]) as daemon:
        await wait_for(lambda: caught_up(dsn, "tally_set") and caught_up(dsn, "tally_each"))
        append_spread(store, 30, prefix="late")
        await wait_for(lambda: caught_up(dsn, "tally_set") and caught_up(dsn, "tally_each"))
        assert daemon.runners["tally_set"].owning
    for schema in ("tally_set", "tally_each"):
        assert_exact_fold(dsn, schema)
        status = status_of(dsn, schema)
        assert status["events_applied"] == 150
        assert status["status"] == "running"
        assert status["owner"] is None  # released on the way out


async def test_type_filter_applies_only_its_types_and_moves_past_others(
    dsn: str, store: EventStore
) -> None:
    store.append("f-1", [NewEvent(t, {}) for t in ("A", "B", "C", "B", "B", "A")])
    async with running_daemon(dsn, ["tally_filtered"]):
        await wait_for(lambda: caught_up(dsn, "tally_filtered"))
    assert applied_positions(dsn, "tally_filtered") == log_positions(dsn, ["A", "C"])
    checkpoint = status_of(dsn, "tally_filtered")["checkpoint"]
    last = query(
        dsn,
        "SELECT transaction_id::text || '/' || global_position FROM aura.events "
        "ORDER BY global_position DESC LIMIT 1",
    )[0][0]
    assert checkpoint == last  # past the trailing B events too


async def test_a_stale_checkpoint_applies_nothing(dsn: str, store: EventStore) -> None:
    append_spread(store, 10)
    async with await connect(dsn, ProjectorSettings(), "test") as conn:
        await register_projections(conn, fixture_catalog().select(["tally_set"]))
        cur = await conn.execute("SELECT * FROM aura.project_batch('tally_set', '0', 0, 'me')")
        applied, *_ = await cur.fetchone() or ()
        assert applied == 10
        with pytest.raises(psycopg.Error) as caught:
            await conn.execute("SELECT * FROM aura.project_batch('tally_set', '0', 0, 'stale')")
        assert caught.value.sqlstate == "AU006"
        with pytest.raises(psycopg.Error) as unknown:
            await conn.execute("SELECT * FROM aura.project_batch('nope', '0', 0)")
        assert unknown.value.sqlstate == "AU005"
    assert_exact_fold(dsn, "tally_set")
    with pytest.raises(UnknownProjection):
        admin.pause(dsn, "nope")


async def test_an_event_committed_late_is_not_skipped(dsn: str, store: EventStore) -> None:
    """A transaction that took its position early and commits late: the
    projection waits for it instead of passing it by."""
    with psycopg.connect(dsn) as slow:
        store_on_slow = EventStore.connect(dsn, max_size=1)
        try:
            store_on_slow.append("slow", [NewEvent("A", {"slow": True})], conn=slow)
            store.append("fast", [NewEvent("A", {"fast": True})])
            async with running_daemon(dsn, ["tally_set"]):
                await asyncio.sleep(0.6)
                # The fast event committed, but the slow one holds the horizon.
                assert applied_positions(dsn, "tally_set") == []
                slow.commit()
                await wait_for(lambda: caught_up(dsn, "tally_set"))
        finally:
            store_on_slow.close()
    assert_exact_fold(dsn, "tally_set")


async def test_poison_event_is_isolated_retried_and_dead_lettered(
    dsn: str, store: EventStore
) -> None:
    append_spread(store, 12)
    poison = store.append("p-1", [NewEvent("A", {"poison": True})]).events[0]
    append_spread(store, 12, prefix="after")
    async with running_daemon(dsn, ["tally_set", "tally_each", "tally_filtered"]):
        await wait_for(
            lambda: all(caught_up(dsn, n) for n in ("tally_set", "tally_each", "tally_filtered"))
        )
    for name in ("tally_set", "tally_each"):
        assert_exact_fold(dsn, name, exclude=[poison.global_position])
        status = status_of(dsn, name)
        assert status["dead_letters"] == 1
        assert status["status"] == "running"
        # Recovered: the error is the dead letter's, no longer the status's.
        assert status["last_error"] is None
        (letter,) = admin.dead_letters(dsn, name)
        assert "poison event" in letter["error"]
    letters = admin.dead_letters(dsn, "tally_set")
    assert [(d["event_id"], d["attempts"]) for d in letters] == [(poison.event_id, 3)]
    # tally_filtered also sees A events and has its own dead letter.
    assert len(admin.dead_letters(dsn, "tally_filtered")) == 1

    # The operator fixes the cause, then retries one and skips another.
    query(dsn, "INSERT INTO tally_set.cures VALUES (%s)", (poison.event_id,))
    assert admin.retry_dead_letter(dsn, letters[0]["id"]) == "retried"
    assert_exact_fold(dsn, "tally_set")
    assert status_of(dsn, "tally_set")["dead_letters"] == 0
    each_letter = admin.dead_letters(dsn, "tally_each")[0]
    with pytest.raises(psycopg.Error, match="poison event"):
        admin.retry_dead_letter(dsn, each_letter["id"])  # not cured there
    assert admin.skip_dead_letter(dsn, each_letter["id"], "known bad") == "skipped"
    assert admin.dead_letters(dsn, "tally_each") == []


async def test_a_poison_event_is_found_in_a_few_slices_not_event_by_event(
    dsn: str, store: EventStore
) -> None:
    """A batch of 50 with a poison event at the 38th: halving finds it in a
    handful of transactions, where one-at-a-time needed about fifty."""
    append_spread(store, 37)
    poison = store.append("p-1", [NewEvent("A", {"poison": True})]).events[0]
    append_spread(store, 12, prefix="after")
    async with running_daemon(dsn, ["tally_set"]) as daemon:
        await wait_for(lambda: caught_up(dsn, "tally_set"))
        runner = daemon.runners["tally_set"]
        assert runner.dead_lettered == 1
        # Applied batches: the slices around the poison event, 25 + 12 + 12.
        assert runner.batches <= 5, runner.batches
    assert_exact_fold(dsn, "tally_set", exclude=[poison.global_position])


async def test_circuit_breaker_opens_pauses_and_recovers(dsn: str, store: EventStore) -> None:
    async with await connect(dsn, ProjectorSettings(), "test") as conn:
        await register_projections(conn, fixture_catalog().select(["tally_strict", "tally_set"]))
    query(dsn, "INSERT INTO tally_strict.switches VALUES ('broken')")
    append_spread(store, 5)
    async with running_daemon(dsn, ["tally_strict", "tally_set"]):
        opened = await wait_for(
            lambda: (s := status_of(dsn, "tally_strict"))["status"] == "failed" and s,
            what="the circuit to open",
        )
        assert opened["circuit"] in ("open", "half_open")
        assert opened["consecutive_failures"] >= 3
        # The other projection never noticed.
        await wait_for(lambda: caught_up(dsn, "tally_set"))
        assert applied_positions(dsn, "tally_strict") == []
        assert admin.dead_letters(dsn, "tally_strict") == []  # no DLQ for it
        query(dsn, "DELETE FROM tally_strict.switches")
        # After the recovery timeout one event is tried (half-open), then all.
        await wait_for(lambda: caught_up(dsn, "tally_strict"), what="recovery")
    status = status_of(dsn, "tally_strict")
    assert (status["status"], status["circuit"], status["consecutive_failures"]) == (
        "running",
        "closed",
        0,
    )
    assert_exact_fold(dsn, "tally_strict")


async def test_pause_resume_and_reset(dsn: str, store: EventStore) -> None:
    append_spread(store, 10)
    async with running_daemon(dsn, ["tally_set"], poll_interval=0.1):
        await wait_for(lambda: caught_up(dsn, "tally_set"))
        assert admin.pause(dsn, "tally_set") == "paused"
        append_spread(store, 10, prefix="paused")
        await asyncio.sleep(0.5)
        assert len(applied_positions(dsn, "tally_set")) == 10
        assert status_of(dsn, "tally_set")["status"] == "paused"
        assert admin.resume(dsn, "tally_set") == "running"
        await wait_for(lambda: caught_up(dsn, "tally_set"))
        assert_exact_fold(dsn, "tally_set")
        assert admin.reset(dsn, "tally_set") == "reset"
        await wait_for(lambda: caught_up(dsn, "tally_set"))
    assert_exact_fold(dsn, "tally_set")
    assert status_of(dsn, "tally_set")["events_applied"] == 20


async def test_replay_stream_repairs_one_aggregate(dsn: str, store: EventStore) -> None:
    append_spread(store, 20)
    async with running_daemon(dsn, ["tally_set"]):
        await wait_for(lambda: caught_up(dsn, "tally_set"))
    query(dsn, "DELETE FROM tally_set.streams WHERE stream_id = 's-1'")
    assert admin.replay_stream(dsn, "tally_set", "s-1") == 4
    assert_exact_fold(dsn, "tally_set")


async def test_rebuild_swaps_in_atomically_while_the_live_model_serves(
    dsn: str, store: EventStore
) -> None:
    append_spread(store, 300)
    stop_writing = threading.Event()
    smallest_seen: list[int] = []

    def keep_writing() -> None:
        n = 0
        while not stop_writing.is_set():
            store.append(f"live-{n % 3}", [NewEvent("A", {"n": n})])
            n += 1
            time.sleep(0.005)

    def keep_reading() -> None:
        # Readers must never see a half-built model: row counts only grow.
        last = 0
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop_writing.is_set():
                count = conn.execute("SELECT count(*) FROM tally_set.applied_events").fetchone()
                assert count is not None
                if count[0] < last:
                    smallest_seen.append(count[0])
                last = count[0]

    async with running_daemon(dsn, ["tally_set"]):
        await wait_for(lambda: caught_up(dsn, "tally_set"))
        threads = [threading.Thread(target=keep_writing), threading.Thread(target=keep_reading)]
        for thread in threads:
            thread.start()
        try:
            progress: list[RebuildProgress] = []
            result = await rebuild(
                dsn,
                fixture_catalog().get("tally_set"),
                progress=progress.append,
                progress_interval=0.05,
            )
        finally:
            stop_writing.set()
            for thread in threads:
                thread.join()
        assert result is not None and result.events_applied >= 300
        await wait_for(lambda: caught_up(dsn, "tally_set"))
    assert smallest_seen == []
    assert_exact_fold(dsn, "tally_set")
    schemas = {row[0] for row in query(dsn, "SELECT nspname FROM pg_namespace")}
    assert {"tally_set", "tally_set__previous"} <= schemas
    assert "tally_set__rebuild" not in schemas
    assert [s["name"] for s in admin.status(dsn)] == ["tally_set"]


async def test_changed_definition_waits_for_a_rebuild(dsn: str, store: EventStore) -> None:
    append_spread(store, 10)
    spec = fixture_catalog().get("tally_set")
    async with await connect(dsn, ProjectorSettings(), "test") as conn:
        assert await register_projections(conn, [spec]) == {"tally_set": "created"}
        assert await register_projections(conn, [spec]) == {"tally_set": "unchanged"}
        changed = spec.model_copy(
            update={"definition_sql": spec.definition_sql + "\nCREATE TABLE extra (x int);\n"}
        )
        assert await register_projections(conn, [changed]) == {"tally_set": "changed"}
    assert status_of(dsn, "tally_set")["rebuild_needed"] is True
    assert not query(
        dsn, "SELECT 1 FROM pg_tables WHERE schemaname = 'tally_set' AND tablename = 'extra'"
    )
    result = await rebuild(dsn, changed)
    assert result is not None
    assert query(
        dsn, "SELECT 1 FROM pg_tables WHERE schemaname = 'tally_set' AND tablename = 'extra'"
    )
    assert status_of(dsn, "tally_set")["rebuild_needed"] is False
    assert_exact_fold(dsn, "tally_set")


async def test_a_definition_without_its_handler_is_a_catalog_error(dsn: str) -> None:
    spec = fixture_catalog().get("tally_set").model_copy(update={"handler": "missing_handler"})
    async with await connect(dsn, ProjectorSettings(), "test") as conn:
        with pytest.raises(CatalogError, match=r"tally_set.*missing_handler"):
            await register_projections(conn, [spec])
    assert query(dsn, "SELECT count(*) FROM aura.projection_checkpoints") == [(0,)]
    assert not query(dsn, "SELECT 1 FROM pg_namespace WHERE nspname = 'tally_set'")


async def test_the_log_watcher_wakes_the_daemon_long_before_its_poll(
    dsn: str, store: EventStore
) -> None:
    async with running_daemon(dsn, ["tally_set"], poll_interval=30.0) as daemon:
        assert daemon.listener is None
        await wait_for(lambda: daemon.watcher is not None and daemon.watcher.connected)
        await wait_for(lambda: daemon.runners["tally_set"].owning)
        store.append("wake", [NewEvent("A", {})])
        await wait_for(lambda: caught_up(dsn, "tally_set"), timeout=3.0)

        # Kill the watcher's connection: it reconnects and wakes everyone.
        query(
            dsn,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'aura-pg projector watcher' "
            "AND datname = current_database()",
        )
        assert daemon.watcher is not None
        await wait_for(lambda: daemon.watcher is not None and daemon.watcher.reconnects >= 1)
        await wait_for(lambda: daemon.watcher is not None and daemon.watcher.connected)
        store.append("wake", [NewEvent("A", {})])
        await wait_for(lambda: caught_up(dsn, "tally_set"), timeout=3.0)
    assert_exact_fold(dsn, "tally_set")


async def test_the_watcher_wakes_runners_when_an_older_append_commits_late(
    dsn: str, store: EventStore
) -> None:
    """An append that commits after a younger one holds the read horizon
    back; when it commits, the horizon jumps past both and the watcher wakes
    the runner, within a few ticks rather than the 30 s poll."""
    async with running_daemon(dsn, ["tally_set"], poll_interval=30.0) as daemon:
        await wait_for(lambda: daemon.runners["tally_set"].owning)
        await wait_for(lambda: daemon.watcher is not None and daemon.watcher.horizon is not None)
        with psycopg.connect(dsn) as slow:
            slow.execute(
                "SELECT * FROM aura.append_events('late', %s::jsonb, 'any')",
                ['[{"type": "A", "data": {}}]'],
            )
            store.append("early", [NewEvent("A", {})])
            await asyncio.sleep(0.5)
            # The younger append is committed but not readable yet.
            assert query(dsn, "SELECT count(*) FROM tally_set.applied_events") == [(0,)]
            assert daemon.runners["tally_set"].checkpoint.global_position == 0
            slow.commit()
        await wait_for(lambda: caught_up(dsn, "tally_set"), timeout=3.0)
        watcher = daemon.watcher
        assert watcher is not None and watcher.moves >= 2
    assert_exact_fold(dsn, "tally_set")


async def test_listen_mode_wakes_on_notifications_from_writers_that_opt_in(dsn: str) -> None:
    notifying = EventStore.connect(make_conninfo(dsn, options="-c aura.notify=on"), max_size=1)
    try:
        async with running_daemon(dsn, ["tally_set"], wake="listen", poll_interval=30.0) as daemon:
            assert daemon.watcher is None
            await wait_for(lambda: daemon.listener is not None and daemon.listener.connected)
            await wait_for(lambda: daemon.runners["tally_set"].owning)
            notifying.append("wake", [NewEvent("A", {})])
            await wait_for(lambda: caught_up(dsn, "tally_set"), timeout=3.0)
            assert daemon.listener is not None and daemon.listener.notifications >= 1

            # Kill the listener's connection: it reconnects and wakes everyone.
            query(
                dsn,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'aura-pg projector listener' "
                "AND datname = current_database()",
            )
            await wait_for(lambda: daemon.listener is not None and daemon.listener.reconnects >= 1)
            await wait_for(lambda: daemon.listener is not None and daemon.listener.connected)
            notifying.append("wake", [NewEvent("A", {})])
            await wait_for(lambda: caught_up(dsn, "tally_set"), timeout=3.0)
    finally:
        notifying.close()
    assert_exact_fold(dsn, "tally_set")


def test_appends_notify_only_in_sessions_that_opt_in(dsn: str, store: EventStore) -> None:
    notifying = EventStore.connect(make_conninfo(dsn, options="-c aura.notify=on"), max_size=1)
    try:
        with psycopg.connect(dsn, autocommit=True) as listener:
            listener.execute("LISTEN aura_events")
            store.append("quiet", [NewEvent("A", {})])
            store.append("quiet", [NewEvent("A", {}), NewEvent("B", {})])
            assert list(listener.notifies(timeout=0.5)) == []
            notifying.append("loud", [NewEvent("A", {}), NewEvent("B", {})])
            received = list(listener.notifies(timeout=1.0, stop_after=2))
            assert [n.channel for n in received] == ["aura_events"]
    finally:
        notifying.close()


async def test_poll_only_mode_still_applies_everything(dsn: str, store: EventStore) -> None:
    async with running_daemon(dsn, ["tally_set"], wake="poll", poll_interval=0.2) as daemon:
        assert daemon.listener is None and daemon.watcher is None
        append_spread(store, 15)
        await wait_for(lambda: caught_up(dsn, "tally_set"))
    assert_exact_fold(dsn, "tally_set")


async def test_terminated_projector_connections_recover(dsn: str, store: EventStore) -> None:
    append_spread(store, 40)
    async with running_daemon(dsn, ["tally_set", "tally_each"], poll_interval=0.1):
        await wait_for(lambda: caught_up(dsn, "tally_set") and caught_up(dsn, "tally_each"))
        query(
            dsn,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name LIKE 'aura-pg projector%%' AND datname = current_database()",
        )
        append_spread(store, 40, prefix="after")
        await wait_for(lambda: caught_up(dsn, "tally_set") and caught_up(dsn, "tally_each"))
    assert_exact_fold(dsn, "tally_set")
    assert_exact_fold(dsn, "tally_each")


async def test_two_daemons_share_nothing_and_fail_over(dsn: str, store: EventStore) -> None:
    append_spread(store, 30)
    first = RunningDaemon(dsn, ["tally_set"], owner="first")
    second: RunningDaemon | None = None
    try:
        await wait_for(lambda: first.daemon.runners["tally_set"].owning)
        second = RunningDaemon(dsn, ["tally_set"], owner="second")
        await asyncio.sleep(0.5)
        assert not second.daemon.runners["tally_set"].owning
        assert status_of(dsn, "tally_set")["owner"] == "first"
        await wait_for(lambda: caught_up(dsn, "tally_set"))
        # The owner goes away: the stand-by takes over.
        await first.stop()
        await wait_for(lambda: second.daemon.runners["tally_set"].owning, what="takeover")
        append_spread(store, 30, prefix="second")
        await wait_for(lambda: caught_up(dsn, "tally_set"))
        assert status_of(dsn, "tally_set")["owner"] == "second"
    finally:
        await first.stop()
        if second is not None:
            await second.stop()
    assert_exact_fold(dsn, "tally_set")


async def test_handlers_publish_to_the_outbox_in_the_batch_transaction(
    dsn: str, store: EventStore
) -> None:
    """A projection's outgoing messages commit with its batch: a failed
    batch leaves none behind, and a replay (reset) publishes none twice."""
    emitting = [
        store.append(f"e-{n}", [NewEvent("A", {"emit": {"n": n}})]).events[0] for n in range(5)
    ]
    poison = store.append("e-poison", [NewEvent("A", {"emit": {"n": 99}, "poison": True})])
    async with running_daemon(dsn, ["tally_set"]):
        await wait_for(lambda: caught_up(dsn, "tally_set"))
        outbox = query(dsn, "SELECT message_id, payload FROM aura.outbox ORDER BY id")
        assert outbox == [(e.event_id, {"n": n}) for n, e in enumerate(emitting)]
        assert poison.events[0].event_id not in {row[0] for row in outbox}
        admin.reset(dsn, "tally_set")
        await wait_for(lambda: caught_up(dsn, "tally_set"))
    assert query(dsn, "SELECT count(*) FROM aura.outbox") == [(5,)]


async def test_statement_timeouts_and_limit_errors_are_handler_failures(
    dsn: str, store: EventStore
) -> None:
    """Failures psycopg files under OperationalError (a statement timeout,
    a program limit) are the handler's: isolated, retried, dead-lettered,
    not mistaken for a lost connection."""
    append_spread(store, 6)
    slow = store.append("slow-1", [NewEvent("A", {"sleep_ms": 2000})]).events[0]
    huge = store.append("huge-1", [NewEvent("A", {})]).events[0]
    append_spread(store, 6, prefix="after")
    # The model refuses the "huge" event's row as a program limit (54000).
    async with await connect(dsn, ProjectorSettings(), "test") as conn:
        await register_projections(conn, fixture_catalog().select(["tally_set"]))
    query(
        dsn,
        """
        CREATE FUNCTION tally_set.refuse_huge() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.stream_id = 'huge-1' THEN
                RAISE EXCEPTION 'index row too large' USING ERRCODE = 'program_limit_exceeded';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuse_huge BEFORE INSERT ON tally_set.applied_events
            FOR EACH ROW EXECUTE FUNCTION tally_set.refuse_huge();
        """,
    )
    async with running_daemon(dsn, ["tally_set"], statement_timeout_ms=500) as daemon:
        await wait_for(lambda: caught_up(dsn, "tally_set"), timeout=30)
        assert daemon.runners["tally_set"].reconnects == 0
    letters = {d["event_id"]: d for d in admin.dead_letters(dsn, "tally_set")}
    assert set(letters) == {slow.event_id, huge.event_id}
    errors = query(dsn, "SELECT event_id, error_sqlstate FROM aura.dead_letters")
    assert dict(errors) == {slow.event_id: "57014", huge.event_id: "54000"}
    assert_exact_fold(dsn, "tally_set", exclude=[slow.global_position, huge.global_position])


async def test_a_batch_size_changed_while_running_dead_letters_only_the_poison(
    dsn: str, store: EventStore
) -> None:
    spec = fixture_catalog().get("tally_set")
    async with await connect(dsn, ProjectorSettings(), "test") as conn:
        await register_projections(conn, [spec.model_copy(update={"batch_size": 1})])
    async with running_daemon(dsn, ["tally_set"]) as daemon:
        await wait_for(lambda: daemon.runners["tally_set"].owning)
        async with await connect(dsn, ProjectorSettings(), "test") as conn:
            await register_projections(conn, [spec.model_copy(update={"batch_size": 10})])
        events = store.append(
            "batch-1", [NewEvent("A", {"poison": True} if n == 3 else {}) for n in range(6)]
        ).events
        await wait_for(lambda: caught_up(dsn, "tally_set"))
    letters = admin.dead_letters(dsn, "tally_set")
    assert [d["event_id"] for d in letters] == [events[3].event_id]
    assert_exact_fold(dsn, "tally_set", exclude=[events[3].global_position])


async def test_replay_after_a_reset_ignores_the_old_models_dead_letters(
    dsn: str, store: EventStore
) -> None:
    poison = store.append("r-1", [NewEvent("A", {"poison": True}), NewEvent("A", {})])
    async with running_daemon(dsn, ["tally_set"]):
        await wait_for(lambda: caught_up(dsn, "tally_set"))
        (letter,) = admin.dead_letters(dsn, "tally_set")
        admin.skip_dead_letter(dsn, letter["id"])
        # The cause is fixed for good, then the model is replayed.
        query(dsn, "CREATE TABLE public.keep_cures (event_id uuid)")
        query(
            dsn,
            "CREATE OR REPLACE FUNCTION tally_set.check_event(e aura.events) RETURNS void "
            "LANGUAGE sql AS 'SELECT NULL::void'",
        )
        admin.reset(dsn, "tally_set")
        # reset re-ran the definition: cure the event in the new schema.
        query(dsn, "INSERT INTO tally_set.cures VALUES (%s)", (poison.events[0].event_id,))
        await wait_for(lambda: caught_up(dsn, "tally_set"))
    assert_exact_fold(dsn, "tally_set")
    assert admin.replay_stream(dsn, "tally_set", "r-1") == 2
    assert_exact_fold(dsn, "tally_set")


async def test_rebuild_never_takes_over_or_drops_a_foreign_schema(
    dsn: str, store: EventStore
) -> None:
    append_spread(store, 5)
    spec = fixture_catalog().get("tally_set")
    async with await connect(dsn, ProjectorSettings(), "test") as conn:
        await register_projections(conn, [spec])
    query(dsn, "CREATE SCHEMA reporting; CREATE TABLE reporting.invoices (id int)")
    moved = spec.model_copy(update={"schema_name": "reporting"})
    with pytest.raises(ProjectionError, match="reporting, which exists already"):
        await rebuild(dsn, moved)
    assert query(dsn, "SELECT count(*) FROM reporting.invoices") == [(0,)]
    with pytest.raises(psycopg.Error, match="not an aura-pg read model"):
        query(dsn, "SELECT aura.drop_read_model_schema('reporting')")
    # A view outside the read model's schema would be dropped with it: refused.
    query(dsn, "CREATE VIEW public.dashboard AS SELECT count(*) FROM tally_set.streams")
    with pytest.raises(
        ProjectionError, match=r"dependents outside it \(rule _RETURN on view dashboard\)"
    ):
        admin.reset(dsn, "tally_set")
    assert query(dsn, "SELECT count(*) > 0 FROM pg_views WHERE viewname = 'dashboard'") == [(True,)]


async def test_a_resumed_rebuild_uses_the_newest_definition(dsn: str, store: EventStore) -> None:
    append_spread(store, 5)
    spec = fixture_catalog().get("tally_set")
    async with await connect(dsn, ProjectorSettings(), "test") as conn:
        await register_projections(conn, [spec])
        v2 = spec.model_copy(
            update={"definition_sql": spec.definition_sql + "\nCREATE TABLE v2 ();"}
        )
        await register_projections(conn, [v2])
        await conn.execute("SELECT aura.begin_rebuild('tally_set')")  # started, then interrupted
    v3 = spec.model_copy(update={"definition_sql": spec.definition_sql + "\nCREATE TABLE v3 ();"})
    assert await rebuild(dsn, v3) is not None
    tables = {
        row[0]
        for row in query(dsn, "SELECT tablename FROM pg_tables WHERE schemaname = 'tally_set'")
    }
    assert "v3" in tables and "v2" not in tables
    assert status_of(dsn, "tally_set")["rebuild_needed"] is False
    assert_exact_fold(dsn, "tally_set")


async def test_two_rebuilds_at_once_swap_once_and_the_other_stops(
    dsn: str, store: EventStore
) -> None:
    append_spread(store, 200)
    spec = fixture_catalog().get("tally_set")
    async with await connect(dsn, ProjectorSettings(), "test") as conn:
        await register_projections(conn, [spec])
    outcomes = await asyncio.wait_for(
        asyncio.gather(
            rebuild(dsn, spec),
            rebuild(dsn, spec),
            return_exceptions=True,
        ),
        60,
    )
    results = [o for o in outcomes if isinstance(o, RebuildResult)]
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(results) == 1, outcomes
    assert len(errors) == 1 and isinstance(errors[0], ProjectionError), outcomes
    assert_exact_fold(dsn, "tally_set")


def test_adding_and_removing_outbox_routes_at_once_keeps_the_trigger(dsn: str) -> None:
    query(dsn, "SELECT aura.add_outbox_route('r1', 'nats', 'a')")
    with psycopg.connect(dsn) as remover, psycopg.connect(dsn) as adder:
        remover.execute("SELECT aura.remove_outbox_route('r1')")  # the last route, uncommitted
        added = threading.Thread(
            target=lambda: (
                adder.execute("SELECT aura.add_outbox_route('r2', 'nats', 'b')"),
                adder.commit(),
            )
        )
        added.start()
        time.sleep(0.3)
        remover.commit()
        added.join(10)
    assert query(dsn, "SELECT count(*) FROM pg_trigger WHERE tgname = 'events_capture_outbox'") == [
        (1,)
    ]


async def test_a_log_restored_from_another_cluster_is_refused(dsn: str, store: EventStore) -> None:
    store.append("x", [NewEvent("A", {})])
    query(
        dsn,
        "INSERT INTO aura.events (transaction_id, event_id, stream_id, version, type, data, "
        "idempotency_key, idempotency_hash) VALUES ('4000000000', gen_random_uuid(), 'restored', "
        "1, 'A', '{}', 'k', sha256('restored:k'))",
    )
    daemon = ProjectorDaemon(dsn, fixture_catalog().select(["tally_set"]), ProjectorSettings())
    with pytest.raises(ProjectionError, match="restored from another cluster"):
        await daemon.run(asyncio.Event())


async def test_async_commit_daemons_still_fold_exactly(dsn: str, store: EventStore) -> None:
    settings = ProjectorSettings(synchronous_commit=False, statement_timeout_ms=1234)
    async with await connect(dsn, settings, "test") as conn:
        cur = await conn.execute(
            "SELECT current_setting('synchronous_commit'), current_setting('statement_timeout'), "
            "current_setting('tcp_keepalives_idle')"
        )
        assert await cur.fetchone() == ("off", "1234ms", "10")
    append_spread(store, 30)
    async with running_daemon(dsn, ["tally_set"], synchronous_commit=False):
        await wait_for(lambda: caught_up(dsn, "tally_set"))
    assert_exact_fold(dsn, "tally_set")


async def test_warnings_from_a_definition_reach_the_daemon_log(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    spec = fixture_catalog().get("tally_set")
    loud = spec.model_copy(
        update={
            "definition_sql": spec.definition_sql
            + "\nDO $$ BEGIN RAISE WARNING 'storage fell back to plain tables'; END $$;\n"
        }
    )
    daemon = ProjectorDaemon(dsn, [loud], ProjectorSettings())
    with caplog.at_level("INFO", logger="aura_pg.projector"):
        assert await daemon.register() == {"tally_set": "created"}
    assert any(
        r.levelname == "WARNING" and "storage fell back to plain tables" in r.getMessage()
        for r in caplog.records
    )


async def test_handler_errors_with_connection_or_engine_codes_are_handler_failures(
    dsn: str, store: EventStore
) -> None:
    """A handler raising 08001 (say, from dblink) is not a lost connection,
    and one raising the engine's own AU006 is not a moved checkpoint: both
    are dead-lettered like any poison event."""
    append_spread(store, 4)
    connection_like = store.append("c-1", [NewEvent("A", {"sqlstate": "08001"})]).events[0]
    engine_like = store.append("c-2", [NewEvent("A", {"sqlstate": "AU006"})]).events[0]
    append_spread(store, 4, prefix="after")
    async with running_daemon(dsn, ["tally_set"]) as daemon:
        await wait_for(lambda: caught_up(dsn, "tally_set"), timeout=30)
        assert daemon.runners["tally_set"].reconnects == 0
    states = dict(query(dsn, "SELECT event_id, error_sqlstate FROM aura.dead_letters"))
    assert states == {connection_like.event_id: "08001", engine_like.event_id: "AU008"}
    assert_exact_fold(
        dsn, "tally_set", exclude=[connection_like.global_position, engine_like.global_position]
    )


async def test_lock_conflicts_are_retried_without_dead_lettering(
    dsn: str, store: EventStore
) -> None:
    async with await connect(dsn, ProjectorSettings(), "test") as conn:
        await register_projections(conn, fixture_catalog().select(["tally_set"]))
    append_spread(store, 5)
    with psycopg.connect(dsn) as blocker:
        blocker.execute("LOCK TABLE tally_set.applied_events IN SHARE MODE")
        async with running_daemon(dsn, ["tally_set"], lock_timeout_ms=100):
            # Far longer than max_retries (2) backoffs of at most 50 ms.
            await wait_for(
                lambda: status_of(dsn, "tally_set")["consecutive_failures"] >= 4, timeout=30
            )
            blocker.rollback()
            await wait_for(lambda: caught_up(dsn, "tally_set"), timeout=30)
    assert admin.dead_letters(dsn, "tally_set") == []
    assert_exact_fold(dsn, "tally_set")


async def test_hypertable_read_models_reset_rebuild_twice_and_abort(
    dsn: str, store: EventStore
) -> None:
    """TimescaleDB keeps chunks (and copies of their foreign keys) in its
    own schemas: not outside dependents that block a drop."""
    spec = fixture_catalog().get("tally_set")
    hyper = spec.model_copy(
        update={
            "definition_sql": spec.definition_sql
            + """
            CREATE EXTENSION IF NOT EXISTS timescaledb SCHEMA public;
            CREATE TABLE activity (
                time timestamptz NOT NULL,
                stream_id text NOT NULL REFERENCES streams (stream_id) DEFERRABLE INITIALLY DEFERRED
            );
            SELECT public.create_hypertable('activity', 'time',
                                            chunk_time_interval => interval '1 day');
            CREATE FUNCTION apply_hyper(batch aura.events[]) RETURNS void LANGUAGE plpgsql AS $$
            BEGIN
                PERFORM apply_batch(batch);
                INSERT INTO activity SELECT e.recorded_at, e.stream_id FROM unnest(batch) AS e;
            END $$;
            """,
            "handler": "apply_hyper",
        }
    )
    append_spread(store, 20)
    async with await connect(dsn, ProjectorSettings(), "test") as conn:
        await register_projections(conn, [hyper])
    async with running_daemon(dsn, ["tally_set"]):
        await wait_for(lambda: caught_up(dsn, "tally_set"))
    # The daemon above ran the catalog's definition name with the hypertable one
    # registered: the row's definition is what runs.
    assert query(dsn, "SELECT count(*) FROM tally_set.activity") == [(20,)]
    assert admin.reset(dsn, "tally_set") == "reset"
    for _ in range(2):
        assert await rebuild(dsn, hyper) is not None
    assert query(dsn, "SELECT count(*) FROM tally_set.activity") == [(20,)]
    assert_exact_fold(dsn, "tally_set")
    query(dsn, "SELECT aura.begin_rebuild('tally_set')")
    assert abort_rebuild(dsn, "tally_set") == "aborted"


async def test_refused_swaps_and_outside_dependents(dsn: str, store: EventStore) -> None:
    append_spread(store, 5)
    spec = fixture_catalog().get("tally_set")
    assert await rebuild(dsn, spec) is not None
    # A view outside on the kept previous model: the next swap is refused,
    # and the rebuild command stops instead of retrying for ever.
    query(dsn, "CREATE VIEW public.watch_previous AS SELECT * FROM tally_set__previous.streams")
    with pytest.raises(ProjectionError, match="view watch_previous"):
        await asyncio.wait_for(rebuild(dsn, spec), 30)
    query(dsn, "DROP VIEW public.watch_previous")
    abort_rebuild(dsn, "tally_set")
    # A column of an outside table typed with the model's row type.
    query(dsn, "CREATE TABLE public.keeper (s tally_set.streams)")
    with pytest.raises(ProjectionError, match="keeper"):
        admin.reset(dsn, "tally_set")
    assert query(
        dsn, "SELECT count(*) FROM information_schema.columns WHERE table_name = 'keeper'"
    ) == [(1,)]


async def test_an_extension_inside_a_read_model_schema_is_refused(dsn: str) -> None:
    spec = fixture_catalog().get("tally_set")
    bad = spec.model_copy(
        update={
            "definition_sql": spec.definition_sql + "\nCREATE EXTENSION IF NOT EXISTS hstore;\n"
        }
    )
    async with await connect(dsn, ProjectorSettings(), "test") as conn:
        with pytest.raises(CatalogError, match="created an extension inside"):
            await register_projections(conn, [bad])


def test_outbox_routes_change_only_in_read_committed(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        with pytest.raises(psycopg.Error, match="READ COMMITTED"):
            conn.execute("SELECT aura.add_outbox_route('r', 'nats', 't')")


def test_a_batch_read_before_a_swap_is_refused_even_at_an_equal_checkpoint(
    dsn: str, store: EventStore
) -> None:
    """The daemon reads a batch, waits for the row lock that a rebuild swap
    holds, and finds the checkpoint equal after the swap (both models were
    at the same horizon). Its transaction began before the swap, so it must
    not apply the batch: it gets AU006 and retries in a fresh one."""
    append_spread(store, 5)
    spec = fixture_catalog().get("tally_set")
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(*_register_sql(spec))
        live = admin.execute(
            "SELECT * FROM aura.project_batch('tally_set', '0', 0, 'd')"
        ).fetchone()
        assert live is not None and live[3] is True  # caught up
        shadow_name = admin.execute("SELECT aura.begin_rebuild('tally_set')").fetchone()
        assert shadow_name == ("tally_set__rebuild",)
        shadow = admin.execute(
            "SELECT * FROM aura.project_batch('tally_set__rebuild', '0', 0, 'r')"
        ).fetchone()
        assert shadow is not None and (shadow[1], shadow[2]) == (live[1], live[2])
    with psycopg.connect(dsn) as writer, psycopg.connect(dsn) as swapper:
        # A writer whose transaction began first commits only after the
        # swap's catch-up has run: the swap cannot see its event, the
        # daemon's later read can.
        writer.execute(
            'SELECT * FROM aura.append_events(\'late\', \'[{"type": "A", "data": {}}]\')'
        )
        swapper.execute("SELECT aura.finish_rebuild('tally_set', 'r')")
        writer.commit()
        outcome: list[object] = []

        def daemon_batch() -> None:
            with psycopg.connect(dsn, autocommit=True) as daemon:
                try:
                    outcome.append(
                        daemon.execute(
                            "SELECT * FROM aura.project_batch('tally_set', %s::xid8, %s, 'd')",
                            (live[1], live[2]),
                        ).fetchone()
                    )
                except psycopg.Error as exc:
                    outcome.append(exc.sqlstate)

        thread = threading.Thread(target=daemon_batch)
        thread.start()
        time.sleep(0.5)  # it has read the batch and waits for the row lock
        assert outcome == []
        swapper.commit()
        thread.join(10)
    assert outcome == ["AU006"]
    with psycopg.connect(dsn, autocommit=True) as daemon:
        row = daemon.execute(
            "SELECT * FROM aura.project_batch('tally_set', %s::xid8, %s, 'd')", (live[1], live[2])
        ).fetchone()
        assert row is not None and row[0] == 1
    assert_exact_fold(dsn, "tally_set")
    previous = query(dsn, "SELECT count(*) FROM tally_set__previous.applied_events")
    assert previous == [(5,)]


def _register_sql(spec: Any) -> tuple[str, dict[str, Any]]:
    from aura_pg.projection.connection import queries
    from aura_pg.projection.registration import spec_params

    return queries()["register"], spec_params(spec)
