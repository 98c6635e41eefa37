"""Handlers of the Python processors that tests/acceptance/test_processor_processes.py
runs in `aura-pg project` processes (catalog entries name them as
"tests.helpers.processor_handlers:<function>").

Each records every event it is given, one INSERT per event, into a table the
test creates, whose primary key on event_id refuses a second application of
an event outright; a bigserial column keeps the order of the inserts and a
column defaulting to pg_current_xact_id() the transaction (the batch):

    CREATE TABLE processed (
        seq       bigserial NOT NULL UNIQUE,
        event_id  uuid      PRIMARY KEY,
        stream_id text      NOT NULL,
        version   bigint    NOT NULL,
        tx        xid8      NOT NULL DEFAULT pg_current_xact_id()
    );

(``record_async``, ``hang`` and ``hang_async`` write to tables of the same
shape named ``processed_async``, ``hang_processed`` and ``hang_async_processed``;
``hang`` also notes its hangs in ``hang_notes (event_id uuid, note text)``.)

What an event's data asks for:
  "sleep_ms": N    the handler sleeps N ms on it (the steady writer's events
                   carry 1, so that kills land mid-batch);
  "poison": true   ``record`` and ``record_async`` raise on it, after the
                   events before it in the batch were inserted (the
                   rollback must take those back too);
  "hang": SECONDS  ``hang`` and ``hang_async`` sleep that long on it, then
                   insert it as if nothing happened (``hang`` blocks its
                   thread, ``hang_async`` awaits).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Final

import psycopg

from aura_pg.models import RecordedEvent

# One statement per table: the tables are the test's, their names fixed here.
INSERT_PROCESSED: Final = "INSERT INTO processed (event_id, stream_id, version) VALUES (%s, %s, %s)"
INSERT_PROCESSED_ASYNC: Final = (
    "INSERT INTO processed_async (event_id, stream_id, version) VALUES (%s, %s, %s)"
)
INSERT_HANG: Final = "INSERT INTO hang_processed (event_id, stream_id, version) VALUES (%s, %s, %s)"
INSERT_NOTE: Final = "INSERT INTO hang_notes (event_id, note) VALUES (%s, %s)"
INSERT_HANG_ASYNC: Final = (
    "INSERT INTO hang_async_processed (event_id, stream_id, version) VALUES (%s, %s, %s)"
)


class PoisonEvent(Exception):
    """Raised by ``record`` for an event whose data has "poison"."""


def _row(event: RecordedEvent) -> tuple[Any, ...]:
    return (event.event_id, event.stream_id, event.version)


def _sleep_seconds(event: RecordedEvent) -> float:
    return float(event.data.get("sleep_ms", 0)) / 1000.0


def _check_poison(event: RecordedEvent) -> None:
    if event.data.get("poison"):
        raise PoisonEvent(f"poison event {event.event_id} at {event.global_position}")


def record(events: list[RecordedEvent], conn: psycopg.Connection[Any]) -> None:
    """Inserts each event into ``processed``; raises on a poison event."""
    for event in events:
        _check_poison(event)
        time.sleep(_sleep_seconds(event))
        conn.execute(INSERT_PROCESSED, _row(event))


async def record_async(events: list[RecordedEvent], conn: psycopg.AsyncConnection[Any]) -> None:
    """``record`` as a coroutine, into ``processed_async``."""
    for event in events:
        _check_poison(event)
        await asyncio.sleep(_sleep_seconds(event))
        await conn.execute(INSERT_PROCESSED_ASYNC, _row(event))


def _note(dsn: str, event: RecordedEvent, note: str) -> None:
    """Records what a hanging handler does in ``hang_notes``, outside the
    batch's transaction (which may be gone by then)."""
    with psycopg.connect(dsn, autocommit=True) as side:
        side.execute(INSERT_NOTE, (event.event_id, note))


def hang(events: list[RecordedEvent], conn: psycopg.Connection[Any]) -> None:
    """Inserts each event into ``hang_processed``, blocking its thread for
    data["hang"] seconds first where it says so; then goes on inserting
    through ``conn`` as if the batch were still its own. Notes "started"
    before such a hang and "woke" after that insert (or its failure) in
    ``hang_notes``."""
    dsn = conn.info.dsn
    for event in events:
        seconds = float(event.data.get("hang", 0))
        if not seconds:
            time.sleep(_sleep_seconds(event))
            conn.execute(INSERT_HANG, _row(event))
            continue
        _note(dsn, event, "started")
        time.sleep(seconds)
        try:
            conn.execute(INSERT_HANG, _row(event))
        finally:
            _note(dsn, event, "woke")


async def hang_async(events: list[RecordedEvent], conn: psycopg.AsyncConnection[Any]) -> None:
    """``hang`` as a coroutine, into ``hang_async_processed``."""
    for event in events:
        await asyncio.sleep(float(event.data.get("hang", 0)) + _sleep_seconds(event))
        await conn.execute(INSERT_HANG_ASYNC, _row(event))
