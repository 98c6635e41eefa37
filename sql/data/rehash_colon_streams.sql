-- Migration 0006, data: events of streams whose id contains ':' were
-- recorded with sha256(stream_id || ':' || key), which is ambiguous for such
-- ids (stream 'a:b' with key 'c' and stream 'a' with key 'b:c' had one
-- hash, so the second append was answered as a duplicate of the first).
-- aura.idempotency_hash now hashes those ids unambiguously; their recorded
-- events get the new hash here, so that a resend of one is still
-- recognised. The append-only trigger is set aside for this one statement
-- (the migration holds the table's lock; nothing else changes).
ALTER TABLE aura.events DISABLE TRIGGER events_refuse_update_delete;
UPDATE aura.events e
   SET idempotency_hash = aura.idempotency_hash(e.stream_id, e.idempotency_key)
 WHERE pg_catalog.strpos(e.stream_id, ':') > 0
   AND e.idempotency_hash IS DISTINCT FROM aura.idempotency_hash(e.stream_id, e.idempotency_key);
ALTER TABLE aura.events ENABLE TRIGGER events_refuse_update_delete;
