-- One row per stream: its current version (the version of its last event).
-- Appends compare-and-set this row, which also serialises appends to one
-- stream without locking anything else.
CREATE TABLE aura.streams (
    stream_id   text        PRIMARY KEY,
    version     bigint      NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT streams_version_positive CHECK (version >= 1)
) WITH (fillfactor = 70);  -- room on each page for HOT updates of version

COMMENT ON TABLE aura.streams IS 'Current version of every stream (optimistic concurrency control)';
