"""The store's connection pools: psycopg_pool's, reconnecting quickly.

When a pooled connection breaks, psycopg_pool replaces it in the
background: it connects at once and, while that fails, again after about
1 s, 2 s, 4 s and so on (``AttemptWithBackoff``: 1 s, doubling, 10%
jitter, until ``reconnect_timeout``), and a request for a connection waits
meanwhile. After a Postgres restart or a network partition, writers so came
back 1 to 2 s (and after longer outages up to twice the outage) after the
server answered again. Nothing public configures those delays.

:class:`QuickReconnectPool` and :class:`AsyncQuickReconnectPool` start the
same background attempts with a schedule of their own:
``RECONNECT_FIRST_DELAY``, doubling, never more than ``RECONNECT_MAX_DELAY``
(both with psycopg_pool's 10% jitter), so a pool has a connection again at
most about ``RECONNECT_MAX_DELAY`` after the server accepts one. A refused
or rejected connection attempt is cheap for the server (no backend starts
for a refused TCP connect; a starting server rejects at once), so attempts
a few times a second per missing connection cost nothing measurable; giving
up after ``reconnect_timeout`` is psycopg_pool's, unchanged.

A connection returned broken (the server went away, or the network) says
the pool's idle connections are likely broken too: the server closed them
all, or the partition cut them all. psycopg_pool hands them out one by one
regardless, so a retrying append met them in turn (with ten idle
connections, ``AppendRetry()``'s eight attempts ran out before one reached
the server). So when a connection comes back broken, these pools run their
``check()`` in the background (one at a time): it tests each idle connection
(an empty query) and replaces the broken ones. That costs a round trip per
idle connection after a failure, nothing otherwise: in normal operation
these pools do exactly what psycopg_pool's do, with no check on checkout.

The hook is psycopg_pool's ``_add_connection(attempt, growing)``, which
takes the attempt state to continue or None to start one (the same from
psycopg_pool 3.2.1, where ``AttemptWithBackoff`` got its name, to 3.3); the
pools pass a fresh attempt of their own schedule where psycopg_pool would
create its own. ``putconn`` (public) notices a broken connection. A test
(tests/integration/store/test_pool_reconnect.py) proves the schedule is in
effect, so a psycopg_pool release that changed the hook would fail it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Final

from psycopg_pool import AsyncConnectionPool, ConnectionPool
from psycopg_pool.base import AttemptWithBackoff

log = logging.getLogger("aura_pg.pool")

RECONNECT_FIRST_DELAY: Final = 0.05
"""Seconds before the second attempt to replace a connection."""
RECONNECT_MAX_DELAY: Final = 0.25
"""The longest wait between attempts to replace a connection."""


class QuickAttempt(AttemptWithBackoff):
    """psycopg_pool's reconnection attempt state with a short schedule:
    ``RECONNECT_FIRST_DELAY`` doubling up to ``RECONNECT_MAX_DELAY`` (each
    with 10% jitter), until ``timeout`` seconds after the first failure."""

    INITIAL_DELAY = RECONNECT_FIRST_DELAY

    def update_delay(self, now: float) -> None:
        super().update_delay(now)
        if self.delay > RECONNECT_MAX_DELAY:
            jitter = self.DELAY_JITTER
            self.delay = min(
                self.delay,
                ConnectionPool._jitter(RECONNECT_MAX_DELAY, -jitter, jitter),
            )


class QuickReconnectPool(ConnectionPool[Any]):
    """``psycopg_pool.ConnectionPool`` whose lost connections are replaced
    at most about ``RECONNECT_MAX_DELAY`` after the server answers again,
    and whose idle connections are checked when one comes back broken."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._aura_checking = threading.Lock()

    def putconn(self, conn: Any) -> None:
        lost = conn.broken
        super().putconn(conn)
        if lost and not self.closed and self._aura_checking.acquire(blocking=False):
            threading.Thread(
                target=self._check_idle, name=f"{self.name}-check", daemon=True
            ).start()

    def _check_idle(self) -> None:
        """``check()``, in a thread of its own; holds ``_aura_checking``."""
        try:
            self.check()
        except Exception as exc:  # a pool closed meanwhile, say: nothing to keep
            log.debug("checking %s after a lost connection: %s", self.name, exc)
        finally:
            self._aura_checking.release()

    def _add_connection(self, attempt: AttemptWithBackoff | None, growing: bool = False) -> None:
        if attempt is None:
            attempt = QuickAttempt(timeout=self.reconnect_timeout)
        super()._add_connection(attempt, growing=growing)


class AsyncQuickReconnectPool(AsyncConnectionPool[Any]):
    """``psycopg_pool.AsyncConnectionPool`` whose lost connections are
    replaced at most about ``RECONNECT_MAX_DELAY`` after the server answers
    again, and whose idle connections are checked when one comes back
    broken."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._aura_checking: asyncio.Task[None] | None = None

    async def putconn(self, conn: Any) -> None:
        lost = conn.broken
        await super().putconn(conn)
        if lost and not self.closed and self._aura_checking is None:
            self._aura_checking = asyncio.create_task(self._check_idle())

    async def _check_idle(self) -> None:
        """``check()``, as a task of its own (``_aura_checking``)."""
        try:
            await self.check()
        except Exception as exc:  # a pool closed meanwhile, say: nothing to keep
            log.debug("checking %s after a lost connection: %s", self.name, exc)
        finally:
            self._aura_checking = None

    async def close(self, timeout: float = 5.0) -> None:
        checking = self._aura_checking
        if checking is not None:
            checking.cancel()
        await super().close(timeout)

    async def _add_connection(
        self, attempt: AttemptWithBackoff | None, growing: bool = False
    ) -> None:
        if attempt is None:
            attempt = QuickAttempt(timeout=self.reconnect_timeout)
        await super()._add_connection(attempt, growing=growing)
