"""What the store's pool costs an append when nothing fails: single-event
appends through three pools of one connection, alternating round by round
in one process on one server:

* ``psycopg_pool``: ``ConnectionPool`` as psycopg_pool makes it (the store's
  pool before issue 23);
* ``quick``: ``QuickReconnectPool``, what ``EventStore.connect`` makes now
  (psycopg_pool's pool with a short reconnection schedule);
* ``check``: ``ConnectionPool(check=ConnectionPool.check_connection)``, the
  alternative not taken (an empty query on every checkout).

It prints the median and p95 latency of an append and appends/s per pool,
and quick/psycopg_pool and check/psycopg_pool (1.00: no difference). Then,
since an append's own noise hides anything below a few percent, the pool's
own share: microseconds per checkout and return of a connection, no
statement, for psycopg_pool's pool and the quick one (``--checkouts``).

    python load/bench_pool_check.py                  # a throw-away cluster
    python load/bench_pool_check.py --commit durable # a WAL flush per append
    python load/bench_pool_check.py --appends 3000 --rounds 5
    python load/bench_pool_check.py --dsn "host=... dbname=..."
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from psycopg_pool import ConnectionPool

from aura_pg import EventStore, NewEvent, migrate
from aura_pg.devtools.localdb import benchmark_settings, temporary_cluster
from aura_pg.store.pool import QuickReconnectPool

POOLS: dict[str, Callable[[str], ConnectionPool[Any]]] = {
    "psycopg_pool": lambda dsn: ConnectionPool(
        dsn, min_size=1, max_size=1, open=False, kwargs={"autocommit": True}
    ),
    "quick": lambda dsn: QuickReconnectPool(
        dsn, min_size=1, max_size=1, open=False, kwargs={"autocommit": True}
    ),
    "check": lambda dsn: ConnectionPool(
        dsn,
        min_size=1,
        max_size=1,
        open=False,
        kwargs={"autocommit": True},
        check=ConnectionPool.check_connection,
    ),
}


def checkout_cost(pool: ConnectionPool[Any], checkouts: int) -> float:
    """Microseconds per checkout and return of a connection."""
    began = time.perf_counter()
    for _ in range(checkouts):
        with pool.connection():
            pass
    return (time.perf_counter() - began) / checkouts * 1e6


def measure(store: EventStore, appends: int) -> list[float]:
    """Seconds of each of ``appends`` single-event appends, each to a
    stream of its own as most commands are."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    latencies = []
    for n in range(appends):
        began = time.perf_counter()
        store.append(f"{prefix}-{n}", [NewEvent("Benched", {"n": n})])
        latencies.append(time.perf_counter() - began)
    return latencies


@contextlib.contextmanager
def database(given: str | None, commit: str) -> Iterator[str]:
    if given is not None:
        yield given
        return
    with temporary_cluster(benchmark_settings(commit), prefix="aura-pg-bench-pool-") as cluster:
        migrate.upgrade(cluster.dsn())
        yield cluster.dsn()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="an existing, migrated database (default: a temp cluster)")
    parser.add_argument("--appends", type=int, default=2000, help="appends per pool and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--checkouts", type=int, default=20_000, help="per pool and round")
    parser.add_argument(
        "--commit", choices=["async", "durable"], default="async",
        help="the temp cluster's commits (async: no WAL flush per append, so a "
        "round trip more or less shows)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    samples: dict[str, list[float]] = {name: [] for name in POOLS}
    with database(args.dsn, args.commit) as dsn:
        for _ in range(args.rounds):
            for name, make in POOLS.items():
                pool = make(dsn)
                pool.open(wait=True)
                try:
                    store = EventStore(pool)
                    measure(store, 100)  # warm: plans cached, pages in memory
                    samples[name] += measure(store, args.appends)
                finally:
                    pool.close()
        checkouts: dict[str, list[float]] = {"psycopg_pool": [], "quick": []}
        pools = {name: POOLS[name](dsn) for name in checkouts}
        for pool in pools.values():
            pool.open(wait=True)
        try:
            for _ in range(args.rounds):
                for name, pool in pools.items():
                    checkouts[name].append(checkout_cost(pool, args.checkouts))
        finally:
            for pool in pools.values():
                pool.close()
    medians = {name: statistics.median(values) for name, values in samples.items()}
    print(f"{'pool':<14}{'p50 ms':>9}{'p95 ms':>9}{'appends/s':>11}{'p50 vs psycopg_pool':>21}")
    for name, values in samples.items():
        ordered = sorted(values)
        p95 = ordered[int(0.95 * (len(ordered) - 1))]
        rate = len(values) / sum(values)
        ratio = medians[name] / medians["psycopg_pool"]
        print(f"{name:<14}{medians[name] * 1e3:>9.3f}{p95 * 1e3:>9.3f}{rate:>11.0f}{ratio:>21.2f}")
    for name, costs in checkouts.items():
        print(
            f"{name:<14} checkout and return: {statistics.median(costs):.2f} us "
            f"(median of {args.rounds} rounds of {args.checkouts:,})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
