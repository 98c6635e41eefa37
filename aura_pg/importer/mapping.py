"""From a source message to the event to append: what a mapping sees
(:class:`SourceMessage`), what it returns (:class:`ImportedEvent`), the
default mapping (:class:`EventModelMapping`), mappings described in YAML
(:class:`FileMapping`, :class:`Template`) and mappings written in Python
(:func:`load_callable`)."""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import yaml

from aura_pg.importer.errors import ImportConfigError, RejectedMessage


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
