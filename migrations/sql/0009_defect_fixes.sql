-- Migration 0009, frozen: exactly what it runs, the SQL files it loaded when
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

-- sql/upgrades/0009_import_dead_letter_identity.sql
-- Migration 0009: a dead letter of `aura-pg import` is identified by its
-- sequence and a hash of its content, not by the sequence alone (which a
-- stream deleted and created again starts over). Idempotent: a fresh
-- install, where tables/import_dead_letters.sql already has this shape,
-- runs it too.
--
-- The hash is the formula of queries/importer.sql (record_dead_letter):
-- both must stay the same, or a message dead-lettered before this
-- migration and delivered again would be stored twice.
ALTER TABLE aura.import_dead_letters ADD COLUMN IF NOT EXISTS content_hash bytea;

UPDATE aura.import_dead_letters
SET content_hash = sha256(convert_to(subject || E'\n' || headers::text || E'\n', 'UTF8') || payload)
WHERE content_hash IS NULL;

ALTER TABLE aura.import_dead_letters ALTER COLUMN content_hash SET NOT NULL;

ALTER TABLE aura.import_dead_letters DROP CONSTRAINT IF EXISTS import_dead_letter_once;
ALTER TABLE aura.import_dead_letters
    ADD CONSTRAINT import_dead_letter_once UNIQUE (source, stream, sequence, content_hash);

-- sql/tables/import_stream_lives.sql
-- Migration 0009: the lives of the source streams `aura-pg import` has read
-- (aura_pg/importer.py). A JetStream stream deleted and created again under
-- the same name (or another cluster's stream of that name) starts its
-- sequences at 1 again; its creation time tells the lives apart.
--
-- A message without a key of its own (no key from the mapping, no
-- Nats-Msg-Id) is appended under a key made of its sequence. The first life
-- of a stream this database sees keeps the keys used before migration 0009,
-- nats:<stream>:<sequence> (plain_keys: so keys already imported stay valid
-- for that stream); every later life gets nats:<stream>@<created>:<sequence>,
-- so its sequence 1 is not taken for the old life's event.
CREATE TABLE aura.import_stream_lives (
    source        text        NOT NULL,
    stream        text        NOT NULL,
    created       timestamptz NOT NULL,
    plain_keys    boolean     NOT NULL,
    first_seen_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT import_stream_lives_pkey PRIMARY KEY (source, stream, created),
    CONSTRAINT import_stream_life_source_valid CHECK (source ~ '^[a-z][a-z0-9_]{0,62}$')
);

-- One life per stream keeps the plain keys: concurrent importers of two
-- lives cannot both claim them.
CREATE UNIQUE INDEX import_stream_lives_plain_keys
    ON aura.import_stream_lives (source, stream) WHERE plain_keys;

COMMENT ON TABLE aura.import_stream_lives IS
    'Lives (creation times) of the source streams aura-pg import has read; which one keeps the plain sequence keys';

-- Privileges as for aura.import_dead_letters: the importer (a writer)
-- records lives and reads them; the projector and reader roles read them.
DO $$
DECLARE
    v_owner     text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'owner');
    v_writer    text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'writer');
    v_projector text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'projector');
    v_reader    text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'reader');
BEGIN
    EXECUTE format('ALTER TABLE aura.import_stream_lives OWNER TO %I', v_owner);
    REVOKE ALL ON aura.import_stream_lives FROM PUBLIC;
    EXECUTE format('GRANT SELECT, INSERT ON aura.import_stream_lives TO %I', v_writer);
    EXECUTE format('GRANT SELECT ON aura.import_stream_lives TO %I, %I', v_projector, v_reader);
END
$$;

-- sql/views/stream_order_inversions.sql
-- Streams whose events a global reader meets out of version order: an event
-- whose (transaction_id, global_position) is below that of the version
-- before it. Since migration 0009 aura.append_events cannot record such a
-- pair; a log written before it may hold some (concurrent appends with
-- expected version 'any', or appends inside a transaction that had written
-- before). Every projection that folds such a stream applied those events
-- in read order, not version order: rebuild it, or replay the stream
-- (aura.replay_stream), if the order matters to its fold.
--
-- One row per affected stream. It reads the whole log in (stream_id,
-- version) order: run it off-peak on a large log (`aura-pg doctor` does,
-- with a time limit).
CREATE OR REPLACE VIEW aura.stream_order_inversions AS
SELECT p.stream_id,
       count(*)        AS inverted_pairs,
       min(p.version)  AS first_inverted_version,
       max(p.version)  AS last_inverted_version
FROM (SELECT e.stream_id, e.version,
             (lag(e.transaction_id) OVER w, lag(e.global_position) OVER w)
                 > (e.transaction_id, e.global_position) AS inverted
      FROM aura.events e
      WINDOW w AS (PARTITION BY e.stream_id ORDER BY e.version)) AS p
WHERE p.inverted
GROUP BY p.stream_id;

COMMENT ON VIEW aura.stream_order_inversions IS
    'Streams a global reader meets out of version order (recorded before migration 0009)';

-- Like the other operator views: the owner's, readable by projector and
-- reader. (On a fresh install the roles exist by now too.)
DO $$
DECLARE
    v_owner     text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'owner');
    v_projector text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'projector');
    v_reader    text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'reader');
BEGIN
    EXECUTE format('ALTER VIEW aura.stream_order_inversions OWNER TO %I', v_owner);
    REVOKE ALL ON aura.stream_order_inversions FROM PUBLIC;
    EXECUTE format('GRANT SELECT ON aura.stream_order_inversions TO %I, %I', v_projector, v_reader);
END
$$;

-- sql/functions/projections.sql
-- The projection engine in SQL. A projection's read model lives in its own
-- schema, created by running its definition SQL (projections/NAME.sql) with
-- that schema first on the search_path; its handler is a function there:
--
--   per_event:  handler(e aura.events)          called once per event, in order
--   set_based:  handler(events aura.events[])   called once per batch
--
-- Handlers use unqualified names for their own tables: they run with their
-- schema first on the search_path, which is how a rebuild runs the same
-- SQL into a shadow schema.
--
-- Errors (SQLSTATE):
--   AU005  no such projection or dead letter
--   AU006  the checkpoint is not where the caller expected: another owner
--          (or an operator) moved it; reload and carry on
--   AU007  invalid projection definition or operation
--   AU008  a handler raised one of the codes above (reported as its own failure)

-- The projection's row, locked; AU005 when there is none.
CREATE OR REPLACE FUNCTION aura.lock_projection(p_name text) RETURNS aura.projection_checkpoints
LANGUAGE plpgsql AS $$
DECLARE
    v_row aura.projection_checkpoints;
BEGIN
    SELECT * INTO v_row FROM aura.projection_checkpoints c WHERE c.name = p_name FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown projection %', coalesce(quote_literal(p_name), 'NULL')
            USING ERRCODE = 'AU005';
    END IF;
    RETURN v_row;
END;
$$;

-- AU006 unless the projection is at the checkpoint the caller holds.
CREATE OR REPLACE FUNCTION aura.check_checkpoint(
    p_row aura.projection_checkpoints, p_transaction_id xid8, p_position bigint
) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF (p_row.transaction_id, p_row.global_position) IS DISTINCT FROM (p_transaction_id, p_position) THEN
        RAISE EXCEPTION 'projection % is at checkpoint %/%, not at %/%: it was moved by another owner or an operator',
            quote_literal(p_row.name), p_row.transaction_id, p_row.global_position,
            p_transaction_id, p_position
            USING ERRCODE = 'AU006',
                  DETAIL = json_build_object(
                      'projection', p_row.name,
                      'checkpoint', p_row.transaction_id::text || '/' || p_row.global_position,
                      'expected', p_transaction_id::text || '/' || p_position)::text;
    END IF;
END;
$$;

-- AU006 unless the projection is still the generation the caller read
-- (aura.projection_generation: a restarted shadow or rebuild, a reset or a
-- swap takes a new one, never one seen before). NULL: the caller holds none.
CREATE OR REPLACE FUNCTION aura.check_generation(
    p_row aura.projection_checkpoints, p_generation bigint
) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF p_generation IS NOT NULL AND p_row.generation IS DISTINCT FROM p_generation THEN
        RAISE EXCEPTION 'projection % was restarted, reset or swapped since the caller read it (generation %, not %)',
            quote_literal(p_row.name), p_row.generation, p_generation
            USING ERRCODE = 'AU006',
                  DETAIL = json_build_object(
                      'projection', p_row.name, 'generation', p_row.generation,
                      'expected', p_generation)::text;
    END IF;
END;
$$;

-- Runs a projection's handler over events (in order) in its schema.
CREATE OR REPLACE FUNCTION aura.apply_handler(
    p_schema text, p_handler text, p_kind text, p_events aura.events[]
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_search_path text := current_setting('search_path');
BEGIN
    PERFORM set_config('search_path', format('%I, public, pg_temp', p_schema), true);
    IF p_kind = 'set_based' THEN
        EXECUTE format('SELECT %I.%I($1)', p_schema, p_handler) USING p_events;
    ELSE
        -- unnest yields the array in order, and the handler runs per row as
        -- the scan produces it.
        EXECUTE format('SELECT %I.%I(u) FROM unnest($1) AS u', p_schema, p_handler)
            USING p_events;
    END IF;
    PERFORM set_config('search_path', v_search_path, true);
EXCEPTION
    -- A handler raising the engine's own codes would be read as "unknown
    -- projection" or "checkpoint moved": report it as the handler's error.
    WHEN SQLSTATE 'AU005' OR SQLSTATE 'AU006' OR SQLSTATE 'AU007' THEN
        RAISE EXCEPTION 'handler %.% raised %: %', p_schema, p_handler, SQLSTATE, SQLERRM
            USING ERRCODE = 'AU008';
END;
$$;

-- Creates a read model's schema from its definition SQL and checks that the
-- handlers it names exist with the right signature.
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
END;
$$;

-- Objects outside p_schema that depend on something inside it, described;
-- NULL when none. DROP SCHEMA ... CASCADE would drop them too (a view, a
-- trigger, a column of an enum or row type from the schema, a default
-- using its sequence, ...). TimescaleDB keeps chunks and their copies of
-- constraints in its own schemas and drops them with the hypertable.
CREATE OR REPLACE FUNCTION aura.outside_dependents(p_schema text) RETURNS text
LANGUAGE sql STABLE AS $$
    WITH inside(classid, objid) AS (
        SELECT 'pg_class'::regclass, c.oid FROM pg_class c
        WHERE c.relnamespace = p_schema::regnamespace
        UNION ALL
        SELECT 'pg_type'::regclass, t.oid FROM pg_type t
        WHERE t.typnamespace = p_schema::regnamespace
        UNION ALL
        SELECT 'pg_proc'::regclass, f.oid FROM pg_proc f
        WHERE f.pronamespace = p_schema::regnamespace
        UNION ALL
        SELECT 'pg_namespace'::regclass, p_schema::regnamespace::oid
    ),
    dependents AS (
        SELECT d.classid, d.objid, d.objsubid,
               -- The schema a dependent lives in: a trigger, rule, default,
               -- policy or table constraint lives in its table's.
               coalesce(
                   (SELECT c.relnamespace FROM pg_class c WHERE c.oid = CASE d.classid
                        WHEN 'pg_class'::regclass THEN d.objid
                        WHEN 'pg_trigger'::regclass
                            THEN (SELECT tg.tgrelid FROM pg_trigger tg WHERE tg.oid = d.objid)
                        WHEN 'pg_rewrite'::regclass
                            THEN (SELECT rw.ev_class FROM pg_rewrite rw WHERE rw.oid = d.objid)
                        WHEN 'pg_attrdef'::regclass
                            THEN (SELECT ad.adrelid FROM pg_attrdef ad WHERE ad.oid = d.objid)
                        WHEN 'pg_policy'::regclass
                            THEN (SELECT po.polrelid FROM pg_policy po WHERE po.oid = d.objid)
                        WHEN 'pg_constraint'::regclass
                            THEN (SELECT nullif(co.conrelid, 0) FROM pg_constraint co
                                  WHERE co.oid = d.objid)
                    END),
                   (SELECT co.connamespace FROM pg_constraint co
                    WHERE d.classid = 'pg_constraint'::regclass AND co.oid = d.objid),
                   (SELECT f.pronamespace FROM pg_proc f
                    WHERE d.classid = 'pg_proc'::regclass AND f.oid = d.objid),
                   (SELECT t.typnamespace FROM pg_type t
                    WHERE d.classid = 'pg_type'::regclass AND t.oid = d.objid)
               ) AS nsp
        FROM pg_depend d
        JOIN inside i ON d.refclassid = i.classid AND d.refobjid = i.objid
        WHERE d.deptype IN ('n', 'a')
    )
    SELECT string_agg(DISTINCT pg_describe_object(x.classid, x.objid, x.objsubid), ', ')
    FROM dependents x
    WHERE x.nsp IS DISTINCT FROM p_schema::regnamespace::oid
      AND coalesce(x.nsp::regnamespace::text, '') NOT LIKE '\_timescaledb\_%'
$$;

-- Drops a read-model schema, refusing when it is not one (only schemas
-- created by aura.install_projection_schema carry the marker comment) or
-- when objects outside it depend on it (aura.outside_dependents).
CREATE OR REPLACE FUNCTION aura.drop_read_model_schema(p_schema text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_oid        oid;
    v_dependents text;
BEGIN
    SELECT n.oid INTO v_oid FROM pg_namespace n WHERE n.nspname = p_schema;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF obj_description(v_oid, 'pg_namespace') IS DISTINCT FROM 'aura-pg read model' THEN
        RAISE EXCEPTION 'schema % exists and is not an aura-pg read model: refusing to drop it', p_schema
            USING ERRCODE = 'AU007';
    END IF;
    v_dependents := aura.outside_dependents(p_schema);
    IF v_dependents IS NOT NULL THEN
        RAISE EXCEPTION 'schema % has dependents outside it (%): drop or move them first', p_schema, v_dependents
            USING ERRCODE = 'AU007',
                  HINT = 'Define views over a read model inside the projection''s own SQL.';
    END IF;
    EXECUTE format('DROP SCHEMA %I CASCADE', p_schema);
END;
$$;

-- Creates or updates a projection from its catalog entry; returns
-- 'created', 'unchanged' or 'changed'. Settings (batch size, retries,
-- circuit breaker) apply at once. A changed definition (SQL, handler,
-- event types, schema) never alters a live read model: it is kept in
-- next_definition until aura.begin_rebuild / the swap puts it in place.
CREATE OR REPLACE FUNCTION aura.register_projection(
    p_name                      text,
    p_description               text,
    p_schema                    text,
    p_handler                   text,
    p_handler_kind              text,
    p_event_types               text[],
    p_forget_handler            text,
    p_definition_sql            text,
    p_batch_size                integer,
    p_max_retries               integer,
    p_retry_base_ms             integer,
    p_retry_max_ms              integer,
    p_circuit_failure_threshold integer,
    p_circuit_recovery_seconds  integer
) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_definition jsonb := jsonb_build_object(
        'schema_name', p_schema, 'handler', p_handler, 'handler_kind', p_handler_kind,
        'event_types', to_jsonb(p_event_types), 'forget_handler', p_forget_handler,
        'definition_sql', p_definition_sql);
    v_hash text := md5(v_definition::text);
    v_row  aura.projection_checkpoints;
BEGIN
    IF p_name IS NULL OR p_name !~ '^[a-z][a-z0-9]*(_[a-z0-9]+)*$' OR char_length(p_name) > 40 THEN
        RAISE EXCEPTION 'invalid projection name %: lower-case letters, digits and single underscores, at most 40',
            coalesce(quote_literal(p_name), 'NULL') USING ERRCODE = 'AU007';
    END IF;
    IF p_schema IS NULL OR p_schema !~ '^[a-z][a-z0-9]*(_[a-z0-9]+)*$' OR char_length(p_schema) > 40
       OR p_schema IN ('aura', 'public', 'pg_catalog', 'information_schema') THEN
        RAISE EXCEPTION 'invalid schema % for projection %', coalesce(quote_literal(p_schema), 'NULL'), p_name
            USING ERRCODE = 'AU007';
    END IF;
    IF p_handler_kind IS NULL OR p_handler_kind NOT IN ('per_event', 'set_based') THEN
        RAISE EXCEPTION 'invalid handler kind % for projection %: per_event or set_based',
            coalesce(quote_literal(p_handler_kind), 'NULL'), p_name USING ERRCODE = 'AU007';
    END IF;
    PERFORM pg_advisory_xact_lock(1635087457, hashtext('register:' || p_name));
    SELECT * INTO v_row FROM aura.projection_checkpoints c WHERE c.name = p_name FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM aura.install_projection_schema(p_schema, p_definition_sql, p_handler,
                                               p_handler_kind, p_forget_handler);
        INSERT INTO aura.projection_checkpoints (
            name, description, schema_name, handler, handler_kind, event_types, forget_handler,
            definition_sql, definition_hash, batch_size, max_retries, retry_base_ms,
            retry_max_ms, circuit_failure_threshold, circuit_recovery_seconds)
        VALUES (p_name, coalesce(p_description, ''), p_schema, p_handler, p_handler_kind,
                p_event_types, p_forget_handler, p_definition_sql, v_hash, p_batch_size,
                p_max_retries, p_retry_base_ms, p_retry_max_ms, p_circuit_failure_threshold,
                p_circuit_recovery_seconds);
        RETURN 'created';
    END IF;
    UPDATE aura.projection_checkpoints c
       SET description = coalesce(p_description, ''),
           batch_size = p_batch_size, max_retries = p_max_retries,
           retry_base_ms = p_retry_base_ms, retry_max_ms = p_retry_max_ms,
           circuit_failure_threshold = p_circuit_failure_threshold,
           circuit_recovery_seconds = p_circuit_recovery_seconds,
           next_definition = CASE WHEN v_hash = c.definition_hash THEN NULL
                                  ELSE v_definition || jsonb_build_object('definition_hash', v_hash) END,
           updated_at = now()
     WHERE c.name = p_name;
    RETURN CASE WHEN v_hash = v_row.definition_hash THEN 'unchanged' ELSE 'changed' END;
END;
$$;

-- Applies the next batch of a projection and advances its checkpoint, in
-- the caller's transaction. The caller names the checkpoint it holds; if
-- the projection is elsewhere (another owner, an operator), AU006 and
-- nothing is applied. Returns how many events were applied, the new
-- checkpoint, whether the projection has caught up, and its status.
-- Paused projections and open circuits apply nothing; once an open
-- circuit's recovery time has passed, one event is tried (half-open).
--
--   SELECT * FROM aura.project_batch('stream_summary', '0', 0);
CREATE OR REPLACE FUNCTION aura.project_batch(
    p_name                    text,
    p_expected_transaction_id xid8,
    p_expected_position       bigint,
    p_owner                   text    DEFAULT NULL,
    p_limit                   integer DEFAULT NULL
) RETURNS TABLE (applied integer, transaction_id xid8, global_position bigint,
                 caught_up boolean, status text)
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
    v_tx      xid8;
    v_pos     bigint;
BEGIN
    SELECT * INTO v_row FROM aura.projection_checkpoints c WHERE c.name = p_name;
    IF NOT FOUND THEN
        PERFORM aura.lock_projection(p_name);  -- raises AU005
    END IF;
    PERFORM aura.check_checkpoint(v_row, p_expected_transaction_id, p_expected_position);
    IF v_row.status = 'paused'
       OR v_row.circuit_state = 'open' AND v_row.circuit_open_until > clock_timestamp() THEN
        RETURN QUERY SELECT 0, v_row.transaction_id, v_row.global_position, false, v_row.status;
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
    SELECT b.events, b.n, h.transaction_id, h.global_position
      INTO v_events, v_count, v_horizon_tx, v_horizon_pos
    FROM (SELECT array_agg(e ORDER BY e.transaction_id, e.global_position) AS events,
                 count(*)::integer AS n
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
        RETURN QUERY SELECT 0, v_tx, v_pos, true, v_row.status;
        RETURN;
    END IF;

    -- Lock, and check again: the checkpoint may have moved since the read,
    -- or a reset or rebuild swap may have replaced the model at an equal
    -- checkpoint. This transaction began before that commit, so its catalog
    -- caches may still resolve the model's names to the replaced one, and
    -- the batch was read with the old definition's event types: refuse, and
    -- let the caller retry in a fresh transaction.
    v_locked := aura.lock_projection(p_name);
    PERFORM aura.check_checkpoint(v_locked, p_expected_transaction_id, p_expected_position);
    IF v_locked.generation <> v_row.generation THEN
        RAISE EXCEPTION 'projection % was reset or rebuilt while its batch was read', quote_literal(p_name)
            USING ERRCODE = 'AU006';
    END IF;
    v_row := v_locked;
    IF v_row.status = 'paused' THEN
        RETURN QUERY SELECT 0, v_row.transaction_id, v_row.global_position, false, v_row.status;
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
    RETURN QUERY SELECT v_count, v_tx, v_pos, v_count < v_limit, v_row.status;
END;
$$;

-- Records a failed batch (the batch itself was rolled back): counts it,
-- and opens the circuit after circuit_failure_threshold failures in a row,
-- which pauses the projection (status failed) for circuit_recovery_seconds.
-- With p_expected_generation (migration 0009), AU006 when the projection
-- was restarted, reset or swapped since the caller read it.
DROP FUNCTION IF EXISTS aura.record_projection_failure(text, xid8, bigint, text, text, text);

CREATE OR REPLACE FUNCTION aura.record_projection_failure(
    p_name                    text,
    p_expected_transaction_id xid8,
    p_expected_position       bigint,
    p_owner                   text,
    p_error                   text,
    p_sqlstate                text   DEFAULT NULL,
    p_expected_generation     bigint DEFAULT NULL
) RETURNS TABLE (consecutive_failures integer, circuit_state text, circuit_open_until timestamptz)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_row aura.projection_checkpoints;
BEGIN
    v_row := aura.lock_projection(p_name);
    PERFORM aura.check_checkpoint(v_row, p_expected_transaction_id, p_expected_position);
    PERFORM aura.check_generation(v_row, p_expected_generation);
    RETURN QUERY
    UPDATE aura.projection_checkpoints c
       SET consecutive_failures = c.consecutive_failures + 1,
           last_error = left(coalesce(p_sqlstate || ': ', '') || p_error, 2000),
           last_error_at = now(),
           circuit_state = CASE WHEN c.circuit_state <> 'closed'
                                  OR c.consecutive_failures + 1 >= c.circuit_failure_threshold
                                THEN 'open' ELSE 'closed' END,
           circuit_open_until = CASE WHEN c.circuit_state <> 'closed'
                                       OR c.consecutive_failures + 1 >= c.circuit_failure_threshold
                                     THEN clock_timestamp() + make_interval(secs => c.circuit_recovery_seconds)
                                END,
           status = CASE WHEN c.status = 'running'
                          AND (c.circuit_state <> 'closed'
                               OR c.consecutive_failures + 1 >= c.circuit_failure_threshold)
                         THEN 'failed' ELSE c.status END,
           owner = coalesce(p_owner, c.owner),
           updated_at = now()
     WHERE c.name = p_name
    RETURNING c.consecutive_failures, c.circuit_state, c.circuit_open_until;
END;
$$;

-- Moves the projection's next event to the dead letters and the
-- checkpoint past it, after the caller has retried it max_retries times.
-- p_event_id must be that next event (a guard against skipping another);
-- with p_expected_generation (migration 0009), the projection must still be
-- the one whose handler failed on it (not restarted, reset or swapped).
DROP FUNCTION IF EXISTS aura.dead_letter_next(text, xid8, bigint, text, uuid, text, text, integer,
                                              timestamptz);

CREATE OR REPLACE FUNCTION aura.dead_letter_next(
    p_name                    text,
    p_expected_transaction_id xid8,
    p_expected_position       bigint,
    p_owner                   text,
    p_event_id                uuid,
    p_error                   text,
    p_sqlstate                text,
    p_attempts                integer,
    p_first_failed_at         timestamptz,
    p_expected_generation     bigint DEFAULT NULL
) RETURNS TABLE (dead_letter_id bigint, transaction_id xid8, global_position bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_row   aura.projection_checkpoints;
    v_event aura.events;
    v_id    bigint;
BEGIN
    v_row := aura.lock_projection(p_name);
    PERFORM aura.check_checkpoint(v_row, p_expected_transaction_id, p_expected_position);
    PERFORM aura.check_generation(v_row, p_expected_generation);
    IF v_row.status = 'paused' THEN
        RAISE EXCEPTION 'projection % is paused: nothing is dead-lettered', quote_literal(p_name)
            USING ERRCODE = 'AU006';
    END IF;
    SELECT * INTO v_event
    FROM aura.read_all(v_row.transaction_id, v_row.global_position, 1, v_row.event_types);
    IF NOT FOUND OR v_event.event_id IS DISTINCT FROM p_event_id THEN
        RAISE EXCEPTION 'event % is not the next event of projection %', p_event_id, quote_literal(p_name)
            USING ERRCODE = 'AU007';
    END IF;
    INSERT INTO aura.dead_letters (projection, global_position, transaction_id, event_id, stream_id,
                                   event_type, error, error_sqlstate, attempts, first_failed_at,
                                   last_failed_at)
    VALUES (p_name, v_event.global_position, v_event.transaction_id, v_event.event_id,
            v_event.stream_id, v_event.type, left(p_error, 4000), p_sqlstate, p_attempts,
            coalesce(p_first_failed_at, now()), now())
    RETURNING id INTO v_id;
    UPDATE aura.projection_checkpoints c
       SET transaction_id = v_event.transaction_id,
           global_position = v_event.global_position,
           last_error = left(coalesce(p_sqlstate || ': ', '') || p_error, 2000),
           last_error_at = now(),
           owner = coalesce(p_owner, c.owner),
           updated_at = now()
     WHERE c.name = p_name;
    RETURN QUERY SELECT v_id, v_event.transaction_id, v_event.global_position;
END;
$$;

-- A daemon that took a projection's advisory lock names itself owner.
CREATE OR REPLACE FUNCTION aura.claim_projection(p_name text, p_owner text) RETURNS aura.projection_checkpoints
LANGUAGE plpgsql AS $$
DECLARE
    v_row aura.projection_checkpoints;
BEGIN
    PERFORM aura.lock_projection(p_name);
    UPDATE aura.projection_checkpoints c
       SET owner = p_owner, owner_since = now(), updated_at = now()
     WHERE c.name = p_name
    RETURNING * INTO v_row;
    RETURN v_row;
END;
$$;

CREATE OR REPLACE FUNCTION aura.release_projection(p_name text, p_owner text) RETURNS void
LANGUAGE sql AS $$
    UPDATE aura.projection_checkpoints c
       SET owner = NULL, owner_since = NULL, updated_at = now()
     WHERE c.name = p_name AND c.owner = p_owner
$$;

-- Operators -----------------------------------------------------------------

-- Stops a projection after its batch in flight; the daemon keeps the
-- ownership and waits.
CREATE OR REPLACE FUNCTION aura.pause_projection(p_name text) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM aura.lock_projection(p_name);
    UPDATE aura.projection_checkpoints c SET status = 'paused', updated_at = now()
     WHERE c.name = p_name;
    RETURN 'paused';
END;
$$;

-- Runs a paused or failed projection again, closing its circuit.
CREATE OR REPLACE FUNCTION aura.resume_projection(p_name text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_row aura.projection_checkpoints;
BEGIN
    v_row := aura.lock_projection(p_name);
    UPDATE aura.projection_checkpoints c
       SET status = CASE WHEN c.rebuild_of IS NULL THEN 'running' ELSE 'rebuilding' END,
           circuit_state = 'closed', circuit_open_until = NULL,
           consecutive_failures = 0, updated_at = now()
     WHERE c.name = p_name
    RETURNING c.status INTO v_row.status;
    PERFORM pg_notify('aura_events', '');
    RETURN v_row.status;
END;
$$;

-- Empties the read model and replays it from the first event, in place:
-- readers see it empty, then filling. aura.begin_rebuild is the
-- blue/green alternative that readers never see half-built.
CREATE OR REPLACE FUNCTION aura.reset_projection(p_name text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_row aura.projection_checkpoints;
BEGIN
    v_row := aura.lock_projection(p_name);
    PERFORM aura.drop_read_model_schema(v_row.schema_name);
    PERFORM aura.install_projection_schema(v_row.schema_name, v_row.definition_sql, v_row.handler,
                                           v_row.handler_kind, v_row.forget_handler);
    UPDATE aura.projection_checkpoints c
       SET transaction_id = '0', global_position = 0, events_applied = 0,
           generation = nextval('aura.projection_generation'),
           last_applied_position = NULL, last_applied_recorded_at = NULL,
           status = CASE WHEN c.rebuild_of IS NULL THEN 'running' ELSE 'rebuilding' END,
           circuit_state = 'closed', circuit_open_until = NULL,
           consecutive_failures = 0, last_error = NULL, last_error_at = NULL, updated_at = now()
     WHERE c.name = p_name;
    -- Dead letters (pending, skipped or retried) describe the old model.
    UPDATE aura.dead_letters d
       SET status = 'superseded', resolved_at = coalesce(d.resolved_at, now()),
           resolution_note = concat_ws('; ', d.resolution_note, 'projection reset')
     WHERE d.projection = p_name AND d.status <> 'superseded';
    PERFORM pg_notify('aura_events', '');
    RETURN 'reset';
END;
$$;

-- Applies a dead letter's event to its projection now (after the cause is
-- fixed) and marks it retried. A handler error leaves it pending.
CREATE OR REPLACE FUNCTION aura.retry_dead_letter(p_id bigint) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_letter aura.dead_letters;
    v_row    aura.projection_checkpoints;
    v_event  aura.events;
BEGIN
    SELECT * INTO v_letter FROM aura.dead_letters d WHERE d.id = p_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown dead letter %', p_id USING ERRCODE = 'AU005';
    END IF;
    -- The projection's row first, then the letter: the order reset and the
    -- rebuild swap take them in.
    v_row := aura.lock_projection(v_letter.projection);
    SELECT * INTO v_letter FROM aura.dead_letters d WHERE d.id = p_id FOR UPDATE;
    IF v_letter.status <> 'pending' THEN
        RAISE EXCEPTION 'dead letter % is %, not pending', p_id, v_letter.status USING ERRCODE = 'AU007';
    END IF;
    SELECT * INTO v_event FROM aura.events e WHERE e.global_position = v_letter.global_position;
    PERFORM aura.apply_handler(v_row.schema_name, v_row.handler, v_row.handler_kind, ARRAY[v_event]);
    UPDATE aura.dead_letters d
       SET status = 'retried', resolved_at = now(), resolution_note = 'applied by aura.retry_dead_letter'
     WHERE d.id = p_id;
    UPDATE aura.projection_checkpoints c SET events_applied = c.events_applied + 1, updated_at = now()
     WHERE c.name = v_row.name;
    RETURN 'retried';
END;
$$;

-- Gives up on a dead letter: its event stays unapplied.
CREATE OR REPLACE FUNCTION aura.skip_dead_letter(p_id bigint, p_note text DEFAULT NULL) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE aura.dead_letters d
       SET status = 'skipped', resolved_at = now(),
           resolution_note = coalesce(p_note, 'skipped by aura.skip_dead_letter')
     WHERE d.id = p_id AND d.status = 'pending';
    IF NOT FOUND THEN
        IF EXISTS (SELECT 1 FROM aura.dead_letters d WHERE d.id = p_id) THEN
            RAISE EXCEPTION 'dead letter % is not pending', p_id USING ERRCODE = 'AU007';
        END IF;
        RAISE EXCEPTION 'unknown dead letter %', p_id USING ERRCODE = 'AU005';
    END IF;
    RETURN 'skipped';
END;
$$;

-- Targeted repair of one aggregate: applies the projection's handler again
-- to the stream's events from p_from_version up to the projection's
-- checkpoint (later ones the daemon applies as usual). From version 1, the
-- projection's forget handler, if it has one, first removes what the read
-- model holds for the stream. Returns the number of events applied.
CREATE OR REPLACE FUNCTION aura.replay_stream(
    p_name text, p_stream_id text, p_from_version bigint DEFAULT 1
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_row         aura.projection_checkpoints;
    v_events      aura.events[];
    v_count       integer;
    v_search_path text := current_setting('search_path');
BEGIN
    v_row := aura.lock_projection(p_name);
    IF p_from_version > 1 AND v_row.forget_handler IS NOT NULL THEN
        -- Its handler counts what it is given: events it has applied would
        -- be counted twice. From version 1 the forget handler resets the
        -- stream first, which makes the replay exact.
        RAISE EXCEPTION 'projection % has a forget handler: replay % from version 1', p_name, p_stream_id
            USING ERRCODE = 'AU007';
    END IF;
    IF p_from_version <= 1 AND v_row.forget_handler IS NOT NULL THEN
        PERFORM set_config('search_path', format('%I, public, pg_temp', v_row.schema_name), true);
        EXECUTE format('SELECT %I.%I($1)', v_row.schema_name, v_row.forget_handler) USING p_stream_id;
        PERFORM set_config('search_path', v_search_path, true);
    END IF;
    SELECT array_agg(e ORDER BY e.version), count(*)::integer INTO v_events, v_count
    FROM aura.events e
    WHERE e.stream_id = p_stream_id AND e.version >= p_from_version
      AND (v_row.event_types IS NULL OR e.type = ANY (v_row.event_types))
      AND (e.transaction_id, e.global_position) <= (v_row.transaction_id, v_row.global_position)
      AND NOT EXISTS (SELECT 1 FROM aura.dead_letters d
                      WHERE d.projection = p_name AND d.global_position = e.global_position
                        AND d.status IN ('pending', 'skipped'));
    IF v_count > 0 THEN
        PERFORM aura.apply_handler(v_row.schema_name, v_row.handler, v_row.handler_kind, v_events);
    END IF;
    RETURN v_count;
END;
$$;

-- Blue/green rebuild ---------------------------------------------------------

-- Starts (or resumes) a rebuild: a shadow projection NAME__rebuild with the
-- newest definition, built from the first event into schema
-- SCHEMA__rebuild while the live one keeps serving. Drive it with
-- aura.project_batch (`aura-pg projections rebuild` does), then swap it in
-- with aura.finish_rebuild.
CREATE OR REPLACE FUNCTION aura.begin_rebuild(p_name text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_row    aura.projection_checkpoints;
    v_def    jsonb;
    v_shadow text := p_name || '__rebuild';
    v_schema text;
    v_existing aura.projection_checkpoints;
BEGIN
    -- Shadow row first, then the live one: the order aura.finish_rebuild
    -- takes them in.
    PERFORM 1 FROM aura.projection_checkpoints c WHERE c.name = v_shadow FOR UPDATE;
    v_row := aura.lock_projection(p_name);
    IF v_row.rebuild_of IS NOT NULL THEN
        RAISE EXCEPTION '% is itself a rebuild', p_name USING ERRCODE = 'AU007';
    END IF;
    v_def := coalesce(v_row.next_definition, jsonb_build_object(
        'schema_name', v_row.schema_name, 'handler', v_row.handler,
        'handler_kind', v_row.handler_kind, 'event_types', to_jsonb(v_row.event_types),
        'forget_handler', v_row.forget_handler, 'definition_sql', v_row.definition_sql,
        'definition_hash', v_row.definition_hash));
    SELECT * INTO v_existing FROM aura.projection_checkpoints c WHERE c.name = v_shadow FOR UPDATE;
    IF FOUND THEN
        IF v_existing.definition_hash = v_def->>'definition_hash' THEN
            RETURN v_shadow;  -- resume the rebuild in progress
        END IF;
        -- Built from an older definition: start again from the newest.
        RAISE NOTICE 'rebuild of % was started with an older definition: starting it again', p_name;
        PERFORM aura.drop_read_model_schema(v_existing.schema_name);
        DELETE FROM aura.dead_letters d WHERE d.projection = v_shadow;
        DELETE FROM aura.projection_checkpoints c WHERE c.name = v_shadow;
    END IF;
    IF v_def->>'schema_name' <> v_row.schema_name
       AND EXISTS (SELECT 1 FROM pg_namespace n WHERE n.nspname = v_def->>'schema_name') THEN
        RAISE EXCEPTION 'projection % would move to schema %, which exists already', p_name,
            v_def->>'schema_name' USING ERRCODE = 'AU007';
    END IF;
    v_schema := (v_def->>'schema_name') || '__rebuild';
    PERFORM aura.drop_read_model_schema(v_schema);
    PERFORM aura.install_projection_schema(v_schema, v_def->>'definition_sql', v_def->>'handler',
                                           v_def->>'handler_kind', v_def->>'forget_handler');
    INSERT INTO aura.projection_checkpoints (
        name, description, schema_name, handler, handler_kind, event_types, forget_handler,
        definition_sql, definition_hash, batch_size, max_retries, retry_base_ms, retry_max_ms,
        circuit_failure_threshold, circuit_recovery_seconds, status, rebuild_of)
    VALUES (v_shadow, 'rebuild of ' || p_name, v_schema, v_def->>'handler', v_def->>'handler_kind',
            (SELECT array_agg(t) FROM jsonb_array_elements_text(
                 CASE jsonb_typeof(v_def->'event_types') WHEN 'array' THEN v_def->'event_types'
                 ELSE '[]'::jsonb END) AS t),
            v_def->>'forget_handler', v_def->>'definition_sql', v_def->>'definition_hash',
            v_row.batch_size, v_row.max_retries, v_row.retry_base_ms, v_row.retry_max_ms,
            v_row.circuit_failure_threshold, v_row.circuit_recovery_seconds, 'rebuilding', p_name);
    RETURN v_shadow;
END;
$$;

-- Catches the shadow up to the horizon and swaps it in, in one transaction:
-- the live schema becomes SCHEMA__previous (kept for a look back until the
-- next swap), the shadow takes the live schema's name, the live row takes
-- the shadow's definition and checkpoint. Readers see the old model until
-- the commit and the new one after it, never a half-built one. The live
-- owner's next batch gets AU006, reloads, and carries on from the new
-- checkpoint. Returns the number of events applied during the swap.
-- p_generation (migration 0009): the generation of the rebuild the caller
-- began (aura.begin_rebuild); AU006 when another process restarted it since
-- (another definition, or a reset), so that no process swaps in, and
-- reports as its own, a rebuild it did not start.
DROP FUNCTION IF EXISTS aura.finish_rebuild(text, text);

CREATE OR REPLACE FUNCTION aura.finish_rebuild(
    p_name text, p_owner text DEFAULT NULL, p_generation bigint DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_shadow_name text := p_name || '__rebuild';
    v_shadow  aura.projection_checkpoints;
    v_live    aura.projection_checkpoints;
    v_batch   record;
    v_applied bigint := 0;
    v_target  text;
BEGIN
    -- Shadow first, then live: the live owner locks only the live row, so
    -- this order cannot deadlock with it.
    v_shadow := aura.lock_projection(v_shadow_name);
    PERFORM aura.check_generation(v_shadow, p_generation);
    LOOP
        SELECT * INTO v_batch
        FROM aura.project_batch(v_shadow_name, v_shadow.transaction_id, v_shadow.global_position,
                                p_owner, NULL);
        v_applied := v_applied + v_batch.applied;
        v_shadow.transaction_id := v_batch.transaction_id;
        v_shadow.global_position := v_batch.global_position;
        EXIT WHEN v_batch.caught_up;
        IF v_batch.applied = 0 THEN
            RAISE EXCEPTION 'rebuild of % cannot catch up: its status is %', p_name, v_batch.status
                USING ERRCODE = 'AU007';
        END IF;
    END LOOP;
    v_shadow := aura.lock_projection(v_shadow_name);
    v_live := aura.lock_projection(p_name);
    v_target := regexp_replace(v_shadow.schema_name, '__rebuild$', '');

    PERFORM aura.drop_read_model_schema(v_live.schema_name || '__previous');
    IF EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = v_live.schema_name) THEN
        EXECUTE format('ALTER SCHEMA %I RENAME TO %I', v_live.schema_name,
                       v_live.schema_name || '__previous');
    END IF;
    IF v_target <> v_live.schema_name
       AND EXISTS (SELECT 1 FROM pg_namespace n WHERE n.nspname = v_target) THEN
        RAISE EXCEPTION 'projection % would move to schema %, which exists already', p_name, v_target
            USING ERRCODE = 'AU007';
    END IF;
    EXECUTE format('ALTER SCHEMA %I RENAME TO %I', v_shadow.schema_name, v_target);
    -- Each schema goes to the role of its new name, so the
    -- rebuilt handlers run as the live role, not the rebuild's
    -- (roles/read_model_roles.sql).
    PERFORM aura.hand_over_read_model(v_target);
    PERFORM aura.hand_over_read_model(v_live.schema_name || '__previous');

    UPDATE aura.projection_checkpoints c
       SET schema_name = v_target, handler = v_shadow.handler, handler_kind = v_shadow.handler_kind,
           event_types = v_shadow.event_types, forget_handler = v_shadow.forget_handler,
           definition_sql = v_shadow.definition_sql, definition_hash = v_shadow.definition_hash,
           next_definition = CASE WHEN c.next_definition->>'definition_hash' = v_shadow.definition_hash
                                  THEN NULL ELSE c.next_definition END,
           transaction_id = v_shadow.transaction_id, global_position = v_shadow.global_position,
           events_applied = v_shadow.events_applied,
           generation = nextval('aura.projection_generation'),
           last_applied_position = v_shadow.last_applied_position,
           last_applied_recorded_at = v_shadow.last_applied_recorded_at,
           status = CASE WHEN c.status = 'paused' THEN 'paused' ELSE 'running' END,
           consecutive_failures = 0, circuit_state = 'closed', circuit_open_until = NULL,
           last_error = v_shadow.last_error, last_error_at = v_shadow.last_error_at,
           updated_at = now()
     WHERE c.name = p_name;
    UPDATE aura.dead_letters d
       SET status = 'superseded', resolved_at = coalesce(d.resolved_at, now()),
           resolution_note = concat_ws('; ', d.resolution_note, 'replaced by a rebuild')
     WHERE d.projection = p_name AND d.status <> 'superseded';
    UPDATE aura.dead_letters d SET projection = p_name
     WHERE d.projection = v_shadow_name;
    DELETE FROM aura.projection_checkpoints c WHERE c.name = v_shadow_name;
    PERFORM pg_notify('aura_events', '');
    RETURN v_applied;
END;
$$;

-- Abandons a rebuild: drops the shadow schema and row; the live
-- projection is untouched.
CREATE OR REPLACE FUNCTION aura.abort_rebuild(p_name text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_shadow aura.projection_checkpoints;
BEGIN
    v_shadow := aura.lock_projection(p_name || '__rebuild');
    PERFORM aura.drop_read_model_schema(v_shadow.schema_name);
    DELETE FROM aura.dead_letters d WHERE d.projection = v_shadow.name;
    DELETE FROM aura.projection_checkpoints c WHERE c.name = v_shadow.name;
    RETURN 'aborted';
END;
$$;

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

-- sql/functions/shadows.sql
-- Migration 0007: shadow projections. A new version of a projection runs
-- beside the live one, from the first event, as the projection NAME__shadow
-- in schema SCHEMA__shadow: daemons drive it with aura.project_batch like
-- any projection, readers never see it under the live name.
--
--   SELECT aura.begin_shadow('debate_state', $sql$ ... $sql$, 'apply_event', 'per_event');
--   SELECT * FROM aura.shadow_status;
--   SELECT * FROM aura.diff_shadow('debate_state');     -- exact, at one checkpoint
--   SELECT aura.promote_shadow('debate_state');         -- swap; the old one stays as the shadow
--   SELECT aura.promote_shadow('debate_state');         -- ... which makes a rollback a swap back
--   SELECT aura.drop_shadow('debate_state');
--
-- Errors: AU005 no such projection or shadow; AU007 refused (a rebuild or
-- shadow row named as the live one, a paused projection to align, a
-- shadow in another schema).
--
-- Migration 0009 runs this file again (the swap's dead letters, fresh
-- generations), so what it adds to the schema is added only once.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                   WHERE a.attrelid = 'aura.projection_checkpoints'::regclass
                     AND a.attname = 'shadow_of' AND NOT a.attisdropped) THEN
        ALTER TABLE aura.projection_checkpoints
            ADD COLUMN shadow_of text REFERENCES aura.projection_checkpoints (name)
                                 ON DELETE CASCADE;
    END IF;
END
$$;
ALTER TABLE aura.projection_checkpoints
    DROP CONSTRAINT projection_name_valid,
    DROP CONSTRAINT projection_schema_valid,
    DROP CONSTRAINT IF EXISTS projection_shadow_row_valid;
ALTER TABLE aura.projection_checkpoints
    ADD CONSTRAINT projection_name_valid
        CHECK (name ~ '^[a-z][a-z0-9]*(_[a-z0-9]+)*(__rebuild|__shadow)?$' AND char_length(name) <= 48),
    ADD CONSTRAINT projection_schema_valid
        CHECK (schema_name ~ '^[a-z][a-z0-9]*(_[a-z0-9]+)*(__rebuild|__shadow)?$'
               AND char_length(schema_name) <= 50),
    ADD CONSTRAINT projection_shadow_row_valid
        CHECK ((shadow_of IS NULL) = (name !~ '__shadow$'));

-- The last comparison of each shadow with its live projection
-- (aura.diff_shadow writes it; metrics export it).
CREATE TABLE IF NOT EXISTS aura.shadow_diffs (
    projection      text        PRIMARY KEY REFERENCES aura.projection_checkpoints (name)
                                ON DELETE CASCADE,
    transaction_id  xid8        NOT NULL,
    global_position bigint      NOT NULL,
    tables          integer     NOT NULL,
    differing_rows  bigint      NOT NULL,
    diffed_at       timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE aura.shadow_diffs IS
    'The last aura.diff_shadow of each projection with a shadow: where, and how many rows differed';

-- Starts a shadow of p_name from a new definition (or resumes the one
-- running with that definition): 'created', 'restarted' (a shadow with
-- another definition was dropped first) or 'unchanged'. The shadow keeps
-- the live projection's schema name with __shadow appended, and its
-- settings (batch size, retries, circuit breaker).
-- A restarted shadow is a new row with a generation never used before
-- (migration 0009): a batch its runner read under the old definition is
-- refused (AU006), even at the equal checkpoint 0/0.
CREATE OR REPLACE FUNCTION aura.begin_shadow(
    p_name           text,
    p_definition_sql text,
    p_handler        text,
    p_handler_kind   text,
    p_event_types    text[] DEFAULT NULL,
    p_forget_handler text   DEFAULT NULL
) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_shadow     text := p_name || '__shadow';
    v_live       aura.projection_checkpoints;
    v_existing   aura.projection_checkpoints;
    v_definition jsonb;
    v_hash       text;
    v_schema     text;
    v_outcome    text := 'created';
BEGIN
    -- Shadow row first, then the live one: the order every shadow function
    -- takes them in.
    SELECT * INTO v_existing FROM aura.projection_checkpoints c WHERE c.name = v_shadow FOR UPDATE;
    v_live := aura.lock_projection(p_name);
    IF v_live.rebuild_of IS NOT NULL OR v_live.shadow_of IS NOT NULL THEN
        RAISE EXCEPTION '% is itself a rebuild or a shadow', p_name USING ERRCODE = 'AU007';
    END IF;
    IF p_handler_kind IS NULL OR p_handler_kind NOT IN ('per_event', 'set_based') THEN
        RAISE EXCEPTION 'invalid handler kind % for the shadow of %: per_event or set_based',
            coalesce(quote_literal(p_handler_kind), 'NULL'), p_name USING ERRCODE = 'AU007';
    END IF;
    -- As aura.register_projection hashes a definition, so that a shadow
    -- and a catalog entry with the same definition have the same hash.
    v_definition := jsonb_build_object(
        'schema_name', v_live.schema_name, 'handler', p_handler, 'handler_kind', p_handler_kind,
        'event_types', to_jsonb(p_event_types), 'forget_handler', p_forget_handler,
        'definition_sql', p_definition_sql);
    v_hash := md5(v_definition::text);
    IF v_existing.name IS NOT NULL THEN
        IF v_existing.definition_hash = v_hash THEN
            RETURN 'unchanged';
        END IF;
        PERFORM aura.drop_read_model_schema(v_existing.schema_name);
        DELETE FROM aura.dead_letters d WHERE d.projection = v_shadow;
        DELETE FROM aura.projection_checkpoints c WHERE c.name = v_shadow;
        v_outcome := 'restarted';
    END IF;
    v_schema := v_live.schema_name || '__shadow';
    PERFORM aura.drop_read_model_schema(v_schema);
    PERFORM aura.install_projection_schema(v_schema, p_definition_sql, p_handler, p_handler_kind,
                                           p_forget_handler);
    INSERT INTO aura.projection_checkpoints (
        name, description, schema_name, handler, handler_kind, event_types, forget_handler,
        definition_sql, definition_hash, batch_size, max_retries, retry_base_ms, retry_max_ms,
        circuit_failure_threshold, circuit_recovery_seconds, shadow_of)
    VALUES (v_shadow, 'shadow of ' || p_name, v_schema, p_handler, p_handler_kind, p_event_types,
            p_forget_handler, p_definition_sql, v_hash, v_live.batch_size, v_live.max_retries,
            v_live.retry_base_ms, v_live.retry_max_ms, v_live.circuit_failure_threshold,
            v_live.circuit_recovery_seconds, p_name);
    PERFORM pg_notify('aura_events', '');
    RETURN v_outcome;
END;
$$;

-- Drops p_name's shadow: its schema, row, dead letters and last diff.
CREATE OR REPLACE FUNCTION aura.drop_shadow(p_name text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_shadow aura.projection_checkpoints := aura.lock_projection(p_name || '__shadow');
BEGIN
    PERFORM aura.drop_read_model_schema(v_shadow.schema_name);
    DELETE FROM aura.dead_letters d WHERE d.projection = v_shadow.name;
    DELETE FROM aura.shadow_diffs s WHERE s.projection = p_name;
    DELETE FROM aura.projection_checkpoints c WHERE c.name = v_shadow.name;
    RETURN 'dropped';
END;
$$;

-- Applies p_row's events from its checkpoint up to and including the
-- checkpoint (p_transaction_id, p_position), and moves its checkpoint
-- there, in the caller's transaction (which holds the row's lock). Those
-- events are all committed: another projection applied them. Returns how
-- many were applied; a handler error is raised as it is.
CREATE OR REPLACE FUNCTION aura.apply_until(
    p_row aura.projection_checkpoints, p_transaction_id xid8, p_position bigint
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_events  aura.events[];
    v_count   integer;
    v_last    aura.events;
    v_total   integer := 0;
BEGIN
    IF p_row.status = 'paused' THEN
        RAISE EXCEPTION 'projection % is paused: resume it to compare', quote_literal(p_row.name)
            USING ERRCODE = 'AU007';
    END IF;
    LOOP
        SELECT array_agg(e ORDER BY e.transaction_id, e.global_position), count(*)::integer
          INTO v_events, v_count
        FROM aura.read_all(p_row.transaction_id, p_row.global_position, p_row.batch_size,
                           p_row.event_types) AS e
        WHERE (e.transaction_id, e.global_position) <= (p_transaction_id, p_position);
        EXIT WHEN v_count = 0;
        PERFORM aura.apply_handler(p_row.schema_name, p_row.handler, p_row.handler_kind, v_events);
        v_last := v_events[v_count];
        p_row.transaction_id := v_last.transaction_id;
        p_row.global_position := v_last.global_position;
        p_row.events_applied := p_row.events_applied + v_count;
        p_row.last_applied_position := v_last.global_position;
        p_row.last_applied_recorded_at := v_last.recorded_at;
        v_total := v_total + v_count;
    END LOOP;
    UPDATE aura.projection_checkpoints c
       SET transaction_id = p_transaction_id, global_position = p_position,
           events_applied = p_row.events_applied,
           last_applied_position = p_row.last_applied_position,
           last_applied_recorded_at = p_row.last_applied_recorded_at,
           updated_at = now()
     WHERE c.name = p_row.name;
    RETURN v_total;
END;
$$;

-- Locks p_name and its shadow (shadow first) and brings the one behind to
-- the other's checkpoint, in the caller's transaction: until it ends, no
-- batch can change either read model (aura.project_batch applies only with
-- the row locked), so both read models are the fold of the same events.
-- Returns that checkpoint and how many events each side applied to get
-- there. The daemons carry on from it afterwards (their next batch sees
-- the moved checkpoint and reloads).
CREATE OR REPLACE FUNCTION aura.align_shadow(
    p_name text,
    OUT transaction_id xid8, OUT global_position bigint,
    OUT applied_live integer, OUT applied_shadow integer
)
LANGUAGE plpgsql AS $$
DECLARE
    v_shadow aura.projection_checkpoints := aura.lock_projection(p_name || '__shadow');
    v_live   aura.projection_checkpoints := aura.lock_projection(p_name);
BEGIN
    applied_live := 0;
    applied_shadow := 0;
    IF (v_live.transaction_id, v_live.global_position)
       < (v_shadow.transaction_id, v_shadow.global_position) THEN
        applied_live := aura.apply_until(v_live, v_shadow.transaction_id, v_shadow.global_position);
        transaction_id := v_shadow.transaction_id;
        global_position := v_shadow.global_position;
    ELSE
        IF (v_shadow.transaction_id, v_shadow.global_position)
           < (v_live.transaction_id, v_live.global_position) THEN
            applied_shadow := aura.apply_until(v_shadow, v_live.transaction_id, v_live.global_position);
        END IF;
        transaction_id := v_live.transaction_id;
        global_position := v_live.global_position;
    END IF;
END;
$$;

-- The tables of a read model schema that a diff compares: plain and
-- partitioned tables, not partitions (their rows are the parent's).
CREATE OR REPLACE FUNCTION aura.read_model_tables(p_schema text) RETURNS SETOF text
LANGUAGE sql STABLE AS $$
    SELECT c.relname::text FROM pg_catalog.pg_class c
     WHERE c.relnamespace = p_schema::regnamespace AND c.relkind IN ('r', 'p')
       AND NOT c.relispartition
     ORDER BY 1
$$;

-- Compares p_name's read model with its shadow's, table by table, at one
-- checkpoint (aura.align_shadow, in the caller's transaction), and records
-- the count in aura.shadow_diffs. One row per difference, at most p_limit
-- of each kind per table, and one 'table' row per table with the counts:
--
--   difference     key                   columns                 live / shadow
--   only_live      primary key (or NULL)                         the row
--   only_shadow    primary key (or NULL)                         the row
--   differs        primary key           the columns that differ both rows
--   columns                              columns in one only or  {column: type}
--                                        of another type
--   table_only_live / table_only_shadow  a table in one schema only
--   table          {"checkpoint": ...}                           {"rows", "only_live",
--                                                                "differs"} / {"rows",
--                                                                "only_shadow"}
--
-- total is the number of rows of that kind in that table (also beyond
-- p_limit). Rows are compared as JSON on the columns both tables have,
-- matched on the live table's primary key when the shadow's is the same,
-- else as whole rows (EXCEPT ALL, duplicates counted).
CREATE OR REPLACE FUNCTION aura.diff_shadow(p_name text, p_limit integer DEFAULT 100)
RETURNS TABLE (table_name text, difference text, total bigint, key jsonb, columns text[],
               live jsonb, shadow jsonb)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_live_schema   text;
    v_shadow_schema text;
    v_at            record;
    v_table         text;
    v_live_cols     jsonb;
    v_shadow_cols   jsonb;
    v_drop_live     text[];
    v_drop_shadow   text[];
    v_key_live      text[];
    v_key_shadow    text[];
    v_counts        jsonb;
    v_live_rows     bigint;
    v_shadow_rows   bigint;
    v_row           record;
    v_tables        integer := 0;
    v_differing     bigint := 0;
    v_checkpoint    jsonb;
BEGIN
    IF p_limit IS NULL OR p_limit < 0 THEN
        RAISE EXCEPTION 'limit must be 0 or more, not %', p_limit USING ERRCODE = 'AU007';
    END IF;
    v_at := aura.align_shadow(p_name);
    SELECT c.schema_name INTO v_live_schema FROM aura.projection_checkpoints c WHERE c.name = p_name;
    SELECT c.schema_name INTO v_shadow_schema FROM aura.projection_checkpoints c
     WHERE c.name = p_name || '__shadow';
    v_checkpoint := jsonb_build_object('checkpoint', v_at.transaction_id::text || '/' || v_at.global_position);

    FOR v_table IN SELECT t FROM aura.read_model_tables(v_live_schema) t
                   UNION SELECT t FROM aura.read_model_tables(v_shadow_schema) t
                   ORDER BY 1 LOOP
        v_tables := v_tables + 1;
        IF to_regclass(format('%I.%I', v_shadow_schema, v_table)) IS NULL
           OR to_regclass(format('%I.%I', v_live_schema, v_table)) IS NULL THEN
            EXECUTE format('SELECT count(*) FROM %I.%I',
                           CASE WHEN to_regclass(format('%I.%I', v_shadow_schema, v_table)) IS NULL
                                THEN v_live_schema ELSE v_shadow_schema END, v_table)
               INTO v_live_rows;
            v_differing := v_differing + v_live_rows;
            RETURN QUERY SELECT v_table,
                CASE WHEN to_regclass(format('%I.%I', v_shadow_schema, v_table)) IS NULL
                     THEN 'table_only_live' ELSE 'table_only_shadow' END,
                v_live_rows, v_checkpoint, NULL::text[], NULL::jsonb, NULL::jsonb;
            CONTINUE;
        END IF;

        -- Columns: {name: type} of each side; only the common ones compare.
        SELECT jsonb_object_agg(a.attname, format_type(a.atttypid, a.atttypmod)) INTO v_live_cols
          FROM pg_attribute a
         WHERE a.attrelid = format('%I.%I', v_live_schema, v_table)::regclass
           AND a.attnum > 0 AND NOT a.attisdropped;
        SELECT jsonb_object_agg(a.attname, format_type(a.atttypid, a.atttypmod)) INTO v_shadow_cols
          FROM pg_attribute a
         WHERE a.attrelid = format('%I.%I', v_shadow_schema, v_table)::regclass
           AND a.attnum > 0 AND NOT a.attisdropped;
        v_drop_live := ARRAY(SELECT k FROM jsonb_object_keys(v_live_cols) k
                             WHERE v_shadow_cols->k IS DISTINCT FROM v_live_cols->k);
        v_drop_shadow := ARRAY(SELECT k FROM jsonb_object_keys(v_shadow_cols) k
                               WHERE v_live_cols->k IS DISTINCT FROM v_shadow_cols->k);
        IF cardinality(v_drop_live) + cardinality(v_drop_shadow) > 0 THEN
            RETURN QUERY SELECT v_table, 'columns', (SELECT count(DISTINCT c)
                                                     FROM unnest(v_drop_live || v_drop_shadow) c),
                NULL::jsonb,
                ARRAY(SELECT DISTINCT c FROM unnest(v_drop_live || v_drop_shadow) c ORDER BY 1),
                (SELECT jsonb_object_agg(k, v_live_cols->k) FROM unnest(v_drop_live) k),
                (SELECT jsonb_object_agg(k, v_shadow_cols->k) FROM unnest(v_drop_shadow) k);
        END IF;

        -- The primary key, when both sides have the same one on common columns.
        v_key_live := ARRAY(
            SELECT a.attname::text FROM pg_index i
              JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
             WHERE i.indrelid = format('%I.%I', v_live_schema, v_table)::regclass AND i.indisprimary
             ORDER BY a.attname);
        v_key_shadow := ARRAY(
            SELECT a.attname::text FROM pg_index i
              JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
             WHERE i.indrelid = format('%I.%I', v_shadow_schema, v_table)::regclass AND i.indisprimary
             ORDER BY a.attname);
        IF v_key_live <> v_key_shadow OR cardinality(v_key_live) = 0
           OR v_key_live && v_drop_live THEN
            v_key_live := NULL;
        END IF;

        EXECUTE format('SELECT (SELECT count(*) FROM %I.%I), (SELECT count(*) FROM %I.%I)',
                       v_live_schema, v_table, v_shadow_schema, v_table)
           INTO v_live_rows, v_shadow_rows;
        v_counts := jsonb_build_object('only_live', 0, 'only_shadow', 0, 'differs', 0);
        FOR v_row IN EXECUTE format($q$
            WITH l AS (SELECT to_jsonb(t) - $1 AS r FROM %1$I.%3$I t),
                 s AS (SELECT to_jsonb(t) - $2 AS r FROM %2$I.%3$I t),
                 d AS (%4$s)
            SELECT d.kind, d.key, d.lr, d.sr, count(*) OVER (PARTITION BY d.kind) AS total,
                   row_number() OVER (PARTITION BY d.kind ORDER BY d.key::text, d.lr::text, d.sr::text) AS n
            FROM d
            $q$, v_live_schema, v_shadow_schema, v_table,
            CASE WHEN v_key_live IS NOT NULL THEN $k$
                SELECT CASE WHEN lk.r IS NULL THEN 'only_shadow' WHEN sk.r IS NULL THEN 'only_live'
                            ELSE 'differs' END AS kind,
                       coalesce(lk.key, sk.key) AS key, lk.r AS lr, sk.r AS sr
                FROM (SELECT (SELECT jsonb_object_agg(k, l.r->k) FROM unnest($3::text[]) k) AS key, l.r
                      FROM l) AS lk
                FULL JOIN (SELECT (SELECT jsonb_object_agg(k, s.r->k) FROM unnest($3::text[]) k) AS key,
                                  s.r
                           FROM s) AS sk ON lk.key = sk.key
                WHERE lk.r IS DISTINCT FROM sk.r
                $k$
            ELSE $w$
                SELECT 'only_live' AS kind, NULL::jsonb AS key, x.r AS lr, NULL::jsonb AS sr
                FROM (SELECT r FROM l EXCEPT ALL SELECT r FROM s) AS x
                UNION ALL
                SELECT 'only_shadow', NULL::jsonb, NULL::jsonb, y.r
                FROM (SELECT r FROM s EXCEPT ALL SELECT r FROM l) AS y
                $w$ END)
            USING v_drop_live, v_drop_shadow, v_key_live LOOP
            v_counts := jsonb_set(v_counts, ARRAY[v_row.kind], to_jsonb((v_counts->>v_row.kind)::bigint + 1));
            CONTINUE WHEN v_row.n > p_limit;
            RETURN QUERY SELECT v_table, v_row.kind::text, v_row.total, v_row.key,
                CASE WHEN v_row.kind = 'differs' THEN
                    ARRAY(SELECT k FROM jsonb_object_keys(v_row.lr) k
                          WHERE v_row.lr->k IS DISTINCT FROM v_row.sr->k ORDER BY k) END,
                v_row.lr, v_row.sr;
        END LOOP;
        v_differing := v_differing + (v_counts->>'only_live')::bigint
                       + (v_counts->>'only_shadow')::bigint + (v_counts->>'differs')::bigint;
        RETURN QUERY SELECT v_table, 'table',
            (v_counts->>'only_live')::bigint + (v_counts->>'only_shadow')::bigint
                + (v_counts->>'differs')::bigint,
            v_checkpoint, NULL::text[],
            jsonb_build_object('rows', v_live_rows, 'only_live', v_counts->'only_live',
                               'differs', v_counts->'differs'),
            jsonb_build_object('rows', v_shadow_rows, 'only_shadow', v_counts->'only_shadow');
    END LOOP;

    INSERT INTO aura.shadow_diffs AS s (projection, transaction_id, global_position, tables,
                                        differing_rows, diffed_at)
    VALUES (p_name, v_at.transaction_id, v_at.global_position, v_tables, v_differing, now())
    ON CONFLICT (projection) DO UPDATE
       SET transaction_id = excluded.transaction_id, global_position = excluded.global_position,
           tables = excluded.tables, differing_rows = excluded.differing_rows,
           diffed_at = excluded.diffed_at;
END;
$$;

-- Swaps p_name's shadow in, atomically: both are brought to one checkpoint
-- (aura.align_shadow), the schemas trade names, and the rows trade
-- definitions, checkpoints, counters and dead letters. Readers of SCHEMA
-- see the old model until the commit and the new one after it; the old
-- version stays live as the shadow, so a second promote rolls back, until
-- aura.drop_shadow. The daemons' next batches see the new generation and
-- reload. Update the catalog to the promoted definition, or a daemon that
-- registers the old one marks the projection as needing a rebuild.
CREATE OR REPLACE FUNCTION aura.promote_shadow(p_name text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_shadow_name text := p_name || '__shadow';
    v_live   aura.projection_checkpoints;
    v_shadow aura.projection_checkpoints;
    v_parked text;
BEGIN
    PERFORM aura.align_shadow(p_name);
    v_shadow := aura.lock_projection(v_shadow_name);
    v_live := aura.lock_projection(p_name);
    v_parked := v_live.schema_name || '__swap';
    PERFORM aura.drop_read_model_schema(v_parked);
    EXECUTE format('ALTER SCHEMA %I RENAME TO %I', v_live.schema_name, v_parked);
    EXECUTE format('ALTER SCHEMA %I RENAME TO %I', v_shadow.schema_name, v_live.schema_name);
    EXECUTE format('ALTER SCHEMA %I RENAME TO %I', v_parked, v_shadow.schema_name);
    -- Each schema goes to the role of its new name, so the
    -- promoted handlers run as the live role and the old ones as the
    -- shadow's (roles/read_model_roles.sql).
    PERFORM aura.hand_over_read_model(v_live.schema_name);
    PERFORM aura.hand_over_read_model(v_shadow.schema_name);

    UPDATE aura.projection_checkpoints c
       SET handler = o.handler, handler_kind = o.handler_kind, event_types = o.event_types,
           forget_handler = o.forget_handler, definition_sql = o.definition_sql,
           definition_hash = o.definition_hash,
           events_applied = o.events_applied,
           last_applied_position = o.last_applied_position,
           last_applied_recorded_at = o.last_applied_recorded_at,
           consecutive_failures = o.consecutive_failures, circuit_state = o.circuit_state,
           circuit_open_until = o.circuit_open_until,
           last_error = o.last_error, last_error_at = o.last_error_at,
           next_definition = CASE WHEN c.name = p_name
                                   AND c.next_definition->>'definition_hash' = o.definition_hash
                                  THEN NULL ELSE c.next_definition END,
           generation = nextval('aura.projection_generation'),
           updated_at = now()
      FROM (SELECT (v_shadow).* UNION ALL SELECT (v_live).*) AS o
     WHERE (c.name = p_name AND o.name = v_shadow_name)
        OR (c.name = v_shadow_name AND o.name = p_name);
    -- Dead letters follow the definition whose handler failed on them. In
    -- three statements, through a name no projection can have: pending
    -- letters are unique per projection and event, and that index is
    -- checked row by row, so one UPDATE trading the two names fails when
    -- both sides hold a letter for the same event.
    UPDATE aura.dead_letters d SET projection = p_name || '__promoting'
     WHERE d.projection = p_name;
    UPDATE aura.dead_letters d SET projection = p_name
     WHERE d.projection = v_shadow_name;
    UPDATE aura.dead_letters d SET projection = v_shadow_name
     WHERE d.projection = p_name || '__promoting';
    DELETE FROM aura.shadow_diffs s WHERE s.projection = p_name;
    PERFORM pg_notify('aura_events', '');
    RETURN 'promoted';
END;
$$;

-- Each shadow beside its live projection: how far behind each is, and the
-- last comparison.
CREATE OR REPLACE VIEW aura.shadow_status AS
SELECT live.name                  AS projection,
       shadow.name                AS shadow,
       live.checkpoint            AS live_checkpoint,
       shadow.checkpoint          AS shadow_checkpoint,
       live.events_behind         AS live_events_behind,
       shadow.events_behind       AS shadow_events_behind,
       shadow.seconds_behind      AS shadow_seconds_behind,
       shadow.status              AS shadow_status,
       shadow.circuit             AS shadow_circuit,
       shadow.dead_letters        AS shadow_dead_letters,
       d.transaction_id::text || '/' || d.global_position AS diffed_at_checkpoint,
       d.differing_rows,
       d.tables                   AS diffed_tables,
       d.diffed_at
FROM aura.projection_checkpoints c
JOIN aura.projection_status shadow ON shadow.name = c.name
JOIN aura.projection_status live ON live.name = c.shadow_of
LEFT JOIN aura.shadow_diffs d ON d.projection = c.shadow_of
WHERE c.shadow_of IS NOT NULL
ORDER BY live.name;

COMMENT ON VIEW aura.shadow_status IS
    'Shadow projections beside their live ones: lag, health and the last aura.diff_shadow';

-- Ownership and privileges of what this file created (as roles/grants.sql
-- does): the owner owns, the projector runs the functions and writes the
-- diffs, the reader reads the view.
DO $$
DECLARE
    v_owner     text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'owner');
    v_projector text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'projector');
    v_reader    text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'reader');
    r record;
BEGIN
    EXECUTE format('ALTER TABLE aura.shadow_diffs OWNER TO %I', v_owner);
    EXECUTE format('ALTER VIEW aura.shadow_status OWNER TO %I', v_owner);
    REVOKE ALL ON aura.shadow_diffs, aura.shadow_status FROM PUBLIC;
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON aura.shadow_diffs TO %I', v_projector);
    EXECUTE format('GRANT SELECT ON aura.shadow_status TO %I, %I', v_projector, v_reader);
    FOR r IN SELECT p.oid::regprocedure AS fn FROM pg_catalog.pg_proc p
             WHERE p.pronamespace = 'aura'::regnamespace
               AND p.proname IN ('begin_shadow', 'drop_shadow', 'apply_until', 'align_shadow',
                                 'read_model_tables', 'diff_shadow', 'promote_shadow') LOOP
        EXECUTE format('ALTER ROUTINE %s OWNER TO %I', r.fn, v_owner);
        EXECUTE format('REVOKE EXECUTE ON ROUTINE %s FROM PUBLIC', r.fn);
        EXECUTE format('GRANT EXECUTE ON ROUTINE %s TO %I', r.fn, v_projector);
    END LOOP;
END
$$;

-- sql/upgrades/0009_projection_incarnations.sql
-- Migration 0009: generations that never repeat. Until 0008 a
-- restarted shadow or rebuild was a new row back at generation 0 and
-- checkpoint 0/0, exactly what a batch read under the old definition
-- expected, so that batch committed into the new one. Now every new row,
-- reset and swap takes the next value of aura.projection_generation, and
-- aura.project_batch, aura.record_projection_failure, aura.dead_letter_next
-- and aura.finish_rebuild take the generation their caller read.
--
-- Idempotent: a fresh install, where tables/projections.sql already has
-- this shape, runs it too. It runs after the function files of 0009 (and,
-- in sql/install.sql, after roles/grants.sql): it gives the functions whose
-- signatures changed their owner and privileges, as roles/grants.sql does.
DO $$
DECLARE
    v_owner     text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'owner');
    v_projector text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'projector');
    r record;
BEGIN
    IF to_regclass('aura.projection_generation') IS NULL THEN
        CREATE SEQUENCE aura.projection_generation;
        -- OWNED BY wants the table's owner; the sequence then follows it.
        EXECUTE format('ALTER SEQUENCE aura.projection_generation OWNER TO %s',
                       (SELECT c.relowner::regrole FROM pg_catalog.pg_class c
                        WHERE c.oid = 'aura.projection_checkpoints'::regclass));
        ALTER SEQUENCE aura.projection_generation OWNED BY aura.projection_checkpoints.generation;
    END IF;
    ALTER TABLE aura.projection_checkpoints
        ALTER COLUMN generation SET DEFAULT nextval('aura.projection_generation');
    -- Past every generation counted up from 0 before: a new one can match
    -- no row's. Only ever forward.
    PERFORM setval('aura.projection_generation', x.m)
       FROM (SELECT max(c.generation) AS m FROM aura.projection_checkpoints c) AS x
      WHERE x.m >= 1 AND x.m >= (SELECT s.last_value FROM aura.projection_generation s);

    -- Projector roles create rows and take generations (nextval needs USAGE).
    EXECUTE format('GRANT USAGE ON SEQUENCE aura.projection_generation TO %I', v_projector);
    FOR r IN SELECT p.oid::regprocedure AS fn FROM pg_catalog.pg_proc p
             WHERE p.pronamespace = 'aura'::regnamespace
               AND p.proname IN ('check_generation', 'project_batch', 'record_projection_failure',
                                 'dead_letter_next', 'finish_rebuild')
             ORDER BY p.oid LOOP
        EXECUTE format('ALTER ROUTINE %s OWNER TO %I', r.fn, v_owner);
        EXECUTE format('REVOKE EXECUTE ON ROUTINE %s FROM PUBLIC', r.fn);
        EXECUTE format('GRANT EXECUTE ON ROUTINE %s TO %I', r.fn, v_projector);
    END LOOP;
END
$$;

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

-- sql/upgrades/0009_read_model_role_names.sql
-- Migration 0009, data: read model roles get unambiguous names
-- (<projector role>/<schema>, aura.read_model_role_name) and the shadow and
-- rebuild schemas roles of their own. Before 0009 a role was
-- named <projector role>_<schema without __shadow/__rebuild>: a shadow's
-- handlers ran as the live model's role, and projector shop's read model
-- eu_totals got the role of projector shop_eu's totals.
--
-- roles/read_model_roles.sql (rerun first) gave the schemas of the
-- projections' rows to their new roles; this gives every other read model
-- schema of this database (SCHEMA__previous, kept by a rebuild) to the role
-- of its name, then retires the old roles: a pre-0009 role (commented
-- exactly 'aura-pg read model role') of which this database's projector
-- role is a member and that owns nothing here any more loses its default
-- privileges here and is dropped, unless a database not migrated yet
-- still uses it (DROP ROLE refuses then; the last migration drops it).
-- Rerunning this file changes nothing.
DO $$
DECLARE
    v_projector text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'projector');
    r record;
BEGIN
    FOR r IN SELECT n.nspname FROM pg_catalog.pg_namespace n
             WHERE pg_catalog.obj_description(n.oid, 'pg_namespace') = 'aura-pg read model'
               AND n.nspname ~ '^[a-z][a-z0-9]*(_[a-z0-9]+)*(__[a-z]+)?$'
               AND char_length(n.nspname) <= 60
             ORDER BY n.nspname LOOP
        PERFORM aura.hand_over_read_model(r.nspname);
    END LOOP;

    FOR r IN SELECT old.oid, old.rolname FROM pg_catalog.pg_roles old
             JOIN pg_catalog.pg_auth_members m ON m.roleid = old.oid
             JOIN pg_catalog.pg_roles p ON p.oid = m.member AND p.rolname = v_projector
             WHERE pg_catalog.shobj_description(old.oid, 'pg_authid') = 'aura-pg read model role'
               AND NOT old.rolcanlogin
               -- Nothing here but its default privileges (and grants to it).
               AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_shdepend d
                               WHERE d.refclassid = 'pg_authid'::regclass AND d.refobjid = old.oid
                                 AND d.dbid = (SELECT x.oid FROM pg_catalog.pg_database x
                                               WHERE x.datname = current_database())
                                 AND d.deptype = 'o'
                                 AND d.classid <> 'pg_default_acl'::regclass)
             ORDER BY old.rolname LOOP
        EXECUTE format('DROP OWNED BY %I', r.rolname);
        BEGIN
            EXECUTE format('DROP ROLE %I', r.rolname);
        EXCEPTION WHEN dependent_objects_still_exist OR undefined_object THEN
            RAISE NOTICE 'kept the pre-0009 read model role %: another database still uses it', r.rolname;
        END;
    END LOOP;
END
$$;

