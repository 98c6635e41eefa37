"""Sharing a partitioned processor among the daemons that run it.

Each partition is owned by whoever takes its lock first, so without a
share the first daemon to start would take them all and the others would
only stand by. Here every daemon running a processor of N partitions
holds one of N membership locks (session advisory locks, released when
the daemon's session ends), counts the live members in ``pg_locks``, and
owns at most its share, ceil(N / members): it takes free partitions while
under it and hands partitions back, one at a time, after a batch, while
over it. A daemon that starts spreads the work; one that dies leaves its
partitions to the others within a poll interval, since the members left
have a larger share.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import psycopg

from aura_pg._runtime import wait
from aura_pg.projection.connection import connect, queries

if TYPE_CHECKING:
    from aura_pg.projection.runner import ProjectionRunner
    from aura_pg.projection.settings import ProjectorSettings

log = logging.getLogger("aura_pg.projector")


class PartitionShare:
    """One daemon's share of one partitioned processor."""

    def __init__(
        self, dsn: str, processor: str, partitions: int, settings: ProjectorSettings
    ) -> None:
        self.dsn = dsn
        self.processor = processor
        self.partitions = partitions
        self.settings = settings
        self.runners: list[ProjectionRunner] = []
        # Our membership lock's slot; None until taken (or while the
        # membership connection is down): then nothing more is taken.
        self.slot: int | None = None
        self.members = 1

    def attach(self, runners: Sequence[ProjectionRunner]) -> None:
        self.runners = list(runners)
        for runner in self.runners:
            runner.share = self

    @property
    def share(self) -> int:
        """How many partitions this daemon may own."""
        return -(-self.partitions // max(self.members, 1))

    def owned(self) -> int:
        return sum(1 for runner in self.runners if runner.owning)

    def may_take(self) -> bool:
        """Whether a runner of ours may take one more partition now."""
        return self.slot is not None and self.owned() < self.share

    def should_yield(self, runner: ProjectionRunner) -> bool:
        """Whether ``runner`` should hand its partition back: we own more
        than our share, and it is the last of ours by name (one at a time,
        so the others see the change before the next)."""
        if self.slot is None or self.owned() <= self.share:
            return False
        owning = sorted((r for r in self.runners if r.owning), key=lambda r: r.name)
        return bool(owning) and owning[-1] is runner

    async def run(self, stop: asyncio.Event) -> None:
        """Hold a membership lock and keep the member count fresh, every
        poll interval, until stopped; reconnects after a failure."""
        reconnect = self.settings.reconnect_backoff()
        failures = 0
        while not stop.is_set():
            conn: psycopg.AsyncConnection[Any] | None = None
            try:
                conn = await connect(self.dsn, self.settings, f"members {self.processor}")
                while not stop.is_set():
                    await self._refresh(conn)
                    failures = 0
                    await wait(stop, self.settings.poll_interval)
            except psycopg.Error as exc:
                failures += 1
                delay = reconnect.delay(failures)
                log.warning(
                    "processor %s: membership connection failed (%s); again in %.1fs",
                    self.processor,
                    exc,
                    delay,
                )
                self.slot = None
                await wait(stop, delay)
            finally:
                self.slot = None
                if conn is not None:
                    await conn.close()

    async def _refresh(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if self.slot is None:
            for slot in range(self.partitions):
                cur = await conn.execute(
                    queries()["try_member"], {"name": self.processor, "slot": slot}
                )
                row = await cur.fetchone()
                if row is not None and row[0]:
                    self.slot = slot
                    break
        cur = await conn.execute(
            queries()["members"], {"name": self.processor, "slots": self.partitions}
        )
        row = await cur.fetchone()
        members = int(row[0]) if row else 1
        if members != self.members:
            log.info(
                "processor %s: %d daemons share its %d partitions (this one: up to %d)",
                self.processor,
                members,
                self.partitions,
                -(-self.partitions // max(members, 1)),
            )
        self.members = max(members, 1)
