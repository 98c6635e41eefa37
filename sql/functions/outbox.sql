-- Outbox routes: appended events of the route's types are copied into
-- aura.outbox in the append transaction, so an event reaches its external
-- system if and only if it was recorded.
--
--   SELECT aura.add_outbox_route('decisions_to_nats', 'nats', 'aura.decisions',
--                                ARRAY['DECISION_APPROVED', 'DECISION_REJECTED']);

CREATE OR REPLACE FUNCTION aura.capture_outbox() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO aura.outbox (sink, topic, message_id, payload, headers, global_position)
    SELECT r.sink, r.topic, e.event_id,
           jsonb_build_object('event_id', e.event_id, 'stream_id', e.stream_id,
                              'version', e.version, 'type', e.type, 'data', e.data,
                              'metadata', e.metadata, 'global_position', e.global_position,
                              'recorded_at', e.recorded_at),
           jsonb_build_object('event_type', e.type, 'stream_id', e.stream_id),
           e.global_position
    FROM new_events e
    JOIN aura.outbox_routes r ON r.event_types IS NULL OR e.type = ANY (r.event_types)
    ORDER BY e.global_position
    ON CONFLICT (sink, topic, message_id) DO NOTHING;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION aura.require_read_committed(p_caller text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION '% must run in a READ COMMITTED transaction, not %', p_caller,
            current_setting('transaction_isolation') USING ERRCODE = 'AU007';
    END IF;
END;
$$;

-- Adds or replaces a route, and creates the capturing trigger on first use.
CREATE OR REPLACE FUNCTION aura.add_outbox_route(
    p_name text, p_sink text, p_topic text, p_event_types text[] DEFAULT NULL
) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    -- Serialises route changes: the check for the trigger below must see
    -- every committed route change, which a snapshot taken before the lock
    -- (REPEATABLE READ, SERIALIZABLE) would not.
    PERFORM aura.require_read_committed('aura.add_outbox_route');
    LOCK TABLE aura.outbox_routes IN SHARE ROW EXCLUSIVE MODE;
    IF p_event_types IS NOT NULL AND cardinality(p_event_types) = 0 THEN
        RAISE EXCEPTION 'outbox route %: event_types must be NULL (all) or name at least one type',
            quote_literal(p_name) USING ERRCODE = 'AU007';
    END IF;
    INSERT INTO aura.outbox_routes (name, event_types, sink, topic)
    VALUES (p_name, p_event_types, p_sink, p_topic)
    ON CONFLICT (name) DO UPDATE
        SET event_types = excluded.event_types, sink = excluded.sink, topic = excluded.topic;
    IF NOT EXISTS (SELECT 1 FROM pg_trigger
                   WHERE tgrelid = 'aura.events'::regclass AND tgname = 'events_capture_outbox') THEN
        CREATE TRIGGER events_capture_outbox
            AFTER INSERT ON aura.events
            REFERENCING NEW TABLE AS new_events
            FOR EACH STATEMENT EXECUTE FUNCTION aura.capture_outbox();
    END IF;
    RETURN p_name;
END;
$$;

-- Removes a route; the trigger goes with the last one.
CREATE OR REPLACE FUNCTION aura.remove_outbox_route(p_name text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM aura.require_read_committed('aura.remove_outbox_route');
    LOCK TABLE aura.outbox_routes IN SHARE ROW EXCLUSIVE MODE;
    DELETE FROM aura.outbox_routes r WHERE r.name = p_name;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM aura.outbox_routes) THEN
        DROP TRIGGER IF EXISTS events_capture_outbox ON aura.events;
    END IF;
    RETURN true;
END;
$$;

-- Writes one message to the outbox in the caller's transaction: for
-- projection handlers that emit messages with their batch. Returns false
-- when (sink, topic, message_id) is already there.
-- A handler's one way into the outbox: it runs as the aura schema's owner,
-- so the handler role needs no privilege on aura.outbox. Its body and the
-- table's defaults and checks name only aura.* and pg_catalog objects.
CREATE OR REPLACE FUNCTION aura.publish_to_outbox(
    p_sink text, p_topic text, p_message_id uuid, p_payload jsonb,
    p_headers jsonb DEFAULT '{}'::jsonb, p_global_position bigint DEFAULT NULL
) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO aura.outbox (sink, topic, message_id, payload, headers, global_position)
    VALUES (p_sink, p_topic, p_message_id, p_payload, coalesce(p_headers, '{}'::jsonb),
            p_global_position)
    ON CONFLICT (sink, topic, message_id) DO NOTHING;
    RETURN FOUND;
END;
$$;

-- Deletes delivered messages older than p_older_than, at most p_limit per
-- call (run it on a schedule); returns how many went.
CREATE OR REPLACE FUNCTION aura.purge_delivered_outbox(
    p_older_than interval DEFAULT '7 days', p_limit integer DEFAULT 10000
) RETURNS bigint
LANGUAGE sql AS $$
    WITH gone AS (
        DELETE FROM aura.outbox o
        WHERE o.id IN (SELECT d.id FROM aura.outbox d
                       WHERE d.status = 'delivered' AND d.delivered_at < now() - p_older_than
                       ORDER BY d.id LIMIT p_limit)
        RETURNING 1
    )
    SELECT count(*) FROM gone
$$;
