"""A real HTTP receiver that answers slowly, byte by byte (the relay's
webhook deadline tests): a socket server in a thread that reads the request,
then drips its answer one byte every ``interval`` seconds.

Each byte restarts a per-socket-operation timeout, so only a deadline over
the whole exchange stops a client waiting for such an answer.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field


@dataclass
class DripServer:
    """Answers every POST with ``head`` then ``drip`` (one byte every
    ``interval`` s), then ``tail``. ``requests`` counts requests read in full;
    ``arrived`` is set at the first; ``closed_after`` holds, per connection,
    the seconds from the request to the client closing the connection (None:
    still open when the answer was complete)."""

    head: bytes = b"HTTP/1.1 200 OK\r\n"
    drip: bytes = b"X-Drip: " + b"." * 60 + b"\r\n"
    tail: bytes = b"Content-Length: 2\r\nConnection: close\r\n\r\nok"
    interval: float = 0.5
    requests: int = 0
    arrived: threading.Event = field(default_factory=threading.Event)
    closed_after: list[float | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        port: int = self._listener.getsockname()[1]
        return port

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _read_request(self, conn: socket.socket) -> bool:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return False
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                return False
            body += chunk
        return True

    def _answer(self, conn: socket.socket) -> None:
        index = len(self.closed_after)
        self.closed_after.append(None)
        with conn:
            conn.settimeout(60)
            try:
                if not self._read_request(conn):
                    return
                started = time.monotonic()
                self.requests += 1
                self.arrived.set()
                conn.sendall(self.head)
                for byte in self.drip:
                    if self._stop.wait(self.interval):
                        return
                    conn.sendall(bytes([byte]))
                conn.sendall(self.tail)
            except OSError:
                # The client gave up: the connection is reset or closed.
                self.closed_after[index] = time.monotonic() - started
                return
            # The answer is complete: wait for the client to close.
            try:
                conn.settimeout(5)
                conn.recv(1)
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(5)
