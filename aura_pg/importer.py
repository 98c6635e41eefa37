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
import importlib
import json
import logging
import os
import random
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self

import psycopg
import yaml
from prometheus_client import Counter, Gauge
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import Jsonb

from aura_pg._resources import named_queries
from aura_pg.errors import AuraPgError, EventValidationError, IdempotencyConflict, MigrationError
from aura_pg.models import ANY, NewEvent
from aura_pg.observability import names
from aura_pg.retry import AppendRetry, is_transient
from aura_pg.store import AsyncEventStore

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext
    from nats.js.api import ConsumerInfo

log = logging.getLogger("aura_pg.importer")

_QUERIES: Final = named_queries("queries/importer.sql")

SOURCE_NATS: Final = "nats"
APPLICATION_NAME: Final = "aura-pg import"
CONSUMER_PREFIX: Final = "aura-import-"
DEFAULT_ACK_WAIT: Final = 30.0
DEFAULT_FETCH_TIMEOUT: Final = 1.0
DEFAULT_LAG_INTERVAL: Final = 10.0
DEFAULT_NATS_CONNECT_TIMEOUT: Final = 10.0
DEFAULT_DB_TIMEOUT: Final = 10.0
# Waits between attempts once AppendRetry gave up on a database outage: the
# importer holds the message and tries again until the database is back.
_OUTAGE_BASE_DELAY: Final = 0.5
_OUTAGE_MAX_DELAY: Final = 30.0
_MAX_REASON_LENGTH: Final = 2000

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


class ImportConfigError(AuraPgError, ValueError):
    """The import is configured wrongly: a mapping that cannot be loaded, a
    consumer that exists with other settings, a stream that does not exist."""


class SourceUnavailable(AuraPgError):
    """The source cannot be read: NATS unreachable, the consumer deleted."""


class RejectedMessage(AuraPgError, ValueError):
    """Raised by a mapping for a message it cannot import. The message goes
    to ``aura.import_dead_letters`` with this text as the reason (any other
    exception a mapping raises does the same, with its type in the reason)."""


@dataclass(frozen=True, slots=True)
class SourceMessage:
    """One JetStream message, as a mapping sees it."""

    stream: str
    subject: str
    sequence: int
    """The stream sequence."""
    data: bytes
    headers: Mapping[str, str]
    timestamp: datetime | None = None
    """When the stream stored the message."""
    stream_created: datetime | None = None
    """When the stream was created: tells apart the lives of a stream
    deleted and created again under its name, whose sequences start over."""

    @property
    def message_id(self) -> str | None:
        """The ``Nats-Msg-Id`` header, the publisher's id for deduplication."""
        return self.headers.get("Nats-Msg-Id") or None

    def json(self) -> Any:
        """The body parsed as JSON; RejectedMessage when it is not JSON."""
        try:
            return json.loads(self.data)
        except (UnicodeDecodeError, ValueError) as exc:
            raise RejectedMessage(f"the body is not JSON: {exc}") from None

    def json_object(self) -> dict[str, Any]:
        """The body as a JSON object; RejectedMessage otherwise."""
        body = self.json()
        if not isinstance(body, dict):
            raise RejectedMessage(f"the body must be a JSON object, not {_json_kind(body)}")
        return body


@dataclass(frozen=True, slots=True)
class ImportedEvent:
    """What a mapping makes of a message: the event to append.

    ``idempotency_key`` None: the importer uses the ``Nats-Msg-Id`` header,
    else a key made of the stream sequence (``nats:<stream>:<sequence>``, or
    ``nats:<stream>@<created>:<sequence>`` for a stream recreated since
    this database first imported it; docs/import.md). The importer adds its
    provenance keys (``nats_stream``, ``nats_subject``, ``nats_sequence``,
    ``nats_msg_id``, ``nats_stream_created``) to ``metadata``.
    """

    stream_id: str
    type: str
    data: Mapping[str, Any]
    metadata: Mapping[str, Any] = field(default_factory=dict)
    idempotency_key: str | None = None


MessageMapping = Callable[[SourceMessage], ImportedEvent]
"""A mapping: a message in, the event out, or an exception to reject it."""


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _text_field(body: Mapping[str, Any], name: str, *, required: bool) -> str | None:
    """A string (or integer, as text) field of the body."""
    value = body.get(name)
    if value is None:
        if required:
            raise RejectedMessage(f"field {name!r} is missing")
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise RejectedMessage(f"field {name!r} must be a string, not {_json_kind(value)}")
    text = str(value)
    if not text:
        if required:
            raise RejectedMessage(f"field {name!r} is empty")
        return None
    return text


def _object_field(body: Mapping[str, Any], name: str, *, required: bool) -> dict[str, Any]:
    value = body.get(name)
    if value is None:
        if required:
            raise RejectedMessage(f"field {name!r} is missing")
        return {}
    if not isinstance(value, dict):
        raise RejectedMessage(f"field {name!r} must be an object, not {_json_kind(value)}")
    return value


@dataclass(frozen=True, slots=True)
class EventModelMapping:
    """The default mapping, for bodies shaped like the hardening plan's Event
    model: a JSON object with ``id``, ``idempotency_key``, ``type``,
    ``aggregate_id``, ``version``, ``payload`` and ``metadata``.

    * stream id = ``stream_prefix`` + ``aggregate_id``; type = ``type``;
      data = ``payload`` (these three are required);
    * metadata = ``metadata`` (optional) plus ``original_id`` and
      ``original_version`` when the body has them;
    * idempotency key = ``idempotency_key``, else ``id``, else (the
      importer's fallback) ``Nats-Msg-Id``, else ``nats:<stream>:<sequence>``.
    """

    stream_prefix: str = ""

    def __call__(self, message: SourceMessage) -> ImportedEvent:
        body = message.json_object()
        event_type = _text_field(body, "type", required=True)
        aggregate_id = _text_field(body, "aggregate_id", required=True)
        assert event_type is not None
        assert aggregate_id is not None
        payload = _object_field(body, "payload", required=True)
        metadata = dict(_object_field(body, "metadata", required=False))
        original_id = body.get("id")
        if original_id is not None:
            metadata["original_id"] = original_id
        if body.get("version") is not None:
            metadata["original_version"] = body["version"]
        key = _text_field(body, "idempotency_key", required=False) or _text_field(
            body, "id", required=False
        )
        return ImportedEvent(
            stream_id=self.stream_prefix + aggregate_id,
            type=event_type,
            data=payload,
            metadata=metadata,
            idempotency_key=key,
        )


# -- mapping files --------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_PATH = re.compile(r"[^.:{}\s]+(?:\.[^.:{}\s]+)*")
_NATS_FIELDS = ("stream", "subject", "sequence", "msg_id")


def _body_value(body: Any, path: str) -> Any:
    """The value at a dotted path of the JSON body; RejectedMessage when missing."""
    value = body
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise RejectedMessage(f"field {path!r} is missing")
    return value


_Getter = Callable[[SourceMessage, Any], str]


def _placeholder(name: str, template: str) -> _Getter:
    """What ``{name}`` in a template stands for."""
    if name.startswith("header:"):
        header = name.removeprefix("header:")
        if not header:
            raise ImportConfigError(f"template {template!r}: {{header:}} needs a header name")

        def from_header(message: SourceMessage, _body: Any) -> str:
            value = message.headers.get(header)
            if not value:
                raise RejectedMessage(f"header {header!r} is missing")
            return value

        return from_header
    if name.startswith("nats:"):
        what, _, index = name.removeprefix("nats:").partition(":")
        if what not in _NATS_FIELDS or (index and (what != "subject" or not index.isdigit())):
            raise ImportConfigError(
                f"template {template!r}: unknown placeholder {{{name}}} (known: "
                "{nats:stream}, {nats:subject}, {nats:subject:N}, {nats:sequence}, "
                "{nats:msg_id})"
            )

        def from_message(message: SourceMessage, _body: Any) -> str:
            if what == "stream":
                return message.stream
            if what == "sequence":
                return str(message.sequence)
            if what == "msg_id":
                if message.message_id is None:
                    raise RejectedMessage("the message has no Nats-Msg-Id header")
                return message.message_id
            if not index:
                return message.subject
            tokens = message.subject.split(".")
            if int(index) >= len(tokens):
                raise RejectedMessage(f"subject {message.subject!r} has no token {index}")
            return tokens[int(index)]

        return from_message
    if not _PATH.fullmatch(name):
        raise ImportConfigError(f"template {template!r}: {{{name}}} is not a field path")

    def from_body(_message: SourceMessage, body: Any) -> str:
        value = _body_value(body, name)
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise RejectedMessage(f"field {name!r} must be a string, not {_json_kind(value)}")
        return str(value)

    return from_body


@dataclass(frozen=True, slots=True)
class Template:
    """A string with placeholders: ``{field.path}`` (a string or integer of
    the JSON body), ``{header:NAME}``, ``{nats:stream}``, ``{nats:subject}``,
    ``{nats:subject:N}`` (token N, from 0), ``{nats:sequence}``,
    ``{nats:msg_id}``; ``{{`` and ``}}`` are braces."""

    text: str
    parts: tuple[str | _Getter, ...]

    @classmethod
    def parse(cls, text: str) -> Template:
        parts: list[str | _Getter] = []
        end = 0
        for match in _PLACEHOLDER.finditer(text):
            parts.append(text[end : match.start()])
            end = match.end()
            token = match.group(0)
            if token in ("{{", "}}"):
                parts.append(token[0])
            elif match.group(1) is None:
                raise ImportConfigError(
                    f"template {text!r}: unmatched {token!r} (write {token * 2})"
                )
            else:
                name = match.group(1).strip()
                parts.append(_placeholder(name, text))
        parts.append(text[end:])
        return cls(text, tuple(part for part in parts if part != ""))

    def render(self, message: SourceMessage, body: Any) -> str:
        return "".join(
            part if isinstance(part, str) else part(message, body) for part in self.parts
        )


_FILE_KEYS: Final = frozenset(
    {"stream_id", "type", "data", "metadata", "metadata_headers", "idempotency_key"}
)


@dataclass(frozen=True, slots=True)
class FileMapping:
    """A mapping described in a YAML file (``--mapping-file``)::

        stream_id: "debate-{aggregate_id}"   # template, required
        type: "{event_type}"                 # template, required
        data: payload                        # path of an object in the body; "." = the body
        metadata: meta                       # path of an object (optional; may be absent)
        metadata_headers: [Traceparent]      # headers copied into metadata (optional)
        idempotency_key: "{event_id}"        # template (optional)

    Without ``idempotency_key`` the key is the ``Nats-Msg-Id`` header, else
    ``nats:<stream>:<sequence>``.
    """

    stream_id: Template
    type: Template
    data: str = "."
    metadata: str | None = None
    metadata_headers: tuple[str, ...] = ()
    idempotency_key: Template | None = None

    @classmethod
    def load(cls, path: str | Path) -> FileMapping:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ImportConfigError(f"cannot read mapping file {str(path)!r}: {exc}") from None
        try:
            spec = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ImportConfigError(f"mapping file {str(path)!r} is not YAML: {exc}") from None
        try:
            return cls.from_dict(spec)
        except ImportConfigError as exc:
            raise ImportConfigError(f"mapping file {str(path)!r}: {exc}") from None

    @classmethod
    def from_dict(cls, spec: object) -> FileMapping:
        if not isinstance(spec, dict):
            raise ImportConfigError("a mapping is a YAML object (stream_id, type, data, ...)")
        unknown = sorted(str(key) for key in spec if key not in _FILE_KEYS)
        if unknown:
            raise ImportConfigError(
                f"unknown keys {', '.join(unknown)} (known: {', '.join(sorted(_FILE_KEYS))})"
            )

        def text(key: str, required: bool) -> str | None:
            value = spec.get(key)
            if value is None:
                if required:
                    raise ImportConfigError(f"{key!r} is required")
                return None
            if not isinstance(value, str) or not value:
                raise ImportConfigError(f"{key!r} must be a non-empty string")
            return value

        def path(key: str) -> str | None:
            value = text(key, False)
            if value is not None and value != "." and not _PATH.fullmatch(value):
                raise ImportConfigError(f"{key!r}: {value!r} is not a field path (a.b.c or .)")
            return value

        headers = spec.get("metadata_headers") or []
        if not isinstance(headers, list) or not all(isinstance(h, str) and h for h in headers):
            raise ImportConfigError("'metadata_headers' must be a list of header names")
        stream_id, event_type = text("stream_id", True), text("type", True)
        assert stream_id is not None
        assert event_type is not None
        key = text("idempotency_key", False)
        return cls(
            stream_id=Template.parse(stream_id),
            type=Template.parse(event_type),
            data=path("data") or ".",
            metadata=path("metadata"),
            metadata_headers=tuple(headers),
            idempotency_key=None if key is None else Template.parse(key),
        )

    def _object(self, body: Any, path: str) -> dict[str, Any]:
        value = body if path == "." else _body_value(body, path)
        if not isinstance(value, dict):
            what = "the body" if path == "." else f"field {path!r}"
            raise RejectedMessage(f"{what} must be an object, not {_json_kind(value)}")
        return value

    def __call__(self, message: SourceMessage) -> ImportedEvent:
        body = message.json()  # data is read from it, always
        stream_id = self.stream_id.render(message, body)
        event_type = self.type.render(message, body)
        key = None if self.idempotency_key is None else self.idempotency_key.render(message, body)
        data = self._object(body, self.data)
        metadata: dict[str, Any] = {}
        if self.metadata is not None:
            try:
                metadata.update(self._object(body, self.metadata))
            except RejectedMessage:
                if _has_path(body, self.metadata):
                    raise  # there, but not an object
        for header in self.metadata_headers:
            value = message.headers.get(header)
            if value is not None:
                metadata[header] = value
        return ImportedEvent(stream_id, event_type, data, metadata, key)


def _has_path(body: Any, path: str) -> bool:
    try:
        _body_value(body, path)
    except RejectedMessage:
        return False
    return True


def load_callable(spec: str) -> MessageMapping:
    """``module:function`` (``module:Class.method`` too) as a mapping. The
    current directory is searched for the module first."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ImportConfigError(f"--mapping {spec!r}: expected MODULE:FUNCTION")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise ImportConfigError(
            f"--mapping {spec!r}: cannot import {module_name}: {type(exc).__name__}: {exc}"
        ) from None
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ImportConfigError(
                f"--mapping {spec!r}: {module_name} has no {attribute}"
            ) from None
    if not callable(target):
        raise ImportConfigError(f"--mapping {spec!r}: {attribute} is not callable")
    mapping: MessageMapping = target
    return mapping


# -- the importer ---------------------------------------------------------


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


def _instant(moment: datetime) -> str:
    """A creation time as it appears in keys and metadata: UTC, microseconds."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _clean_text(text: str) -> str:
    # text and jsonb cannot hold NUL.
    return text.replace("\x00", "\\u0000")


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less if ``stop`` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


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
            if not _NATS_NAME.fullmatch(value):
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
        self._store: AsyncEventStore | None = None
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
            await self._open_store()
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

    async def _open_store(self) -> None:
        given = conninfo_to_dict(self.dsn)
        extra: dict[str, Any] = {}
        if "application_name" not in given:
            extra["application_name"] = APPLICATION_NAME
        if "connect_timeout" not in given:
            extra["connect_timeout"] = int(DEFAULT_DB_TIMEOUT)
        # One direct connection first: a clear error for a database that
        # cannot be reached, and the schema checked before anything is read.
        async with await psycopg.AsyncConnection.connect(
            self.dsn, autocommit=True, **extra
        ) as conn:
            row = await (await conn.execute(_QUERIES["schema_ready"])).fetchone()
        if row is None or not row[0]:
            raise MigrationError(
                "aura.import_dead_letters or aura.import_stream_lives does not exist: "
                "run `aura-pg migrate` (migrations 0008 and 0009)"
            )
        self._store = await AsyncEventStore.connect(
            self.dsn, min_size=1, max_size=2, timeout=DEFAULT_DB_TIMEOUT, kwargs=extra
        )

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

    def _prepare(self, message: SourceMessage) -> tuple[str, NewEvent] | str:
        """The stream id and event to append, or why the message is rejected."""
        try:
            result: Any = self.mapping(message)
        except RejectedMessage as exc:
            return f"rejected by the mapping: {exc}"
        except Exception as exc:
            return f"the mapping raised {type(exc).__name__}: {exc}"
        if not isinstance(result, ImportedEvent):
            return f"the mapping returned {type(result).__name__}, not an ImportedEvent"
        if not isinstance(result.metadata, Mapping):
            return f"the mapping's metadata is a {type(result.metadata).__name__}, not a mapping"
        key = result.idempotency_key
        if key is None:
            key = message.message_id or self._sequence_key(message)
        provenance: dict[str, Any] = {
            "nats_stream": message.stream,
            "nats_subject": message.subject,
            "nats_sequence": message.sequence,
        }
        if message.message_id is not None:
            provenance["nats_msg_id"] = message.message_id
        if message.stream_created is not None:
            provenance["nats_stream_created"] = _instant(message.stream_created)
        try:
            event = NewEvent(
                result.type,
                result.data,
                metadata={**result.metadata, **provenance},
                idempotency_key=key,
            )
        except (EventValidationError, TypeError) as exc:
            return f"invalid event: {exc}"
        return result.stream_id, event

    def _sequence_key(self, message: SourceMessage) -> str:
        """The key of a message that has none of its own: its sequence, which
        identifies it within one life of the stream only. The life this
        database imported first keeps the keys of before migration 0009."""
        if self._plain_keys or message.stream_created is None:
            return f"nats:{message.stream}:{message.sequence}"
        return f"nats:{message.stream}@{_instant(message.stream_created)}:{message.sequence}"

    async def _register_stream_life(self) -> None:
        """Read the stream's creation time and record this life of it; sets
        whether its sequence keys are the plain ones (see _sequence_key)."""
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
        params = {"source": SOURCE_NATS, "stream": self.stream, "created": info.created}
        async with self._store.pool.connection() as conn:
            await conn.execute(_QUERIES["claim_plain_keys"], params)
            await conn.execute(_QUERIES["record_stream_life"], params)
            row = await (await conn.execute(_QUERIES["stream_life_plain_keys"], params)).fetchone()
        assert row is not None
        self._plain_keys = bool(row[0])
        if not self._plain_keys:
            log.info(
                "stream %s was created %s, after the life of it first imported here: its "
                "sequence keys name its creation time",
                self.stream, _instant(info.created),
            )  # fmt: skip

    async def _dead_letter(self, message: SourceMessage, reason: str) -> bool:
        """Record a rejected message; False when it was recorded before."""
        assert self._store is not None
        headers = {_clean_text(k): _clean_text(v) for k, v in message.headers.items()}
        async with self._store.pool.connection() as conn:
            cursor = await conn.execute(
                _QUERIES["record_dead_letter"],
                {
                    "source": SOURCE_NATS,
                    "stream": message.stream,
                    "subject": message.subject,
                    "sequence": message.sequence,
                    "message_id": None
                    if message.message_id is None
                    else _clean_text(message.message_id),
                    "headers": Jsonb(headers),
                    "payload": message.data,
                    "reason": _clean_text(reason)[:_MAX_REASON_LENGTH],
                },
            )
            return await cursor.fetchone() is not None

    async def import_message(
        self, message: SourceMessage, stop: asyncio.Event | None = None
    ) -> str | None:
        """Append (or dead-letter) one message: its outcome, or None when
        ``stop`` was set while the database was unavailable (nothing to
        acknowledge then). Raises on database errors that are not transient."""
        assert self._store is not None
        prepared = self._prepare(message)
        failures = 0
        while True:
            try:
                if isinstance(prepared, str):
                    new = await self._dead_letter(message, prepared)
                    if new:
                        log.warning(
                            "stream %s sequence %s dead-lettered: %s",
                            message.stream, message.sequence, prepared,
                        )  # fmt: skip
                    return "rejected" if new else "duplicate"
                stream_id, event = prepared
                # The same NewEvent (the same event id and key) on every
                # attempt: an attempt that committed unseen is a duplicate.
                result = await self._store.append(stream_id, event, ANY, retry=self.retry)
                return "duplicate" if result.duplicate else "appended"
            except (EventValidationError, IdempotencyConflict) as exc:
                prepared = f"the store refused the event: {exc}"
            except psycopg.Error as exc:
                if not is_transient(exc):
                    raise
                failures += 1
                ceiling = min(_OUTAGE_MAX_DELAY, _OUTAGE_BASE_DELAY * 2.0 ** min(failures - 1, 16))
                delay = ceiling / 2 + random.uniform(0, ceiling / 2)
                log.warning(
                    "stream %s sequence %s: database unavailable (%s); trying again in %.3g s",
                    message.stream, message.sequence, str(exc).strip().splitlines()[0]
                    if str(exc).strip() else type(exc).__name__, delay,
                )  # fmt: skip
                if stop is not None:
                    await _wait(stop, delay)
                    if stop.is_set():
                        return None
                else:
                    await asyncio.sleep(delay)

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
                    await _wait(stop, 1.0)
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
