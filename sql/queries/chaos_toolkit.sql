-- Probes of the Chaos Toolkit functions (aura_pg.chaos.toolkit): read-only
-- looks at the store, the projections and their owners, for the steady
-- state hypotheses of the experiments in deploy/chaos/. Each starts at a
-- "-- name:" line.

-- name: session
-- A probe answers quickly or fails; it never waits behind a batch for long.
SELECT set_config('statement_timeout', '15s', false),
       set_config('lock_timeout', '5s', false);

-- name: ping
SELECT 1;

-- name: projections
-- The live projections (rebuild shadows excluded), all or the named ones,
-- with their backlog and health.
SELECT s.name, s.status, s.circuit, s.owner, s.events_applied, s.events_behind,
       s.seconds_behind::float8 AS seconds_behind, s.consecutive_failures,
       s.dead_letters, s.last_error
  FROM aura.projection_status s
 WHERE s.rebuild_of IS NULL
   AND (%(names)s::text[] IS NULL OR s.name = ANY (%(names)s::text[]))
 ORDER BY s.name;

-- name: owners
-- Who runs each live projection: its owner row, and whether a session holds
-- its ownership lock (the daemon's advisory lock, keyed as in
-- queries/projector.sql "try_lock"; pg_locks shows a bigint key's high half
-- in classid and its low half in objid, with objsubid 1).
SELECT c.name, c.owner,
       EXISTS (
           SELECT 1 FROM pg_locks l
            WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
              AND l.database = (SELECT d.oid FROM pg_database d
                                 WHERE d.datname = current_database())
              AND l.classid::bigint = (k.lock_key >> 32) & 4294967295
              AND l.objid::bigint = k.lock_key & 4294967295
       ) AS locked
  FROM aura.projection_checkpoints c
 CROSS JOIN LATERAL (
     SELECT ('x' || left(md5('aura-pg projection:' || c.name), 16))::bit(64)::bigint AS lock_key
 ) k
 WHERE c.rebuild_of IS NULL
   AND (%(names)s::text[] IS NULL OR c.name = ANY (%(names)s::text[]))
 ORDER BY c.name;

-- name: pending_dead_letters
-- Pending dead letters, of one projection or all, with whether their event
-- is one that the failure injector appended as poison on purpose.
SELECT d.id, d.projection, d.global_position, d.event_id::text AS event_id, d.stream_id,
       d.event_type, d.attempts, d.error,
       coalesce(e.metadata ->> 'aura_chaos' = 'poison', false) AS poison,
       extract(epoch FROM now() - d.first_failed_at)::float8 AS age_seconds
  FROM aura.dead_letters d
  LEFT JOIN aura.events e ON e.global_position = d.global_position
 WHERE d.status = 'pending'
   AND (%(projection)s::text IS NULL OR d.projection = %(projection)s)
 ORDER BY d.id;

-- name: stream_events
-- The events of some streams (a chaos writer's own), to check that every
-- append it was told succeeded is recorded, once, where it was told.
SELECT e.event_id::text AS event_id, e.global_position
  FROM aura.events e
 WHERE e.stream_id = ANY (%(streams)s::text[]);
