-- Messages `aura-pg import` could not import.
--
-- A message whose body is not what the mapping expects (bad JSON, a missing
-- field, the mapping raised), or whose event the store refused (an invalid
-- stream id or type, an idempotency key reused with other content), is kept
-- here with the reason and then acknowledged: nothing is dropped silently
-- and nothing blocks the source stream.
--
-- A message is identified by its sequence and its content: content_hash is
-- sha256 of subject, headers and payload (the formula is in
-- queries/importer.sql, record_dead_letter). A reject delivered again (a
-- crash before its acknowledgement, a re-run from a new consumer) is stored
-- once; another message at the same sequence (the stream deleted and
-- created again, or another cluster's stream of that name) is stored as
-- well.
CREATE TABLE aura.import_dead_letters (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source       text        NOT NULL,
    stream       text        NOT NULL,
    subject      text        NOT NULL,
    sequence     bigint      NOT NULL,
    message_id   text,
    headers      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    payload      bytea       NOT NULL,
    reason       text        NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    content_hash bytea       NOT NULL,
    CONSTRAINT import_dead_letter_source_valid CHECK (source ~ '^[a-z][a-z0-9_]{0,62}$'),
    CONSTRAINT import_dead_letter_sequence_valid CHECK (sequence >= 1),
    CONSTRAINT import_dead_letter_headers_is_object CHECK (jsonb_typeof(headers) = 'object'),
    CONSTRAINT import_dead_letter_once UNIQUE (source, stream, sequence, content_hash)
);

COMMENT ON TABLE aura.import_dead_letters IS
    'Messages aura-pg import could not import, with the reason; each source message once';

-- Ownership and privileges, as roles/grants.sql gives them for the tables
-- installed before it: the owner role owns the table, the writer role (the
-- importer connects as a writer) records and reads rejects, the projector
-- and reader roles read them. The identity sequence follows its table, and
-- an identity column needs no privilege on it.
DO $$
DECLARE
    v_owner     text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'owner');
    v_writer    text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'writer');
    v_projector text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'projector');
    v_reader    text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'reader');
BEGIN
    EXECUTE format('ALTER TABLE aura.import_dead_letters OWNER TO %I', v_owner);
    REVOKE ALL ON aura.import_dead_letters FROM PUBLIC;
    EXECUTE format('GRANT SELECT, INSERT ON aura.import_dead_letters TO %I', v_writer);
    EXECUTE format('GRANT SELECT ON aura.import_dead_letters TO %I, %I', v_projector, v_reader);
END
$$;
