-- Statements `aura-pg relay` (aura_pg/outbox/relay.py) sends. Each starts at a
-- "-- name:" line; the relay loads this file once at import. They run in one
-- transaction per batch: claim, publish (outside the database), mark, commit.

-- name: claim_batch
-- Due pending messages of the sinks this relay serves, oldest first, locked
-- until the batch commits. SKIP LOCKED: rows another relay is publishing are
-- passed over, not waited for, so relays can run side by side.
-- %(any_topic_sinks)s: sinks served for every topic (nats);
-- %(sinks)s / %(topics)s: (sink, topic) pairs served one by one (webhooks).
SELECT o.id, o.sink, o.topic, o.message_id, o.payload::text, o.headers, o.attempts
FROM aura.outbox AS o
WHERE o.status = 'pending'
  AND o.next_attempt_at <= now()
  AND (o.sink = ANY (%(any_topic_sinks)s::text[])
       OR (o.sink, o.topic) IN (SELECT s.sink, s.topic
                                FROM unnest(%(sinks)s::text[], %(topics)s::text[])
                                     AS s(sink, topic)))
ORDER BY o.next_attempt_at, o.id
LIMIT %(limit)s
FOR UPDATE OF o SKIP LOCKED;

-- name: mark_delivered
UPDATE aura.outbox
SET status = 'delivered',
    delivered_at = clock_timestamp(),
    attempts = attempts + 1
WHERE id = ANY (%(ids)s::bigint[]);

-- name: mark_failed
-- One failed attempt per row: the next attempt after the row's delay (the
-- relay computes it, with jitter), or 'dead' once the row has had
-- %(max_attempts)s attempts. Returns each row's new status.
UPDATE aura.outbox AS o
SET attempts = o.attempts + 1,
    last_error = f.error,
    next_attempt_at = clock_timestamp() + make_interval(secs => f.delay),
    status = CASE WHEN o.attempts + 1 >= %(max_attempts)s THEN 'dead' ELSE 'pending' END
FROM unnest(%(ids)s::bigint[], %(errors)s::text[], %(delays)s::float8[]) AS f(id, error, delay)
WHERE o.id = f.id
RETURNING o.id, o.status;
