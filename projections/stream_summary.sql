-- stream_summary: one row per stream (events, last version and type, first
-- and last event times) and, through a view, per category (the part of the
-- stream id before the first '-').
--
-- Run by the projection engine with this projection's schema first on the
-- search_path: names below are unqualified on purpose, so a rebuild can
-- build the same model into a shadow schema.

CREATE TABLE streams (
    stream_id         text        PRIMARY KEY,
    category          text        NOT NULL,
    events            bigint      NOT NULL,
    last_version      bigint      NOT NULL,
    last_type         text        NOT NULL,
    first_recorded_at timestamptz NOT NULL,
    last_recorded_at  timestamptz NOT NULL
);

CREATE INDEX streams_category_idx ON streams (category);

CREATE VIEW categories AS
SELECT category, count(*) AS streams, sum(events) AS events, max(last_recorded_at) AS last_event_at
FROM streams
GROUP BY category;

-- Set-based handler: folds a whole batch with one statement.
CREATE FUNCTION apply_events(batch aura.events[]) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO streams AS s (stream_id, category, events, last_version, last_type,
                              first_recorded_at, last_recorded_at)
    SELECT e.stream_id, split_part(e.stream_id, '-', 1), count(*), max(e.version),
           (array_agg(e.type ORDER BY e.version DESC))[1], min(e.recorded_at), max(e.recorded_at)
    FROM unnest(batch) AS e
    GROUP BY e.stream_id
    ON CONFLICT (stream_id) DO UPDATE
        SET events = s.events + excluded.events,
            last_version = greatest(s.last_version, excluded.last_version),
            last_type = CASE WHEN excluded.last_version > s.last_version
                             THEN excluded.last_type ELSE s.last_type END,
            last_recorded_at = greatest(s.last_recorded_at, excluded.last_recorded_at);
$$;

-- For aura.replay_stream: what this model holds for one stream.
CREATE FUNCTION forget_stream(p_stream_id text) RETURNS void
LANGUAGE sql AS $$
    DELETE FROM streams WHERE stream_id = p_stream_id;
$$;
