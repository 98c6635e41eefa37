-- Read model roles: a projection's handler can write its own read model
-- and nothing else.
--
-- Every read model schema belongs to a role of its own (NOLOGIN, named
-- <projector role>/<schema>, e.g. aura_projector/stream_summary;
-- SCHEMA__shadow and SCHEMA__rebuild have roles of their own, handed over
-- when a swap renames the schemas), and its handlers run as that role:
-- aura.apply_handler calls them through SCHEMA.aura_run_handler, a
-- SECURITY DEFINER function owned by the role (one switch of user per
-- batch, not one per event), and the forget handler is SECURITY DEFINER
-- itself. Inside a SECURITY DEFINER function Postgres refuses SET ROLE and
-- SET SESSION AUTHORIZATION, so a handler cannot take its caller's rights
-- back.
-- What a handler may do outside its schema is what the handler group role
-- (aura.handler_role, default aura_handler, roles/roles.sql) may: read the
-- read models and the operator views (it is a member of the reader role)
-- and publish messages with aura.publish_to_outbox, which runs as the aura
-- schema's owner. The projector role is a member of every read model role,
-- so it still resets, rebuilds and drops them.
--
-- Read model roles are created on demand by aura.read_model_role, which
-- runs as the role that installed the schema (it needs CREATEROLE); only
-- the projector role may call it, and it only ever creates, or hands out,
-- roles that it created itself for this projector role and that schema
-- (marked by their comment).

-- The name of the role that owns read model schema p_schema of the
-- projector role p_projector: <projector role>/<schema>, e.g.
-- aura_projector/stream_summary, or, when that would pass 63 bytes,
-- <first 20 bytes of the projector role>/<first 28 of the schema>#<hash>.
-- A schema name never holds '/' or '#', so the projector and the schema
-- are read back unambiguously (up to the last '/'; a hashed name has a
-- '#' after it, a full one never): with a plain separator such as '_',
-- projector shop's read model eu_totals would get the role of projector
-- shop_eu's totals. Each schema has its own role, SCHEMA__shadow and
-- SCHEMA__rebuild included, so that a shadow's handlers cannot write the
-- live model.
CREATE OR REPLACE FUNCTION aura.read_model_role_name(p_projector text, p_schema text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_name   text := p_projector || '/' || p_schema;
    v_prefix text := p_projector;
BEGIN
    IF octet_length(v_name) <= 63 THEN
        RETURN v_name;
    END IF;
    WHILE octet_length(v_prefix) > 20 LOOP  -- bytes: a character may take several
        v_prefix := left(v_prefix, -1);
    END LOOP;
    RETURN v_prefix || '/' || left(p_schema, 28) || '#'
           || left(md5(p_projector || '/' || p_schema), 12);
END;
$$;

COMMENT ON FUNCTION aura.read_model_role_name(text, text) IS
    'The name of the role owning a read model schema: <projector role>/<schema>';

-- The comment aura.read_model_role puts on a role it creates, and requires
-- of a role it hands out: which projector role and which schema the role
-- was made for (the projector quoted as an identifier, so that the text
-- reads back one way). A role made for another application's projector,
-- even under a colliding hashed name, is refused.
CREATE OR REPLACE FUNCTION aura.read_model_role_marker(p_projector text, p_schema text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT SET search_path = pg_catalog, pg_temp AS $$
    SELECT format('aura-pg read model role of projector %s for schema %s',
                  quote_ident(p_projector), p_schema)
$$;

-- The role that owns read model schema p_schema (and runs its handlers),
-- created when missing, named by aura.read_model_role_name. Refuses a role
-- of that name that exists but was not created here for this projector
-- role and this schema.
CREATE OR REPLACE FUNCTION aura.read_model_role(p_schema text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_projector text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'projector');
    v_handler   text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'handler');
    v_role      text;
    v_marker    text;
BEGIN
    IF p_schema IS NULL OR p_schema !~ '^[a-z][a-z0-9]*(_[a-z0-9]+)*(__[a-z]+)?$'
       OR char_length(p_schema) > 60 THEN
        RAISE EXCEPTION 'invalid read model schema %', coalesce(quote_literal(p_schema), 'NULL')
            USING ERRCODE = 'AU007';
    END IF;
    v_role := aura.read_model_role_name(v_projector, p_schema);
    v_marker := aura.read_model_role_marker(v_projector, p_schema);
    IF EXISTS (SELECT 1 FROM aura.role_names n WHERE n.role_name = v_role) THEN
        RAISE EXCEPTION 'read model % would be owned by %, one of the aura group roles', p_schema, v_role
            USING ERRCODE = 'AU007';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname = v_role) THEN
        BEGIN
            EXECUTE format('CREATE ROLE %I NOLOGIN', v_role);
            EXECUTE format('COMMENT ON ROLE %I IS %L', v_role, v_marker);
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;  -- created meanwhile by another session; checked below
        END;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r
                   WHERE r.rolname = v_role AND NOT r.rolcanlogin AND NOT r.rolsuper
                     AND NOT r.rolbypassrls AND NOT r.rolcreaterole AND NOT r.rolcreatedb
                     AND pg_catalog.shobj_description(r.oid, 'pg_authid') = v_marker) THEN
        RAISE EXCEPTION 'role % exists but is not an aura-pg read model role of projector % for %',
            v_role, v_projector, p_schema
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

-- Gives read model schema p_schema, when it exists, and everything in it
-- to its own role (aura.read_model_role), and makes what that role creates
-- later readable by the reader role. Run after every rename of a read model
-- schema (aura.promote_shadow, aura.finish_rebuild): ownership follows the
-- schema's contents through a rename, so without it the promoted handlers
-- would keep the shadow's role and the old live ones the live role.
-- Runs as the role that installed the schema, like aura.read_model_role:
-- TimescaleDB gives a hypertable's chunks (in _timescaledb_internal) to
-- the new owner too, which Postgres lets only a superuser do. Only schemas
-- marked as read models (which only their owners can mark) are handed over.
CREATE OR REPLACE FUNCTION aura.hand_over_read_model(p_schema text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_reader text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'reader');
    v_oid    oid;
    v_role   text;
BEGIN
    SELECT n.oid INTO v_oid FROM pg_catalog.pg_namespace n WHERE n.nspname = p_schema;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF pg_catalog.obj_description(v_oid, 'pg_namespace') IS DISTINCT FROM 'aura-pg read model' THEN
        RAISE EXCEPTION 'schema % is not an aura-pg read model', p_schema USING ERRCODE = 'AU007';
    END IF;
    v_role := aura.read_model_role(p_schema);
    PERFORM aura.give_read_model(p_schema, v_role);
    EXECUTE format('ALTER DEFAULT PRIVILEGES FOR ROLE %I GRANT SELECT ON TABLES TO %I',
                   v_role, v_reader);
    EXECUTE format('ALTER DEFAULT PRIVILEGES FOR ROLE %I REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC',
                   v_role);
    RETURN v_role;
END;
$$;

COMMENT ON FUNCTION aura.hand_over_read_model(text) IS
    'Gives a read model schema to the role of its (new) name, after a swap renamed it';

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
    PERFORM aura.hand_over_read_model(p_schema);
    IF p_forget_handler IS NOT NULL THEN
        EXECUTE format('ALTER FUNCTION %I.%I(text) SECURITY DEFINER', p_schema, p_forget_handler);
    END IF;
    RETURN v_role;
END;
$$;

COMMENT ON FUNCTION aura.isolate_read_model(text, text, text, text) IS
    'Hands a read model schema to its own role and makes its handlers run as that role';

-- Ownership and privileges of these functions (as roles/grants.sql gives
-- them for the objects installed before it). aura.read_model_role and
-- aura.hand_over_read_model stay with the role that installed the schema:
-- they need CREATEROLE (and hypertable chunks a superuser).
DO $$
DECLARE
    v_owner     text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'owner');
    v_projector text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'projector');
BEGIN
    EXECUTE format('ALTER FUNCTION aura.isolate_read_model(text, text, text, text) OWNER TO %I', v_owner);
    EXECUTE format('ALTER FUNCTION aura.read_model_role_name(text, text) OWNER TO %I', v_owner);
    EXECUTE format('ALTER FUNCTION aura.read_model_role_marker(text, text) OWNER TO %I', v_owner);
    REVOKE EXECUTE ON FUNCTION aura.read_model_role(text), aura.isolate_read_model(text, text, text, text),
                               aura.hand_over_read_model(text), aura.read_model_role_name(text, text),
                               aura.read_model_role_marker(text, text) FROM PUBLIC;
    EXECUTE format('GRANT EXECUTE ON FUNCTION aura.read_model_role(text), '
                   'aura.isolate_read_model(text, text, text, text), '
                   'aura.hand_over_read_model(text), aura.read_model_role_name(text, text), '
                   'aura.read_model_role_marker(text, text) TO %I', v_projector);
END
$$;
