-- Statements the Python EventStore sends. Each starts at a "-- name:" line;
-- the store loads this file once at import.

-- name: append_events
-- Rows come in batch order. New events keep the ids the client sent, so
-- only a duplicate's (original) ids travel back: parsing UUIDs costs more
-- on the client than anything else in the result.
SELECT version, global_position, duplicate, CASE WHEN duplicate THEN event_id END
FROM aura.append_events(%(stream_id)s, %(events)s::jsonb, %(expected_version)s);

-- name: read_all
-- The horizon and the page come from one statement, hence one snapshot.
SELECT h.transaction_id::text, h.global_position,
       e.global_position, e.transaction_id::text, e.event_id, e.stream_id, e.version,
       e.type, e.data, e.metadata, e.idempotency_key, e.recorded_at
FROM aura.read_horizon() AS h
LEFT JOIN LATERAL aura.read_all(%(after_transaction_id)s::xid8, %(after_position)s,
                                %(limit)s, %(types)s::text[]) AS e ON true
ORDER BY e.transaction_id, e.global_position;

-- name: read_stream
SELECT e.global_position, e.transaction_id::text, e.event_id, e.stream_id, e.version,
       e.type, e.data, e.metadata, e.idempotency_key, e.recorded_at
FROM aura.read_stream(%(stream_id)s, %(from_version)s, %(limit)s, %(backwards)s) AS e;

-- name: stream_version
SELECT aura.stream_version(%(stream_id)s);

-- name: bulk_staging
-- EventStore.append_many's staging table: one row per stream's batch, in
-- the session's own temporary schema, kept (empty) for the connection's
-- next bulk append. Each call's rows carry a token of their own.
CREATE TEMPORARY TABLE IF NOT EXISTS aura_bulk_staging (
    token uuid NOT NULL, ord int NOT NULL, stream_id text NOT NULL,
    expected_version text NOT NULL, events text NOT NULL
);

-- name: bulk_truncate
TRUNCATE pg_temp.aura_bulk_staging;

-- name: bulk_copy
COPY pg_temp.aura_bulk_staging (token, ord, stream_id, expected_version, events)
FROM STDIN (FORMAT BINARY);

-- name: append_many
-- The batches this call staged (its token; all of them, or the function
-- gets no stream and refuses), aggregated by the caller (this statement),
-- go to the function as arrays. Only a duplicate's (original) event ids
-- travel back.
WITH staged AS (
    SELECT count(*) AS streams,
           array_agg(s.stream_id ORDER BY s.ord) AS stream_ids,
           array_agg(s.expected_version ORDER BY s.ord) AS expected_versions,
           array_agg(s.events::jsonb ORDER BY s.ord) AS batches
    FROM pg_temp.aura_bulk_staging s
    WHERE s.token = %(token)s
)
SELECT r.stream_id, r.version, r.global_position, r.duplicate,
       CASE WHEN r.duplicate THEN r.event_id END
FROM staged,
     aura.append_many(CASE WHEN staged.streams = %(streams)s THEN staged.stream_ids END,
                      staged.expected_versions, staged.batches) AS r;
