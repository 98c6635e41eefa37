-- Shadow projections: a new version of a projection runs beside the live
-- one, from the first event, as the projection NAME__shadow in schema
-- SCHEMA__shadow: daemons drive it with aura.project_batch like any
-- projection, readers never see it under the live name.
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
-- The shadow's row is aura.projection_checkpoints' NAME__shadow (shadow_of
-- names the live one); aura.shadow_diffs keeps the last comparison and
-- aura.shadow_status shows both side by side.

-- Starts a shadow of p_name from a new definition (or resumes the one
-- running with that definition): 'created', 'restarted' (a shadow with
-- another definition was dropped first) or 'unchanged'. The shadow keeps
-- the live projection's schema name with __shadow appended, and its
-- settings (batch size, retries, circuit breaker).
-- A restarted shadow is a new row with a generation never used before: a
-- batch its runner read under the old definition is refused (AU006), even
-- at the equal checkpoint 0/0.
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
    IF v_live.kind = 'python' THEN
        RAISE EXCEPTION '% is a Python processor: it has no read model to shadow', p_name
            USING ERRCODE = 'AU007';
    END IF;
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

-- Ownership and privileges of these functions (as roles/grants.sql gives
-- them for the objects installed before it): the owner owns them, the
-- projector runs them.
DO $$
DECLARE
    v_owner     text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'owner');
    v_projector text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'projector');
    r record;
BEGIN
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
