"""Which failures an append retries, how long it waits, and how the
operation asks its driver to wait and send the batch again."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg_pool import PoolClosed, PoolTimeout

from aura_pg import ANY, AppendRetry, ConcurrencyError, EventValidationError, NewEvent
from aura_pg._runtime import can_resend, resend_reason
from aura_pg.store import operations as ops
from tests.helpers.metrics import retries_counted


@pytest.mark.parametrize(
    "exc",
    [
        psycopg.OperationalError("server closed the connection unexpectedly"),
        psycopg.errors.AdminShutdown("terminating connection due to administrator command"),
        psycopg.errors.CannotConnectNow("the database system is starting up"),
        psycopg.errors.CrashShutdown("terminating connection because of crash"),
        psycopg.errors.TooManyConnections("too many clients"),
        psycopg.errors.ConnectionFailure("connection failure"),
        psycopg.errors.SerializationFailure("could not serialize access"),
        psycopg.errors.DeadlockDetected("deadlock detected"),
        psycopg.errors.lookup("57P05")("terminating connection due to idle-session timeout"),
        PoolTimeout("couldn't get a connection after 30.00 sec"),
    ],
)
def test_failures_that_say_nothing_about_the_append_are_retried(exc: Exception) -> None:
    assert can_resend(exc)


@pytest.mark.parametrize(
    "exc",
    [
        psycopg.errors.InvalidPassword("password authentication failed"),
        psycopg.errors.InvalidCatalogName('database "nope" does not exist'),
        psycopg.errors.UniqueViolation("duplicate key"),
        psycopg.errors.QueryCanceled("canceling statement due to statement timeout"),
        psycopg.errors.DatabaseDropped("terminating connection due to database drop"),
        psycopg.errors.OperatorIntervention("operator intervention"),
        psycopg.errors.UndefinedFunction("function aura.append_events does not exist"),
        psycopg.ProgrammingError("no results to fetch"),
        ConcurrencyError("s", 1, 2),
        EventValidationError("bad"),
        RuntimeError("not a database error"),
        PoolClosed("the pool 'pool-1' is already closed"),
    ],
)
def test_everything_else_is_raised_at_once(exc: Exception) -> None:
    assert not can_resend(exc)
    assert AppendRetry().next_delay(exc, 1, 0.0) is None


def test_waits_grow_exponentially_with_jitter_up_to_the_cap() -> None:
    policy = AppendRetry(base_delay=0.1, max_delay=1.0)
    for attempt, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (40, 1.0)]:
        waits = [policy.delay(attempt) for _ in range(200)]
        assert all(ceiling / 2 <= wait <= ceiling for wait in waits)
        assert max(waits) - min(waits) > ceiling / 10  # jittered, not fixed


def test_attempts_and_the_time_budget_end_the_retries() -> None:
    lost = psycopg.OperationalError("connection lost")
    policy = AppendRetry(attempts=3, base_delay=0.1, max_delay=0.1, budget=1.0)
    assert policy.next_delay(lost, 1, 0.0) is not None
    assert policy.next_delay(lost, 2, 0.0) is not None
    assert policy.next_delay(lost, 3, 0.0) is None  # the third attempt was the last
    assert policy.next_delay(lost, 1, 0.96) is None  # the wait would end past the budget


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"attempts": 0}, "attempts must be at least 1"),
        ({"attempts": True}, "attempts must be an int"),
        ({"base_delay": 0}, "need 0 < base_delay <= max_delay"),
        ({"base_delay": 3.0, "max_delay": 1.0}, "need 0 < base_delay <= max_delay"),
        ({"budget": 0}, "budget must be > 0"),
    ],
)
def test_bad_policies_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AppendRetry(**changes)


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (psycopg.OperationalError("server closed the connection unexpectedly"), "connection"),
        (psycopg.errors.ConnectionFailure("connection failure"), "connection"),
        (psycopg.errors.AdminShutdown("terminating connection"), "server_shutdown"),
        (psycopg.errors.CrashShutdown("crash"), "server_shutdown"),
        (psycopg.errors.CannotConnectNow("starting up"), "server_starting"),
        (psycopg.errors.TooManyConnections("too many clients"), "too_many_connections"),
        (PoolTimeout("no connection"), "pool_timeout"),
        (psycopg.errors.SerializationFailure("could not serialize"), "serialization"),
        (psycopg.errors.DeadlockDetected("deadlock"), "deadlock"),
        (psycopg.errors.InvalidPassword("no"), None),
    ],
)
def test_each_retry_is_counted_by_its_reason(exc: Exception, reason: str | None) -> None:
    assert resend_reason(exc) == reason


# --- the resend decision, driven without a database --------------------------


def lost() -> psycopg.OperationalError:
    return psycopg.OperationalError("server closed the connection unexpectedly")


def append_op(retry: AppendRetry | None) -> ops.Operation:
    return ops.append("s", NewEvent("T", {"n": 1}), ANY, 1024, None, retry)


def test_a_transient_failure_pauses_then_sends_the_same_statement() -> None:
    operation = append_op(AppendRetry(base_delay=0.01, max_delay=0.01))
    first = next(operation)
    assert isinstance(first, ops.Statement)
    counted = retries_counted("connection")
    pause = operation.throw(lost())
    assert isinstance(pause, ops.Pause)
    assert 0.005 <= pause.seconds <= 0.01
    assert retries_counted("connection") == counted + 1
    again = operation.send(None)
    assert again == first  # the very same batch: same event ids, same keys
    with pytest.raises(StopIteration) as done:
        operation.send([(1, 10, False, None)])
    result = done.value.value
    assert (result.stream_id, result.version, result.duplicate) == ("s", 1, False)


def test_without_a_policy_the_failure_is_raised() -> None:
    operation = append_op(None)
    next(operation)
    failure = lost()
    with pytest.raises(psycopg.OperationalError) as raised:
        operation.throw(failure)
    assert raised.value is failure


def test_the_last_attempt_raises() -> None:
    operation = append_op(AppendRetry(attempts=2, base_delay=0.01, max_delay=0.01))
    next(operation)
    assert isinstance(operation.throw(lost()), ops.Pause)
    assert isinstance(operation.send(None), ops.Statement)
    with pytest.raises(psycopg.OperationalError):
        operation.throw(lost())


def test_a_lasting_failure_is_raised_at_once() -> None:
    operation = append_op(AppendRetry())
    next(operation)
    with pytest.raises(psycopg.errors.UndefinedFunction):
        operation.throw(psycopg.errors.UndefinedFunction("no aura.append_events"))


def test_reads_are_not_resent() -> None:
    operation = ops.read_all(None, 10, None)
    next(operation)
    with pytest.raises(psycopg.OperationalError):
        operation.throw(lost())
