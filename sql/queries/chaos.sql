-- Statements of the failure injector (aura_pg.chaos). Each starts at a
-- "-- name:" line. The injector runs them as a superuser or the schema
-- owner; nothing here runs in normal operation.

-- name: install
-- Trigger functions that make a read model's writes fail or wait: a
-- statement-level trigger calling one of them is added to each table of
-- the projection's schema, and dropped to end the fault.
CREATE SCHEMA IF NOT EXISTS aura_chaos;
COMMENT ON SCHEMA aura_chaos IS 'aura-pg fault injection (aura_pg.chaos); safe to drop when no fault is active';
CREATE OR REPLACE FUNCTION aura_chaos.fail() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'aura chaos: % on %.% fails on purpose', TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = TG_ARGV[0];
END;
$$;
CREATE OR REPLACE FUNCTION aura_chaos.delay() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_sleep(TG_ARGV[0]::float8);
    RETURN NULL;
END;
$$;

-- name: session
-- The injector waits for a daemon's batch to end, but not forever.
SET lock_timeout = '30s';

-- name: live_schema
-- The schema readers see for a projection (a rebuild's shadow excluded).
SELECT schema_name FROM aura.projection_checkpoints
 WHERE name = %(name)s AND rebuild_of IS NULL;

-- name: schema_tables
-- The base tables of a read model's schema.
SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = %(schema)s AND c.relkind IN ('r', 'p')
 ORDER BY c.relname;

-- name: projection_owner
-- The daemon that owns a projection, as host:pid (or its --owner name).
SELECT owner FROM aura.projection_checkpoints WHERE name = %(name)s AND rebuild_of IS NULL;

-- name: terminate_backends
-- Ends the sessions of this database whose application_name matches.
SELECT pid, application_name, pg_terminate_backend(pid) AS terminated
  FROM pg_stat_activity
 WHERE datname = current_database()
   AND application_name LIKE %(pattern)s
   AND pid <> pg_backend_pid();

-- name: server_files
-- Where the server keeps its files (their owner owns a new tablespace) and
-- the bytes a read model's tables take now.
SELECT current_setting('data_directory') AS data_directory,
       coalesce(sum(pg_relation_size(c.oid)), 0) AS bytes
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = (SELECT schema_name FROM aura.projection_checkpoints
                     WHERE name = %(name)s AND rebuild_of IS NULL)
   AND c.relkind IN ('r', 'p');

-- name: fill_tablespace
-- One more slice of filler rows; fails with 53100 (disk full) once the
-- tablespace's file system has no room left.
INSERT INTO aura_chaos.filler SELECT repeat('x', 1000) FROM generate_series(1, 1000);

-- name: read_model_faults
-- The triggers fail_projection and slow_projection leave on read-model
-- tables, found by their names: of one projection's live schema, or of
-- every schema when %(name)s is NULL.
SELECT n.nspname AS schema_name, c.relname AS table_name, t.tgname AS trigger_name
  FROM pg_trigger t
  JOIN pg_class c ON c.oid = t.tgrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE t.tgname IN ('aura_chaos_failure', 'aura_chaos_delay')
   AND NOT t.tgisinternal
   AND (%(name)s::text IS NULL
        OR n.nspname = (SELECT p.schema_name FROM aura.projection_checkpoints p
                         WHERE p.name = %(name)s AND p.rebuild_of IS NULL))
 ORDER BY 1, 2, 3;

-- name: skip_poison_dead_letters
-- Gives up on the pending dead letters of events that poison_event
-- appended (metadata aura_chaos = poison): of one projection or all, of one
-- event or all. Their ids.
SELECT d.id, aura.skip_dead_letter(d.id, %(note)s) AS outcome
  FROM aura.dead_letters d
  JOIN aura.events e ON e.global_position = d.global_position
 WHERE d.status = 'pending'
   AND e.metadata ->> 'aura_chaos' = 'poison'
   AND (%(projection)s::text IS NULL OR d.projection = %(projection)s)
   AND (%(event_id)s::uuid IS NULL OR d.event_id = %(event_id)s::uuid)
 ORDER BY d.id;
