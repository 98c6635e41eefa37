-- Migration 0011, frozen: what it runs. Never edit this file: a change to
-- the schema is a new migration (docs/migrations.md).
--
-- Python processors: projection rows of kind 'python', whose handler is
-- Python code the daemon runs between aura.processor_batch and
-- aura.advance_processor in one transaction; partitions (NAME/INDEX rows)
-- and the handover of a repartition. SQL projections are unchanged.

ALTER TABLE aura.projection_checkpoints
    ADD COLUMN kind text NOT NULL DEFAULT 'sql',
    ADD COLUMN partition_index integer,
    ADD COLUMN partition_count integer,
    ADD COLUMN handover jsonb,
    ALTER COLUMN schema_name DROP NOT NULL,
    DROP CONSTRAINT projection_name_valid,
    DROP CONSTRAINT projection_schema_valid,
    DROP CONSTRAINT projection_handler_valid;
ALTER TABLE aura.projection_checkpoints
    ADD CONSTRAINT projection_name_valid
        CHECK (name ~ '^[a-z][a-z0-9]*(_[a-z0-9]+)*(__rebuild|__shadow|/[0-9]{1,2})?$'
               AND char_length(name) <= 48),
    ADD CONSTRAINT projection_kind_valid CHECK (kind IN ('sql', 'python')),
    ADD CONSTRAINT projection_schema_valid
        CHECK (CASE kind
                   WHEN 'sql' THEN schema_name ~ '^[a-z][a-z0-9]*(_[a-z0-9]+)*(__rebuild|__shadow)?$'
                                   AND char_length(schema_name) <= 50
                   ELSE schema_name IS NULL
               END),
    ADD CONSTRAINT projection_handler_valid
        CHECK (CASE kind
                   WHEN 'sql' THEN handler ~ '^[a-z_][a-z0-9_]{0,62}$'
                   ELSE handler ~ '^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$'
                        AND char_length(handler) <= 300
               END),
    ADD CONSTRAINT projection_partition_valid
        CHECK (CASE WHEN partition_count IS NULL
                    THEN partition_index IS NULL AND name !~ '/'
                    ELSE kind = 'python' AND partition_count BETWEEN 2 AND 64
                         AND partition_index BETWEEN 0 AND partition_count - 1
                         AND name ~ ('/' || partition_index || '$')
               END),
    ADD CONSTRAINT projection_python_row_valid
        CHECK (kind = 'sql' OR rebuild_of IS NULL AND shadow_of IS NULL AND forget_handler IS NULL);

-- sql/functions/processors.sql
-- Python processors: projections whose handler is Python code the daemon
-- runs (projections/catalog.yaml, kind: python). A batch is one
-- transaction on the daemon's connection:
--
--   SELECT * FROM aura.processor_batch(name, tx, pos, limit, generation);  -- the events
--   ... the handler writes through the same connection ...
--   SELECT aura.advance_processor(name, tx, pos, next_tx, next_pos, ...);  -- the checkpoint
--   COMMIT;
--
-- so what the handler wrote and the checkpoint that consumed its events
-- commit together, or neither does. aura.advance_processor locks the row
-- and compares the checkpoint and generation: a batch another daemon (or
-- an operator) overtook is refused (AU006) and rolled back, handler writes
-- included.
--
-- A processor may run in partitions (NAME/0 .. NAME/N-1), each with its own
-- row, checkpoint and ownership; a stream's events all go to one partition,
-- so they stay in order.

-- The partition of a stream among p_partitions: the first 32 bits of the
-- md5 of its id, modulo p_partitions. Stable across Postgres versions and
-- platforms (aura_pg.processors.partition_of computes the same).
CREATE OR REPLACE FUNCTION aura.stream_partition(p_stream_id text, p_partitions integer)
RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT (('x' || left(md5(p_stream_id), 8))::bit(32)::bigint % p_partitions)::integer
$$;

-- Whether an event was applied before the processor was repartitioned:
-- p_handover is the row's handover ({"count": N, "checkpoints": [[tx, pos],
-- ...]}), the previous partitions' checkpoints; the event's stream was in
-- partition stream_partition(stream, N) then, which had applied everything
-- up to its checkpoint.
CREATE OR REPLACE FUNCTION aura.handed_over(
    p_handover jsonb, p_stream_id text, p_transaction_id xid8, p_position bigint
) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT p_handover IS NOT NULL AND (p_transaction_id, p_position) <= (
        (p_handover #>> ARRAY['checkpoints', o.old::text, '0'])::xid8,
        (p_handover #>> ARRAY['checkpoints', o.old::text, '1'])::bigint)
    FROM (SELECT aura.stream_partition(p_stream_id, (p_handover ->> 'count')::integer) AS old) AS o
$$;

-- The events a projection's row reads next, in aura.read_all's gap-free
-- order: of its types, of its partition's streams, not handed over.
CREATE OR REPLACE FUNCTION aura.read_projection(
    p_row aura.projection_checkpoints, p_limit integer
) RETURNS SETOF aura.events
LANGUAGE sql STABLE AS $$
    SELECT e.*
    FROM aura.events e
    WHERE (e.transaction_id, e.global_position) > (p_row.transaction_id, p_row.global_position)
      AND e.transaction_id < pg_snapshot_xmin(pg_current_snapshot())
      AND (p_row.event_types IS NULL OR e.type = ANY (p_row.event_types))
      AND (p_row.partition_count IS NULL
           OR aura.stream_partition(e.stream_id, p_row.partition_count) = p_row.partition_index)
      AND NOT (p_row.handover IS NOT NULL
               AND aura.handed_over(p_row.handover, e.stream_id, e.transaction_id,
                                    e.global_position))
    ORDER BY e.transaction_id, e.global_position
    LIMIT p_limit
$$;

-- The rows of processor p_name: NAME, or NAME/0 .. NAME/N-1, in order.
CREATE OR REPLACE FUNCTION aura.processor_rows(p_name text)
RETURNS SETOF aura.projection_checkpoints
LANGUAGE sql STABLE AS $$
    SELECT c.* FROM aura.projection_checkpoints c
    WHERE c.kind = 'python' AND split_part(c.name, '/', 1) = p_name
    ORDER BY c.partition_index NULLS FIRST
$$;

-- Creates or updates a Python processor from its catalog entry: one row,
-- or one per partition. Returns 'created', 'unchanged' or 'changed' (the
-- handler or the event types: in effect at once, from the checkpoint on).
-- AU007 when the name is a SQL projection's, or when the processor runs in
-- another number of partitions (aura.repartition_processor changes it).
CREATE OR REPLACE FUNCTION aura.register_processor(
    p_name                      text,
    p_description               text,
    p_handler                   text,
    p_event_types               text[],
    p_partitions                integer,
    p_batch_size                integer,
    p_max_retries               integer,
    p_retry_base_ms             integer,
    p_retry_max_ms              integer,
    p_circuit_failure_threshold integer,
    p_circuit_recovery_seconds  integer
) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_hash     text := md5(jsonb_build_object('kind', 'python', 'handler', p_handler,
                                              'event_types', to_jsonb(p_event_types))::text);
    v_existing integer;
    v_count    integer;
    v_changed  boolean;
BEGIN
    IF p_name IS NULL OR p_name !~ '^[a-z][a-z0-9]*(_[a-z0-9]+)*$' OR char_length(p_name) > 40 THEN
        RAISE EXCEPTION 'invalid processor name %: lower-case letters, digits and single underscores, at most 40',
            coalesce(quote_literal(p_name), 'NULL') USING ERRCODE = 'AU007';
    END IF;
    IF p_partitions IS NULL OR p_partitions NOT BETWEEN 1 AND 64 THEN
        RAISE EXCEPTION 'processor %: partitions must be between 1 and 64, not %', p_name,
            coalesce(p_partitions::text, 'NULL') USING ERRCODE = 'AU007';
    END IF;
    PERFORM pg_advisory_xact_lock(1635087457, hashtext('register:' || p_name));
    IF EXISTS (SELECT 1 FROM aura.projection_checkpoints c
               WHERE c.kind = 'sql' AND (c.name = p_name OR c.shadow_of = p_name
                                         OR c.rebuild_of = p_name)) THEN
        RAISE EXCEPTION '% is a SQL projection, not a Python processor', quote_literal(p_name)
            USING ERRCODE = 'AU007',
                  HINT = 'Give the processor another name, or drop the projection first.';
    END IF;
    SELECT count(*), max(coalesce(c.partition_count, 1)) INTO v_existing, v_count
    FROM aura.processor_rows(p_name) AS c;
    IF v_existing = 0 THEN
        INSERT INTO aura.projection_checkpoints (
            name, description, schema_name, handler, handler_kind, event_types, definition_sql,
            definition_hash, batch_size, max_retries, retry_base_ms, retry_max_ms,
            circuit_failure_threshold, circuit_recovery_seconds, kind, partition_index,
            partition_count)
        SELECT CASE WHEN p_partitions = 1 THEN p_name ELSE p_name || '/' || i END,
               coalesce(p_description, ''), NULL, p_handler, 'set_based', p_event_types, '',
               v_hash, p_batch_size, p_max_retries, p_retry_base_ms, p_retry_max_ms,
               p_circuit_failure_threshold, p_circuit_recovery_seconds, 'python',
               CASE WHEN p_partitions > 1 THEN i END, CASE WHEN p_partitions > 1 THEN p_partitions END
        FROM generate_series(0, p_partitions - 1) AS i;
        RETURN 'created';
    END IF;
    IF v_count <> p_partitions THEN
        RAISE EXCEPTION 'processor % runs in % partitions, not %', p_name, v_count, p_partitions
            USING ERRCODE = 'AU007',
                  HINT = format('`aura-pg projections repartition %s` hands its streams over to %s partitions without skipping or repeating an event.',
                                p_name, p_partitions);
    END IF;
    SELECT bool_or(c.definition_hash <> v_hash) INTO v_changed FROM aura.processor_rows(p_name) AS c;
    UPDATE aura.projection_checkpoints c
       SET description = coalesce(p_description, ''),
           handler = p_handler, event_types = p_event_types, definition_hash = v_hash,
           batch_size = p_batch_size, max_retries = p_max_retries,
           retry_base_ms = p_retry_base_ms, retry_max_ms = p_retry_max_ms,
           circuit_failure_threshold = p_circuit_failure_threshold,
           circuit_recovery_seconds = p_circuit_recovery_seconds,
           updated_at = now()
     WHERE c.kind = 'python' AND split_part(c.name, '/', 1) = p_name;
    RETURN CASE WHEN v_changed THEN 'changed' ELSE 'unchanged' END;
END;
$$;

-- The next batch of a Python processor: its events after the checkpoint
-- the caller holds (p_expected_*: AU006 when the row is elsewhere, or of
-- another generation), at most p_limit (NULL: its batch size; 1 while the
-- circuit is half-open). Each row is one event, in apply order, with the
-- checkpoint to advance to after the batch (the last event's, or the read
-- horizon when the batch holds all there is), caught_up and the status;
-- with no event, a single row whose event columns are NULL. Paused
-- processors and open circuits get no event. idle: nothing to apply and
-- nothing to record (aura.advance_processor need not be called).
-- Reads only: the row is locked by aura.advance_processor, so a handler
-- that only talks to other services takes no transaction id until then.
CREATE OR REPLACE FUNCTION aura.processor_batch(
    p_name                    text,
    p_expected_transaction_id xid8,
    p_expected_position       bigint,
    p_limit                   integer DEFAULT NULL,
    p_expected_generation     bigint  DEFAULT NULL
) RETURNS TABLE (next_transaction_id xid8, next_position bigint, caught_up boolean,
                 status text, idle boolean,
                 global_position bigint, transaction_id xid8, event_id uuid, stream_id text,
                 version bigint, type text, data jsonb, metadata jsonb, idempotency_key text,
                 recorded_at timestamptz)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_row         aura.projection_checkpoints;
    v_limit       integer;
    v_events      aura.events[];
    v_count       integer;
    v_horizon_tx  xid8;
    v_horizon_pos bigint;
    v_tx          xid8;
    v_pos         bigint;
    v_idle        boolean;
BEGIN
    SELECT * INTO v_row FROM aura.projection_checkpoints c WHERE c.name = p_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown projection %', coalesce(quote_literal(p_name), 'NULL')
            USING ERRCODE = 'AU005';
    END IF;
    IF v_row.kind <> 'python' THEN
        RAISE EXCEPTION '% is a SQL projection: aura.project_batch applies it', quote_literal(p_name)
            USING ERRCODE = 'AU007';
    END IF;
    PERFORM aura.check_checkpoint(v_row, p_expected_transaction_id, p_expected_position);
    PERFORM aura.check_generation(v_row, p_expected_generation);
    IF v_row.status = 'paused'
       OR v_row.circuit_state = 'open' AND v_row.circuit_open_until > clock_timestamp() THEN
        RETURN QUERY SELECT v_row.transaction_id, v_row.global_position, false, v_row.status, true,
            NULL::bigint, NULL::xid8, NULL::uuid, NULL::text, NULL::bigint, NULL::text,
            NULL::jsonb, NULL::jsonb, NULL::text, NULL::timestamptz;
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
          FROM aura.read_projection(v_row, v_limit) AS e) AS b
    LEFT JOIN LATERAL aura.read_horizon() AS h ON true;

    IF v_count = v_limit THEN
        v_tx := v_events[v_count].transaction_id;
        v_pos := v_events[v_count].global_position;
    ELSIF v_horizon_tx IS NOT NULL
          AND (v_horizon_tx, v_horizon_pos) > (v_row.transaction_id, v_row.global_position) THEN
        -- Nothing else of ours up to the horizon: checkpoint there.
        v_tx := v_horizon_tx;
        v_pos := v_horizon_pos;
    ELSE
        v_tx := v_row.transaction_id;
        v_pos := v_row.global_position;
    END IF;
    v_idle := v_count = 0 AND (v_tx, v_pos) = (v_row.transaction_id, v_row.global_position)
              AND v_row.consecutive_failures = 0 AND v_row.circuit_state = 'closed'
              AND v_row.status <> 'failed';
    IF v_count = 0 THEN
        RETURN QUERY SELECT v_tx, v_pos, true, v_row.status, v_idle,
            NULL::bigint, NULL::xid8, NULL::uuid, NULL::text, NULL::bigint, NULL::text,
            NULL::jsonb, NULL::jsonb, NULL::text, NULL::timestamptz;
        RETURN;
    END IF;
    RETURN QUERY
    SELECT v_tx, v_pos, v_count < v_limit, v_row.status, false,
           u.global_position, u.transaction_id, u.event_id, u.stream_id, u.version, u.type,
           u.data, u.metadata, u.idempotency_key, u.recorded_at
    FROM unnest(v_events) WITH ORDINALITY AS u
    ORDER BY u.ordinality;
END;
$$;

-- Advances a Python processor's checkpoint after its handler ran, in the
-- handler's transaction: AU006 (and the caller rolls back, handler writes
-- included) unless the row is still at the checkpoint and generation the
-- batch was read at. Like aura.project_batch, a batch that is recorded
-- ends a run of failures. A processor paused while its batch ran keeps the
-- batch and stays paused. Returns the status.
CREATE OR REPLACE FUNCTION aura.advance_processor(
    p_name                    text,
    p_expected_transaction_id xid8,
    p_expected_position       bigint,
    p_transaction_id          xid8,
    p_position                bigint,
    p_owner                   text,
    p_expected_generation     bigint,
    p_applied                 integer,
    p_last_position           bigint,
    p_last_recorded_at        timestamptz
) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_row aura.projection_checkpoints;
BEGIN
    v_row := aura.lock_projection(p_name);
    PERFORM aura.check_checkpoint(v_row, p_expected_transaction_id, p_expected_position);
    PERFORM aura.check_generation(v_row, p_expected_generation);
    IF v_row.kind <> 'python' THEN
        RAISE EXCEPTION '% is a SQL projection: aura.project_batch applies it', quote_literal(p_name)
            USING ERRCODE = 'AU007';
    END IF;
    IF (p_transaction_id, p_position) < (v_row.transaction_id, v_row.global_position)
       OR p_applied < 0 THEN
        RAISE EXCEPTION 'processor % cannot move back from %/% to %/%', quote_literal(p_name),
            v_row.transaction_id, v_row.global_position, p_transaction_id, p_position
            USING ERRCODE = 'AU007';
    END IF;
    UPDATE aura.projection_checkpoints c
       SET transaction_id = p_transaction_id,
           global_position = p_position,
           events_applied = c.events_applied + p_applied,
           last_applied_position = coalesce(p_last_position, c.last_applied_position),
           last_applied_recorded_at = coalesce(p_last_recorded_at, c.last_applied_recorded_at),
           consecutive_failures = 0,
           last_error = NULL,
           last_error_at = NULL,
           circuit_state = 'closed',
           circuit_open_until = NULL,
           status = CASE WHEN c.status = 'failed' THEN 'running' ELSE c.status END,
           owner = coalesce(p_owner, c.owner),
           owner_since = CASE WHEN p_owner IS DISTINCT FROM c.owner AND p_owner IS NOT NULL
                              THEN now() ELSE c.owner_since END,
           updated_at = now()
     WHERE c.name = p_name
    RETURNING c.status INTO v_row.status;
    RETURN v_row.status;
END;
$$;

-- A Python processor's dead letter, to be applied again by its handler
-- (`aura-pg dlq retry`, which then calls aura.dead_letter_retried in the
-- same transaction): locks the row and the letter, checks it is pending,
-- and returns its event.
CREATE OR REPLACE FUNCTION aura.processor_dead_letter(p_id bigint) RETURNS SETOF aura.events
LANGUAGE plpgsql AS $$
DECLARE
    v_letter aura.dead_letters;
    v_row    aura.projection_checkpoints;
BEGIN
    SELECT * INTO v_letter FROM aura.dead_letters d WHERE d.id = p_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown dead letter %', p_id USING ERRCODE = 'AU005';
    END IF;
    v_row := aura.lock_projection(v_letter.projection);
    IF v_row.kind <> 'python' THEN
        RAISE EXCEPTION 'dead letter % is of SQL projection %: aura.retry_dead_letter applies it',
            p_id, quote_literal(v_row.name) USING ERRCODE = 'AU007';
    END IF;
    SELECT * INTO v_letter FROM aura.dead_letters d WHERE d.id = p_id FOR UPDATE;
    IF v_letter.status <> 'pending' THEN
        RAISE EXCEPTION 'dead letter % is %, not pending', p_id, v_letter.status USING ERRCODE = 'AU007';
    END IF;
    RETURN QUERY SELECT e.* FROM aura.events e WHERE e.global_position = v_letter.global_position;
END;
$$;

-- Marks a Python processor's dead letter retried: its handler applied the
-- event in this transaction (after aura.processor_dead_letter).
CREATE OR REPLACE FUNCTION aura.dead_letter_retried(p_id bigint) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_letter aura.dead_letters;
BEGIN
    UPDATE aura.dead_letters d
       SET status = 'retried', resolved_at = now(), resolution_note = 'applied by aura-pg dlq retry'
     WHERE d.id = p_id AND d.status = 'pending'
    RETURNING * INTO v_letter;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'dead letter % is not pending', p_id USING ERRCODE = 'AU007';
    END IF;
    UPDATE aura.projection_checkpoints c SET events_applied = c.events_applied + 1, updated_at = now()
     WHERE c.name = v_letter.projection;
    RETURN 'retried';
END;
$$;

-- The events of one stream a Python processor has applied, from
-- p_from_version (dead letters not retried left out), for its handler to
-- apply again (`aura-pg projections replay`); locks the row meanwhile.
CREATE OR REPLACE FUNCTION aura.processor_replay_events(
    p_name text, p_stream_id text, p_from_version bigint DEFAULT 1
) RETURNS SETOF aura.events
LANGUAGE plpgsql AS $$
DECLARE
    v_row aura.projection_checkpoints;
BEGIN
    v_row := aura.lock_projection(p_name);
    IF v_row.kind <> 'python' THEN
        RAISE EXCEPTION '% is a SQL projection: aura.replay_stream replays it', quote_literal(p_name)
            USING ERRCODE = 'AU007';
    END IF;
    IF v_row.partition_count IS NOT NULL
       AND aura.stream_partition(p_stream_id, v_row.partition_count) <> v_row.partition_index THEN
        RAISE EXCEPTION 'stream % is not in partition %', quote_literal(p_stream_id), quote_literal(p_name)
            USING ERRCODE = 'AU007',
                  HINT = format('It is in %s/%s.', split_part(p_name, '/', 1),
                                aura.stream_partition(p_stream_id, v_row.partition_count));
    END IF;
    RETURN QUERY
    SELECT e.* FROM aura.events e
    WHERE e.stream_id = p_stream_id AND e.version >= p_from_version
      AND (v_row.event_types IS NULL OR e.type = ANY (v_row.event_types))
      AND ((e.transaction_id, e.global_position) <= (v_row.transaction_id, v_row.global_position)
           OR aura.handed_over(v_row.handover, e.stream_id, e.transaction_id, e.global_position))
      AND NOT EXISTS (SELECT 1 FROM aura.dead_letters d
                      WHERE d.projection = p_name AND d.global_position = e.global_position
                        AND d.status IN ('pending', 'skipped'))
    ORDER BY e.version;
END;
$$;

-- Splits processor p_name into p_partitions partitions (1: none), without
-- skipping or repeating an event: every new partition starts from the
-- lowest checkpoint of the old ones and skips, per stream, what the old
-- partition of that stream had applied (the handover). The old rows go;
-- daemons still running them stop (AU005) and must be restarted with the
-- catalog that says p_partitions. Dead letters follow their streams.
-- AU007 while a partition has not yet caught up past a previous
-- repartition's handover.
CREATE OR REPLACE FUNCTION aura.repartition_processor(p_name text, p_partitions integer) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_rows     aura.projection_checkpoints[];
    v_first    aura.projection_checkpoints;
    v_old      integer;
    v_handover jsonb;
    v_start    aura.projection_checkpoints;
    v_pending  text;
    v_paused   boolean;
BEGIN
    IF p_partitions IS NULL OR p_partitions NOT BETWEEN 1 AND 64 THEN
        RAISE EXCEPTION 'processor %: partitions must be between 1 and 64, not %', p_name,
            coalesce(p_partitions::text, 'NULL') USING ERRCODE = 'AU007';
    END IF;
    PERFORM pg_advisory_xact_lock(1635087457, hashtext('register:' || p_name));
    PERFORM 1 FROM aura.projection_checkpoints c
     WHERE c.kind = 'python' AND split_part(c.name, '/', 1) = p_name FOR UPDATE;
    SELECT array_agg(c ORDER BY c.partition_index NULLS FIRST) INTO v_rows
    FROM aura.processor_rows(p_name) AS c;
    IF v_rows IS NULL THEN
        RAISE EXCEPTION 'unknown processor %', quote_literal(p_name) USING ERRCODE = 'AU005';
    END IF;
    v_first := v_rows[1];
    v_paused := (SELECT bool_and(r.status = 'paused') FROM unnest(v_rows) AS r);
    v_old := coalesce(v_first.partition_count, 1);
    IF v_old = p_partitions THEN
        RETURN 'unchanged';
    END IF;
    SELECT string_agg(r.name, ', ') INTO v_pending
    FROM unnest(v_rows) AS r
    WHERE r.handover IS NOT NULL AND EXISTS (
        SELECT 1 FROM jsonb_array_elements(r.handover -> 'checkpoints') AS h(cp)
        WHERE ((h.cp ->> 0)::xid8, (h.cp ->> 1)::bigint) > (r.transaction_id, r.global_position));
    IF v_pending IS NOT NULL THEN
        RAISE EXCEPTION 'processor %: % not yet past the previous repartition', quote_literal(p_name), v_pending
            USING ERRCODE = 'AU007', HINT = 'Let them catch up, then repartition.';
    END IF;
    SELECT r.* INTO v_start FROM unnest(v_rows) AS r
    ORDER BY r.transaction_id, r.global_position LIMIT 1;
    v_handover := jsonb_build_object(
        'count', v_old,
        'checkpoints', (SELECT jsonb_agg(jsonb_build_array(r.transaction_id::text, r.global_position)
                                         ORDER BY r.partition_index NULLS FIRST)
                        FROM unnest(v_rows) AS r));
    DELETE FROM aura.projection_checkpoints c
     WHERE c.kind = 'python' AND split_part(c.name, '/', 1) = p_name;
    INSERT INTO aura.projection_checkpoints (
        name, description, schema_name, handler, handler_kind, event_types, definition_sql,
        definition_hash, batch_size, max_retries, retry_base_ms, retry_max_ms,
        circuit_failure_threshold, circuit_recovery_seconds, kind, partition_index,
        partition_count, transaction_id, global_position, handover, status)
    SELECT CASE WHEN p_partitions = 1 THEN p_name ELSE p_name || '/' || i END,
           v_first.description, NULL, v_first.handler, 'set_based', v_first.event_types, '',
           v_first.definition_hash, v_first.batch_size, v_first.max_retries,
           v_first.retry_base_ms, v_first.retry_max_ms, v_first.circuit_failure_threshold,
           v_first.circuit_recovery_seconds, 'python',
           CASE WHEN p_partitions > 1 THEN i END, CASE WHEN p_partitions > 1 THEN p_partitions END,
           v_start.transaction_id, v_start.global_position, v_handover,
           -- A processor paused as a whole stays paused.
           CASE WHEN v_paused THEN 'paused' ELSE 'running' END
    FROM generate_series(0, p_partitions - 1) AS i;
    UPDATE aura.dead_letters d
       SET projection = CASE WHEN p_partitions = 1 THEN p_name
                             ELSE p_name || '/' || aura.stream_partition(d.stream_id, p_partitions) END
     WHERE d.projection = ANY (SELECT r.name FROM unnest(v_rows) AS r);
    PERFORM pg_notify('aura_events', '');
    RETURN 'repartitioned';
END;
$$;

-- Changed: a Python processor's name is not a SQL projection's; dead
-- letters, reset, retry, replay and rebuild know the kind; the next event
-- is read through aura.read_projection (types, partition, handover).
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

-- sql/views/projection_status.sql: a partition counts its own streams; kind added
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
       END                                                  AS owner_alive,
       c.kind
FROM aura.projection_checkpoints c
CROSS JOIN LATERAL (
    SELECT ('x' || left(md5('aura-pg projection:' || c.name), 16))::bit(64)::bigint AS lock_key
) AS k
CROSS JOIN LATERAL (
    SELECT count(*) AS events, min(e.recorded_at) AS oldest
    FROM aura.events e
    WHERE (e.transaction_id, e.global_position) > (c.transaction_id, c.global_position)
      AND (c.event_types IS NULL OR e.type = ANY (c.event_types))
      AND (c.partition_count IS NULL
           OR aura.stream_partition(e.stream_id, c.partition_count) = c.partition_index)
      AND NOT (c.handover IS NOT NULL
               AND aura.handed_over(c.handover, e.stream_id, e.transaction_id, e.global_position))
) AS behind
ORDER BY c.name;

COMMENT ON VIEW aura.projection_status IS
    'Projections: status, circuit, owner, checkpoint, backlog, errors and dead letters';

-- The new functions' owner and privileges, as roles/grants.sql gives them.
DO $$
DECLARE
    v_owner     text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'owner');
    v_projector text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'projector');
    v_reader    text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'reader');
    r record;
BEGIN
    FOR r IN SELECT p.oid::regprocedure AS fn FROM pg_catalog.pg_proc p
             WHERE p.pronamespace = 'aura'::regnamespace
               AND p.proname IN ('stream_partition', 'handed_over', 'read_projection',
                                 'processor_rows', 'register_processor', 'processor_batch',
                                 'advance_processor', 'processor_dead_letter',
                                 'dead_letter_retried', 'processor_replay_events',
                                 'repartition_processor')
             ORDER BY p.oid LOOP
        EXECUTE format('ALTER ROUTINE %s OWNER TO %I', r.fn, v_owner);
        EXECUTE format('REVOKE EXECUTE ON ROUTINE %s FROM PUBLIC', r.fn);
        EXECUTE format('GRANT EXECUTE ON ROUTINE %s TO %I', r.fn, v_projector);
    END LOOP;
    -- aura.projection_status counts a partition's backlog with these.
    EXECUTE format('GRANT EXECUTE ON FUNCTION aura.stream_partition(text, integer), '
                   'aura.handed_over(jsonb, text, xid8, bigint) TO %I', v_reader);
END
$$;
