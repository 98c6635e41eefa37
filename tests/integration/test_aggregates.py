"""The aggregate toolkit against a real Postgres: an account aggregate of
the tests' own, folded, commanded, raced and snapshotted."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Any, ClassVar

import psycopg
import pytest
from psycopg.types.json import Jsonb

from aura_pg import AsyncEventStore, EventStore, NewEvent
from aura_pg.aggregates import (
    Aggregate,
    AsyncRepository,
    DomainError,
    Event,
    EventRegistry,
    Repository,
    RetryPolicy,
    applies,
)
from aura_pg.errors import EventValidationError
from tests.helpers.projections import query

ACCOUNT_EVENTS = EventRegistry()


@ACCOUNT_EVENTS.register
class Opened(Event):
    TYPE: ClassVar[str] = "ACCOUNT_OPENED"
    VERSION: ClassVar[int] = 2
    owner: str
    limit: int


@ACCOUNT_EVENTS.upcaster("ACCOUNT_OPENED", 1)
def _opened_v1(data: dict[str, Any]) -> dict[str, Any]:
    """v1 had no overdraft limit: 0."""
    return {**data, "limit": 0}


@ACCOUNT_EVENTS.register
class Deposited(Event):
    TYPE: ClassVar[str] = "ACCOUNT_DEPOSITED"
    amount: int


@ACCOUNT_EVENTS.register
class Withdrawn(Event):
    TYPE: ClassVar[str] = "ACCOUNT_WITHDRAWN"
    amount: int


class Account(Aggregate):
    events = ACCOUNT_EVENTS
    stream_prefix = "account"

    def __init__(self, aggregate_id: str) -> None:
        super().__init__(aggregate_id)
        self.owner: str | None = None
        self.limit = 0
        self.balance = 0
        self.movements = 0

    @applies(Opened)
    def _opened(self, event: Opened) -> None:
        self.owner, self.limit = event.owner, event.limit

    @applies(Deposited, Withdrawn)
    def _moved(self, event: Deposited | Withdrawn) -> None:
        self.balance += event.amount if isinstance(event, Deposited) else -event.amount
        self.movements += 1

    def open(self, owner: str, limit: int = 0) -> list[NewEvent]:
        if self.owner is not None:
            raise DomainError(f"account {self.id} is open already", code="already_open")
        return [self.new_event(Opened(owner=owner, limit=limit))]

    def deposit(self, amount: int, *, request: str | None = None) -> list[NewEvent]:
        self._require_open()
        return [self.new_event(Deposited(amount=amount), key=request)]

    def withdraw(self, amount: int) -> list[NewEvent]:
        self._require_open()
        if self.balance - amount < -self.limit:
            raise DomainError(f"account {self.id} would be overdrawn", code="overdrawn")
        return [self.new_event(Withdrawn(amount=amount))]

    def _require_open(self) -> None:
        if self.owner is None:
            raise DomainError(f"account {self.id} is not open", code="not_open")


class SnapshottedAccount(Account):
    snapshot_every = 5
    snapshot_version = 1

    def snapshot_state(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "limit": self.limit,
            "balance": self.balance,
            "movements": self.movements,
        }

    @classmethod
    def restore_snapshot(
        cls, aggregate_id: str, version: int, state: dict[str, Any]
    ) -> SnapshottedAccount:
        account = cls(aggregate_id)
        account.owner, account.limit = state["owner"], state["limit"]
        account.balance, account.movements = state["balance"], state["movements"]
        account.version = version
        return account


def test_commands_fold_and_refuse_with_typed_errors(store: EventStore) -> None:
    accounts = Repository(store, Account)
    with pytest.raises(DomainError) as refused:
        accounts.execute("a1", lambda a: a.deposit(5))
    assert refused.value.code == "not_open"
    assert store.stream_version("account-a1") == 0  # nothing written
    accounts.execute("a1", lambda a: a.open("ada", limit=10))
    accounts.execute("a1", lambda a: a.deposit(30))
    result = accounts.execute("a1", lambda a: a.withdraw(35))
    assert (result.version, result.appended, result.conflicts) == (3, 1, 0)
    with pytest.raises(DomainError) as refused:
        accounts.execute("a1", lambda a: a.withdraw(10))
    assert refused.value.code == "overdrawn"
    account = accounts.load("a1")
    assert (account.owner, account.limit, account.balance, account.version) == ("ada", 10, -5, 3)
    assert accounts.load("nobody").version == 0


def test_old_events_are_read_through_their_upcasters(store: EventStore) -> None:
    store.append("account-old", [NewEvent("ACCOUNT_OPENED", {"owner": "grace"})])
    account = Repository(store, Account).load("old")
    assert (account.owner, account.limit) == ("grace", 0)
    store.append(
        "account-new",
        [NewEvent("ACCOUNT_OPENED", {"owner": "x", "limit": 1}, {"schema_version": 3})],
    )
    with pytest.raises(EventValidationError, match="newer than this code"):
        Repository(store, Account).load("new")


def test_a_request_key_makes_a_resent_command_a_duplicate(store: EventStore) -> None:
    accounts = Repository(store, Account)
    accounts.execute("k", lambda a: a.open("linus"))
    first = accounts.execute("k", lambda a: a.deposit(7, request="req-1"))
    # The same request sent again by a client that lost the reply: the
    # command runs on the new state, and the store recognises its key.
    again = accounts.execute("k", lambda a: a.deposit(7, request="req-1"))
    assert first.appended == 1
    assert again.duplicate and again.appended == 0
    assert accounts.load("k").balance == 7
    assert accounts.execute("k", lambda a: a.deposit(7, request="req-2")).appended == 1


def test_racing_threads_lose_no_update_and_keep_the_invariant(dsn: str, store: EventStore) -> None:
    accounts = Repository(store, Account, retry=RetryPolicy(max_attempts=200))
    accounts.execute("race", lambda a: a.open("ada"))
    accounts.execute("race", lambda a: a.deposit(100))
    refusals: list[str] = []
    lock = threading.Lock()

    def withdraw_ten_times() -> None:
        with EventStore.connect(dsn, max_size=2) as own:
            mine = Repository(own, Account, retry=RetryPolicy(max_attempts=200))
            for _ in range(10):
                try:
                    mine.execute("race", lambda a: a.withdraw(3))
                except DomainError as exc:
                    with lock:
                        refusals.append(exc.code)

    threads = [threading.Thread(target=withdraw_ten_times) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    account = accounts.load("race")
    # 60 attempts of 3 from 100: 33 went through, the rest were refused.
    assert account.balance == 100 - 3 * (account.movements - 1)
    assert account.balance >= 0
    assert account.movements - 1 + len(refusals) == 60
    assert set(refusals) <= {"overdrawn"}
    versions = [e.version for e in store.read_stream("account-race")]
    assert versions == list(range(1, len(versions) + 1))


def _snapshot_row(dsn: str, stream: str) -> tuple[Any, ...] | None:
    rows = query(
        dsn,
        "SELECT aggregate_type, schema_version, version, state FROM aura.snapshots"
        " WHERE stream_id = %s",
        (stream,),
    )
    return rows[0] if rows else None


def test_snapshots_are_taken_every_n_events_and_used(dsn: str, store: EventStore) -> None:
    accounts = Repository(store, SnapshottedAccount)
    accounts.execute("s", lambda a: a.open("ada"))
    for _ in range(3):
        accounts.execute("s", lambda a: a.deposit(10))
    assert _snapshot_row(dsn, "account-s") is None  # 4 events: none yet
    accounts.execute("s", lambda a: a.deposit(10))
    row = _snapshot_row(dsn, "account-s")
    assert row is not None
    kind, schema, version, state = row
    assert (kind, schema, version) == (SnapshottedAccount.type_name(), 1, 5)
    assert state == {"owner": "ada", "limit": 0, "balance": 40, "movements": 4}
    accounts.execute("s", lambda a: a.deposit(1))
    # The load starts from the snapshot: a snapshot says something the
    # events do not, and the load shows it (then the event after it).
    query(
        dsn,
        "UPDATE aura.snapshots SET state = state || '{\"movements\": 1000}' WHERE stream_id = %s",
        ("account-s",),
    )
    loaded = accounts.load("s")
    assert (loaded.version, loaded.balance, loaded.movements) == (6, 41, 1001)
    # Without snapshots, the events alone.
    plain = Repository(store, SnapshottedAccount, snapshots=False).load("s")
    assert (plain.version, plain.balance, plain.movements) == (6, 41, 5)


def test_a_snapshot_of_another_shape_is_ignored_and_replaced(dsn: str, store: EventStore) -> None:
    accounts = Repository(store, SnapshottedAccount)
    accounts.execute("v", lambda a: a.open("ada"))
    for _ in range(4):
        accounts.execute("v", lambda a: a.deposit(10))
    query(
        dsn,
        "UPDATE aura.snapshots SET schema_version = 99, state = '{\"other\": 1}'"
        " WHERE stream_id = %s",
        ("account-v",),
    )
    assert accounts.load("v").balance == 40  # not misread
    for _ in range(5):
        accounts.execute("v", lambda a: a.deposit(1))
    row = _snapshot_row(dsn, "account-v")
    assert row is not None and row[1:3] == (1, 10)


def test_a_corrupted_snapshot_is_ignored_with_a_warning(
    dsn: str, store: EventStore, caplog: pytest.LogCaptureFixture
) -> None:
    accounts = Repository(store, SnapshottedAccount)
    accounts.execute("c", lambda a: a.open("ada"))
    for _ in range(4):
        accounts.execute("c", lambda a: a.deposit(10))
    query(
        dsn,
        "UPDATE aura.snapshots SET state = %s WHERE stream_id = %s",
        (Jsonb({"owner": "ada"}), "account-c"),
    )
    with caplog.at_level(logging.WARNING, logger="aura_pg.aggregates"):
        assert accounts.load("c").balance == 40
    assert "cannot be restored, ignored" in caplog.text


def test_a_failed_snapshot_write_never_fails_the_command(
    dsn: str, store: EventStore, caplog: pytest.LogCaptureFixture
) -> None:
    accounts = Repository(store, SnapshottedAccount)
    accounts.execute("f", lambda a: a.open("ada"))
    for _ in range(3):
        accounts.execute("f", lambda a: a.deposit(10))
    query(
        dsn,
        "CREATE FUNCTION public.refuse() RETURNS trigger LANGUAGE plpgsql AS"
        " $$ BEGIN RAISE EXCEPTION 'snapshots refused'; END $$",
    )
    query(
        dsn,
        "CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON aura.snapshots"
        " FOR EACH ROW EXECUTE FUNCTION public.refuse()",
    )
    with caplog.at_level(logging.WARNING, logger="aura_pg.aggregates"):
        result = accounts.execute("f", lambda a: a.deposit(10))
    assert result.version == 5 and result.appended == 1
    assert "not taken" in caplog.text and "snapshots refused" in caplog.text
    assert _snapshot_row(dsn, "account-f") is None


def test_operators_drop_snapshots_of_a_type(dsn: str, store: EventStore) -> None:
    accounts = Repository(store, SnapshottedAccount)
    for name in ("d1", "d2"):
        accounts.execute(name, lambda a: a.open("ada"))
        for _ in range(4):
            accounts.execute(name, lambda a: a.deposit(1))
    assert query(dsn, "SELECT aura.drop_snapshots(%s)", (SnapshottedAccount.type_name(),)) == [(2,)]
    assert accounts.load("d1").balance == 4


async def test_async_repository_does_what_the_sync_one_does(
    dsn: str, store: EventStore, async_store: AsyncEventStore
) -> None:
    accounts = AsyncRepository(async_store, SnapshottedAccount)
    await accounts.execute("x", lambda a: a.open("ada", limit=5))
    for _ in range(4):
        await accounts.execute("x", lambda a: a.deposit(10))
    with pytest.raises(DomainError):
        await accounts.execute("x", lambda a: a.withdraw(100))
    assert _snapshot_row(dsn, "account-x") is not None
    loaded = await accounts.load("x")
    synced = Repository(store, SnapshottedAccount, snapshots=False).load("x")
    assert (loaded.version, loaded.balance) == (synced.version, synced.balance) == (5, 40)

    async def withdraw() -> None:
        with contextlib.suppress(DomainError):
            await accounts.execute("x", lambda a: a.withdraw(4))

    await asyncio.gather(*(withdraw() for _ in range(15)))
    final = Repository(store, SnapshottedAccount, snapshots=False).load("x")
    assert final.balance >= -5 and final.balance == 40 - 4 * (final.movements - 4)


def test_aggregate_classes_are_checked_when_defined() -> None:
    with pytest.raises(TypeError, match="define snapshot_state and restore_snapshot"):

        class NoState(Account):
            snapshot_every = 10

    with pytest.raises(TypeError, match="stream_prefix"):

        class BadPrefix(Account):
            stream_prefix = "has space"

    registry = EventRegistry()
    with pytest.raises(ValueError, match="has no TYPE"):
        registry.register(Event)
    with pytest.raises(ValueError, match="ACCOUNT_OPENED"):
        registry.register(Opened)
        registry.register(
            type("Other", (Event,), {"TYPE": "ACCOUNT_OPENED", "__annotations__": {}})
        )


def test_reads_are_retried_through_a_dropped_connection(dsn: str) -> None:
    with EventStore.connect(dsn, min_size=1, max_size=1) as pooled:
        accounts = Repository(pooled, Account)
        accounts.execute("r", lambda a: a.open("ada"))
        with pooled.pool.connection() as conn:  # type: ignore[union-attr]
            pid = conn.info.backend_pid
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        assert accounts.load("r").owner == "ada"


def test_a_repository_works_in_its_callers_transaction(dsn: str, store: EventStore) -> None:
    bare = EventStore()  # no pool: everything runs on the caller's connection
    with psycopg.connect(dsn) as conn:
        accounts = Repository(bare, SnapshottedAccount, conn=conn)
        accounts.execute("t", lambda a: a.open("ada"))
        for _ in range(5):
            accounts.execute("t", lambda a: a.deposit(1))
        assert accounts.load("t").balance == 5
        assert store.stream_version("account-t") == 0  # nothing visible before commit
        conn.rollback()
    assert store.stream_version("account-t") == 0
    assert _snapshot_row(dsn, "account-t") is None  # the snapshot went with it

    with psycopg.connect(dsn) as conn:
        accounts = Repository(bare, SnapshottedAccount, conn=conn)
        accounts.execute("t", lambda a: a.open("ada"))
        raced = False

        def deposit_after_a_rival(account: SnapshottedAccount) -> list[NewEvent]:
            nonlocal raced
            if not raced:  # another writer commits first: this append conflicts
                raced = True
                Repository(store, Account).execute("t", lambda a: a.deposit(100))
            return account.deposit(1)

        # The rival waits for the open to commit: commit it first.
        conn.commit()
        result = accounts.execute("t", deposit_after_a_rival)
        assert (result.conflicts, result.version) == (1, 3)  # rerun in a savepoint
        conn.commit()
    assert Repository(store, Account).load("t").balance == 101


async def test_an_async_repository_works_in_its_callers_transaction(
    dsn: str, async_store: AsyncEventStore
) -> None:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        accounts = AsyncRepository(AsyncEventStore(), Account, conn=conn)
        await accounts.execute("at", lambda a: a.open("ada"))
        await accounts.execute("at", lambda a: a.deposit(2))
        await conn.rollback()
        assert (await accounts.load("at")).version == 0
        await accounts.execute("at", lambda a: a.open("ada"))
        await conn.commit()
    assert (await AsyncRepository(async_store, Account).load("at")).owner == "ada"


def test_a_repository_without_a_pool_or_a_connection_says_so() -> None:
    with pytest.raises(ValueError, match="pool, or conn="):
        Repository(EventStore(), SnapshottedAccount).load("x")


def test_typed_decoding_and_stream_ids(store: EventStore) -> None:
    store.append("account-s1", [ACCOUNT_EVENTS.encode(Opened(owner="ada", limit=1))])
    (event,) = store.read_stream("account-s1")
    assert ACCOUNT_EVENTS.decode_as(event, Opened) == Opened(owner="ada", limit=1)
    with pytest.raises(EventValidationError, match="not a ACCOUNT_DEPOSITED"):
        ACCOUNT_EVENTS.decode_as(event, Deposited)
    assert Account.aggregate_id(event.stream_id) == "s1"
    assert Account.aggregate_id("account-") is None
    assert Account.aggregate_id("task-s1") is None
    assert Account.aggregate_id(Account.stream_id("a-b-c")) == "a-b-c"


def test_appliers_may_read_the_recorded_event_and_when_checks_every_event(
    store: EventStore,
) -> None:
    class Dated(Account):
        stream_prefix = "dated"

        @applies(Opened)
        def _opened_at(self, payload: Opened, event: Any) -> None:
            self.owner, self.limit = payload.owner, payload.limit
            self.opened_at = event.recorded_at

        def when(self, payload: Event, event: Any) -> None:
            if self.owner is None and not isinstance(payload, Opened):
                raise DomainError(f"{event.type} before ACCOUNT_OPENED", code="not_opened")
            super().when(payload, event)

    store.append("dated-d", [ACCOUNT_EVENTS.encode(Deposited(amount=1))])
    with pytest.raises(DomainError, match="before ACCOUNT_OPENED"):
        Repository(store, Dated).load("d")
    store.append("dated-e", [ACCOUNT_EVENTS.encode(Opened(owner="o", limit=0))])
    (opened,) = store.read_stream("dated-e")
    assert Repository(store, Dated).load("e").opened_at == opened.recorded_at

    with pytest.raises(TypeError, match=r"\(self, payload\) or \(self, payload, event\)"):

        class TooMany(Account):
            @applies(Opened)
            def _opened(self, payload: Opened, event: Any, extra: Any) -> None: ...


def test_snapshot_type_names_snapshots_whatever_the_module(dsn: str, store: EventStore) -> None:
    class Renamed(SnapshottedAccount):
        snapshot_type = "accounts.v1"

    accounts = Repository(store, Renamed)
    accounts.execute("n", lambda a: a.open("ada"))
    for _ in range(4):
        accounts.execute("n", lambda a: a.deposit(1))
    assert query(
        dsn, "SELECT aggregate_type FROM aura.snapshots WHERE stream_id = 'account-n'"
    ) == [("accounts.v1",)]
