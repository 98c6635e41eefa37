"""The projector's query counts end-to-end times into histogram buckets in
SQL (width_bucket over the negated bounds); the buckets must be the ones
Prometheus means by "le": a value on a bound belongs to that bound."""

from __future__ import annotations

import bisect

import psycopg
import pytest

from aura_pg._resources import named_queries
from aura_pg.observability.metrics import LATENCY_BOUNDS, NEGATED_LATENCY_BOUNDS

BUCKET_EXPRESSION = "%(bounds)s - width_bucket(-z.s, %(negated_bounds)s::float8[])"


def test_the_query_uses_this_expression() -> None:
    assert BUCKET_EXPRESSION in named_queries("queries/projector.sql")["project_batch"]


@pytest.mark.parametrize(
    "seconds",
    [0.0, 0.0009, *LATENCY_BOUNDS, *(b * 1.0001 for b in LATENCY_BOUNDS), 1e6],
)
def test_sql_buckets_match_le_semantics(dsn: str, seconds: float) -> None:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            f"SELECT {BUCKET_EXPRESSION} FROM (SELECT %(s)s::float8 AS s) AS z",
            {"s": seconds, "bounds": len(LATENCY_BOUNDS), "negated_bounds": NEGATED_LATENCY_BOUNDS},
        ).fetchone()
    assert row is not None
    expected = bisect.bisect_left([*LATENCY_BOUNDS, float("inf")], seconds)
    assert row[0] == expected
