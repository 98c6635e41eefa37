"""The daemons' shared runtime, without a database: backoff, the
transient-failure classifier, the interruptible wait, serve-until-signal
(with real signals, sent to a child process)."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import textwrap
import time
from types import TracebackType

import psycopg
import pytest
from psycopg_pool import PoolClosed, PoolTimeout

from aura_pg._runtime import (
    Backoff,
    Transience,
    can_resend,
    classify_exception,
    classify_sqlstate,
    is_momentary,
    resend_reason,
    serve_until_signal,
    wait,
)
from aura_pg.domain.repository import RetryPolicy

# -- backoff ------------------------------------------------------------------


def test_the_ceiling_doubles_from_base_up_to_the_cap() -> None:
    backoff = Backoff(base=0.5, cap=60.0)
    assert [backoff.ceiling(n) for n in range(1, 10)] == [
        0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0,
    ]  # fmt: skip
    assert backoff.ceiling(10**9) == 60.0  # no overflow however long it fails
    assert backoff.ceiling(0) == backoff.ceiling(-3) == 0.5  # before the first: as the first


@pytest.mark.parametrize(
    ("jitter", "low_share"),
    [(0.5, 0.5), (1.0, 0.0), (0.25, 0.75)],
)
def test_the_jitter_is_the_random_share_of_each_wait(jitter: float, low_share: float) -> None:
    backoff = Backoff(base=0.1, cap=3.0, jitter=jitter)
    for attempt in (1, 2, 4, 6, 50):
        ceiling = backoff.ceiling(attempt)
        waits = [backoff.delay(attempt) for _ in range(300)]
        assert all(ceiling * low_share <= w <= ceiling for w in waits)
        assert max(waits) - min(waits) > ceiling * jitter / 4  # spread, not fixed


def test_without_jitter_the_wait_is_the_ceiling() -> None:
    backoff = Backoff(base=0.1, cap=10.0, jitter=0.0)
    assert [backoff.delay(n) for n in range(1, 9)] == [backoff.ceiling(n) for n in range(1, 9)]
    assert backoff.delay(8) == 10.0


def test_a_floor_keeps_a_zero_base_out_of_a_tight_loop() -> None:
    backoff = Backoff(base=0.0, cap=1.0, floor=0.01)
    assert {backoff.ceiling(n) for n in (1, 2, 10, 1000)} == {0.01}
    assert Backoff(base=0.0, cap=0.0, floor=0.01).ceiling(5) == 0.01
    assert Backoff(base=0.005, cap=1.0, floor=0.01).ceiling(3) == 0.02


def test_waits_are_drawn_from_the_generator_given() -> None:
    backoff = Backoff(base=0.001, cap=0.05, jitter=1.0)
    first = [backoff.delay(n, random.Random(7)) for n in range(1, 10)]
    again = [backoff.delay(n, random.Random(7)) for n in range(1, 10)]
    assert first == again


def test_the_backoffs_it_replaces_draw_the_same_waits() -> None:
    """Equal jitter as the relay, AppendRetry, the importer and the projector
    computed it; full jitter as the domain repository did: the very same
    numbers from the same random state."""
    rng = random.Random(3)
    state = rng.getstate()
    old = []
    for attempt in range(1, 12):
        ceiling = min(2.0, 0.05 * float(2 ** min(attempt - 1, 30)))
        old.append(ceiling / 2 + rng.uniform(0, ceiling / 2))
    rng.setstate(state)
    assert [Backoff(0.05, 2.0).delay(n, rng) for n in range(1, 12)] == old

    rng.setstate(state)
    old = []
    for attempt in range(0, 12):  # the projector: milliseconds, a 10 ms floor
        ceiling = max(min(10_000, 100 * (1 << min(max(attempt - 1, 0), 30))) / 1000.0, 0.01)
        old.append(ceiling / 2 + rng.uniform(0, ceiling / 2))
    rng.setstate(state)
    projector = Backoff(100 / 1000, 10_000 / 1000, floor=0.01)
    assert [projector.delay(n, rng) for n in range(0, 12)] == old

    rng.setstate(state)
    old = [rng.uniform(0.0, min(0.05, 0.001 * 2**attempt)) for attempt in range(1, 12)]
    rng.setstate(state)
    full = Backoff(0.001, 0.05, jitter=1.0)
    assert [full.delay(attempt + 1, rng) for attempt in range(1, 12)] == old


def test_the_repository_conflict_wait_is_a_full_jitter_backoff() -> None:
    policy = RetryPolicy(base_delay=0.001, max_delay=0.05)
    rng, same = random.Random(11), random.Random(11)
    assert [policy.delay(n, rng) for n in range(1, 9)] == [
        Backoff(0.001, 0.05, jitter=1.0).delay(n + 1, same) for n in range(1, 9)
    ]
    for options in ({"base_delay": 0.0}, {"base_delay": 0.1, "max_delay": 0.01}):
        with pytest.raises(ValueError, match="RetryPolicy needs 0 < base_delay <= max_delay"):
            RetryPolicy(**options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"base": 10, "cap": 1}, "base <= cap"),
        ({"base": 0, "cap": 1}, "base <= cap"),
        ({"base": -1, "cap": 1}, "base <= cap"),
        ({"base": 1, "cap": 2, "jitter": 1.5}, "jitter is a share from 0 to 1"),
        ({"base": 1, "cap": 2, "jitter": -0.1}, "jitter is a share from 0 to 1"),
        ({"base": 1, "cap": 2, "floor": -1}, "floor cannot be negative"),
    ],
)
def test_bad_backoffs_are_refused(options: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Backoff(**options)


# -- the classifier -----------------------------------------------------------

C = Transience


@pytest.mark.parametrize(
    ("exc", "kind", "resend", "momentary"),
    [
        # No answer from the server: resend, but a projection reconnects instead.
        (psycopg.OperationalError("server closed the connection"), C.CONNECTION, True, False),
        (psycopg.errors.ConnectionFailure("connection failure"), C.CONNECTION, True, False),
        (psycopg.errors.lookup("08001")("cannot connect"), C.CONNECTION, True, False),
        (psycopg.errors.lookup("57P05")("idle-session timeout"), C.CONNECTION, True, False),
        (psycopg.errors.AdminShutdown("terminating connection"), C.SERVER_SHUTDOWN, True, False),
        (psycopg.errors.CrashShutdown("crash"), C.SERVER_SHUTDOWN, True, False),
        (psycopg.errors.CannotConnectNow("starting up"), C.SERVER_STARTING, True, False),
        (PoolTimeout("couldn't get a connection"), C.POOL_TIMEOUT, True, False),
        # Conflicts with other transactions: both.
        (psycopg.errors.SerializationFailure("could not serialize"), C.SERIALIZATION, True, True),
        (psycopg.errors.DeadlockDetected("deadlock detected"), C.DEADLOCK, True, True),
        (psycopg.errors.TooManyConnections("too many clients"), C.TOO_MANY_CONNECTIONS, True, True),
        # Of the moment, but the same statement would meet them again at once.
        (psycopg.errors.LockNotAvailable("lock timeout"), C.LOCK_NOT_AVAILABLE, False, True),
        (psycopg.errors.DiskFull("no space left"), C.OUT_OF_RESOURCES, False, True),
        (psycopg.errors.OutOfMemory("out of memory"), C.OUT_OF_RESOURCES, False, True),
        (psycopg.errors.lookup("53400")("limit exceeded"), C.OUT_OF_RESOURCES, False, True),
        (psycopg.errors.lookup("58000")("system error"), C.SYSTEM_ERROR, False, True),
        (psycopg.errors.lookup("58030")("io error"), C.SYSTEM_ERROR, False, True),
        # Neither: about the request itself, or a state that will not pass.
        (psycopg.errors.QueryCanceled("statement timeout"), None, False, False),
        (psycopg.errors.DatabaseDropped("database dropped"), None, False, False),
        (psycopg.errors.OperatorIntervention("operator intervention"), None, False, False),
        (psycopg.errors.InvalidPassword("password authentication failed"), None, False, False),
        (psycopg.errors.InvalidCatalogName('database "nope" does not exist'), None, False, False),
        (psycopg.errors.UniqueViolation("duplicate key"), None, False, False),
        (psycopg.errors.UndefinedFunction("no such function"), None, False, False),
        (psycopg.errors.RaiseException("a handler raised"), None, False, False),
        (psycopg.ProgrammingError("no results to fetch"), None, False, False),
        (PoolClosed("the pool is already closed"), None, False, False),
        (RuntimeError("not a database error"), None, False, False),
    ],
)  # fmt: skip
def test_each_failure_is_classified_once_for_both_questions(
    exc: BaseException, kind: Transience | None, resend: bool, momentary: bool
) -> None:
    assert classify_exception(exc) is kind
    assert can_resend(exc) is resend
    assert resend_reason(exc) is (kind if resend else None)
    sqlstate = getattr(exc, "sqlstate", None)
    assert is_momentary(sqlstate) is momentary


@pytest.mark.parametrize(
    ("sqlstate", "kind"),
    [
        ("40001", C.SERIALIZATION),
        ("40P01", C.DEADLOCK),
        ("55P03", C.LOCK_NOT_AVAILABLE),
        ("53100", C.OUT_OF_RESOURCES),
        ("53300", C.TOO_MANY_CONNECTIONS),
        ("58P01", C.SYSTEM_ERROR),
        ("08006", C.CONNECTION),
        ("57P01", C.SERVER_SHUTDOWN),
        ("57014", None),
        ("40002", None),  # an integrity constraint at commit: not a conflict
        ("AU005", None),  # the projection functions' own errors
        ("P0001", None),
        (None, None),  # a SQLSTATE says; its absence alone does not
    ],
)
def test_sqlstates_alone_are_classified_too(sqlstate: str | None, kind: Transience | None) -> None:
    assert classify_sqlstate(sqlstate) is kind


def test_the_reasons_are_the_retries_metric_labels() -> None:
    assert resend_reason(PoolTimeout("x")) == "pool_timeout"
    assert resend_reason(psycopg.errors.DeadlockDetected("x")) == "deadlock"
    assert {str(reason) for reason in Transience} >= {
        "connection", "server_shutdown", "server_starting", "too_many_connections",
        "pool_timeout", "serialization", "deadlock",
    }  # fmt: skip


# -- wait -----------------------------------------------------------------------


async def test_wait_sleeps_its_time_when_nothing_happens() -> None:
    began = time.monotonic()
    await wait(asyncio.Event(), 0.1)
    assert time.monotonic() - began >= 0.09


async def test_wait_ends_when_stop_is_set() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, stop.set)
    # An hour-long wait: only the stop can end it within the deadline.
    await asyncio.wait_for(wait(stop, 3600), timeout=30)
    assert stop.is_set()  # a stop is never consumed


async def test_wait_ends_when_woken_and_consumes_the_wake_up() -> None:
    stop, wake = asyncio.Event(), asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, wake.set)
    await asyncio.wait_for(wait(stop, 3600, wake), timeout=30)
    assert not wake.is_set()
    assert not stop.is_set()


async def test_wait_returns_at_once_when_already_stopped_woken_or_due() -> None:
    stop, wake = asyncio.Event(), asyncio.Event()
    wake.set()
    await asyncio.wait_for(wait(stop, 3600, wake), timeout=30)
    assert not wake.is_set()
    stop.set()
    await asyncio.wait_for(wait(stop, 3600), timeout=30)
    await asyncio.wait_for(wait(asyncio.Event(), -1.0), timeout=30)


async def test_wait_clears_a_wake_up_that_came_during_a_stop() -> None:
    stop, wake = asyncio.Event(), asyncio.Event()
    stop.set()
    wake.set()
    await wait(stop, 30, wake)
    assert not wake.is_set()


# -- serve until a signal ------------------------------------------------------

_SERVE = textwrap.dedent(
    """
    import asyncio, json, signal, sys
    from aura_pg._runtime import serve_until_signal
    from aura_pg.observability.endpoint import Heartbeat

    SLOW_ENTER = sys.argv[1] == "slow-enter"
    heartbeat = Heartbeat(interval=0.01)
    seen = {}

    class Daemon:
        async def __aenter__(self):
            seen["entered"] = True
            if SLOW_ENTER:
                print("entering", flush=True)
                await asyncio.sleep(1)
            return self

        async def __aexit__(self, *exc):
            seen["exited"] = True

        async def run(self, stop):
            seen["stopped_at_start"] = stop.is_set()
            await asyncio.sleep(0.05)
            seen["beating"] = heartbeat.running
            print("ready", flush=True)
            await stop.wait()
            return "finished cleanly"

    async def main():
        daemon = Daemon()
        result = await serve_until_signal(daemon.run, heartbeat=heartbeat, within=daemon)
        loop = asyncio.get_running_loop()
        seen["handlers_left"] = [
            s.name for s in (signal.SIGTERM, signal.SIGINT) if loop.remove_signal_handler(s)
        ]
        seen["beating_after"] = heartbeat.running
        seen["result"] = result
        print(json.dumps(seen), flush=True)

    asyncio.run(main())
    """
)


def _serve_in_child(mode: str, signum: signal.Signals, after: str) -> dict[str, object]:
    child = subprocess.Popen(
        [sys.executable, "-c", _SERVE, mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == after
        child.send_signal(signum)
        out, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, err
    lines = out.strip().splitlines()
    if after == "entering":
        assert lines[0] == "ready"
        lines = lines[1:]
    result: dict[str, object] = json.loads(lines[-1])
    return result


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_daemon_which_finishes_and_exits_cleanly(
    signum: signal.Signals,
) -> None:
    seen = _serve_in_child("plain", signum, after="ready")
    assert seen == {
        "entered": True,
        "stopped_at_start": False,
        "beating": True,
        "exited": True,
        "handlers_left": [],
        "beating_after": False,
        "result": "finished cleanly",
    }


def test_a_signal_while_connecting_stops_the_daemon_as_it_starts() -> None:
    seen = _serve_in_child("slow-enter", signal.SIGTERM, after="entering")
    assert seen["stopped_at_start"] is True
    assert seen["exited"] is True
    assert seen["result"] == "finished cleanly"


class _Beat:
    def __init__(self) -> None:
        self.beats = 0
        self.ended = False

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.beats += 1
            await wait(stop, 0.01)
        self.ended = True


class _Resource:
    def __init__(self) -> None:
        self.exited_with: type[BaseException] | None = None

    async def __aenter__(self) -> _Resource:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.exited_with = exc_type


async def test_a_failing_daemon_stops_the_heartbeat_and_removes_the_handlers() -> None:
    beat, resource = _Beat(), _Resource()

    async def daemon(stop: asyncio.Event) -> None:
        await asyncio.sleep(0.05)
        raise RuntimeError("the daemon broke")

    with pytest.raises(RuntimeError, match="the daemon broke"):
        await serve_until_signal(daemon, heartbeat=beat, within=resource)
    assert beat.beats > 0
    assert beat.ended
    assert resource.exited_with is RuntimeError
    loop = asyncio.get_running_loop()
    assert not loop.remove_signal_handler(signal.SIGTERM)
    assert not loop.remove_signal_handler(signal.SIGINT)


async def test_the_daemon_returns_its_result_and_a_given_stop_is_used() -> None:
    stop = asyncio.Event()

    async def daemon(given: asyncio.Event) -> int:
        assert given is stop
        return 42

    assert await serve_until_signal(daemon, stop=stop) == 42
    assert stop.is_set()  # set on the way out, for whatever else watches it
