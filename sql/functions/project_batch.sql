-- Applies the next batch of a projection and advances its checkpoint, in
-- the caller's transaction. The caller names the checkpoint it holds, and
-- the generation it read with it (p_expected_generation, NULL: none); if
-- the projection is elsewhere (another owner, an operator) or was
-- replaced since (generations never repeat: a restarted shadow or rebuild,
-- a reset, a swap takes a new one), AU006 and nothing is applied. Returns
-- how many events were applied, the new checkpoint, whether the projection
-- has caught up, and its status. Paused projections and open circuits
-- apply nothing; once an open circuit's recovery time has passed, one
-- event is tried (half-open). A batch that is applied ends a run of
-- failures: the count goes back to 0, the circuit closes, and last_error
-- is cleared (a dead-lettered event keeps its error in aura.dead_letters).
--
-- It also returns what it applied, so the daemon can count, time and trace
-- each event without reading it again: the applied events' types and
-- recording times, and, when p_trace is true, their ids, streams, versions
-- and traceparents (metadata->>'traceparent', the W3C trace context of the
-- span that appended each). The arrays are gathered in the same pass that
-- reads the batch; those of one call are in the same order (not
-- necessarily the apply order), and NULL when nothing was applied.
--
--   SELECT applied, transaction_id, global_position, caught_up, status
--   FROM aura.project_batch('stream_summary', '0', 0);
--
-- With aura.debug = on it explains each call in a NOTICE: why nothing was
-- applied, or what was applied and where the checkpoint went.
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
