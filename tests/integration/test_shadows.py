"""Shadow projections (migration 0007, aura_pg.projection.shadows): a new version runs
beside the live one, is compared with it at one checkpoint and swapped in
atomically; a second swap rolls back."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from aura_pg import EventStore, NewEvent
from aura_pg.errors import UnknownProjection
from aura_pg.observability import metrics
from aura_pg.projection import shadows
from aura_pg.projection.catalog import ProjectionSpec, load_catalog
from aura_pg.projection.registration import register_projections
from tests.helpers.projections import (
    assert_exact_fold,
    caught_up,
    fixture_catalog,
    query,
    running_daemon,
    stream_counts,
    wait_for,
)

# The tally counts every event; this version counts only those not of type B.
V1_COUNT = (
    "SELECT e.stream_id, count(*), max(e.version) FROM unnest(batch) AS e GROUP BY e.stream_id"
)
V2_COUNT = (
    "SELECT e.stream_id, count(*) FILTER (WHERE e.type <> 'B'), max(e.version)"
    " FROM unnest(batch) AS e GROUP BY e.stream_id"
)


def tally_set() -> ProjectionSpec:
    return fixture_catalog().get("tally_set")


def tally_v2() -> ProjectionSpec:
    spec = tally_set()
    assert V1_COUNT in spec.definition_sql
    return spec.model_copy(
        update={"definition_sql": spec.definition_sql.replace(V1_COUNT, V2_COUNT)}
    )


async def register(dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await register_projections(conn, [tally_set()])


def counts_without_b(dsn: str) -> dict[str, tuple[int, int]]:
    """What tally v2's streams table holds, computed from the log."""
    rows = query(
        dsn,
        "SELECT stream_id, count(*) FILTER (WHERE type <> 'B'), max(version)"
        " FROM aura.events GROUP BY stream_id",
    )
    return {row[0]: (row[1], row[2]) for row in rows}


def checkpoints(dsn: str) -> dict[str, str]:
    rows = query(
        dsn,
        "SELECT name, transaction_id::text || '/' || global_position"
        " FROM aura.projection_checkpoints",
    )
    return dict(rows)


@pytest.fixture
def writer(dsn: str) -> Iterator[threading.Event]:
    """Appends A and B events to a few streams until the test ends."""
    stop = threading.Event()

    def write() -> None:
        with EventStore.connect(dsn, max_size=1) as store:
            n = 0
            while not stop.is_set():
                store.append(f"w-{n % 5}", [NewEvent("A" if n % 3 else "B", {"n": n})])
                n += 1

    thread = threading.Thread(target=write)
    thread.start()
    yield stop
    stop.set()
    thread.join(30)


async def test_an_identical_shadow_diffs_identical_while_events_arrive(
    dsn: str, writer: threading.Event
) -> None:
    await register(dsn)
    assert shadows.begin(dsn, "tally_set", tally_set()) == "created"
    assert shadows.begin(dsn, "tally_set", tally_set()) == "unchanged"
    owner = query(
        dsn,
        "SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'tally_set__shadow'",
    )
    assert owner == [("aura_projector/tally_set__shadow",)]  # the shadow's own role
    seen: set[str] = set()
    async with running_daemon(dsn, ["tally_set"]) as daemon:
        # Daemons run the shadows of their projections that they find at start.
        await wait_for(lambda: "tally_set__shadow" in daemon.runners)
        for _ in range(5):
            await asyncio.sleep(0.3)
            result = await asyncio.to_thread(shadows.diff, dsn, "tally_set")
            assert result.identical, result.as_dict()
            assert {t.table for t in result.tables} == {
                "applied_events", "cures", "streams", "switches"
            }  # fmt: skip
            assert result.tables[0].live_rows == result.tables[0].shadow_rows > 0
            assert result.checkpoint is not None
            seen.add(result.checkpoint)
        writer.set()
        await wait_for(lambda: caught_up(dsn, "tally_set") and caught_up(dsn, "tally_set__shadow"))
    assert len(seen) == 5  # five checkpoints, each compared exactly
    assert_exact_fold(dsn, "tally_set")
    assert_exact_fold(dsn, "tally_set__shadow")
    recorded = query(dsn, "SELECT differing_rows, tables FROM aura.shadow_diffs")
    assert recorded == [(0, 4)]


async def test_diff_names_the_rows_and_columns_that_differ(dsn: str, store: EventStore) -> None:
    await register(dsn)
    for n in range(12):
        store.append(f"s-{n % 4}", [NewEvent("B" if n % 4 == 0 else "A", {"n": n})])
    shadows.begin(dsn, "tally_set", tally_v2())
    async with running_daemon(dsn, ["tally_set"]):
        await wait_for(lambda: caught_up(dsn, "tally_set__shadow"))
    result = shadows.diff(dsn, "tally_set", limit=10)
    streams = next(t for t in result.tables if t.table == "streams")
    assert (streams.only_live, streams.only_shadow, streams.differs) == (0, 0, 1)
    (difference,) = [d for d in result.differences if d.table == "streams"]
    assert difference.difference == "differs"
    assert difference.key == {"stream_id": "s-0"}
    assert difference.columns == ["events"]
    assert (difference.live["events"], difference.shadow["events"]) == (3, 0)
    assert not result.identical and result.differing_rows == 1
    # The same report from psql, in one transaction.
    with psycopg.connect(dsn) as conn, conn.transaction():
        rows = conn.execute(
            "SELECT table_name, difference, total, key, columns"
            " FROM aura.diff_shadow('tally_set', 0) WHERE total > 0"
        ).fetchall()
    assert rows == [("streams", "table", 1, {"checkpoint": result.checkpoint}, None)]


async def test_diff_brings_the_one_behind_to_the_other_checkpoint(
    dsn: str, store: EventStore
) -> None:
    await register(dsn)
    shadows.begin(dsn, "tally_set", tally_set())
    for n in range(30):
        store.append(f"s-{n % 3}", [NewEvent("A", {"n": n})])
    # Neither has run: the shadow (created later) and the live are at 0.
    result = shadows.diff(dsn, "tally_set")
    assert result.identical and result.checkpoint == "0/0"
    # The live one catches up; the diff applies the shadow's 30 events first.
    async with running_daemon(dsn, ["tally_set"]):
        await wait_for(lambda: caught_up(dsn, "tally_set") and caught_up(dsn, "tally_set__shadow"))
    query(dsn, "SELECT aura.reset_projection('tally_set__shadow')")
    before = checkpoints(dsn)
    assert before["tally_set__shadow"] == "0/0" != before["tally_set"]
    result = shadows.diff(dsn, "tally_set")
    assert result.identical
    assert result.checkpoint == before["tally_set"] == checkpoints(dsn)["tally_set__shadow"]
    assert stream_counts(dsn, "tally_set__shadow") == stream_counts(dsn, "tally_set")


async def test_promote_swaps_atomically_and_promoting_again_rolls_back(
    dsn: str, writer: threading.Event
) -> None:
    await register(dsn)
    shadows.begin(dsn, "tally_set", tally_v2())
    begun = [g for (g,) in query(dsn, "SELECT generation FROM aura.projection_checkpoints")]
    async with running_daemon(dsn, ["tally_set"]):
        await asyncio.sleep(0.5)
        assert await asyncio.to_thread(shadows.promote, dsn, "tally_set") == "promoted"
        await asyncio.sleep(0.5)
        writer.set()
        await wait_for(lambda: caught_up(dsn, "tally_set") and caught_up(dsn, "tally_set__shadow"))
        # Readers of tally_set now see v2; the old version runs as the shadow.
        assert stream_counts(dsn, "tally_set") == counts_without_b(dsn)
        assert_exact_fold(dsn, "tally_set__shadow")
        definitions = dict(
            query(dsn, "SELECT name, definition_sql LIKE %s FROM aura.projection_checkpoints",
                  (f"%{V2_COUNT}%",))
        )  # fmt: skip
        assert definitions == {"tally_set": True, "tally_set__shadow": False}
        assert shadows.promote(dsn, "tally_set") == "promoted"
        await wait_for(lambda: caught_up(dsn, "tally_set") and caught_up(dsn, "tally_set__shadow"))
    assert_exact_fold(dsn, "tally_set")
    assert stream_counts(dsn, "tally_set__shadow") == counts_without_b(dsn)
    # Each swap gave both rows generations never used before (issue 24).
    swapped = [g for (g,) in query(dsn, "SELECT generation FROM aura.projection_checkpoints")]
    assert len(set(swapped)) == 2 and min(swapped) > max(begun)


async def test_a_dropped_shadow_stops_only_its_runner(dsn: str, store: EventStore) -> None:
    await register(dsn)
    shadows.begin(dsn, "tally_set", tally_v2())
    async with running_daemon(dsn, ["tally_set"]):
        store.append("s-1", [NewEvent("A", {})])
        await wait_for(lambda: caught_up(dsn, "tally_set__shadow"))
        assert shadows.drop(dsn, "tally_set") == "dropped"
        store.append("s-1", [NewEvent("A", {})])
        await wait_for(lambda: caught_up(dsn, "tally_set"))
    assert_exact_fold(dsn, "tally_set")
    assert query(dsn, "SELECT count(*) FROM pg_namespace WHERE nspname = 'tally_set__shadow'") == [
        (0,)
    ]
    with pytest.raises(UnknownProjection):
        shadows.diff(dsn, "tally_set")


async def test_shadow_lag_and_differing_rows_are_exported(dsn: str, store: EventStore) -> None:
    await register(dsn)
    store.append("s-1", [NewEvent("B", {})])
    shadows.begin(dsn, "tally_set", tally_v2())
    with psycopg.connect(dsn, autocommit=True) as conn:
        before = metrics.read_snapshot(conn).shadows
    assert [(name, differing) for name, _lag, differing in before] == [("tally_set", None)]
    assert before[0][1] > 0  # the shadow has not applied the event yet
    query(dsn, "SELECT applied FROM aura.project_batch('tally_set', '0', 0)")
    shadows.diff(dsn, "tally_set")  # which brings the shadow to the live checkpoint
    with psycopg.connect(dsn, autocommit=True) as conn:
        after = metrics.read_snapshot(conn).shadows
    assert after == (("tally_set", 0.0, 1),)


async def test_a_running_daemon_finds_new_shadows_and_runs_them(
    dsn: str, store: EventStore
) -> None:
    await register(dsn)
    store.append("s-1", [NewEvent("A", {}), NewEvent("B", {})])
    async with running_daemon(dsn, ["tally_set"], shadow_discovery_interval=0.1) as daemon:
        await wait_for(lambda: caught_up(dsn, "tally_set"))
        shadows.begin(dsn, "tally_set", tally_v2())
        await wait_for(lambda: caught_up(dsn, "tally_set__shadow"))
        assert stream_counts(dsn, "tally_set__shadow") == counts_without_b(dsn)
        shadows.drop(dsn, "tally_set")
        await wait_for(lambda: "tally_set__shadow" not in daemon.runners)
        shadows.begin(dsn, "tally_set", tally_set())  # back, with another definition
        store.append("s-2", [NewEvent("B", {})])
        await wait_for(lambda: caught_up(dsn, "tally_set__shadow") and caught_up(dsn, "tally_set"))
    assert_exact_fold(dsn, "tally_set__shadow")
    assert_exact_fold(dsn, "tally_set")


async def test_a_catalog_entry_marked_shadow_of_runs_as_the_shadow(
    dsn: str, store: EventStore, tmp_path: Path
) -> None:
    """`shadow_of: tally_set` in the catalog: the daemon of tally_set
    registers the entry as tally_set__shadow and runs it beside it."""
    (tmp_path / "tally.sql").write_text(tally_set().definition_sql)
    (tmp_path / "tally_v2.sql").write_text(tally_v2().definition_sql)
    (tmp_path / "catalog.yaml").write_text(
        "projections:\n"
        "  - {name: tally_set, sql: tally.sql, handler: apply_batch, source_events: all}\n"
        "  - {name: tally_set_v2, sql: tally_v2.sql, handler: apply_batch, shadow_of: tally_set}\n"
    )
    catalog = load_catalog(tmp_path / "catalog.yaml")
    store.append("s-1", [NewEvent("A", {}), NewEvent("B", {})])
    async with running_daemon(dsn, ["tally_set"], catalog=catalog) as daemon:
        await wait_for(lambda: caught_up(dsn, "tally_set") and caught_up(dsn, "tally_set__shadow"))
        assert set(daemon.registered) == {"tally_set", "tally_set__shadow"}
    assert stream_counts(dsn, "tally_set__shadow") == counts_without_b(dsn)
    assert_exact_fold(dsn, "tally_set")
    assert shadows.diff(dsn, "tally_set").differing_rows == 1
