-- The database itself refuses to change or remove recorded events.
CREATE OR REPLACE FUNCTION aura.refuse_mutation() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%.% is append-only: % is not allowed', TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'AU004',
              HINT = 'Recorded events are immutable; append a compensating event instead.';
END;
$$;

CREATE TRIGGER events_refuse_update_delete
    BEFORE UPDATE OR DELETE ON aura.events
    FOR EACH STATEMENT EXECUTE FUNCTION aura.refuse_mutation();

CREATE TRIGGER events_refuse_truncate
    BEFORE TRUNCATE ON aura.events
    FOR EACH STATEMENT EXECUTE FUNCTION aura.refuse_mutation();
