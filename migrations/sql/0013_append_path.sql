-- Migration 0013, frozen: what it runs. Never edit this file: a change to
-- the schema is a new migration (docs/migrations.md).
--
-- The append path writes only the events themselves:
-- * no version row per stream: aura.streams becomes a view over the log,
--   and appends read a stream's version through the (stream_id, version)
--   index under the per-stream lock they already took;
-- * idempotency hashes only for events appended with a key of their own:
--   an event whose key is its id is deduplicated by the unique event_id,
--   and the hash index (random keys) holds only the explicit keys.
-- * the append limits' database ceilings read in one query, inside
--   aura.append_events (aura.database_setting is gone).
-- Recorded events keep their hashes (the log is never rewritten).

DROP VIEW aura.stream_categories;
DROP TABLE aura.streams;
DROP FUNCTION aura.database_setting(text, bigint);

ALTER TABLE aura.events ALTER COLUMN idempotency_hash DROP NOT NULL;
ALTER TABLE aura.events DROP CONSTRAINT events_idempotency_hash_key;
-- sql/tables/events.sql
CREATE UNIQUE INDEX events_idempotency_hash_key ON aura.events (idempotency_hash)
    WHERE idempotency_hash IS NOT NULL;
ALTER TABLE aura.events ADD CONSTRAINT events_idempotency_hash_for_keys
    CHECK (idempotency_hash IS NOT NULL OR idempotency_key = event_id::text);

-- sql/views/streams.sql
-- Every stream with its current version (that of its last event) and when
-- its first event still in the log was recorded. The log is the only
-- record of a stream: appends find a stream's version through the
-- (stream_id, version) index, with no row of their own to update. The
-- view walks that index one stream at a time (a loose index scan), so it
-- never reads the events table whole; it still visits every stream, so
-- ask aura.stream_version(id) for one stream.
--
--   SELECT * FROM aura.streams ORDER BY version DESC LIMIT 10;
CREATE OR REPLACE VIEW aura.streams AS
WITH RECURSIVE ids AS (
    (SELECT e.stream_id FROM aura.events e ORDER BY e.stream_id LIMIT 1)
    UNION ALL
    SELECT (SELECT e.stream_id FROM aura.events e
             WHERE e.stream_id > ids.stream_id ORDER BY e.stream_id LIMIT 1)
    FROM ids
    WHERE ids.stream_id IS NOT NULL
)
SELECT ids.stream_id, head.version, first.recorded_at AS created_at
FROM ids
CROSS JOIN LATERAL (
    SELECT e.version FROM aura.events e
     WHERE e.stream_id = ids.stream_id ORDER BY e.version DESC LIMIT 1
) AS head
CROSS JOIN LATERAL (
    SELECT e.recorded_at FROM aura.events e
     WHERE e.stream_id = ids.stream_id ORDER BY e.version LIMIT 1
) AS first
WHERE ids.stream_id IS NOT NULL;

COMMENT ON VIEW aura.streams IS
    'Every stream, its current version and its first event''s time (read from aura.events)';

-- sql/views/operator.sql (aura.stream_categories, unchanged, over the view)
-- A stream's category is its id up to the first '-' ('debate-42' is in
-- 'debate'); an id without one is its own category. events is the sum of
-- the streams' versions (versions are gapless from 1), and last_event_at
-- comes from each stream's last event, one index probe per stream: the
-- view never scans the events table.
CREATE OR REPLACE VIEW aura.stream_categories AS
SELECT split_part(s.stream_id, '-', 1) AS category,
       count(*)                        AS streams,
       sum(s.version)::bigint          AS events,
       max(last_event.recorded_at)     AS last_event_at,
       min(s.created_at)               AS first_stream_at
FROM aura.streams s
LEFT JOIN LATERAL (
    SELECT e.recorded_at FROM aura.events e
     WHERE e.stream_id = s.stream_id AND e.version = s.version
) AS last_event ON true
GROUP BY split_part(s.stream_id, '-', 1)
ORDER BY category;

COMMENT ON VIEW aura.stream_categories IS
    'Streams per category (the stream id up to its first ''-''): streams, events, last event';

-- sql/functions/read.sql (aura.stream_version)
-- The stream's current version; 0 when the stream has no events.
CREATE OR REPLACE FUNCTION aura.stream_version(p_stream_id text) RETURNS bigint
LANGUAGE sql STABLE
AS $$
    SELECT coalesce((SELECT e.version FROM aura.events e WHERE e.stream_id = p_stream_id
                     ORDER BY e.version DESC LIMIT 1), 0)
$$;

-- sql/functions/append_events.sql
-- aura.append_events(stream_id, events, expected_version) appends a batch of
-- events to one stream, all or nothing, and returns one row per event.
--
--   events            a JSON array of objects:
--                     {"type": text, "data": object, "metadata"?: object,
--                      "idempotency_key"?: text, "event_id"?: uuid}
--                     The idempotency key defaults to the event id, which
--                     defaults to a new random UUID.
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
--   AU003  invalid input; nothing written
--   40001  the calling transaction wrote before this append and its
--          transaction id is older than that of the stream's last append:
--          its events would be read before the stream's earlier versions.
--          Nothing written; retry the whole transaction (a serialization
--          failure, which retry loops already treat as transient).
--
-- Versions: the stream's version is that of its last event, read through
-- the (stream_id, version) unique index under the per-stream lock below;
-- nothing else is written per append. That index is also the last guard:
-- a transaction whose snapshot predates the stream's last append (REPEATABLE
-- READ or SERIALIZABLE) collides with it and gets 40001, as a concurrent
-- update would.
--
-- Per-stream order: global readers order events by (transaction_id,
-- global_position). A per-stream advisory lock is taken before the
-- transaction writes anything here, so a transaction that had no id yet
-- gets one only after every earlier append to the stream has committed:
-- later versions always carry later transaction ids. A transaction that
-- already had an id (it wrote before appending) is checked against the
-- stream's head instead, and refused with 40001 when it is older.
--
-- Limits (settings): aura.max_payload_bytes (data or metadata of one event,
-- default 1 MiB) and aura.max_batch_events (events in one append, default
-- 10000). A session may lower them; only the database's own setting
-- (ALTER DATABASE ... SET) may raise them above the defaults, so a writer
-- cannot lift the limits on itself. With aura.debug = on the function
-- explains what it did in NOTICEs (SET aura.debug = on in psql).
--
-- Example (psql):
--   SELECT * FROM aura.append_events('debate-42',
--     '[{"type": "DEBATE_STARTED", "data": {"topic": "t"}}]', 'no_stream');

-- What is wrong with the shape of one element of a batch, or NULL. Checked
-- for every element of every append, so only cheap tests live here (it is
-- inlined into the caller's query); lengths, control characters and the
-- rest are the events table's CHECK constraints, the UUID format is the
-- uuid type's own.
CREATE OR REPLACE FUNCTION aura.event_problem(p_event jsonb, p_max_bytes bigint) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT CASE
        WHEN jsonb_typeof(p_event) <> 'object' THEN 'must be a JSON object'
        WHEN jsonb_typeof(p_event->'type') IS DISTINCT FROM 'string' THEN 'type must be a string'
        WHEN jsonb_typeof(p_event->'data') IS DISTINCT FROM 'object' THEN 'data must be a JSON object'
        WHEN coalesce(jsonb_typeof(p_event->'metadata'), 'null') NOT IN ('object', 'null')
            THEN 'metadata must be a JSON object'
        WHEN coalesce(jsonb_typeof(p_event->'idempotency_key'), 'null') NOT IN ('string', 'null')
            THEN 'idempotency_key must be a string'
        WHEN coalesce(jsonb_typeof(p_event->'event_id'), 'null') NOT IN ('string', 'null')
            THEN 'event_id must be a UUID string'
        -- Stored (binary jsonb) size: cheap to read, unlike the text size.
        WHEN pg_column_size(p_event->'data') > p_max_bytes
            THEN format('data takes %s bytes, over the limit of %s (aura.max_payload_bytes)',
                        pg_column_size(p_event->'data'), p_max_bytes)
        WHEN pg_column_size(p_event->'metadata') > p_max_bytes
            THEN format('metadata takes %s bytes, over the limit of %s (aura.max_payload_bytes)',
                        pg_column_size(p_event->'metadata'), p_max_bytes)
    END
$$;

-- The idempotency key an element of a batch is recorded under: its key,
-- else its event id in the uuid type's canonical text (the insert stores
-- that form, so 'A0...', '{a0...}' and 'a0...' are one key), else NULL.
CREATE OR REPLACE FUNCTION aura.batch_key(p_event jsonb) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT coalesce(p_event->>'idempotency_key', (p_event->>'event_id')::uuid::text)
$$;

-- The first problem of a batch, for the error message (slow path only).
CREATE OR REPLACE FUNCTION aura.batch_problem(p_events jsonb, p_max_bytes bigint) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT coalesce(
        (SELECT format('event %s: %s', ord, aura.event_problem(e, p_max_bytes))
         FROM jsonb_array_elements(p_events) WITH ORDINALITY AS t(e, ord)
         WHERE aura.event_problem(e, p_max_bytes) IS NOT NULL
         ORDER BY ord LIMIT 1),
        (SELECT 'idempotency keys repeat within the batch'
         FROM jsonb_array_elements(p_events) AS t(e)
         WHERE aura.batch_key(e) IS NOT NULL
         GROUP BY aura.batch_key(e)
         HAVING count(*) > 1
         LIMIT 1),
        (SELECT 'event ids repeat within the batch'
         FROM jsonb_array_elements(p_events) AS t(e)
         WHERE e->>'event_id' IS NOT NULL
         GROUP BY (e->>'event_id')::uuid
         HAVING count(*) > 1
         LIMIT 1))
$$;

-- Raises the error for an invalid element; called from the insert's WHERE
-- clause only when aura.event_problem found something.
CREATE OR REPLACE FUNCTION aura.invalid_event(p_stream_id text, p_ordinal bigint, p_problem text)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    RAISE EXCEPTION 'invalid event batch for stream %: event %: %',
        quote_literal(p_stream_id), p_ordinal, p_problem
        USING ERRCODE = 'AU003';
END;
$$;

-- What the UNIQUE idempotency_hash column holds for a stream's key. For a
-- stream id without ':' it is sha256(stream_id || ':' || key), split
-- unambiguously at the first ':'. An id with ':' would make that ambiguous
-- ('a:b' + 'c' and 'a' + 'b:c'), so such ids are hashed as
-- chr(31) || length || ':' || stream_id || ':' || key, where the length
-- says where the id ends and chr(31), which no stream id may contain,
-- keeps the two forms apart.
CREATE OR REPLACE FUNCTION aura.idempotency_hash(p_stream_id text, p_key text) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT pg_catalog.sha256(pg_catalog.convert_to(
        CASE WHEN pg_catalog.strpos(p_stream_id, ':') = 0 THEN p_stream_id || ':' || p_key
             ELSE pg_catalog.chr(31) || pg_catalog.char_length(p_stream_id) || ':'
                  || p_stream_id || ':' || p_key END,
        'UTF8'))
$$;

-- The rows already recorded for a batch's elements, in batch order, and
-- whether each is the same event: same stream, key, type and data. An
-- element with a key of its own is looked up by its key's hash, then, like
-- one without, by its event id (an element with neither is new). One index
-- probe per element: with a plain join the planner, which expects 100
-- elements from jsonb_array_elements, hashed the batch and scanned the
-- events table whenever that looked cheaper (a log of thousands of events),
-- several times the cost of an append for each resend. The LIMITs keep each
-- LATERAL subquery from being flattened back into such a join.
CREATE OR REPLACE FUNCTION aura.recorded_for_batch(p_stream_id text, p_events jsonb)
RETURNS TABLE (event_id uuid, version bigint, global_position bigint, same_content boolean)
LANGUAGE sql STABLE
AS $$
    SELECT e.event_id, e.version, e.global_position,
           e.stream_id = p_stream_id AND e.idempotency_key = aura.batch_key(b.el)
           AND e.type = b.el->>'type' AND e.data = b.el->'data'
    FROM jsonb_array_elements(p_events) WITH ORDINALITY AS b(el, ord)
    CROSS JOIN LATERAL (
        (SELECT r.event_id, r.version, r.global_position, r.stream_id, r.idempotency_key,
                r.type, r.data
         FROM aura.events r
         WHERE b.el->>'idempotency_key' IS NOT NULL
           AND r.idempotency_hash = aura.idempotency_hash(p_stream_id, b.el->>'idempotency_key')
         LIMIT 1)
        UNION ALL
        (SELECT r.event_id, r.version, r.global_position, r.stream_id, r.idempotency_key,
                r.type, r.data
         FROM aura.events r
         WHERE r.event_id = (b.el->>'event_id')::uuid
         LIMIT 1)
        LIMIT 1
    ) AS e
    ORDER BY b.ord
$$;

-- The writer's only way in: it runs as the owner (SECURITY DEFINER).
-- Every name in its body (and in the helpers, triggers and defaults it
-- reaches) is schema-qualified or in pg_catalog; pg_temp comes last, so no
-- temporary object can stand in.
CREATE OR REPLACE FUNCTION aura.append_events(
    p_stream_id        text,
    p_events           jsonb,
    p_expected_version text DEFAULT 'any'
) RETURNS TABLE (event_id uuid, version bigint, global_position bigint, duplicate boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_max_bytes  bigint := coalesce(nullif(current_setting('aura.max_payload_bytes', true), ''),
                                    '1048576')::bigint;
    v_max_events bigint := coalesce(nullif(current_setting('aura.max_batch_events', true), ''),
                                    '10000')::bigint;
    v_debug      boolean := coalesce(current_setting('aura.debug', true), '')
                            IN ('on', 'true', 'yes', '1');
    v_expected   bigint;   -- exact version expected, NULL for any / stream_exists
    v_count      int;
    v_current    bigint;   -- the stream's version before this batch
    v_inserted   int;
    v_recorded   int;
    v_matching   int;
    v_problem    text;
    v_own_xid    xid8;     -- this transaction's id if it had one before the append
    v_head_xid   xid8;
BEGIN
    IF p_stream_id IS NULL OR char_length(p_stream_id) NOT BETWEEN 1 AND 200
       OR p_stream_id ~ '[[:cntrl:]]' THEN
        RAISE EXCEPTION 'invalid stream id %: it must have 1 to 200 characters and no control characters',
            coalesce(quote_literal(left(p_stream_id, 210)), 'NULL')
            USING ERRCODE = 'AU003';
    END IF;
    IF p_expected_version ~ '^[0-9]{1,19}$'
       AND p_expected_version::numeric <= 9223372036854775807 THEN
        v_expected := p_expected_version::bigint;
    ELSIF p_expected_version IS NULL
          OR p_expected_version NOT IN ('any', 'no_stream', 'stream_exists') THEN
        RAISE EXCEPTION 'invalid expected version %: use any, no_stream, stream_exists or a version >= 0',
            coalesce(quote_literal(p_expected_version), 'NULL')
            USING ERRCODE = 'AU003';
    ELSIF p_expected_version = 'no_stream' THEN
        v_expected := 0;
    END IF;
    IF jsonb_typeof(p_events) IS DISTINCT FROM 'array' OR jsonb_array_length(p_events) = 0 THEN
        RAISE EXCEPTION 'events must be a non-empty JSON array' USING ERRCODE = 'AU003';
    END IF;

    -- The database's own setting (or the default) is the ceiling: a session
    -- may lower a limit, never lift it, whatever it SETs.
    -- The ceilings: the values set for the whole database (ALTER DATABASE
    -- ... SET), which only its owner or a superuser can make, else the
    -- defaults; a role's own defaults do not count. Both in one query, whose
    -- plan this function caches for the session.
    SELECT least(v_max_bytes, coalesce(max(pg_catalog.substr(cfg, 24)::bigint)
                   FILTER (WHERE pg_catalog.starts_with(cfg, 'aura.max_payload_bytes=')), 1048576)),
           least(v_max_events, coalesce(max(pg_catalog.substr(cfg, 23)::bigint)
                   FILTER (WHERE pg_catalog.starts_with(cfg, 'aura.max_batch_events=')), 10000))
      INTO v_max_bytes, v_max_events
      FROM pg_catalog.pg_db_role_setting s
      CROSS JOIN LATERAL pg_catalog.unnest(s.setconfig) AS cfg
     WHERE s.setrole = 0
       AND s.setdatabase = (SELECT d.oid FROM pg_catalog.pg_database d
                            WHERE d.datname = pg_catalog.current_database());
    v_count := jsonb_array_length(p_events);
    IF v_count > v_max_events THEN
        RAISE EXCEPTION 'invalid event batch for stream %: % events, over the limit of % (aura.max_batch_events)',
            quote_literal(p_stream_id), v_count, v_max_events
            USING ERRCODE = 'AU003';
    END IF;

    -- Before anything here assigns a transaction id: wait for every other
    -- append to this stream to end (see "Per-stream order" above). The lock
    -- class 1635087475 ('aurs') is aura-pg's per-stream append lock.
    v_own_xid := pg_current_xact_id_if_assigned();
    PERFORM pg_advisory_xact_lock(1635087475, hashtext(p_stream_id));

    -- The stream's head. The lock above serialises appends to the stream,
    -- and this statement's snapshot (READ COMMITTED) is taken after it was
    -- granted, so it sees every earlier append.
    SELECT e.version, e.transaction_id INTO v_current, v_head_xid
      FROM aura.events e
     WHERE e.stream_id = p_stream_id
     ORDER BY e.version DESC
     LIMIT 1;
    v_current := coalesce(v_current, 0);
    IF v_current = 0 AND (v_expected > 0 OR p_expected_version = 'stream_exists') THEN
        -- A new stream holds no events, so nothing in the batch is a retry.
        RAISE EXCEPTION 'stream % does not exist, expected version %',
            quote_literal(p_stream_id), p_expected_version
            USING ERRCODE = 'AU001',
                  DETAIL = json_build_object('stream_id', p_stream_id,
                                             'expected', p_expected_version, 'actual', 0)::text;
    END IF;

    IF v_current <> v_expected OR p_expected_version = 'stream_exists' AND v_current = 0 THEN
        v_inserted := 0;  -- not at the expected version, unless this is a retry
    ELSE
        RETURN QUERY
            WITH inserted AS (
                INSERT INTO aura.events AS e (event_id, stream_id, version, type, data, metadata,
                                              idempotency_key, idempotency_hash)
                SELECT ids.event_id, p_stream_id, v_current + b.ord, b.el->>'type', b.el->'data',
                       coalesce(nullif(b.el->'metadata', 'null'::jsonb), '{}'::jsonb),
                       ids.idempotency_key,
                       CASE WHEN b.el->>'idempotency_key' IS NOT NULL
                            THEN aura.idempotency_hash(p_stream_id, ids.idempotency_key) END
                FROM jsonb_array_elements(p_events) WITH ORDINALITY AS b(el, ord)
                CROSS JOIN LATERAL (
                    SELECT coalesce((b.el->>'event_id')::uuid, gen_random_uuid()) AS event_id) AS id
                CROSS JOIN LATERAL (
                    SELECT id.event_id,
                           coalesce(b.el->>'idempotency_key', id.event_id::text) AS idempotency_key
                ) AS ids
                -- Every element is checked on its way in; the first bad one
                -- raises AU003 and the whole append is undone.
                WHERE CASE WHEN aura.event_problem(b.el, v_max_bytes) IS NULL THEN true
                           ELSE aura.invalid_event(p_stream_id, b.ord,
                                                   aura.event_problem(b.el, v_max_bytes)) END
                -- A recorded key or event id (a resend), or, from a stale
                -- snapshot, a taken version: skipped here, sorted out below.
                ON CONFLICT DO NOTHING
                RETURNING e.event_id, e.version, e.global_position
            )
            SELECT i.event_id, i.version, i.global_position, false FROM inserted i ORDER BY i.version;
        GET DIAGNOSTICS v_inserted = ROW_COUNT;
        -- Only new events can be out of order; a resend is answered below.
        IF v_inserted > 0 AND v_own_xid IS NOT NULL AND v_current > 0 THEN
            IF v_head_xid > v_own_xid THEN
                RAISE EXCEPTION 'stream % moved on to version % in a transaction that began writing after this one: retry this transaction',
                    quote_literal(p_stream_id), v_current
                    USING ERRCODE = '40001',
                          DETAIL = json_build_object('stream_id', p_stream_id,
                                                     'expected', p_expected_version,
                                                     'actual', v_current,
                                                     'reason', 'stream_order')::text,
                          HINT = 'Appending after other writes in one transaction is refused when the stream''s last append began later; run the whole transaction again.';
            END IF;
        END IF;
        IF v_inserted = v_count THEN
            IF v_debug THEN
                RAISE NOTICE 'aura.append_events: stream % was at version %, expected %: appended % events as versions % to %',
                    quote_literal(p_stream_id), v_current, p_expected_version, v_count,
                    v_current + 1, v_current + v_count;
            END IF;
            RETURN;  -- the usual case: all new
        END IF;
    END IF;

    -- Slow path: some keys were recorded before (or repeat in the batch), or
    -- the version was not the expected one. A retry of a recorded append is
    -- answered, not refused.
    v_problem := aura.batch_problem(p_events, v_max_bytes);
    IF v_problem IS NOT NULL THEN
        RAISE EXCEPTION 'invalid event batch for stream %: %', quote_literal(p_stream_id), v_problem
            USING ERRCODE = 'AU003';
    END IF;
    IF v_inserted > 0 THEN
        v_recorded := v_count - v_inserted;  -- the lookup would see this batch's own rows
        v_matching := 0;
    ELSE
        SELECT count(*), count(*) FILTER (WHERE r.same_content)
          INTO v_recorded, v_matching
        FROM aura.recorded_for_batch(p_stream_id, p_events) AS r;
        IF v_recorded = v_count AND v_matching = v_count THEN
            IF v_debug THEN
                RAISE NOTICE 'aura.append_events: the % events for stream % were recorded before with the same type and data: answered as a duplicate, nothing written',
                    v_count, quote_literal(p_stream_id);
            END IF;
            RETURN QUERY
                SELECT r.event_id, r.version, r.global_position, true
                FROM aura.recorded_for_batch(p_stream_id, p_events) AS r;
            RETURN;
        END IF;
    END IF;
    IF v_debug THEN
        RAISE NOTICE 'aura.append_events: stream % is at version %, expected %; % of the % idempotency keys were recorded before (% with the same content): refusing',
            quote_literal(p_stream_id), v_current, p_expected_version, v_recorded, v_count, v_matching;
    END IF;
    IF v_recorded > 0 THEN
        RAISE EXCEPTION 'idempotency conflict on stream %: %', quote_literal(p_stream_id),
            CASE WHEN v_recorded < v_count
                 THEN format('%s of %s events in the batch were recorded before', v_recorded, v_count)
                 ELSE format('%s recorded events have the same keys (or event ids) but another stream, type or data',
                             v_count - v_matching) END
            USING ERRCODE = 'AU002',
                  DETAIL = json_build_object('stream_id', p_stream_id, 'recorded', v_recorded,
                                             'batch', v_count)::text;
    END IF;
    RAISE EXCEPTION 'stream % is at version %, not at the expected %',
        quote_literal(p_stream_id), v_current, p_expected_version
        USING ERRCODE = 'AU001',
              DETAIL = json_build_object('stream_id', p_stream_id,
                                         'expected', p_expected_version, 'actual', v_current)::text;
END;
$$;

COMMENT ON FUNCTION aura.append_events(text, jsonb, text) IS
    'Append a batch of events to one stream (all or nothing, idempotent, optimistic concurrency)';

DO $$
DECLARE
    v_owner     text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'owner');
    v_writer    text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'writer');
    v_projector text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'projector');
    v_reader    text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'reader');
BEGIN
    EXECUTE format('ALTER VIEW aura.streams OWNER TO %I', v_owner);
    EXECUTE format('ALTER VIEW aura.stream_categories OWNER TO %I', v_owner);
    REVOKE ALL ON aura.streams, aura.stream_categories FROM PUBLIC;
    EXECUTE format('GRANT SELECT ON aura.streams TO %I, %I', v_writer, v_projector);
    EXECUTE format('GRANT SELECT ON aura.stream_categories TO %I, %I', v_projector, v_reader);
END
$$;
