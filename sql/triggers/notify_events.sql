-- Wakes projector daemons: one NOTIFY aura_events per appending
-- transaction (Postgres folds identical notifications of a transaction into
-- one), delivered when it commits. Daemons also poll, so a lost
-- notification delays a projection by at most its poll interval.
--
-- A notifying transaction takes a cluster-wide lock from its pre-commit
-- until its commit ends, so notifying appends commit one at a time.
-- SET aura.notify = off in a session (or for a role) appends without it;
-- docs/performance.md ("The cost of NOTIFY") has the measured cost.
CREATE OR REPLACE FUNCTION aura.notify_events() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('aura.notify', true), '') <> 'off' THEN
        PERFORM pg_notify('aura_events', '');
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER events_notify
    AFTER INSERT ON aura.events
    FOR EACH STATEMENT EXECUTE FUNCTION aura.notify_events();
