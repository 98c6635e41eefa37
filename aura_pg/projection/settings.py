"""How a projector daemon runs: intervals, timeouts, wake-up source, owner
name. Shared by the daemon, its runners and its wake-up connections."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Final, Literal, get_args

from aura_pg._runtime import Backoff

WakeSource = Literal["watch", "listen", "poll"]
RECONNECT_FIRST_DELAY: Final = 0.1
WAKE_SOURCES: tuple[WakeSource, ...] = get_args(WakeSource)


def default_owner() -> str:
    """How this process names itself in checkpoint rows: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class ProjectorSettings:
    poll_interval: float = 1.0
    wake: WakeSource = "watch"
    # The log watcher reads the horizon every watch_interval while the log
    # moves and for watch_hold seconds after it last moved (bursts with
    # short pauses keep the fast tick), then slows down, each quiet tick 1.5
    # times the last, to watch_idle_interval: the most an event appended
    # after a long quiet spell waits for its wake-up.
    watch_interval: float = 0.01
    watch_idle_interval: float = 0.05
    watch_hold: float = 1.0
    shutdown_timeout: float = 30.0
    owner: str = field(default_factory=default_owner)
    statement_timeout_ms: int = 60_000
    lock_timeout_ms: int = 10_000
    # At most this long between attempts to reconnect: a daemon resumes
    # within about this long of the server answering again (an attempt
    # that fails costs the server nothing).
    reconnect_max_delay: float = 0.5
    # How often the listener proves its connection alive when no
    # notification comes.
    listen_keepalive: float = 5.0
    # False: batches commit without waiting for their WAL flush. Safe for
    # correctness (a batch and its checkpoint are lost together in a crash
    # and applied again), and it spares a flush per batch.
    synchronous_commit: bool = True
    # How often a daemon looks for new shadows of its projections
    # (aura_pg.projection.shadows) to run beside them.
    shadow_discovery_interval: float = 5.0

    def __post_init__(self) -> None:
        if not self.poll_interval > 0:
            raise ValueError(f"poll_interval must be > 0, not {self.poll_interval!r}")
        if not self.shutdown_timeout > 0:
            raise ValueError(f"shutdown_timeout must be > 0, not {self.shutdown_timeout!r}")
        if self.wake not in WAKE_SOURCES:
            raise ValueError(f"wake must be one of {', '.join(WAKE_SOURCES)}, not {self.wake!r}")
        if not self.watch_hold >= 0:
            raise ValueError(f"watch_hold must be >= 0, not {self.watch_hold!r}")
        if not 0 < self.watch_interval <= self.watch_idle_interval:
            raise ValueError(
                "need 0 < watch_interval <= watch_idle_interval, not "
                f"{self.watch_interval!r} and {self.watch_idle_interval!r}"
            )

    def reconnect_backoff(self) -> Backoff:
        """The waits between reconnection attempts: 0.1 s, doubling up to
        ``reconnect_max_delay``, without jitter (each daemon reconnects
        alone)."""
        return Backoff(
            base=min(RECONNECT_FIRST_DELAY, self.reconnect_max_delay),
            cap=self.reconnect_max_delay,
            jitter=0.0,
            floor=RECONNECT_FIRST_DELAY,
        )
