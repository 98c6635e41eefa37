"""The daemon's timing and error classification: which failures are of the
moment (retried, never held against an event), how long to back off, and
how to wait so that a stop or a wake-up ends the wait at once."""

from __future__ import annotations

import asyncio
import random

# Failures of the moment, not of the event: lock and serialization conflicts,
# deadlocks, resource shortages (disk full, out of memory), system errors.
# They are retried with backoff and count for the circuit breaker, but never
# toward an event's retries: a busy database does not dead-letter good events.
TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "55P03"})
TRANSIENT_SQLSTATE_CLASSES = ("53", "58")


def is_transient(sqlstate: str | None) -> bool:
    return sqlstate is not None and (
        sqlstate in TRANSIENT_SQLSTATES or sqlstate.startswith(TRANSIENT_SQLSTATE_CLASSES)
    )


def backoff_delay(attempt: int, base_ms: int, max_ms: int) -> float:
    """Exponential backoff with jitter, in seconds: half fixed, half random,
    so retrying daemons spread out but never retry at once."""
    ceiling = min(max_ms, base_ms * (1 << min(max(attempt - 1, 0), 30))) / 1000.0
    # Never retry in a tight loop, whatever the catalog says.
    ceiling = max(ceiling, 0.01)
    return ceiling / 2 + random.uniform(0, ceiling / 2)


async def wait(stop: asyncio.Event, wake: asyncio.Event | None, timeout: float) -> None:
    """Sleep until ``timeout`` passes, ``stop`` is set or ``wake`` fires."""
    waiters = [asyncio.ensure_future(stop.wait())]
    if wake is not None:
        waiters.append(asyncio.ensure_future(wake.wait()))
    try:
        await asyncio.wait(waiters, timeout=max(timeout, 0.0), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    if wake is not None:
        wake.clear()
