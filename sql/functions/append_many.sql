-- aura.append_many(stream_ids, expected_versions, batches) appends a batch
-- of events to each of many streams in one transaction, all or nothing: the
-- bulk path (EventStore.append_many, aura-pg import jsonl). Element i of the
-- three arrays is one stream's append, exactly as aura.append_events takes
-- it: the stream id, its expected version ('any', 'no_stream',
-- 'stream_exists' or digits) and a JSON array of events in the same shape.
-- The Python store COPYs the batches into a temporary staging table of its
-- own session and passes them here aggregated from it, so this function
-- never reads a relation its caller controls.
--
-- Every stream gets what aura.append_events gives it: the same validation
-- (aura.event_problem, aura.batch_problem, the events table's CHECK
-- constraints), the same expected-version check, the same idempotency (a
-- stream whose whole batch was recorded before with the same content is
-- answered with the recorded rows and duplicate = true; recorded keys with
-- other content, or a mix of recorded and new keys, are AU002) and the same
-- per-stream advisory lock and commit-order guard (40001). The first stream
-- refused refuses the whole call: nothing is written.
--
-- Locks: one per stream, taken in ascending order of the lock key (the
-- stream id's hash, not its text: two ids may share a hash, and only the
-- keys' own order is the same for every caller), so two bulk appends over
-- overlapping streams cannot deadlock, and a single-stream append holds one
-- lock only. A transaction can hold about max_locks_per_transaction *
-- (max_connections + max_prepared_transactions) locks in all (6,400 with
-- the defaults, shared by every session), hence at most 10,000 streams per
-- call; the Python store splits larger loads into calls of at most that.
--
-- Commit order: the new events take their global positions in call order
-- (stream by stream, each batch in order), or, where the elements carry a
-- "sequence" number (every element of a stream's batch or none, ascending
-- within it), in sequence order: aura-pg import jsonl keeps a file's
-- commit order across streams so.
--
-- Returns one row per event: new events in their stream's batch order, a
-- duplicate stream's recorded rows in batch order.
--
-- Errors (SQLSTATE), as aura.append_events: AU001, AU002, AU003, 40001; the
-- DETAIL names the stream.
CREATE OR REPLACE FUNCTION aura.append_many(
    p_stream_ids        text[],
    p_expected_versions text[],
    p_batches           jsonb[]
) RETURNS TABLE (stream_id text, event_id uuid, version bigint, global_position bigint,
                 duplicate boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_max_bytes   bigint := coalesce(nullif(current_setting('aura.max_payload_bytes', true), ''),
                                     '1048576')::bigint;
    v_max_events  bigint := coalesce(nullif(current_setting('aura.max_batch_events', true), ''),
                                     '10000')::bigint;
    v_max_streams constant int := 10000;
    v_count       int := coalesce(cardinality(p_stream_ids), 0);
    v_problem     record;
    v_lock        int;
    v_own_xid     xid8;     -- this transaction's id if it had one before the append
    v_heads       bigint[]; -- each stream's version before this call
    v_head_xids   xid8[];
    v_ok          boolean[]; -- each stream at its expected version
    v_wanted      bigint;   -- events of the streams at their expected version
    v_inserted    bigint;
    r             record;
    v_stream_new  bigint;
    v_recorded    int;
    v_matching    int;
    v_size        int;
    v_out_streams   text[];  -- the new events
    v_out_ids       uuid[];
    v_out_versions  bigint[];
    v_out_positions bigint[];
    -- The insert of the streams at their expected version, in call order
    -- ($1 stream ids, $2 batches, $3 heads, $4 at the expected version, $5
    -- the payload limit), with its conflict clause (%s): nothing, or ON
    -- CONFLICT DO NOTHING after a unique violation. Planned per call, which
    -- is nothing beside a bulk insert.
    v_insert constant text := $insert$
        WITH inserted AS (
            INSERT INTO aura.events AS e (event_id, stream_id, version, type, data, metadata,
                                          idempotency_key, idempotency_hash)
            SELECT ids.event_id, s.sid, s.head + b.ord, b.el->>'type', b.el->'data',
                   coalesce(nullif(b.el->'metadata', 'null'::jsonb), '{}'::jsonb),
                   ids.idempotency_key,
                   CASE WHEN b.el->>'idempotency_key' IS NOT NULL
                        THEN aura.idempotency_hash(s.sid, ids.idempotency_key) END
            FROM unnest($1, $2, $3, $4) WITH ORDINALITY
                     AS s(sid, ev, head, ok, sord)
            CROSS JOIN LATERAL jsonb_array_elements(s.ev) WITH ORDINALITY AS b(el, ord)
            CROSS JOIN LATERAL (
                SELECT coalesce((b.el->>'event_id')::uuid, gen_random_uuid()) AS event_id) AS id
            CROSS JOIN LATERAL (
                SELECT id.event_id,
                       coalesce(b.el->>'idempotency_key', id.event_id::text) AS idempotency_key
            ) AS ids
            WHERE s.ok
              AND CASE WHEN aura.event_problem(b.el, $5) IS NULL THEN true
                       ELSE aura.invalid_event(s.sid, b.ord, aura.event_problem(b.el, $5)) END
            ORDER BY (b.el->>'sequence')::bigint, s.sord, b.ord
            %s
            RETURNING e.stream_id, e.event_id, e.version, e.global_position
        )
        SELECT array_agg(i.stream_id), array_agg(i.event_id), array_agg(i.version),
               array_agg(i.global_position), count(*)
          FROM inserted i
$insert$;
BEGIN
    IF v_count = 0 OR cardinality(p_expected_versions) IS DISTINCT FROM v_count
       OR cardinality(p_batches) IS DISTINCT FROM v_count THEN
        RAISE EXCEPTION 'append_many needs at least one stream, and as many expected versions and batches as stream ids'
            USING ERRCODE = 'AU003';
    END IF;
    IF v_count > v_max_streams THEN
        RAISE EXCEPTION 'append_many takes at most % streams per call (one advisory lock each), not %',
            v_max_streams, v_count
            USING ERRCODE = 'AU003';
    END IF;
    -- The ceilings, as aura.append_events reads them: the values set for
    -- the whole database (ALTER DATABASE ... SET), else the defaults.
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

    -- The arguments of each stream, first problem first.
    SELECT s.ord, s.sid,
           CASE
               WHEN s.sid IS NULL OR char_length(s.sid) NOT BETWEEN 1 AND 200
                    OR s.sid ~ '[[:cntrl:]]'
                   THEN 'invalid stream id: it must have 1 to 200 characters and no control characters'
               WHEN s.exp IS NULL OR NOT (s.exp IN ('any', 'no_stream', 'stream_exists')
                                          OR s.exp ~ '^[0-9]{1,19}$'
                                             AND s.exp::numeric <= 9223372036854775807)
                   THEN format('invalid expected version %s: use any, no_stream, stream_exists or a version >= 0',
                               coalesce(quote_literal(s.exp), 'NULL'))
               WHEN jsonb_typeof(s.ev) IS DISTINCT FROM 'array' OR jsonb_array_length(s.ev) = 0
                   THEN 'events must be a non-empty JSON array'
               WHEN jsonb_array_length(s.ev) > v_max_events
                   THEN format('%s events, over the limit of %s (aura.max_batch_events)',
                               jsonb_array_length(s.ev), v_max_events)
           END AS problem
      INTO v_problem
      FROM unnest(p_stream_ids, p_expected_versions, p_batches) WITH ORDINALITY AS s(sid, exp, ev, ord)
     WHERE s.sid IS NULL OR char_length(s.sid) NOT BETWEEN 1 AND 200 OR s.sid ~ '[[:cntrl:]]'
        OR s.exp IS NULL OR NOT (s.exp IN ('any', 'no_stream', 'stream_exists')
                                 OR s.exp ~ '^[0-9]{1,19}$'
                                    AND s.exp::numeric <= 9223372036854775807)
        OR jsonb_typeof(s.ev) IS DISTINCT FROM 'array' OR jsonb_array_length(s.ev) = 0
        OR jsonb_array_length(s.ev) > v_max_events
     ORDER BY s.ord
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'invalid bulk append: stream % (%): %', v_problem.ord,
            coalesce(quote_literal(left(v_problem.sid, 210)), 'NULL'), v_problem.problem
            USING ERRCODE = 'AU003',
                  DETAIL = json_build_object('stream_id', v_problem.sid)::text;
    END IF;
    SELECT s.sid INTO v_problem
      FROM unnest(p_stream_ids) AS s(sid) GROUP BY s.sid HAVING count(*) > 1 LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'invalid bulk append: stream % appears more than once (one batch per stream)',
            quote_literal(v_problem.sid)
            USING ERRCODE = 'AU003',
                  DETAIL = json_build_object('stream_id', v_problem.sid)::text;
    END IF;

    -- Elements may carry "sequence": their place in the call's commit
    -- order (aura-pg import jsonl keeps a file's order so), ascending within
    -- each stream, as its versions are.
    SELECT s.sid, x.problem INTO v_problem
      FROM unnest(p_stream_ids, p_batches) AS s(sid, ev)
      CROSS JOIN LATERAL (
          SELECT CASE
                     WHEN count(*) FILTER (WHERE b.el ? 'sequence') NOT IN (0, count(*))
                         THEN 'give "sequence" to every event or to none'
                     WHEN bool_or(jsonb_typeof(b.el->'sequence') IS DISTINCT FROM 'number'
                                  OR (b.el->>'sequence') !~ '^[0-9]{1,18}$')
                          FILTER (WHERE b.el ? 'sequence')
                         THEN '"sequence" must be a whole number from 0 to 10^18 - 1'
                 END AS problem
          FROM jsonb_array_elements(s.ev) AS b(el)) AS x
     WHERE x.problem IS NOT NULL
     LIMIT 1;
    IF NOT FOUND THEN
        SELECT q.sid, '"sequence" must ascend within the stream''s batch' AS problem INTO v_problem
          FROM (SELECT s.sid, (b.el->>'sequence')::bigint AS seq,
                       lag((b.el->>'sequence')::bigint) OVER (PARTITION BY s.sord ORDER BY b.ord) AS prev
                  FROM unnest(p_stream_ids, p_batches) WITH ORDINALITY AS s(sid, ev, sord)
                  CROSS JOIN LATERAL jsonb_array_elements(s.ev) WITH ORDINALITY AS b(el, ord)
                 WHERE b.el ? 'sequence') AS q
         WHERE q.seq <= q.prev
         LIMIT 1;
    END IF;
    IF FOUND THEN
        RAISE EXCEPTION 'invalid event batch for stream %: %', quote_literal(v_problem.sid),
            v_problem.problem
            USING ERRCODE = 'AU003',
                  DETAIL = json_build_object('stream_id', v_problem.sid)::text;
    END IF;

    -- The per-stream append locks of aura.append_events, in one order for
    -- every caller; before anything here assigns a transaction id.
    v_own_xid := pg_current_xact_id_if_assigned();
    FOR v_lock IN SELECT DISTINCT hashtext(s.sid) FROM unnest(p_stream_ids) AS s(sid) ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock(1635087475, v_lock);
    END LOOP;

    -- Each stream's head (through the (stream_id, version) index), seen
    -- after every lock was granted.
    SELECT array_agg(coalesce(h.version, 0) ORDER BY s.ord),
           array_agg(h.transaction_id ORDER BY s.ord),
           array_agg(CASE s.exp
                         WHEN 'any' THEN true
                         WHEN 'no_stream' THEN h.version IS NULL
                         WHEN 'stream_exists' THEN h.version IS NOT NULL
                         ELSE coalesce(h.version, 0) = s.exp::bigint END ORDER BY s.ord),
           sum(jsonb_array_length(s.ev)) FILTER (
               WHERE CASE s.exp
                         WHEN 'any' THEN true
                         WHEN 'no_stream' THEN h.version IS NULL
                         WHEN 'stream_exists' THEN h.version IS NOT NULL
                         ELSE coalesce(h.version, 0) = s.exp::bigint END)
      INTO v_heads, v_head_xids, v_ok, v_wanted
      FROM unnest(p_stream_ids, p_expected_versions, p_batches) WITH ORDINALITY AS s(sid, exp, ev, ord)
      LEFT JOIN LATERAL (
          SELECT e.version, e.transaction_id FROM aura.events e
           WHERE e.stream_id = s.sid ORDER BY e.version DESC LIMIT 1) AS h ON true;
    v_wanted := coalesce(v_wanted, 0);

    -- The streams at their expected version: every event checked on its way
    -- in (the first bad one raises AU003), in call order. First as a plain
    -- INSERT: ON CONFLICT costs every row a probe of each unique index
    -- before its insert (a third of the insert's time, measured). A unique
    -- violation (a resend: a recorded key or event id) undoes it, and the
    -- INSERT runs again skipping recorded events, which are sorted out below.
    BEGIN
        EXECUTE format(v_insert, '')
           INTO v_out_streams, v_out_ids, v_out_versions, v_out_positions, v_inserted
          USING p_stream_ids, p_batches, v_heads, v_ok, v_max_bytes;
    EXCEPTION WHEN unique_violation THEN
        EXECUTE format(v_insert, 'ON CONFLICT DO NOTHING')
           INTO v_out_streams, v_out_ids, v_out_versions, v_out_positions, v_inserted
          USING p_stream_ids, p_batches, v_heads, v_ok, v_max_bytes;
    END;
    RETURN QUERY
        SELECT o.sid, o.id, o.version, o.pos, false
        FROM unnest(v_out_streams, v_out_ids, v_out_versions, v_out_positions) AS o(sid, id, version, pos);

    -- A transaction that wrote before this call may not append after a
    -- later transaction's events (see aura.append_events).
    IF v_inserted > 0 AND v_own_xid IS NOT NULL THEN
        SELECT s.sid, s.head INTO r
          FROM unnest(p_stream_ids, v_heads, v_head_xids) AS s(sid, head, head_xid)
         WHERE s.head_xid > v_own_xid
           AND EXISTS (SELECT 1 FROM aura.events e
                        WHERE e.stream_id = s.sid AND e.version = s.head + 1)
         LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'stream % moved on to version % in a transaction that began writing after this one: retry this transaction',
                quote_literal(r.sid), r.head
                USING ERRCODE = '40001',
                      DETAIL = json_build_object('stream_id', r.sid, 'expected', 'any',
                                                 'actual', r.head, 'reason', 'stream_order')::text;
        END IF;
    END IF;

    IF v_inserted = v_wanted AND NOT (false = ANY (v_ok)) THEN
        RETURN;  -- the usual case: every stream at its expected version, all new
    END IF;

    -- Slow path, stream by stream in call order: a resend is answered, the
    -- first stream refused refuses the call. An event id given to two
    -- streams would read as a recorded event of one of them: refused first.
    SELECT x.id INTO v_problem
      FROM unnest(p_batches) AS s(ev)
      CROSS JOIN LATERAL jsonb_array_elements(s.ev) AS b(el)
      CROSS JOIN LATERAL (SELECT (b.el->>'event_id')::uuid AS id) AS x
     WHERE x.id IS NOT NULL
     GROUP BY x.id HAVING count(*) > 1
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'invalid bulk append: event id % repeats within the call', v_problem.id
            USING ERRCODE = 'AU003';
    END IF;
    FOR r IN SELECT s.sid, s.exp, s.ev, s.head, s.ok, s.ord
               FROM unnest(p_stream_ids, p_expected_versions, p_batches, v_heads, v_ok)
                        WITH ORDINALITY AS s(sid, exp, ev, head, ok, ord)
              ORDER BY s.ord LOOP
        v_size := jsonb_array_length(r.ev);
        IF r.ok THEN
            SELECT count(*) INTO v_stream_new FROM aura.events e
             WHERE e.stream_id = r.sid AND e.version > r.head;
            CONTINUE WHEN v_stream_new = v_size;
        ELSE
            v_stream_new := 0;
        END IF;
        IF aura.batch_problem(r.ev, v_max_bytes) IS NOT NULL THEN
            RAISE EXCEPTION 'invalid event batch for stream %: %', quote_literal(r.sid),
                aura.batch_problem(r.ev, v_max_bytes)
                USING ERRCODE = 'AU003',
                      DETAIL = json_build_object('stream_id', r.sid)::text;
        END IF;
        IF r.head = 0 AND (CASE WHEN r.exp = 'stream_exists' THEN true
                                WHEN r.exp ~ '^[0-9]+$' THEN r.exp::numeric > 0
                                ELSE false END) THEN
            RAISE EXCEPTION 'stream % does not exist, expected version %', quote_literal(r.sid), r.exp
                USING ERRCODE = 'AU001',
                      DETAIL = json_build_object('stream_id', r.sid, 'expected', r.exp,
                                                 'actual', 0)::text;
        END IF;
        IF v_stream_new > 0 THEN
            v_recorded := v_size - v_stream_new;
            v_matching := 0;
        ELSE
            SELECT count(*), count(*) FILTER (WHERE x.same_content)
              INTO v_recorded, v_matching
              FROM aura.recorded_for_batch(r.sid, r.ev) AS x;
            IF v_recorded = v_size AND v_matching = v_size THEN
                RETURN QUERY
                    SELECT r.sid, x.event_id, x.version, x.global_position, true
                    FROM aura.recorded_for_batch(r.sid, r.ev) AS x;
                CONTINUE;
            END IF;
        END IF;
        IF v_recorded > 0 THEN
            RAISE EXCEPTION 'idempotency conflict on stream %: %', quote_literal(r.sid),
                CASE WHEN v_recorded < v_size
                     THEN format('%s of %s events in the batch were recorded before', v_recorded, v_size)
                     ELSE format('%s recorded events have the same keys (or event ids) but another stream, type or data',
                                 v_size - v_matching) END
                USING ERRCODE = 'AU002',
                      DETAIL = json_build_object('stream_id', r.sid, 'recorded', v_recorded,
                                                 'batch', v_size)::text;
        END IF;
        RAISE EXCEPTION 'stream % is at version %, not at the expected %',
            quote_literal(r.sid), r.head, r.exp
            USING ERRCODE = 'AU001',
                  DETAIL = json_build_object('stream_id', r.sid, 'expected', r.exp,
                                             'actual', r.head)::text;
    END LOOP;
END;
$$;

COMMENT ON FUNCTION aura.append_many(text[], text[], jsonb[]) IS
    'Append a batch of events to each of many streams (all or nothing, idempotent, optimistic concurrency)';

-- The writer's bulk way in, beside aura.append_events.
DO $$
DECLARE
    v_owner  text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'owner');
    v_writer text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'writer');
BEGIN
    EXECUTE format('ALTER FUNCTION aura.append_many(text[], text[], jsonb[]) OWNER TO %I', v_owner);
    REVOKE ALL ON FUNCTION aura.append_many(text[], text[], jsonb[]) FROM PUBLIC;
    EXECUTE format('GRANT EXECUTE ON FUNCTION aura.append_many(text[], text[], jsonb[]) TO %I',
                   v_writer);
END
$$;
