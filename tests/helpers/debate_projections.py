"""Helpers for the debate read models' tests (projections/debate_state.sql
and projections/agent_performance.sql): a daemon running the SHIPPED
catalog in the test's event loop, and plain Python folds of the log that
the read models must equal."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import dict_row

from aura_pg.projection.catalog import load_catalog
from aura_pg.projection.daemon import ProjectorDaemon
from tests.helpers.projections import running_daemon

ENDINGS = {
    "DEBATE_CONSENSUS_REACHED": "consensus",
    "DEBATE_FAILED": "failed",
    "DEBATE_TIMED_OUT": "timed_out",
}


def shipped_daemon(
    dsn: str, names: Sequence[str], **settings: Any
) -> AbstractAsyncContextManager[ProjectorDaemon]:
    """A projector daemon for the named projections of the shipped catalog."""
    return running_daemon(dsn, names, catalog=load_catalog(), **settings)


def rows(dsn: str, statement: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description is not None else []


def log_events(dsn: str, types: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """The log (or its events of ``types``) in position order."""
    wanted = list(types) if types is not None else None
    return rows(
        dsn,
        "SELECT global_position, stream_id, version, type, data, metadata, recorded_at "
        "FROM aura.events WHERE %s::text[] IS NULL OR type = ANY(%s::text[]) "
        "ORDER BY global_position",
        (wanted, wanted),
    )


def set_recorded_at(dsn: str, times: Mapping[int, datetime]) -> None:
    """Give events (by position) fixed recorded_at values, so that windowed
    numbers can be computed by hand. The log is append-only: its trigger is
    bypassed for this test-only edit (session_replication_role = replica)."""
    with psycopg.connect(dsn) as conn:
        conn.execute("SET LOCAL session_replication_role = replica")
        with conn.cursor() as cur:
            cur.executemany(
                "UPDATE aura.events SET recorded_at = %s WHERE global_position = %s",
                [(at, position) for position, at in times.items()],
            )


def _merge_distinct(current: list[str], new: Iterable[Any]) -> list[str]:
    merged = list(current)
    for agent in new:
        if agent is not None and agent not in merged:
            merged.append(str(agent))
    return merged


@dataclass
class _Debate:
    stream_id: str
    topic: str | None = None
    status: str = "open"
    participants: list[str] = field(default_factory=list)
    started_by: str | None = None
    max_rounds: int | None = None
    rounds_completed: int = 0
    last_argument_round: int = 0
    argument_count: int = 0
    votes_for: int = 0
    votes_against: int = 0
    outcome: str | None = None
    consensus_decision_id: str | None = None
    failure_reason: str | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    last_version: int = 0
    updated_at: datetime | None = None


def fold_debates(events: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """debate_state.debates computed event by event in Python."""
    debates: dict[str, _Debate] = {}
    for e in events:
        stream, kind, data = e["stream_id"], e["type"], e["data"]
        # A debate's decision is the one its consensus names, never one that
        # a proposal merely links to it.
        if kind == "DECISION_PROPOSED" or not stream.startswith("debate-"):
            continue
        d = debates.setdefault(stream.removeprefix("debate-"), _Debate(stream))
        if kind == "DEBATE_STARTED":
            v2 = int(e["metadata"].get("schema_version", 1)) >= 2
            d.participants = _merge_distinct(
                d.participants, data["participants"] if v2 else data["agents"]
            )
            if d.topic is None:
                d.topic = data["topic"]
            if d.started_by is None:
                # v1: a missing, null or empty starter is the first agent, if any.
                agents = data["participants"] if v2 else data["agents"]
                d.started_by = data.get("started_by") or (None if v2 or not agents else agents[0])
            if d.max_rounds is None:
                d.max_rounds = int(data.get("max_rounds", 3))
            if d.started_at is None:
                d.started_at = e["recorded_at"]
        elif kind == "AGENT_JOINED":
            d.participants = _merge_distinct(d.participants, [data["agent_id"]])
        elif kind == "DEBATE_ARGUMENT_ADDED":
            d.argument_count += 1
            d.last_argument_round = max(d.last_argument_round, data["round"])
        elif kind == "DEBATE_ROUND_COMPLETED":
            d.rounds_completed = max(d.rounds_completed, data["round"])
        elif kind == "DEBATE_VOTE_CAST":
            if data["vote"] == "approve":
                d.votes_for += 1
            else:
                d.votes_against += 1
        elif kind in ENDINGS:
            if kind == "DEBATE_TIMED_OUT":
                d.rounds_completed = max(d.rounds_completed, data["rounds_completed"])
            if d.status == "open":
                d.status = ENDINGS[kind]
                d.outcome = data.get("outcome")
                d.consensus_decision_id = data.get("decision_id")
                d.failure_reason = data.get("reason")
                d.ended_at = e["recorded_at"]
        if e["version"] > d.last_version:
            d.last_version = e["version"]
            d.updated_at = e["recorded_at"]
    folded = {}
    for debate_id, d in debates.items():
        open_ = d.status == "open"
        folded[debate_id] = {
            "debate_id": debate_id,
            "topic": d.topic,
            "status": d.status,
            "participants": d.participants,
            "rounds_completed": d.rounds_completed,
            "current_round": max(d.last_argument_round, d.rounds_completed + (1 if open_ else 0)),
            "argument_count": d.argument_count,
            "votes_for": d.votes_for,
            "votes_against": d.votes_against,
            "outcome": d.outcome,
            "decision_id": d.consensus_decision_id,
            "started_at": d.started_at,
            "ended_at": d.ended_at,
            "last_version": d.last_version,
            "updated_at": d.updated_at,
            "started_by": d.started_by,
            "max_rounds": d.max_rounds,
            "failure_reason": d.failure_reason,
        }
    return folded


def fold_activity(events: Iterable[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
    """agent_performance.agent_activity in Python: (global_position, time,
    agent_id, kind, debate_id, decision_id, outcome, latency_ms, decided_by)."""
    proposals: dict[str, tuple[datetime, str | None, str | None]] = {}
    activity: list[tuple[Any, ...]] = []
    for e in events:
        stream, kind, data = e["stream_id"], e["type"], e["data"]
        if kind == "DEBATE_VOTE_CAST" and stream.startswith("debate-"):
            activity.append(
                (
                    e["global_position"],
                    e["recorded_at"],
                    data["agent_id"],
                    "vote",
                    stream.removeprefix("debate-"),
                    None,
                    data["vote"],
                    None,
                    None,
                )
            )
        elif kind == "DECISION_PROPOSED" and stream.startswith("decision-"):
            proposals.setdefault(
                stream.removeprefix("decision-"),
                (e["recorded_at"], data.get("debate_id"), data.get("proposed_by")),
            )
        elif kind in ("DECISION_APPROVED", "DECISION_REJECTED") and stream.startswith("decision-"):
            decision_id = stream.removeprefix("decision-")
            approved = kind == "DECISION_APPROVED"
            decided_by = data["approved_by"] if approved else data["rejected_by"]
            proposed = proposals.get(decision_id)
            activity.append(
                (
                    e["global_position"],
                    e["recorded_at"],
                    (proposed[2] if proposed else None) or decided_by,
                    "decision",
                    proposed[1] if proposed else None,
                    decision_id,
                    "approve" if approved else "reject",
                    _ms(e["recorded_at"] - proposed[0]) if proposed else None,
                    decided_by,
                )
            )
    return activity


def fold_endings(events: Iterable[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
    """agent_performance.debate_endings in Python: (global_position, time,
    debate_id, ending, outcome)."""
    return [
        (
            e["global_position"],
            e["recorded_at"],
            e["stream_id"].removeprefix("debate-"),
            ENDINGS[e["type"]],
            e["data"].get("outcome"),
        )
        for e in events
        if e["type"] in ENDINGS and e["stream_id"].startswith("debate-")
    ]


def _ms(delta: timedelta) -> float:
    return round(delta.total_seconds() * 1000, 3)


def model_activity(dsn: str, schema: str = "agent_performance") -> list[tuple[Any, ...]]:
    return [
        (*list(row.values())[:7], _round(row["latency_ms"]), row["decided_by"])
        for row in rows(
            dsn,
            "SELECT global_position, time, agent_id, kind, debate_id, decision_id, outcome, "
            f"latency_ms, decided_by FROM {schema}.agent_activity ORDER BY global_position",
        )
    ]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def model_endings(dsn: str, schema: str = "agent_performance") -> list[tuple[Any, ...]]:
    return [
        tuple(row.values())
        for row in rows(
            dsn,
            "SELECT global_position, time, debate_id, ending, outcome "
            f"FROM {schema}.debate_endings ORDER BY global_position",
        )
    ]
