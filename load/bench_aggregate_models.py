"""The aggregates load/bench_aggregates.py measures: one bank account, written
once on the aggregate toolkit (``BenchAccount``) and once on the
eventsourcing library (``EsAccount`` in ``EsBank``), with the same events,
the same state and snapshots every 100 events.

They live in a module of their own (imported as ``bench_aggregate_models``
by the benchmark and by its writer processes) so that the names snapshots
and the library's topics are filed under are the same in every process,
``__main__`` or not.
"""

from __future__ import annotations

from typing import Any, ClassVar
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.domain import Aggregate as EsAggregate
from eventsourcing.domain import event

from aura_pg import NewEvent
from aura_pg.aggregates import Aggregate, DomainError, Event, EventRegistry, applies

SNAPSHOT_EVERY = 100
REFERENCE = "r" * 40  # some payload besides the amount, as a real command carries

EVENTS = EventRegistry()


@EVENTS.register
class Opened(Event):
    TYPE: ClassVar[str] = "BENCH_ACCOUNT_OPENED"
    owner: str


@EVENTS.register
class Deposited(Event):
    TYPE: ClassVar[str] = "BENCH_ACCOUNT_DEPOSITED"
    amount: int
    reference: str


class BenchAccount(Aggregate):
    """An account on the toolkit: opened once, then deposits."""

    events = EVENTS
    stream_prefix = "benchaccount"
    snapshot_every = SNAPSHOT_EVERY
    snapshot_version = 1

    def __init__(self, aggregate_id: str) -> None:
        super().__init__(aggregate_id)
        self.owner: str | None = None
        self.balance = 0
        self.movements = 0

    @applies(Opened)
    def _opened(self, e: Opened) -> None:
        self.owner = e.owner

    @applies(Deposited)
    def _deposited(self, e: Deposited) -> None:
        self.balance += e.amount
        self.movements += 1

    def open(self, owner: str) -> list[NewEvent]:
        if self.owner is not None:
            raise DomainError(f"account {self.id} is open already", code="already_open")
        return [self.new_event(Opened(owner=owner))]

    def deposit(self, amount: int) -> list[NewEvent]:
        if self.owner is None:
            raise DomainError(f"account {self.id} is not open", code="not_open")
        return [self.new_event(Deposited(amount=amount, reference=REFERENCE))]

    def snapshot_state(self) -> dict[str, Any]:
        return {"owner": self.owner, "balance": self.balance, "movements": self.movements}

    @classmethod
    def restore_snapshot(
        cls, aggregate_id: str, version: int, state: dict[str, Any]
    ) -> BenchAccount:
        account = cls(aggregate_id)
        account.owner = state["owner"]
        account.balance = state["balance"]
        account.movements = state["movements"]
        account.version = version
        return account


class EsAccount(EsAggregate):
    """The same account on the eventsourcing library."""

    @event("Opened")
    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.balance = 0
        self.movements = 0

    @event("Deposited")
    def deposit(self, amount: int, reference: str = REFERENCE) -> None:
        if self.owner is None:
            raise ValueError("not open")
        self.balance += amount
        self.movements += 1


class EsBank(Application[UUID]):
    """The library's application: snapshots every 100 events (on save),
    read back by its repository; no aggregate cache (the library's
    default), as the toolkit's repository has none."""

    name = "BenchAggregates"  # tables benchaggregates_events, benchaggregates_snapshots
    snapshotting_intervals = {EsAccount: SNAPSHOT_EVERY}  # noqa: RUF012 (the library's ClassVar)
