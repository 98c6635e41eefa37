"""Prometheus metrics: counters and histograms kept by the process that does
the work, and gauges read from the database at each scrape.

The process metrics live in prometheus_client's default registry, so an
application that embeds the store exposes its append metrics with its own
``/metrics``. The database gauges come from :class:`DatabaseCollector`,
which each daemon registers in its own registry: every daemon then reports
the same lag, dead letters and debates, whichever projections it runs.
Just over 500 lines: every metric the store and the daemons keep, with its
help text, and the database collector in one place.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import logging
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, LiteralString

import psycopg
from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from psycopg import sql

from aura_pg._resources import named_queries
from aura_pg.observability import names
from aura_pg.observability.health import HealthInputs, OutcomeWindow, health_score
from aura_pg.observability.tracing import suppress_instrumentation

log = logging.getLogger("aura_pg.metrics")

_QUERIES: Final = named_queries("queries/metrics.sql")

CIRCUIT_STATES: Final = ("closed", "half_open", "open")
PROJECTION_STATES: Final = ("running", "paused", "failed", "rebuilding")

LATENCY_BOUNDS: Final = tuple(names.LATENCY_BUCKETS)
# For the projector's query, which counts events into these buckets in SQL.
NEGATED_LATENCY_BOUNDS: Final = [-bound for bound in reversed(LATENCY_BOUNDS)]


@dataclass(frozen=True, slots=True)
class BucketCounts:
    """Observations already counted into buckets: bucket index (into the
    bounds plus +Inf) to count, and the sum of the observed values."""

    counts: dict[int, int]
    total: float


def _le(bound: float) -> str:
    """A bucket bound as Prometheus writes it."""
    text: str = floatToGoString(bound)  # type: ignore[no-untyped-call]
    return text


class BulkHistogram(Collector):
    """A labelled histogram that takes many observations in one call.

    prometheus_client's Histogram observes one value at a time, about a
    microsecond each: for a 5,000-event batch observed once per event that
    is milliseconds per batch, a fifth of a fast catch-up. Here a batch
    costs one call: one value observed many times, or counts already made
    per bucket (by the projector's query, in SQL). Exposed like any
    histogram (``_bucket``, ``_sum``, ``_count``)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float] = names.LATENCY_BUCKETS,
        registry: Any = REGISTRY,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = list(labelnames)
        self._bounds = [*buckets, math.inf]
        self._series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}
        self._lock = threading.Lock()
        if registry is not None:
            registry.register(self)

    def observe(self, labels: Sequence[str], value: float, count: int = 1) -> None:
        """``count`` observations of ``value``."""
        index = bisect.bisect_left(self._bounds, value)
        with self._lock:
            counts, total = self._series.setdefault(tuple(labels), ([0] * len(self._bounds), [0.0]))
            counts[index] += count
            total[0] += value * count

    def add_counts(self, labels: Sequence[str], counted: BucketCounts) -> None:
        """Observations counted into this histogram's buckets elsewhere."""
        if not counted.counts:
            return
        with self._lock:
            counts, total = self._series.setdefault(tuple(labels), ([0] * len(self._bounds), [0.0]))
            for index, n in counted.counts.items():
                counts[index] += n
            total[0] += counted.total

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        with self._lock:
            series = [
                (labels, list(counts), total[0]) for labels, (counts, total) in self._series.items()
            ]
        for labels, counts, total in series:
            cumulative = list(itertools.accumulate(counts))
            family.add_metric(
                list(labels),
                [(_le(b), float(c)) for b, c in zip(self._bounds, cumulative, strict=True)],
                total,
            )
        yield family

    def describe(self) -> Iterator[Metric]:
        yield self._family()


EVENTS_PROCESSED = Counter(
    names.EVENTS_PROCESSED.removesuffix("_total"),
    "Events handled by projections, one count per projection and attempt outcome "
    "(status: success, failed, dead_lettered)",
    ["event_type", "status"],
)


EVENT_PROCESSING_DURATION = BulkHistogram(
    names.EVENT_PROCESSING_DURATION,
    "Time the projector spent on the batch that carried the event, read to commit",
    ["event_type"],
)
EVENT_END_TO_END = BulkHistogram(
    names.EVENT_END_TO_END,
    "From an event's recorded_at (its append transaction's start) to the end of the batch "
    "that applied it, just before that batch commits (the database's clock)",
    ["projection_name"],
)
PROJECTION_ERRORS = Counter(
    names.PROJECTION_ERRORS.removesuffix("_total"),
    "Projection failures (error_type: handler, transient, connection, stale_checkpoint)",
    ["projection_name", "error_type"],
)
PROJECTION_BATCH_DURATION = Histogram(
    names.PROJECTION_BATCH_DURATION,
    "Duration of one applied batch, read to commit",
    ["projection_name"],
    buckets=names.LATENCY_BUCKETS,
)
EVENTS_APPENDED = Counter(
    names.EVENTS_APPENDED.removesuffix("_total"),
    "Events this process appended (duplicates of earlier appends not included)",
    ["event_type"],
)
APPEND_DURATION = Histogram(
    names.APPEND_DURATION,
    "Duration of one append call (one batch), including failed ones",
    buckets=names.LATENCY_BUCKETS,
)
APPEND_DUPLICATES = Counter(
    names.APPEND_DUPLICATES.removesuffix("_total"),
    "Events whose append was a retry of one already recorded (nothing written)",
)
APPEND_CONFLICTS = Counter(
    names.APPEND_CONFLICTS.removesuffix("_total"),
    "Appends refused because the stream was not at the expected version",
)
APPEND_RETRIES = Counter(
    names.APPEND_RETRIES.removesuffix("_total"),
    "Append attempts that failed transiently and were sent again with AppendRetry "
    "(reason: connection, server_shutdown, server_starting, too_many_connections, "
    "pool_timeout, serialization, deadlock)",
    ["reason"],
)
OUTBOX_PUBLISHED = Counter(
    names.OUTBOX_PUBLISHED.removesuffix("_total"),
    "Outbox messages the relay delivered",
    ["sink"],
)
OUTBOX_PUBLISH_FAILURES = Counter(
    names.OUTBOX_PUBLISH_FAILURES.removesuffix("_total"),
    "Outbox deliveries that failed (retried later, or marked dead)",
    ["sink"],
)
OUTBOX_PUBLISH_DURATION = Histogram(
    names.OUTBOX_PUBLISH_DURATION,
    "Duration of one delivery attempt to a sink",
    ["sink"],
    buckets=names.LATENCY_BUCKETS,
)

# Attempts of this process's work (events applied, messages delivered), for
# the health score's error-rate term.
OUTCOMES = OutcomeWindow()


def record_applied_batch(
    projection: str,
    counts_by_type: Mapping[str, int],
    duration: float,
    end_to_end: BucketCounts,
) -> None:
    """A batch committed: count its events by type, time it once per event,
    and add its events' times from append to commit."""
    PROJECTION_BATCH_DURATION.labels(projection).observe(duration)
    for event_type, count in counts_by_type.items():
        EVENTS_PROCESSED.labels(event_type, "success").inc(count)
        EVENT_PROCESSING_DURATION.observe((event_type,), duration, count)
    EVENT_END_TO_END.add_counts((projection,), end_to_end)
    OUTCOMES.record(successes=sum(counts_by_type.values()))


def record_projection_error(
    projection: str, error_type: str, event_type: str | None = None
) -> None:
    """A failed batch or attempt; ``event_type`` when one event was tried."""
    PROJECTION_ERRORS.labels(projection, error_type).inc()
    if event_type is not None:
        EVENTS_PROCESSED.labels(event_type, "failed").inc()
    OUTCOMES.record(failures=1)


def record_dead_lettered(event_type: str) -> None:
    EVENTS_PROCESSED.labels(event_type, "dead_lettered").inc()


def record_delivery(sink: str, duration: float, *, delivered: bool) -> None:
    """One attempt to deliver an outbox message."""
    OUTBOX_PUBLISH_DURATION.labels(sink).observe(duration)
    (OUTBOX_PUBLISHED if delivered else OUTBOX_PUBLISH_FAILURES).labels(sink).inc()
    OUTCOMES.record(successes=int(delivered), failures=int(not delivered))


@dataclass(frozen=True, slots=True)
class ProjectionGauges:
    name: str
    status: str
    circuit: str
    lag_seconds: float
    events_behind: int
    checkpoint_position: int
    dead_letters: int


@dataclass(frozen=True, slots=True)
class DatabaseSnapshot:
    """What one scrape read; ``up`` is False when the database did not answer."""

    up: bool
    projections: tuple[ProjectionGauges, ...] = ()
    head_position: int | None = None
    oldest_transaction_age: float | None = None
    outbox: tuple[tuple[str, str, int, int, float | None], ...] = ()
    active_debates: float | None = None
    consensus_rate: tuple[tuple[str, float | None], ...] = ()
    # (projection, shadow lag seconds, rows that differed at the last diff)
    shadows: tuple[tuple[str, float, int | None], ...] = ()

    def health(self, error_rate: float) -> HealthInputs:
        return HealthInputs(
            database_up=self.up,
            max_lag_seconds=max((p.lag_seconds for p in self.projections), default=0.0),
            error_rate=error_rate,
            dead_letters=sum(p.dead_letters for p in self.projections),
            open_circuits=sum(
                1 for p in self.projections if p.circuit != "closed" or p.status == "failed"
            ),
            projections=len(self.projections),
        )


def _visible_rows(conn: psycopg.Connection[Any], query: LiteralString) -> list[Any]:
    """The rows of one gauge query, or none when this role may not read
    what it reads: a daemon serving /metrics as the writer role (the
    importer) reports the gauges it can see, and the database as up."""
    try:
        with conn.transaction():
            return conn.execute(query).fetchall()
    except psycopg.errors.InsufficientPrivilege:
        return []


def read_snapshot(conn: psycopg.Connection[Any]) -> DatabaseSnapshot:
    """Every database gauge (that this role may read), read in one short
    read-only transaction."""
    with conn.transaction():
        projections = tuple(
            ProjectionGauges(
                name=row[0],
                status=row[1],
                circuit=row[2],
                lag_seconds=float(row[3]),
                events_behind=int(row[4]),
                checkpoint_position=int(row[5]),
                dead_letters=int(row[6]),
            )
            for row in _visible_rows(conn, _QUERIES["projections"])
        )
        store_rows = _visible_rows(conn, _QUERIES["store"])
        store = store_rows[0] if store_rows else (None, None)
        outbox = tuple(
            (row[0], row[1], int(row[2]), int(row[3]), row[4])
            for row in _visible_rows(conn, _QUERIES["outbox"])
        )
        shadows = tuple(
            (row[0], float(row[1]), None if row[2] is None else int(row[2]))
            for row in _visible_rows(conn, _QUERIES["shadows"])
        )
        schema_rows = _visible_rows(conn, _QUERIES["debate_schema"])
        schema_row = schema_rows[0] if schema_rows else None
        active: float | None = None
        rates: tuple[tuple[str, float | None], ...] = ()
        if schema_row is not None:
            query = sql.SQL(_QUERIES["debates"]).format(schema=sql.Identifier(schema_row[0]))
            debates = conn.execute(query).fetchone()
            if debates is not None:
                active = debates[0]
                rates = (("5m", debates[1]), ("1h", debates[2]))
    return DatabaseSnapshot(
        up=True,
        projections=projections,
        head_position=store[0],
        oldest_transaction_age=store[1],
        outbox=outbox,
        active_debates=active,
        consensus_rate=rates,
        shadows=shadows,
    )


def _gauge(name: str, documentation: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=list(labels))


def snapshot_metrics(snapshot: DatabaseSnapshot, score: float) -> list[Metric]:
    """The gauge families of one snapshot (empty families when the database
    is down, so no stale value is reported)."""
    up = _gauge(names.DATABASE_UP, "1 when the database answered this scrape")
    up.add_metric([], 1.0 if snapshot.up else 0.0)
    health = _gauge(names.SYSTEM_HEALTH_SCORE, "0 to 100; formula in docs/observability.md")
    health.add_metric([], score)
    lag = _gauge(
        names.PROJECTION_LAG,
        "How long the oldest event of the projection's types it has not applied has waited",
        ["projection_name"],
    )
    behind = _gauge(
        names.PROJECTION_EVENTS_BEHIND,
        "Events of the projection's types after its checkpoint",
        ["projection_name"],
    )
    checkpoint = _gauge(
        names.PROJECTION_CHECKPOINT, "Global position of the checkpoint", ["projection_name"]
    )
    dead = _gauge(names.PROJECTION_DEAD_LETTERS, "Pending dead letters", ["projection_name"])
    circuit = _gauge(
        names.PROJECTION_CIRCUIT_STATE,
        "1 for the circuit breaker's current state",
        ["projection_name", "state"],
    )
    status = _gauge(
        names.PROJECTION_STATUS,
        "1 for the projection's current status",
        ["projection_name", "status"],
    )
    for p in snapshot.projections:
        lag.add_metric([p.name], p.lag_seconds)
        behind.add_metric([p.name], float(p.events_behind))
        checkpoint.add_metric([p.name], float(p.checkpoint_position))
        dead.add_metric([p.name], float(p.dead_letters))
        for state in CIRCUIT_STATES:
            circuit.add_metric([p.name, state], 1.0 if p.circuit == state else 0.0)
        for state in PROJECTION_STATES:
            status.add_metric([p.name, state], 1.0 if p.status == state else 0.0)
    head = _gauge(names.EVENT_STORE_HEAD, "Newest global position; its rate is the append rate")
    if snapshot.head_position is not None:
        head.add_metric([], float(snapshot.head_position))
    oldest = _gauge(
        names.OLDEST_TRANSACTION_AGE,
        "Age of the oldest open writing transaction; it holds every projector back",
    )
    if snapshot.up:
        oldest.add_metric([], snapshot.oldest_transaction_age or 0.0)
    pending = _gauge(names.OUTBOX_PENDING, "Outbox messages waiting", ["sink", "topic"])
    dead_outbox = _gauge(names.OUTBOX_DEAD, "Outbox messages given up on", ["sink", "topic"])
    oldest_pending = _gauge(
        names.OUTBOX_OLDEST_PENDING_AGE, "Age of the oldest waiting outbox message"
    )
    oldest_pending_age = 0.0
    for sink, topic, waiting, given_up, age in snapshot.outbox:
        pending.add_metric([sink, topic], float(waiting))
        dead_outbox.add_metric([sink, topic], float(given_up))
        oldest_pending_age = max(oldest_pending_age, age or 0.0)
    if snapshot.up:
        oldest_pending.add_metric([], oldest_pending_age)
    active = _gauge(names.ACTIVE_DEBATES, "Debates started and not ended")
    if snapshot.active_debates is not None:
        active.add_metric([], snapshot.active_debates)
    consensus = _gauge(
        names.DEBATE_CONSENSUS_RATE,
        "Share of the debates ended in the window that reached consensus",
        ["time_window"],
    )
    for window, rate in snapshot.consensus_rate:
        if rate is not None:
            consensus.add_metric([window], rate)
    shadow_lag = _gauge(
        names.SHADOW_LAG,
        "The shadow of the projection (projections shadow): its lag, as the projection's",
        ["projection_name"],
    )
    shadow_differing = _gauge(
        names.SHADOW_DIFFERING_ROWS,
        "Rows of the projection's read model that differed from its shadow's at the last diff",
        ["projection_name"],
    )
    for projection, shadow_lag_seconds, differing in snapshot.shadows:
        shadow_lag.add_metric([projection], shadow_lag_seconds)
        if differing is not None:
            shadow_differing.add_metric([projection], float(differing))
    return [
        up, health, lag, behind, checkpoint, dead, circuit, status, head, oldest,
        pending, dead_outbox, oldest_pending, active, consensus, shadow_lag, shadow_differing,
    ]  # fmt: skip


class DatabaseCollector(Collector):
    """Reads the database gauges at each scrape over one lazily opened
    connection (reopened after a failure), with short timeouts so a slow
    database makes a slow scrape, not a hung one."""

    def __init__(
        self,
        connect: Callable[[], psycopg.Connection[Any]],
        outcomes: OutcomeWindow = OUTCOMES,
    ) -> None:
        self._connect = connect
        self._outcomes = outcomes
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()
        self.last_snapshot = DatabaseSnapshot(up=False)

    def _session(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
        return self._conn

    def snapshot(self) -> DatabaseSnapshot:
        # A scrape's queries every 15 s are not worth a trace each.
        with self._lock, suppress_instrumentation():
            try:
                snap = read_snapshot(self._session())
            except psycopg.Error as exc:
                log.warning("metrics: the database did not answer: %s", exc)
                self._close()
                snap = DatabaseSnapshot(up=False)
            self.last_snapshot = snap
            return snap

    def query_one(self, query: LiteralString, params: dict[str, Any]) -> tuple[Any, ...] | None:
        """One row of a query on the collector's connection (psycopg errors
        propagate; the connection is reopened next time)."""
        with self._lock, suppress_instrumentation():
            try:
                return self._session().execute(query, params).fetchone()
            except psycopg.Error:
                self._close()
                raise

    def health_score(self, snapshot: DatabaseSnapshot) -> float:
        return health_score(snapshot.health(self._outcomes.error_rate()))

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        yield from snapshot_metrics(snap, self.health_score(snap))

    def describe(self) -> Iterator[Metric]:
        return iter(())  # collected on demand only: registering must not touch the database

    def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
        self._conn = None

    def close(self) -> None:
        with self._lock:
            self._close()


class CombinedRegistry(Collector):
    """The process metrics (default registry) and one daemon's database gauges,
    as one registry for the daemon's /metrics."""

    def __init__(self, database: DatabaseCollector, base: Any = REGISTRY) -> None:
        self.database = database
        self.base = base

    def collect(self) -> Iterator[Metric]:
        yield from self.base.collect()
        yield from self.database.collect()
