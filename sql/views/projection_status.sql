-- One row per projection (rebuild shadows included) and per Python
-- processor partition (kind 'python', NAME/INDEX) for operators:
--   SELECT * FROM aura.projection_status;
-- events_behind counts the events of the projection's types after its
-- checkpoint; seconds_behind is how long the oldest of them has waited
-- (0 when caught up), so it keeps growing while a projection is stuck.
-- owner_alive: whether a session holds the projection's ownership lock
-- (the daemon's advisory lock, keyed as in queries/projector.sql
-- "try_lock"; pg_locks shows a bigint key's high half in classid, its low
-- half in objid, with objsubid 1); NULL when no owner is recorded. An
-- owner named but not alive is a daemon that died: another one takes over
-- when it polls. consecutive_failures, last_error and last_error_at
-- describe the current run of failures: the batch that ends it clears them
-- (aura.project_batch); a dead-lettered event keeps its error in
-- aura.dead_letters.
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
