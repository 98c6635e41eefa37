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
