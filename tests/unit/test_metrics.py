"""The bulk histogram behind the per-event projector histograms: the same
exposition as prometheus_client's Histogram, fed a batch at a time."""

from __future__ import annotations

import bisect

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from aura_pg.observability.metrics import BucketCounts, BulkHistogram

BUCKETS = (0.001, 0.01, 0.1, 1.0)


def samples(registry: CollectorRegistry) -> dict[tuple[str, str | None, str | None], float]:
    found = {}
    for family in registry.collect():
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                key = (sample.name, sample.labels.get("kind"), sample.labels.get("le"))
                found[key] = sample.value
    return found


def pair() -> tuple[CollectorRegistry, BulkHistogram, CollectorRegistry, Histogram]:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    bulk = BulkHistogram("h_seconds", "doc", ["kind"], BUCKETS, registry=ours)
    reference = Histogram("h_seconds", "doc", ["kind"], buckets=BUCKETS, registry=theirs)
    return ours, bulk, theirs, reference


def test_repeated_observations_of_one_value() -> None:
    ours, bulk, theirs, reference = pair()
    bulk.observe(("a",), 0.05, 500)
    bulk.observe(("b",), 0.001, 2)  # on a bound: counted in that bound's bucket
    for _ in range(500):
        reference.labels("a").observe(0.05)
    for _ in range(2):
        reference.labels("b").observe(0.001)
    assert samples(ours) == pytest.approx(samples(theirs))
    assert b'h_seconds_bucket{kind="a",le="+Inf"} 500.0' in generate_latest(ours)


@pytest.mark.parametrize(
    "values", [[0.0005, 0.001, 0.0011, 0.01, 0.5, 1.0, 7.0], [0.2] * 50, [1e-9, 1e9]]
)
def test_counts_made_elsewhere_add_up_like_single_observations(values: list[float]) -> None:
    ours, bulk, theirs, reference = pair()
    bounds = [*BUCKETS, float("inf")]
    counts: dict[int, int] = {}
    for value in values:
        index = bisect.bisect_left(bounds, value)  # the first bound >= value: "le"
        counts[index] = counts.get(index, 0) + 1
        reference.labels("a").observe(value)
    bulk.add_counts(("a",), BucketCounts(counts, sum(values)))
    assert samples(ours) == pytest.approx(samples(theirs))


def test_nothing_counted_adds_no_series() -> None:
    registry = CollectorRegistry()
    bulk = BulkHistogram("h_seconds", "doc", ["kind"], BUCKETS, registry=registry)
    bulk.add_counts(("a",), BucketCounts({}, 0.0))
    assert samples(registry) == {}
