-- What holds readers back: global reads stop below the oldest transaction
-- still running. One row per open transaction that has written (it has an
-- xid), oldest first. Set idle_in_transaction_session_timeout so a
-- forgotten session cannot stall projections for long.
CREATE OR REPLACE VIEW aura.read_horizon_status AS
SELECT a.pid,
       a.usename             AS user_name,
       a.application_name,
       a.state,
       a.backend_xid,
       now() - a.xact_start  AS transaction_age,
       now() - a.state_change AS state_age,
       left(a.query, 200)    AS last_query
FROM pg_stat_activity a
WHERE a.backend_xid IS NOT NULL
ORDER BY a.xact_start;

COMMENT ON VIEW aura.read_horizon_status IS
    'Open writing transactions, oldest first: the oldest holds every global reader back';
