-- Migration 0002, frozen: exactly what it runs, the SQL files it loaded when
-- it was released, each after a '-- sql/<file>' line. Never edit this file:
-- a change to the schema is a new migration (docs/migrations.md).
-- sql/tables/projections.sql
-- Projections: one row per projection, holding its definition (synced from
-- projections/catalog.yaml by the daemon), its checkpoint and its health.
-- A batch is applied and the checkpoint advanced in one transaction
-- (aura.project_batch), so a read model is exactly the fold of the events
-- before its checkpoint.

-- Generations: every row (a new projection, shadow or rebuild) and every
-- reset or swap takes the next value, so a value is never seen twice, for
-- any name. A batch read under one definition or incarnation of
-- a projection cannot match another's, even a restarted shadow or rebuild
-- back at checkpoint 0/0.
CREATE SEQUENCE aura.projection_generation;

CREATE TABLE aura.projection_checkpoints (
    name                      text        PRIMARY KEY,
    description               text        NOT NULL DEFAULT '',
    -- The read model: the schema the definition SQL was run in, the handler
    -- function in it, and the events it folds (NULL: every type).
    schema_name               text        NOT NULL UNIQUE,
    handler                   text        NOT NULL,
    handler_kind              text        NOT NULL,
    event_types               text[],
    forget_handler            text,
    definition_sql            text        NOT NULL,
    definition_hash           text        NOT NULL,
    -- A changed definition waits here until a rebuild swaps it in.
    next_definition           jsonb,
    -- Settings from the catalog.
    batch_size                integer     NOT NULL DEFAULT 500,
    max_retries               integer     NOT NULL DEFAULT 3,
    retry_base_ms             integer     NOT NULL DEFAULT 100,
    retry_max_ms              integer     NOT NULL DEFAULT 10000,
    circuit_failure_threshold integer     NOT NULL DEFAULT 5,
    circuit_recovery_seconds  integer     NOT NULL DEFAULT 30,
    -- Checkpoint: everything before (transaction_id, global_position) in
    -- aura.read_all order has been applied, nothing after it.
    status                    text        NOT NULL DEFAULT 'running',
    transaction_id            xid8        NOT NULL DEFAULT '0',
    global_position           bigint      NOT NULL DEFAULT 0,
    events_applied            bigint      NOT NULL DEFAULT 0,
    last_applied_position     bigint,
    last_applied_recorded_at  timestamptz,
    -- Health.
    last_error                text,
    last_error_at             timestamptz,
    consecutive_failures      integer     NOT NULL DEFAULT 0,
    circuit_state             text        NOT NULL DEFAULT 'closed',
    circuit_open_until        timestamptz,
    owner                     text,
    owner_since               timestamptz,
    -- Taken afresh (aura.projection_generation) by every new row, reset and
    -- swap: a batch read before one of those must not be applied after it,
    -- even at an equal checkpoint (it was read with the replaced
    -- definition's event types, and its session may still resolve names to
    -- the replaced model).
    generation                bigint      NOT NULL
                                          DEFAULT nextval('aura.projection_generation'),
    -- A rebuild's shadow row names the projection it will replace.
    rebuild_of                text        REFERENCES aura.projection_checkpoints (name)
                                          ON DELETE CASCADE,
    created_at                timestamptz NOT NULL DEFAULT now(),
    updated_at                timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT projection_name_valid
        CHECK (name ~ '^[a-z][a-z0-9]*(_[a-z0-9]+)*(__rebuild)?$' AND char_length(name) <= 48),
    CONSTRAINT projection_schema_valid
        CHECK (schema_name ~ '^[a-z][a-z0-9]*(_[a-z0-9]+)*(__rebuild)?$'
               AND char_length(schema_name) <= 50),
    CONSTRAINT projection_handler_valid CHECK (handler ~ '^[a-z_][a-z0-9_]{0,62}$'),
    CONSTRAINT projection_forget_handler_valid
        CHECK (forget_handler IS NULL OR forget_handler ~ '^[a-z_][a-z0-9_]{0,62}$'),
    CONSTRAINT projection_handler_kind_valid CHECK (handler_kind IN ('per_event', 'set_based')),
    CONSTRAINT projection_status_valid
        CHECK (status IN ('running', 'paused', 'failed', 'rebuilding')),
    CONSTRAINT projection_circuit_state_valid
        CHECK (circuit_state IN ('closed', 'open', 'half_open')),
    CONSTRAINT projection_settings_valid
        CHECK (batch_size BETWEEN 1 AND 100000 AND max_retries BETWEEN 0 AND 100
               AND retry_base_ms BETWEEN 0 AND 3600000 AND retry_max_ms >= retry_base_ms
               AND circuit_failure_threshold >= 1 AND circuit_recovery_seconds >= 0),
    CONSTRAINT projection_rebuild_row_valid
        CHECK ((rebuild_of IS NULL) = (name !~ '__rebuild$'))
) WITH (fillfactor = 50);

ALTER SEQUENCE aura.projection_generation OWNED BY aura.projection_checkpoints.generation;

COMMENT ON TABLE aura.projection_checkpoints IS
    'One row per projection: definition, checkpoint, status, errors, circuit breaker and owner';

-- Events a projection could not apply after its retries: skipped, kept
-- here for an operator to retry (aura.retry_dead_letter) or skip.
CREATE TABLE aura.dead_letters (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    projection       text        NOT NULL,
    global_position  bigint      NOT NULL,
    transaction_id   xid8        NOT NULL,
    event_id         uuid        NOT NULL,
    stream_id        text        NOT NULL,
    event_type       text        NOT NULL,
    error            text        NOT NULL,
    error_sqlstate   text,
    attempts         integer     NOT NULL,
    first_failed_at  timestamptz NOT NULL,
    last_failed_at   timestamptz NOT NULL,
    status           text        NOT NULL DEFAULT 'pending',
    resolved_at      timestamptz,
    resolution_note  text,
    CONSTRAINT dead_letter_status_valid
        CHECK (status IN ('pending', 'retried', 'skipped', 'superseded'))
);

CREATE UNIQUE INDEX dead_letters_pending_key
    ON aura.dead_letters (projection, global_position) WHERE status = 'pending';

COMMENT ON TABLE aura.dead_letters IS
    'Events a projection skipped after its retries; retry or skip them with aura.retry_dead_letter / aura.skip_dead_letter';

-- sql/tables/outbox.sql
-- The transactional outbox: messages for external systems, written in the
-- transaction that produced them (an append, or a projection's batch), and
-- published by `aura-pg relay`, at least once, carrying message_id so that
-- receivers can drop duplicates.
CREATE TABLE aura.outbox (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sink             text        NOT NULL,
    topic            text        NOT NULL,
    message_id       uuid        NOT NULL,
    payload          jsonb       NOT NULL,
    headers          jsonb       NOT NULL DEFAULT '{}'::jsonb,
    global_position  bigint,
    status           text        NOT NULL DEFAULT 'pending',
    attempts         integer     NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    CONSTRAINT outbox_status_valid CHECK (status IN ('pending', 'delivered', 'dead')),
    CONSTRAINT outbox_headers_is_object CHECK (jsonb_typeof(headers) = 'object'),
    CONSTRAINT outbox_sink_valid CHECK (sink ~ '^[a-z][a-z0-9_]{0,62}$'),
    CONSTRAINT outbox_topic_valid
        CHECK (char_length(topic) BETWEEN 1 AND 255 AND topic !~ '[[:cntrl:]]'),
    CONSTRAINT outbox_message_once UNIQUE (sink, topic, message_id)
);

-- The relay's work queue: pending messages due now, oldest first.
CREATE INDEX outbox_pending_idx ON aura.outbox (next_attempt_at, id) WHERE status = 'pending';

COMMENT ON TABLE aura.outbox IS
    'Messages for external systems, written in the producing transaction, published by aura-pg relay';

-- Which appended events go to the outbox: every event whose type is in
-- event_types (NULL: all) is copied by a trigger on aura.events in the
-- append transaction. The trigger exists only while there is a route, so
-- appends pay nothing for an unused outbox.
CREATE TABLE aura.outbox_routes (
    name         text   PRIMARY KEY,
    event_types  text[],
    sink         text   NOT NULL,
    topic        text   NOT NULL,
    CONSTRAINT outbox_route_name_valid CHECK (name ~ '^[a-z][a-z0-9_]{0,62}$'),
    CONSTRAINT outbox_route_sink_valid CHECK (sink ~ '^[a-z][a-z0-9_]{0,62}$'),
    CONSTRAINT outbox_route_topic_valid
        CHECK (char_length(topic) BETWEEN 1 AND 255 AND topic !~ '[[:cntrl:]]')
);

COMMENT ON TABLE aura.outbox_routes IS
    'Event types copied into aura.outbox at append time; manage with aura.add_outbox_route';

-- sql/triggers/notify_events.sql
-- Wakes projector daemons: one NOTIFY aura_events per appending
-- transaction (Postgres folds identical notifications of a transaction into
-- one), delivered when it commits. Daemons also poll, so a lost
-- notification delays a projection by at most its poll interval.
--
-- A notifying transaction takes a cluster-wide lock from its pre-commit
-- until its commit ends, so notifying appends commit one at a time.
-- SET aura.notify = off in a session (or for a role) appends without it;
-- docs/performance.md ("The cost of NOTIFY") has the measured cost.
CREATE OR REPLACE FUNCTION aura.notify_events() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('aura.notify', true), '') <> 'off' THEN
        PERFORM pg_notify('aura_events', '');
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER events_notify
    AFTER INSERT ON aura.events
    FOR EACH STATEMENT EXECUTE FUNCTION aura.notify_events();

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

-- sql/functions/outbox.sql
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
CREATE OR REPLACE FUNCTION aura.publish_to_outbox(
    p_sink text, p_topic text, p_message_id uuid, p_payload jsonb,
    p_headers jsonb DEFAULT '{}'::jsonb, p_global_position bigint DEFAULT NULL
) RETURNS boolean
LANGUAGE plpgsql AS $$
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

