-- The benchmark's read model (load/bench_projection.py): per stream, its
-- event count, last version, last type and last position, and when the
-- projection last applied one of its events; per event type, its count.
-- Both handlers build exactly the same rows (applied_at aside), so the
-- benchmark can compare them with each other and with a GROUP BY over
-- aura.events.
--
-- applied_at is clock_timestamp() while the handler runs: the latency part
-- of the benchmark gives every append its own stream and reads, per
-- stream, when its events were applied. The projection's own commit comes
-- after that moment.

CREATE TABLE streams (
    stream_id     text        PRIMARY KEY,
    events        bigint      NOT NULL,
    last_version  bigint      NOT NULL,
    last_type     text        NOT NULL,
    last_position bigint      NOT NULL,
    applied_at    timestamptz NOT NULL
);

CREATE TABLE event_types (
    type   text   PRIMARY KEY,
    events bigint NOT NULL
);

-- Per event: one upsert per stream row and one per type row, for every event.
CREATE FUNCTION apply_event(e aura.events) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO streams AS s (stream_id, events, last_version, last_type, last_position, applied_at)
    VALUES (e.stream_id, 1, e.version, e.type, e.global_position, clock_timestamp())
    ON CONFLICT (stream_id) DO UPDATE
        SET events = s.events + 1,
            last_version = greatest(s.last_version, excluded.last_version),
            last_type = CASE WHEN excluded.last_version > s.last_version
                             THEN excluded.last_type ELSE s.last_type END,
            last_position = greatest(s.last_position, excluded.last_position),
            applied_at = excluded.applied_at;
    INSERT INTO event_types AS t (type, events) VALUES (e.type, 1)
    ON CONFLICT (type) DO UPDATE SET events = t.events + 1;
$$;

-- Set-based: the batch folded per stream and per type, one upsert each.
CREATE FUNCTION apply_batch(batch aura.events[]) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO streams AS s (stream_id, events, last_version, last_type, last_position, applied_at)
    SELECT e.stream_id, count(*), max(e.version),
           (array_agg(e.type ORDER BY e.version DESC))[1], max(e.global_position),
           clock_timestamp()
    FROM unnest(batch) AS e
    GROUP BY e.stream_id
    ON CONFLICT (stream_id) DO UPDATE
        SET events = s.events + excluded.events,
            last_version = greatest(s.last_version, excluded.last_version),
            last_type = CASE WHEN excluded.last_version > s.last_version
                             THEN excluded.last_type ELSE s.last_type END,
            last_position = greatest(s.last_position, excluded.last_position),
            applied_at = excluded.applied_at;
    INSERT INTO event_types AS t (type, events)
    SELECT e.type, count(*) FROM unnest(batch) AS e GROUP BY e.type
    ON CONFLICT (type) DO UPDATE SET events = t.events + excluded.events;
$$;
