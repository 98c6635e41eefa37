"""The handlers of the Python processors that load/bench_processors.py measures.

The projector daemon imports them as ``processor_handlers:NAME``: the
benchmark's daemon processes are started by ``multiprocessing`` (spawn)
from ``load/bench_projection.py``, so ``load/`` is on their ``sys.path``
as it is on the parent's. An ``aura-pg project --catalog`` daemon needs
``PYTHONPATH=load`` (or its cwd there) to find them.

Every handler also times itself into this process's ``STATS``: when each
call began and ended and how many events it got, so that the benchmark can
tell the time inside the handler from the time the daemon spends around it
(reading and decoding the batch, the checkpoint, the commit). The daemon
child process sends ``snapshot()`` to the parent when it stops.

The tables they write are in ``load/projections/bench_processors.sql``.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

import psycopg

from aura_pg.models import RecordedEvent

INSERT_ROW: Final = (
    "INSERT INTO bench_py.insert_rows (event_id, stream_id, version, type, global_position) "
    "VALUES (%s, %s, %s, %s, %s)"
)
INSERT_ROW_ASYNC: Final = (
    "INSERT INTO bench_py.insert_rows_async (event_id, stream_id, version, type, global_position) "
    "VALUES (%s, %s, %s, %s, %s)"
)
INSERT_LIVE: Final = (
    "INSERT INTO bench_py.live (event_id, stream_id, version, type, global_position) "
    "VALUES (%s, %s, %s, %s, %s)"
)
INSERT_IO_BATCH: Final = (
    "INSERT INTO bench_py.io_batches (pid, events, first_stream, event_ids) VALUES (%s, %s, %s, %s)"
)


class _Settings:
    """What the I/O-bound handler waits: set by the daemon process (the
    benchmark's ``--io-sleep-ms`` and ``--io-sleep-per``) before it runs."""

    io_sleep_seconds: float = 0.005
    io_sleep_per_event: bool = True


SETTINGS: Final = _Settings()


def configure(io_sleep_seconds: float, io_sleep_per_event: bool) -> None:
    SETTINGS.io_sleep_seconds = io_sleep_seconds
    SETTINGS.io_sleep_per_event = io_sleep_per_event


class _Stats:
    """Per handler call: (began, ended, events), time.monotonic() seconds
    (system-wide on Linux, so comparable with the parent's clock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: list[tuple[float, float, int]] = []

    def add(self, began: float, ended: float, events: int) -> None:
        with self._lock:
            self.calls.append((began, ended, events))

    def snapshot(self) -> list[tuple[float, float, int]]:
        with self._lock:
            return list(self.calls)


STATS: Final = _Stats()


def snapshot() -> list[tuple[float, float, int]]:
    """Every handler call of this process so far: (began, ended, events)."""
    return STATS.snapshot()


@contextmanager
def _timed(events: int) -> Iterator[None]:
    began = time.monotonic()
    try:
        yield
    finally:
        STATS.add(began, time.monotonic(), events)


def _rows(events: list[RecordedEvent]) -> list[tuple[Any, ...]]:
    return [(e.event_id, e.stream_id, e.version, e.type, e.global_position) for e in events]


# ---------------------------------------------------------------- catch-up


def noop(events: list[RecordedEvent], conn: psycopg.Connection[Any]) -> None:
    """Does nothing: what the daemon costs around a handler."""
    with _timed(len(events)):
        pass


async def noop_async(events: list[RecordedEvent], conn: psycopg.AsyncConnection[Any]) -> None:
    """Does nothing, as a coroutine (run on the daemon's event loop)."""
    with _timed(len(events)):
        pass


def insert_rows(events: list[RecordedEvent], conn: psycopg.Connection[Any]) -> None:
    """One row per event into bench_py.insert_rows, in the checkpoint's
    transaction: ``executemany`` (psycopg pipelines it, so a batch is a few
    round trips, not one per row)."""
    with _timed(len(events)), conn.cursor() as cur:
        cur.executemany(INSERT_ROW, _rows(events))


async def insert_rows_async(
    events: list[RecordedEvent], conn: psycopg.AsyncConnection[Any]
) -> None:
    """The same as insert_rows, as a coroutine, into bench_py.insert_rows_async."""
    with _timed(len(events)):
        async with conn.cursor() as cur:
            await cur.executemany(INSERT_ROW_ASYNC, _rows(events))


# ---------------------------------------------------------------- latency


def record_live(events: list[RecordedEvent], conn: psycopg.Connection[Any]) -> None:
    """One row per event into bench_py.live; its applied_at is the
    clock_timestamp() of the insert, and its xmin the handler's transaction,
    whose commit record time (pg_xact_commit_timestamp) the benchmark reads
    when the server tracks commit timestamps."""
    with _timed(len(events)), conn.cursor() as cur:
        cur.executemany(INSERT_LIVE, _rows(events))


# ---------------------------------------------------------------- I/O-bound


def io_bound(events: list[RecordedEvent], conn: psycopg.Connection[Any]) -> None:
    """Waits as if calling a remote service: SETTINGS.io_sleep_seconds per
    event (or per batch), then records the batch in bench_py.io_batches
    (with this process's pid, the first event's stream, for its partition,
    and the event ids, to check that none was handled twice)."""
    if not events:
        return
    with _timed(len(events)):
        waits = len(events) if SETTINGS.io_sleep_per_event else 1
        for _ in range(waits):
            time.sleep(SETTINGS.io_sleep_seconds)
        conn.execute(
            INSERT_IO_BATCH,
            (os.getpid(), len(events), events[0].stream_id, [e.event_id for e in events]),
        )


async def io_bound_async(events: list[RecordedEvent], conn: psycopg.AsyncConnection[Any]) -> None:
    """io_bound as a coroutine: asyncio.sleep instead of time.sleep."""
    if not events:
        return
    with _timed(len(events)):
        waits = len(events) if SETTINGS.io_sleep_per_event else 1
        for _ in range(waits):
            await asyncio.sleep(SETTINGS.io_sleep_seconds)
        await conn.execute(
            INSERT_IO_BATCH,
            (os.getpid(), len(events), events[0].stream_id, [e.event_id for e in events]),
        )
