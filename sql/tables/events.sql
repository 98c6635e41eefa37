-- The append-only log. Rows are only ever inserted, by aura.append_events.
CREATE TABLE aura.events (
    global_position  bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Writing transaction: readers order and checkpoint on
    -- (transaction_id, global_position), see aura.read_all.
    transaction_id   xid8        NOT NULL DEFAULT pg_current_xact_id(),
    event_id         uuid        NOT NULL,
    stream_id        text        NOT NULL,
    version          bigint      NOT NULL,
    type             text        NOT NULL,
    data             jsonb       NOT NULL,
    metadata         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    idempotency_key  text        NOT NULL,
    -- aura.idempotency_hash(stream_id, idempotency_key) for an event
    -- appended with a key of its own; NULL for one whose key is its event id
    -- (the unique event_id deduplicates those). See docs/event-store.md.
    idempotency_hash bytea,
    recorded_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT events_event_id_key UNIQUE (event_id),
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, version),
    CONSTRAINT events_stream_id_valid
        CHECK (char_length(stream_id) BETWEEN 1 AND 200 AND stream_id !~ '[[:cntrl:]]'),
    CONSTRAINT events_type_valid
        CHECK (char_length(type) BETWEEN 1 AND 200 AND type !~ '[[:cntrl:]]'),
    CONSTRAINT events_idempotency_key_valid
        CHECK (char_length(idempotency_key) BETWEEN 1 AND 255 AND idempotency_key !~ '[[:cntrl:]]'),
    CONSTRAINT events_idempotency_hash_length CHECK (octet_length(idempotency_hash) = 32),
    CONSTRAINT events_idempotency_hash_for_keys
        CHECK (idempotency_hash IS NOT NULL OR idempotency_key = event_id::text),
    CONSTRAINT events_version_positive CHECK (version >= 1),
    CONSTRAINT events_data_is_object CHECK (jsonb_typeof(data) = 'object'),
    CONSTRAINT events_metadata_is_object CHECK (jsonb_typeof(metadata) = 'object')
);

-- Explicit idempotency keys, one per stream. Only events that bring a key
-- are in it: most events are identified by their id alone, and a hash of
-- random bytes costs an insert at a random place of a large index.
CREATE UNIQUE INDEX events_idempotency_hash_key ON aura.events (idempotency_hash)
    WHERE idempotency_hash IS NOT NULL;

-- Commit-order reads: WHERE (transaction_id, global_position) > (...) ORDER BY both.
CREATE INDEX events_commit_order_idx ON aura.events (transaction_id, global_position);

COMMENT ON TABLE aura.events IS 'Append-only event log; UPDATE, DELETE and TRUNCATE are refused';
COMMENT ON COLUMN aura.events.transaction_id IS
    'Writing transaction (pg_current_xact_id); with global_position, the gap-free read order';
