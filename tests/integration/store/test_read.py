"""Reading streams and the global log."""

from __future__ import annotations

import pytest

from aura_pg import BACKWARDS, FORWARDS, START, Checkpoint, EventStore, NewEvent


def fill(store: EventStore, stream_id: str, count: int, type_: str = "T") -> None:
    store.append(stream_id, [NewEvent(type_, {"n": n}) for n in range(1, count + 1)])


def test_read_stream_forwards_backwards_and_limits(store: EventStore) -> None:
    fill(store, "s", 10)
    fill(store, "other", 3)
    assert [e.version for e in store.read_stream("s")] == list(range(1, 11))
    assert [e.version for e in store.read_stream("s", from_version=4, limit=3)] == [4, 5, 6]
    assert [e.version for e in store.read_stream("s", direction=BACKWARDS)] == list(
        range(10, 0, -1)
    )
    assert [e.version for e in store.read_stream("s", 5, BACKWARDS, limit=2)] == [5, 4]
    assert store.read_stream("s", from_version=11) == []
    assert store.read_stream("missing") == []
    assert all(e.stream_id == "s" for e in store.read_stream("s", direction=FORWARDS))


def test_read_stream_rejects_bad_arguments(store: EventStore) -> None:
    with pytest.raises(ValueError, match="limit"):
        store.read_stream("s", limit=0)
    with pytest.raises(ValueError, match="from_version"):
        store.read_stream("s", from_version=-1)
    with pytest.raises(ValueError, match="direction"):
        store.read_stream("s", direction="up")  # type: ignore[arg-type]


def test_iter_stream_pages_through_a_long_stream(store: EventStore) -> None:
    fill(store, "s", 25)
    assert [e.version for e in store.iter_stream("s", batch_size=7)] == list(range(1, 26))
    assert [e.version for e in store.iter_stream("s", from_version=20, batch_size=5)] == [
        20, 21, 22, 23, 24, 25,
    ]  # fmt: skip


def test_read_all_pages_in_commit_order(store: EventStore) -> None:
    for i in range(5):
        fill(store, f"s{i}", 3)
    seen = []
    after: Checkpoint | None = None
    while True:
        page = store.read_all(after, limit=4)
        seen.extend(page.events)
        if page.is_empty:
            break
        assert page.checkpoint == page.events[-1].checkpoint
        after = page.checkpoint
    assert len(seen) == 15
    assert [e.checkpoint for e in seen] == sorted(e.checkpoint for e in seen)
    assert len({e.event_id for e in seen}) == 15
    assert store.read_all(after).events == ()


def test_read_all_type_filter_skips_past_filtered_events(store: EventStore) -> None:
    fill(store, "a", 3, "WANTED")
    fill(store, "b", 50, "NOISE")
    page = store.read_all(START, limit=10, types=["WANTED"])
    assert [e.type for e in page.events] == ["WANTED"] * 3
    # The page was not full: everything visible was looked at, so the
    # checkpoint moves past the noise and the next read starts at the head.
    (last,) = store.read_all(START, limit=1000, types=None).events[-1:]
    assert page.checkpoint == last.checkpoint
    assert store.read_all(page.checkpoint, types=["WANTED"]).events == ()
    fill(store, "c", 1, "WANTED")
    assert [e.stream_id for e in store.read_all(page.checkpoint, types=["WANTED"]).events] == ["c"]


def test_full_filtered_page_checkpoints_at_its_last_event(store: EventStore) -> None:
    fill(store, "a", 5, "WANTED")
    fill(store, "b", 5, "NOISE")
    page = store.read_all(limit=2, types=["WANTED", "ALSO_WANTED"])
    assert len(page.events) == 2
    assert page.checkpoint == page.events[-1].checkpoint


def test_iter_all_reads_everything_in_bounded_pages(store: EventStore) -> None:
    for i in range(7):
        fill(store, f"s{i}", 10)
    events = list(store.iter_all(batch_size=9))
    assert len(events) == 70
    assert [e.checkpoint for e in events] == sorted(e.checkpoint for e in events)
    tail = list(store.iter_all(after=events[59].checkpoint, batch_size=4))
    assert tail == events[60:]


def test_read_all_rejects_bad_arguments(store: EventStore) -> None:
    with pytest.raises(ValueError, match="limit"):
        store.read_all(limit=0)
    with pytest.raises(ValueError, match="types"):
        store.read_all(types=[])
    with pytest.raises(ValueError, match="types"):
        store.read_all(types="T")
    with pytest.raises(ValueError, match="Checkpoint"):
        store.read_all(after=(1, 2))  # type: ignore[arg-type]


def test_read_all_from_sql_matches_the_python_reader(store: EventStore) -> None:
    fill(store, "s", 4)
    with store.pool.connection() as conn:
        rows = conn.execute(
            "SELECT global_position FROM aura.read_all('0', 0, 100)"
            " ORDER BY transaction_id, global_position"
        ).fetchall()
    assert [r[0] for r in rows] == [e.global_position for e in store.iter_all()]
