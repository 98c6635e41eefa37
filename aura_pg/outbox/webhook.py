"""The HTTP webhook sink of the relay: one POST per message over its own
connection, with a reader for just enough HTTP/1.1 to judge the answer."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from typing import Final
from urllib.parse import urlsplit

from aura_pg.outbox.sinks import (
    DEFAULT_PUBLISH_TIMEOUT,
    DeliveryError,
    OutboxMessage,
    SinkUnavailable,
    without_headers,
)

# The relay keeps the start of an error answer's body in last_error.
_ERROR_BODY_BYTES: Final = 200


def check_webhook_url(url: str) -> str:
    """``url`` if it is an absolute http(s) URL without credentials; else ValueError."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"invalid webhook URL {url!r}: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"webhook URL {url!r} must be http:// or https:// with a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("webhook URLs cannot carry credentials")
    if port == 0 or any(ch in url for ch in "\r\n\t "):
        raise ValueError(f"invalid webhook URL {url!r}")
    if not (parts.path + parts.query).isascii():
        raise ValueError(f"webhook URL {url!r}: percent-encode the path and query")
    try:
        parts.hostname.encode("idna")
    except UnicodeError as exc:
        raise ValueError(f"invalid webhook URL {url!r}: {exc}") from exc
    return url


class _BadAnswer(Exception):
    """The receiver's answer is not HTTP/1.x as the sink reads it."""


# Limits on an answer (as http.client's): the length of one status or
# header line, and the number of header lines.
_MAX_LINE: Final = 65536
_MAX_HEADERS: Final = 100


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise _BadAnswer(f"a line of the answer is longer than {_MAX_LINE} bytes") from None


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, str, dict[str, str]]:
    """Status, reason and headers (names in lower case) of the final answer,
    after any interim (1xx) ones."""
    while True:
        line = (await _read_line(reader)).rstrip(b"\r\n")
        version, _, rest = line.partition(b" ")
        code, _, reason = rest.partition(b" ")
        if not version.startswith(b"HTTP/1.") or len(code) != 3 or not code.isdigit():
            raise _BadAnswer(f"not an HTTP/1.x status line: {line[:80]!r}")
        headers: dict[str, str] = {}
        for _ in range(_MAX_HEADERS + 1):
            header = (await _read_line(reader)).rstrip(b"\r\n")
            if not header:
                break
            name, _, value = header.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        else:
            raise _BadAnswer(f"more than {_MAX_HEADERS} header lines")
        status = int(code)
        if not 100 <= status < 200 or status == 101:
            return status, reason.decode("latin-1").strip(), headers


async def _read_body_start(
    reader: asyncio.StreamReader, status: int, headers: Mapping[str, str], limit: int
) -> bytes:
    """Up to ``limit`` bytes of the body (the relay keeps the start of an
    error's body; the connection is closed after)."""
    if status in (204, 304):
        return b""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = b""
        while len(body) < limit:
            size_line = (await _read_line(reader)).split(b";")[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                raise _BadAnswer(f"bad chunk size {size_line[:20]!r}") from None
            if size == 0:
                break
            body += await reader.readexactly(min(size, limit - len(body)))
            if len(body) < limit:
                await reader.readexactly(2)  # the chunk's CRLF
        return body
    length = headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise _BadAnswer(f"bad Content-Length {length[:20]!r}")
        return await reader.readexactly(min(int(length), limit))
    body = b""
    while len(body) < limit:  # no length: the body ends when the connection does
        chunk = await reader.read(limit - len(body))
        if not chunk:
            break
        body += chunk
    return body


class WebhookSink:
    """POSTs the payload (JSON) to the URL configured for the row's topic, with
    ``Idempotency-Key: <message_id>`` and the row's headers. A 2xx answer is
    delivered; any other answer is a failed attempt; no complete answer
    within ``timeout`` (refused, slow, malformed) also pauses that webhook.
    Redirects are not followed.

    ``timeout`` bounds the whole exchange (connect, TLS, send, status,
    headers, the start of the body), not each socket operation: a receiver
    that trickles its answer cannot hold a batch open. The exchange runs on
    the event loop (no thread), so a stop can cancel it at once.
    """

    # Set by the sink; a row's headers cannot replace them.
    _RESERVED = ("Content-Type", "Content-Length", "Transfer-Encoding", "Host", "Connection")

    def __init__(
        self,
        urls: Mapping[str, str],
        *,
        name: str = "webhook",
        timeout: float = DEFAULT_PUBLISH_TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if not urls:
            raise ValueError("WebhookSink needs at least one NAME=URL")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, not {timeout!r}")
        self._urls = {topic: check_webhook_url(url) for topic, url in urls.items()}
        self.name = name
        self.topics: frozenset[str] | None = frozenset(self._urls)
        self.timeout = timeout
        self._ssl_context = ssl_context

    def _tls(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            # Certificate and host name checks, as http.client's default.
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    def _request(self, url: str, message: OutboxMessage) -> bytes:
        parts = urlsplit(url)
        assert parts.hostname is not None  # checked in __init__
        default_port = 443 if parts.scheme == "https" else 80
        host = parts.hostname.encode("idna").decode("ascii")
        if ":" in host:
            host = f"[{host}]"
        if parts.port is not None and parts.port != default_port:
            host = f"{host}:{parts.port}"
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = {
            "Host": host,
            "Accept-Encoding": "identity",
            **without_headers(message.headers, [*self._RESERVED, "Idempotency-Key"]),
            "Content-Type": "application/json",
            "Idempotency-Key": str(message.message_id),
            "Content-Length": str(len(message.payload)),
            # One request per connection: no reuse, and a body without a
            # length ends with the connection.
            "Connection": "close",
        }
        lines = [f"POST {target} HTTP/1.1".encode("ascii")]
        # Values in UTF-8 (checked for control characters when the row was read).
        lines += [f"{key}: {value}".encode() for key, value in headers.items()]
        return b"\r\n".join(lines) + b"\r\n\r\n" + message.payload

    async def _exchange(self, url: str, message: OutboxMessage) -> tuple[int, str, bytes]:
        parts = urlsplit(url)
        assert parts.hostname is not None
        tls = parts.scheme == "https"
        reader, writer = await asyncio.open_connection(
            parts.hostname,
            parts.port or (443 if tls else 80),
            ssl=self._tls() if tls else None,
            server_hostname=parts.hostname if tls else None,
            limit=_MAX_LINE,
        )
        try:
            writer.write(self._request(url, message))
            await writer.drain()
            status, reason, headers = await _read_head(reader)
            body = await _read_body_start(reader, status, headers, _ERROR_BODY_BYTES)
            return status, reason, body
        finally:
            # At once, also when cancelled: no TLS close_notify, no lingering.
            writer.transport.abort()

    async def publish(self, message: OutboxMessage) -> None:
        url = self._urls.get(message.topic)
        if url is None:
            raise DeliveryError(f"no webhook named {message.topic!r} is configured")
        where = f"webhook {message.topic!r} ({urlsplit(url).hostname})"
        try:
            async with asyncio.timeout(self.timeout):
                status, reason, body = await self._exchange(url, message)
        except TimeoutError:
            raise SinkUnavailable(
                f"{where}: timed out: no complete answer within {self.timeout:g} s"
            ) from None
        except asyncio.IncompleteReadError:
            raise SinkUnavailable(f"{where}: the connection closed mid-answer") from None
        except (OSError, _BadAnswer) as exc:
            raise SinkUnavailable(f"{where}: {type(exc).__name__}: {exc}") from exc
        if not 200 <= status < 300:
            text = body.decode("utf-8", "replace")
            raise DeliveryError(
                f"webhook {message.topic!r} answered HTTP {status} {reason}: {text!r}"
            )
