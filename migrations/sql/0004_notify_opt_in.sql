-- Migration 0004, frozen: exactly what it runs, the SQL files it loaded when
-- it was released, each after a '-- sql/<file>' line. Never edit this file:
-- a change to the schema is a new migration (docs/migrations.md).
-- sql/triggers/notify_opt_in.sql
-- NOTIFY aura_events becomes opt-in: the statement trigger fires only in
-- sessions (or for roles) that SET aura.notify = on.
--
-- Projector daemons no longer need it: each daemon's log watcher reads the
-- read horizon every few milliseconds and wakes its runners when it moves
-- (aura_pg/projector.py, LogWatcher). A notifying transaction holds a
-- cluster-wide lock across its commit, so notifying appends commit one at a
-- time; docs/performance.md ("The cost of NOTIFY") has the measurements.
-- Daemons started with --wake listen still LISTEN; their writers turn it on:
--   ALTER ROLE app_writer SET aura.notify = on;
-- The WHEN clause keeps the trigger function from being called at all when
-- the setting is off, so an append pays only for reading one setting.
DROP TRIGGER events_notify ON aura.events;

CREATE TRIGGER events_notify
    AFTER INSERT ON aura.events
    FOR EACH STATEMENT
    WHEN (coalesce(current_setting('aura.notify', true), '') = 'on')
    EXECUTE FUNCTION aura.notify_events();

