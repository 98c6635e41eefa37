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

-- Runs a projection's handler over events (in order) in its schema, as
-- its read model's role, through SCHEMA.aura_run_handler
-- (aura.isolate_read_model): one switch of user per batch. A read model
-- without its runner is refused rather than run with the caller's rights,
-- and so is one whose schema or runner is not its own role's: a swap that
-- missed the hand-over (aura.hand_over_read_model) would otherwise run a
-- handler as a role that also owns another schema, e.g. the live one.
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
    IF EXISTS (SELECT 1 FROM aura.processor_rows(p_name)) THEN
        RAISE EXCEPTION '% is a Python processor, not a SQL projection', quote_literal(p_name)
            USING ERRCODE = 'AU007',
                  HINT = 'Give the projection another name, or drop the processor first.';
    END IF;
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

-- Records a failed batch (the batch itself was rolled back): counts it,
-- and opens the circuit after circuit_failure_threshold failures in a row,
-- which pauses the projection (status failed) for circuit_recovery_seconds.
-- With p_expected_generation, AU006 when the projection was restarted,
-- reset or swapped since the caller read it. A successful batch
-- (aura.project_batch) resets the count and clears the error.
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
-- with p_expected_generation, the projection must still be the one whose
-- handler failed on it (not restarted, reset or swapped). The error stays
-- with the dead letter; last_error shows it until the next good batch.
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
    SELECT * INTO v_event FROM aura.read_projection(v_row, 1);
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
    IF v_row.kind = 'sql' THEN
        PERFORM aura.drop_read_model_schema(v_row.schema_name);
        PERFORM aura.install_projection_schema(v_row.schema_name, v_row.definition_sql,
                                               v_row.handler, v_row.handler_kind,
                                               v_row.forget_handler);
    END IF;
    UPDATE aura.projection_checkpoints c
       SET transaction_id = '0', global_position = 0, events_applied = 0, handover = NULL,
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
    IF v_row.kind = 'python' THEN
        RAISE EXCEPTION 'dead letter % is of Python processor %: its handler is Python', p_id,
            quote_literal(v_row.name)
            USING ERRCODE = 'AU007', HINT = format('aura-pg dlq retry %s runs it.', p_id);
    END IF;
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
    IF v_row.kind = 'python' THEN
        RAISE EXCEPTION '% is a Python processor: its handler is Python', quote_literal(p_name)
            USING ERRCODE = 'AU007',
                  HINT = format('aura-pg projections replay %s %s runs it.', p_name, p_stream_id);
    END IF;
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
    IF v_row.kind = 'python' THEN
        RAISE EXCEPTION '% is a Python processor: it has no read model to rebuild', p_name
            USING ERRCODE = 'AU007', HINT = 'aura.reset_projection replays it from the first event.';
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
-- p_generation: the generation of the rebuild the caller began
-- (aura.begin_rebuild); AU006 when another process restarted it since
-- (another definition, or a reset), so that no process swaps in, and
-- reports as its own, a rebuild it did not start.
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
