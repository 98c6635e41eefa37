-- aura.append_events(stream_id, events, expected_version) appends a batch of
-- events to one stream, all or nothing, and returns one row per event.
--
--   events            a JSON array of objects:
--                     {"type": text, "data": object, "metadata"?: object,
--                      "idempotency_key"?: text, "event_id"?: uuid}
--   expected_version  'any' (default), 'no_stream', 'stream_exists', or the
--                     stream's current version as digits ('0' = no stream).
--
-- Retrying a recorded append (same idempotency keys, same type and data)
-- writes nothing and returns the recorded rows with duplicate = true,
-- whatever expected_version says by then.
--
-- Errors (SQLSTATE):
--   AU001  the stream is not at the expected version; nothing written
--   AU002  an idempotency key was recorded with other content, or the batch
--          mixes recorded and new keys; nothing written
--   AU003  invalid input
--
-- Example (psql):
--   SELECT * FROM aura.append_events('debate-42',
--     '[{"type": "DEBATE_STARTED", "data": {"topic": "t"}}]', 'no_stream');
CREATE OR REPLACE FUNCTION aura.append_events(
    p_stream_id        text,
    p_events           jsonb,
    p_expected_version text DEFAULT 'any'
) RETURNS TABLE (event_id uuid, version bigint, global_position bigint, duplicate boolean)
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
    v_max_bytes  bigint := coalesce(nullif(current_setting('aura.max_payload_bytes', true), ''),
                                    '1048576')::bigint;
    v_expected   bigint;
    v_count      int;
    v_problem    text;
    v_ids        uuid[];
    v_types      text[];
    v_data       jsonb[];
    v_metadata   jsonb[];
    v_keys       text[];
    v_hashes     bytea[];
    v_current    bigint;
    v_recorded   int;
    v_matching   int;
BEGIN
    IF p_stream_id IS NULL OR char_length(p_stream_id) NOT BETWEEN 1 AND 200
       OR p_stream_id ~ '[[:cntrl:]]' THEN
        RAISE EXCEPTION 'invalid stream id %: it must have 1 to 200 characters and no control characters',
            coalesce(quote_literal(left(p_stream_id, 210)), 'NULL')
            USING ERRCODE = 'AU003';
    END IF;
    IF p_expected_version ~ '^[0-9]{1,18}$' THEN
        v_expected := p_expected_version::bigint;
    ELSIF p_expected_version IS NULL
          OR p_expected_version NOT IN ('any', 'no_stream', 'stream_exists') THEN
        RAISE EXCEPTION 'invalid expected version %: use any, no_stream, stream_exists or a version >= 0',
            coalesce(quote_literal(p_expected_version), 'NULL')
            USING ERRCODE = 'AU003';
    ELSIF p_expected_version = 'no_stream' THEN
        v_expected := 0;
    END IF;
    IF p_events IS NULL OR jsonb_typeof(p_events) <> 'array' OR jsonb_array_length(p_events) = 0 THEN
        RAISE EXCEPTION 'events must be a non-empty JSON array' USING ERRCODE = 'AU003';
    END IF;

    SELECT format('event %s: %s', ord, problem) INTO v_problem
    FROM (
        SELECT ord, CASE
            WHEN jsonb_typeof(e) <> 'object' THEN 'must be a JSON object'
            WHEN jsonb_typeof(e->'type') IS DISTINCT FROM 'string' THEN 'type must be a string'
            WHEN char_length(e->>'type') NOT BETWEEN 1 AND 200 THEN 'type must have 1 to 200 characters'
            WHEN (e->>'type') ~ '[[:cntrl:]]' THEN 'type must not contain control characters'
            WHEN jsonb_typeof(e->'data') IS DISTINCT FROM 'object' THEN 'data must be a JSON object'
            WHEN coalesce(jsonb_typeof(e->'metadata'), 'null') NOT IN ('object', 'null')
                THEN 'metadata must be a JSON object'
            WHEN coalesce(jsonb_typeof(e->'idempotency_key'), 'null') NOT IN ('string', 'null')
                THEN 'idempotency_key must be a string'
            WHEN char_length(e->>'idempotency_key') NOT BETWEEN 1 AND 255
                THEN 'idempotency_key must have 1 to 255 characters'
            WHEN (e->>'idempotency_key') ~ '[[:cntrl:]]'
                THEN 'idempotency_key must not contain control characters'
            WHEN coalesce(jsonb_typeof(e->'event_id'), 'null') NOT IN ('string', 'null')
                 OR (e->>'event_id') !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
                THEN 'event_id must be a UUID'
            WHEN octet_length((e->'data')::text) > v_max_bytes
                THEN format('data is %s bytes, over the limit of %s (aura.max_payload_bytes)',
                            octet_length((e->'data')::text), v_max_bytes)
            WHEN octet_length(coalesce(e->'metadata', '{}')::text) > v_max_bytes
                THEN format('metadata is %s bytes, over the limit of %s (aura.max_payload_bytes)',
                            octet_length((e->'metadata')::text), v_max_bytes)
        END AS problem
        FROM jsonb_array_elements(p_events) WITH ORDINALITY AS t(e, ord)
    ) checked
    WHERE problem IS NOT NULL
    ORDER BY ord
    LIMIT 1;
    IF v_problem IS NOT NULL THEN
        RAISE EXCEPTION 'invalid event in batch for stream %: %', quote_literal(p_stream_id), v_problem
            USING ERRCODE = 'AU003';
    END IF;

    SELECT array_agg(id ORDER BY ord), array_agg(e->>'type' ORDER BY ord),
           array_agg(e->'data' ORDER BY ord),
           array_agg(coalesce(nullif(e->'metadata', 'null'::jsonb), '{}'::jsonb) ORDER BY ord),
           array_agg(key ORDER BY ord),
           array_agg(sha256(convert_to(p_stream_id || ':' || key, 'UTF8')) ORDER BY ord),
           count(*)
      INTO v_ids, v_types, v_data, v_metadata, v_keys, v_hashes, v_count
    FROM (
        SELECT ord, e, id, coalesce(e->>'idempotency_key', id::text) AS key
        FROM jsonb_array_elements(p_events) WITH ORDINALITY AS t(e, ord),
             LATERAL (SELECT coalesce((e->>'event_id')::uuid, gen_random_uuid()) AS id) AS ids
    ) parsed;

    IF (SELECT count(DISTINCT k) FROM unnest(v_keys) AS k) <> v_count THEN
        RAISE EXCEPTION 'invalid batch for stream %: idempotency keys repeat within the batch',
            quote_literal(p_stream_id) USING ERRCODE = 'AU003';
    END IF;
    IF (SELECT count(DISTINCT i) FROM unnest(v_ids) AS i) <> v_count THEN
        RAISE EXCEPTION 'invalid batch for stream %: event ids repeat within the batch',
            quote_literal(p_stream_id) USING ERRCODE = 'AU003';
    END IF;

    LOOP
        -- Bump the version first: the row lock serialises appends to this
        -- stream, so the idempotency lookup below sees every earlier append.
        -- Any error raised later undoes this update with the rest.
        UPDATE aura.streams s SET version = s.version + v_count
         WHERE s.stream_id = p_stream_id
        RETURNING s.version - v_count INTO v_current;
        EXIT WHEN FOUND;
        -- A new stream holds no events, so nothing in the batch can be a retry.
        IF v_expected IS NOT NULL AND v_expected <> 0 OR p_expected_version = 'stream_exists' THEN
            RAISE EXCEPTION 'stream % is not at the expected version', quote_literal(p_stream_id)
                USING ERRCODE = 'AU001',
                      DETAIL = json_build_object('stream_id', p_stream_id,
                                                 'expected', p_expected_version, 'actual', 0)::text;
        END IF;
        INSERT INTO aura.streams (stream_id, version) VALUES (p_stream_id, v_count)
            ON CONFLICT (stream_id) DO NOTHING;
        IF FOUND THEN
            v_current := 0;
            EXIT;
        END IF;
        -- Another transaction created the stream meanwhile: it has committed
        -- (ON CONFLICT waited for it), so go round and lock its row.
    END LOOP;

    IF v_current > 0 THEN
        SELECT count(*), count(*) FILTER (WHERE e.type = b.type AND e.data = b.data)
          INTO v_recorded, v_matching
        FROM unnest(v_hashes, v_types, v_data) AS b(hash, type, data)
        JOIN aura.events e ON e.idempotency_hash = b.hash;
        IF v_recorded > 0 THEN
            IF v_recorded = v_count AND v_matching = v_count THEN
                UPDATE aura.streams s SET version = v_current WHERE s.stream_id = p_stream_id;
                RETURN QUERY
                    SELECT e.event_id, e.version, e.global_position, true
                    FROM aura.events e
                    WHERE e.idempotency_hash = ANY (v_hashes)
                    ORDER BY e.version;
                RETURN;
            END IF;
            RAISE EXCEPTION 'idempotency conflict on stream %: %', quote_literal(p_stream_id),
                CASE WHEN v_recorded < v_count
                     THEN format('%s of %s events in the batch were recorded before', v_recorded, v_count)
                     ELSE format('%s recorded events have the same keys but other type or data',
                                 v_count - v_matching) END
                USING ERRCODE = 'AU002',
                      DETAIL = json_build_object('stream_id', p_stream_id, 'recorded', v_recorded,
                                                 'matching', v_matching, 'batch', v_count)::text;
        END IF;
    END IF;

    IF v_expected IS NOT NULL AND v_current <> v_expected
       OR p_expected_version = 'stream_exists' AND v_current = 0 THEN
        RAISE EXCEPTION 'stream % is at version %, not at the expected %',
            quote_literal(p_stream_id), v_current, p_expected_version
            USING ERRCODE = 'AU001',
                  DETAIL = json_build_object('stream_id', p_stream_id,
                                             'expected', p_expected_version, 'actual', v_current)::text;
    END IF;

    RETURN QUERY
        WITH inserted AS (
            INSERT INTO aura.events AS e
                (event_id, stream_id, version, type, data, metadata, idempotency_key, idempotency_hash)
            SELECT b.id, p_stream_id, v_current + b.ord, b.type, b.data, b.metadata, b.key, b.hash
            FROM unnest(v_ids, v_types, v_data, v_metadata, v_keys, v_hashes)
                 WITH ORDINALITY AS b(id, type, data, metadata, key, hash, ord)
            RETURNING e.event_id, e.version, e.global_position
        )
        SELECT i.event_id, i.version, i.global_position, false FROM inserted i ORDER BY i.version;
END;
$$;

COMMENT ON FUNCTION aura.append_events(text, jsonb, text) IS
    'Append a batch of events to one stream (all or nothing, idempotent, optimistic concurrency)';
