-- Migration 0006, frozen: exactly what it runs, the SQL files it loaded when
-- it was released, each after a '-- sql/<file>' line. Never edit this file:
-- a change to the schema is a new migration (docs/migrations.md).
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
-- keeps the two forms apart. (Migration 0006; before it, ids with ':' used
-- the first form, and 0006 rehashes their events.)
CREATE OR REPLACE FUNCTION aura.idempotency_hash(p_stream_id text, p_key text) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT pg_catalog.sha256(pg_catalog.convert_to(
        CASE WHEN pg_catalog.strpos(p_stream_id, ':') = 0 THEN p_stream_id || ':' || p_key
             ELSE pg_catalog.chr(31) || pg_catalog.char_length(p_stream_id) || ':'
                  || p_stream_id || ':' || p_key END,
        'UTF8'))
$$;

-- The rows already recorded for a batch's idempotency keys, in batch order,
-- and whether each has the batch's type and data. One index probe per
-- element: with a plain join the planner, which expects 100 elements from
-- jsonb_array_elements, hashed the batch and scanned the events table
-- whenever that looked cheaper (a log of thousands of events), several
-- times the cost of an append for each resend. LIMIT 1, true of a unique
-- key, keeps the LATERAL subquery from being flattened back into that join.
CREATE OR REPLACE FUNCTION aura.recorded_for_batch(p_stream_id text, p_events jsonb)
RETURNS TABLE (event_id uuid, version bigint, global_position bigint, same_content boolean)
LANGUAGE sql STABLE
AS $$
    SELECT e.event_id, e.version, e.global_position,
           e.type = b.el->>'type' AND e.data = b.el->'data'
    FROM jsonb_array_elements(p_events) WITH ORDINALITY AS b(el, ord)
    CROSS JOIN LATERAL (
        SELECT r.event_id, r.version, r.global_position, r.type, r.data
        FROM aura.events r
        WHERE r.idempotency_hash = aura.idempotency_hash(
                  p_stream_id, aura.batch_key(b.el))
        LIMIT 1
    ) AS e
    ORDER BY b.ord
$$;

-- The value of a setting made for the whole database (ALTER DATABASE ...
-- SET), or p_default: the ceiling of an append limit. Only the database's
-- owner or a superuser can set it; a role's own defaults do not count.
-- PL/pgSQL, not SQL: a SQL function with subqueries is not inlined and is
-- planned again at every call (about 0.2 ms, twice per append); this plan
-- is cached for the session.
CREATE OR REPLACE FUNCTION aura.database_setting(p_name text, p_default bigint) RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN coalesce(
        (SELECT pg_catalog.substr(cfg, pg_catalog.octet_length(p_name) + 2)::bigint
         FROM pg_catalog.pg_db_role_setting s
         CROSS JOIN LATERAL pg_catalog.unnest(s.setconfig) AS cfg
         WHERE s.setrole = 0
           AND s.setdatabase = (SELECT d.oid FROM pg_catalog.pg_database d
                                WHERE d.datname = pg_catalog.current_database())
           AND pg_catalog.starts_with(cfg, p_name || '=')),
        p_default);
END;
$$;

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
    v_max_bytes := least(v_max_bytes, aura.database_setting('aura.max_payload_bytes', 1048576));
    v_max_events := least(v_max_events, aura.database_setting('aura.max_batch_events', 10000));
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

    LOOP
        -- Bump the version first. The append lock already serialises
        -- appends to this stream (the row lock would too), so every check
        -- below sees all earlier appends to it. Any error raised later
        -- undoes this update with the rest.
        UPDATE aura.streams s SET version = s.version + v_count
         WHERE s.stream_id = p_stream_id
        RETURNING s.version - v_count INTO v_current;
        EXIT WHEN FOUND;
        -- A new stream holds no events, so nothing in the batch is a retry.
        IF v_expected > 0 OR p_expected_version = 'stream_exists' THEN
            RAISE EXCEPTION 'stream % does not exist, expected version %',
                quote_literal(p_stream_id), p_expected_version
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
        -- Another transaction created the stream meanwhile and has committed
        -- (ON CONFLICT waited for it): go round and lock its row.
    END LOOP;

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
                       aura.idempotency_hash(p_stream_id, ids.idempotency_key)
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
                ON CONFLICT (idempotency_hash) DO NOTHING
                RETURNING e.event_id, e.version, e.global_position
            )
            SELECT i.event_id, i.version, i.global_position, false FROM inserted i ORDER BY i.version;
        GET DIAGNOSTICS v_inserted = ROW_COUNT;
        -- Only new events can be out of order; a resend is answered below.
        IF v_inserted > 0 AND v_own_xid IS NOT NULL AND v_current > 0 THEN
            SELECT e.transaction_id INTO v_head_xid
            FROM aura.events e WHERE e.stream_id = p_stream_id AND e.version = v_current;
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
            UPDATE aura.streams s SET version = v_current WHERE s.stream_id = p_stream_id;
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
                 ELSE format('%s recorded events have the same keys but other type or data',
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

-- sql/roles/append_definer.sql
-- Migrations 0005, 0006 and 0009 (after functions/append_events.sql, whose
-- CREATE OR REPLACE resets these attributes): the writer's only way in runs
-- as the owner. Every name in its body (and in the helpers, triggers and
-- defaults it reaches) is schema-qualified or in pg_catalog; pg_temp comes
-- last, so no temporary object can stand in.
ALTER FUNCTION aura.append_events(text, jsonb, text)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- Helpers the append reaches that a migration after 0005 created: the
-- owner's, not executable by PUBLIC, as roles/grants.sql leaves the others.
DO $$
DECLARE
    v_owner     text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'owner');
    v_projector text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'projector');
BEGIN
    EXECUTE format('ALTER FUNCTION aura.batch_key(jsonb) OWNER TO %I', v_owner);
    REVOKE EXECUTE ON FUNCTION aura.batch_key(jsonb) FROM PUBLIC;
    EXECUTE format('GRANT EXECUTE ON FUNCTION aura.batch_key(jsonb) TO %I', v_projector);
END
$$;

-- sql/data/rehash_colon_streams.sql
-- Migration 0006, data: events of streams whose id contains ':' were
-- recorded with sha256(stream_id || ':' || key), which is ambiguous for such
-- ids (stream 'a:b' with key 'c' and stream 'a' with key 'b:c' had one
-- hash, so the second append was answered as a duplicate of the first).
-- aura.idempotency_hash now hashes those ids unambiguously; their recorded
-- events get the new hash here, so that a resend of one is still
-- recognised. The append-only trigger is set aside for this one statement
-- (the migration holds the table's lock; nothing else changes).
ALTER TABLE aura.events DISABLE TRIGGER events_refuse_update_delete;
UPDATE aura.events e
   SET idempotency_hash = aura.idempotency_hash(e.stream_id, e.idempotency_key)
 WHERE pg_catalog.strpos(e.stream_id, ':') > 0
   AND e.idempotency_hash IS DISTINCT FROM aura.idempotency_hash(e.stream_id, e.idempotency_key);
ALTER TABLE aura.events ENABLE TRIGGER events_refuse_update_delete;

-- sql/functions/project_batch.sql
-- Migration 0003: aura.project_batch also returns what it applied, so the
-- daemon can count, time and trace each event without reading it again:
-- the applied events' types and recording times, and, when p_trace is
-- true, their ids, streams, versions and traceparents (metadata->>
-- 'traceparent', the W3C trace context of the span that appended each).
-- The arrays are gathered in the same pass that reads the batch; those of
-- one call are in the same order (not necessarily the apply order), and
-- NULL when nothing was applied.
--
-- Applies the next batch of a projection and advances its checkpoint, in
-- the caller's transaction. The caller names the checkpoint it holds; if
-- the projection is elsewhere (another owner, an operator), AU006 and
-- nothing is applied. Returns how many events were applied, the new
-- checkpoint, whether the projection has caught up, its status, and the
-- arrays above. Paused projections and open circuits apply nothing; once
-- an open circuit's recovery time has passed, one event is tried
-- (half-open).
--
--   SELECT applied, transaction_id, global_position, caught_up, status
--   FROM aura.project_batch('stream_summary', '0', 0);
--
-- With aura.debug = on it explains each call in a NOTICE (migration 0006):
-- why nothing was applied, or what was applied and where the checkpoint
-- went. CREATE OR REPLACE, so that 0006 can run this file again.
--
-- Migration 0009: p_expected_generation, the generation the caller read
-- with its checkpoint (NULL: none). Generations never repeat (a restarted
-- shadow or rebuild, a reset, a swap takes a new one), so a caller that
-- still holds a replaced projection's checkpoint and state, even the
-- checkpoint 0/0 a restarted one is back at, gets AU006 and reloads. The
-- recheck under the row lock compares the generation this call read the
-- batch under in the same way.
DROP FUNCTION IF EXISTS aura.project_batch(text, xid8, bigint, text, integer);
DROP FUNCTION IF EXISTS aura.project_batch(text, xid8, bigint, text, integer, boolean);

CREATE OR REPLACE FUNCTION aura.project_batch(
    p_name                    text,
    p_expected_transaction_id xid8,
    p_expected_position       bigint,
    p_owner                   text    DEFAULT NULL,
    p_limit                   integer DEFAULT NULL,
    p_trace                   boolean DEFAULT false,
    p_expected_generation     bigint  DEFAULT NULL
) RETURNS TABLE (applied integer, transaction_id xid8, global_position bigint,
                 caught_up boolean, status text,
                 event_types text[], recorded_times timestamptz[],
                 event_ids uuid[], stream_ids text[], versions bigint[], traceparents text[])
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_row     aura.projection_checkpoints;
    v_locked  aura.projection_checkpoints;
    v_limit   integer;
    v_events  aura.events[];
    v_count   integer;
    v_last    aura.events;
    v_horizon_tx  xid8;
    v_horizon_pos bigint;
    v_types   text[];
    v_times   timestamptz[];
    v_ids     uuid[];
    v_streams text[];
    v_versions bigint[];
    v_traceparents text[];
    v_tx      xid8;
    v_pos     bigint;
    v_debug   boolean := coalesce(current_setting('aura.debug', true), '') IN ('on', 'true', 'yes', '1');
BEGIN
    SELECT * INTO v_row FROM aura.projection_checkpoints c WHERE c.name = p_name;
    IF NOT FOUND THEN
        PERFORM aura.lock_projection(p_name);  -- raises AU005
    END IF;
    PERFORM aura.check_checkpoint(v_row, p_expected_transaction_id, p_expected_position);
    PERFORM aura.check_generation(v_row, p_expected_generation);
    IF v_row.status = 'paused'
       OR v_row.circuit_state = 'open' AND v_row.circuit_open_until > clock_timestamp() THEN
        IF v_debug THEN
            RAISE NOTICE 'aura.project_batch: % applies nothing: %', quote_literal(p_name),
                CASE WHEN v_row.status = 'paused' THEN 'it is paused (aura.resume_projection)'
                     ELSE format('its circuit is open until %s after %s failures in a row',
                                 v_row.circuit_open_until, v_row.consecutive_failures) END;
        END IF;
        RETURN QUERY SELECT 0, v_row.transaction_id, v_row.global_position, false, v_row.status,
            NULL::text[], NULL::timestamptz[], NULL::uuid[], NULL::text[], NULL::bigint[], NULL::text[];
        RETURN;
    END IF;
    v_limit := coalesce(p_limit, v_row.batch_size);
    IF v_limit < 1 THEN
        RAISE EXCEPTION 'batch limit must be at least 1, not %', v_limit USING ERRCODE = 'AU007';
    END IF;
    IF v_row.circuit_state <> 'closed' THEN
        v_limit := 1;  -- half-open: one event decides
    END IF;

    -- One statement, hence one snapshot: the batch and the horizon agree.
    -- The side arrays need no order of their own (no sort each): being
    -- aggregated from the same rows, they agree with each other.
    SELECT b.events, b.n, h.transaction_id, h.global_position,
           b.types, b.times, b.ids, b.streams, b.versions, b.traceparents
      INTO v_events, v_count, v_horizon_tx, v_horizon_pos,
           v_types, v_times, v_ids, v_streams, v_versions, v_traceparents
    FROM (SELECT array_agg(e ORDER BY e.transaction_id, e.global_position) AS events,
                 count(*)::integer AS n,
                 array_agg(e.type) AS types,
                 array_agg(e.recorded_at) AS times,
                 array_agg(e.event_id) FILTER (WHERE p_trace) AS ids,
                 array_agg(e.stream_id) FILTER (WHERE p_trace) AS streams,
                 array_agg(e.version) FILTER (WHERE p_trace) AS versions,
                 array_agg(e.metadata ->> 'traceparent') FILTER (WHERE p_trace) AS traceparents
          FROM aura.read_all(v_row.transaction_id, v_row.global_position, v_limit,
                             v_row.event_types) AS e) AS b
    LEFT JOIN LATERAL aura.read_horizon() AS h ON true;

    IF v_count = v_limit THEN
        v_last := v_events[v_count];
        v_tx := v_last.transaction_id;
        v_pos := v_last.global_position;
    ELSE
        -- Nothing else of ours up to the horizon: checkpoint there, so the
        -- events of other types before it are not read again.
        IF v_count > 0 THEN
            v_last := v_events[v_count];
        END IF;
        IF v_horizon_tx IS NOT NULL
           AND (v_horizon_tx, v_horizon_pos) > (v_row.transaction_id, v_row.global_position) THEN
            v_tx := v_horizon_tx;
            v_pos := v_horizon_pos;
        ELSE
            v_tx := v_row.transaction_id;
            v_pos := v_row.global_position;
        END IF;
    END IF;

    IF v_count = 0 AND (v_tx, v_pos) = (v_row.transaction_id, v_row.global_position)
       AND v_row.consecutive_failures = 0 AND v_row.circuit_state = 'closed'
       AND v_row.status <> 'failed' AND v_row.owner IS NOT DISTINCT FROM coalesce(p_owner, v_row.owner) THEN
        -- Idle: nothing to write, and no lock taken.
        IF v_debug THEN
            RAISE NOTICE 'aura.project_batch: % is caught up at %/%: no event of its types up to the read horizon %',
                quote_literal(p_name), v_tx, v_pos,
                coalesce(v_horizon_tx::text || '/' || v_horizon_pos, '(empty log)');
        END IF;
        RETURN QUERY SELECT 0, v_tx, v_pos, true, v_row.status,
            NULL::text[], NULL::timestamptz[], NULL::uuid[], NULL::text[], NULL::bigint[], NULL::text[];
        RETURN;
    END IF;

    -- Lock, and check again: the checkpoint may have moved since the read,
    -- or a reset, a swap or a restart (a new row, back at 0/0) may have
    -- replaced the model at an equal checkpoint. This transaction began
    -- before that commit, so its catalog caches may still resolve the
    -- model's names to the replaced one, and the batch was read with the old
    -- definition's event types: refuse, and let the caller retry in a fresh
    -- transaction. Generations never repeat, so an equal one is the same
    -- incarnation.
    v_locked := aura.lock_projection(p_name);
    PERFORM aura.check_checkpoint(v_locked, p_expected_transaction_id, p_expected_position);
    IF v_locked.generation <> v_row.generation THEN
        RAISE EXCEPTION 'projection % was reset, swapped or restarted while its batch was read', quote_literal(p_name)
            USING ERRCODE = 'AU006';
    END IF;
    v_row := v_locked;
    IF v_row.status = 'paused' THEN
        RETURN QUERY SELECT 0, v_row.transaction_id, v_row.global_position, false, v_row.status,
            NULL::text[], NULL::timestamptz[], NULL::uuid[], NULL::text[], NULL::bigint[], NULL::text[];
        RETURN;
    END IF;
    IF v_count > 0 THEN
        PERFORM aura.apply_handler(v_row.schema_name, v_row.handler, v_row.handler_kind, v_events);
    END IF;
    UPDATE aura.projection_checkpoints c
       SET transaction_id = v_tx,
           global_position = v_pos,
           events_applied = c.events_applied + v_count,
           last_applied_position = coalesce(v_last.global_position, c.last_applied_position),
           last_applied_recorded_at = coalesce(v_last.recorded_at, c.last_applied_recorded_at),
           consecutive_failures = 0,
           circuit_state = 'closed',
           circuit_open_until = NULL,
           status = CASE WHEN c.status = 'failed' THEN 'running' ELSE c.status END,
           owner = coalesce(p_owner, c.owner),
           owner_since = CASE WHEN p_owner IS DISTINCT FROM c.owner AND p_owner IS NOT NULL
                              THEN now() ELSE c.owner_since END,
           updated_at = now()
     WHERE c.name = p_name
    RETURNING c.status INTO v_row.status;
    IF v_debug THEN
        RAISE NOTICE 'aura.project_batch: % applied % events (limit %, %) with %.%; checkpoint %/% -> %/%, read horizon %',
            quote_literal(p_name), v_count, v_limit,
            CASE WHEN v_row.circuit_state <> 'closed' THEN 'half-open circuit: one event decides'
                 ELSE 'circuit closed' END,
            v_row.schema_name, v_row.handler,
            v_locked.transaction_id, v_locked.global_position, v_tx, v_pos,
            coalesce(v_horizon_tx::text || '/' || v_horizon_pos, '(empty log)');
    END IF;
    RETURN QUERY SELECT v_count, v_tx, v_pos, v_count < v_limit, v_row.status,
        v_types, v_times, v_ids, v_streams, v_versions, v_traceparents;
END;
$$;

-- sql/views/projection_status.sql
-- One row per projection (rebuild shadows included) for operators:
--   SELECT * FROM aura.projection_status;
-- events_behind counts the events of the projection's types after its
-- checkpoint; seconds_behind is how long the oldest of them has waited
-- (0 when caught up), so it keeps growing while a projection is stuck.
-- owner_alive: whether a session holds the projection's ownership lock
-- (the daemon's advisory lock, keyed as in queries/projector.sql
-- "try_lock"; pg_locks shows a bigint key's high half in classid, its low
-- half in objid, with objsubid 1); NULL when no owner is recorded. An
-- owner named but not alive is a daemon that died: another one takes over
-- when it polls.
CREATE OR REPLACE VIEW aura.projection_status AS
SELECT c.name,
       c.status,
       CASE WHEN c.circuit_state = 'open' AND c.circuit_open_until <= now() THEN 'half_open'
            ELSE c.circuit_state END                       AS circuit,
       c.owner,
       c.transaction_id::text || '/' || c.global_position  AS checkpoint,
       c.events_applied,
       behind.events                                       AS events_behind,
       CASE WHEN behind.events = 0 THEN 0
            ELSE greatest(round(extract(epoch FROM now() - behind.oldest), 3), 0)
       END                                                 AS seconds_behind,
       c.consecutive_failures,
       c.last_error,
       c.last_error_at,
       (SELECT count(*) FROM aura.dead_letters d
        WHERE d.projection = c.name AND d.status = 'pending') AS dead_letters,
       c.next_definition IS NOT NULL                        AS rebuild_needed,
       c.rebuild_of,
       c.schema_name,
       c.updated_at,
       CASE WHEN c.owner IS NOT NULL THEN EXISTS (
           SELECT 1 FROM pg_catalog.pg_locks l
            WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
              AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d
                                 WHERE d.datname = current_database())
              AND l.classid::bigint = (k.lock_key >> 32) & 4294967295
              AND l.objid::bigint = k.lock_key & 4294967295)
       END                                                  AS owner_alive
FROM aura.projection_checkpoints c
CROSS JOIN LATERAL (
    SELECT ('x' || left(md5('aura-pg projection:' || c.name), 16))::bit(64)::bigint AS lock_key
) AS k
CROSS JOIN LATERAL (
    SELECT count(*) AS events, min(e.recorded_at) AS oldest
    FROM aura.events e
    WHERE (e.transaction_id, e.global_position) > (c.transaction_id, c.global_position)
      AND (c.event_types IS NULL OR e.type = ANY (c.event_types))
) AS behind
ORDER BY c.name;

COMMENT ON VIEW aura.projection_status IS
    'Projections: status, circuit, owner, checkpoint, backlog, errors and dead letters';

-- Dead letters waiting for an operator, oldest first.
CREATE OR REPLACE VIEW aura.pending_dead_letters AS
SELECT d.id, d.projection, d.global_position, d.event_id, d.stream_id, d.event_type,
       d.attempts, d.error, d.first_failed_at, d.last_failed_at
FROM aura.dead_letters d
WHERE d.status = 'pending'
ORDER BY d.id;

-- Outbox backlog per sink and topic.
CREATE OR REPLACE VIEW aura.outbox_status AS
SELECT o.sink, o.topic,
       count(*) FILTER (WHERE o.status = 'pending')   AS pending,
       count(*) FILTER (WHERE o.status = 'dead')      AS dead,
       count(*) FILTER (WHERE o.status = 'delivered') AS delivered,
       min(o.created_at) FILTER (WHERE o.status = 'pending') AS oldest_pending_at,
       max(o.attempts) FILTER (WHERE o.status = 'pending')  AS max_attempts
FROM aura.outbox o
GROUP BY o.sink, o.topic
ORDER BY o.sink, o.topic;

-- sql/views/operator.sql
-- Migration 0006: more of the psql operator surface (docs/operators.md).
--
--   SELECT * FROM aura.stream_categories;              -- streams per category
--   SELECT * FROM aura.list_dead_letters('debate_state');
--   SELECT * FROM aura.read_horizon_status;            -- what holds readers back
--   SELECT * FROM aura.projection_status;              -- projections
--   SELECT * FROM aura.outbox_status;                  -- outbox backlog

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

-- Dead letters of one projection (NULL: all), of one status (NULL: all),
-- oldest first. With aura.retry_dead_letter(id) and
-- aura.skip_dead_letter(id, note) the psql side of `aura-pg dlq`.
CREATE OR REPLACE FUNCTION aura.list_dead_letters(
    p_projection text DEFAULT NULL,
    p_status     text DEFAULT 'pending'
) RETURNS SETOF aura.dead_letters
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF p_status IS NOT NULL AND p_status NOT IN ('pending', 'retried', 'skipped', 'superseded') THEN
        RAISE EXCEPTION 'unknown dead letter status %: use pending, retried, skipped, superseded or NULL for all',
            quote_literal(p_status)
            USING ERRCODE = 'AU007';
    END IF;
    IF p_projection IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM aura.projection_checkpoints c WHERE c.name = p_projection)
       AND NOT EXISTS (SELECT 1 FROM aura.dead_letters d WHERE d.projection = p_projection) THEN
        RAISE EXCEPTION 'unknown projection %', quote_literal(p_projection) USING ERRCODE = 'AU005';
    END IF;
    RETURN QUERY
        SELECT d.* FROM aura.dead_letters d
         WHERE (p_projection IS NULL OR d.projection = p_projection)
           AND (p_status IS NULL OR d.status = p_status)
         ORDER BY d.id;
END;
$$;

-- sql/roles/read_model_roles.sql
-- Migration 0006: a projection's handler can write its own read model and
-- nothing else.
--
-- Every read model schema belongs to a role of its own (NOLOGIN, named
-- <projector role>/<schema> since migration 0009, e.g.
-- aura_projector/stream_summary; SCHEMA__shadow and SCHEMA__rebuild have
-- roles of their own, handed over when a swap renames the schemas), and its
-- handlers run as that role: aura.apply_handler calls them through
-- SCHEMA.aura_run_handler, a SECURITY DEFINER function owned by the role
-- (one switch of user per batch, not one per event), and the forget
-- handler is SECURITY DEFINER itself. Inside a SECURITY DEFINER function
-- Postgres refuses SET ROLE and SET SESSION AUTHORIZATION, so a handler
-- cannot take its caller's rights back.
-- What a handler may do outside its schema is what the handler group role
-- (aura.handler_role, default aura_handler) may: read the read models and
-- the operator views (it is a member of the reader role) and publish
-- messages with aura.publish_to_outbox, which runs as the aura schema's
-- owner. The projector role is a member of every read model role, so it
-- still resets, rebuilds and drops them.
--
-- Read model roles are created on demand by aura.read_model_role, which
-- runs as the role that ran this migration (it needs CREATEROLE); only the
-- projector role may call it, and it only ever creates, or hands out, roles
-- that it created itself for this projector role and that schema (marked
-- by their comment). This file is rerun by migration 0009.

ALTER TABLE aura.role_names DROP CONSTRAINT role_kind_valid;
ALTER TABLE aura.role_names ADD CONSTRAINT role_kind_valid
    CHECK (kind IN ('owner', 'writer', 'projector', 'reader', 'handler'));

INSERT INTO aura.role_names (kind, role_name)
VALUES ('handler', coalesce(nullif(current_setting('aura.handler_role', true), ''), 'aura_handler'))
ON CONFLICT (kind) DO NOTHING;

DO $$
DECLARE
    v_handler text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'handler');
    v_reader  text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'reader');
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles x
               WHERE x.rolname = v_handler AND (x.rolsuper OR x.rolbypassrls)) THEN
        RAISE EXCEPTION 'the handler role % is a superuser (or bypasses row security): choose another name',
            v_handler
            USING ERRCODE = 'AU007', HINT = 'Set aura.handler_role to the name of a group role.';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles x WHERE x.rolname = v_handler) THEN
        BEGIN
            EXECUTE format('CREATE ROLE %I NOLOGIN', v_handler);
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;  -- created meanwhile by the migration of another database
        END;
    END IF;
    IF NOT pg_catalog.pg_has_role(v_handler, v_reader, 'MEMBER') THEN
        EXECUTE format('GRANT %I TO %I', v_reader, v_handler);
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA aura TO %I', v_handler);
    EXECUTE format('GRANT EXECUTE ON FUNCTION aura.publish_to_outbox(text, text, uuid, jsonb, jsonb, bigint) TO %I',
                   v_handler);
END
$$;

-- A handler's one way into the outbox: runs as the aura schema's owner, so
-- the handler role needs no privilege on aura.outbox. Its body and the
-- table's defaults and checks name only aura.* and pg_catalog objects.
ALTER FUNCTION aura.publish_to_outbox(text, text, uuid, jsonb, jsonb, bigint)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- The name of the role that owns read model schema p_schema of the
-- projector role p_projector (migration 0009): <projector role>/<schema>,
-- e.g. aura_projector/stream_summary, or, when that would pass 63 bytes,
-- <first 20 bytes of the projector role>/<first 28 of the schema>#<hash>.
-- A schema name never holds '/' or '#', so the projector and the schema
-- are read back unambiguously (up to the last '/'; a hashed name has a
-- '#' after it, a full one never): before 0009 the name was
-- projector || '_' || schema, and projector shop's read model eu_totals
-- got the role of projector shop_eu's totals. Each schema has
-- its own role, SCHEMA__shadow and SCHEMA__rebuild included, so that a
-- shadow's handlers cannot write the live model.
CREATE OR REPLACE FUNCTION aura.read_model_role_name(p_projector text, p_schema text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_name   text := p_projector || '/' || p_schema;
    v_prefix text := p_projector;
BEGIN
    IF octet_length(v_name) <= 63 THEN
        RETURN v_name;
    END IF;
    WHILE octet_length(v_prefix) > 20 LOOP  -- bytes: a character may take several
        v_prefix := left(v_prefix, -1);
    END LOOP;
    RETURN v_prefix || '/' || left(p_schema, 28) || '#'
           || left(md5(p_projector || '/' || p_schema), 12);
END;
$$;

COMMENT ON FUNCTION aura.read_model_role_name(text, text) IS
    'The name of the role owning a read model schema: <projector role>/<schema> (migration 0009)';

-- The comment aura.read_model_role puts on a role it creates, and requires
-- of a role it hands out: which projector role and which schema the role
-- was made for (the projector quoted as an identifier, so that the text
-- reads back one way). A role made for another application's projector,
-- even under a colliding hashed name, is refused.
CREATE OR REPLACE FUNCTION aura.read_model_role_marker(p_projector text, p_schema text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT SET search_path = pg_catalog, pg_temp AS $$
    SELECT format('aura-pg read model role of projector %s for schema %s',
                  quote_ident(p_projector), p_schema)
$$;

-- The role that owns read model schema p_schema (and runs its handlers),
-- created when missing, named by aura.read_model_role_name. Refuses a role
-- of that name that exists but was not created here for this projector
-- role and this schema.
CREATE OR REPLACE FUNCTION aura.read_model_role(p_schema text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_projector text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'projector');
    v_handler   text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'handler');
    v_role      text;
    v_marker    text;
BEGIN
    IF p_schema IS NULL OR p_schema !~ '^[a-z][a-z0-9]*(_[a-z0-9]+)*(__[a-z]+)?$'
       OR char_length(p_schema) > 60 THEN
        RAISE EXCEPTION 'invalid read model schema %', coalesce(quote_literal(p_schema), 'NULL')
            USING ERRCODE = 'AU007';
    END IF;
    v_role := aura.read_model_role_name(v_projector, p_schema);
    v_marker := aura.read_model_role_marker(v_projector, p_schema);
    IF EXISTS (SELECT 1 FROM aura.role_names n WHERE n.role_name = v_role) THEN
        RAISE EXCEPTION 'read model % would be owned by %, one of the aura group roles', p_schema, v_role
            USING ERRCODE = 'AU007';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname = v_role) THEN
        BEGIN
            EXECUTE format('CREATE ROLE %I NOLOGIN', v_role);
            EXECUTE format('COMMENT ON ROLE %I IS %L', v_role, v_marker);
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;  -- created meanwhile by another session; checked below
        END;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r
                   WHERE r.rolname = v_role AND NOT r.rolcanlogin AND NOT r.rolsuper
                     AND NOT r.rolbypassrls AND NOT r.rolcreaterole AND NOT r.rolcreatedb
                     AND pg_catalog.shobj_description(r.oid, 'pg_authid') = v_marker) THEN
        RAISE EXCEPTION 'role % exists but is not an aura-pg read model role of projector % for %',
            v_role, v_projector, p_schema
            USING ERRCODE = 'AU007',
                  HINT = 'Rename that role, or name the read model''s schema otherwise.';
    END IF;
    -- The handler group's rights become every handler's: refuse them if
    -- they reach past reading (aura.role_names belongs to the owner role,
    -- and this function runs as a role that may grant anything).
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles m
               WHERE pg_catalog.pg_has_role(v_handler, m.oid, 'MEMBER')
                 AND (m.rolsuper OR m.rolbypassrls OR m.rolcreaterole OR m.rolcreatedb
                      OR m.rolname IN ('pg_execute_server_program', 'pg_read_server_files',
                                       'pg_write_server_files', 'pg_write_all_data',
                                       'pg_read_all_data', 'pg_signal_backend', 'pg_checkpoint')
                      OR m.rolname IN (SELECT n.role_name FROM aura.role_names n
                                       WHERE n.kind IN ('owner', 'writer', 'projector')))) THEN
        RAISE EXCEPTION 'the handler role % holds more than reading: refusing to make handlers members of it',
            v_handler
            USING ERRCODE = 'AU007',
                  HINT = 'The handler role should be a member of the reader role only.';
    END IF;
    IF NOT pg_catalog.pg_has_role(v_role, v_handler, 'MEMBER') THEN
        EXECUTE format('GRANT %I TO %I', v_handler, v_role);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members m
                   JOIN pg_catalog.pg_roles granted ON granted.oid = m.roleid
                   JOIN pg_catalog.pg_roles member ON member.oid = m.member
                   WHERE granted.rolname = v_role AND member.rolname = v_projector) THEN
        EXECUTE format('GRANT %I TO %I', v_role, v_projector);
    END IF;
    RETURN v_role;
END;
$$;

COMMENT ON FUNCTION aura.read_model_role(text) IS
    'The role that owns a read model schema and runs its handlers, created when missing';

-- Gives read model schema p_schema, when it exists, and everything in it
-- to its own role (aura.read_model_role), and makes what that role creates
-- later readable by the reader role. Run after every rename of a read model
-- schema (aura.promote_shadow, aura.finish_rebuild): ownership follows the
-- schema's contents through a rename, so without it the promoted handlers
-- would keep the shadow's role and the old live ones the live role.
-- Runs as the role that ran the migration, like aura.read_model_role:
-- TimescaleDB gives a hypertable's chunks (in _timescaledb_internal) to
-- the new owner too, which Postgres lets only a superuser do. Only schemas
-- marked as read models (which only their owners can mark) are handed over.
CREATE OR REPLACE FUNCTION aura.hand_over_read_model(p_schema text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_reader text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'reader');
    v_oid    oid;
    v_role   text;
BEGIN
    SELECT n.oid INTO v_oid FROM pg_catalog.pg_namespace n WHERE n.nspname = p_schema;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF pg_catalog.obj_description(v_oid, 'pg_namespace') IS DISTINCT FROM 'aura-pg read model' THEN
        RAISE EXCEPTION 'schema % is not an aura-pg read model', p_schema USING ERRCODE = 'AU007';
    END IF;
    v_role := aura.read_model_role(p_schema);
    PERFORM aura.give_read_model(p_schema, v_role);
    EXECUTE format('ALTER DEFAULT PRIVILEGES FOR ROLE %I GRANT SELECT ON TABLES TO %I',
                   v_role, v_reader);
    EXECUTE format('ALTER DEFAULT PRIVILEGES FOR ROLE %I REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC',
                   v_role);
    RETURN v_role;
END;
$$;

COMMENT ON FUNCTION aura.hand_over_read_model(text) IS
    'Gives a read model schema to the role of its (new) name, after a swap renamed it';

-- Gives a read model schema, and everything in it, to its role, and makes
-- its handlers run as that role: it creates SCHEMA.aura_run_handler (a
-- name the definition SQL must leave free), which aura.apply_handler calls
-- with each batch. Called by aura.install_projection_schema after the
-- definition SQL ran (as the caller: the projector, a member of the role).
-- Tables a handler creates later belong to the role already and are
-- readable by the reader role through the role's default privileges.
CREATE OR REPLACE FUNCTION aura.isolate_read_model(
    p_schema text, p_handler text, p_kind text, p_forget_handler text
) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_role      text := aura.read_model_role(p_schema);
    v_projector text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'projector');
    v_runner    text := format('%I.aura_run_handler(text, text, text, aura.events[])', p_schema);
BEGIN
    IF to_regprocedure(v_runner) IS NULL THEN
        IF EXISTS (SELECT 1 FROM pg_catalog.pg_proc f
                   WHERE f.pronamespace = p_schema::regnamespace AND f.proname = 'aura_run_handler') THEN
            RAISE EXCEPTION 'the definition of % creates a function aura_run_handler: the name is reserved',
                p_schema USING ERRCODE = 'AU007';
        END IF;
        -- The handler's schema is named in each call, not taken from the
        -- search_path. A caller naming another read model's handler would
        -- run it with this role's rights, which are less than its own.
        EXECUTE format($f$
            CREATE FUNCTION %I.aura_run_handler(
                p_schema text, p_handler text, p_kind text, p_events aura.events[]
            ) RETURNS void
            LANGUAGE plpgsql SECURITY DEFINER AS $b$
            BEGIN
                IF p_kind = 'set_based' THEN
                    EXECUTE format('SELECT %%I.%%I($1)', p_schema, p_handler) USING p_events;
                ELSE
                    -- unnest yields the array in order, and the handler
                    -- runs per row as the scan produces it.
                    EXECUTE format('SELECT %%I.%%I(u) FROM unnest($1) AS u', p_schema, p_handler)
                        USING p_events;
                END IF;
            END;
            $b$ $f$, p_schema);
        EXECUTE format('COMMENT ON FUNCTION %s IS %L', v_runner,
                       'aura-pg: runs this read model''s handler as the read model''s role');
    END IF;
    EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', v_runner);
    EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', v_runner, v_projector);
    PERFORM aura.hand_over_read_model(p_schema);
    IF p_forget_handler IS NOT NULL THEN
        EXECUTE format('ALTER FUNCTION %I.%I(text) SECURITY DEFINER', p_schema, p_forget_handler);
    END IF;
    RETURN v_role;
END;
$$;

COMMENT ON FUNCTION aura.isolate_read_model(text, text, text, text) IS
    'Hands a read model schema to its own role and makes its handlers run as that role';

-- Runs a projection's handler over events (in order) as its read model's
-- role, through SCHEMA.aura_run_handler (aura.isolate_read_model): one
-- switch of user per batch. As migration 0002's version otherwise; a read
-- model without its runner is refused rather than run with the caller's
-- rights, and so is one whose schema or runner is not its own role's
-- (migration 0009): a swap that missed the hand-over
-- (aura.hand_over_read_model) would otherwise run a handler as a role
-- that also owns another schema, e.g. the live one.
CREATE OR REPLACE FUNCTION aura.apply_handler(
    p_schema text, p_handler text, p_kind text, p_events aura.events[]
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_search_path text := current_setting('search_path');
    v_role        text;
BEGIN
    IF to_regprocedure(format('%I.aura_run_handler(text, text, text, aura.events[])', p_schema))
       IS NULL THEN
        RAISE EXCEPTION 'read model % has no aura_run_handler: reset or rebuild the projection', p_schema
            USING ERRCODE = 'AU007';
    END IF;
    v_role := aura.read_model_role_name(
        (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'projector'), p_schema);
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace n
                   JOIN pg_catalog.pg_proc f ON f.pronamespace = n.oid
                   JOIN pg_catalog.pg_roles r ON r.oid = n.nspowner AND r.oid = f.proowner
                   WHERE n.nspname = p_schema AND f.proname = 'aura_run_handler'
                     AND r.rolname = v_role) THEN
        RAISE EXCEPTION 'read model % is not owned by its own role %', p_schema, v_role
            USING ERRCODE = 'AU007',
                  HINT = format('SELECT aura.hand_over_read_model(%L) gives it to that role.', p_schema);
    END IF;
    BEGIN
        PERFORM set_config('search_path', format('%I, public, pg_temp', p_schema), true);
        EXECUTE format('SELECT %I.aura_run_handler($1, $2, $3, $4)', p_schema)
            USING p_schema, p_handler, p_kind, p_events;
        PERFORM set_config('search_path', v_search_path, true);
    EXCEPTION
        -- A handler raising the engine's own codes would be read as "unknown
        -- projection" or "checkpoint moved": report it as the handler's error.
        WHEN SQLSTATE 'AU005' OR SQLSTATE 'AU006' OR SQLSTATE 'AU007' THEN
            RAISE EXCEPTION 'handler %.% raised %: %', p_schema, p_handler, SQLSTATE, SQLERRM
                USING ERRCODE = 'AU008';
    END;
END;
$$;

-- Ownership and privileges of what this file and views/operator.sql
-- created (as roles/grants.sql does for migration 0005's objects).
-- aura.read_model_role stays with the migrating role: it needs CREATEROLE;
-- so does aura.hand_over_read_model (hypertable chunks).
DO $$
DECLARE
    v_owner     text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'owner');
    v_projector text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'projector');
    v_reader    text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'reader');
BEGIN
    EXECUTE format('ALTER FUNCTION aura.isolate_read_model(text, text, text, text) OWNER TO %I', v_owner);
    EXECUTE format('ALTER FUNCTION aura.read_model_role_name(text, text) OWNER TO %I', v_owner);
    EXECUTE format('ALTER FUNCTION aura.read_model_role_marker(text, text) OWNER TO %I', v_owner);
    EXECUTE format('ALTER FUNCTION aura.list_dead_letters(text, text) OWNER TO %I', v_owner);
    EXECUTE format('ALTER VIEW aura.stream_categories OWNER TO %I', v_owner);
    REVOKE ALL ON aura.stream_categories FROM PUBLIC;
    REVOKE EXECUTE ON FUNCTION aura.read_model_role(text), aura.isolate_read_model(text, text, text, text),
                               aura.hand_over_read_model(text), aura.read_model_role_name(text, text),
                               aura.read_model_role_marker(text, text),
                               aura.list_dead_letters(text, text) FROM PUBLIC;
    EXECUTE format('GRANT EXECUTE ON FUNCTION aura.read_model_role(text), '
                   'aura.isolate_read_model(text, text, text, text), '
                   'aura.hand_over_read_model(text), aura.read_model_role_name(text, text), '
                   'aura.read_model_role_marker(text, text), '
                   'aura.list_dead_letters(text, text) TO %I', v_projector);
    EXECUTE format('GRANT SELECT ON aura.stream_categories TO %I, %I', v_projector, v_reader);
END
$$;

-- Read models that exist already get their roles (at 0009: the roles of
-- the new names; upgrades/0009_read_model_role_names.sql does the rest).
SELECT aura.isolate_read_model(c.schema_name, c.handler, c.handler_kind, c.forget_handler)
FROM aura.projection_checkpoints c
WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_namespace n WHERE n.nspname = c.schema_name)
ORDER BY c.name;

-- sql/functions/read_model_grants.sql
-- Migration 0005: read models get their privileges when they are created.
--
-- aura.grant_read_model(schema) lets the reader role read a read model and
-- the projector role write it; nobody else (PUBLIC) gets anything, not even
-- EXECUTE on its functions. aura.install_projection_schema (register, reset,
-- rebuild) calls it once the definition SQL has run. Tables that a handler
-- creates later (partitions, ...) are readable by the reader through
-- migration 0005's default privileges for the projector role; per-schema
-- default privileges would count as dependents outside the schema
-- (aura.outside_dependents) and block its reset.
CREATE OR REPLACE FUNCTION aura.grant_read_model(p_schema text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_projector text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'projector');
    v_reader    text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'reader');
BEGIN
    EXECUTE format('REVOKE ALL ON SCHEMA %I FROM PUBLIC', p_schema);
    EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA %I FROM PUBLIC', p_schema);
    EXECUTE format('REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA %I FROM PUBLIC', p_schema);
    EXECUTE format('GRANT USAGE, CREATE ON SCHEMA %I TO %I', p_schema, v_projector);
    EXECUTE format('GRANT ALL ON ALL TABLES IN SCHEMA %I TO %I', p_schema, v_projector);
    EXECUTE format('GRANT ALL ON ALL SEQUENCES IN SCHEMA %I TO %I', p_schema, v_projector);
    EXECUTE format('GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA %I TO %I', p_schema, v_projector);
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', p_schema, v_reader);
    EXECUTE format('GRANT SELECT ON ALL TABLES IN SCHEMA %I TO %I', p_schema, v_reader);
END;
$$;

-- Gives a read model's schema and everything in it (relations, partitions
-- included, routines, types) to p_role. Sequences of serial and identity
-- columns follow their table. Used by migration 0005 (to the projector
-- role) and by aura.isolate_read_model (to the read model's own role); the
-- caller must be able to act as p_role.
CREATE OR REPLACE FUNCTION aura.give_read_model(p_schema text, p_role text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    EXECUTE format('ALTER SCHEMA %I OWNER TO %I', p_schema, p_role);
    FOR r IN SELECT x.stmt FROM (
                 SELECT format('ALTER %s %s OWNER TO %I',
                               CASE c.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                                              WHEN 'S' THEN 'SEQUENCE' WHEN 'f' THEN 'FOREIGN TABLE'
                                              ELSE 'TABLE' END,
                               c.oid::regclass, p_role) AS stmt, 1 AS ord, c.oid
                 FROM pg_catalog.pg_class c
                 WHERE c.relnamespace = p_schema::regnamespace
                   AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
                   AND NOT (c.relkind = 'S' AND EXISTS (
                       SELECT 1 FROM pg_catalog.pg_depend d
                        WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                          AND d.refclassid = 'pg_class'::regclass AND d.refobjsubid > 0
                          AND d.deptype IN ('a', 'i')))
                 UNION ALL
                 SELECT format('ALTER ROUTINE %s OWNER TO %I', p.oid::regprocedure, p_role), 2, p.oid
                 FROM pg_catalog.pg_proc p
                 WHERE p.pronamespace = p_schema::regnamespace
                 UNION ALL
                 SELECT format('ALTER TYPE %s OWNER TO %I', t.oid::regtype, p_role), 3, t.oid
                 FROM pg_catalog.pg_type t
                 WHERE t.typnamespace = p_schema::regnamespace
                   AND (t.typtype IN ('e', 'd', 'r')
                        OR t.typtype = 'c' AND EXISTS (SELECT 1 FROM pg_catalog.pg_class c
                                                       WHERE c.oid = t.typrelid AND c.relkind = 'c'))
             ) AS x ORDER BY x.ord, x.oid LOOP
        EXECUTE r.stmt;
    END LOOP;
END;
$$;

-- Creates a read model's schema from its definition SQL, checks that the
-- handlers it names exist with the right signature, and grants it
-- (aura.grant_read_model), then gives it to its own role
-- (aura.isolate_read_model). As in migration 0002, apart from those.
CREATE OR REPLACE FUNCTION aura.install_projection_schema(
    p_schema text, p_definition_sql text, p_handler text, p_kind text, p_forget_handler text
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_search_path text := current_setting('search_path');
    v_signature   text;
BEGIN
    EXECUTE format('CREATE SCHEMA %I', p_schema);
    EXECUTE format('COMMENT ON SCHEMA %I IS %L', p_schema, 'aura-pg read model');
    PERFORM set_config('search_path', format('%I, public, pg_temp', p_schema), true);
    EXECUTE p_definition_sql;
    PERFORM set_config('search_path', v_search_path, true);
    IF EXISTS (SELECT 1 FROM pg_extension x WHERE x.extnamespace = p_schema::regnamespace) THEN
        RAISE EXCEPTION 'the definition of % created an extension inside the read model''s schema', p_schema
            USING ERRCODE = 'AU007',
                  HINT = 'Create extensions in a schema of their own: CREATE EXTENSION IF NOT EXISTS x SCHEMA public.';
    END IF;
    v_signature := format('%I.%I(%s)', p_schema, p_handler,
                          CASE p_kind WHEN 'set_based' THEN 'aura.events[]' ELSE 'aura.events' END);
    IF to_regprocedure(v_signature) IS NULL THEN
        RAISE EXCEPTION 'the definition of % does not create the handler %', p_schema, v_signature
            USING ERRCODE = 'AU007',
                  HINT = 'per_event handlers take (aura.events), set_based ones (aura.events[])';
    END IF;
    IF p_forget_handler IS NOT NULL
       AND to_regprocedure(format('%I.%I(text)', p_schema, p_forget_handler)) IS NULL THEN
        RAISE EXCEPTION 'the definition of % does not create the forget handler %.%(text)',
            p_schema, p_schema, p_forget_handler
            USING ERRCODE = 'AU007';
    END IF;
    PERFORM aura.grant_read_model(p_schema);
    -- Migration 0006 (roles/read_model_roles.sql): the schema goes to its
    -- own role, and the handlers run as that role. (A database at 0005
    -- has no such function yet; 0006 isolates its read models.)
    IF to_regprocedure('aura.isolate_read_model(text, text, text, text)') IS NOT NULL THEN
        PERFORM aura.isolate_read_model(p_schema, p_handler, p_kind, p_forget_handler);
    END IF;
END;
$$;

