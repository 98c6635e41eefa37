"""How an import fails: its configuration, its source, or one message."""

from __future__ import annotations

from aura_pg.errors import AuraPgError


class ImportConfigError(AuraPgError, ValueError):
    """The import is configured wrongly: a mapping that cannot be loaded, a
    consumer that exists with other settings, a stream that does not exist."""


class SourceUnavailable(AuraPgError):
    """The source cannot be read: NATS unreachable, the consumer deleted."""


class RejectedMessage(AuraPgError, ValueError):
    """Raised by a mapping for a message it cannot import. The message goes
    to ``aura.import_dead_letters`` with this text as the reason (any other
    exception a mapping raises does the same, with its type in the reason)."""
