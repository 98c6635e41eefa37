"""Aggregates: load times and commands/s of the aggregate toolkit, against
the eventsourcing library's application, in one run.

The aggregate is an account (load/bench_aggregate_models.py): opened, then
deposits; snapshots every 100 events. The library's version of it
(``EsAccount`` in an ``Application`` with ``snapshotting_intervals`` 100,
persistence module ``eventsourcing.postgres``, no aggregate cache: its
default) runs against the same throw-away server.

1. **Load time.** For each size (10, 1,000 and 100,000 events) one account
   is built: opened by a command, then deposits appended in batches of
   1,000, the last one by a command, so that the repository takes its
   snapshot as it would in use (at the last multiple of 100: with 1,000
   and 100,000 events, a snapshot at the account's version and no event
   after it; with 10 events there is none). Then ``Repository.load`` is
   timed, with snapshots and without (``Repository(..., snapshots=False)``,
   the same stream), and the library's ``app.repository.get`` the same
   way (an application without its snapshot store for "without"). Each
   variant is loaded once untimed, then the four take turns, one load at a
   time, until each has ``--loads`` samples or has used ``--load-budget``
   seconds (at least 3 samples). Printed: p50, p95, samples, and the ratio
   without/with snapshots.
2. **Commands/s.** ``--writers`` processes (8), each with one connection,
   run ``deposit(1)`` in a loop after a barrier, for ``--duration``
   seconds (after ``--warmup`` seconds not counted): contended (all on one
   account) and uncontended (one account each). The toolkit:
   ``Repository.execute`` (it reruns the command on a version conflict,
   after a jittered sleep). The library: ``repository.get``, the command,
   ``app.save``, and on its ``IntegrityError`` (a version conflict) the same
   jittered sleep (the toolkit's ``RetryPolicy`` delays) and a fresh get,
   up to the same 30 attempts. A command whose 30th attempt conflicts too
   is counted as given up, not as done. Both take snapshots every 100 events.
   Targets interleaved in a rotating order, ``--rounds`` rounds, median kept.

Targets (issue 19): the 100,000-event account with snapshots loads in under
10 ms p95 and at least 50x faster (p50) than without; uncontended
commands/s at least 2x the library's. Each is printed PASS or MISS; a MISS
is followed by a cProfile of what missed (``--profile`` profiles always).

    python load/bench_aggregates.py                  # full run
    python load/bench_aggregates.py --quick          # seconds: small sizes, short windows
    python load/bench_aggregates.py --dsn "host=... dbname=..." --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import multiprocessing as mp
import pstats
import queue
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import psycopg
from bench_aggregate_models import SNAPSHOT_EVERY, BenchAccount, Deposited, EsAccount, EsBank
from psycopg.conninfo import conninfo_to_dict

from aura_pg import EventStore
from aura_pg.aggregates import Repository, RetryPolicy
from aura_pg.devtools.localdb import benchmark_settings, temporary_cluster
from aura_pg.errors import ConcurrencyError

SIZES = (10, 1_000, 100_000)
QUICK_SIZES = (10, 1_000)
BUILD_BATCH = 1_000
TARGET_SIZE = 100_000
LOAD_P95_TARGET_MS = 10.0
LOAD_RATIO_TARGET = 50.0
COMMANDS_RATIO_TARGET = 2.0
LIBRARY_TABLES = ("benchaggregates_events", "benchaggregates_snapshots")
IMPLEMENTATIONS = ("toolkit", "eventsourcing")
LAYOUTS = ("uncontended", "contended")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# -- the library's application on the benchmark server -------------------------------


def library_env(dsn: str, *, snapshots: bool = True) -> dict[str, str]:
    """The eventsourcing application's environment for ``dsn``: its
    PostgreSQL persistence module, one connection, its tables created
    beforehand (``prepare``: writers creating them at once collide)."""
    params = conninfo_to_dict(dsn)
    env = {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": str(params.get("dbname", "postgres")),
        "POSTGRES_HOST": str(params.get("host", "localhost")),
        "POSTGRES_PORT": str(params.get("port", "5432")),
        "POSTGRES_USER": str(params.get("user", "postgres")),
        "POSTGRES_PASSWORD": str(params.get("password", "")),
        "POSTGRES_POOL_SIZE": "1",
        "POSTGRES_MAX_OVERFLOW": "0",
        "CREATE_TABLE": "n",
    }
    if not snapshots:
        env["IS_SNAPSHOTTING_ENABLED"] = "n"
    return env


def library_app(dsn: str, *, snapshots: bool = True) -> EsBank:
    return EsBank(env=library_env(dsn, snapshots=snapshots))


# -- 1. load time ---------------------------------------------------------------------


@dataclass
class LoadCell:
    implementation: str
    events: int
    snapshots: bool
    samples: int
    p50_ms: float
    p95_ms: float
    mean_ms: float


def build_toolkit_account(store: EventStore, size: int) -> str:
    """An account of ``size`` events (size >= 2), its snapshot taken by the
    repository's last command, as in use."""
    repo = Repository(store, BenchAccount)
    account_id = f"load-{size}-{uuid.uuid4().hex[:8]}"
    repo.execute(account_id, lambda a: a.open("bench"))
    template = BenchAccount(account_id)
    version = 1
    while version < size - 1:
        count = min(BUILD_BATCH, size - 1 - version)
        batch = [template.new_event(Deposited(amount=1, reference="x" * 40)) for _ in range(count)]
        store.append(BenchAccount.stream_id(account_id), batch, version)
        version += count
    result = repo.execute(account_id, lambda a: a.deposit(1))
    assert result.version == size, result
    return account_id


def build_library_account(app: EsBank, size: int) -> uuid.UUID:
    """The same account in the library: saved in chunks of 1,000 events,
    each save taking the snapshots its multiples of 100 call for."""
    account = EsAccount("bench")
    pending = 1
    for _ in range(size - 1):
        account.deposit(1)
        pending += 1
        if pending == BUILD_BATCH:
            app.save(account)
            pending = 0
    if pending:
        app.save(account)
    loaded: EsAccount = app.repository.get(account.id)
    assert loaded.version == size, loaded.version
    return account.id


def toolkit_version(repo: Repository[BenchAccount], account_id: str) -> int:
    """One load (``Repository.load``): the version loaded."""
    return repo.load(account_id).version


def library_version(app: EsBank, account_id: uuid.UUID) -> int:
    """One load in the library (``repository.get``): the version loaded."""
    version: int = app.repository.get(account_id).version
    return version


def measure_loads(
    dsn: str, sizes: tuple[int, ...], loads: int, budget: float
) -> tuple[list[LoadCell], dict[int, tuple[str, uuid.UUID]]]:
    """Load-time cells, and the accounts built, by size."""
    store = EventStore.connect(dsn, min_size=1, max_size=1)
    app_with = library_app(dsn, snapshots=True)
    app_without = library_app(dsn, snapshots=False)
    with_snapshots = Repository(store, BenchAccount)
    without_snapshots = Repository(store, BenchAccount, snapshots=False)
    cells: list[LoadCell] = []
    accounts: dict[int, tuple[str, uuid.UUID]] = {}
    try:
        for size in sizes:
            began = time.perf_counter()
            ours = build_toolkit_account(store, size)
            theirs = build_library_account(app_with, size)
            accounts[size] = (ours, theirs)
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("VACUUM ANALYZE")
                conn.execute("CHECKPOINT")
            print(
                f"built {size:,}-event accounts in {time.perf_counter() - began:.1f} s", flush=True
            )
            variants: list[tuple[str, bool, Callable[[], int]]] = [
                ("toolkit", True, partial(toolkit_version, with_snapshots, ours)),
                ("toolkit", False, partial(toolkit_version, without_snapshots, ours)),
                ("eventsourcing", True, partial(library_version, app_with, theirs)),
                ("eventsourcing", False, partial(library_version, app_without, theirs)),
            ]
            samples: list[list[float]] = [[] for _ in variants]
            spent = [0.0] * len(variants)
            for _, _, load in variants:  # untimed: caches, prepared statements
                assert load() == size
            while True:
                pending = [
                    i
                    for i in range(len(variants))
                    if len(samples[i]) < 3 or (len(samples[i]) < loads and spent[i] < budget)
                ]
                if not pending:
                    break
                for i in pending:
                    t0 = time.perf_counter()
                    version = variants[i][2]()
                    elapsed = time.perf_counter() - t0
                    assert version == size
                    samples[i].append(elapsed * 1000)
                    spent[i] += elapsed
            for (implementation, snapshots, _), values in zip(variants, samples, strict=True):
                cells.append(
                    LoadCell(
                        implementation=implementation,
                        events=size,
                        snapshots=snapshots,
                        samples=len(values),
                        p50_ms=percentile(values, 0.50),
                        p95_ms=percentile(values, 0.95),
                        mean_ms=statistics.fmean(values),
                    )
                )
    finally:
        store.close()
        app_with.close()
        app_without.close()
    return cells, accounts


def load_cell(cells: list[LoadCell], implementation: str, size: int, snapshots: bool) -> LoadCell:
    return next(
        c
        for c in cells
        if (c.implementation, c.events, c.snapshots) == (implementation, size, snapshots)
    )


def print_loads(cells: list[LoadCell], sizes: tuple[int, ...]) -> list[dict[str, Any]]:
    print(
        f"\n{'events':>8} {'implementation':>14} {'snapshots':>9} {'p50 ms':>9} {'p95 ms':>9} "
        f"{'mean ms':>9} {'loads':>6}"
    )
    for c in cells:
        print(
            f"{c.events:>8} {c.implementation:>14} {'yes' if c.snapshots else 'no':>9} "
            f"{c.p50_ms:>9.2f} {c.p95_ms:>9.2f} {c.mean_ms:>9.2f} {c.samples:>6}"
        )
    rows = []
    print(
        f"\n{'events':>8} {'toolkit without/with (p50)':>27} {'eventsourcing without/with':>27} "
        f"{'toolkit/eventsourcing with':>27} {'without':>8}"
    )
    for size in sizes:
        row: dict[str, Any] = {"events": size}
        for implementation in IMPLEMENTATIONS:
            with_ = load_cell(cells, implementation, size, True)
            without = load_cell(cells, implementation, size, False)
            row[f"{implementation}_without_vs_with"] = without.p50_ms / with_.p50_ms
        # Above 1: the library takes longer (the toolkit is that many times faster).
        for snapshots, key in (
            (True, "eventsourcing_vs_toolkit_with"),
            (False, "eventsourcing_vs_toolkit_without"),
        ):
            row[key] = (
                load_cell(cells, "eventsourcing", size, snapshots).p50_ms
                / load_cell(cells, "toolkit", size, snapshots).p50_ms
            )
        rows.append(row)
        print(
            f"{size:>8} {row['toolkit_without_vs_with']:>27.1f} "
            f"{row['eventsourcing_without_vs_with']:>27.1f} "
            f"{row['eventsourcing_vs_toolkit_with']:>27.2f} "
            f"{row['eventsourcing_vs_toolkit_without']:>8.2f}"
        )
    print("(toolkit/eventsourcing: the library's p50 over the toolkit's; above 1: toolkit faster)")
    return rows


# -- 2. commands/s --------------------------------------------------------------------


@dataclass
class CommandCell:
    implementation: str
    layout: str
    writers: int
    commands_per_second: float
    commands: int
    conflicts: int
    gave_up: int
    """Commands abandoned after the 30 attempts, all conflicts (not counted in commands)."""
    p50_ms: float
    p95_ms: float


def toolkit_account(dsn: str, name: str) -> str:
    """A new open account on the toolkit."""
    store = EventStore.connect(dsn, min_size=1, max_size=1)
    try:
        account_id = f"{name}-{uuid.uuid4().hex[:8]}"
        Repository(store, BenchAccount).execute(account_id, lambda a: a.open("bench"))
        return account_id
    finally:
        store.close()


def library_account(app: EsBank) -> str:
    account = EsAccount("bench")
    app.save(account)
    return str(account.id)


def command_loop(
    run_one: Callable[[], tuple[int, bool]], warmup: float, duration: float
) -> tuple[int, int, list[float], int]:
    """Commands for ``warmup`` seconds uncounted, then ``duration`` seconds:
    (commands done, conflicts retried, their latencies in seconds, commands
    given up after the last attempt's conflict)."""
    end_warmup = time.perf_counter() + warmup
    while time.perf_counter() < end_warmup:
        run_one()
    latencies: list[float] = []
    conflicts = 0
    gave_up = 0
    deadline = time.perf_counter() + duration
    while True:
        began = time.perf_counter()
        if began >= deadline:
            break
        retried, done = run_one()
        conflicts += retried
        if done:
            latencies.append(time.perf_counter() - began)
        else:
            gave_up += 1
    return len(latencies), conflicts, latencies, gave_up


def toolkit_runner(store: EventStore, account_id: str) -> Callable[[], tuple[int, bool]]:
    """(conflicts retried, done): not done when the last attempt conflicted too."""
    repo = Repository(store, BenchAccount)

    def run_one() -> tuple[int, bool]:
        try:
            return repo.execute(account_id, lambda a: a.deposit(1)).conflicts, True
        except ConcurrencyError:
            return repo.retry.max_attempts - 1, False

    return run_one


def library_runner(app: EsBank, account_id: str) -> Callable[[], tuple[int, bool]]:
    """The library's command: get, decide, save; on a version conflict the
    toolkit's jittered delay and a fresh get, up to the same attempts."""
    from eventsourcing.persistence import IntegrityError

    policy = RetryPolicy()
    rng = random.Random()
    originator = uuid.UUID(account_id)

    def run_one() -> tuple[int, bool]:
        for attempt in range(1, policy.max_attempts + 1):
            account: EsAccount = app.repository.get(originator)
            account.deposit(1)
            try:
                app.save(account)
            except IntegrityError:
                if attempt == policy.max_attempts:
                    return attempt - 1, False
                time.sleep(policy.delay(attempt, rng))
                continue
            return attempt - 1, True
        raise AssertionError("unreachable")

    return run_one


def writer_main(
    dsn: str,
    implementation: str,
    account_id: str,
    warmup: float,
    duration: float,
    barrier: Barrier,
    results: Any,
) -> None:
    """One writer process: commands on ``account_id`` after the barrier."""
    store: EventStore | None = None
    app: EsBank | None = None
    if implementation == "toolkit":
        store = EventStore.connect(dsn, min_size=1, max_size=1)
        run_one = toolkit_runner(store, account_id)
    else:
        app = library_app(dsn)
        run_one = library_runner(app, account_id)
    barrier.wait()
    try:
        results.put(command_loop(run_one, warmup, duration))
    finally:
        if store is not None:
            store.close()
        if app is not None:
            app.close()


def measure_commands(
    dsn: str, implementation: str, layout: str, writers: int, warmup: float, duration: float
) -> CommandCell:
    if implementation == "toolkit":
        ids = [toolkit_account(dsn, f"{layout}-{w}") for w in range(writers)]
    else:
        app = library_app(dsn)
        try:
            ids = [library_account(app) for _ in range(writers)]
        finally:
            app.close()
    if layout == "contended":
        ids = [ids[0]] * writers
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(writers)
    results = ctx.Queue()
    processes = [
        ctx.Process(
            target=writer_main,
            args=(dsn, implementation, ids[w], warmup, duration, barrier, results),
        )
        for w in range(writers)
    ]
    for process in processes:
        process.start()
    outcomes: list[tuple[int, int, list[float], int]] = []
    give_up = time.monotonic() + warmup + duration + 180
    while len(outcomes) < writers:
        with contextlib.suppress(queue.Empty):
            outcomes.append(results.get(timeout=0.5))
            continue
        failed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
        if failed or time.monotonic() > give_up:
            for process in processes:
                process.kill()
            raise RuntimeError(f"writer processes failed or hung (exit codes {failed})")
    for process in processes:
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"writer process failed ({process.exitcode})")
    latencies = [lat * 1000 for _, _, lats, _ in outcomes for lat in lats]
    commands = sum(n for n, _, _, _ in outcomes)
    return CommandCell(
        implementation=implementation,
        layout=layout,
        writers=writers,
        commands_per_second=commands / duration,
        commands=commands,
        conflicts=sum(c for _, c, _, _ in outcomes),
        gave_up=sum(g for _, _, _, g in outcomes),
        p50_ms=percentile(latencies, 0.50),
        p95_ms=percentile(latencies, 0.95),
    )


def run_commands(
    dsn: str, writers: int, warmup: float, duration: float, rounds: int
) -> tuple[list[CommandCell], dict[tuple[str, str], list[CommandCell]]]:
    """Every (implementation, layout) ``rounds`` times, the implementations
    taking turns in a rotating order; the median round kept."""
    print(
        f"\n{'layout':>11} {'implementation':>14} {'commands/s':>10} {'commands':>8} "
        f"{'conflicts':>9} {'gave up':>7} {'p50 ms':>8} {'p95 ms':>8}   rounds commands/s",
        flush=True,
    )
    cells: list[CommandCell] = []
    every_round: dict[tuple[str, str], list[CommandCell]] = {}
    for layout in LAYOUTS:
        samples: dict[str, list[CommandCell]] = {i: [] for i in IMPLEMENTATIONS}
        for round_ in range(rounds):
            shift = round_ % len(IMPLEMENTATIONS)
            for implementation in IMPLEMENTATIONS[shift:] + IMPLEMENTATIONS[:shift]:
                with psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute("CHECKPOINT")
                samples[implementation].append(
                    measure_commands(dsn, implementation, layout, writers, warmup, duration)
                )
        for implementation in IMPLEMENTATIONS:
            rounds_ = samples[implementation]
            every_round[(implementation, layout)] = rounds_
            cell = sorted(rounds_, key=lambda c: c.commands_per_second)[len(rounds_) // 2]
            cells.append(cell)
            spread = " ".join(f"{c.commands_per_second:.0f}" for c in rounds_)
            print(
                f"{layout:>11} {implementation:>14} {cell.commands_per_second:>10.0f} "
                f"{cell.commands:>8} {cell.conflicts:>9} {cell.gave_up:>7} {cell.p50_ms:>8.2f} "
                f"{cell.p95_ms:>8.2f}"
                f"   {spread}",
                flush=True,
            )
    return cells, every_round


def command_ratios(
    cells: list[CommandCell], every_round: dict[tuple[str, str], list[CommandCell]]
) -> list[dict[str, Any]]:
    by_key = {(c.implementation, c.layout): c for c in cells}
    rows = []
    print(f"\n{'layout':>11} {'toolkit/eventsourcing':>22}   rounds (pairs)")
    for layout in LAYOUTS:
        ours, theirs = by_key[("toolkit", layout)], by_key[("eventsourcing", layout)]
        pairs = [
            a.commands_per_second / b.commands_per_second
            for a, b in zip(
                every_round[("toolkit", layout)],
                every_round[("eventsourcing", layout)],
                strict=True,
            )
        ]
        ratio = ours.commands_per_second / theirs.commands_per_second
        rows.append({"layout": layout, "toolkit_vs_eventsourcing": ratio, "rounds": pairs})
        print(f"{layout:>11} {ratio:>22.2f}   " + " ".join(f"{r:.2f}" for r in pairs))
    return rows


# -- where the time goes --------------------------------------------------------------


def print_profile(profile: cProfile.Profile, title: str, sort: str, limit: int = 25) -> None:
    out = io.StringIO()
    pstats.Stats(profile, stream=out).strip_dirs().sort_stats(sort).print_stats(limit)
    print(f"\n--- profile: {title} (sorted by {sort}) ---")
    print(out.getvalue().strip())


def profile_loads(dsn: str, account_id: str, size: int, loads: int) -> None:
    """cProfile of ``loads`` loads of the account with snapshots, and of one
    without."""
    store = EventStore.connect(dsn, min_size=1, max_size=1)
    try:
        with_snapshots = Repository(store, BenchAccount)
        with_snapshots.load(account_id)
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(loads):
            with_snapshots.load(account_id)
        profile.disable()
        print_profile(profile, f"{loads} loads of {size:,} events with snapshots", "cumulative")
        without = Repository(store, BenchAccount, snapshots=False)
        profile = cProfile.Profile()
        profile.enable()
        without.load(account_id)
        profile.disable()
        print_profile(profile, f"1 load of {size:,} events without snapshots", "tottime")
    finally:
        store.close()


def profile_commands(dsn: str, seconds: float) -> None:
    """cProfile of one uncontended writer in this process, toolkit then
    library, ``seconds`` each."""
    store = EventStore.connect(dsn, min_size=1, max_size=1)
    app = library_app(dsn)
    try:
        for implementation, run_one in (
            ("toolkit", toolkit_runner(store, toolkit_account(dsn, "profile"))),
            ("eventsourcing", library_runner(app, library_account(app))),
        ):
            run_one()
            profile = cProfile.Profile()
            profile.enable()
            commands, _, _, _ = command_loop(run_one, 0.0, seconds)
            profile.disable()
            title = f"{implementation}: {commands} uncontended commands in {seconds:g} s, 1 writer"
            print_profile(profile, title, "cumulative")
            print_profile(profile, title, "tottime", limit=15)
    finally:
        store.close()
        app.close()


# -- verdicts -------------------------------------------------------------------------


def verdicts(
    load_cells: list[LoadCell], sizes: tuple[int, ...], command_rows: list[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    size = TARGET_SIZE if TARGET_SIZE in sizes else max(sizes)
    note = "" if size == TARGET_SIZE else f" (a quick run: {size:,} events, not {TARGET_SIZE:,})"
    with_ = load_cell(load_cells, "toolkit", size, True)
    without = load_cell(load_cells, "toolkit", size, False)
    uncontended = next(r for r in command_rows if r["layout"] == "uncontended")
    results = {
        "load_p95": {
            "events": size,
            "value": with_.p95_ms,
            "target": f"< {LOAD_P95_TARGET_MS:g} ms",
            "pass": with_.p95_ms < LOAD_P95_TARGET_MS,
        },
        "load_ratio": {
            "events": size,
            "value": without.p50_ms / with_.p50_ms,
            "target": f">= {LOAD_RATIO_TARGET:g}x",
            "pass": without.p50_ms / with_.p50_ms >= LOAD_RATIO_TARGET,
        },
        "uncontended_vs_eventsourcing": {
            "value": uncontended["toolkit_vs_eventsourcing"],
            "target": f">= {COMMANDS_RATIO_TARGET:g}x",
            "pass": uncontended["toolkit_vs_eventsourcing"] >= COMMANDS_RATIO_TARGET,
        },
    }
    print()
    print(
        f"load of {size:,} events with snapshots, p95: {with_.p95_ms:.2f} ms "
        f"(target < {LOAD_P95_TARGET_MS:g} ms): {'PASS' if results['load_p95']['pass'] else 'MISS'}"
        + note
    )
    print(
        f"load of {size:,} events without/with snapshots, p50: "
        f"{results['load_ratio']['value']:.1f}x (target >= {LOAD_RATIO_TARGET:g}x): "
        f"{'PASS' if results['load_ratio']['pass'] else 'MISS'}" + note
    )
    print(
        "uncontended commands/s, toolkit/eventsourcing: "
        f"{uncontended['toolkit_vs_eventsourcing']:.2f}x "
        f"(target >= {COMMANDS_RATIO_TARGET:g}x): "
        f"{'PASS' if results['uncontended_vs_eventsourcing']['pass'] else 'MISS'}"
    )
    return results


def prepare(dsn: str) -> None:
    from aura_pg import migrate  # here: alembic is slow to import

    migrate.upgrade(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table in LIBRARY_TABLES:
            conn.execute(f"DROP TABLE IF EXISTS {table}")
    app = EsBank(env={**library_env(dsn), "CREATE_TABLE": "y"})  # the library's tables
    app.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--dsn", help="benchmark this database instead of a throw-away cluster")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small run of seconds: sizes 10 and 1,000, 2 writers, short windows, 1 round "
        "(explicit options still win)",
    )
    parser.add_argument("--sizes", type=int, nargs="+", help=f"events per account {SIZES}")
    parser.add_argument("--loads", type=int, help="timed loads per variant at most (200)")
    parser.add_argument(
        "--load-budget", type=float, help="seconds of loading per variant at most (20)"
    )
    parser.add_argument("--writers", type=int, help="writer processes (8)")
    parser.add_argument("--duration", type=float, help="seconds counted per command cell (5)")
    parser.add_argument("--warmup", type=float, help="seconds not counted before them (1)")
    parser.add_argument("--rounds", type=int, help="rounds of the command cells (3)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print the cProfiles of loads and commands even when the targets are met",
    )
    parser.add_argument(
        "--commit", choices=["durable", "async"], default="durable", help="throw-away cluster"
    )
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args(argv)
    quick = args.quick
    sizes = tuple(args.sizes or (QUICK_SIZES if quick else SIZES))
    if min(sizes) < 2:
        parser.error("--sizes: at least 2 events (the opening and a command)")
    loads = args.loads or (10 if quick else 200)
    load_budget = args.load_budget or (1.0 if quick else 20.0)
    writers = args.writers or (2 if quick else 8)
    duration = args.duration or (0.5 if quick else 5.0)
    warmup = args.warmup if args.warmup is not None else (0.2 if quick else 1.0)
    rounds = args.rounds or (1 if quick else 3)

    with contextlib.ExitStack() as stack:
        dsn = args.dsn
        if dsn is None:
            dsn = stack.enter_context(temporary_cluster(benchmark_settings(args.commit))).dsn()
        with psycopg.connect(dsn) as conn:
            settings = {
                name: (conn.execute(f"SHOW {name}").fetchone() or ("?",))[0]
                for name in ("fsync", "synchronous_commit", "server_version")
            }
        print(
            "server: " + " ".join(f"{k}={v}" for k, v in settings.items()) + f"; snapshots every "
            f"{SNAPSHOT_EVERY} events; sizes {', '.join(f'{s:,}' for s in sizes)}; "
            f"{writers} writers, {rounds} rounds of {duration:g} s",
            flush=True,
        )
        prepare(dsn)
        load_cells, accounts = measure_loads(dsn, sizes, loads, load_budget)
        load_rows = print_loads(load_cells, sizes)
        command_cells, every_round = run_commands(dsn, writers, warmup, duration, rounds)
        rows = command_ratios(command_cells, every_round)
        results = verdicts(load_cells, sizes, rows)
        biggest = max(sizes)
        if args.profile or not (results["load_p95"]["pass"] and results["load_ratio"]["pass"]):
            profile_loads(dsn, accounts[biggest][0], biggest, 50 if not quick else 5)
        if args.profile or not results["uncontended_vs_eventsourcing"]["pass"]:
            profile_commands(dsn, 1.0 if quick else 5.0)

    if args.json:
        figures = {
            "settings": settings,
            "sizes": list(sizes),
            "writers": writers,
            "duration": duration,
            "rounds": rounds,
            "loads": [asdict(c) for c in load_cells],
            "load_ratios": load_rows,
            "commands": [asdict(c) for c in command_cells],
            "command_rounds": {
                f"{i}/{layout}": [asdict(c) for c in cells]
                for (i, layout), cells in every_round.items()
            },
            "command_ratios": rows,
            "targets": results,
        }
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
