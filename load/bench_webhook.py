"""Webhook deliveries/s: the relay's WebhookSink against one connection per
POST (the sink before issue 23), to a local HTTP/1.1 receiver, in one run.

A threading HTTP/1.1 server on 127.0.0.1, in a process of its own
(keep-alive; answers 204 to every POST after reading its body) receives
--messages POSTs per target, one at a time as the relay sends them (a
batch is published row after row):

  per-connection   a new TCP connection per POST (``Connection: close``),
                   the request written and the answer read on the event
                   loop: what WebhookSink did before issue 23
  sink             aura_pg.outbox.WebhookSink.publish, as the relay calls it

Each target runs --rounds times, alternating, and the best round counts.
Printed: deliveries/s and this (the relay's) process's CPU time per
delivery per target, and their ratios to per-connection. On a loaded
machine deliveries/s follow the scheduler (each POST waits for the
receiver process to run); the CPU time per delivery varies less.

    python load/bench_webhook.py                  # 3,000 POSTs per round, 3 rounds
    python load/bench_webhook.py --messages 10000 --payload-bytes 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event
from typing import Any

from aura_pg.outbox import OutboxMessage, WebhookSink


class _Receiver(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive unless the client says close
    disable_nagle_algorithm = True  # TCP_NODELAY, as production servers set it

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        counter = self.server.counter  # type: ignore[attr-defined]
        with counter.get_lock():
            counter.value += 1
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    counter: Synchronized[int]


def _message(payload: bytes, i: int) -> OutboxMessage:
    return OutboxMessage(
        id=i,
        sink="webhook",
        topic="bench",
        message_id=uuid.uuid4(),
        payload=payload,
        headers={"event_type": "Bench", "stream_id": f"bench-{i % 100}"},
        attempts=0,
    )


async def _post_per_connection(port: int, message: OutboxMessage) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = (
            f"POST /hook HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Content-Type: application/json\r\n"
            f"Idempotency-Key: {message.message_id}\r\n"
            f"Content-Length: {len(message.payload)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode("ascii") + message.payload)
        await writer.drain()
        status = await reader.readline()
        if b" 204 " not in status:
            raise RuntimeError(f"unexpected answer {status!r}")
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
    finally:
        writer.transport.abort()


async def _round(
    publish: Callable[[OutboxMessage], Awaitable[None]], messages: int, payload: bytes
) -> tuple[float, float]:
    """(deliveries/s, this process's CPU milliseconds per delivery)."""
    batch = [_message(payload, i) for i in range(messages)]
    started, cpu = time.perf_counter(), time.process_time()
    for message in batch:
        await publish(message)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    return messages / elapsed, cpu / messages * 1000


def _serve(ready: Connection, stop: Event, received: Synchronized[int]) -> None:
    server = _Server(("127.0.0.1", 0), _Receiver)
    server.counter = received
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ready.send(int(server.server_address[1]))
    stop.wait()
    server.shutdown()
    server.server_close()


async def _main(args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    # The receiver in a process of its own: it does not share this one's GIL.
    context = multiprocessing.get_context("spawn")
    ready, ready_child = context.Pipe()
    stop = context.Event()
    received = context.Value("q", 0)
    receiver = context.Process(target=_serve, args=(ready_child, stop, received), daemon=True)
    receiver.start()
    port = int(ready.recv())
    payload = json.dumps({"n": 1, "pad": "x" * max(0, args.payload_bytes - 20)}).encode()
    sink = WebhookSink({"bench": f"http://127.0.0.1:{port}/hook"})

    async def per_connection(message: OutboxMessage) -> None:
        await _post_per_connection(port, message)

    targets: dict[str, Callable[[OutboxMessage], Awaitable[None]]] = {
        "per-connection": per_connection,
        "sink": sink.publish,
    }
    best = dict.fromkeys(targets, (0.0, 0.0))
    try:
        for round_ in range(1, args.rounds + 1):
            for name, publish in targets.items():
                rate, cpu = await _round(publish, args.messages, payload)
                best[name] = max(best[name], (rate, cpu))
                print(
                    f"round {round_} {name:>15}: {rate:8.0f} deliveries/s, "
                    f"{cpu:5.2f} ms CPU per delivery (relay side)"
                )
    finally:
        close = getattr(sink, "close", None)
        if close is not None:
            await close()
        stop.set()
        receiver.join(10)
    expected = args.messages * args.rounds * len(targets)
    if received.value != expected:
        raise SystemExit(f"the receiver got {received.value} POSTs, not {expected}")
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000, help="POSTs per target and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--payload-bytes", type=int, default=200)
    args = parser.parse_args()
    best = asyncio.run(_main(args))
    reference, reference_cpu = best["per-connection"]
    print()
    for name, (rate, cpu) in best.items():
        ratio = rate / reference if reference > 0 else float("nan")
        cpu_ratio = cpu / reference_cpu if reference_cpu > 0 else float("nan")
        print(
            f"{name:>15}: {rate:8.0f} deliveries/s  ({ratio:5.2f}x per-connection), "
            f"{cpu:5.2f} ms CPU per delivery ({cpu_ratio:5.2f}x)"
        )


if __name__ == "__main__":
    main()
