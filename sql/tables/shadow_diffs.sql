-- The last comparison of each shadow with its live projection
-- (aura.diff_shadow writes it; metrics export it).
CREATE TABLE aura.shadow_diffs (
    projection      text        PRIMARY KEY REFERENCES aura.projection_checkpoints (name)
                                ON DELETE CASCADE,
    transaction_id  xid8        NOT NULL,
    global_position bigint      NOT NULL,
    tables          integer     NOT NULL,
    differing_rows  bigint      NOT NULL,
    diffed_at       timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE aura.shadow_diffs IS
    'The last aura.diff_shadow of each projection with a shadow: where, and how many rows differed';

-- The owner owns it; the projector writes it (aura.diff_shadow, run by
-- the projector role, records each comparison).
DO $$
DECLARE
    v_owner     text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'owner');
    v_projector text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'projector');
BEGIN
    EXECUTE format('ALTER TABLE aura.shadow_diffs OWNER TO %I', v_owner);
    REVOKE ALL ON aura.shadow_diffs FROM PUBLIC;
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON aura.shadow_diffs TO %I', v_projector);
END
$$;
