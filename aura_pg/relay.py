"""``aura-pg relay``: publish the transactional outbox (``aura.outbox``).

Each batch is one transaction: claim due pending rows (``FOR UPDATE SKIP
LOCKED``, so relays can run side by side), publish them, record the outcome
(delivered, or a failed attempt with a backoff, or dead after the last
attempt), commit. A relay or broker that dies mid-batch rolls the batch back
and its rows are published again later: delivery is at least once, and every
message carries its ``message_id`` (NATS ``Nats-Msg-Id``, HTTP
``Idempotency-Key``) for receivers to drop duplicates.

Sinks: NATS JetStream (``--nats-server``, needs the ``nats`` extra) and HTTP
webhooks (``--webhook NAME=URL``). A relay claims only the rows of the sinks
(and, for webhooks, the names) it is configured for.

The SQL is in ``sql/queries/relay.sql``; docs/outbox.md is the operator guide.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Protocol, Self, runtime_checkable
from urllib.parse import urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow

from aura_pg._resources import named_queries
from aura_pg.errors import AuraPgError
from aura_pg.observability import metrics

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.js import JetStreamContext

log = logging.getLogger("aura_pg.relay")

_QUERIES: Final = named_queries("queries/relay.sql")

APPLICATION_NAME: Final = "aura-pg relay"
DEFAULT_BATCH_SIZE: Final = 100
DEFAULT_POLL_INTERVAL: Final = 0.5
DEFAULT_MAX_ATTEMPTS: Final = 20
DEFAULT_PUBLISH_TIMEOUT: Final = 5.0
DEFAULT_BACKOFF_BASE: Final = 1.0
DEFAULT_BACKOFF_MAX: Final = 600.0
DEFAULT_CONNECT_TIMEOUT: Final = 10
DEFAULT_SHUTDOWN_TIMEOUT: Final = 30.0
# last_error keeps the start of long messages (HTTP bodies, tracebacks).
_MAX_ERROR_LENGTH: Final = 1000
_ERROR_BODY_BYTES: Final = 200

# RFC 9110 token: what both HTTP and NATS accept as a header name.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Control characters other than tab would break (or be silently rewritten
# in) an HTTP or NATS header.
_HEADER_VALUE_INVALID = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class DeliveryError(AuraPgError):
    """This message was not delivered; the relay records a failed attempt."""


class SinkUnavailable(DeliveryError):
    """The sink itself failed (unreachable, no answer in time), not just this
    message: the relay also pauses the sink and leaves its other rows in the
    batch untouched, so an outage costs one timeout per pause, not one per row."""


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """One claimed ``aura.outbox`` row, ready to publish."""

    id: int
    sink: str
    topic: str
    message_id: uuid.UUID
    payload: bytes
    """The row's ``payload`` as JSON text, UTF-8."""
    headers: Mapping[str, str]
    """The row's ``headers`` object; non-string values as JSON text."""
    attempts: int
    """Attempts before this one."""


class Sink(Protocol):
    """Where the rows of one ``aura.outbox.sink`` value go."""

    @property
    def name(self) -> str:
        """The ``sink`` column value this sink publishes."""
        ...

    @property
    def topics(self) -> frozenset[str] | None:
        """The topics served, each paused on its own; None: every topic, paused together."""
        ...

    async def publish(self, message: OutboxMessage) -> None:
        """Deliver the message, or raise DeliveryError (SinkUnavailable)."""
        ...


@runtime_checkable
class ClosableSink(Protocol):
    """A sink holding a connection, which the relay closes when it stops."""

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with equal jitter: retry ``n`` (1-based) waits
    between half and all of ``min(cap, base * 2**(n-1))`` seconds.

    The jitter spreads retries of rows that failed together; the cap bounds
    every wait.
    """

    base: float = DEFAULT_BACKOFF_BASE
    cap: float = DEFAULT_BACKOFF_MAX

    def __post_init__(self) -> None:
        if not 0 < self.base <= self.cap:
            raise ValueError(f"backoff needs 0 < base <= cap, not {self.base}, {self.cap}")

    def ceiling(self, attempt: int) -> float:
        return min(self.cap, self.base * 2.0 ** min(max(attempt, 1) - 1, 1023))

    def delay(self, attempt: int) -> float:
        ceiling = self.ceiling(attempt)
        return ceiling / 2 + random.uniform(0, ceiling / 2)


@dataclass(slots=True)
class RelayStats:
    """What a run did: ``batches`` that claimed rows, rows ``delivered``,
    ``failed`` attempts (including those that made a row ``dead``). Rows a
    paused sink left untouched are not counted."""

    batches: int = 0
    delivered: int = 0
    failed: int = 0
    dead: int = 0

    def add(self, other: RelayStats) -> None:
        self.batches += other.batches
        self.delivered += other.delivered
        self.failed += other.failed
        self.dead += other.dead


def _error_text(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, DeliveryError) else f"{type(exc).__name__}: {exc}"
    # text columns cannot hold NUL.
    return text.replace("\x00", "")[:_MAX_ERROR_LENGTH]


def _header_strings(headers: object) -> dict[str, str]:
    if not isinstance(headers, dict):
        raise DeliveryError(f"headers must be a JSON object, not {type(headers).__name__}")
    result: dict[str, str] = {}
    for key, value in headers.items():
        text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        if not _HEADER_NAME.fullmatch(key):
            raise DeliveryError(f"header name {key!r} is not a valid HTTP/NATS header name")
        if _HEADER_VALUE_INVALID.search(text):
            raise DeliveryError(f"header {key!r} has control characters in its value")
        result[key] = text
    return result


def _without(headers: Mapping[str, str], names: Iterable[str]) -> dict[str, str]:
    """``headers`` minus ``names``, compared case-insensitively."""
    drop = {name.lower() for name in names}
    return {key: value for key, value in headers.items() if key.lower() not in drop}


class NatsSink:
    """Publishes to NATS JetStream: subject = topic, header ``Nats-Msg-Id`` =
    message_id (JetStream drops a duplicate within the stream's duplicate
    window), and waits for the stream's PubAck.

    One connection, opened on first use and reopened after a failure; the
    client's own reconnection is off, so a publish never sits in a buffer
    that outlives the relay's record of it.
    """

    def __init__(
        self,
        servers: Sequence[str],
        *,
        name: str = "nats",
        timeout: float = DEFAULT_PUBLISH_TIMEOUT,
        connect_timeout: int = 2,
    ) -> None:
        if not servers:
            raise ValueError("NatsSink needs at least one server URL")
        self.servers = list(servers)
        self.name = name
        self.topics: frozenset[str] | None = None
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._client: NatsClient | None = None
        self._jetstream: JetStreamContext | None = None

    async def _on_error(self, exc: Exception) -> None:
        # Failures reach the relay as exceptions; the client's own report is detail.
        log.debug("NATS client: %r", exc)

    async def _connected(self) -> JetStreamContext:
        if self._client is not None and self._client.is_connected and self._jetstream is not None:
            return self._jetstream
        await self.close()
        try:
            import nats
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise SinkUnavailable(
                "the NATS sink needs nats-py: pip install 'aura-pg[nats]'"
            ) from exc
        try:
            # One attempt per server (the library counts the first try as
            # attempt 0), no wait in between; the relay's pause is the backoff.
            client = await nats.connect(
                servers=self.servers,
                name=APPLICATION_NAME,
                allow_reconnect=False,
                max_reconnect_attempts=1,
                reconnect_time_wait=0,
                connect_timeout=self.connect_timeout,
                error_cb=self._on_error,
            )
        except Exception as exc:
            raise SinkUnavailable(f"cannot connect to NATS: {type(exc).__name__}: {exc}") from exc
        self._client = client
        self._jetstream = client.jetstream(timeout=self.timeout)
        return self._jetstream

    async def publish(self, message: OutboxMessage) -> None:
        from nats import errors as nats_errors
        from nats.js import errors as js_errors

        jetstream = await self._connected()
        headers = _without(message.headers, ["Nats-Msg-Id"])
        headers["Nats-Msg-Id"] = str(message.message_id)
        try:
            ack = await jetstream.publish(message.topic, message.payload, headers=headers)
        except js_errors.NoStreamResponseError as exc:
            raise DeliveryError(
                f"NATS: no JetStream stream stores subject {message.topic!r}"
            ) from exc
        except js_errors.ServiceUnavailableError as exc:
            raise SinkUnavailable(f"NATS JetStream unavailable: {exc}") from exc
        except js_errors.APIError as exc:
            raise DeliveryError(f"NATS JetStream refused the message: {exc}") from exc
        except (
            nats_errors.BadSubjectError,
            nats_errors.BadHeaderError,
            nats_errors.MaxPayloadError,
        ) as exc:
            raise DeliveryError(
                f"NATS refused the message ({type(exc).__name__}): subject {message.topic!r}"
            ) from exc
        except (nats_errors.Error, OSError) as exc:
            # No PubAck in time, or the connection went away.
            await self.close()
            raise SinkUnavailable(f"NATS: {type(exc).__name__}: {exc}") from exc
        if ack.duplicate:
            log.debug("NATS stream %s already had message %s", ack.stream, message.message_id)

    async def close(self) -> None:
        client, self._client, self._jetstream = self._client, None, None
        if client is not None and not client.is_closed:
            with contextlib.suppress(Exception):
                await client.close()


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
            **_without(message.headers, [*self._RESERVED, "Idempotency-Key"]),
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


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less if ``stop`` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


# A paused sink endpoint: (sink name, topic), topic None for a sink that
# serves every topic as one endpoint.
_Endpoint = tuple[str, str | None]


class _GaveUp(Exception):
    """The shutdown timeout ran out before the publish in flight ended."""


@dataclass(slots=True)
class _Pause:
    failures: int = 0
    until: float = 0.0


class Relay:
    """Publishes due ``aura.outbox`` rows of the given sinks.

    ``run_once()`` drains what is due and returns; ``run()`` polls until
    ``stop`` is set, reconnecting (with backoff) when the database
    connection drops. Both finish the batch in flight before returning, for
    at most ``shutdown_timeout`` seconds after ``stop`` is set: then the
    publish in flight is cancelled, it and the rows not tried yet are left
    as they were (published again later), and the outcomes known commit.
    Use as ``async with Relay(...) as relay`` to close the connections.
    """

    def __init__(
        self,
        dsn: str,
        sinks: Iterable[Sink],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        backoff: Backoff | None = None,
        reconnect_backoff: Backoff | None = None,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
    ) -> None:
        self.sinks: dict[str, Sink] = {}
        for sink in sinks:
            if sink.name in self.sinks:
                raise ValueError(f"two sinks named {sink.name!r}")
            self.sinks[sink.name] = sink
        if not self.sinks:
            raise ValueError("a relay needs at least one sink")
        if batch_size < 1 or max_attempts < 1 or not poll_interval > 0 or not shutdown_timeout > 0:
            raise ValueError(
                "batch_size, max_attempts, poll_interval and shutdown_timeout must be positive"
            )
        self.dsn = dsn
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.max_attempts = max_attempts
        self.backoff = backoff or Backoff()
        self.reconnect_backoff = reconnect_backoff or Backoff(base=0.5, cap=30.0)
        self.shutdown_timeout = shutdown_timeout
        # Set shutdown_timeout after a stop: the batch in flight gives up.
        self._give_up = asyncio.Event()
        self._conn: psycopg.AsyncConnection[TupleRow] | None = None
        self._pauses: dict[_Endpoint, _Pause] = {}

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._drop_connection()
        for sink in self.sinks.values():
            if isinstance(sink, ClosableSink):
                await sink.close()

    # -- the database connection ------------------------------------------

    async def _connection(self) -> psycopg.AsyncConnection[TupleRow]:
        if self._conn is None or self._conn.closed:
            given = conninfo_to_dict(self.dsn)
            extra: dict[str, Any] = {}
            if "application_name" not in given:
                extra["application_name"] = APPLICATION_NAME
            if "connect_timeout" not in given:
                extra["connect_timeout"] = DEFAULT_CONNECT_TIMEOUT
            self._conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=False, **extra)
        return self._conn

    async def _drop_connection(self) -> None:
        """Close the connection; an open transaction rolls back with it."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                await conn.close()

    # -- pausing failed sinks ---------------------------------------------

    def _endpoint(self, sink: Sink, topic: str) -> _Endpoint:
        return (sink.name, None if sink.topics is None else topic)

    def _paused(self, endpoint: _Endpoint) -> bool:
        pause = self._pauses.get(endpoint)
        return pause is not None and time.monotonic() < pause.until

    def _pause(self, endpoint: _Endpoint) -> float:
        pause = self._pauses.setdefault(endpoint, _Pause())
        pause.failures += 1
        delay = self.backoff.delay(pause.failures)
        pause.until = time.monotonic() + delay
        return delay

    def _claim_params(self) -> dict[str, Any] | None:
        """The claim's filter: the endpoints not paused now (None: all paused)."""
        any_topic: list[str] = []
        sinks: list[str] = []
        topics: list[str] = []
        for sink in self.sinks.values():
            if sink.topics is None:
                if not self._paused((sink.name, None)):
                    any_topic.append(sink.name)
                continue
            for topic in sorted(sink.topics):
                if not self._paused((sink.name, topic)):
                    sinks.append(sink.name)
                    topics.append(topic)
        if not any_topic and not sinks:
            return None
        return {
            "any_topic_sinks": any_topic,
            "sinks": sinks,
            "topics": topics,
            "limit": self.batch_size,
        }

    # -- one batch --------------------------------------------------------

    async def _publish(self, row: tuple[Any, ...]) -> BaseException | None:
        """Publish one claimed row: None, or the reason it failed."""
        row_id, sink_name, topic, message_id, payload, headers, attempts = row
        sink = self.sinks[sink_name]
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            message = OutboxMessage(
                id=row_id,
                sink=sink_name,
                topic=topic,
                message_id=message_id,
                payload=payload.encode("utf-8"),
                headers=_header_strings(headers),
                attempts=attempts,
            )
            await sink.publish(message)
        except DeliveryError as exc:
            error = exc
        except Exception as exc:
            # A sink's bug must not stop the relay: the row records it.
            log.exception("sink %s failed on outbox row %s", sink_name, row_id)
            error = exc
        metrics.record_delivery(sink_name, time.perf_counter() - started, delivered=error is None)
        return error

    async def _publish_or_give_up(self, row: tuple[Any, ...]) -> BaseException | None:
        """``_publish(row)``; _GaveUp when the shutdown timeout ran out first
        (the publish is cancelled: the row stays as it was)."""
        if self._give_up.is_set():
            raise _GaveUp
        publishing = asyncio.ensure_future(self._publish(row))
        giving_up = asyncio.ensure_future(self._give_up.wait())
        try:
            await asyncio.wait((publishing, giving_up), return_when=asyncio.FIRST_COMPLETED)
        finally:
            giving_up.cancel()
            if not publishing.done():
                publishing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await publishing
        if publishing.cancelled():
            raise _GaveUp
        return publishing.result()

    async def _watch_shutdown(self, stop: asyncio.Event) -> None:
        """Once ``stop`` is set, give the batch in flight ``shutdown_timeout``."""
        await stop.wait()
        await asyncio.sleep(self.shutdown_timeout)
        self._give_up.set()

    @contextlib.asynccontextmanager
    async def _shutdown_deadline(self, stop: asyncio.Event | None) -> AsyncIterator[None]:
        self._give_up.clear()
        if stop is None:
            yield
            return
        watch = asyncio.create_task(self._watch_shutdown(stop))
        try:
            yield
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch

    async def _batch(self) -> tuple[int, RelayStats]:
        """Claim, publish, record, commit: (rows claimed, what was recorded)."""
        params = self._claim_params()
        if params is None:
            return 0, RelayStats()
        conn = await self._connection()
        try:
            async with conn.cursor() as cur:
                await cur.execute(_QUERIES["claim_batch"], params)
                rows = await cur.fetchall()
                delivered: list[int] = []
                failed: list[tuple[int, str, float]] = []
                for row in rows:
                    row_id, sink_name, topic, attempts = row[0], row[1], row[2], row[6]
                    endpoint = self._endpoint(self.sinks[sink_name], topic)
                    if self._paused(endpoint):
                        continue  # paused earlier in this batch: leave the row as it was
                    try:
                        error = await self._publish_or_give_up(row)
                    except _GaveUp:
                        log.warning(
                            "shutdown timeout (%.3g s): outbox row %s (%s %s) and the rest of "
                            "the batch are left as they were",
                            self.shutdown_timeout, row_id, sink_name, topic,
                        )  # fmt: skip
                        break
                    if error is None:
                        delivered.append(row_id)
                        self._pauses.pop(endpoint, None)
                        continue
                    delay = self.backoff.delay(attempts + 1)
                    failed.append((row_id, _error_text(error), delay))
                    log.warning(
                        "outbox row %s (%s %s) attempt %s failed: %s",
                        row_id, sink_name, topic, attempts + 1, _error_text(error),
                    )  # fmt: skip
                    if isinstance(error, SinkUnavailable):
                        pause = self._pause(endpoint)
                        what = sink_name if endpoint[1] is None else f"{sink_name} {topic}"
                        log.warning("%s unavailable: paused for %.3g s", what, pause)
                if delivered:
                    await cur.execute(_QUERIES["mark_delivered"], {"ids": delivered})
                dead: list[int] = []
                if failed:
                    ids, errors, delays = zip(*failed, strict=True)
                    await cur.execute(
                        _QUERIES["mark_failed"],
                        {
                            "ids": list(ids),
                            "errors": list(errors),
                            "delays": list(delays),
                            "max_attempts": self.max_attempts,
                        },
                    )
                    dead = [row_id for row_id, status in await cur.fetchall() if status == "dead"]
            await conn.commit()
        except BaseException:
            await self._drop_connection()
            raise
        for row_id in dead:
            log.error("outbox row %s is dead after %s attempts", row_id, self.max_attempts)
        if rows:
            log.debug(
                "batch: %s claimed, %s delivered, %s failed", len(rows), len(delivered), len(failed)
            )
        return len(rows), RelayStats(
            batches=1 if rows else 0, delivered=len(delivered), failed=len(failed), dead=len(dead)
        )

    # -- the loops --------------------------------------------------------

    async def run_once(self, stop: asyncio.Event | None = None) -> RelayStats:
        """Drain the rows due now, batch after batch, and return.

        Rows that fail are due again only after their backoff, and paused
        sinks are not claimed, so this ends. Database errors propagate.
        """
        stats = RelayStats()
        async with self._shutdown_deadline(stop):
            while stop is None or not stop.is_set():
                claimed, batch = await self._batch()
                stats.add(batch)
                if claimed < self.batch_size:
                    break
        return stats

    async def run(self, stop: asyncio.Event | None = None) -> RelayStats:
        """Publish until ``stop`` is set: drain while there is work, then poll
        every ``poll_interval``. A lost database connection is reopened with
        backoff; other database errors (say, a schema not migrated) propagate."""
        stop = stop if stop is not None else asyncio.Event()
        stats = RelayStats()
        failures = 0
        async with self._shutdown_deadline(stop):
            while not stop.is_set():
                try:
                    claimed, batch = await self._batch()
                except psycopg.OperationalError as exc:
                    failures += 1
                    delay = self.reconnect_backoff.delay(failures)
                    log.warning("database: %s; reconnecting in %.3g s", str(exc).strip(), delay)
                    await _wait(stop, delay)
                    continue
                if failures:
                    log.info("database connection restored")
                    failures = 0
                stats.add(batch)
                if claimed < self.batch_size:
                    await _wait(stop, self.poll_interval)
        return stats
