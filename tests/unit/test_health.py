"""The health score's documented formula, one input at a time."""

from __future__ import annotations

import pytest

from aura_pg.observability.health import (
    CIRCUIT_WEIGHT,
    DEAD_LETTER_WEIGHT,
    ERROR_WEIGHT,
    LAG_WEIGHT,
    HealthInputs,
    OutcomeWindow,
    health_score,
)


def score(**inputs: float) -> float:
    return health_score(HealthInputs(database_up=True, **inputs))  # type: ignore[arg-type]


def test_a_healthy_system_scores_100_and_an_unreachable_database_0() -> None:
    assert score() == 100
    assert score(projections=4) == 100
    assert health_score(HealthInputs(database_up=False)) == 0


@pytest.mark.parametrize(
    ("lag", "expected"),
    [(0, 100), (6, 100 - LAG_WEIGHT * 0.1), (30, 100 - LAG_WEIGHT / 2), (60, 70), (3600, 70)],
)
def test_lag_costs_up_to_30_points_at_a_minute(lag: float, expected: float) -> None:
    assert score(max_lag_seconds=lag) == pytest.approx(expected, abs=0.05)


@pytest.mark.parametrize(
    ("rate", "expected"),
    [(0, 100), (0.01, 100 - ERROR_WEIGHT / 5), (0.025, 87.5), (0.05, 75), (1.0, 75)],
)
def test_errors_cost_up_to_25_points_at_one_attempt_in_twenty(rate: float, expected: float) -> None:
    assert score(error_rate=rate) == pytest.approx(expected, abs=0.05)


@pytest.mark.parametrize(
    ("dead", "expected"),
    [(0, 100), (1, 100 - DEAD_LETTER_WEIGHT / 10), (5, 90), (10, 80), (500, 80)],
)
def test_dead_letters_cost_up_to_20_points_at_ten(dead: int, expected: float) -> None:
    assert score(dead_letters=dead) == pytest.approx(expected, abs=0.05)


@pytest.mark.parametrize(
    ("open_circuits", "projections", "expected"),
    [(0, 4, 100), (1, 4, 100 - CIRCUIT_WEIGHT / 4), (2, 4, 87.5), (4, 4, 75), (0, 0, 100)],
)
def test_open_circuits_cost_their_share_of_25_points(
    open_circuits: int, projections: int, expected: float
) -> None:
    assert score(open_circuits=open_circuits, projections=projections) == pytest.approx(
        expected, abs=0.05
    )


def test_the_terms_add_up_and_the_score_never_goes_below_zero() -> None:
    everything = score(
        max_lag_seconds=120, error_rate=0.5, dead_letters=50, open_circuits=3, projections=3
    )
    assert everything == 0
    assert score(max_lag_seconds=30, dead_letters=5) == pytest.approx(100 - 15 - 10)


def test_negative_inputs_do_not_raise_the_score() -> None:
    assert score(max_lag_seconds=-5, error_rate=-1, dead_letters=-3) == 100


def test_the_outcome_window_forgets_what_is_older_than_the_window() -> None:
    window = OutcomeWindow(window_seconds=60)
    assert window.error_rate(now=0) == 0
    window.record(successes=9, failures=1, now=0)
    assert window.error_rate(now=1) == pytest.approx(0.1)
    window.record(successes=10, now=30)
    assert window.error_rate(now=31) == pytest.approx(1 / 20)
    # The first slot leaves the window; only the later successes remain.
    assert window.error_rate(now=65) == 0
    window.record(failures=2, now=65)
    assert window.error_rate(now=66) == pytest.approx(2 / 12)
    assert window.error_rate(now=200) == 0
