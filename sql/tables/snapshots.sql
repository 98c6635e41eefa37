-- Aggregate snapshots: a repository (aura_pg.aggregates) stores an
-- aggregate's state here every snapshot_every events, and loads the newest
-- valid one plus the events after it. A snapshot is a cache: dropping any
-- of them costs only speed, never correctness.
--
--   SELECT aggregate_type, count(*), max(taken_at) FROM aura.snapshots GROUP BY 1;
--   SELECT aura.drop_snapshots('my_service.orders.Order');   -- after a bad release
CREATE TABLE aura.snapshots (
    stream_id      text        PRIMARY KEY,
    -- The aggregate class (module.Name) and the shape of its state
    -- (snapshot_version): a snapshot of another is ignored, then replaced.
    aggregate_type text        NOT NULL,
    schema_version integer     NOT NULL,
    -- The stream version the state is at.
    version        bigint      NOT NULL,
    state          jsonb       NOT NULL,
    taken_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT snapshots_version_positive CHECK (version >= 1),
    CONSTRAINT snapshots_schema_version_positive CHECK (schema_version >= 1),
    CONSTRAINT snapshots_state_is_object CHECK (jsonb_typeof(state) = 'object')
);

COMMENT ON TABLE aura.snapshots IS
    'Aggregate state every snapshot_every events (a cache: safe to delete); aura.drop_snapshots';

-- Drops the snapshots of one aggregate type (all of them when NULL);
-- returns how many.
CREATE OR REPLACE FUNCTION aura.drop_snapshots(p_aggregate_type text DEFAULT NULL)
RETURNS bigint
LANGUAGE sql AS $$
    WITH dropped AS (
        DELETE FROM aura.snapshots s
         WHERE p_aggregate_type IS NULL OR s.aggregate_type = p_aggregate_type
        RETURNING 1
    )
    SELECT count(*) FROM dropped
$$;

DO $$
DECLARE
    v_owner     text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'owner');
    v_writer    text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'writer');
    v_projector text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'projector');
    v_reader    text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'reader');
BEGIN
    EXECUTE format('ALTER TABLE aura.snapshots OWNER TO %I', v_owner);
    EXECUTE format('ALTER FUNCTION aura.drop_snapshots(text) OWNER TO %I', v_owner);
    REVOKE ALL ON aura.snapshots FROM PUBLIC;
    REVOKE EXECUTE ON FUNCTION aura.drop_snapshots(text) FROM PUBLIC;
    -- Repositories run as writers, and as projectors in Python processors.
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON aura.snapshots TO %I, %I',
                   v_writer, v_projector);
    EXECUTE format('GRANT SELECT ON aura.snapshots TO %I', v_reader);
    EXECUTE format('GRANT EXECUTE ON FUNCTION aura.drop_snapshots(text) TO %I, %I',
                   v_writer, v_projector);
END
$$;
