"""What every long-running part shares: how long to wait before trying again
(:class:`Backoff`), which database failures are worth another try
(:func:`classify_exception`, :func:`classify_sqlstate` and the two
predicates built on them), an interruptible wait (:func:`wait`), and a
daemon run until SIGTERM or SIGINT (:func:`serve_until_signal`).

It imports only the standard library, psycopg and psycopg_pool, so the
store's retry can use it while ``from aura_pg import EventStore`` stays light.
"""

from __future__ import annotations

import asyncio
import enum
import random
import signal
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

import psycopg
from psycopg_pool import PoolClosed, PoolTimeout

T = TypeVar("T")

# -- backoff ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with jitter: after failure ``n`` (from 1) the wait
    is at most ``ceiling(n) = max(floor, min(cap, base * 2**(n-1)))``
    seconds, of which the share ``jitter`` is random.

    ``jitter`` 0.5 ("equal jitter", the default) waits between half and all
    of the ceiling: retries of things that failed together spread out, yet
    never come back at once. 1.0 ("full jitter") waits anywhere from 0 to
    the ceiling; 0 waits exactly the ceiling. ``floor`` keeps a zero
    ``base`` (a projection's catalog may say 0 ms) out of a tight loop.
    """

    base: float
    cap: float
    jitter: float = 0.5
    floor: float = 0.0

    def __post_init__(self) -> None:
        if not (0 <= self.base <= self.cap and max(self.base, self.floor) > 0):
            raise ValueError(
                f"backoff needs 0 < base <= cap (or a positive floor), not {self.base}, {self.cap}"
            )
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"backoff jitter is a share from 0 to 1, not {self.jitter}")
        if self.floor < 0:
            raise ValueError(f"backoff floor cannot be negative, not {self.floor}")

    def ceiling(self, attempt: int) -> float:
        """The longest wait after failure number ``attempt`` (below 1: as 1)."""
        grown = self.base * 2.0 ** min(max(attempt, 1) - 1, 1023)
        return max(self.floor, min(self.cap, grown))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """A wait after failure number ``attempt``, drawn from ``rng`` (the
        ``random`` module's generator when None)."""
        ceiling = self.ceiling(attempt)
        uniform = random.uniform if rng is None else rng.uniform
        return ceiling * (1 - self.jitter) + uniform(0, ceiling * self.jitter)


OUTAGE_BACKOFF: Final = Backoff(base=0.1, cap=0.5)
"""The waits between attempts to reach a database that went away (a
restart, a partition): short, so a daemon is back within about half a
second of the server answering again. An attempt that fails is cheap for
the server (a refused connect, or a starting server's refusal)."""


# -- which failures are worth another try ---------------------------------------


class Transience(enum.StrEnum):
    """Why a failure may pass if tried again. The values are the ``reason``
    label of ``aura_append_retries_total``."""

    CONNECTION = "connection"
    """The connection broke, never opened, or the server closed it for idling."""
    SERVER_SHUTDOWN = "server_shutdown"
    SERVER_STARTING = "server_starting"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    POOL_TIMEOUT = "pool_timeout"
    """The pool had no connection to give in time."""
    SERIALIZATION = "serialization"
    DEADLOCK = "deadlock"
    LOCK_NOT_AVAILABLE = "lock_not_available"
    """A lock timeout (55P03)."""
    OUT_OF_RESOURCES = "out_of_resources"
    """Disk full, out of memory, a configured limit (class 53)."""
    SYSTEM_ERROR = "system_error"
    """An I/O or other operating system error on the server (class 58)."""


# Not transient from class 57: 57000 (operator intervention), 57014 (a
# cancelled statement: a statement timeout would hit again) and 57P04 (the
# database was dropped).
_SQLSTATES: Final = {
    "57P01": Transience.SERVER_SHUTDOWN,
    "57P02": Transience.SERVER_SHUTDOWN,
    "57P03": Transience.SERVER_STARTING,
    # idle_session_timeout closed an idle pooled connection: nothing was sent.
    "57P05": Transience.CONNECTION,
    "53300": Transience.TOO_MANY_CONNECTIONS,
    "40001": Transience.SERIALIZATION,
    "40P01": Transience.DEADLOCK,
    "55P03": Transience.LOCK_NOT_AVAILABLE,
}
_SQLSTATE_CLASSES: Final = {
    "08": Transience.CONNECTION,
    "53": Transience.OUT_OF_RESOURCES,
    "58": Transience.SYSTEM_ERROR,
}

# A request that failed so can be sent again unchanged: the failure says
# nothing about the request, and the server either never saw it or rolled it
# back. (A lock timeout or a full disk does say something: the same
# statement would meet it again at once.)
_RESENDABLE: Final = frozenset(
    {
        Transience.CONNECTION,
        Transience.SERVER_SHUTDOWN,
        Transience.SERVER_STARTING,
        Transience.TOO_MANY_CONNECTIONS,
        Transience.POOL_TIMEOUT,
        Transience.SERIALIZATION,
        Transience.DEADLOCK,
    }
)
# The database's trouble of the moment, not the statement's, on a
# connection that still works: conflicts with other transactions and
# shortages. (A lost connection is not here: a caller holding one finds
# out by the connection, and reconnects.)
_MOMENTARY: Final = frozenset(
    {
        Transience.TOO_MANY_CONNECTIONS,
        Transience.SERIALIZATION,
        Transience.DEADLOCK,
        Transience.LOCK_NOT_AVAILABLE,
        Transience.OUT_OF_RESOURCES,
        Transience.SYSTEM_ERROR,
    }
)


def classify_sqlstate(sqlstate: str | None) -> Transience | None:
    """Why a failure with this SQLSTATE may pass if tried again; None when
    it would not (or no SQLSTATE tells)."""
    if sqlstate is None:
        return None
    return _SQLSTATES.get(sqlstate) or _SQLSTATE_CLASSES.get(sqlstate[:2])


def classify_exception(exc: BaseException) -> Transience | None:
    """:func:`classify_sqlstate` for an exception, with what only the
    exception tells: a pool timeout, and a connection that broke before the
    server answered at all."""
    if isinstance(exc, PoolTimeout):
        return Transience.POOL_TIMEOUT
    if isinstance(exc, PoolClosed) or not isinstance(exc, psycopg.Error):
        # A closed pool stays closed: an OperationalError without a
        # SQLSTATE, but no reason to wait.
        return None
    if exc.sqlstate is None:
        # No answer from the server at all: the connection broke or never
        # opened (refused, reset). Wrong credentials and unknown databases
        # come with a SQLSTATE, so they are not here.
        return Transience.CONNECTION if isinstance(exc, psycopg.OperationalError) else None
    return classify_sqlstate(exc.sqlstate)


def resend_reason(exc: BaseException) -> Transience | None:
    """Why the request ``exc`` ended can be sent again unchanged (an append:
    the same batch, whose idempotency keys make a committed first attempt a
    duplicate); None when ``exc`` is to be raised."""
    reason = classify_exception(exc)
    return reason if reason in _RESENDABLE else None


def can_resend(exc: BaseException) -> bool:
    """Whether the request ``exc`` ended can be sent again unchanged."""
    return resend_reason(exc) is not None


def is_momentary(sqlstate: str | None) -> bool:
    """Whether a statement failed for the moment, not for what it did: a
    conflict with another transaction or a shortage on the server. A
    projection retries such a failure without counting it against the
    event (a busy database does not dead-letter good events)."""
    return classify_sqlstate(sqlstate) in _MOMENTARY


# -- waiting and serving --------------------------------------------------------


async def wait(stop: asyncio.Event, seconds: float, wake: asyncio.Event | None = None) -> None:
    """Sleep ``seconds``, or less if ``stop`` is set or ``wake`` fires.
    ``wake`` is cleared on return: a wake-up serves one wait."""
    waiters = [asyncio.ensure_future(stop.wait())]
    if wake is not None:
        waiters.append(asyncio.ensure_future(wake.wait()))
    try:
        await asyncio.wait(waiters, timeout=max(seconds, 0.0), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    if wake is not None:
        wake.clear()


STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def stop_on_signals(
    stop: asyncio.Event, signals: Sequence[signal.Signals] = STOP_SIGNALS
) -> Iterator[asyncio.Event]:
    """Within the block, ``signals`` only set ``stop`` (on the running
    loop); the default handlers are back after it."""
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    try:
        for signum in signals:
            loop.add_signal_handler(signum, stop.set)
            installed.append(signum)
        yield stop
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)


class Beating(Protocol):
    """A liveness beat that runs until ``stop`` is set (observability's Heartbeat)."""

    async def run(self, stop: asyncio.Event) -> None: ...


async def serve_until_signal(
    daemon: Callable[[asyncio.Event], Awaitable[T]],
    *,
    heartbeat: Beating | None = None,
    within: AbstractAsyncContextManager[Any] | None = None,
    stop: asyncio.Event | None = None,
) -> T:
    """Run ``daemon(stop)`` until it returns; SIGTERM and SIGINT set
    ``stop`` (the daemon finishes what is in flight and returns).

    ``heartbeat`` beats from before ``within`` is entered (opening
    connections) until the daemon returned; a signal while ``within`` is
    entered stops the daemon as soon as it starts. ``within`` (the daemon
    object, say) is exited after the daemon returned.
    """
    stop = stop if stop is not None else asyncio.Event()
    with stop_on_signals(stop):
        beating = None if heartbeat is None else asyncio.create_task(heartbeat.run(stop))
        try:
            if within is None:
                return await daemon(stop)
            async with within:
                return await daemon(stop)
        finally:
            stop.set()
            if beating is not None:
                await beating
