"""Aggregates and repositories across real processes, real connections and
real kills: worker processes (tests/helpers/aggregate_workers.py) race
commands on the same accounts, are killed -9 with a commit in flight, and
lose their connection (cut by a proxy, or terminated by the server) while
the server commits.

Everything is checked against the log itself: each stream folded event by
event (every prefix keeps the invariant, versions have no gap), every
effect a worker was told of recorded exactly once where it was told, and
nothing recorded that no worker was told of.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from aura_pg import EventStore
from aura_pg.aggregates import Repository
from aura_pg.chaos.proxy import LatencyProxy
from tests.helpers.aggregate_workers import WITHDRAWAL, Account, SnapshottedAccount
from tests.helpers.daemons import ROOT
from tests.helpers.projections import query

WORKER = (sys.executable, "-m", "tests.helpers.aggregate_workers")
HOLD_KEY = 4242
# aura.append_events serialises the appends to a stream with an advisory
# lock of this class (sql/functions/append_events.sql).
STREAM_LOCK_CLASS = 1635087475
WAITING_FOR_ADVISORY_LOCK = (
    "SELECT a.pid FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid"
    " WHERE a.application_name = %s AND l.locktype = 'advisory' AND NOT l.granted"
)
# The first ACCT_DEPOSITED row of the database makes its transaction wait,
# at COMMIT (a deferred constraint trigger fires while the commit is under
# way), for an advisory lock the test holds: the append's statement is done
# and its COMMIT requested, but not yet durable. Released, the commit goes
# through whether or not the client is still there; terminated, it rolls
# back. A sequence (never rolled back) lets only that first one wait.
HOLD_FIRST_COMMIT = (
    "CREATE SEQUENCE public.held_commits",
    f"""CREATE FUNCTION public.hold_first_commit() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF nextval('public.held_commits') = 1 THEN
            PERFORM pg_advisory_xact_lock({HOLD_KEY});
        END IF;
        RETURN NULL;
    END $$""",
    "CREATE CONSTRAINT TRIGGER hold_first_commit AFTER INSERT ON aura.events"
    " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.type = 'ACCT_DEPOSITED')"
    " EXECUTE FUNCTION public.hold_first_commit()",
)
# Every snapshot actually written (insert, or an update that replaced an
# older one), in order.
LOG_SNAPSHOT_WRITES = (
    "CREATE TABLE public.snapshot_writes (seq bigserial PRIMARY KEY, stream_id text NOT NULL,"
    " version bigint NOT NULL, state jsonb NOT NULL)",
    """CREATE FUNCTION public.log_snapshot() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO public.snapshot_writes (stream_id, version, state)
        VALUES (NEW.stream_id, NEW.version, NEW.state);
        RETURN NULL;
    END $$""",
    "CREATE TRIGGER log_snapshot AFTER INSERT OR UPDATE ON aura.snapshots"
    " FOR EACH ROW EXECUTE FUNCTION public.log_snapshot()",
)


class Workers:
    """Starts worker processes; every one is killed and reaped at the end.
    Their stderr stays in the test's directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[subprocess.Popen[str]] = []

    def start(self, *args: str) -> subprocess.Popen[str]:
        log = self.directory / f"worker-{len(self.started)}.err"
        with log.open("w") as err:
            process = subprocess.Popen(
                [*WORKER, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True
            )
        self.started.append(process)
        return process

    def stderr(self, process: subprocess.Popen[str]) -> str:
        return (self.directory / f"worker-{self.started.index(process)}.err").read_text()

    def lines(self, process: subprocess.Popen[str], timeout: float = 60) -> list[dict[str, Any]]:
        """The JSON lines a worker printed, once it exited 0."""
        out, _ = process.communicate(timeout=timeout)
        assert process.returncode == 0, self.stderr(process)
        return [json.loads(line) for line in out.splitlines()]

    def close(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.kill()
            process.communicate(timeout=30)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    made = Workers(tmp_path)
    try:
        yield made
    finally:
        made.close()


def wait_until(check: Callable[[], Any], what: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)
    return found


# -- racing -----------------------------------------------------------------------


def race(
    dsn: str,
    workers: Workers,
    gate: Path,
    *,
    kind: str,
    mode: str,
    processes: int,
    commands: int,
    aggregates: list[str],
) -> list[dict[str, Any]]:
    """Start ``processes`` race workers, let them all go at once, and return
    every command's report."""
    started = [
        workers.start("race", dsn, kind, mode, str(seed), str(commands), str(gate), *aggregates)
        for seed in range(processes)
    ]

    def all_ready() -> bool:
        for process in started:
            assert process.poll() is None, workers.stderr(process)
        return len(list(gate.parent.glob(f"{gate.name}.ready.*"))) == processes

    wait_until(all_ready, "every worker is connected", timeout=30)
    gate.touch()
    reports = [line for process in started for line in workers.lines(process)]
    assert len(reports) == processes * commands
    return reports


def open_account(store: EventStore, kind: type[Account], aggregate_id: str, balance: int) -> None:
    accounts = Repository(store, kind)
    accounts.execute(aggregate_id, lambda a: a.open("ada"))
    accounts.execute(aggregate_id, lambda a: a.deposit(balance))


TYPES = {"deposit": "ACCT_DEPOSITED", "withdraw": "ACCT_WITHDRAWN"}


def check_stream(
    store: EventStore,
    kind: type[Account],
    aggregate_id: str,
    opening: int,
    reports: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """Check one account's log against the reports of the commands on it;
    return its state after every version (the index)."""
    events = store.read_stream(kind.stream_id(aggregate_id))
    assert [e.version for e in events] == list(range(1, len(events) + 1))
    account = kind(aggregate_id)
    states = [account.state()]
    for event in events:
        account.apply(event)
        assert account.balance >= 0, f"v{event.version} took the balance below 0"
        states.append(account.state())
    # The two opening events, then exactly the commands reported as done,
    # each where its worker was told.
    assert states[2]["balance"] == opening and states[2]["movements"] == 1
    done = [r for r in reports if r["ok"]]
    recorded = {str(e.event_id): (e.version, e.type, e.data["amount"]) for e in events[2:]}
    told = {r["event_id"]: (r["version"], TYPES[r["op"]], r["amount"]) for r in done}
    assert recorded == told
    deposited = sum(r["amount"] for r in done if r["op"] == "deposit")
    withdrawn = sum(r["amount"] for r in done if r["op"] == "withdraw")
    assert account.balance == opening + deposited - withdrawn
    assert account.movements == 1 + len(done)
    # Every refusal was right: the state its last run saw is one the log
    # went through, and it did not hold the amount.
    for refusal in (r for r in reports if not r["ok"]):
        assert refusal["code"] == "overdrawn"
        assert states[refusal["seen"]["version"]]["balance"] == refusal["seen"]["balance"]
        assert refusal["seen"]["balance"] < refusal["amount"]
    loaded = Repository(store, kind, snapshots=False).load(aggregate_id)
    assert (loaded.version, loaded.state()) == (account.version, account.state())
    return states


def test_racing_processes_on_one_account_lose_no_update_and_refuse_exactly_the_overdraft(
    aura_dsn: str, event_store: EventStore, workers: Workers, tmp_path: Path
) -> None:
    opening, processes, commands = 150, 6, 12
    open_account(event_store, Account, "one", opening)
    reports = race(
        aura_dsn,
        workers,
        tmp_path / "go",
        kind="account",
        mode="withdraw",
        processes=processes,
        commands=commands,
        aggregates=["one"],
    )
    states = check_stream(event_store, Account, "one", opening, reports)
    done = [r for r in reports if r["ok"]]
    refused = [r for r in reports if not r["ok"]]
    # 72 withdrawals of 3 from 150: exactly 50 go through, 22 are refused,
    # and the account ends empty.
    assert len(done) == opening // WITHDRAWAL == 50
    assert len(refused) == processes * commands - 50
    assert states[-1]["balance"] == 0 and len(states) - 1 == 2 + 50
    conflicts = sum(r["conflicts"] for r in done)
    assert conflicts > 0, "the processes never raced"
    print(
        f"one account, {processes} processes: 50 done, {len(refused)} refused, "
        f"{conflicts} conflicts retried"
    )


def test_racing_processes_on_a_few_accounts_lose_no_update(
    aura_dsn: str, event_store: EventStore, workers: Workers, tmp_path: Path
) -> None:
    names, opening = ["a", "b", "c"], 20
    for name in names:
        open_account(event_store, Account, name, opening)
    reports = race(
        aura_dsn,
        workers,
        tmp_path / "go",
        kind="account",
        mode="mixed",
        processes=5,
        commands=40,
        aggregates=names,
    )
    for name in names:
        check_stream(
            event_store, Account, name, opening, [r for r in reports if r["aggregate"] == name]
        )
    done = [r for r in reports if r["ok"]]
    refused = len(reports) - len(done)
    conflicts = sum(r["conflicts"] for r in done)
    assert conflicts > 0, "the processes never raced"
    assert refused > 0, "no withdrawal was ever refused: the invariant was never tested"
    print(
        f"3 accounts, 5 processes: {len(done)} done, {refused} refused, "
        f"{conflicts} conflicts retried"
    )


# -- snapshots --------------------------------------------------------------------


def test_snapshots_written_by_racing_processes_match_the_log(
    aura_dsn: str, event_store: EventStore, workers: Workers, tmp_path: Path
) -> None:
    for statement in LOG_SNAPSHOT_WRITES:
        query(aura_dsn, statement)
    names, opening = ["s1", "s2"], 30
    for name in names:
        open_account(event_store, SnapshottedAccount, name, opening)
    reports = race(
        aura_dsn,
        workers,
        tmp_path / "go",
        kind="snapshotted",
        mode="mixed",
        processes=5,
        commands=30,
        aggregates=names,
    )
    with_snapshots = Repository(event_store, SnapshottedAccount)
    without = Repository(event_store, SnapshottedAccount, snapshots=False)
    exact_multiples = 0
    for name in names:
        stream = SnapshottedAccount.stream_id(name)
        states = check_stream(
            event_store,
            SnapshottedAccount,
            name,
            opening,
            [r for r in reports if r["aggregate"] == name],
        )
        head = len(states) - 1
        # The load from the snapshot is the full fold, whatever the races.
        loaded, folded = with_snapshots.load(name), without.load(name)
        assert (loaded.version, loaded.state()) == (folded.version, folded.state())
        assert folded.version == head
        # Every snapshot ever written is the log's state at its version,
        # and a newer one only ever replaced an older one.
        writes = query(
            aura_dsn,
            "SELECT version, state FROM public.snapshot_writes WHERE stream_id = %s ORDER BY seq",
            (stream,),
        )
        versions = [version for version, _ in writes]
        assert versions == sorted(set(versions)) and versions[0] >= 5
        for version, state in writes:
            assert state == states[version], f"the snapshot at v{version} is not the log's state"
        exact_multiples += sum(version % 5 == 0 for version in versions)
        # The stored one: this class, its shape, taken at or after the last
        # multiple of 5 the stream went past (by the command that did).
        (row,) = query(
            aura_dsn,
            "SELECT aggregate_type, schema_version, version, state FROM aura.snapshots"
            " WHERE stream_id = %s",
            (stream,),
        )
        assert row[:2] == (SnapshottedAccount.type_name(), 1)
        assert head - head % 5 <= row[2] <= head and row[2] == versions[-1]
        assert row[3] == states[row[2]]
        print(f"{stream}: v{head}, snapshots written at {versions}")
    assert exact_multiples > 0


# -- connections lost and processes killed at commit --------------------------------


class CommitHold:
    """Holds the advisory lock that the first ACCT_DEPOSITED commit of the
    database waits for (HOLD_FIRST_COMMIT)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        for statement in HOLD_FIRST_COMMIT:
            query(dsn, statement)
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.conn.execute("SELECT pg_advisory_lock(%s)", (HOLD_KEY,))

    def held_backend(self, app: str) -> int:
        """The pid of the session named ``app`` that waits at its commit."""
        rows = wait_until(
            lambda: query(
                self.dsn,
                WAITING_FOR_ADVISORY_LOCK
                + " AND l.classid = 0 AND l.objid = %s AND l.objsubid = 1",
                (app, HOLD_KEY),
            ),
            f"a session of {app} waits at its commit",
        )
        assert len(rows) == 1
        return int(rows[0][0])

    def release(self) -> None:
        self.conn.execute("SELECT pg_advisory_unlock(%s)", (HOLD_KEY,))

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def hold(aura_dsn: str) -> Iterator[Callable[[], CommitHold]]:
    made: list[CommitHold] = []

    def make() -> CommitHold:
        made.append(CommitHold(aura_dsn))
        return made[-1]

    try:
        yield make
    finally:
        for each in made:
            each.close()


def terminate(dsn: str, pid: int) -> None:
    assert query(dsn, "SELECT pg_terminate_backend(%s)", (pid,)) == [(True,)]


def wait_gone(dsn: str, pid: int) -> None:
    wait_until(
        lambda: not query(dsn, "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)),
        f"backend {pid} is gone",
    )


def deposits_of(dsn: str, request: str) -> list[Any]:
    return query(
        dsn,
        "SELECT event_id, version FROM aura.events"
        " WHERE type = 'ACCT_DEPOSITED' AND data->>'request' = %s",
        (request,),
    )


def check_one_effect(store: EventStore, dsn: str, request: str, amount: int) -> None:
    """The deposit of ``request`` is in the log exactly once, and counted once."""
    assert len(deposits_of(dsn, request)) == 1
    account = Repository(store, Account).load("k")
    assert (account.version, account.balance, sorted(account.requests)) == (
        3,
        5 + amount,
        [request],
    )


@pytest.mark.parametrize("committed", [True, False], ids=["committed", "rolled-back"])
def test_a_resend_after_the_connection_is_lost_at_commit_records_one_effect(
    aura_dsn: str,
    event_store: EventStore,
    workers: Workers,
    hold: Callable[[], CommitHold],
    committed: bool,
) -> None:
    """A worker's append waits at its commit. Committed: a proxy cuts the
    connection, the store resends while the commit still waits, then the
    commit goes through; the resend finds the batch recorded (a
    duplicate). Rolled back: the server terminates the session (the commit
    never happens); the resend records the batch."""
    open_account(event_store, Account, "k", 5)
    held = hold()
    app = "aura-pg agg resend"
    with LatencyProxy.in_front_of(aura_dsn) as proxy:
        dsn = proxy.dsn(aura_dsn) if committed else aura_dsn
        worker = workers.start("once", dsn, "key", "k", "req-1", "10", app)
        pid = held.held_backend(app)
        if committed:
            assert proxy.sever() == 1
            # The resend has come, and waits for the stream the held commit
            # still locks.
            wait_until(
                lambda: query(
                    aura_dsn,
                    WAITING_FOR_ADVISORY_LOCK + " AND l.classid = %s AND a.pid <> %s",
                    (app, STREAM_LOCK_CLASS, pid),
                ),
                "the resend waits behind the held commit",
            )
            held.release()
        else:
            terminate(aura_dsn, pid)
        (result,) = workers.lines(worker)
    wait_gone(aura_dsn, pid)
    assert "attempt 1 failed" in workers.stderr(worker)
    assert result["duplicate"] is committed
    assert result["appended"] == (0 if committed else 1)
    ((event_id, version),) = deposits_of(aura_dsn, "req-1")
    # The resent batch is the very same: the same event id either way.
    assert result["event_ids"] == [str(event_id)] and result["version"] == version == 3
    check_one_effect(event_store, aura_dsn, "req-1", 10)


@pytest.mark.parametrize("style", ["key", "state"])
@pytest.mark.parametrize("committed", [True, False], ids=["committed", "rolled-back"])
def test_a_new_process_rerunning_a_killed_command_records_one_effect(
    aura_dsn: str,
    event_store: EventStore,
    workers: Workers,
    hold: Callable[[], CommitHold],
    committed: bool,
    style: str,
) -> None:
    """A worker is killed -9 while its append waits at its commit: its
    outcome is unknown to it. The commit then goes through (committed) or
    the server's session is terminated (rolled back). A new process runs
    the same command with the same request: one effect either way."""
    open_account(event_store, Account, "k", 5)
    held = hold()
    first = workers.start("once", aura_dsn, style, "k", "req-1", "10", "aura-pg agg first")
    pid = held.held_backend("aura-pg agg first")
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    assert first.returncode == -signal.SIGKILL
    assert deposits_of(aura_dsn, "req-1") == []  # not committed yet
    if committed:
        held.release()
    else:
        terminate(aura_dsn, pid)
    wait_gone(aura_dsn, pid)
    assert len(deposits_of(aura_dsn, "req-1")) == (1 if committed else 0)

    second = workers.start("once", aura_dsn, style, "k", "req-1", "10", "aura-pg agg second")
    (result,) = workers.lines(second)
    if not committed:
        assert (result["duplicate"], result["appended"], result["version"]) == (False, 1, 3)
    elif style == "key":  # the store recognises the request's key
        assert (result["duplicate"], result["appended"], result["version"]) == (True, 0, 3)
    else:  # the command finds the request applied and returns nothing
        assert (result["event_ids"], result["duplicate"], result["version"]) == ([], False, 3)
    check_one_effect(event_store, aura_dsn, "req-1", 10)
