"""``aura-pg import nats``: import a NATS JetStream stream into the store,
exactly once, while the system that writes the stream keeps running.

A durable pull consumer (``aura-import-<stream>`` unless named) reads the
stream; each message is mapped to an event (:class:`ImportedEvent`),
appended with an idempotency key taken from the message, and acknowledged
only after the append committed. A crash in between leaves the message
unacknowledged: JetStream delivers it again and the store answers the
resend as a duplicate. Messages that cannot be imported go to
``aura.import_dead_letters`` with the reason, and are acknowledged.

The window: up to ``window`` messages are delivered and unacknowledged at
once (the consumer's ``max_ack_pending``). They are queued by aggregate
(the event's stream id), in stream order; each aggregate has at most one
append in flight, which takes the first messages of its queue (up to
``MAX_APPEND_BATCH``) in one batch, and up to ``concurrent_appends``
aggregates are appended at once. A message is acknowledged after its own
append (or dead letter) committed, which comes after every earlier message
of its aggregate was recorded. So each aggregate's events are appended in
publish order, while many aggregates progress side by side.

The barrier: the order above covers the messages this importer holds. A
message delivered to another importer and not acknowledged (one that
crashed, killed between its append and its acknowledgement or before its
append) comes back only after its ack wait, while newer messages of the
same aggregate may be delivered here first. So appending waits whenever
the consumer counts a delivered, unacknowledged message this importer does
not hold: at the start (if the consumer has any), and after a gap in the
delivery sequence (deliveries seen elsewhere or lost); the window keeps
filling meanwhile, and once every unacknowledged message is in it, its
queues are sorted by stream sequence and appending resumes.

One importer per consumer: a second one started on the same consumer
stands by (a session advisory lock in the database, held for the run on a
connection of its own) and takes over when the first one's session ends,
a kill included. docs/import.md is the operator guide.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import re
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self

import psycopg
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
    PreparedMessage,
    instant_text,
    prepare,
)
from aura_pg.models import NewEvent
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
# Messages delivered and not acknowledged at once (the consumer's max_ack_pending).
DEFAULT_WINDOW: Final = 8000
# Appends (one aggregate each) in flight at once; the pool has one connection more.
DEFAULT_CONCURRENT_APPENDS: Final = 4
STANDBY_INTERVAL: Final = 0.5
"""How often a standing-by importer tries to take its consumer over."""
# Messages of one aggregate appended in one batch at most.
MAX_APPEND_BATCH: Final = 200

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
        window: int = DEFAULT_WINDOW,
        concurrent_appends: int = DEFAULT_CONCURRENT_APPENDS,
    ) -> None:
        if not servers:
            raise ValueError("NatsImporter needs at least one NATS server URL")
        for name, value in (("stream", stream), ("consumer", consumer or default_consumer(stream))):
            if not is_jetstream_name(value):
                raise ValueError(f"invalid JetStream {name} name {value!r}")
        if not (ack_wait > 0 and fetch_timeout > 0 and lag_interval > 0):
            raise ValueError("ack_wait, fetch_timeout and lag_interval must be positive")
        if window < 1 or concurrent_appends < 1:
            raise ValueError("window and concurrent_appends must be at least 1")
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
        self.window = window
        self.concurrent_appends = concurrent_appends
        self.stats = ImportStats()
        self._client: NatsClient | None = None
        self._jetstream: JetStreamContext | None = None
        self._store: ImportStore | None = None
        self._closing = False
        # The life of the stream read (its creation time), set by run().
        self._stream_created: datetime | None = None
        self._plain_keys = True
        # The window (see the module), reset by run().
        self._held: dict[int, _Held] = {}
        self._lanes: dict[str, list[_Held]] = {}
        self._ready: deque[str] = deque()
        self._busy: set[str] = set()
        self._rejects: deque[_Held] = deque()
        self._barrier = False
        self._abandoned = False
        self._holder: psycopg.AsyncConnection[Any] | None = None
        self._next_delivery = 1
        self._lag = IMPORT_LAG.labels(SOURCE_NATS, stream)
        self._counters = {
            outcome: IMPORTED.labels(SOURCE_NATS, stream, outcome) for outcome in OUTCOMES
        }

    # -- connections --------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._closing = False
        try:
            self._store = await ImportStore.connect(
                self.dsn, self.retry, pool_size=self.concurrent_appends + 1
            )
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
            # Reconnects without end once connected (JetStream delivers
            # again the messages whose acknowledgement is lost, and the
            # store answers them as duplicates); the first connection has a
            # deadline.
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
            # The window: the importer keeps each aggregate's order itself.
            max_ack_pending=self.window,
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
        if (config.filter_subject or None) != self.subject or config.filter_subjects:
            shown = config.filter_subject or config.filter_subjects or "none"
            problems.append(f"its subject filter is {shown}, not {self.subject or 'none'}")
        if problems:
            raise ImportConfigError(
                f"consumer {self.consumer!r} of stream {self.stream!r} exists with other "
                f"settings ({'; '.join(problems)}): choose another --consumer"
            )
        if config.max_ack_pending != self.window:
            # A consumer made with another window (max_ack_pending 1 before
            # the window existed): the order does not depend on it, the
            # speed does.
            previous = config.max_ack_pending
            config.max_ack_pending = self.window
            try:
                info = await self._jetstream.add_consumer(self.stream, config=config)
                log.info("consumer %s: max_ack_pending set to %s", self.consumer, self.window)
            except js_errors.Error as exc:
                log.warning(
                    "consumer %s: cannot set max_ack_pending to %s (%s); keeping %s",
                    self.consumer, self.window, exc, previous,
                )  # fmt: skip
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

    # -- the window ---------------------------------------------------------

    def _begin_window(self, info: ConsumerInfo) -> None:
        """Start with an empty window. Messages the consumer counts as
        delivered and unacknowledged now were delivered to another importer
        (one that crashed, most likely): until JetStream has given them back
        to this one, nothing is appended (the barrier, see the module)."""
        self._held = {}
        self._lanes = {}
        self._ready = deque()
        self._busy = set()
        self._rejects = deque()
        self._abandoned = False
        delivered = info.delivered.consumer_seq if info.delivered is not None else 0
        self._next_delivery = (delivered or 0) + 1
        pending = info.num_ack_pending or 0
        self._barrier = pending > 0
        if self._barrier:
            log.info(
                "consumer %s has %s messages delivered and not acknowledged (a crashed "
                "importer's): appending resumes once JetStream has delivered them again "
                "(within the ack wait)",
                self.consumer, pending,
            )  # fmt: skip

    async def _check_barrier(self) -> None:
        """Lift the barrier once every message the consumer counts as
        delivered and unacknowledged is one this importer holds."""
        from nats import errors as nats_errors

        assert self._jetstream is not None
        assert self._client is not None
        try:
            await self._client.flush()  # the acknowledgements sent so far
            info = await self._jetstream.consumer_info(self.stream, self.consumer)
        except (nats_errors.Error, OSError) as exc:
            log.warning("NATS: cannot read the consumer: %s: %s", type(exc).__name__, exc)
            return
        if (info.num_ack_pending or 0) <= len(self._held):
            self._barrier = False
            if info.delivered is not None and info.delivered.consumer_seq is not None:
                self._next_delivery = info.delivered.consumer_seq + 1
            for key, lane in self._lanes.items():
                lane.sort(key=_sequence_of)
                if key not in self._busy:
                    self._ready.append(key)
            log.info(
                "consumer %s: every unacknowledged message is back in this importer's "
                "window (%s); appending",
                self.consumer, len(self._held),
            )  # fmt: skip

    def _accept(self, messages: list[Msg]) -> None:
        """Take delivered messages into the window: map each, queue it behind
        the earlier messages of its aggregate (its stream id)."""
        for msg in messages:
            metadata = msg.metadata
            delivery = metadata.sequence.consumer
            if delivery != self._next_delivery and not self._barrier:
                # Deliveries this importer did not see (another importer on
                # the consumer, or deliveries lost on the way): an earlier
                # message of an aggregate may be held elsewhere.
                log.warning(
                    "consumer %s: delivery %s came after %s; holding appends until every "
                    "unacknowledged message is back in this importer's window",
                    self.consumer, delivery, self._next_delivery - 1,
                )  # fmt: skip
                self._barrier = True
            self._next_delivery = delivery + 1
            sequence = metadata.sequence.stream
            held = self._held.get(sequence)
            if held is not None:
                # Delivered again while held here (its ack wait ran out during
                # a NATS outage): acknowledge the latest delivery.
                held.msg = msg
                continue
            message = SourceMessage(
                stream=metadata.stream,
                subject=msg.subject,
                sequence=sequence,
                data=msg.data,
                headers=dict(msg.headers or {}),
                timestamp=metadata.timestamp,
                stream_created=self._stream_created,
            )
            prepared = prepare(message, self.mapping, self._plain_keys)
            entry = _Held(msg, message, prepared)
            self._held[sequence] = entry
            if isinstance(prepared, str):
                self._rejects.append(entry)
                continue
            key = prepared[0]
            lane = self._lanes.get(key)
            if lane is None:
                lane = self._lanes[key] = []
                if key not in self._busy:
                    self._ready.append(key)
            if lane and lane[-1].message.sequence > sequence:
                bisect.insort(lane, entry, key=_sequence_of)
            else:
                lane.append(entry)
        if messages:
            self._lag.set((messages[-1].metadata.num_pending or 0) + len(self._held))

    def _dispatch(
        self, jobs: dict[asyncio.Task[list[str | None]], _Job], stop: asyncio.Event
    ) -> None:
        """Start appends, up to ``concurrent_appends`` at once: each takes
        the first messages of one aggregate not being appended already (so an
        aggregate's messages are appended one batch after the other, in
        stream order), or one message to dead-letter."""
        if self._barrier or self._abandoned:
            return
        assert self._store is not None
        store = self._store
        while len(jobs) < self.concurrent_appends:
            if self._rejects:
                entry = self._rejects.popleft()

                async def dead_letter(entry: _Held = entry) -> list[str | None]:
                    return [await store.record(entry.message, entry.prepared, stop)]

                jobs[asyncio.create_task(dead_letter())] = _Job(None, [entry])
                continue
            if not self._ready:
                return
            key = self._ready.popleft()
            lane = self._lanes.get(key)
            if not lane or key in self._busy:
                continue
            taken = lane[:MAX_APPEND_BATCH]
            del lane[:MAX_APPEND_BATCH]
            self._busy.add(key)
            batch = [(entry.message, _event_of(entry)) for entry in taken]
            jobs[asyncio.create_task(store.record_many(key, batch, stop))] = _Job(key, taken)

    async def _finish(self, job: _Job, outcomes: list[str | None]) -> None:
        """Acknowledge the messages an append (or dead letter) recorded:
        every earlier message of their aggregate was recorded before it."""
        from nats import errors as nats_errors

        for entry, outcome in zip(job.entries, outcomes, strict=True):
            if outcome is None:
                # Stopped during a database outage: left for redelivery, and
                # so is everything after it.
                self._abandoned = True
                continue
            msg, message = entry.msg, entry.message
            del self._held[message.sequence]
            try:
                if msg.metadata.num_pending == 0:
                    # At the head: wait for JetStream to record the
                    # acknowledgement, so that the lag read next is exact.
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
            last = self.stats.last_sequence
            self.stats.last_sequence = (
                message.sequence if last is None else max(last, message.sequence)
            )
            self._counters[outcome].inc()
            if msg.metadata.num_delivered > 1:
                log.debug(
                    "stream %s sequence %s delivered %s times: %s",
                    message.stream, message.sequence, msg.metadata.num_delivered, outcome,
                )  # fmt: skip
        if job.lane is not None:
            self._busy.discard(job.lane)
            if self._lanes.get(job.lane):
                self._ready.append(job.lane)
            else:
                self._lanes.pop(job.lane, None)

    async def _check_holding(self) -> None:
        """End the run when the session holding the consumer is gone: its
        lock went with it, and a standby may be importing already."""
        assert self._holder is not None
        assert self._store is not None
        try:
            await self._store.still_holding(self._holder)
        except psycopg.Error as exc:
            raise SourceUnavailable(
                f"lost the database session holding consumer {self.consumer} ({exc}): "
                "another importer may take over; restart this one to stand by"
            ) from exc

    async def _keep_in_progress(self) -> None:
        """Tell JetStream the messages in the window are still being worked
        on, so that a slow append (a database outage) or a long barrier does
        not see them delivered again."""
        while True:
            await asyncio.sleep(self.ack_wait / 3)
            for entry in list(self._held.values()):
                try:
                    await entry.msg.in_progress()
                except Exception as exc:
                    log.debug("NATS: in-progress for a message failed: %r", exc)

    async def _fetch(self, subscription: JetStreamContext.PullSubscription, room: int) -> list[Msg]:
        """Up to ``room`` messages (none when the fetch timed out)."""
        from nats import errors as nats_errors
        from nats.js import errors as js_errors

        try:
            return await subscription.fetch(room, timeout=self.fetch_timeout)
        except nats_errors.TimeoutError:
            return []
        except js_errors.NotFoundError:
            raise SourceUnavailable(
                f"consumer {self.consumer!r} of stream {self.stream!r} was deleted"
            ) from None
        except (nats_errors.ConnectionClosedError, nats_errors.NoServersError) as exc:
            raise SourceUnavailable(f"NATS: {type(exc).__name__}: {exc}") from None
        except (nats_errors.Error, OSError) as exc:
            log.warning("NATS: fetch failed: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(1.0)
            return []

    # -- the loop -----------------------------------------------------------

    async def run(
        self, stop: asyncio.Event | None = None, *, until_end: bool = False
    ) -> ImportStats:
        """Import until ``stop`` is set, or (``until_end``) until the consumer
        has nothing left: no pending and no unacknowledged message."""
        stop = stop if stop is not None else asyncio.Event()
        assert self._jetstream is not None
        holder = await self._hold_consumer(stop)
        if holder is None:
            return self.stats  # stopped while standing by
        try:
            return await self._run_holding(holder, stop, until_end)
        finally:
            with contextlib.suppress(Exception):
                await holder.close()

    async def _hold_consumer(self, stop: asyncio.Event) -> psycopg.AsyncConnection[Any] | None:
        """Wait until this importer is the only one on its consumer (another
        one's appends cannot be ordered with ours); None if stopped first."""
        assert self._store is not None
        told = False
        while True:
            holder = await self._store.hold(SOURCE_NATS, self.stream, self.consumer)
            if holder is not None:
                if told:
                    log.info("consumer %s is free: this importer takes over", self.consumer)
                return holder
            if not told:
                log.warning(
                    "another importer is importing through consumer %s: standing by",
                    self.consumer,
                )
                told = True
            await wait(stop, STANDBY_INTERVAL)
            if stop.is_set():
                return None

    async def _run_holding(
        self, holder: psycopg.AsyncConnection[Any], stop: asyncio.Event, until_end: bool
    ) -> ImportStats:
        assert self._jetstream is not None
        self._holder = holder
        await self.ensure_consumer()
        # After the consumer: it dies with its stream, so the messages it
        # delivers belong to the life whose creation time is read here (a
        # stream recreated later ends the run: the consumer is gone).
        await self._register_stream_life()
        subscription = await self._jetstream.pull_subscribe_bind(
            durable=self.consumer, stream=self.stream
        )
        log.info(
            "importing stream %s%s through consumer %s (window %s)",
            self.stream, f" (subjects {self.subject})" if self.subject else "", self.consumer,
            self.window,
        )  # fmt: skip
        # Read after the subscription: what was delivered before it, and not
        # acknowledged, went to another importer.
        self._begin_window(await self._jetstream.consumer_info(self.stream, self.consumer))
        try:
            await self._pump(subscription, stop, until_end)
        finally:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        await self._report_lag()
        return self.stats

    async def _pump(
        self, subscription: JetStreamContext.PullSubscription, stop: asyncio.Event, until_end: bool
    ) -> None:
        """Fetch while the window has room, append as the order allows,
        acknowledge what is recorded; one fetch at a time, up to
        ``concurrent_appends`` appends beside it."""
        from nats import errors as nats_errors

        fetch: asyncio.Task[list[Msg]] | None = None
        jobs: dict[asyncio.Task[list[str | None]], _Job] = {}
        stopped = asyncio.create_task(stop.wait())
        keeper = asyncio.create_task(self._keep_in_progress())
        next_report = time.monotonic()
        at_head = False
        try:
            while True:
                if not stop.is_set() and fetch is None:
                    if time.monotonic() >= next_report:
                        await self._check_holding()
                        await self._report_lag()
                        next_report = time.monotonic() + self.lag_interval
                    if self._barrier:
                        await self._check_barrier()
                    if until_end and at_head and not self._held and not jobs:
                        try:
                            if await self.lag() == 0:
                                return
                        except (nats_errors.Error, OSError) as exc:
                            log.warning("NATS: cannot read the consumer's lag: %s", exc)
                        at_head = False
                    room = self.window - len(self._held)
                    if self._barrier:
                        # What the barrier waits for must be fetched, even
                        # into a full window (a consumer that allows more
                        # than the window: its max_ack_pending could not be
                        # set); JetStream's limit bounds it.
                        room = max(room, 1)
                    # At the end of the stream (--until-end), the window is
                    # emptied before the lag is read again.
                    draining = until_end and at_head and self._held and not self._barrier
                    # One fetch for many messages: a window that has room
                    # for a quarter of itself, or that holds nothing (or
                    # nothing it may append).
                    worth = room >= max(1, self.window // 4) or not jobs
                    if room > 0 and worth and not self._abandoned and not draining:
                        fetch = asyncio.create_task(self._fetch(subscription, room))
                self._dispatch(jobs, stop)
                if stop.is_set() and fetch is None and not jobs:
                    return
                waiting: set[asyncio.Future[Any]] = set(jobs)
                if fetch is not None:
                    waiting.add(fetch)
                if not waiting:
                    # A full window behind the barrier: look again shortly.
                    await wait(stop, min(self.fetch_timeout, 0.5))
                    continue
                if not stop.is_set():
                    waiting.add(stopped)
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if fetch is not None and fetch in done:
                    messages = fetch.result()
                    fetch = None
                    self._accept(messages)
                    at_head = not messages or messages[-1].metadata.num_pending == 0
                for task in [task for task in done if task in jobs]:
                    job = jobs.pop(task)
                    await self._finish(job, task.result())
        finally:
            tasks = [keeper, stopped, *jobs, *([fetch] if fetch is not None else [])]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


@dataclass(slots=True, eq=False)
class _Held:
    """A message in the window: delivered, not acknowledged yet."""

    msg: Msg
    message: SourceMessage
    prepared: PreparedMessage


@dataclass(slots=True, eq=False)
class _Job:
    """An append of consecutive messages of one aggregate (``lane``, its
    stream id), or one message to dead-letter (``lane`` None)."""

    lane: str | None
    entries: list[_Held]


def _sequence_of(entry: _Held) -> int:
    return entry.message.sequence


def _event_of(entry: _Held) -> NewEvent:
    prepared = entry.prepared
    assert not isinstance(prepared, str)
    return prepared[1]
