-- Each shadow beside its live projection: how far behind each is, and the
-- last comparison.
CREATE OR REPLACE VIEW aura.shadow_status AS
SELECT live.name                  AS projection,
       shadow.name                AS shadow,
       live.checkpoint            AS live_checkpoint,
       shadow.checkpoint          AS shadow_checkpoint,
       live.events_behind         AS live_events_behind,
       shadow.events_behind       AS shadow_events_behind,
       shadow.seconds_behind      AS shadow_seconds_behind,
       shadow.status              AS shadow_status,
       shadow.circuit             AS shadow_circuit,
       shadow.dead_letters        AS shadow_dead_letters,
       d.transaction_id::text || '/' || d.global_position AS diffed_at_checkpoint,
       d.differing_rows,
       d.tables                   AS diffed_tables,
       d.diffed_at
FROM aura.projection_checkpoints c
JOIN aura.projection_status shadow ON shadow.name = c.name
JOIN aura.projection_status live ON live.name = c.shadow_of
LEFT JOIN aura.shadow_diffs d ON d.projection = c.shadow_of
WHERE c.shadow_of IS NOT NULL
ORDER BY live.name;

COMMENT ON VIEW aura.shadow_status IS
    'Shadow projections beside their live ones: lag, health and the last aura.diff_shadow';

-- The owner's, readable by the projector and reader roles, like the other
-- operator views.
DO $$
DECLARE
    v_owner     text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'owner');
    v_projector text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'projector');
    v_reader    text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'reader');
BEGIN
    EXECUTE format('ALTER VIEW aura.shadow_status OWNER TO %I', v_owner);
    REVOKE ALL ON aura.shadow_status FROM PUBLIC;
    EXECUTE format('GRANT SELECT ON aura.shadow_status TO %I, %I', v_projector, v_reader);
END
$$;
