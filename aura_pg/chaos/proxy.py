"""A TCP proxy in front of Postgres that adds latency, cuts connections and
refuses new ones, for fault injection without touching the host's network.

Clients connect to the proxy's port instead of the server's. Each chunk of
bytes is forwarded after the configured one-way delay, in both directions,
so a round trip gains twice the delay; order is kept. ``sever()`` aborts
every open connection at once, as a network partition or a dropped NAT
entry would, and ``refuse()`` closes new connections as soon as they are
accepted, as an unreachable server would look to libpq.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import Coroutine
from typing import Any, Self

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

_CHUNK = 65536


class LatencyProxy:
    """Forwards ``listen_host:port`` to ``upstream_host:upstream_port`` on a
    thread of its own. Thread-safe: every method may be called from any
    thread while the proxy runs."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.listen_host = listen_host
        self._listen_port = listen_port
        self._delay = 0.0
        self._refusing = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="chaos proxy")
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.Task[None]] = set()
        self.accepted = 0

    @classmethod
    def in_front_of(cls, dsn: str, **kwargs: Any) -> Self:
        """A proxy for the server that ``dsn`` (a TCP one) points at."""
        params = conninfo_to_dict(dsn)
        host = str(params.get("host") or "127.0.0.1")
        return cls(host, int(params.get("port") or 5432), **kwargs)

    # -- life cycle ---------------------------------------------------------

    def start(self) -> Self:
        self._thread.start()
        self._server = self._call(
            asyncio.start_server(self._accept, self.listen_host, self._listen_port)
        )
        return self

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def dsn(self, dsn: str) -> str:
        """``dsn`` with its host and port replaced by the proxy's."""
        return make_conninfo(dsn, host=self.listen_host, port=str(self.port))

    # -- faults -------------------------------------------------------------

    @property
    def delay(self) -> float:
        """Seconds each chunk waits before it is forwarded, each way."""
        return self._delay

    def set_delay(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a delay cannot be negative: {seconds}")
        self._delay = seconds

    def refuse(self, refusing: bool = True) -> None:
        """Close new connections at once (True) or forward them again (False)."""
        self._refusing = refusing

    @property
    def connections(self) -> int:
        return len(self._open)

    def sever(self) -> int:
        """Abort every open connection; the number aborted."""
        severed: int = self._call(self._sever())
        return severed

    # -- inside the loop ----------------------------------------------------

    def _call(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(30)

    async def _sever(self) -> int:
        tasks = list(self._open)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return len(tasks)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._sever()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one client. The forwarding runs as a task of its own, which
        ``sever()`` cancels; this handler itself always ends normally."""
        self.accepted += 1
        link = asyncio.create_task(self._link(reader, writer))
        self._open.add(link)
        try:
            await asyncio.gather(link, return_exceptions=True)
        finally:
            self._open.discard(link)
            writer.transport.abort()

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            return
        try:
            up_reader, upstream = await asyncio.open_connection(
                self.upstream_host, self.upstream_port
            )
        except OSError:
            return  # the server is down: the client sees a closed connection
        try:
            await asyncio.gather(self._pump(reader, upstream), self._pump(up_reader, writer))
        finally:
            upstream.transport.abort()

    async def _pump(self, source: asyncio.StreamReader, target: asyncio.StreamWriter) -> None:
        """Forward ``source`` to ``target``, each chunk after the delay in
        force when it arrived; when either side ends, abort ``target`` (the
        other pump then sees its source end too)."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    return
                wait = due - self._loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                target.write(data)
                await target.drain()

        sender = asyncio.create_task(send())
        try:
            while not sender.done():
                data = await source.read(_CHUNK)
                queue.put_nowait((self._loop.time() + self._delay, data))
                if not data:
                    break
            await sender
        except OSError:  # ConnectionError included: a side went away
            pass
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            target.transport.abort()


def measure_round_trip(dsn: str, samples: int = 20) -> float:
    """The median seconds of a ``SELECT 1`` round trip on one connection
    to ``dsn`` (connecting excluded)."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        conn.execute("SELECT 1")
        times = []
        for _ in range(samples):
            started = time.perf_counter()
            conn.execute("SELECT 1")
            times.append(time.perf_counter() - started)
    return statistics.median(times)
