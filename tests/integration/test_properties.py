"""Property-based tests of the append/read invariants against a model.

A hypothesis state machine appends random batches (fresh or reused
idempotency keys, right or wrong expected versions) and retries earlier
appends; after every step the store must agree with a plain Python model:
per-stream versions contiguous from 1, retries recorded once, errors writing
nothing, and the global read returning every event exactly once in an order
consistent with each stream's.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from aura_pg import (
    ANY,
    NO_STREAM,
    STREAM_EXISTS,
    AppendResult,
    ConcurrencyError,
    EventStore,
    EventValidationError,
    IdempotencyConflict,
    NewEvent,
)

STREAMS = ["a", "b", "c"]
KEYS = [f"k{i}" for i in range(6)]


@dataclass
class Recorded:
    type: str
    data: dict[str, Any]
    version: int
    global_position: int


def expected_outcome(
    streams: dict[str, list[Recorded]],
    keys: dict[tuple[str, str], Recorded],
    stream: str,
    batch: list[NewEvent],
    expected: Any,
) -> str:
    """What the store must do with this append, by the documented rules."""
    batch_keys = [e.key for e in batch]
    if len(set(batch_keys)) != len(batch_keys):
        return "invalid"
    current = len(streams[stream])
    recorded = [keys.get((stream, e.key)) for e in batch]
    if any(recorded):
        matching = all(
            r is not None and r.type == e.type and r.data == e.data
            for r, e in zip(recorded, batch, strict=True)
        )
        return "duplicate" if matching else "conflict"
    if expected is ANY:
        ok = True
    elif expected is NO_STREAM:
        ok = current == 0
    elif expected is STREAM_EXISTS:
        ok = current > 0
    else:
        ok = current == expected
    return "ok" if ok else "concurrency"


class AppendMachine(RuleBasedStateMachine):
    store: EventStore

    batches = Bundle("batches")

    @initialize()
    def fresh_namespace(self) -> None:
        self.prefix = f"p{uuid.uuid4().hex[:8]}-"
        self.streams: dict[str, list[Recorded]] = {s: [] for s in STREAMS}
        self.keys: dict[tuple[str, str], Recorded] = {}

    def _append(self, stream: str, batch: list[NewEvent], expected: Any) -> None:
        outcome = expected_outcome(self.streams, self.keys, stream, batch, expected)
        before = len(self.streams[stream])
        try:
            result = self.store.append(self.prefix + stream, batch, expected)
        except EventValidationError:
            assert outcome == "invalid"
        except IdempotencyConflict:
            assert outcome == "conflict"
        except ConcurrencyError as exc:
            assert outcome == "concurrency"
            assert exc.actual == before
        else:
            self._check_success(stream, batch, outcome, before, result)

    def _check_success(
        self, stream: str, batch: list[NewEvent], outcome: str, before: int, result: AppendResult
    ) -> None:
        if outcome == "duplicate":
            assert result.duplicate
            originals = [self.keys[(stream, e.key)] for e in batch]
            assert [e.version for e in result.events] == [r.version for r in originals]
            assert [e.global_position for e in result.events] == [
                r.global_position for r in originals
            ]
            return
        assert outcome == "ok"
        assert not result.duplicate
        assert [e.version for e in result.events] == list(
            range(before + 1, before + len(batch) + 1)
        )
        for event, appended in zip(batch, result.events, strict=True):
            recorded = Recorded(
                event.type, dict(event.data), appended.version, appended.global_position
            )  # type: ignore[arg-type]
            self.streams[stream].append(recorded)
            self.keys[(stream, event.key)] = recorded

    @rule(
        target=batches,
        stream=st.sampled_from(STREAMS),
        specs=st.lists(
            st.tuples(
                st.sampled_from(["X", "Y"]),
                st.integers(0, 2),
                st.one_of(st.none(), st.sampled_from(KEYS)),
            ),
            min_size=1,
            max_size=4,
        ),
        expected=st.one_of(
            st.sampled_from([ANY, NO_STREAM, STREAM_EXISTS, "current"]), st.integers(0, 6)
        ),
    )
    def append(
        self, stream: str, specs: list[tuple[str, int, str | None]], expected: Any
    ) -> tuple[str, list[NewEvent]]:
        batch = [NewEvent(t, {"v": v}, idempotency_key=k) for t, v, k in specs]
        if expected == "current":
            expected = len(self.streams[stream])
        self._append(stream, batch, expected)
        return stream, batch

    @rule(previous=batches, expected=st.sampled_from([ANY, NO_STREAM, 0, 1]))
    def retry(self, previous: tuple[str, list[NewEvent]], expected: Any) -> None:
        stream, batch = previous
        self._append(stream, batch, expected)

    @invariant()
    def streams_match_the_model(self) -> None:
        if not hasattr(self, "prefix"):
            return
        for stream, model in self.streams.items():
            events = self.store.read_stream(self.prefix + stream)
            assert [(e.type, e.data, e.version, e.global_position) for e in events] == [
                (r.type, r.data, r.version, r.global_position) for r in model
            ]
            assert self.store.stream_version(self.prefix + stream) == len(model)

    def teardown(self) -> None:
        if not hasattr(self, "prefix"):
            return
        mine = [e for e in self.store.iter_all(batch_size=7) if e.stream_id.startswith(self.prefix)]
        assert len(mine) == sum(len(m) for m in self.streams.values())
        assert len({e.global_position for e in mine}) == len(mine)
        for stream in STREAMS:
            versions = [e.version for e in mine if e.stream_id == self.prefix + stream]
            assert versions == sorted(versions)


@pytest.mark.slow
def test_append_and_read_invariants(store: EventStore) -> None:
    AppendMachine.store = store
    run_state_machine_as_test(
        AppendMachine,
        settings=settings(
            max_examples=40,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        ),
    )


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**62), 2**62),
    st.floats(min_value=-1e15, max_value=1e15, allow_nan=False, allow_infinity=False).filter(
        lambda f: f == 0 or abs(f) > 1e-15
    ),
    st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"])),
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(max_size=8).filter(lambda s: "\x00" not in s), children, max_size=4
        )
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(
    st.text(max_size=8).filter(lambda s: "\x00" not in s), json_values, max_size=5
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=json_objects, metadata=json_objects)
def test_any_json_object_reads_back_equal(
    store: EventStore, data: dict[str, Any], metadata: dict[str, Any]
) -> None:
    stream = f"json-{uuid.uuid4()}"
    store.append(stream, NewEvent("T", data, metadata=metadata))
    (event,) = store.read_stream(stream)
    assert event.data == data
    assert event.metadata == metadata
