"""The HTTP webhook sink of the relay: one POST per message through an
``httpx.AsyncClient`` whose keep-alive pool reuses the connection to each
receiver (issue 23; before, a new connection per message)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

from aura_pg.outbox.sinks import (
    APPLICATION_NAME,
    DEFAULT_PUBLISH_TIMEOUT,
    DeliveryError,
    OutboxMessage,
    SinkUnavailable,
    without_headers,
)

if TYPE_CHECKING:
    import httpx

# The relay keeps the start of an error answer's body in last_error.
_ERROR_BODY_BYTES: Final = 200
# The body of an answer is read up to this many bytes so that the
# connection can carry the next POST; a longer body closes the connection.
_DRAIN_BYTES: Final = 64 * 1024
# Idle keep-alive connections are dropped after this many seconds: shorter
# than common servers' idle timeouts (5 s and up), so a POST seldom meets a
# connection the receiver is closing.
KEEPALIVE_EXPIRY: Final = 2.0
DEFAULT_MAX_CONNECTIONS: Final = 10


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


def _cause(exc: BaseException) -> str:
    """The name and text of the deepest OSError under an httpx error (what
    the receiver did: ``ConnectionRefusedError: ...``, not anyio's "All
    connection attempts failed"), else of ``exc`` itself."""
    found: BaseException = exc
    inner: BaseException | None = exc
    for _ in range(20):  # a chain, not a cycle
        if inner is None:
            break
        if isinstance(inner, OSError):
            found = inner
        if isinstance(inner, BaseExceptionGroup) and inner.exceptions:
            inner = inner.exceptions[0]
        else:
            inner = inner.__cause__ or inner.__context__
    return f"{type(found).__name__}: {found}"


class WebhookSink:
    """POSTs the payload (JSON) to the URL configured for the row's topic, with
    ``Idempotency-Key: <message_id>`` and the row's headers. A 2xx answer is
    delivered; any other answer is a failed attempt; no complete answer
    within ``timeout`` (refused, slow, malformed) also pauses that webhook.
    Redirects are not followed, cookies are not kept, proxy settings of the
    environment are not used.

    Connections are kept alive and reused (``httpx.AsyncClient``, at most
    ``max_connections`` in all; idle ones close after ``KEEPALIVE_EXPIRY``
    seconds). A POST that fails before its status line arrives (sent on a
    connection the receiver has just closed, a reset, or an answer that is
    not HTTP) is sent once more, on a new connection: the receiver
    deduplicates by ``Idempotency-Key``, as for any redelivery.

    ``timeout`` bounds the whole exchange (connect, TLS, send, status,
    headers, the body), not each socket operation: a receiver that trickles
    its answer cannot hold a batch open. The exchange runs on the event loop
    (no thread), so a stop can cancel it at once; a cancelled exchange
    closes its connection.
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
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        if not urls:
            raise ValueError("WebhookSink needs at least one NAME=URL")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, not {timeout!r}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections!r}")
        self._urls = {topic: check_webhook_url(url) for topic, url in urls.items()}
        self.name = name
        self.topics: frozenset[str] | None = frozenset(self._urls)
        self.timeout = timeout
        self.max_connections = max_connections
        self._ssl_context = ssl_context
        self._client: httpx.AsyncClient | None = None

    def _tls(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            # The system's certificates, host name checks (not certifi's bundle).
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            import httpx

            self._client = httpx.AsyncClient(
                verify=self._tls(),
                follow_redirects=False,
                trust_env=False,
                # The deadline is over the whole exchange (publish), not per operation.
                timeout=httpx.Timeout(None),
                limits=httpx.Limits(
                    max_connections=self.max_connections,
                    max_keepalive_connections=self.max_connections,
                    keepalive_expiry=KEEPALIVE_EXPIRY,
                ),
                headers={"User-Agent": APPLICATION_NAME, "Accept-Encoding": "identity"},
            )
        return self._client

    def _headers(self, message: OutboxMessage) -> list[tuple[bytes, bytes]]:
        # Values in UTF-8 (checked for control characters when the row was read).
        headers = {
            **without_headers(message.headers, [*self._RESERVED, "Idempotency-Key"]),
            "Content-Type": "application/json",
            "Idempotency-Key": str(message.message_id),
        }
        return [(key.encode("ascii"), value.encode()) for key, value in headers.items()]

    async def _exchange(self, url: str, message: OutboxMessage) -> tuple[int, str, bytes]:
        import httpx

        client = self._http()
        for attempt in (1, 2):
            request = client.build_request(
                "POST", url, content=message.payload, headers=self._headers(message)
            )
            try:
                response = await client.send(request, stream=True)
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
                # A kept-alive connection the receiver closed; a new one once.
                if attempt == 2:
                    raise
                continue
            try:
                body = b""
                read = 0
                # Read (most of) the body so that the connection can be reused;
                # keep its start for last_error.
                async for chunk in response.aiter_raw():
                    if len(body) < _ERROR_BODY_BYTES:
                        body += chunk[: _ERROR_BODY_BYTES - len(body)]
                    read += len(chunk)
                    if read >= _DRAIN_BYTES:
                        break
                return response.status_code, response.reason_phrase, body
            finally:
                # Back to the pool when read in full; else (also when
                # cancelled) the connection is closed.
                await response.aclose()
                client.cookies.clear()
        raise AssertionError("unreachable")  # pragma: no cover

    async def publish(self, message: OutboxMessage) -> None:
        try:
            import httpx
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise SinkUnavailable(
                "the webhook sink needs httpx: pip install 'aura-pg[webhook]'"
            ) from exc

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
        except (httpx.TransportError, OSError) as exc:
            raise SinkUnavailable(f"{where}: {_cause(exc)}") from exc
        if not 200 <= status < 300:
            text = body.decode("utf-8", "replace")
            raise DeliveryError(
                f"webhook {message.topic!r} answered HTTP {status} {reason}: {text!r}"
            )

    async def close(self) -> None:
        """Close the kept-alive connections (the relay calls it when it stops)."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
