"""Create (or bring up to date) the JetStream stream `aura-pg relay`
publishes to: AURA, subjects ``aura.>``, file storage, a 15-minute
duplicate window (docs/outbox.md). Idempotent; waits up to --wait seconds
for the server. docker-compose.yml runs it once, as the service
``nats-stream``, before the relay starts.

    python deploy/nats/create_stream.py --server nats://nats:4222
"""

from __future__ import annotations

import argparse
import asyncio
import time

import nats
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import NotFoundError

DUPLICATE_WINDOW_SECONDS = 15 * 60


async def create_stream(server: str, name: str, subjects: list[str], wait: float) -> str:
    deadline = time.monotonic() + wait
    while True:
        try:
            client = await nats.connect(server, allow_reconnect=False, connect_timeout=2)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(1)
    try:
        jetstream = client.jetstream()
        config = StreamConfig(
            name=name,
            subjects=subjects,
            storage=StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW_SECONDS,
        )
        try:
            await jetstream.stream_info(name)
        except NotFoundError:
            await jetstream.add_stream(config)
            return f"stream {name} created: subjects {', '.join(subjects)}"
        await jetstream.update_stream(config)
        return f"stream {name} up to date: subjects {', '.join(subjects)}"
    finally:
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default="nats://nats:4222")
    parser.add_argument("--stream", default="AURA")
    parser.add_argument("--subjects", nargs="+", default=["aura.>"])
    parser.add_argument("--wait", type=float, default=60.0, help="seconds to wait for NATS")
    args = parser.parse_args()
    print(asyncio.run(create_stream(args.server, args.stream, args.subjects, args.wait)))


if __name__ == "__main__":
    main()
