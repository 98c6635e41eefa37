-- Migration 0009: generations that never repeat. Until 0008 a
-- restarted shadow or rebuild was a new row back at generation 0 and
-- checkpoint 0/0, exactly what a batch read under the old definition
-- expected, so that batch committed into the new one. Now every new row,
-- reset and swap takes the next value of aura.projection_generation, and
-- aura.project_batch, aura.record_projection_failure, aura.dead_letter_next
-- and aura.finish_rebuild take the generation their caller read.
--
-- Idempotent: a fresh install, where tables/projections.sql already has
-- this shape, runs it too. It runs after the function files of 0009 (and,
-- in sql/install.sql, after roles/grants.sql): it gives the functions whose
-- signatures changed their owner and privileges, as roles/grants.sql does.
DO $$
DECLARE
    v_owner     text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'owner');
    v_projector text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'projector');
    r record;
BEGIN
    IF to_regclass('aura.projection_generation') IS NULL THEN
        CREATE SEQUENCE aura.projection_generation;
        -- OWNED BY wants the table's owner; the sequence then follows it.
        EXECUTE format('ALTER SEQUENCE aura.projection_generation OWNER TO %s',
                       (SELECT c.relowner::regrole FROM pg_catalog.pg_class c
                        WHERE c.oid = 'aura.projection_checkpoints'::regclass));
        ALTER SEQUENCE aura.projection_generation OWNED BY aura.projection_checkpoints.generation;
    END IF;
    ALTER TABLE aura.projection_checkpoints
        ALTER COLUMN generation SET DEFAULT nextval('aura.projection_generation');
    -- Past every generation counted up from 0 before: a new one can match
    -- no row's. Only ever forward.
    PERFORM setval('aura.projection_generation', x.m)
       FROM (SELECT max(c.generation) AS m FROM aura.projection_checkpoints c) AS x
      WHERE x.m >= 1 AND x.m >= (SELECT s.last_value FROM aura.projection_generation s);

    -- Projector roles create rows and take generations (nextval needs USAGE).
    EXECUTE format('GRANT USAGE ON SEQUENCE aura.projection_generation TO %I', v_projector);
    FOR r IN SELECT p.oid::regprocedure AS fn FROM pg_catalog.pg_proc p
             WHERE p.pronamespace = 'aura'::regnamespace
               AND p.proname IN ('check_generation', 'project_batch', 'record_projection_failure',
                                 'dead_letter_next', 'finish_rebuild')
             ORDER BY p.oid LOOP
        EXECUTE format('ALTER ROUTINE %s OWNER TO %I', r.fn, v_owner);
        EXECUTE format('REVOKE EXECUTE ON ROUTINE %s FROM PUBLIC', r.fn);
        EXECUTE format('GRANT EXECUTE ON ROUTINE %s TO %I', r.fn, v_projector);
    END LOOP;
END
$$;
