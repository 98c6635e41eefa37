"""The system health score: one number from 0 to 100 that an operator (and
the SystemHealthDegraded alert) can watch.

    score = 0                                   if the database is unreachable
    score = 100 - 30 * min(lag / 60 s, 1)       worst projection lag
                - 25 * min(error_rate / 5%, 1)  failed / attempted, last 5 minutes
                - 20 * min(dead_letters / 10, 1)   pending dead letters, all projections
                - 25 * open_circuits / projections  circuits not closed, or status failed

Each term reaches its full weight at a level an operator should act on: a
minute of lag, one attempt in twenty failing, ten events set aside, every
projection stopped. With no projections the circuit term is 0. The score is
rounded to one decimal.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from threading import Lock
from typing import Final

LAG_WEIGHT: Final = 30.0
LAG_FULL_SECONDS: Final = 60.0
ERROR_WEIGHT: Final = 25.0
ERROR_FULL_RATE: Final = 0.05
DEAD_LETTER_WEIGHT: Final = 20.0
DEAD_LETTERS_FULL: Final = 10
CIRCUIT_WEIGHT: Final = 25.0


@dataclass(frozen=True, slots=True)
class HealthInputs:
    database_up: bool
    max_lag_seconds: float = 0.0
    error_rate: float = 0.0
    dead_letters: int = 0
    open_circuits: int = 0
    projections: int = 0


def _fraction(value: float, full: float) -> float:
    return min(max(value, 0.0) / full, 1.0)


def health_score(inputs: HealthInputs) -> float:
    """The documented formula (see the module docstring)."""
    if not inputs.database_up:
        return 0.0
    penalty = (
        LAG_WEIGHT * _fraction(inputs.max_lag_seconds, LAG_FULL_SECONDS)
        + ERROR_WEIGHT * _fraction(inputs.error_rate, ERROR_FULL_RATE)
        + DEAD_LETTER_WEIGHT * _fraction(inputs.dead_letters, DEAD_LETTERS_FULL)
    )
    if inputs.projections > 0:
        penalty += CIRCUIT_WEIGHT * _fraction(inputs.open_circuits, inputs.projections)
    return round(max(100.0 - penalty, 0.0), 1)


class OutcomeWindow:
    """Successes and failures over a sliding window (default 5 minutes), in
    10-second slots, for the error-rate term. Thread-safe: the daemon's loop
    records, the metrics server's thread reads."""

    SLOT_SECONDS: Final = 10.0

    def __init__(self, window_seconds: float = 300.0) -> None:
        self.window_seconds = window_seconds
        self._slots: deque[tuple[int, int, int]] = deque()  # (slot, successes, failures)
        self._lock = Lock()

    def record(self, successes: int = 0, failures: int = 0, *, now: float | None = None) -> None:
        slot = int((time.monotonic() if now is None else now) // self.SLOT_SECONDS)
        with self._lock:
            if self._slots and self._slots[-1][0] == slot:
                _, ok, failed = self._slots.pop()
                successes, failures = ok + successes, failed + failures
            self._slots.append((slot, successes, failures))
            self._trim(slot)

    def error_rate(self, *, now: float | None = None) -> float:
        """failures / (successes + failures) in the window; 0 with no attempts."""
        slot = int((time.monotonic() if now is None else now) // self.SLOT_SECONDS)
        with self._lock:
            self._trim(slot)
            successes = sum(s for _, s, _ in self._slots)
            failures = sum(f for _, _, f in self._slots)
        attempts = successes + failures
        return failures / attempts if attempts else 0.0

    def _trim(self, slot: int) -> None:
        oldest = slot - int(self.window_seconds // self.SLOT_SECONDS)
        while self._slots and self._slots[0][0] <= oldest:
            self._slots.popleft()
