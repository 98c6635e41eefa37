"""A writer process for concurrency tests.

    python -m tests.helpers.append_writer DSN COUNT SEED      appends COUNT batches
    python -m tests.helpers.append_writer DSN hold STREAM     appends and holds the transaction

In the first form it appends batches of 1-5 events to a handful of streams,
sometimes holding its transaction open a little so that commits land out of
position order, and prints one event id per line. In the second form it
appends 50 events to STREAM inside a transaction, prints "appended" and sleeps,
waiting to be killed.
"""

from __future__ import annotations

import random
import sys
import time

from aura_pg import EventStore, NewEvent


def write_batches(dsn: str, count: int, seed: int) -> None:
    rng = random.Random(seed)
    with EventStore.connect(dsn, max_size=1) as store, store.pool.connection() as conn:
        for n in range(count):
            size = rng.randint(1, 5)
            batch = [NewEvent("WRITTEN", {"seed": seed, "n": n, "i": i}) for i in range(size)]
            with conn.transaction():
                store.append(f"stream-{rng.randint(0, 7)}", batch, conn=conn)
                if rng.random() < 0.3:
                    time.sleep(rng.random() * 0.02)
            for event in batch:
                print(event.event_id)
    sys.stdout.flush()


def hold(dsn: str, stream_id: str) -> None:
    with (
        EventStore.connect(dsn, max_size=1) as store,
        store.pool.connection() as conn,
        conn.transaction(),
    ):
        store.append(stream_id, [NewEvent("HELD", {"i": i}) for i in range(50)], conn=conn)
        print("appended", flush=True)
        time.sleep(600)


if __name__ == "__main__":
    if sys.argv[2] == "hold":
        hold(sys.argv[1], sys.argv[3])
    else:
        write_batches(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
