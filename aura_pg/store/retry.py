"""Retrying appends through transient failures, exactly once.

An append whose connection breaks may or may not have committed: the
server can commit and then lose the connection before the reply arrives.
``AppendRetry`` sends the very same batch again (the same event ids, so the
same idempotency keys), and the store answers a batch it already recorded
as a duplicate with the positions it recorded first. So whatever the first
attempt's fate, the events end up in the log exactly once.

Only failures that say nothing about the append itself are retried: a lost
or refused connection, a server shutting down or starting up, too many
connections, a pool with no connection to give, deadlocks and
serialization failures. Everything the store raises on purpose (invalid
events, version conflicts, idempotency conflicts) and every other database
error is raised at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from aura_pg._runtime import Backoff, can_resend, resend_reason

log = logging.getLogger("aura_pg.retry")


@dataclass(frozen=True)
class AppendRetry:
    """How ``append(..., retry=AppendRetry())`` rides out transient failures.

    At most ``attempts`` attempts, and no new attempt once ``budget``
    seconds have passed since the first. Between attempts it sleeps
    exponentially longer, from ``base_delay`` up to ``max_delay`` seconds,
    half fixed and half random, so writers that failed together do not
    return together.
    """

    attempts: int = 8
    base_delay: float = 0.05
    max_delay: float = 2.0
    budget: float = 30.0

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise ValueError(f"attempts must be an int, not {self.attempts!r}")
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, not {self.attempts}")
        if not 0 < self.base_delay <= self.max_delay:
            raise ValueError(
                f"need 0 < base_delay <= max_delay, not {self.base_delay!r} and {self.max_delay!r}"
            )
        if not self.budget > 0:
            raise ValueError(f"budget must be > 0 seconds, not {self.budget!r}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (from 1)."""
        return Backoff(base=self.base_delay, cap=self.max_delay).delay(attempt)

    def next_delay(self, exc: BaseException, attempt: int, elapsed: float) -> float | None:
        """The wait before another attempt after ``exc`` ended attempt
        number ``attempt``, ``elapsed`` seconds after the first began; None
        when the failure is not transient or the attempts or the budget
        are spent."""
        if not can_resend(exc) or attempt >= self.attempts:
            return None
        delay = self.delay(attempt)
        if elapsed + delay > self.budget:
            return None
        return delay


def wait_before_resending(
    retry: AppendRetry | None, stream_id: str, exc: BaseException, attempt: int, elapsed: float
) -> float | None:
    """The seconds to wait before sending the batch again after ``exc``
    ended attempt number ``attempt``, ``elapsed`` seconds after the first
    began, the retry counted (``aura_append_retries_total{reason}``) and
    logged; None when the failure is to be raised."""
    if retry is None:
        return None
    delay = retry.next_delay(exc, attempt, elapsed)
    if delay is None:
        return None
    # Imported here: prometheus_client is not worth loading for every
    # importer of the store (a store imports it when it is created).
    from aura_pg.observability import metrics

    metrics.APPEND_RETRIES.labels(resend_reason(exc) or "other").inc()
    text = str(exc).strip()
    log.warning(
        "append to %r: attempt %d failed (%s: %s); sending the same batch again in %.2fs",
        stream_id,
        attempt,
        type(exc).__name__,
        text.splitlines()[0] if text else "",
        delay,
    )
    return delay
