"""Webhook deliveries/s: the relay's WebhookSink against one connection per
POST (the sink before issue 23), to a local HTTP/1.1 receiver, in one run.

Two threading HTTP/1.1 servers on 127.0.0.1, plain HTTP and HTTPS (a
self-signed certificate for localhost that openssl makes; HTTPS is left
out without openssl, or with --no-tls), in a process of their own
(keep-alive; answer 204 to every POST after reading its body), receive
--messages POSTs per target, one at a time as the relay sends them (a
batch is published row after row), for each scheme:

  per-connection   a new TCP connection per POST (``Connection: close``),
                   the request written and the answer read on the event
                   loop: what WebhookSink did before issue 23
  sink             aura_pg.outbox.WebhookSink.publish, as the relay calls it

Each target runs --rounds times, alternating, and the best round counts.
Printed: deliveries/s and this (the relay's) process's CPU time per
delivery per target, and their ratios to per-connection of the same scheme. On a loaded
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
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event
from pathlib import Path
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


async def _post_per_connection(
    port: int, message: OutboxMessage, tls: ssl.SSLContext | None
) -> None:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=tls, server_hostname="localhost" if tls else None
    )
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


def _self_signed(directory: Path) -> tuple[Path, Path] | None:
    """A certificate for localhost and its key, made by openssl; None without it."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def _serve(
    ready: Connection, stop: Event, received: Synchronized[int], tls: tuple[Path, Path] | None
) -> None:
    ports = []
    servers = []
    for scheme in ("http", "https"):
        if scheme == "https" and tls is None:
            continue
        server = _Server(("127.0.0.1", 0), _Receiver)
        server.counter = received
        if scheme == "https":
            assert tls is not None
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            server.socket = context.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        ports.append(int(server.server_address[1]))
    ready.send(ports)
    stop.wait()
    for server in servers:
        server.shutdown()
        server.server_close()


Target = Callable[[OutboxMessage], Awaitable[None]]


async def _main(args: argparse.Namespace, certificates: Path) -> dict[str, tuple[float, float]]:
    tls_files = None if args.no_tls else _self_signed(certificates)
    # The receivers in a process of their own: it does not share this one's GIL.
    context = multiprocessing.get_context("spawn")
    ready, ready_child = context.Pipe()
    stop = context.Event()
    received = context.Value("q", 0)
    receiver = context.Process(
        target=_serve, args=(ready_child, stop, received, tls_files), daemon=True
    )
    receiver.start()
    ports: list[int] = ready.recv()
    payload = json.dumps({"n": 1, "pad": "x" * max(0, args.payload_bytes - 20)}).encode()

    targets: dict[str, Target] = {}
    sinks: list[WebhookSink] = []
    for scheme, port in zip(("http", "https"), ports, strict=False):
        tls: ssl.SSLContext | None = None
        if scheme == "https":
            assert tls_files is not None
            tls = ssl.create_default_context(cafile=str(tls_files[0]))
        sink = WebhookSink({"bench": f"{scheme}://localhost:{port}/hook"}, ssl_context=tls)
        sinks.append(sink)

        def per_connection(
            message: OutboxMessage, port: int = port, tls: ssl.SSLContext | None = tls
        ) -> Awaitable[None]:
            return _post_per_connection(port, message, tls)

        targets[f"{scheme} per-connection"] = per_connection
        targets[f"{scheme} sink"] = sink.publish
    best = dict.fromkeys(targets, (0.0, 0.0))
    try:
        for round_ in range(1, args.rounds + 1):
            for name, publish in targets.items():
                rate, cpu = await _round(publish, args.messages, payload)
                best[name] = max(best[name], (rate, cpu))
                print(
                    f"round {round_} {name:>20}: {rate:8.0f} deliveries/s, "
                    f"{cpu:5.2f} ms CPU per delivery (relay side)"
                )
    finally:
        for sink in sinks:
            close = getattr(sink, "close", None)  # the sink before issue 23 had none
            if close is not None:
                await close()
        stop.set()
        receiver.join(10)
    expected = args.messages * args.rounds * len(targets)
    if received.value != expected:
        raise SystemExit(f"the receivers got {received.value} POSTs, not {expected}")
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000, help="POSTs per target and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--payload-bytes", type=int, default=200)
    parser.add_argument("--no-tls", action="store_true", help="plain HTTP only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="aura-pg-bench-webhook-") as certificates:
        best = asyncio.run(_main(args, Path(certificates)))
    print()
    for name, (rate, cpu) in best.items():
        scheme = name.split()[0]
        reference, reference_cpu = best[f"{scheme} per-connection"]
        ratio = rate / reference if reference > 0 else float("nan")
        cpu_ratio = cpu / reference_cpu if reference_cpu > 0 else float("nan")
        print(
            f"{name:>20}: {rate:8.0f} deliveries/s  ({ratio:5.2f}x {scheme} per-connection), "
            f"{cpu:5.2f} ms CPU per delivery ({cpu_ratio:5.2f}x)"
        )


if __name__ == "__main__":
    main()
