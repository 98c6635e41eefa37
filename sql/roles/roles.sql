-- Least-privilege group roles (NOLOGIN), one per duty:
--
--   owner      owns the aura schema and everything in it (DDL)
--   writer     appends (aura.append_events) and reads the log
--   projector  runs projections: reads the log, writes read models,
--              checkpoints, dead letters and the outbox
--   reader     reads read models and the operator views
--   handler    the group of every read model role (roles/read_model_roles.sql):
--              what a projection's handler may do outside its own schema
--
-- Their names are read once, here, from the settings aura.owner_role,
-- aura.writer_role, aura.projector_role, aura.reader_role and
-- aura.handler_role (defaults aura_owner, aura_writer, aura_projector,
-- aura_reader, aura_handler), e.g.
--   PGOPTIONS='-c aura.writer_role=orders_writer' aura-pg migrate
-- and kept in aura.role_names, where the functions that create read models
-- at runtime find them. Roles are cluster-wide: a role that exists already
-- is used as it is (a superuser is refused). docs/operators.md describes
-- the roles and their login users.
CREATE TABLE aura.role_names (
    kind       text PRIMARY KEY,
    role_name  text NOT NULL UNIQUE,
    CONSTRAINT role_kind_valid CHECK (kind IN ('owner', 'writer', 'projector', 'reader', 'handler')),
    -- A longer name would be cut short silently by the name type.
    CONSTRAINT role_name_valid
        CHECK (octet_length(role_name) BETWEEN 1 AND 63 AND role_name !~ '^pg_'
               AND role_name !~ '[[:cntrl:]]'
               AND lower(role_name) NOT IN ('public', 'none', 'current_user', 'current_role',
                                            'session_user'))
);

COMMENT ON TABLE aura.role_names IS
    'The group roles of this database: owner, writer, projector, reader, handler';

INSERT INTO aura.role_names (kind, role_name)
SELECT k.kind, coalesce(nullif(current_setting('aura.' || k.kind || '_role', true), ''),
                        'aura_' || k.kind)
FROM (VALUES ('owner'), ('writer'), ('projector'), ('reader'), ('handler')) AS k(kind);

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
