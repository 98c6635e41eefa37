-- Creates the timescaledb extension (in schema public) where the server
-- preloads it, before any daemon or writer connects.
--
-- Why here and not only when agent_performance is first registered: a
-- backend that already runs when the extension appears loads TimescaleDB's
-- library at its next parse analysis, and that can happen in the middle of
-- planning (a SQL function inlined into a cached plan). TimescaleDB 2.19's
-- planner hooks then run without the per-query state their own planner
-- entry point sets up, and the backend crashes (a NULL dereference in
-- BaserelInfo_insert), which restarts the whole server. Created here, the
-- extension exists before the sessions that use it start.
--
-- Skipped where aura.timescaledb is off, where the extension is missing or
-- not preloaded (CREATE EXTENSION would fail there), or where it exists.
DO $$
BEGIN
    IF lower(coalesce(nullif(current_setting('aura.timescaledb', true), ''), 'on'))
           NOT IN ('off', 'false', '0', 'no')
       AND EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')
       AND current_setting('shared_preload_libraries') ~ '(^|[\s,"])timescaledb([\s,"]|$)'
       AND NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        CREATE EXTENSION timescaledb SCHEMA public;
    END IF;
END
$$;
