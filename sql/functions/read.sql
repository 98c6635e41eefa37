-- Reading the log.
--
-- Global reads are ordered and checkpointed on (transaction_id,
-- global_position) and only return events of transactions older than every
-- transaction still running (pg_snapshot_xmin). Positions are assigned at
-- insert but transactions commit in any order; reading by position alone
-- could skip an event whose transaction commits late. This order cannot.
-- The price: a long-open transaction holds every reader back
-- (see aura.read_horizon_status).

-- Events after the checkpoint (after_transaction_id, after_position) in
-- commit order, at most p_limit (NULL: no limit), optionally of some types.
-- Start from ('0', 0).
CREATE OR REPLACE FUNCTION aura.read_all(
    p_after_transaction_id xid8,
    p_after_position       bigint,
    p_limit                integer DEFAULT 1000,
    p_types                text[]  DEFAULT NULL
) RETURNS SETOF aura.events
LANGUAGE sql STABLE
AS $$
    SELECT e.*
    FROM aura.events e
    WHERE (e.transaction_id, e.global_position) > (p_after_transaction_id, p_after_position)
      AND e.transaction_id < pg_snapshot_xmin(pg_current_snapshot())
      AND (p_types IS NULL OR e.type = ANY (p_types))
    ORDER BY e.transaction_id, e.global_position
    LIMIT p_limit
$$;

-- The newest event that aura.read_all can return now: a reader that has
-- seen everything up to here may checkpoint here, even when a type filter
-- let none of the last events through. Called in the same statement as
-- aura.read_all, both see one snapshot.
CREATE OR REPLACE FUNCTION aura.read_horizon(
    OUT transaction_id  xid8,
    OUT global_position bigint
)
LANGUAGE sql STABLE
AS $$
    SELECT e.transaction_id, e.global_position
    FROM aura.events e
    WHERE e.transaction_id < pg_snapshot_xmin(pg_current_snapshot())
    ORDER BY e.transaction_id DESC, e.global_position DESC
    LIMIT 1
$$;

-- Events of one stream from a version on, forwards (ascending) or backwards.
CREATE OR REPLACE FUNCTION aura.read_stream(
    p_stream_id    text,
    p_from_version bigint  DEFAULT 1,
    p_limit        integer DEFAULT NULL,
    p_backwards    boolean DEFAULT false
) RETURNS SETOF aura.events
LANGUAGE sql STABLE
AS $$
    -- One branch per direction, so each is an index range scan on
    -- (stream_id, version) that stops after p_limit rows.
    (SELECT e.*
     FROM aura.events e
     WHERE NOT p_backwards AND e.stream_id = p_stream_id AND e.version >= p_from_version
     ORDER BY e.version
     LIMIT p_limit)
    UNION ALL
    (SELECT e.*
     FROM aura.events e
     WHERE p_backwards AND e.stream_id = p_stream_id AND e.version <= p_from_version
     ORDER BY e.version DESC
     LIMIT p_limit)
$$;

-- The stream's current version; 0 when the stream has no events.
CREATE OR REPLACE FUNCTION aura.stream_version(p_stream_id text) RETURNS bigint
LANGUAGE sql STABLE
AS $$
    SELECT coalesce((SELECT e.version FROM aura.events e WHERE e.stream_id = p_stream_id
                     ORDER BY e.version DESC LIMIT 1), 0)
$$;
