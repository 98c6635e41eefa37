-- Statements of the operator commands (`aura-pg status`, `stream show`,
-- `tail`, the schema check before them). Each starts at a "-- name:" line;
-- loaded once at first use. Values are always parameters.

-- name: schema_state
-- Is there an aura schema, may this role use it, was it ever migrated
-- (alembic's table in aura)?
SELECT n.oid IS NOT NULL                                          AS schema_exists,
       n.oid IS NOT NULL AND has_schema_privilege(n.oid, 'USAGE') AS usable,
       CASE WHEN has_schema_privilege(n.oid, 'USAGE')
            THEN to_regclass('aura.alembic_version') IS NOT NULL END AS migrated,
       current_user::text                                         AS user_name
FROM (SELECT 1) AS one
LEFT JOIN pg_catalog.pg_namespace n ON n.nspname = 'aura';

-- name: schema_revision
SELECT v.version_num FROM aura.alembic_version v;

-- name: projection_status
-- Every column of the view, so columns added by later migrations (owner_alive)
-- reach `aura-pg status` without a change here.
SELECT s.* FROM aura.projection_status s;

-- name: outbox_summary
SELECT coalesce(sum(o.pending), 0)::bigint                     AS pending,
       coalesce(sum(o.dead), 0)::bigint                        AS dead,
       round(extract(epoch FROM now() - min(o.oldest_pending_at)), 3) AS oldest_pending_seconds
FROM aura.outbox_status o;

-- name: horizon_summary
-- The oldest open writing transaction: it holds every global reader back.
-- Only the caller's own sessions unless it has pg_read_all_stats.
SELECT count(*)                                                       AS open_transactions,
       round(extract(epoch FROM max(h.transaction_age)), 3)          AS oldest_seconds,
       (array_agg(h.pid ORDER BY h.transaction_age DESC NULLS LAST))[1] AS oldest_pid
FROM aura.read_horizon_status h;

-- name: stream_version
SELECT aura.stream_version(%(stream_id)s);

-- name: read_stream
SELECT e.version, e.global_position, e.transaction_id::text AS transaction_id, e.event_id,
       e.type, e.recorded_at, e.data, e.metadata
FROM aura.read_stream(%(stream_id)s, %(from_version)s, %(limit)s, %(backwards)s) AS e;

-- name: read_horizon
-- Where `aura-pg tail` starts by default: after the newest event a reader
-- can see now. Anything committed later sorts after it.
SELECT h.transaction_id::text, h.global_position FROM aura.read_horizon() AS h;

-- name: read_all
SELECT e.transaction_id::text AS transaction_id, e.global_position, e.event_id, e.stream_id,
       e.version, e.type, e.recorded_at, e.data, e.metadata
FROM aura.read_all(%(transaction_id)s::xid8, %(position)s, %(limit)s, %(types)s::text[]) AS e;
