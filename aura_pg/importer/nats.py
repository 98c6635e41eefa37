"""``aura-pg import nats``: import a NATS JetStream stream into the store,
exactly once, while the system that writes the stream keeps running.

A durable pull consumer (``aura-import-<stream>`` unless named) reads the
stream; each message is mapped to an event (:class:`ImportedEvent`),
appended with an idempotency key taken from the message, and acknowledged
only after the append committed. A crash in between leaves the message
unacknowledged: JetStream delivers it again and the store answers the
resend as a duplicate. Messages that cannot be imported go to
``aura.import_dead_letters`` with the reason, and are acknowledged.

Order: the consumer allows one unacknowledged message (``max_ack_pending``
1), so JetStream delivers message n+1 only after message n was
acknowledged, which happens only after n's append committed: events are
appended in stream order, whatever crashes, redeliveries or second
importers on the same consumer do. docs/import.md is the operator guide.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self

from prometheus_client import Counter, Gauge

from aura_pg._runtime import wait
from aura_pg.importer.errors import ImportConfigError, SourceUnavailable
from aura_pg.importer.mapping import (
    MessageMapping,
    SourceMessage,
)
from aura_pg.importer.store import (
    APPLICATION_NAME,
    SOURCE_NATS,
    ImportStore,
    instant_text,
    prepare,
)
from aura_pg.observability import names
from aura_pg.store.retry import AppendRetry

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext
    from nats.js.api import ConsumerInfo

log = logging.getLogger("aura_pg.importer")

CONSUMER_PREFIX: Final = "aura-import-"
DEFAULT_ACK_WAIT: Final = 30.0
DEFAULT_FETCH_TIMEOUT: Final = 1.0
DEFAULT_LAG_INTERVAL: Final = 10.0
DEFAULT_NATS_CONNECT_TIMEOUT: Final = 10.0

# Exported on /metrics (the default registry) with the daemons' other metrics.
OUTCOMES: Final = ("appended", "duplicate", "rejected")

IMPORT_LAG = Gauge(
    names.IMPORT_LAG_MESSAGES,
    "Messages of the source stream not imported yet: the import consumer's pending "
    "messages plus those delivered and not yet acknowledged",
    ["source", "stream"],
)
IMPORTED = Counter(
    names.IMPORT_MESSAGES.removesuffix("_total"),
    "Source messages aura-pg import handled (outcome: appended; duplicate, already in the "
    "store or the dead letters; rejected, newly dead-lettered)",
    ["source", "stream", "outcome"],
)

# JetStream stream and consumer names: no whitespace, '.', '*', '>' or path separators.
_NATS_NAME = re.compile(r"[^\s.*>/\\]{1,255}")


def is_jetstream_name(name: str) -> bool:
    """Whether ``name`` can name a JetStream stream or consumer."""
    return _NATS_NAME.fullmatch(name) is not None


@dataclass(slots=True)
class ImportStats:
    """What a run did. ``duplicates``: messages already in the store (the
    append was answered as a duplicate) or already among the dead letters;
    ``rejected``: messages newly dead-lettered; ``last_sequence``: the
    stream sequence of the last message acknowledged; ``lag``: what the
    consumer had left at the last look."""

    appended: int = 0
    duplicates: int = 0
    rejected: int = 0
    last_sequence: int | None = None
    lag: int | None = None

    def count(self, outcome: str) -> None:
        if outcome == "appended":
            self.appended += 1
        elif outcome == "duplicate":
            self.duplicates += 1
        else:
            self.rejected += 1


def default_consumer(stream: str) -> str:
    """The durable consumer name when none is given: ``aura-import-<stream>``."""
    return CONSUMER_PREFIX + stream


class NatsImporter:
    """Imports one JetStream stream (or the subjects ``subject`` selects of
    it) through the durable pull consumer ``consumer``; see the module."""

    def __init__(
        self,
        dsn: str,
        servers: Sequence[str],
        stream: str,
        mapping: MessageMapping,
        *,
        subject: str | None = None,
        consumer: str | None = None,
        ack_wait: float = DEFAULT_ACK_WAIT,
        fetch_timeout: float = DEFAULT_FETCH_TIMEOUT,
        lag_interval: float = DEFAULT_LAG_INTERVAL,
        retry: AppendRetry | None = None,
        connect_timeout: float = DEFAULT_NATS_CONNECT_TIMEOUT,
    ) -> None:
        if not servers:
            raise ValueError("NatsImporter needs at least one NATS server URL")
        for name, value in (("stream", stream), ("consumer", consumer or default_consumer(stream))):
            if not is_jetstream_name(value):
                raise ValueError(f"invalid JetStream {name} name {value!r}")
        if not (ack_wait > 0 and fetch_timeout > 0 and lag_interval > 0):
            raise ValueError("ack_wait, fetch_timeout and lag_interval must be positive")
        self.dsn = dsn
        self.servers = list(servers)
        self.stream = stream
        self.subject = subject or None
        self.consumer = consumer or default_consumer(stream)
        self.mapping = mapping
        self.ack_wait = ack_wait
        self.fetch_timeout = fetch_timeout
        self.lag_interval = lag_interval
        self.retry = retry if retry is not None else AppendRetry()
        self.connect_timeout = connect_timeout
        self.stats = ImportStats()
        self._client: NatsClient | None = None
        self._jetstream: JetStreamContext | None = None
        self._store: ImportStore | None = None
        self._closing = False
        # The life of the stream read (its creation time), set by run().
        self._stream_created: datetime | None = None
        self._plain_keys = True
        self._lag = IMPORT_LAG.labels(SOURCE_NATS, stream)
        self._counters = {
            outcome: IMPORTED.labels(SOURCE_NATS, stream, outcome) for outcome in OUTCOMES
        }

    # -- connections --------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._closing = False
        try:
            self._store = await ImportStore.connect(self.dsn, self.retry)
            await self._open_nats()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        self._closing = True
        client, self._client, self._jetstream = self._client, None, None
        if client is not None and not client.is_closed:
            with contextlib.suppress(Exception):
                await client.close()  # flushes the acknowledgements still buffered
        store, self._store = self._store, None
        if store is not None:
            await store.close()

    async def _on_error(self, exc: Exception) -> None:
        log.debug("NATS client: %r", exc)

    async def _on_disconnected(self) -> None:
        if not self._closing:
            log.warning("NATS: disconnected; reconnecting")

    async def _on_reconnected(self) -> None:
        log.info("NATS: reconnected")

    async def _open_nats(self) -> None:
        try:
            import nats
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ImportConfigError(
                "importing from NATS needs nats-py: pip install 'aura-pg[nats]'"
            ) from exc
        try:
            # Reconnects without end once connected (the importer holds at
            # most one message, which JetStream delivers again if its
            # acknowledgement is lost); the first connection has a deadline.
            client = await asyncio.wait_for(
                nats.connect(
                    servers=self.servers,
                    name=APPLICATION_NAME,
                    connect_timeout=2,
                    reconnect_time_wait=1,
                    max_reconnect_attempts=-1,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                ),
                self.connect_timeout,
            )
        except (Exception, TimeoutError) as exc:
            raise SourceUnavailable(
                f"cannot connect to NATS at {', '.join(self.servers)}: "
                f"{type(exc).__name__}: {exc}".rstrip(": ")
            ) from None
        self._client = client
        self._jetstream = client.jetstream(timeout=max(5.0, self.fetch_timeout * 2))

    # -- the consumer -------------------------------------------------------

    def _consumer_config(self) -> Any:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        return ConsumerConfig(
            name=self.consumer,
            durable_name=self.consumer,
            description=f"aura-pg import of stream {self.stream} into the event store",
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            max_deliver=-1,
            filter_subject=self.subject,
            # One message at a time: JetStream delivers the next only after
            # this one is acknowledged, so appends follow the stream order.
            max_ack_pending=1,
        )

    async def ensure_consumer(self) -> ConsumerInfo:
        """The durable consumer, created when missing; ImportConfigError when
        the stream is missing or the consumer exists with other settings."""
        from nats.js import errors as js_errors
        from nats.js.api import AckPolicy

        assert self._jetstream is not None
        try:
            await self._jetstream.stream_info(self.stream)
        except js_errors.NotFoundError:
            raise ImportConfigError(f"JetStream has no stream {self.stream!r}") from None
        info: ConsumerInfo
        try:
            info = await self._jetstream.consumer_info(self.stream, self.consumer)
        except js_errors.NotFoundError:
            info = await self._jetstream.add_consumer(self.stream, config=self._consumer_config())
            log.info("created the durable consumer %s on stream %s", self.consumer, self.stream)
            return info
        config = info.config
        problems = []
        if config.deliver_subject:
            problems.append("it is a push consumer")
        if config.ack_policy != AckPolicy.EXPLICIT:
            problems.append(f"its ack policy is {config.ack_policy}")
        if config.max_ack_pending != 1:
            problems.append(f"max_ack_pending is {config.max_ack_pending}, not 1")
        if (config.filter_subject or None) != self.subject or config.filter_subjects:
            shown = config.filter_subject or config.filter_subjects or "none"
            problems.append(f"its subject filter is {shown}, not {self.subject or 'none'}")
        if problems:
            raise ImportConfigError(
                f"consumer {self.consumer!r} of stream {self.stream!r} exists with other "
                f"settings ({'; '.join(problems)}): choose another --consumer"
            )
        if config.ack_wait is not None and abs(config.ack_wait - self.ack_wait) > 0.001:
            log.warning(
                "consumer %s exists with ack wait %.3g s; keeping it (not %.3g s)",
                self.consumer, config.ack_wait, self.ack_wait,
            )  # fmt: skip
        return info

    async def lag(self) -> int:
        """Messages not imported yet (the consumer's pending plus
        unacknowledged messages), also set on the lag gauge."""
        assert self._jetstream is not None
        info = await self._jetstream.consumer_info(self.stream, self.consumer)
        lag = (info.num_pending or 0) + (info.num_ack_pending or 0)
        self._lag.set(lag)
        self.stats.lag = lag
        return lag

    async def _report_lag(self) -> None:
        from nats import errors as nats_errors

        try:
            lag = await self.lag()
        except (nats_errors.Error, OSError) as exc:
            log.warning("NATS: cannot read the consumer's lag: %s: %s", type(exc).__name__, exc)
            return
        stats = self.stats
        log.info(
            "stream %s: %s messages behind (consumer %s); appended %s, duplicates %s, "
            "rejected %s, last sequence %s",
            self.stream, lag, self.consumer, stats.appended, stats.duplicates,
            stats.rejected, stats.last_sequence,
        )  # fmt: skip

    # -- one message --------------------------------------------------------

    async def _register_stream_life(self) -> None:
        """Read the stream's creation time and record this life of it; sets
        whether its sequence keys are the plain ones (store.sequence_key)."""
        from nats.js import errors as js_errors

        assert self._jetstream is not None
        assert self._store is not None
        try:
            info = await self._jetstream.stream_info(self.stream)
        except js_errors.NotFoundError:
            raise ImportConfigError(f"JetStream has no stream {self.stream!r}") from None
        self._stream_created = info.created
        if info.created is None:
            # A server that does not say: one life is all that can be told.
            log.warning("stream %s has no creation time: sequence keys are plain", self.stream)
            self._plain_keys = True
            return
        self._plain_keys = await self._store.has_plain_keys(self.stream, info.created)
        if not self._plain_keys:
            log.info(
                "stream %s was created %s, after the life of it first imported here: its "
                "sequence keys name its creation time",
                self.stream, instant_text(info.created),
            )  # fmt: skip

    async def import_message(
        self, message: SourceMessage, stop: asyncio.Event | None = None
    ) -> str | None:
        """Append (or dead-letter) one message: its outcome, or None when
        ``stop`` was set while the database was unavailable (nothing to
        acknowledge then). Raises on database errors that are not transient."""
        assert self._store is not None
        prepared = prepare(message, self.mapping, self._plain_keys)
        return await self._store.record(message, prepared, stop)

    async def _keep_in_progress(self, msg: Msg) -> None:
        """Tell JetStream the message is still being worked on, so that a
        slow append (a database outage) does not see it delivered again."""
        while True:
            await asyncio.sleep(self.ack_wait / 3)
            try:
                await msg.in_progress()
            except Exception as exc:
                log.debug("NATS: in-progress for a message failed: %r", exc)

    async def _handle(self, msg: Msg, stop: asyncio.Event) -> bool:
        """Import and acknowledge one delivered message; False when stopped
        before its import finished (left for redelivery)."""
        from nats import errors as nats_errors

        metadata = msg.metadata
        message = SourceMessage(
            stream=metadata.stream,
            subject=msg.subject,
            sequence=metadata.sequence.stream,
            data=msg.data,
            headers=dict(msg.headers or {}),
            timestamp=metadata.timestamp,
            stream_created=self._stream_created,
        )
        keeper = asyncio.create_task(self._keep_in_progress(msg))
        try:
            outcome = await self.import_message(message, stop)
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
        if outcome is None:
            return False
        try:
            if metadata.num_pending == 0:
                # At the head: wait for JetStream to record the acknowledgement,
                # so that the lag read next is exact.
                await msg.ack_sync()
            else:
                await msg.ack()
        except nats_errors.Error as exc:
            # Imported all the same: JetStream delivers it again after the
            # ack wait, and the store answers it as a duplicate.
            log.warning(
                "stream %s sequence %s: acknowledgement failed (%s: %s)",
                message.stream, message.sequence, type(exc).__name__, exc,
            )  # fmt: skip
        self.stats.count(outcome)
        self.stats.last_sequence = message.sequence
        self._counters[outcome].inc()
        self._lag.set(metadata.num_pending)
        if metadata.num_delivered > 1:
            log.debug(
                "stream %s sequence %s delivered %s times: %s",
                message.stream, message.sequence, metadata.num_delivered, outcome,
            )  # fmt: skip
        return True

    # -- the loop -----------------------------------------------------------

    async def run(
        self, stop: asyncio.Event | None = None, *, until_end: bool = False
    ) -> ImportStats:
        """Import until ``stop`` is set, or (``until_end``) until the consumer
        has nothing left: no pending and no unacknowledged message."""
        from nats import errors as nats_errors
        from nats.js import errors as js_errors

        stop = stop if stop is not None else asyncio.Event()
        assert self._jetstream is not None
        await self.ensure_consumer()
        # After the consumer: it dies with its stream, so the messages it
        # delivers belong to the life whose creation time is read here (a
        # stream recreated later ends the run: the consumer is gone).
        await self._register_stream_life()
        subscription = await self._jetstream.pull_subscribe_bind(
            durable=self.consumer, stream=self.stream
        )
        log.info(
            "importing stream %s%s through consumer %s",
            self.stream, f" (subjects {self.subject})" if self.subject else "", self.consumer,
        )  # fmt: skip
        next_report = time.monotonic()
        try:
            while not stop.is_set():
                if time.monotonic() >= next_report:
                    await self._report_lag()
                    next_report = time.monotonic() + self.lag_interval
                try:
                    messages = await subscription.fetch(1, timeout=self.fetch_timeout)
                except nats_errors.TimeoutError:
                    messages = []
                except js_errors.NotFoundError:
                    raise SourceUnavailable(
                        f"consumer {self.consumer!r} of stream {self.stream!r} was deleted"
                    ) from None
                except (nats_errors.ConnectionClosedError, nats_errors.NoServersError) as exc:
                    raise SourceUnavailable(f"NATS: {type(exc).__name__}: {exc}") from None
                except (nats_errors.Error, OSError) as exc:
                    log.warning("NATS: fetch failed: %s: %s", type(exc).__name__, exc)
                    await wait(stop, 1.0)
                    continue
                at_head = not messages
                for msg in messages:
                    if not await self._handle(msg, stop):
                        break
                    at_head = at_head or msg.metadata.num_pending == 0
                if until_end and at_head and not stop.is_set():
                    try:
                        if await self.lag() == 0:
                            break
                    except (nats_errors.Error, OSError) as exc:
                        log.warning("NATS: cannot read the consumer's lag: %s", exc)
        finally:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        await self._report_lag()
        return self.stats
