-- What the daemons' /metrics and /ready read from the database at each
-- scrape, so every daemon reports the same values. Each starts at a
-- "-- name:" line; loaded once at import.

-- name: projections
-- Per projection (rebuild and shadow rows included): status, circuit, lag
-- in seconds (how long the oldest event of its types it has not applied
-- has waited; 0 when caught up), events behind, checkpoint, pending dead
-- letters. From the view only, so the reader role sees them too.
SELECT s.name, s.status, s.circuit, coalesce(s.seconds_behind, 0)::float8,
       s.events_behind, split_part(s.checkpoint, '/', 2)::bigint, s.dead_letters
FROM aura.projection_status s;

-- name: store
-- The newest global position (its rate is the append rate of every writer),
-- and the age of the oldest open writing transaction or prepared
-- transaction: gap-free reads stop below it, so it holds every projector back.
SELECT (SELECT max(e.global_position) FROM aura.events e),
       extract(epoch FROM now() - least(
           (SELECT min(a.xact_start) FROM pg_stat_activity a
            WHERE a.backend_xid IS NOT NULL AND a.pid <> pg_backend_pid()),
           (SELECT min(p.prepared) FROM pg_prepared_xacts p)))::float8;

-- name: outbox
-- Backlog per sink and topic: pending rows, dead rows, oldest pending age;
-- every routed sink and topic appears, with zeros when nothing waits.
WITH backlog AS (
    SELECT o.sink, o.topic,
           count(*) FILTER (WHERE o.status = 'pending') AS pending,
           count(*) FILTER (WHERE o.status = 'dead') AS dead,
           min(o.created_at) FILTER (WHERE o.status = 'pending') AS oldest_pending_at
    FROM aura.outbox o
    WHERE o.status IN ('pending', 'dead')
    GROUP BY o.sink, o.topic
), endpoints AS (
    SELECT r.sink, r.topic FROM aura.outbox_routes r
    UNION
    SELECT b.sink, b.topic FROM backlog b
)
SELECT e.sink, e.topic, coalesce(b.pending, 0), coalesce(b.dead, 0),
       extract(epoch FROM now() - b.oldest_pending_at)::float8
FROM endpoints e
LEFT JOIN backlog b ON b.sink = e.sink AND b.topic = e.topic
ORDER BY e.sink, e.topic;

-- name: debate_schema
-- Where the agent_performance read model lives, if it is installed.
SELECT c.schema_name
FROM aura.projection_checkpoints c
WHERE c.name = 'agent_performance' AND c.rebuild_of IS NULL
  AND to_regclass(quote_ident(c.schema_name) || '.active_debate_count') IS NOT NULL;

-- name: revision
-- Readiness of a daemon that runs no projection (the relay, the importer,
-- perhaps as the writer role): the schema revision, which every role reads.
SELECT (SELECT v.version_num FROM aura.alembic_version v LIMIT 1), '{}'::text[];

-- name: ready
-- Readiness: the schema revision, and this daemon's projections that failed.
SELECT (SELECT v.version_num FROM aura.alembic_version v LIMIT 1),
       coalesce((SELECT array_agg(c.name ORDER BY c.name) FROM aura.projection_checkpoints c
                 WHERE c.status = 'failed' AND c.name = ANY (%(projections)s::text[])),
                '{}');

-- name: debates
-- Active debates and the consensus rate over the last 5 minutes and the
-- last hour (NULL when no debate ended). {schema} is the agent_performance
-- read model's schema, quoted by the caller.
SELECT (SELECT a.active_debates FROM {schema}.active_debate_count a)::float8,
       (SELECT round(count(*) FILTER (WHERE d.ending = 'consensus')::numeric
                     / nullif(count(*), 0), 4)
        FROM {schema}.debate_endings d
        WHERE d.time > now() - interval '5 minutes')::float8,
       (SELECT r.consensus_rate FROM {schema}.consensus_rate_last_hour r)::float8;

-- name: session_settings
-- The metrics connection: read-only, and bounded so a slow database makes
-- a slow scrape, not a hung one.
SELECT set_config('statement_timeout', '5000', false),
       set_config('lock_timeout', '1000', false),
       set_config('default_transaction_read_only', 'on', false);

-- name: shadows
-- Per projection with a shadow (migration 0007): the shadow's lag in
-- seconds, and the rows that differed at the last aura.diff_shadow (NULL
-- before the first).
SELECT s.projection, coalesce(s.shadow_seconds_behind, 0)::float8, s.differing_rows
FROM aura.shadow_status s;
