-- Migration 0006: a projection's handler can write its own read model and
-- nothing else.
--
-- Every read model schema belongs to a role of its own (NOLOGIN, named
-- <projector role>_<schema>, e.g. aura_projector_stream_summary), and its
-- handlers run as that role: aura.apply_handler calls them through
-- SCHEMA.aura_run_handler, a SECURITY DEFINER function owned by the role
-- (one switch of user per batch, not one per event), and the forget
-- handler is SECURITY DEFINER itself. Inside a SECURITY DEFINER function
-- Postgres refuses SET ROLE and SET SESSION AUTHORIZATION, so a handler
-- cannot take its caller's rights back.
-- What a handler may do outside its schema is what the handler group role
-- (aura.handler_role, default aura_handler) may: read the read models and
-- the operator views (it is a member of the reader role) and publish
-- messages with aura.publish_to_outbox, which runs as the aura schema's
-- owner. The projector role is a member of every read model role, so it
-- still resets, rebuilds and drops them.
--
-- Read model roles are created on demand by aura.read_model_role, which
-- runs as the role that ran this migration (it needs CREATEROLE); only the
-- projector role may call it, and it only ever creates, or hands out, roles
-- that it created itself (marked by their comment).

ALTER TABLE aura.role_names DROP CONSTRAINT role_kind_valid;
ALTER TABLE aura.role_names ADD CONSTRAINT role_kind_valid
    CHECK (kind IN ('owner', 'writer', 'projector', 'reader', 'handler'));

INSERT INTO aura.role_names (kind, role_name)
VALUES ('handler', coalesce(nullif(current_setting('aura.handler_role', true), ''), 'aura_handler'))
ON CONFLICT (kind) DO NOTHING;

DO $$
DECLARE
    v_handler text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'handler');
    v_reader  text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'reader');
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles x
               WHERE x.rolname = v_handler AND (x.rolsuper OR x.rolbypassrls)) THEN
        RAISE EXCEPTION 'the handler role % is a superuser (or bypasses row security): choose another name',
            v_handler
            USING ERRCODE = 'AU007', HINT = 'Set aura.handler_role to the name of a group role.';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles x WHERE x.rolname = v_handler) THEN
        BEGIN
            EXECUTE format('CREATE ROLE %I NOLOGIN', v_handler);
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;  -- created meanwhile by the migration of another database
        END;
    END IF;
    IF NOT pg_catalog.pg_has_role(v_handler, v_reader, 'MEMBER') THEN
        EXECUTE format('GRANT %I TO %I', v_reader, v_handler);
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA aura TO %I', v_handler);
    EXECUTE format('GRANT EXECUTE ON FUNCTION aura.publish_to_outbox(text, text, uuid, jsonb, jsonb, bigint) TO %I',
                   v_handler);
END
$$;

-- A handler's one way into the outbox: runs as the aura schema's owner, so
-- the handler role needs no privilege on aura.outbox. Its body and the
-- table's defaults and checks name only aura.* and pg_catalog objects.
ALTER FUNCTION aura.publish_to_outbox(text, text, uuid, jsonb, jsonb, bigint)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- The role that owns a read model schema (and runs its handlers), created
-- when missing: <projector role>_<schema without __rebuild>, or, when that
-- would pass 63 bytes, a shortened name made unique by a hash. Refuses a
-- name that exists but was not created here.
CREATE OR REPLACE FUNCTION aura.read_model_role(p_schema text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c_marker    CONSTANT text := 'aura-pg read model role';
    v_projector text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'projector');
    v_handler   text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'handler');
    v_base      text;
    v_role      text;
BEGIN
    IF p_schema IS NULL OR p_schema !~ '^[a-z][a-z0-9]*(_[a-z0-9]+)*(__[a-z]+)?$'
       OR char_length(p_schema) > 60 THEN
        RAISE EXCEPTION 'invalid read model schema %', coalesce(quote_literal(p_schema), 'NULL')
            USING ERRCODE = 'AU007';
    END IF;
    v_base := regexp_replace(p_schema, '__[a-z]+$', '');
    v_role := v_projector || '_' || v_base;
    IF octet_length(v_role) > 63 THEN
        v_role := left(v_projector, 20) || '_' || left(md5(v_projector || '/' || v_base), 10)
                  || '_' || left(v_base, 30);
    END IF;
    IF EXISTS (SELECT 1 FROM aura.role_names n WHERE n.role_name = v_role) THEN
        RAISE EXCEPTION 'read model % would be owned by %, one of the aura group roles', p_schema, v_role
            USING ERRCODE = 'AU007';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname = v_role) THEN
        BEGIN
            EXECUTE format('CREATE ROLE %I NOLOGIN', v_role);
            EXECUTE format('COMMENT ON ROLE %I IS %L', v_role, c_marker);
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;  -- created meanwhile by another session; checked below
        END;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r
                   WHERE r.rolname = v_role AND NOT r.rolcanlogin AND NOT r.rolsuper
                     AND NOT r.rolbypassrls AND NOT r.rolcreaterole AND NOT r.rolcreatedb
                     AND pg_catalog.shobj_description(r.oid, 'pg_authid') = c_marker) THEN
        RAISE EXCEPTION 'role % exists but is not an aura-pg read model role', v_role
            USING ERRCODE = 'AU007',
                  HINT = 'Rename that role, or name the read model''s schema otherwise.';
    END IF;
    -- The handler group's rights become every handler's: refuse them if
    -- they reach past reading (aura.role_names belongs to the owner role,
    -- and this function runs as a role that may grant anything).
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles m
               WHERE pg_catalog.pg_has_role(v_handler, m.oid, 'MEMBER')
                 AND (m.rolsuper OR m.rolbypassrls OR m.rolcreaterole OR m.rolcreatedb
                      OR m.rolname IN ('pg_execute_server_program', 'pg_read_server_files',
                                       'pg_write_server_files', 'pg_write_all_data',
                                       'pg_read_all_data', 'pg_signal_backend', 'pg_checkpoint')
                      OR m.rolname IN (SELECT n.role_name FROM aura.role_names n
                                       WHERE n.kind IN ('owner', 'writer', 'projector')))) THEN
        RAISE EXCEPTION 'the handler role % holds more than reading: refusing to make handlers members of it',
            v_handler
            USING ERRCODE = 'AU007',
                  HINT = 'The handler role should be a member of the reader role only.';
    END IF;
    IF NOT pg_catalog.pg_has_role(v_role, v_handler, 'MEMBER') THEN
        EXECUTE format('GRANT %I TO %I', v_handler, v_role);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members m
                   JOIN pg_catalog.pg_roles granted ON granted.oid = m.roleid
                   JOIN pg_catalog.pg_roles member ON member.oid = m.member
                   WHERE granted.rolname = v_role AND member.rolname = v_projector) THEN
        EXECUTE format('GRANT %I TO %I', v_role, v_projector);
    END IF;
    RETURN v_role;
END;
$$;

COMMENT ON FUNCTION aura.read_model_role(text) IS
    'The role that owns a read model schema and runs its handlers, created when missing';

-- Gives a read model schema, and everything in it, to its role, and makes
-- its handlers run as that role: it creates SCHEMA.aura_run_handler (a
-- name the definition SQL must leave free), which aura.apply_handler calls
-- with each batch. Called by aura.install_projection_schema after the
-- definition SQL ran (as the caller: the projector, a member of the role).
-- Tables a handler creates later belong to the role already and are
-- readable by the reader role through the role's default privileges.
CREATE OR REPLACE FUNCTION aura.isolate_read_model(
    p_schema text, p_handler text, p_kind text, p_forget_handler text
) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_role      text := aura.read_model_role(p_schema);
    v_reader    text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'reader');
    v_projector text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'projector');
    v_runner    text := format('%I.aura_run_handler(text, text, text, aura.events[])', p_schema);
BEGIN
    IF to_regprocedure(v_runner) IS NULL THEN
        IF EXISTS (SELECT 1 FROM pg_catalog.pg_proc f
                   WHERE f.pronamespace = p_schema::regnamespace AND f.proname = 'aura_run_handler') THEN
            RAISE EXCEPTION 'the definition of % creates a function aura_run_handler: the name is reserved',
                p_schema USING ERRCODE = 'AU007';
        END IF;
        -- The handler's schema is named in each call, not taken from the
        -- search_path. A caller naming another read model's handler would
        -- run it with this role's rights, which are less than its own.
        EXECUTE format($f$
            CREATE FUNCTION %I.aura_run_handler(
                p_schema text, p_handler text, p_kind text, p_events aura.events[]
            ) RETURNS void
            LANGUAGE plpgsql SECURITY DEFINER AS $b$
            BEGIN
                IF p_kind = 'set_based' THEN
                    EXECUTE format('SELECT %%I.%%I($1)', p_schema, p_handler) USING p_events;
                ELSE
                    -- unnest yields the array in order, and the handler
                    -- runs per row as the scan produces it.
                    EXECUTE format('SELECT %%I.%%I(u) FROM unnest($1) AS u', p_schema, p_handler)
                        USING p_events;
                END IF;
            END;
            $b$ $f$, p_schema);
        EXECUTE format('COMMENT ON FUNCTION %s IS %L', v_runner,
                       'aura-pg: runs this read model''s handler as the read model''s role');
    END IF;
    EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', v_runner);
    EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', v_runner, v_projector);
    PERFORM aura.give_read_model(p_schema, v_role);
    IF p_forget_handler IS NOT NULL THEN
        EXECUTE format('ALTER FUNCTION %I.%I(text) SECURITY DEFINER', p_schema, p_forget_handler);
    END IF;
    EXECUTE format('ALTER DEFAULT PRIVILEGES FOR ROLE %I GRANT SELECT ON TABLES TO %I',
                   v_role, v_reader);
    EXECUTE format('ALTER DEFAULT PRIVILEGES FOR ROLE %I REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC',
                   v_role);
    RETURN v_role;
END;
$$;

COMMENT ON FUNCTION aura.isolate_read_model(text, text, text, text) IS
    'Hands a read model schema to its own role and makes its handlers run as that role';

-- Runs a projection's handler over events (in order) as its read model's
-- role, through SCHEMA.aura_run_handler (aura.isolate_read_model): one
-- switch of user per batch. As migration 0002's version otherwise; a read
-- model without its runner is refused rather than run with the caller's
-- rights.
CREATE OR REPLACE FUNCTION aura.apply_handler(
    p_schema text, p_handler text, p_kind text, p_events aura.events[]
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_search_path text := current_setting('search_path');
BEGIN
    IF to_regprocedure(format('%I.aura_run_handler(text, text, text, aura.events[])', p_schema))
       IS NULL THEN
        RAISE EXCEPTION 'read model % has no aura_run_handler: reset or rebuild the projection', p_schema
            USING ERRCODE = 'AU007';
    END IF;
    BEGIN
        PERFORM set_config('search_path', format('%I, public, pg_temp', p_schema), true);
        EXECUTE format('SELECT %I.aura_run_handler($1, $2, $3, $4)', p_schema)
            USING p_schema, p_handler, p_kind, p_events;
        PERFORM set_config('search_path', v_search_path, true);
    EXCEPTION
        -- A handler raising the engine's own codes would be read as "unknown
        -- projection" or "checkpoint moved": report it as the handler's error.
        WHEN SQLSTATE 'AU005' OR SQLSTATE 'AU006' OR SQLSTATE 'AU007' THEN
            RAISE EXCEPTION 'handler %.% raised %: %', p_schema, p_handler, SQLSTATE, SQLERRM
                USING ERRCODE = 'AU008';
    END;
END;
$$;

-- Ownership and privileges of what this file and views/operator.sql
-- created (as roles/grants.sql does for migration 0005's objects).
-- aura.read_model_role stays with the migrating role: it needs CREATEROLE.
DO $$
DECLARE
    v_owner     text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'owner');
    v_projector text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'projector');
    v_reader    text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'reader');
BEGIN
    EXECUTE format('ALTER FUNCTION aura.isolate_read_model(text, text, text, text) OWNER TO %I', v_owner);
    EXECUTE format('ALTER FUNCTION aura.list_dead_letters(text, text) OWNER TO %I', v_owner);
    EXECUTE format('ALTER VIEW aura.stream_categories OWNER TO %I', v_owner);
    REVOKE ALL ON aura.stream_categories FROM PUBLIC;
    REVOKE EXECUTE ON FUNCTION aura.read_model_role(text), aura.isolate_read_model(text, text, text, text),
                               aura.list_dead_letters(text, text) FROM PUBLIC;
    EXECUTE format('GRANT EXECUTE ON FUNCTION aura.read_model_role(text), '
                   'aura.isolate_read_model(text, text, text, text), '
                   'aura.list_dead_letters(text, text) TO %I', v_projector);
    EXECUTE format('GRANT SELECT ON aura.stream_categories TO %I, %I', v_projector, v_reader);
END
$$;

-- Read models that exist already get their roles.
SELECT aura.isolate_read_model(c.schema_name, c.handler, c.handler_kind, c.forget_handler)
FROM aura.projection_checkpoints c
WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_namespace n WHERE n.nspname = c.schema_name)
ORDER BY c.name;
