"""The log as JSON Lines: ``aura-pg export`` and ``aura-pg import jsonl``
(docs/import-export.md).

One event per line, in commit order::

    {"stream_id": "...", "version": 1, "type": "...", "data": {...},
     "metadata": {...}, "event_id": "...", "idempotency_key": "...",
     "recorded_at": "2026-12-07T23:00:00.123456+00:00"}

An import appends through the bulk path (``EventStore.append_many``) in
chunks of consecutive lines, each one transaction; each stream's events go
at their recorded versions (expected version = first version - 1) and the
chunk keeps the file's order across streams. An interrupted import, run
again with the same chunk size, finds its committed chunks recorded (the
same ids and content: answered as duplicates, nothing written twice) and
carries on. ``recorded_at`` is not imported: the target records its own
time (a writer may not set the log's time; the file keeps the original).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any, Final

from aura_pg.errors import AuraPgError
from aura_pg.models import Checkpoint, NewEvent, RecordedEvent, StreamAppend
from aura_pg.store import EventStore
from aura_pg.store.operations import DEFAULT_CHUNK_EVENTS, DEFAULT_CHUNK_STREAMS

EXPORT_PAGE: Final = 5_000


class JsonlError(AuraPgError):
    """A line of a JSONL file is not an event aura-pg can import."""


@dataclass(frozen=True, slots=True)
class ImportSummary:
    lines: int
    chunks: int
    appended: int  # events written by this run
    duplicates: int  # events found recorded (an earlier, interrupted run)


# Line breaks to other readers (str.splitlines, editors) that JSON leaves
# unescaped in strings: escaped, so that a line is always one event.
_LINE_BREAKS: Final = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def event_line(event: RecordedEvent) -> str:
    """One exported line (no newline)."""
    text = json.dumps(
        {
            "stream_id": event.stream_id,
            "version": event.version,
            "type": event.type,
            "data": event.data,
            "metadata": event.metadata,
            "event_id": str(event.event_id),
            "idempotency_key": event.idempotency_key,
            "recorded_at": event.recorded_at.isoformat(),
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return text if text.isascii() else text.translate(_LINE_BREAKS)


def export(
    store: EventStore, out: IO[str], after: Checkpoint | None = None
) -> tuple[int, Checkpoint | None]:
    """Write every event after ``after`` up to the present, in commit order;
    the number written and the checkpoint of the last one."""
    count = 0
    last = after
    for event in store.iter_all(after, batch_size=EXPORT_PAGE):
        out.write(event_line(event))
        out.write("\n")
        count += 1
        last = event.checkpoint
    return count, last


_FIELDS: Final = ("stream_id", "version", "type", "data", "event_id")


def parse_line(number: int, line: str) -> tuple[str, int, NewEvent]:
    """A line's stream id, version and event; JsonlError when it is not one."""
    try:
        item = json.loads(line)
    except ValueError as exc:
        raise JsonlError(f"line {number}: not JSON: {exc}") from None
    if not isinstance(item, dict):
        raise JsonlError(f"line {number}: not a JSON object")
    missing = [name for name in _FIELDS if name not in item]
    if missing:
        raise JsonlError(f"line {number}: missing {', '.join(missing)}")
    stream_id, version = item["stream_id"], item["version"]
    if not isinstance(stream_id, str):
        raise JsonlError(f"line {number}: stream_id must be a string")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise JsonlError(f"line {number}: version must be an integer >= 1")
    metadata = item.get("metadata")
    if not isinstance(item["data"], dict) or not isinstance(metadata, dict | None):
        raise JsonlError(f"line {number}: data and metadata must be JSON objects")
    if not isinstance(item["type"], str):
        raise JsonlError(f"line {number}: type must be a string")
    try:
        event_id = uuid.UUID(str(item["event_id"]))
    except ValueError:
        raise JsonlError(f"line {number}: event_id is not a UUID") from None
    key = item.get("idempotency_key")
    if key is not None and not isinstance(key, str):
        raise JsonlError(f"line {number}: idempotency_key must be a string")
    # A key equal to the event id is the default one: imported as such, so
    # the event is deduplicated by its id, as it was in the source.
    return (
        stream_id,
        version,
        NewEvent(
            type=item["type"],
            data=item["data"],
            metadata=metadata,
            idempotency_key=None if key == str(event_id) else key,
            event_id=event_id,
        ),
    )


def chunks(
    lines: Iterable[str], chunk_events: int, chunk_streams: int
) -> Iterator[tuple[int, list[StreamAppend]]]:
    """Consecutive lines in chunks of at most ``chunk_events`` events and
    ``chunk_streams`` streams (a chunk's boundaries depend only on the file
    and these two numbers, so a rerun meets the same ones), as each stream's
    batch at its recorded versions; with the chunk's last line number."""
    batches: dict[str, tuple[int, list[NewEvent], list[int]]] = {}
    size = 0
    number = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        stream_id, version, event = parse_line(number, line)
        batch = batches.get(stream_id)
        if batch is None:
            if len(batches) >= chunk_streams:
                yield number - 1, _appends(batches)
                batches, size = {}, 0
            batches[stream_id] = (version, [event], [number])
        else:
            first, events, sequence = batch
            if version != first + len(events):
                raise JsonlError(
                    f"line {number}: stream {stream_id!r} version {version} follows version "
                    f"{first + len(events) - 1} (the file must be in commit order)"
                )
            events.append(event)
            sequence.append(number)
        size += 1
        if size >= chunk_events:
            yield number, _appends(batches)
            batches, size = {}, 0
    if batches:
        yield number, _appends(batches)


def _appends(batches: dict[str, tuple[int, list[NewEvent], list[int]]]) -> list[StreamAppend]:
    return [
        StreamAppend(stream_id, events, first - 1, sequence)
        for stream_id, (first, events, sequence) in batches.items()
    ]


def import_lines(
    store: EventStore,
    lines: Iterable[str],
    *,
    chunk_events: int = DEFAULT_CHUNK_EVENTS,
    chunk_streams: int = DEFAULT_CHUNK_STREAMS,
    progress: Callable[[int, ImportSummary], Any] | None = None,
) -> ImportSummary:
    """Import JSONL lines through the bulk path, one transaction per chunk."""
    count = appended = duplicates = 0
    last_line = 0
    for last_line, appends in chunks(lines, chunk_events, chunk_streams):
        results = store.append_many(appends, chunk_streams=chunk_streams, chunk_events=2**31 - 1)
        count += 1
        for result in results:
            if result.duplicate:
                duplicates += len(result.events)
            else:
                appended += len(result.events)
        if progress is not None:
            progress(last_line, ImportSummary(last_line, count, appended, duplicates))
    return ImportSummary(last_line, count, appended, duplicates)
