"""A writer process appending at a steady pace, for projector fault tests.

    python -m tests.helpers.steady_writer DSN SECONDS RATE SEED [POISON_AT]

Appends single events of type A or B to a handful of streams at about RATE
events/s for SECONDS, each with {"sleep_ms": 1} so that projection batches
take long enough for kills to land mid-batch. With POISON_AT, the event of
that ordinal carries {"poison": true}. Prints the number of events appended.
"""

from __future__ import annotations

import random
import sys
import time

from aura_pg import EventStore, NewEvent


def main(dsn: str, seconds: float, rate: float, seed: int, poison_at: int | None) -> None:
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    appended = 0
    with EventStore.connect(dsn, max_size=1) as store:
        # Past POISON_AT however slow the machine is, so the poison event
        # always exists.
        while time.monotonic() < deadline or (poison_at is not None and appended <= poison_at):
            data: dict[str, object] = {"seed": seed, "n": appended, "sleep_ms": 1}
            if appended == poison_at:
                data["poison"] = True
            store.append(f"steady-{seed}-{rng.randint(0, 9)}", [NewEvent(rng.choice("AB"), data)])
            appended += 1
            time.sleep(1.0 / rate)
    print(appended, flush=True)


if __name__ == "__main__":
    main(
        sys.argv[1],
        float(sys.argv[2]),
        float(sys.argv[3]),
        int(sys.argv[4]),
        int(sys.argv[5]) if len(sys.argv) > 5 else None,
    )
