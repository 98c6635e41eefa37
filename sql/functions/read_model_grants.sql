-- Read model schemas: created from their definition SQL, granted, and
-- given to their own role when they are created.
--
-- aura.grant_read_model(schema) lets the reader role read a read model and
-- the projector role write it; nobody else (PUBLIC) gets anything, not even
-- EXECUTE on its functions. aura.install_projection_schema (register, reset,
-- rebuild, shadow) calls it once the definition SQL has run. Tables that a
-- handler creates later (partitions, ...) are readable by the reader
-- through the default privileges of the read model's role
-- (aura.hand_over_read_model); per-schema default privileges would count
-- as dependents outside the schema (aura.outside_dependents) and block its
-- reset.
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
-- columns follow their table. Used by aura.hand_over_read_model (to the
-- read model's own role); the caller must be able to act as p_role.
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
-- handlers it names exist with the right signature, grants it
-- (aura.grant_read_model), then gives it to its own role and makes its
-- handlers run as that role (aura.isolate_read_model,
-- roles/read_model_roles.sql).
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
    PERFORM aura.isolate_read_model(p_schema, p_handler, p_kind, p_forget_handler);
END;
$$;
