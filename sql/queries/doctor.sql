-- Statements `aura-pg doctor` (aura_pg/doctor/) sends, each starting at a
-- "-- name:" line. They only read: catalogs, settings, statistics and the
-- aura operator views. Each check runs on its own (autocommit), so one that
-- fails (a permission, a missing view) does not stop the others.

-- name: session_setup
-- The doctor must never hang on a lock or a stuck server.
SELECT pg_catalog.set_config('statement_timeout', '10s', false);

-- name: server
SELECT pg_catalog.current_setting('server_version_num')::integer AS version_num,
       pg_catalog.current_setting('server_version')             AS version;

-- name: timescaledb
-- shared_preload_libraries is readable by superusers and pg_read_all_settings
-- only; pg_settings leaves the row out for others (preload is then NULL).
SELECT (SELECT e.extversion FROM pg_catalog.pg_extension e
        WHERE e.extname = 'timescaledb')                        AS installed_version,
       (SELECT a.default_version FROM pg_catalog.pg_available_extensions a
        WHERE a.name = 'timescaledb')                            AS available_version,
       (SELECT s.setting FROM pg_catalog.pg_settings s
        WHERE s.name = 'shared_preload_libraries')               AS preload;

-- name: schema_state
-- Which parts of the aura schema exist (an unmigrated database has none).
SELECT pg_catalog.to_regnamespace('aura') IS NOT NULL                 AS has_schema,
       pg_catalog.to_regclass('aura.alembic_version') IS NOT NULL     AS has_version_table,
       pg_catalog.to_regclass('aura.role_names') IS NOT NULL          AS has_role_names,
       pg_catalog.to_regclass('aura.projection_status') IS NOT NULL   AS has_projection_status,
       pg_catalog.to_regclass('aura.stream_order_inversions') IS NOT NULL
                                                                      AS has_stream_order_view;

-- name: alembic_version
SELECT v.version_num FROM aura.alembic_version v ORDER BY v.version_num;

-- name: aura_roles
-- The four group roles of aura.role_names and whether the connected user is
-- in each (directly or through other roles; a superuser's implicit rights do
-- not count as membership).
WITH RECURSIVE member_of(roleid) AS (
    SELECT m.roleid
    FROM pg_catalog.pg_auth_members m
    JOIN pg_catalog.pg_roles u ON u.oid = m.member
    WHERE u.rolname = current_user
    UNION
    SELECT m.roleid
    FROM pg_catalog.pg_auth_members m
    JOIN member_of p ON m.member = p.roleid
)
SELECT n.kind,
       n.role_name,
       r.oid IS NOT NULL                                      AS role_exists,
       coalesce(r.rolcanlogin, false)                         AS can_login,
       coalesce(r.rolsuper, false)                            AS is_superuser,
       coalesce(r.rolbypassrls, false)                        AS bypasses_rls,
       (r.rolname = current_user
        OR r.oid IN (SELECT p.roleid FROM member_of p))       AS current_user_member
FROM aura.role_names n
LEFT JOIN pg_catalog.pg_roles r ON r.rolname = n.role_name
ORDER BY pg_catalog.array_position(ARRAY['owner', 'writer', 'projector', 'reader'], n.kind);

-- name: current_user
SELECT current_user AS user_name, r.rolsuper AS is_superuser
FROM pg_catalog.pg_roles r
WHERE r.rolname = current_user;

-- name: public_privileges
-- What PUBLIC (grantee 0) may do on the aura schema, its tables and views,
-- and its functions. A NULL ACL means the built-in default (acldefault):
-- nothing on schemas and tables, EXECUTE on functions.
SELECT 'schema' AS object_kind, 'aura' AS object_name, a.privilege_type
FROM pg_catalog.pg_namespace n,
     LATERAL pg_catalog.aclexplode(coalesce(n.nspacl, pg_catalog.acldefault('n', n.nspowner))) a
WHERE n.nspname = 'aura' AND a.grantee = 0
UNION ALL
SELECT 'table', 'aura.' || c.relname, a.privilege_type
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace,
     LATERAL pg_catalog.aclexplode(coalesce(c.relacl, pg_catalog.acldefault('r', c.relowner))) a
WHERE n.nspname = 'aura' AND c.relkind IN ('r', 'p', 'v', 'm') AND a.grantee = 0
UNION ALL
SELECT 'function', 'aura.' || p.proname, a.privilege_type
FROM pg_catalog.pg_proc p
JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace,
     LATERAL pg_catalog.aclexplode(coalesce(p.proacl, pg_catalog.acldefault('f', p.proowner))) a
WHERE n.nspname = 'aura' AND a.grantee = 0
ORDER BY 1, 2, 3;

-- name: setting
-- One server setting as this session sees it, and where its value comes
-- from (default, configuration file, database, user, client, ...).
SELECT s.setting, s.unit, s.source
FROM pg_catalog.pg_settings s
WHERE s.name = %(name)s;

-- name: open_transactions
-- Transactions that hold the read horizon back, oldest first: sessions whose
-- transaction has an xid (it wrote, or asked for one), in any database of
-- the cluster (xids are cluster-wide; aura.read_horizon_status shows the
-- same sessions), and prepared transactions, which outlive their session.
-- Other users' sessions show their xid only to pg_read_all_stats members.
SELECT 'session'                                                  AS kind,
       a.pid,
       NULL::text                                                 AS gid,
       a.usename::text                                            AS user_name,
       a.application_name,
       a.datname::text                                            AS database,
       a.state,
       extract(epoch FROM pg_catalog.clock_timestamp() - a.xact_start)::float8 AS age_seconds
FROM pg_catalog.pg_stat_activity a
WHERE a.backend_xid IS NOT NULL
  AND a.pid <> pg_catalog.pg_backend_pid()
UNION ALL
SELECT 'prepared', NULL, p.gid, p.owner::text, NULL, p.database::text, 'prepared',
       extract(epoch FROM pg_catalog.clock_timestamp() - p.prepared)::float8
FROM pg_catalog.pg_prepared_xacts p
ORDER BY age_seconds DESC NULLS LAST;

-- name: sees_all_sessions
SELECT pg_catalog.pg_has_role(current_user, 'pg_read_all_stats', 'USAGE') AS sees_all;

-- name: clock
SELECT pg_catalog.clock_timestamp() AS server_time;

-- name: projection_status
SELECT * FROM aura.projection_status;

-- name: connections
-- Client connections against the slots open to ordinary roles.
SELECT pg_catalog.current_setting('max_connections')::integer                 AS max_connections,
       pg_catalog.current_setting('superuser_reserved_connections')::integer  AS superuser_reserved,
       coalesce(pg_catalog.current_setting('reserved_connections', true)::integer, 0)
                                                                              AS reserved,
       (SELECT count(*) FROM pg_catalog.pg_stat_activity a
        WHERE a.backend_type = 'client backend')::integer                    AS client_connections;

-- name: durability
SELECT s.name, s.setting, s.source
FROM pg_catalog.pg_settings s
WHERE s.name IN ('fsync', 'synchronous_commit', 'full_page_writes')
ORDER BY s.name;

-- name: longer_statement_timeout
-- For the rest of the transaction: checks that read the whole log.
SELECT pg_catalog.set_config('statement_timeout', '30s', true);

-- name: stream_order_inversions
-- Streams recorded out of version order (before migration 0009). It reads
-- the whole log, so it runs with longer_statement_timeout and gives up (a
-- warning) rather than hold a large database's I/O for long.
WITH inverted AS (SELECT s.stream_id FROM aura.stream_order_inversions s)
SELECT (SELECT count(*) FROM inverted)                                  AS streams,
       (SELECT pg_catalog.array_agg(l.stream_id ORDER BY l.stream_id)
        FROM (SELECT i.stream_id FROM inverted i ORDER BY i.stream_id LIMIT 3) AS l) AS listed;
