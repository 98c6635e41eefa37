-- Statements `aura-pg import` (aura_pg/importer.py) sends besides the
-- appends, which go through aura.append_events like every append. Each
-- starts at a "-- name:" line; the importer loads this file once at import.

-- name: record_dead_letter
-- Keeps a message that could not be imported. A message delivered again (a
-- crash before its acknowledgement, a re-run from a new consumer) is already
-- here: nothing is written and no row is returned.
INSERT INTO aura.import_dead_letters
    (source, stream, subject, sequence, message_id, headers, payload, reason)
VALUES (%(source)s, %(stream)s, %(subject)s, %(sequence)s, %(message_id)s,
        %(headers)s, %(payload)s, %(reason)s)
ON CONFLICT (source, stream, sequence) DO NOTHING
RETURNING id;

-- name: schema_ready
-- Whether migration 0008 ran: the importer checks before it reads a message.
SELECT to_regclass('aura.import_dead_letters') IS NOT NULL;
