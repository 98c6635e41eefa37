"""How runners learn there is work (``ProjectorSettings.wake``).

* ``watch`` (the default): one log-watcher connection per daemon reads the
  read horizon every ``watch_interval`` seconds (10 ms) and wakes the runners
  that are behind it. After ``watch_hold`` (1 s) without movement it slows
  down to ``watch_idle_interval`` (50 ms), and returns to full speed at the
  first movement. Appends pay nothing for it, unlike NOTIFY, whose
  cluster-wide lock makes notifying commits take turns.
* ``listen``: a listener connection wakes the runners on ``NOTIFY
  aura_events``, sent by appends in sessions that ``SET aura.notify = on``.
* ``poll``: neither.

Each runner also polls every ``poll_interval`` (1 s), so a lost wake-up, a
dropped watcher or listener, or a pooler in between delays it by one poll
interval at most.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import psycopg

from aura_pg._runtime import wait
from aura_pg.models import START, Checkpoint
from aura_pg.observability import tracing
from aura_pg.projection.connection import connect, queries
from aura_pg.projection.settings import ProjectorSettings

log = logging.getLogger("aura_pg.projector")

NOTIFY_CHANNEL = "aura_events"


class _WakeConnection(abc.ABC):
    """A connection of its own that wakes runners (``_serve``); reconnects
    with backoff when it drops, and wakes everyone on each (re)connect,
    since whatever happened while it was away went unseen."""

    role: str

    def __init__(self, dsn: str, settings: ProjectorSettings) -> None:
        self.dsn = dsn
        self.settings = settings
        self.connected = False
        self.reconnects = 0

    @abc.abstractmethod
    async def _serve(self, conn: psycopg.AsyncConnection[Any], stop: asyncio.Event) -> None:
        """Wake runners while connected, until ``stop`` is set."""

    async def run(self, stop: asyncio.Event) -> None:
        reconnect = self.settings.reconnect_backoff()
        failures = 0
        while not stop.is_set():
            conn: psycopg.AsyncConnection[Any] | None = None
            try:
                conn = await connect(self.dsn, self.settings, f"projector {self.role}")
                self.connected = True
                failures = 0
                await self._serve(conn, stop)
            except psycopg.OperationalError as exc:
                self.connected = False
                if stop.is_set():
                    return
                self.reconnects += 1
                failures += 1
                delay = reconnect.delay(failures)
                log.warning(
                    "%s: connection lost (%s); reconnecting in %.1fs", self.role, exc, delay
                )
                await wait(stop, delay)
            finally:
                self.connected = False
                if conn is not None:
                    await conn.close()


class Listener(_WakeConnection):
    """LISTEN aura_events on its own connection; wakes the runners on each
    notification (sent by appends where aura.notify = on)."""

    role = "listener"

    def __init__(self, dsn: str, settings: ProjectorSettings, wake: Callable[[], None]) -> None:
        super().__init__(dsn, settings)
        self.wake = wake
        self.notifications = 0

    async def _serve(self, conn: psycopg.AsyncConnection[Any], stop: asyncio.Event) -> None:
        await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        self.wake()
        while not stop.is_set():
            async for _ in conn.notifies(timeout=self.settings.listen_keepalive):
                self.notifications += 1
                self.wake()
            with tracing.suppress_instrumentation():
                await conn.execute("SELECT 1")


class LogWatcher(_WakeConnection):
    """Reads the read horizon on its own connection; wakes the runners
    behind it when it moves.

    The horizon is the newest event ``aura.read_all`` can return: it moves
    only when events become readable (their transaction and every older one
    have ended), so a wake-up always finds work, and no runner is woken for
    appends still in flight.
    """

    role = "watcher"

    def __init__(
        self,
        dsn: str,
        settings: ProjectorSettings,
        wake: Callable[[Checkpoint | None], None],
    ) -> None:
        super().__init__(dsn, settings)
        self.wake = wake
        self.horizon: Checkpoint | None = None
        self.ticks = 0
        self.moves = 0

    async def _serve(self, conn: psycopg.AsyncConnection[Any], stop: asyncio.Event) -> None:
        query = queries()["watch_horizon"]
        self.horizon = None
        self.wake(None)
        interval = self.settings.watch_interval
        moved_at = time.monotonic()
        while not stop.is_set():
            with tracing.suppress_instrumentation():
                cur = await conn.execute(query)
                row = await cur.fetchone()
            self.ticks += 1
            horizon = Checkpoint(int(row[0]), int(row[1])) if row and row[0] is not None else START
            if horizon != self.horizon:
                self.moves += 1
                self.horizon = horizon
                self.wake(horizon)
                interval = self.settings.watch_interval
                moved_at = time.monotonic()
            elif time.monotonic() - moved_at > self.settings.watch_hold:
                interval = min(interval * 1.5, self.settings.watch_idle_interval)
            await wait(stop, interval)
