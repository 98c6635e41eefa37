-- Who owns what, and who may do what (roles/roles.sql created the roles),
-- for everything installed before this file; the files installed after it
-- (sql/install.sql) give their own objects' owner and privileges in the
-- same way. Everything in the aura schema goes to the owner role, PUBLIC
-- loses every default privilege there, and each role gets exactly what its
-- duty needs:
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
--   handler    USAGE on the aura schema, EXECUTE publish_to_outbox, and
--              membership of the reader role
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
    v_handler   text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'handler');
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
    -- aura.projection_status counts a partition's backlog with these.
    EXECUTE format('GRANT EXECUTE ON FUNCTION aura.stream_partition(text, integer), '
                   'aura.handed_over(jsonb, text, xid8, bigint) TO %I', v_reader);

    -- Projector roles create rows and take generations (nextval needs USAGE).
    EXECUTE format('GRANT USAGE ON SEQUENCE aura.projection_generation TO %I', v_projector);

    -- handler: what every read model role may do outside its own schema.
    IF NOT pg_catalog.pg_has_role(v_handler, v_reader, 'MEMBER') THEN
        EXECUTE format('GRANT %I TO %I', v_reader, v_handler);
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA aura TO %I', v_handler);
    EXECUTE format('GRANT EXECUTE ON FUNCTION aura.publish_to_outbox(text, text, uuid, jsonb, jsonb, bigint) TO %I',
                   v_handler);

    -- `aura-pg migrate --check` for every role.
    IF to_regclass('aura.alembic_version') IS NOT NULL THEN
        EXECUTE format('GRANT SELECT ON aura.alembic_version TO %I, %I, %I',
                       v_writer, v_projector, v_reader);
    END IF;
END
$$;
