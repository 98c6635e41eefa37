-- Statements `aura-pg import` (aura_pg/importer/) sends besides the
-- appends, which go through aura.append_events like every append. Each
-- starts at a "-- name:" line; the importer loads this file once at import.

-- name: record_dead_letter
-- Keeps a message that could not be imported. The same message delivered
-- again (a crash before its acknowledgement, a re-run from a new consumer:
-- the same sequence, subject, headers and payload) is already here:
-- nothing is written and no row is returned. Another message at the same
-- sequence (a stream deleted and created again) is a new row. The hash is
-- also in migration 0009 (migrations/sql/0009_defect_fixes.sql), which
-- hashed the dead letters recorded before it: keep both the same.
INSERT INTO aura.import_dead_letters
    (source, stream, subject, sequence, message_id, headers, payload, reason, content_hash)
VALUES (%(source)s, %(stream)s, %(subject)s, %(sequence)s, %(message_id)s,
        %(headers)s, %(payload)s, %(reason)s,
        sha256(convert_to(%(subject)s::text || E'\n' || %(headers)s::jsonb::text || E'\n', 'UTF8')
               || %(payload)s::bytea))
ON CONFLICT (source, stream, sequence, content_hash) DO NOTHING
RETURNING id;

-- name: claim_plain_keys
-- The first life of a stream this database sees keeps the plain sequence
-- keys (nats:<stream>:<sequence>, as before migration 0009). The partial
-- unique index lets one life per stream claim them, whoever runs at once.
INSERT INTO aura.import_stream_lives (source, stream, created, plain_keys)
VALUES (%(source)s, %(stream)s, %(created)s, true)
ON CONFLICT DO NOTHING;

-- name: record_stream_life
-- Any other life: its sequence keys name its creation time.
INSERT INTO aura.import_stream_lives (source, stream, created, plain_keys)
VALUES (%(source)s, %(stream)s, %(created)s, false)
ON CONFLICT DO NOTHING;

-- name: stream_life_plain_keys
SELECT plain_keys FROM aura.import_stream_lives
WHERE source = %(source)s AND stream = %(stream)s AND created = %(created)s;

-- name: schema_ready
-- Whether migration 0009 ran (0008 made the dead letters, 0009 the stream
-- lives): the importer checks before it reads a message.
SELECT to_regclass('aura.import_dead_letters') IS NOT NULL
   AND to_regclass('aura.import_stream_lives') IS NOT NULL;

-- name: hold_consumer
-- One importer at a time per consumer: the others stand by. A session lock
-- (class 'auri'), held on a connection of its own for the whole run and
-- released when that session ends, whatever ends it (a kill included).
SELECT pg_try_advisory_lock(1635086953,
                            hashtext(%(source)s || ':' || %(stream)s || ':' || %(consumer)s));

-- name: still_holding
-- The holder's session is alive (it still holds the lock).
SELECT 1;
