"""Importing events from other systems into the store, exactly once
(docs/import.md).

``mapping``: what a mapping sees and returns, the default, YAML and Python
mappings; ``store``: the database side (append or dead-letter, stream
lives, outages); ``nats``: :class:`NatsImporter`, the JetStream source;
``errors``: how an import fails.
"""

from aura_pg.importer.errors import ImportConfigError, RejectedMessage, SourceUnavailable
from aura_pg.importer.mapping import (
    EventModelMapping,
    FileMapping,
    ImportedEvent,
    MessageMapping,
    SourceMessage,
    Template,
    load_callable,
)
from aura_pg.importer.nats import ImportStats, NatsImporter, default_consumer

__all__ = [
    "EventModelMapping",
    "FileMapping",
    "ImportConfigError",
    "ImportStats",
    "ImportedEvent",
    "MessageMapping",
    "NatsImporter",
    "RejectedMessage",
    "SourceMessage",
    "SourceUnavailable",
    "Template",
    "default_consumer",
    "load_callable",
]
