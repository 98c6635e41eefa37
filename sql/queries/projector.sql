-- Statements the projector daemon and the projection CLI send. Each starts
-- at a "-- name:" line; loaded once at import.

-- name: session_settings
-- Every daemon connection: bounded statements and lock waits, and TCP
-- keepalives from the server's side, so a vanished daemon's session (and
-- the advisory locks it holds) ends within about half a minute.
SELECT set_config('statement_timeout', %(statement_timeout)s, false),
       set_config('lock_timeout', %(lock_timeout)s, false),
       set_config('tcp_keepalives_idle', '10', false),
       set_config('tcp_keepalives_interval', '5', false),
       set_config('tcp_keepalives_count', '3', false),
       set_config('client_connection_check_interval', '5000', false),
       set_config('synchronous_commit', %(synchronous_commit)s, false);

-- name: register
SELECT aura.register_projection(
    %(name)s, %(description)s, %(schema)s, %(handler)s, %(handler_kind)s,
    %(event_types)s::text[], %(forget_handler)s, %(definition_sql)s, %(batch_size)s,
    %(max_retries)s, %(retry_base_ms)s, %(retry_max_ms)s, %(circuit_failure_threshold)s,
    %(circuit_recovery_seconds)s);

-- name: try_lock
-- Ownership: a session advisory lock, released when the connection ends.
-- The key is 64 bits of md5 of the name, so two names practically never
-- share a lock.
SELECT pg_try_advisory_lock(
    ('x' || left(md5('aura-pg projection:' || %(name)s), 16))::bit(64)::bigint);

-- name: unlock
SELECT pg_advisory_unlock(
    ('x' || left(md5('aura-pg projection:' || %(name)s), 16))::bit(64)::bigint);

-- name: claim
-- The generation comes with the checkpoint: the runner sends both back, so
-- that nothing it read of a replaced projection (a restarted shadow or
-- rebuild, a reset, a swap) is applied to or recorded against its successor.
SELECT c.transaction_id::text, c.global_position, c.status, c.batch_size, c.max_retries,
       c.retry_base_ms, c.retry_max_ms, c.circuit_state, c.circuit_open_until, c.generation
FROM aura.claim_projection(%(name)s, %(owner)s) AS c;

-- name: log_origin
-- Events whose transaction ids are not below this cluster's next one came
-- from another cluster (dump and restore, logical replication): gap-free
-- reads would hide them and skip new events. Cheap: one index probe.
SELECT (SELECT max(e.transaction_id) FROM aura.events e)::text,
       pg_snapshot_xmax(pg_current_snapshot())::text,
       (SELECT max(e.transaction_id) FROM aura.events e) >= pg_snapshot_xmax(pg_current_snapshot());

-- name: load
SELECT c.transaction_id::text, c.global_position, c.status, c.batch_size, c.max_retries,
       c.retry_base_ms, c.retry_max_ms, c.circuit_state, c.circuit_open_until, c.generation
FROM aura.projection_checkpoints c
WHERE c.name = %(name)s;

-- name: project_batch
-- For metrics: the applied events counted by type, and their times from
-- append to now (just before the commit, by the database's clock) counted
-- into the histogram's buckets here, so a batch of thousands sends a few
-- numbers. %(negated_bounds)s are the bucket bounds negated, ascending:
-- width_bucket(-s, ...) counts the bounds >= s, so the bucket (bounds <= s
-- excluded, as Prometheus's "le" wants) is %(bounds)s minus that. For
-- traces, only when the daemon records them (%(traced)s): each applied
-- event's id, type, stream, version and traceparent.
SELECT b.applied, b.transaction_id::text, b.global_position, b.caught_up, b.status,
       t.type_names, t.type_counts, h.buckets, h.bucket_counts, h.seconds,
       b.event_ids, CASE WHEN %(traced)s THEN b.event_types END, b.stream_ids, b.versions,
       b.traceparents
FROM aura.project_batch(%(name)s, %(transaction_id)s::xid8, %(position)s, %(owner)s,
                        %(limit)s, %(traced)s, %(generation)s) AS b
LEFT JOIN LATERAL (
    SELECT array_agg(n.type) AS type_names, array_agg(n.events) AS type_counts
    FROM (SELECT e AS type, count(*)::integer AS events
          FROM unnest(b.event_types) AS e GROUP BY e) AS n
) AS t ON true
LEFT JOIN LATERAL (
    SELECT array_agg(x.bucket) AS buckets, array_agg(x.events) AS bucket_counts,
           sum(x.seconds) AS seconds
    FROM (SELECT %(bounds)s - width_bucket(-z.s, %(negated_bounds)s::float8[]) AS bucket,
                 count(*)::integer AS events, sum(z.s) AS seconds
          FROM (SELECT greatest(date_part('epoch', c.finished - r), 0) AS s
                FROM unnest(b.recorded_times) AS r,
                     (SELECT clock_timestamp() AS finished) AS c) AS z
          GROUP BY 1) AS x
) AS h ON true;

-- name: record_failure
SELECT f.consecutive_failures, f.circuit_state, f.circuit_open_until
FROM aura.record_projection_failure(%(name)s, %(transaction_id)s::xid8, %(position)s,
                                    %(owner)s, %(error)s, %(sqlstate)s, %(generation)s) AS f;

-- name: next_event
-- The event the projection would apply next (the poison candidate).
SELECT e.event_id, e.global_position, e.type
FROM aura.projection_checkpoints c
CROSS JOIN LATERAL aura.read_projection(c, 1) AS e
WHERE c.name = %(name)s;

-- name: pending_events
-- How many events a batch of at most %(limit)s holds now: the size of a
-- batch that failed, which the runner then retries in halves.
SELECT count(*)::integer
FROM aura.projection_checkpoints c
CROSS JOIN LATERAL aura.read_projection(c, %(limit)s) AS e
WHERE c.name = %(name)s;

-- name: dead_letter_next
SELECT d.dead_letter_id, d.transaction_id::text, d.global_position
FROM aura.dead_letter_next(%(name)s, %(transaction_id)s::xid8, %(position)s, %(owner)s,
                           %(event_id)s, %(error)s, %(sqlstate)s, %(attempts)s,
                           %(first_failed_at)s, %(generation)s) AS d;

-- name: release
SELECT aura.release_projection(%(name)s, %(owner)s);

-- name: begin_rebuild
SELECT aura.begin_rebuild(%(name)s);

-- name: generation
-- In begin_rebuild's transaction (which holds the row): the rebuild it
-- began or resumed, which only that process may swap in.
SELECT c.generation FROM aura.projection_checkpoints c WHERE c.name = %(name)s;

-- name: finish_rebuild
SELECT aura.finish_rebuild(%(name)s, %(owner)s, %(generation)s);

-- name: abort_rebuild
SELECT aura.abort_rebuild(%(name)s);

-- name: events_behind
SELECT s.events_behind, s.events_applied FROM aura.projection_status s WHERE s.name = %(name)s;

-- name: status
SELECT s.name, s.status, s.circuit, s.owner, s.checkpoint, s.events_applied, s.events_behind,
       s.seconds_behind, s.consecutive_failures, s.last_error, s.dead_letters,
       s.rebuild_needed, s.rebuild_of, s.schema_name, s.updated_at
FROM aura.projection_status s;

-- name: pause
SELECT aura.pause_projection(%(name)s);

-- name: resume
SELECT aura.resume_projection(%(name)s);

-- name: reset
SELECT aura.reset_projection(%(name)s);

-- name: replay_stream
SELECT aura.replay_stream(%(name)s, %(stream_id)s, %(from_version)s);

-- name: dead_letters
SELECT d.id, d.projection, d.global_position, d.event_id, d.stream_id, d.event_type,
       d.attempts, d.error, d.first_failed_at, d.last_failed_at
FROM aura.pending_dead_letters d
WHERE %(projection)s::text IS NULL OR d.projection = %(projection)s::text;

-- name: retry_dead_letter
SELECT aura.retry_dead_letter(%(id)s);

-- name: skip_dead_letter
SELECT aura.skip_dead_letter(%(id)s, %(note)s);

-- name: watch_horizon
-- The log watcher's tick: the newest event aura.read_all can return now.
-- One backward step of the (transaction_id, global_position) index, bounded
-- by the snapshot's xmin, however many events are still in flight above it.
SELECT h.transaction_id::text, h.global_position FROM aura.read_horizon() AS h;
