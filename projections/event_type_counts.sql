-- event_type_counts: how many events of each type were recorded, and when
-- the last one was. A per-event handler: the simplest kind to write.

CREATE TABLE event_types (
    type             text        PRIMARY KEY,
    events           bigint      NOT NULL,
    last_recorded_at timestamptz NOT NULL
);

CREATE FUNCTION apply_event(e aura.events) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO event_types AS t (type, events, last_recorded_at)
    VALUES (e.type, 1, e.recorded_at)
    ON CONFLICT (type) DO UPDATE
        SET events = t.events + 1,
            last_recorded_at = greatest(t.last_recorded_at, excluded.last_recorded_at);
$$;
