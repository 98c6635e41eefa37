"""The writer processes of load/reliability.py.

Each writer appends batches of 1 to ``max_batch`` events to streams of its
own, with ``AppendRetry`` riding out every fault the run injects, and
writes one JSON line per append to its log file, flushed at once: the event
ids and the global positions the store reported, or, when the retry budget
ran out, the event ids whose fate is unknown. The parent checks the log
files against ``aura.events`` at the end, so a writer process that dies
with its log loses nothing it was told.

Every event carries ``{"w": writer, "n": ordinal}``: two rows with the same
pair would be the same event stored twice under different ids. Every
``poison_every``-th event also carries ``"poison": true``, which the
reliability projections refuse to apply: those, and only those, must end
in the dead letters.
"""

from __future__ import annotations

import json
import random
import time
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path

import psycopg
from psycopg_pool import PoolTimeout

from aura_pg.models import NewEvent
from aura_pg.store import EventStore
from aura_pg.store.retry import AppendRetry

TYPES = ("A", "B", "C")
STREAMS_PER_WRITER = 20


def writer_main(
    dsn: str,
    number: int,
    seed: int,
    stop: MpEvent,
    log_path: str,
    last_ok: Synchronized[float],
    max_batch: int,
    poison_every: int,
    retry_budget: float,
    rate: float,
) -> None:
    """Append until ``stop`` is set, at about ``rate`` events/s (0: as fast
    as the store goes). After an outage a writer catches up with at most one
    second of its schedule, as a client with a short queue would."""
    rng = random.Random(seed * 1000 + number)
    retry = AppendRetry(attempts=10_000, base_delay=0.02, max_delay=0.5, budget=retry_budget)
    ordinal = 0
    due = time.monotonic()
    with Path(log_path).open("a", encoding="utf-8") as log:
        while not stop.is_set():
            try:
                store = EventStore.connect(dsn, max_size=1, timeout=5)
            except (psycopg.OperationalError, PoolTimeout):
                time.sleep(0.2)  # the server is down: opening the pool waits it out
                continue
            with store:
                while not stop.is_set():
                    if rate:
                        now = time.monotonic()
                        if due > now:
                            time.sleep(due - now)
                        due = max(due, now - 1.0)
                    events = []
                    for _ in range(rng.randint(1, max_batch)):
                        data: dict[str, object] = {"w": number, "n": ordinal}
                        if poison_every and ordinal % poison_every == poison_every - 1:
                            data["poison"] = True
                        events.append(NewEvent(rng.choice(TYPES), data))
                        ordinal += 1
                    if rate:
                        due += len(events) / rate
                    stream = f"rel-{number}-{rng.randrange(STREAMS_PER_WRITER)}"
                    ids = [str(event.event_id) for event in events]
                    try:
                        result = store.append(stream, events, retry=retry)
                    except (psycopg.Error, PoolTimeout) as exc:
                        # The budget ran out: these may or may not be stored.
                        lost = {"unknown": ids, "error": f"{type(exc).__name__}: {exc}"}
                        log.write(json.dumps(lost) + "\n")
                        log.flush()
                        continue
                    line: dict[str, object] = {
                        "ids": ids,
                        "positions": [event.global_position for event in result.events],
                        "duplicate": result.duplicate,
                    }
                    log.write(json.dumps(line) + "\n")
                    log.flush()
                    last_ok.value = time.monotonic()
