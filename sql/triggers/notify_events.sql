-- Wakes projector daemons started with --wake listen: one NOTIFY
-- aura_events per appending transaction (Postgres folds identical
-- notifications of a transaction into one), delivered when it commits.
-- Daemons also poll, so a lost notification delays a projection by at most
-- its poll interval.
--
-- Opt-in: the trigger fires only in sessions (or for roles) that
-- SET aura.notify = on, e.g.
--   ALTER ROLE app_writer SET aura.notify = on;
-- Daemons do not need it: each daemon's log watcher reads the read horizon
-- every few milliseconds and wakes its runners when it moves. A notifying
-- transaction takes a cluster-wide lock from its pre-commit until its
-- commit ends, so notifying appends commit one at a time;
-- docs/performance.md ("The cost of NOTIFY") has the measured cost. The
-- WHEN clause keeps the trigger function from being called at all when the
-- setting is off, so an append pays only for reading one setting.
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
    FOR EACH STATEMENT
    WHEN (coalesce(current_setting('aura.notify', true), '') = 'on')
    EXECUTE FUNCTION aura.notify_events();
