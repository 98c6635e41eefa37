"""Typed errors raised by the event store."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aura_pg.models import ExpectedVersion


class AuraPgError(Exception):
    """Base class of every error aura-pg raises on purpose."""


class EventValidationError(AuraPgError, ValueError):
    """The input is invalid; nothing was written.

    Raised before the database is touched where Python can tell, and mapped
    from the database's own checks (SQLSTATE AU003, CHECK constraints).
    """


class ConcurrencyError(AuraPgError):
    """The stream was not at the expected version; nothing was written."""

    def __init__(self, stream_id: str, expected: ExpectedVersion, actual: int) -> None:
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual
        super().__init__(self._message())

    def _message(self) -> str:
        return (
            f"stream {self.stream_id!r} is at version {self.actual}, "
            f"not at the expected {self.expected}"
        )


class StreamOrderConflict(ConcurrencyError):
    """An append inside a transaction that had written before it was refused
    (SQLSTATE 40001): a transaction that began writing later has appended to
    the stream since, and these events would be read before it. Nothing was
    written; roll back and run the whole transaction again. A
    ``ConcurrencyError``, so code that reloads and retries on a conflict
    handles it too."""

    def _message(self) -> str:
        return (
            f"stream {self.stream_id!r} moved on to version {self.actual} in a transaction "
            "that began writing after this one: roll back and run the transaction again"
        )


class IdempotencyConflict(AuraPgError):
    """An idempotency key (or event id) was recorded before with other content,
    or a batch mixes recorded and new keys; nothing was written."""

    def __init__(self, stream_id: str, message: str) -> None:
        self.stream_id = stream_id
        super().__init__(message)


class MigrationError(AuraPgError):
    """The database schema is missing or not at the version this code needs."""


class CatalogError(AuraPgError, ValueError):
    """A projection catalog entry is invalid; the message names the entry."""


class ProjectionError(AuraPgError):
    """A projection operation was refused (SQLSTATE AU005 or AU007)."""


class UnknownProjection(ProjectionError):
    """No projection (or dead letter) of that name or id exists (AU005)."""


class StaleCheckpoint(ProjectionError):
    """The projection's checkpoint is not where the caller expected (AU006):
    another owner or an operator moved it. Nothing was applied."""


class DomainError(AuraPgError):
    """A command was refused because it would break a domain invariant;
    nothing was written. ``code`` names the rule (``"overdrawn"``,
    ``"already_voted"``, ...) so callers and tests tell refusals apart
    without parsing messages."""

    def __init__(self, message: str, *, code: str) -> None:
        self.code = code
        super().__init__(message)
