"""Worker processes that run aggregate commands through a ``Repository``,
for tests that race them and kill them (tests/acceptance/test_aggregate_processes.py).

    python -m tests.helpers.aggregate_workers race DSN KIND MODE SEED COUNT GATE AGG...
    python -m tests.helpers.aggregate_workers once DSN STYLE AGG REQUEST AMOUNT APP

``race``: builds a repository of ``KIND`` (``account`` or ``snapshotted``),
creates the file ``GATE.ready.<pid>`` and waits for the file ``GATE`` (so
that every worker starts at once), then runs COUNT commands on aggregates
drawn from AGG: withdrawals of 3 (MODE ``withdraw``) or deposits and
withdrawals of 1-9 (MODE ``mixed``). One JSON line per command: what it
was, whether it went through (the event id and version it was told) or
was refused (the code, and the state the refusing run saw), and the
conflicts it retried.

``once``: deposits AMOUNT into account AGG as request REQUEST, either as a
command that only keys its event with the request (STYLE ``key``: a resend
is a recorded duplicate) or one that also looks for the request in the
state (STYLE ``state``: a resend finds it applied and returns nothing). Its
connections are named APP. Prints the ``CommandResult`` as one JSON line.

The aggregates are defined here, imported by the tests from this module:
the ``__main__`` block runs ``main`` of ``tests.helpers.aggregate_workers``
so that both sides file snapshots under the same type name.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

from aura_pg import AppendRetry, EventStore, NewEvent
from aura_pg.aggregates import (
    Aggregate,
    CommandResult,
    DomainError,
    Event,
    EventRegistry,
    Repository,
    RetryPolicy,
    applies,
)

EVENTS = EventRegistry()
# Conflicts: generous enough that no racing command runs out of attempts.
# Transient failures: resent quickly, for as long as a test waits.
RETRY = RetryPolicy(
    max_attempts=1000,
    base_delay=0.001,
    max_delay=0.02,
    append_retry=AppendRetry(attempts=50, base_delay=0.05, max_delay=0.2, budget=30.0),
)
WITHDRAWAL = 3


@EVENTS.register
class Opened(Event):
    TYPE: ClassVar[str] = "ACCT_OPENED"
    owner: str


@EVENTS.register
class Deposited(Event):
    TYPE: ClassVar[str] = "ACCT_DEPOSITED"
    amount: int
    request: str | None = None


@EVENTS.register
class Withdrawn(Event):
    TYPE: ClassVar[str] = "ACCT_WITHDRAWN"
    amount: int


class Account(Aggregate):
    """An account whose balance never goes below 0."""

    events = EVENTS
    stream_prefix = "acct"

    def __init__(self, aggregate_id: str) -> None:
        super().__init__(aggregate_id)
        self.owner: str | None = None
        self.balance = 0
        self.movements = 0
        self.requests: set[str] = set()

    @applies(Opened)
    def _opened(self, event: Opened) -> None:
        self.owner = event.owner

    @applies(Deposited)
    def _deposited(self, event: Deposited) -> None:
        self.balance += event.amount
        self.movements += 1
        if event.request is not None:
            self.requests.add(event.request)

    @applies(Withdrawn)
    def _withdrawn(self, event: Withdrawn) -> None:
        self.balance -= event.amount
        self.movements += 1

    def open(self, owner: str) -> list[NewEvent]:
        if self.owner is not None:
            raise DomainError(f"account {self.id} is open already", code="already_open")
        return [self.new_event(Opened(owner=owner))]

    def deposit(self, amount: int, *, request: str | None = None) -> list[NewEvent]:
        """A deposit keyed by ``request`` only: a resend is a duplicate."""
        self._require_open()
        return [self.new_event(Deposited(amount=amount, request=request), key=request)]

    def deposit_once(self, amount: int, *, request: str) -> list[NewEvent]:
        """A deposit that also checks the state: nothing if already applied."""
        self._require_open()
        if request in self.requests:
            return []
        return self.deposit(amount, request=request)

    def withdraw(self, amount: int) -> list[NewEvent]:
        self._require_open()
        if self.balance < amount:
            raise DomainError(
                f"account {self.id} holds {self.balance} < {amount}", code="overdrawn"
            )
        return [self.new_event(Withdrawn(amount=amount))]

    def _require_open(self) -> None:
        if self.owner is None:
            raise DomainError(f"account {self.id} is not open", code="not_open")

    def state(self) -> dict[str, Any]:
        """Everything the events say, comparable across loads."""
        return {
            "owner": self.owner,
            "balance": self.balance,
            "movements": self.movements,
            "requests": sorted(self.requests),
        }


class SnapshottedAccount(Account):
    stream_prefix = "sacct"
    snapshot_every = 5
    snapshot_version = 1

    def snapshot_state(self) -> dict[str, Any]:
        return self.state()

    @classmethod
    def restore_snapshot(
        cls, aggregate_id: str, version: int, state: dict[str, Any]
    ) -> SnapshottedAccount:
        account = cls(aggregate_id)
        account.owner, account.balance = state["owner"], state["balance"]
        account.movements, account.requests = state["movements"], set(state["requests"])
        account.version = version
        return account


KINDS: dict[str, type[Account]] = {"account": Account, "snapshotted": SnapshottedAccount}


def _wait_for(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.005)


def race(
    dsn: str, kind: str, mode: str, seed: int, count: int, gate: Path, aggregates: list[str]
) -> None:
    rng = random.Random(seed)
    with EventStore.connect(dsn, min_size=1, max_size=2) as store:
        accounts = Repository(store, KINDS[kind], retry=RETRY)
        accounts.load(aggregates[0])  # connected and warm before the start
        gate.with_name(f"{gate.name}.ready.{seed}").touch()
        _wait_for(gate)
        for _ in range(count):
            aggregate_id = rng.choice(aggregates)
            if mode == "withdraw":
                op, amount = "withdraw", WITHDRAWAL
            else:
                op, amount = rng.choice(("deposit", "withdraw", "withdraw")), rng.randint(1, 9)
            seen: dict[str, int] = {}

            def command(account: Account, op: str = op, amount: int = amount) -> list[NewEvent]:
                seen["version"], seen["balance"] = account.version, account.balance
                return account.deposit(amount) if op == "deposit" else account.withdraw(amount)

            line: dict[str, Any] = {"aggregate": aggregate_id, "op": op, "amount": amount}
            try:
                result = accounts.execute(aggregate_id, command)
            except DomainError as exc:
                line.update(ok=False, code=exc.code, seen=seen)
            else:
                assert len(result.events) == 1 and not result.duplicate, result
                line.update(
                    ok=True,
                    event_id=str(result.events[0].event_id),
                    version=result.version,
                    conflicts=result.conflicts,
                )
            print(json.dumps(line), flush=True)


def once(dsn: str, style: str, aggregate_id: str, request: str, amount: int, app: str) -> None:
    with EventStore.connect(dsn, min_size=1, max_size=1, kwargs={"application_name": app}) as store:
        accounts = Repository(store, Account, retry=RETRY)
        if style == "key":
            result = accounts.execute(aggregate_id, lambda a: a.deposit(amount, request=request))
        else:
            result = accounts.execute(
                aggregate_id, lambda a: a.deposit_once(amount, request=request)
            )
        print(json.dumps(describe(result)), flush=True)


def describe(result: CommandResult) -> dict[str, Any]:
    return {
        "event_ids": [str(event.event_id) for event in result.events],
        "version": result.version,
        "duplicate": result.duplicate,
        "appended": result.appended,
        "conflicts": result.conflicts,
    }


def main(argv: list[str]) -> None:
    if argv[0] == "race":
        dsn, kind, mode, seed, count, gate, *aggregates = argv[1:]
        race(dsn, kind, mode, int(seed), int(count), Path(gate), aggregates)
    elif argv[0] == "once":
        dsn, style, aggregate_id, request, amount, app = argv[1:]
        once(dsn, style, aggregate_id, request, int(amount), app)
    else:
        raise SystemExit(f"unknown worker {argv[0]!r}")


if __name__ == "__main__":
    # This module's own classes, not __main__'s: snapshots are filed under
    # the class's module and name.
    from tests.helpers.aggregate_workers import main as imported_main

    imported_main(sys.argv[1:])
