"""The transactional outbox relay: publishes ``aura.outbox`` rows, at least
once, to NATS JetStream and HTTP webhooks (docs/outbox.md).

``relay``: the :class:`Relay` (claim, publish, record; pauses, backoff,
shutdown); ``sinks``: the message, the sink protocols and delivery errors;
``nats``: :class:`NatsSink` (needs the ``nats`` extra); ``webhook``:
:class:`WebhookSink` and its HTTP/1.1 reader. A relay claims only the rows
of the sinks (and, for webhooks, the names) it is configured for.
"""

from aura_pg._runtime import Backoff
from aura_pg.outbox.nats import NatsSink
from aura_pg.outbox.relay import Relay, RelayStats
from aura_pg.outbox.sinks import (
    ClosableSink,
    DeliveryError,
    OutboxMessage,
    Sink,
    SinkUnavailable,
)
from aura_pg.outbox.webhook import WebhookSink, check_webhook_url

__all__ = [
    "Backoff",
    "ClosableSink",
    "DeliveryError",
    "NatsSink",
    "OutboxMessage",
    "Relay",
    "RelayStats",
    "Sink",
    "SinkUnavailable",
    "WebhookSink",
    "check_webhook_url",
]
