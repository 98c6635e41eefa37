-- Migrations 0005 and 0006 (after functions/append_events.sql, whose
-- CREATE OR REPLACE resets these attributes): the writer's only way in runs
-- as the owner. Every name in its body (and in the helpers, triggers and
-- defaults it reaches) is schema-qualified or in pg_catalog; pg_temp comes
-- last, so no temporary object can stand in.
ALTER FUNCTION aura.append_events(text, jsonb, text)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
