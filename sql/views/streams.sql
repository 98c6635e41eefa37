-- Every stream with its current version (that of its last event) and when
-- its first event still in the log was recorded. The log is the only
-- record of a stream: appends find a stream's version through the
-- (stream_id, version) index, with no row of their own to update. The
-- view walks that index one stream at a time (a loose index scan), so it
-- never reads the events table whole; it still visits every stream, so
-- ask aura.stream_version(id) for one stream.
--
--   SELECT * FROM aura.streams ORDER BY version DESC LIMIT 10;
CREATE OR REPLACE VIEW aura.streams AS
WITH RECURSIVE ids AS (
    (SELECT e.stream_id FROM aura.events e ORDER BY e.stream_id LIMIT 1)
    UNION ALL
    SELECT (SELECT e.stream_id FROM aura.events e
             WHERE e.stream_id > ids.stream_id ORDER BY e.stream_id LIMIT 1)
    FROM ids
    WHERE ids.stream_id IS NOT NULL
)
SELECT ids.stream_id, head.version, first.recorded_at AS created_at
FROM ids
CROSS JOIN LATERAL (
    SELECT e.version FROM aura.events e
     WHERE e.stream_id = ids.stream_id ORDER BY e.version DESC LIMIT 1
) AS head
CROSS JOIN LATERAL (
    SELECT e.recorded_at FROM aura.events e
     WHERE e.stream_id = ids.stream_id ORDER BY e.version LIMIT 1
) AS first
WHERE ids.stream_id IS NOT NULL;

COMMENT ON VIEW aura.streams IS
    'Every stream, its current version and its first event''s time (read from aura.events)';
