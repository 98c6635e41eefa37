-- Statements of `aura-pg projections shadow|diff|promote` (aura_pg.projection.shadows)
-- over the functions of functions/shadows.sql. Each starts at a "-- name:"
-- line.

-- name: begin_shadow
SELECT aura.begin_shadow(%(name)s, %(definition_sql)s, %(handler)s, %(handler_kind)s,
                         %(event_types)s::text[], %(forget_handler)s);

-- name: drop_shadow
SELECT aura.drop_shadow(%(name)s);

-- name: promote_shadow
SELECT aura.promote_shadow(%(name)s);

-- name: diff_shadow
SELECT d.table_name, d.difference, d.total, d.key, d.columns, d.live, d.shadow
FROM aura.diff_shadow(%(name)s, %(limit)s) AS d;

-- name: shadows_of
-- The shadows of the named projections (a daemon runs them beside them).
SELECT c.name FROM aura.projection_checkpoints c
WHERE c.shadow_of = ANY (%(names)s::text[])
ORDER BY c.name;

-- name: shadow_status
SELECT s.projection, s.shadow, s.live_checkpoint, s.shadow_checkpoint, s.live_events_behind,
       s.shadow_events_behind, s.shadow_seconds_behind::float8 AS shadow_seconds_behind,
       s.shadow_status, s.shadow_circuit, s.shadow_dead_letters, s.diffed_at_checkpoint,
       s.differing_rows, s.diffed_tables, s.diffed_at
FROM aura.shadow_status s
WHERE %(name)s::text IS NULL OR s.projection = %(name)s;
