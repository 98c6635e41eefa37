"""The NATS JetStream sink of the relay (needs the ``nats`` extra)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from aura_pg.outbox.sinks import (
    APPLICATION_NAME,
    DEFAULT_PUBLISH_TIMEOUT,
    DeliveryError,
    OutboxMessage,
    SinkUnavailable,
    without_headers,
)

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.js import JetStreamContext

log = logging.getLogger("aura_pg.relay")


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
        headers = without_headers(message.headers, ["Nats-Msg-Id"])
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
