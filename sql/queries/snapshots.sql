-- Statements of the aggregate repositories (aura_pg/aggregates) for
-- aura.snapshots. Each starts at a "-- name:" line.

-- name: load
SELECT s.aggregate_type, s.schema_version, s.version, s.state
FROM aura.snapshots s
WHERE s.stream_id = %(stream_id)s;

-- name: save
-- A newer state replaces an older one; a snapshot of another type or
-- schema version is replaced whatever its version.
INSERT INTO aura.snapshots AS s (stream_id, aggregate_type, schema_version, version, state)
VALUES (%(stream_id)s, %(aggregate_type)s, %(schema_version)s, %(version)s, %(state)s)
ON CONFLICT (stream_id) DO UPDATE
   SET aggregate_type = excluded.aggregate_type, schema_version = excluded.schema_version,
       version = excluded.version, state = excluded.state, taken_at = now()
 WHERE s.version < excluded.version
    OR s.aggregate_type <> excluded.aggregate_type
    OR s.schema_version <> excluded.schema_version;
