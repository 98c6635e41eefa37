-- The read model of load/reliability.py: every applied event by position
-- (a second application of an event violates the primary key, loudly) and
-- per stream its event count and last version. Events whose data has the
-- key "poison" cannot be applied: they must end in the dead letters.

CREATE TABLE applied_events (
    global_position bigint PRIMARY KEY,
    stream_id       text   NOT NULL,
    version         bigint NOT NULL
);

CREATE TABLE streams (
    stream_id    text   PRIMARY KEY,
    events       bigint NOT NULL,
    last_version bigint NOT NULL
);

CREATE FUNCTION refuse_poison(e aura.events) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF e.data ? 'poison' THEN
        RAISE EXCEPTION 'poison event % at position %', e.event_id, e.global_position;
    END IF;
END;
$$;

CREATE FUNCTION apply_event(e aura.events) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM refuse_poison(e);
    INSERT INTO applied_events VALUES (e.global_position, e.stream_id, e.version);
    INSERT INTO streams AS s VALUES (e.stream_id, 1, e.version)
        ON CONFLICT (stream_id) DO UPDATE
        SET events = s.events + 1, last_version = greatest(s.last_version, excluded.last_version);
END;
$$;

CREATE FUNCTION apply_batch(batch aura.events[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM refuse_poison(e) FROM unnest(batch) AS e;
    INSERT INTO applied_events
        SELECT e.global_position, e.stream_id, e.version FROM unnest(batch) AS e;
    INSERT INTO streams AS s
        SELECT e.stream_id, count(*), max(e.version) FROM unnest(batch) AS e GROUP BY e.stream_id
        ON CONFLICT (stream_id) DO UPDATE
        SET events = s.events + excluded.events,
            last_version = greatest(s.last_version, excluded.last_version);
END;
$$;

CREATE FUNCTION forget_stream(p_stream_id text) RETURNS void
LANGUAGE sql AS $$
    DELETE FROM applied_events WHERE stream_id = p_stream_id;
    DELETE FROM streams WHERE stream_id = p_stream_id;
$$;
