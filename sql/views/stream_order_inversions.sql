-- Streams whose events a global reader meets out of version order: an event
-- whose (transaction_id, global_position) is below that of the version
-- before it. aura.append_events cannot record such a pair (its per-stream
-- append lock and stream-head check); a log written by a release before
-- migration 0009 may hold some (concurrent appends with expected version
-- 'any', or appends inside a transaction that had written before). Every
-- projection that folds such a stream applied those events
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
-- reader.
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
