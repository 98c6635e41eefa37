-- Migration 0005, frozen: exactly what it runs, the SQL files it loaded when
-- it was released, each after a '-- sql/<file>' line. Never edit this file:
-- a change to the schema is a new migration (docs/migrations.md).
-- sql/roles/roles.sql
-- Migration 0005: least-privilege group roles (NOLOGIN), one per duty:
--
--   owner      owns the aura schema and everything in it (DDL)
--   writer     appends (aura.append_events) and reads the log
--   projector  runs projections: reads the log, writes read models,
--              checkpoints, dead letters and the outbox
--   reader     reads read models and the operator views
--
-- Their names are read once, here, from the settings aura.owner_role,
-- aura.writer_role, aura.projector_role and aura.reader_role (defaults
-- aura_owner, aura_writer, aura_projector, aura_reader), e.g.
--   PGOPTIONS='-c aura.writer_role=orders_writer' aura-pg migrate
-- and kept in aura.role_names, where the functions that create read models
-- at runtime find them. Roles are cluster-wide: a role that exists already
-- is used as it is (a superuser is refused). docs/operators.md describes
-- the roles and their login users.
CREATE TABLE aura.role_names (
    kind       text PRIMARY KEY,
    role_name  text NOT NULL UNIQUE,
    CONSTRAINT role_kind_valid CHECK (kind IN ('owner', 'writer', 'projector', 'reader')),
    -- A longer name would be cut short silently by the name type.
    CONSTRAINT role_name_valid
        CHECK (octet_length(role_name) BETWEEN 1 AND 63 AND role_name !~ '^pg_'
               AND role_name !~ '[[:cntrl:]]'
               AND lower(role_name) NOT IN ('public', 'none', 'current_user', 'current_role',
                                            'session_user'))
);

COMMENT ON TABLE aura.role_names IS
    'The group roles of this database: owner, writer, projector, reader (migration 0005)';

INSERT INTO aura.role_names (kind, role_name)
SELECT k.kind, coalesce(nullif(current_setting('aura.' || k.kind || '_role', true), ''),
                        'aura_' || k.kind)
FROM (VALUES ('owner'), ('writer'), ('projector'), ('reader')) AS k(kind);

DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT n.kind, n.role_name FROM aura.role_names n ORDER BY n.kind LOOP
        IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles x
                   WHERE x.rolname = r.role_name AND (x.rolsuper OR x.rolbypassrls)) THEN
            RAISE EXCEPTION 'the % role % is a superuser (or bypasses row security): choose another name',
                r.kind, r.role_name
                USING ERRCODE = 'AU007',
                      HINT = 'Set aura.' || r.kind || '_role to the name of a group role.';
        END IF;
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles x WHERE x.rolname = r.role_name) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r.role_name);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;  -- created meanwhile by the migration of another database
            END;
        END IF;
    END LOOP;
END
$$;

-- sql/functions/read_model_grants.sql
-- Migration 0005: read models get their privileges when they are created.
--
-- aura.grant_read_model(schema) lets the reader role read a read model and
-- the projector role write it; nobody else (PUBLIC) gets anything, not even
-- EXECUTE on its functions. aura.install_projection_schema (register, reset,
-- rebuild) calls it once the definition SQL has run. Tables that a handler
-- creates later (partitions, ...) are readable by the reader through
-- migration 0005's default privileges for the projector role; per-schema
-- default privileges would count as dependents outside the schema
-- (aura.outside_dependents) and block its reset.
CREATE OR REPLACE FUNCTION aura.grant_read_model(p_schema text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_projector text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'projector');
    v_reader    text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'reader');
BEGIN
    EXECUTE format('REVOKE ALL ON SCHEMA %I FROM PUBLIC', p_schema);
    EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA %I FROM PUBLIC', p_schema);
    EXECUTE format('REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA %I FROM PUBLIC', p_schema);
    EXECUTE format('GRANT USAGE, CREATE ON SCHEMA %I TO %I', p_schema, v_projector);
    EXECUTE format('GRANT ALL ON ALL TABLES IN SCHEMA %I TO %I', p_schema, v_projector);
    EXECUTE format('GRANT ALL ON ALL SEQUENCES IN SCHEMA %I TO %I', p_schema, v_projector);
    EXECUTE format('GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA %I TO %I', p_schema, v_projector);
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', p_schema, v_reader);
    EXECUTE format('GRANT SELECT ON ALL TABLES IN SCHEMA %I TO %I', p_schema, v_reader);
END;
$$;

-- Gives a read model's schema and everything in it (relations, partitions
-- included, routines, types) to p_role. Sequences of serial and identity
-- columns follow their table. Used by migration 0005 (to the projector
-- role) and by aura.isolate_read_model (to the read model's own role); the
-- caller must be able to act as p_role.
CREATE OR REPLACE FUNCTION aura.give_read_model(p_schema text, p_role text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    EXECUTE format('ALTER SCHEMA %I OWNER TO %I', p_schema, p_role);
    FOR r IN SELECT x.stmt FROM (
                 SELECT format('ALTER %s %s OWNER TO %I',
                               CASE c.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                                              WHEN 'S' THEN 'SEQUENCE' WHEN 'f' THEN 'FOREIGN TABLE'
                                              ELSE 'TABLE' END,
                               c.oid::regclass, p_role) AS stmt, 1 AS ord, c.oid
                 FROM pg_catalog.pg_class c
                 WHERE c.relnamespace = p_schema::regnamespace
                   AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
                   AND NOT (c.relkind = 'S' AND EXISTS (
                       SELECT 1 FROM pg_catalog.pg_depend d
                        WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                          AND d.refclassid = 'pg_class'::regclass AND d.refobjsubid > 0
                          AND d.deptype IN ('a', 'i')))
                 UNION ALL
                 SELECT format('ALTER ROUTINE %s OWNER TO %I', p.oid::regprocedure, p_role), 2, p.oid
                 FROM pg_catalog.pg_proc p
                 WHERE p.pronamespace = p_schema::regnamespace
                 UNION ALL
                 SELECT format('ALTER TYPE %s OWNER TO %I', t.oid::regtype, p_role), 3, t.oid
                 FROM pg_catalog.pg_type t
                 WHERE t.typnamespace = p_schema::regnamespace
                   AND (t.typtype IN ('e', 'd', 'r')
                        OR t.typtype = 'c' AND EXISTS (SELECT 1 FROM pg_catalog.pg_class c
                                                       WHERE c.oid = t.typrelid AND c.relkind = 'c'))
             ) AS x ORDER BY x.ord, x.oid LOOP
        EXECUTE r.stmt;
    END LOOP;
END;
$$;

-- Creates a read model's schema from its definition SQL, checks that the
-- handlers it names exist with the right signature, and grants it
-- (aura.grant_read_model), then gives it to its own role
-- (aura.isolate_read_model). As in migration 0002, apart from those.
CREATE OR REPLACE FUNCTION aura.install_projection_schema(
    p_schema text, p_definition_sql text, p_handler text, p_kind text, p_forget_handler text
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_search_path text := current_setting('search_path');
    v_signature   text;
BEGIN
    EXECUTE format('CREATE SCHEMA %I', p_schema);
    EXECUTE format('COMMENT ON SCHEMA %I IS %L', p_schema, 'aura-pg read model');
    PERFORM set_config('search_path', format('%I, public, pg_temp', p_schema), true);
    EXECUTE p_definition_sql;
    PERFORM set_config('search_path', v_search_path, true);
    IF EXISTS (SELECT 1 FROM pg_extension x WHERE x.extnamespace = p_schema::regnamespace) THEN
        RAISE EXCEPTION 'the definition of % created an extension inside the read model''s schema', p_schema
            USING ERRCODE = 'AU007',
                  HINT = 'Create extensions in a schema of their own: CREATE EXTENSION IF NOT EXISTS x SCHEMA public.';
    END IF;
    v_signature := format('%I.%I(%s)', p_schema, p_handler,
                          CASE p_kind WHEN 'set_based' THEN 'aura.events[]' ELSE 'aura.events' END);
    IF to_regprocedure(v_signature) IS NULL THEN
        RAISE EXCEPTION 'the definition of % does not create the handler %', p_schema, v_signature
            USING ERRCODE = 'AU007',
                  HINT = 'per_event handlers take (aura.events), set_based ones (aura.events[])';
    END IF;
    IF p_forget_handler IS NOT NULL
       AND to_regprocedure(format('%I.%I(text)', p_schema, p_forget_handler)) IS NULL THEN
        RAISE EXCEPTION 'the definition of % does not create the forget handler %.%(text)',
            p_schema, p_schema, p_forget_handler
            USING ERRCODE = 'AU007';
    END IF;
    PERFORM aura.grant_read_model(p_schema);
    -- Migration 0006 (roles/read_model_roles.sql): the schema goes to its
    -- own role, and the handlers run as that role. (A database at 0005
    -- has no such function yet; 0006 isolates its read models.)
    IF to_regprocedure('aura.isolate_read_model(text, text, text, text)') IS NOT NULL THEN
        PERFORM aura.isolate_read_model(p_schema, p_handler, p_kind, p_forget_handler);
    END IF;
END;
$$;

-- sql/roles/grants.sql
-- Migration 0005: who owns what, and who may do what (roles/roles.sql
-- created the roles). Everything in the aura schema goes to the owner role,
-- PUBLIC loses every default privilege there, and each role gets exactly
-- what its duty needs:
--
--   writer     SELECT aura.events, aura.streams; EXECUTE append_events,
--              read_all, read_horizon, read_stream, stream_version
--   projector  SELECT aura.events, aura.streams, aura.outbox_routes,
--              aura.role_names and the operator views; SELECT, INSERT,
--              UPDATE, DELETE on projection_checkpoints, dead_letters and
--              outbox; EXECUTE on every aura function but the append and
--              the outbox routes (DDL on aura.events: the owner's);
--              CREATE on the database (read models are schemas)
--   reader     SELECT projection_status, pending_dead_letters,
--              outbox_status, read_horizon_status (and the read models,
--              aura.grant_read_model)
--
-- Nobody but the owner holds INSERT, UPDATE, DELETE, TRUNCATE or any DDL
-- right on aura.events or aura.streams: the writer appends through
-- aura.append_events, which runs as its owner (SECURITY DEFINER) with a
-- pinned search_path and names every object with its schema.
DO $$
DECLARE
    v_owner     text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'owner');
    v_writer    text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'writer');
    v_projector text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'projector');
    v_reader    text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'reader');
    r record;
BEGIN
    -- Ownership. alembic's own version table stays with the migrating role.
    EXECUTE format('ALTER SCHEMA aura OWNER TO %I', v_owner);
    FOR r IN SELECT c.oid::regclass AS rel,
                    CASE c.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                                   WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END AS kind
             FROM pg_catalog.pg_class c
             WHERE c.relnamespace = 'aura'::regnamespace
               AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
               AND c.relname NOT IN ('alembic_version', 'alembic_version_pkc')
               -- identity sequences follow their table
               AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                               WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                                 AND d.deptype IN ('a', 'i'))
             ORDER BY c.oid LOOP
        EXECUTE format('ALTER %s %s OWNER TO %I', r.kind, r.rel, v_owner);
    END LOOP;
    FOR r IN SELECT p.oid::regprocedure AS fn FROM pg_catalog.pg_proc p
             WHERE p.pronamespace = 'aura'::regnamespace ORDER BY p.oid LOOP
        EXECUTE format('ALTER ROUTINE %s OWNER TO %I', r.fn, v_owner);
    END LOOP;

    -- PUBLIC: nothing (functions are executable by PUBLIC by default).
    REVOKE ALL ON SCHEMA aura FROM PUBLIC;
    REVOKE ALL ON ALL TABLES IN SCHEMA aura FROM PUBLIC;
    REVOKE ALL ON ALL SEQUENCES IN SCHEMA aura FROM PUBLIC;
    REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA aura FROM PUBLIC;
    -- Functions the owner creates later (a migration run under SET ROLE).
    EXECUTE format('ALTER DEFAULT PRIVILEGES FOR ROLE %I REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC',
                   v_owner);

    EXECUTE format('GRANT USAGE ON SCHEMA aura TO %I, %I, %I', v_writer, v_projector, v_reader);

    -- writer
    EXECUTE format('GRANT SELECT ON aura.events, aura.streams TO %I', v_writer);
    EXECUTE format('GRANT EXECUTE ON FUNCTION aura.append_events(text, jsonb, text), '
                   'aura.read_all(xid8, bigint, integer, text[]), aura.read_horizon(), '
                   'aura.read_stream(text, bigint, integer, boolean), aura.stream_version(text) '
                   'TO %I', v_writer);

    -- projector
    EXECUTE format('GRANT SELECT ON aura.events, aura.streams, aura.outbox_routes, aura.role_names, '
                   'aura.projection_status, aura.pending_dead_letters, aura.outbox_status, '
                   'aura.read_horizon_status TO %I', v_projector);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON aura.projection_checkpoints, '
                   'aura.dead_letters, aura.outbox TO %I', v_projector);
    FOR r IN SELECT p.oid::regprocedure AS fn FROM pg_catalog.pg_proc p
             WHERE p.pronamespace = 'aura'::regnamespace
               AND p.proname NOT IN ('append_events', 'event_problem', 'batch_problem',
                                     'invalid_event', 'recorded_for_batch',
                                     'add_outbox_route', 'remove_outbox_route')
             ORDER BY p.oid LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', r.fn, v_projector);
    END LOOP;
    EXECUTE format('GRANT CREATE ON DATABASE %I TO %I', current_database(), v_projector);
    -- What projector roles create (read models): readable by the reader,
    -- functions not executable by PUBLIC.
    EXECUTE format('ALTER DEFAULT PRIVILEGES FOR ROLE %I GRANT SELECT ON TABLES TO %I',
                   v_projector, v_reader);
    EXECUTE format('ALTER DEFAULT PRIVILEGES FOR ROLE %I REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC',
                   v_projector);

    -- reader
    EXECUTE format('GRANT SELECT ON aura.projection_status, aura.pending_dead_letters, '
                   'aura.outbox_status, aura.read_horizon_status TO %I', v_reader);

    -- `aura-pg migrate --check` for every role.
    IF to_regclass('aura.alembic_version') IS NOT NULL THEN
        EXECUTE format('GRANT SELECT ON aura.alembic_version TO %I, %I, %I',
                       v_writer, v_projector, v_reader);
    END IF;

    -- Read models that exist already: the projector role takes them over
    -- (it drops and renames them on reset and rebuild), the reader reads them.
    FOR r IN SELECT n.nspname FROM pg_catalog.pg_namespace n
             WHERE obj_description(n.oid, 'pg_namespace') = 'aura-pg read model'
             ORDER BY n.nspname LOOP
        PERFORM aura.grant_read_model(r.nspname);
        PERFORM aura.give_read_model(r.nspname, v_projector);
    END LOOP;
END
$$;

-- aura.append_events runs as the owner: roles/append_definer.sql.

-- sql/roles/append_definer.sql
-- Migrations 0005, 0006 and 0009 (after functions/append_events.sql, whose
-- CREATE OR REPLACE resets these attributes): the writer's only way in runs
-- as the owner. Every name in its body (and in the helpers, triggers and
-- defaults it reaches) is schema-qualified or in pg_catalog; pg_temp comes
-- last, so no temporary object can stand in.
ALTER FUNCTION aura.append_events(text, jsonb, text)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- Helpers the append reaches that a migration after 0005 created: the
-- owner's, not executable by PUBLIC, as roles/grants.sql leaves the others.
DO $$
DECLARE
    v_owner     text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'owner');
    v_projector text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'projector');
BEGIN
    EXECUTE format('ALTER FUNCTION aura.batch_key(jsonb) OWNER TO %I', v_owner);
    REVOKE EXECUTE ON FUNCTION aura.batch_key(jsonb) FROM PUBLIC;
    EXECUTE format('GRANT EXECUTE ON FUNCTION aura.batch_key(jsonb) TO %I', v_projector);
END
$$;

