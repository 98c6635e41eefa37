-- Migration 0009: a dead letter of `aura-pg import` is identified by its
-- sequence and a hash of its content, not by the sequence alone (which a
-- stream deleted and created again starts over). Idempotent: a fresh
-- install, where tables/import_dead_letters.sql already has this shape,
-- runs it too.
--
-- The hash is the formula of queries/importer.sql (record_dead_letter):
-- both must stay the same, or a message dead-lettered before this
-- migration and delivered again would be stored twice.
ALTER TABLE aura.import_dead_letters ADD COLUMN IF NOT EXISTS content_hash bytea;

UPDATE aura.import_dead_letters
SET content_hash = sha256(convert_to(subject || E'\n' || headers::text || E'\n', 'UTF8') || payload)
WHERE content_hash IS NULL;

ALTER TABLE aura.import_dead_letters ALTER COLUMN content_hash SET NOT NULL;

ALTER TABLE aura.import_dead_letters DROP CONSTRAINT IF EXISTS import_dead_letter_once;
ALTER TABLE aura.import_dead_letters
    ADD CONSTRAINT import_dead_letter_once UNIQUE (source, stream, sequence, content_hash);
