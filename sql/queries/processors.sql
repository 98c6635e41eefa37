-- Statements the daemon and the CLI send for Python processors
-- (sql/functions/processors.sql). Each starts at a "-- name:" line.

-- name: register
SELECT aura.register_processor(
    %(name)s, %(description)s, %(handler)s, %(event_types)s::text[], %(partitions)s,
    %(batch_size)s, %(max_retries)s, %(retry_base_ms)s, %(retry_max_ms)s,
    %(circuit_failure_threshold)s, %(circuit_recovery_seconds)s);

-- name: batch
-- The batch's events, one per row in apply order, each with where the
-- checkpoint goes after the batch; one row with NULL event columns when
-- there is none.
SELECT b.next_transaction_id::text, b.next_position, b.caught_up, b.status, b.idle,
       b.global_position, b.transaction_id::text, b.event_id, b.stream_id, b.version, b.type,
       b.data, b.metadata, b.idempotency_key, b.recorded_at
FROM aura.processor_batch(%(name)s, %(transaction_id)s::xid8, %(position)s, %(limit)s,
                          %(generation)s) AS b;

-- name: advance
-- In the batch's transaction, after the handler: the checkpoint, and how
-- long the batch's events waited from append to now (just before the
-- commit, by the database's clock), for the end-to-end histogram.
SELECT aura.advance_processor(%(name)s, %(transaction_id)s::xid8, %(position)s,
                              %(next_transaction_id)s::xid8, %(next_position)s, %(owner)s,
                              %(generation)s, %(applied)s, %(last_position)s,
                              %(last_recorded_at)s),
       clock_timestamp();

-- name: rows
-- The rows of a processor (NAME, or NAME/0 .. NAME/N-1).
SELECT c.name FROM aura.processor_rows(%(name)s) AS c;

-- name: row_kind
SELECT c.kind, c.handler FROM aura.projection_checkpoints c WHERE c.name = %(name)s;

-- name: letter_projection
SELECT d.projection, c.kind, c.handler
FROM aura.dead_letters d
JOIN aura.projection_checkpoints c ON c.name = d.projection
WHERE d.id = %(id)s;

-- name: dead_letter_event
SELECT e.global_position, e.transaction_id::text, e.event_id, e.stream_id, e.version, e.type,
       e.data, e.metadata, e.idempotency_key, e.recorded_at
FROM aura.processor_dead_letter(%(id)s) AS e;

-- name: dead_letter_retried
SELECT aura.dead_letter_retried(%(id)s);

-- name: replay_events
SELECT e.global_position, e.transaction_id::text, e.event_id, e.stream_id, e.version, e.type,
       e.data, e.metadata, e.idempotency_key, e.recorded_at
FROM aura.processor_replay_events(%(name)s, %(stream_id)s, %(from_version)s) AS e;

-- name: repartition
SELECT aura.repartition_processor(%(name)s, %(partitions)s);

-- name: terminate
-- Ends the session of a batch whose handler overran its timeout: its
-- transaction rolls back, whatever the handler is doing meanwhile.
SELECT pg_terminate_backend(%(pid)s);
