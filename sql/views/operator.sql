-- More of the psql operator surface (docs/operators.md).
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

-- The owner's; the projector reads and runs them, the reader reads the view.
DO $$
DECLARE
    v_owner     text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'owner');
    v_projector text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'projector');
    v_reader    text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'reader');
BEGIN
    EXECUTE format('ALTER FUNCTION aura.list_dead_letters(text, text) OWNER TO %I', v_owner);
    EXECUTE format('ALTER VIEW aura.stream_categories OWNER TO %I', v_owner);
    REVOKE ALL ON aura.stream_categories FROM PUBLIC;
    REVOKE EXECUTE ON FUNCTION aura.list_dead_letters(text, text) FROM PUBLIC;
    EXECUTE format('GRANT EXECUTE ON FUNCTION aura.list_dead_letters(text, text) TO %I', v_projector);
    EXECUTE format('GRANT SELECT ON aura.stream_categories TO %I, %I', v_projector, v_reader);
END
$$;
