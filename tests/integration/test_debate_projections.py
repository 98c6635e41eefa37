"""The debate read models (projections/debate_state.sql and
projections/agent_performance.sql from the shipped catalog) against a real
Postgres: each equals a plain Python fold of the log, every event is applied
once, the windowed views give hand-computed numbers, and the plain-Postgres
path (no TimescaleDB) gives the same results as the hypertables."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

from aura_pg import EventStore, NewEvent
from aura_pg.domain.events import (
    AgentJoined,
    DebateArgumentAdded,
    DebateConsensusReached,
    DebateFailed,
    DebateRoundCompleted,
    DebateStarted,
    DebateTimedOut,
    DebateVoteCast,
    DecisionApproved,
    DecisionProposed,
    DecisionRejected,
    EventPayload,
    encode,
)
from aura_pg.errors import ProjectionError
from aura_pg.projection import admin
from aura_pg.projection.catalog import load_catalog
from aura_pg.projection.connection import connect
from aura_pg.projection.rebuild import rebuild
from aura_pg.projection.registration import register_projections
from aura_pg.projection.settings import ProjectorSettings
from tests.helpers.debate_projections import (
    fold_activity,
    fold_debates,
    fold_endings,
    log_events,
    model_activity,
    model_endings,
    rows,
    set_recorded_at,
    shipped_daemon,
)
from tests.helpers.projections import caught_up, status_of, wait_for

NAMES = ["debate_state", "agent_performance"]
SPECS = {spec.name: spec for spec in load_catalog().select(NAMES)}


def debate(store: EventStore, debate_id: str, *payloads: EventPayload) -> list[int]:
    result = store.append(f"debate-{debate_id}", [encode(p) for p in payloads])
    return [e.global_position for e in result.events]


def decision(store: EventStore, decision_id: str, *payloads: EventPayload) -> list[int]:
    result = store.append(f"decision-{decision_id}", [encode(p) for p in payloads])
    return [e.global_position for e in result.events]


def started(debate_id: str, *participants: str, topic: str = "Ship it?") -> DebateStarted:
    return DebateStarted(
        debate_id=debate_id, topic=topic, participants=participants, started_by=participants[0]
    )


def argument(agent: str, round_: int, stance: str = "for") -> DebateArgumentAdded:
    return DebateArgumentAdded(
        agent_id=agent,
        round=round_,
        stance=stance,  # type: ignore[arg-type]
        text=f"{agent} argues {stance}",
        confidence=0.7,
    )


def vote(agent: str, choice: str) -> DebateVoteCast:
    return DebateVoteCast(agent_id=agent, vote=choice, confidence=0.9)  # type: ignore[arg-type]


def append_v1_started(store: EventStore, debate_id: str, *agents: str) -> list[int]:
    """DEBATE_STARTED as version 1 wrote it: `agents`, no rules."""
    event = NewEvent(
        "DEBATE_STARTED",
        {"debate_id": debate_id, "topic": f"Legacy {debate_id}", "agents": list(agents)},
        {"schema_version": 1},
    )
    return [e.global_position for e in store.append(f"debate-{debate_id}", [event]).events]


def append_first_phase(store: EventStore) -> None:
    debate(
        store,
        "alpha",
        started("alpha", "a1", "a2", "a3"),
        AgentJoined(agent_id="a4"),
        argument("a1", 1),
        argument("a2", 1, "against"),
        argument("a3", 1),
        DebateRoundCompleted(round=1, arguments=3),
    )
    append_v1_started(store, "beta", "b1", "b2", "b3")
    debate(store, "beta", argument("b1", 1, "against"), argument("b2", 1, "against"))
    debate(store, "gamma", started("gamma", "g1", "g2", "g3", "a1"), argument("g1", 1))


def append_second_phase(store: EventStore) -> None:
    debate(
        store,
        "alpha",
        argument("a4", 2),
        DebateRoundCompleted(round=2, arguments=1),
        vote("a1", "approve"),
        vote("a2", "reject"),
        vote("a3", "approve"),
        vote("a4", "approve"),
        DebateConsensusReached(
            outcome="approve", votes_for=3, votes_against=1, decision_id="k-alpha"
        ),
    )
    decision(
        store,
        "k-alpha",
        DecisionProposed(decision_id="k-alpha", debate_id="alpha", proposed_by="a1", title="Ship"),
    )
    debate(store, "beta", vote("b1", "reject"), vote("b2", "reject"), vote("b3", "reject"))
    debate(store, "beta", DebateConsensusReached(outcome="reject", votes_for=0, votes_against=3))
    decision(
        store,
        "k-beta",
        DecisionProposed(decision_id="k-beta", debate_id="beta", proposed_by="b1", title="Drop"),
        DecisionRejected(decision_id="k-beta", rejected_by="b2", reason="consensus was reject"),
    )
    decision(store, "k-alpha", DecisionApproved(decision_id="k-alpha", approved_by="a2"))
    debate(
        store,
        "gamma",
        vote("g1", "approve"),
        vote("g2", "reject"),
        vote("g3", "reject"),
        vote("a1", "approve"),
        DebateFailed(reason="no quorum", votes_for=2, votes_against=2),
    )
    debate(
        store,
        "delta",
        started("delta", "d1", "d2", "d3"),
        argument("d1", 1),
        DebateRoundCompleted(round=1, arguments=1),
        argument("d2", 2),
        DebateTimedOut(rounds_completed=1),
    )
    debate(store, "epsilon", started("epsilon", "e1", "e2", "e3"), argument("e1", 1))
    debate(store, "epsilon", vote("e2", "approve"))


def debates_model(dsn: str) -> dict[str, dict[str, Any]]:
    return {row["debate_id"]: row for row in rows(dsn, "SELECT * FROM debate_state.debates")}


def source_events(dsn: str, name: str) -> list[dict[str, Any]]:
    return log_events(dsn, SPECS[name].source_events)


def assert_models_equal_the_fold(dsn: str) -> None:
    assert debates_model(dsn) == fold_debates(source_events(dsn, "debate_state"))
    events = source_events(dsn, "agent_performance")
    assert model_activity(dsn) == fold_activity(events)
    assert model_endings(dsn) == fold_endings(events)
    for name in NAMES:  # exactly once
        assert status_of(dsn, name)["events_applied"] == len(source_events(dsn, name))
        assert status_of(dsn, name)["dead_letters"] == 0
    counts = rows(
        dsn,
        "SELECT (SELECT count(*) - count(DISTINCT global_position) "
        "        FROM agent_performance.agent_activity) AS activity_dups, "
        "       (SELECT count(*) - count(DISTINCT global_position) "
        "        FROM agent_performance.debate_endings) AS ending_dups",
    )[0]
    assert counts == {"activity_dups": 0, "ending_dups": 0}


@pytest.fixture(params=["timescaledb", "postgres"])
def backend(request: pytest.FixtureRequest, dsn: str) -> str:
    """Which storage agent_performance is built on. For plain Postgres the
    test database gets `aura.timescaledb = off`, which every new connection
    (the daemon's too) inherits."""
    if request.param == "postgres":
        dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("ALTER DATABASE {} SET aura.timescaledb = 'off'").format(
                    sql.Identifier(str(dbname))
                )
            )
    return str(request.param)


async def register(dsn: str) -> list[str]:
    """Install both projections; the warnings the definitions raised."""
    warnings: list[str] = []
    async with await connect(dsn, ProjectorSettings(), "test") as conn:
        conn.add_notice_handler(
            lambda d: warnings.append(d.message_primary or "") if d.severity == "WARNING" else None
        )
        created = await register_projections(conn, [SPECS[n] for n in NAMES])
    assert created == {"debate_state": "created", "agent_performance": "created"}
    return warnings


def assert_storage(dsn: str, backend: str, warnings: list[str]) -> None:
    (storage,) = rows(dsn, "SELECT backend, note FROM agent_performance.storage")
    assert storage["backend"] == backend
    hypertables = (
        rows(
            dsn,
            "SELECT table_name FROM _timescaledb_catalog.hypertable "
            "WHERE schema_name = 'agent_performance' ORDER BY 1",
        )
        if backend == "timescaledb"
        else []
    )
    kinds = {
        row["relname"]: row["relkind"]
        for row in rows(
            dsn,
            "SELECT relname, relkind::text FROM pg_class "
            "WHERE relnamespace = 'agent_performance'::regnamespace "
            "AND relname IN ('agent_activity', 'debate_endings')",
        )
    }
    if backend == "timescaledb":
        assert [h["table_name"] for h in hypertables] == ["agent_activity", "debate_endings"]
        assert kinds == {"agent_activity": "r", "debate_endings": "r"}
        assert warnings == []
    else:
        assert kinds == {"agent_activity": "p", "debate_endings": "p"}
        assert len(warnings) == 1
        assert "aura.timescaledb is off" in warnings[0]
        assert "plain Postgres" in warnings[0]


async def test_read_models_are_the_fold_of_the_log(
    dsn: str, store: EventStore, backend: str
) -> None:
    warnings = await register(dsn)
    assert_storage(dsn, backend, warnings)
    append_first_phase(store)
    async with shipped_daemon(dsn, NAMES):
        await wait_for(lambda: all(caught_up(dsn, n) for n in NAMES), what="first phase")
        append_second_phase(store)
        await wait_for(lambda: all(caught_up(dsn, n) for n in NAMES), what="second phase")
    assert_models_equal_the_fold(dsn)

    model = debates_model(dsn)
    assert {d: (m["status"], m["outcome"], m["decision_id"]) for d, m in model.items()} == {
        "alpha": ("consensus", "approve", "k-alpha"),
        # k-beta names beta, but beta's consensus named no decision: none,
        # as in the domain's fold.
        "beta": ("consensus", "reject", None),
        "gamma": ("failed", None, None),
        "delta": ("timed_out", None, None),
        "epsilon": ("open", None, None),
    }
    assert model["alpha"]["participants"] == ["a1", "a2", "a3", "a4"]
    assert model["alpha"]["current_round"] == 2 and model["alpha"]["argument_count"] == 4
    assert (model["alpha"]["votes_for"], model["alpha"]["votes_against"]) == (3, 1)
    # The v1 DEBATE_STARTED: agents read as participants, rules defaulted.
    assert model["beta"]["participants"] == ["b1", "b2", "b3"]
    assert (model["beta"]["started_by"], model["beta"]["max_rounds"]) == ("b1", 3)
    assert model["beta"]["topic"] == "Legacy beta"
    assert model["gamma"]["failure_reason"] == "no quorum"
    assert model["epsilon"]["current_round"] == 1 and model["epsilon"]["ended_at"] is None
    active = rows(dsn, "SELECT debate_id, votes_for FROM debate_state.active_debates")
    assert active == [{"debate_id": "epsilon", "votes_for": 1}]
    assert rows(dsn, "SELECT * FROM agent_performance.active_debate_count") == [
        {"active_debates": 1}
    ]

    # Targeted repair: the forget handlers let a stream be replayed exactly.
    rows(dsn, "DELETE FROM debate_state.debate_fold WHERE debate_id = 'alpha'")
    assert admin.replay_stream(dsn, "debate_state", "debate-alpha") == 13
    assert admin.replay_stream(dsn, "agent_performance", "decision-k-beta") == 2
    assert admin.replay_stream(dsn, "agent_performance", "debate-gamma") == 6
    assert_models_equal_the_fold(dsn)
    # From a later version the forget handler cannot run, and replayed
    # events would be counted twice: refused for both projections.
    for name in ("agent_performance", "debate_state"):
        with pytest.raises(ProjectionError, match="replay debate-gamma from version 1"):
            admin.replay_stream(dsn, name, "debate-gamma", 2)
    assert_models_equal_the_fold(dsn)


async def test_windowed_views_hand_computed(dsn: str, store: EventStore, backend: str) -> None:
    """Events at fixed instants around two 5-minute buckets B0 and B1 in the
    last hour, and one debate two hours before."""
    warnings = await register(dsn)
    assert_storage(dsn, backend, warnings)
    (now,) = rows(dsn, "SELECT now() AS now")
    b0: datetime = now["now"] - timedelta(minutes=40)
    b0 = b0.replace(minute=b0.minute - b0.minute % 5, second=0, microsecond=0)
    b1, old = b0 + timedelta(minutes=5), b0 - timedelta(hours=2)
    times: dict[int, datetime] = {}

    def at(when: datetime, positions: list[int]) -> None:
        for n, position in enumerate(positions):  # one second apart
            times[position] = when + timedelta(seconds=n)

    # Two hours ago: d0 reaches consensus, a1's decision k0 approved in 1 s.
    at(old, debate(store, "d0", started("d0", "a1", "a2", "a3")))
    at(old + timedelta(seconds=10), debate(store, "d0", vote("a1", "approve")))
    at(old + timedelta(seconds=11), debate(store, "d0", vote("a2", "approve")))
    at(old + timedelta(seconds=12), debate(store, "d0", vote("a3", "approve")))
    consensus = DebateConsensusReached(outcome="approve", votes_for=3, votes_against=0)
    at(old + timedelta(seconds=30), debate(store, "d0", consensus))
    proposal_k0 = DecisionProposed(decision_id="k0", debate_id="d0", proposed_by="a1", title="t")
    approval_k0 = DecisionApproved(decision_id="k0", approved_by="a2")
    at(old + timedelta(seconds=40), decision(store, "k0", proposal_k0, approval_k0))
    # B0: d1 consensus (approve); a1's k1 approved after 2.5 s.
    at(b0, debate(store, "d1", started("d1", "a1", "a2", "a3")))
    at(b0 + timedelta(seconds=1), debate(store, "d2", started("d2", "a1", "a2", "a3")))
    at(b0 + timedelta(seconds=2), debate(store, "d3", started("d3", "a1", "a2", "a3")))
    at(b0 + timedelta(seconds=60), debate(store, "d1", vote("a1", "approve")))
    at(b0 + timedelta(seconds=70), debate(store, "d1", vote("a2", "approve")))
    at(b0 + timedelta(seconds=80), debate(store, "d1", vote("a3", "reject")))
    consensus = DebateConsensusReached(outcome="approve", votes_for=2, votes_against=1)
    at(b0 + timedelta(seconds=90), debate(store, "d1", consensus))
    proposal_k1 = DecisionProposed(decision_id="k1", debate_id="d1", proposed_by="a1", title="t")
    at(b0 + timedelta(seconds=100), decision(store, "k1", proposal_k1))
    times[decision(store, "k1", DecisionApproved(decision_id="k1", approved_by="a3"))[0]] = (
        b0 + timedelta(seconds=102.5)
    )
    # B1: d2 fails, d3 times out, d4 stays open; a1's k2 rejected after 4 s,
    # a2's k3 approved after 1 s.
    proposal_k2 = DecisionProposed(decision_id="k2", debate_id="d1", proposed_by="a1", title="t")
    at(b1, decision(store, "k2", proposal_k2))
    rejection_k2 = DecisionRejected(decision_id="k2", rejected_by="a2", reason="no")
    at(b1 + timedelta(seconds=4), decision(store, "k2", rejection_k2))
    at(b1 + timedelta(seconds=10), debate(store, "d2", vote("a1", "reject")))
    at(b1 + timedelta(seconds=20), debate(store, "d2", vote("a2", "reject")))
    at(b1 + timedelta(seconds=30), debate(store, "d2", vote("a3", "approve")))
    at(b1 + timedelta(seconds=40), debate(store, "d2", DebateFailed(reason="split")))
    proposal_k3 = DecisionProposed(decision_id="k3", debate_id="d2", proposed_by="a2", title="t")
    approval_k3 = DecisionApproved(decision_id="k3", approved_by="a1")
    at(b1 + timedelta(seconds=50), decision(store, "k3", proposal_k3, approval_k3))
    at(b1 + timedelta(seconds=60), debate(store, "d3", DebateTimedOut(rounds_completed=0)))
    at(b1 + timedelta(seconds=120), debate(store, "d4", started("d4", "a1", "a2", "a3")))
    set_recorded_at(dsn, times)

    async with shipped_daemon(dsn, NAMES):
        await wait_for(lambda: all(caught_up(dsn, n) for n in NAMES))
    assert_models_equal_the_fold(dsn)

    stats = {
        (r["bucket"], r["agent_id"]): (
            r["decisions"],
            r["approvals"],
            r["rejections"],
            None if r["approval_rate"] is None else float(r["approval_rate"]),
            r["avg_latency_ms"],
            r["p95_latency_ms"],
            r["votes"],
            r["approve_votes"],
            r["reject_votes"],
        )
        for r in rows(dsn, "SELECT * FROM agent_performance.agent_stats_5m")
    }
    assert stats == {
        (old, "a1"): (1, 1, 0, 1.0, 1000.0, 1000.0, 1, 1, 0),
        (old, "a2"): (0, 0, 0, None, None, None, 1, 1, 0),
        (old, "a3"): (0, 0, 0, None, None, None, 1, 1, 0),
        (b0, "a1"): (1, 1, 0, 1.0, 2500.0, 2500.0, 1, 1, 0),
        (b0, "a2"): (0, 0, 0, None, None, None, 1, 1, 0),
        (b0, "a3"): (0, 0, 0, None, None, None, 1, 0, 1),
        (b1, "a1"): (1, 0, 1, 0.0, 4000.0, 4000.0, 1, 0, 1),
        (b1, "a2"): (1, 1, 0, 1.0, 1000.0, 1000.0, 1, 0, 1),
        (b1, "a3"): (0, 0, 0, None, None, None, 1, 1, 0),
    }
    hour = {
        r["agent_id"]: (
            r["decisions"],
            r["approvals"],
            None if r["approval_rate"] is None else float(r["approval_rate"]),
            r["avg_latency_ms"],
            r["p95_latency_ms"],
            r["votes"],
        )
        for r in rows(dsn, "SELECT * FROM agent_performance.agent_stats_last_hour")
    }
    # a1: latencies 2500 and 4000; p95 (continuous) = 2500 + 0.95 * 1500.
    assert hour == {
        "a1": (2, 1, 0.5, 3250.0, pytest.approx(3925.0), 2),
        "a2": (1, 1, 1.0, 1000.0, 1000.0, 2),
        "a3": (0, 0, None, None, None, 2),
    }
    consensus_5m = {
        r["bucket"]: (
            r["debates_ended"],
            r["consensus"],
            r["failed"],
            r["timed_out"],
            float(r["consensus_rate"]),
        )
        for r in rows(dsn, "SELECT * FROM agent_performance.consensus_rate_5m")
    }
    assert consensus_5m == {
        old: (1, 1, 0, 0, 1.0),
        b0: (1, 1, 0, 0, 1.0),
        b1: (2, 0, 1, 1, 0.0),
    }
    last_hour = rows(dsn, "SELECT * FROM agent_performance.consensus_rate_last_hour")
    assert [(*list(r.values())[:4], float(r["consensus_rate"])) for r in last_hour] == [
        (3, 1, 1, 1, 0.3333)
    ]
    assert rows(dsn, "SELECT * FROM agent_performance.active_debate_count") == [
        {"active_debates": 1}
    ]
    assert [r["debate_id"] for r in rows(dsn, "SELECT * FROM debate_state.active_debates")] == [
        "d4"
    ]
    if backend == "postgres":
        # One partition per month of data, nothing in the default ones.
        partitions = rows(
            dsn,
            "SELECT count(*) AS n FROM pg_inherits "
            "WHERE inhparent = 'agent_performance.agent_activity'::regclass",
        )[0]["n"]
        assert partitions == 1 + len({(t.year, t.month) for t in (old, b0, b1)})
        for table in ("agent_activity_default", "debate_endings_default"):
            assert rows(dsn, f"SELECT count(*) AS n FROM agent_performance.{table}") == [{"n": 0}]


async def test_blue_green_rebuild_of_the_hypertables(dsn: str, store: EventStore) -> None:
    """TimescaleDB tracks hypertables by schema and table name: the rebuild's
    schema renames must carry its catalog along, and rows written after the
    swap must land in the live model's chunks."""
    append_first_phase(store)
    append_second_phase(store)
    stop_writing = threading.Event()

    def keep_voting() -> None:
        n = 0
        while not stop_writing.is_set():
            debate(store, f"live{n % 4}", vote(f"v{n % 7}", "approve" if n % 3 else "reject"))
            n += 1
            stop_writing.wait(0.01)

    async with shipped_daemon(dsn, NAMES):
        await wait_for(lambda: all(caught_up(dsn, n) for n in NAMES))
        writer = threading.Thread(target=keep_voting)
        writer.start()
        try:
            first = await rebuild(dsn, SPECS["agent_performance"])
            assert first is not None
            hypertables = rows(
                dsn,
                "SELECT schema_name, count(*) AS n FROM _timescaledb_catalog.hypertable "
                "GROUP BY 1 ORDER BY 1",
            )
            assert hypertables == [
                {"schema_name": "agent_performance", "n": 2},
                {"schema_name": "agent_performance__previous", "n": 2},
            ]
            # A second rebuild drops the first's __previous hypertables.
            second = await rebuild(dsn, SPECS["agent_performance"])
            assert second is not None
        finally:
            stop_writing.set()
            writer.join()
        debate(store, "late", started("late", "l1", "l2", "l3"), vote("l1", "approve"))
        decision(
            store,
            "k-late",
            DecisionProposed(decision_id="k-late", debate_id="late", proposed_by="l1", title="t"),
            DecisionApproved(decision_id="k-late", approved_by="l2"),
        )
        await wait_for(lambda: all(caught_up(dsn, n) for n in NAMES))
    assert_models_equal_the_fold(dsn)

    catalog = rows(
        dsn,
        "SELECT h.schema_name, h.table_name, count(c.id) FILTER (WHERE NOT c.dropped) AS chunks "
        "FROM _timescaledb_catalog.hypertable h "
        "LEFT JOIN _timescaledb_catalog.chunk c ON c.hypertable_id = h.id "
        "GROUP BY 1, 2 ORDER BY 1, 2",
    )
    assert [(c["schema_name"], c["table_name"]) for c in catalog] == [
        ("agent_performance", "agent_activity"),
        ("agent_performance", "debate_endings"),
        ("agent_performance__previous", "agent_activity"),
        ("agent_performance__previous", "debate_endings"),
    ]
    # Every hypertable's relation exists under the name the catalog gives.
    for c in catalog:
        relation = f"{c['schema_name']}.{c['table_name']}"
        assert rows(dsn, "SELECT to_regclass(%s) IS NOT NULL AS ok", (relation,)) == [{"ok": True}]
    # The late rows are in the live hypertable (its chunks), not the old one.
    late = rows(
        dsn,
        "SELECT tableoid::regclass::text AS chunk, global_position "
        "FROM agent_performance.agent_activity WHERE debate_id = 'late'",
    )
    assert len(late) == 2
    live_chunks = {
        row["chunk"]
        for row in rows(
            dsn,
            "SELECT quote_ident(chunk_schema) || '.' || quote_ident(chunk_name) AS chunk "
            "FROM timescaledb_information.chunks "
            "WHERE hypertable_schema = 'agent_performance' AND hypertable_name = 'agent_activity'",
        )
    }
    assert {row["chunk"] for row in late} <= live_chunks
    previous = rows(
        dsn,
        "SELECT count(*) AS n FROM agent_performance__previous.agent_activity "
        "WHERE debate_id = 'late'",
    )
    assert previous == [{"n": 0}]
