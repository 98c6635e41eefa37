-- Projections: one row per projection, holding its definition (synced from
-- projections/catalog.yaml by the daemon), its checkpoint and its health.
-- A batch is applied and the checkpoint advanced in one transaction
-- (aura.project_batch), so a read model is exactly the fold of the events
-- before its checkpoint.

-- Generations: every row (a new projection, shadow or rebuild) and every
-- reset or swap takes the next value, so a value is never seen twice, for
-- any name. A batch read under one definition or incarnation of
-- a projection cannot match another's, even a restarted shadow or rebuild
-- back at checkpoint 0/0.
CREATE SEQUENCE aura.projection_generation;

CREATE TABLE aura.projection_checkpoints (
    name                      text        PRIMARY KEY,
    description               text        NOT NULL DEFAULT '',
    -- The read model: the schema the definition SQL was run in, the handler
    -- function in it, and the events it folds (NULL: every type). A Python
    -- processor (kind 'python') has no schema: its handler is the
    -- 'module:callable' the daemon imports.
    schema_name               text        UNIQUE,
    handler                   text        NOT NULL,
    handler_kind              text        NOT NULL,
    event_types               text[],
    forget_handler            text,
    definition_sql            text        NOT NULL,
    definition_hash           text        NOT NULL,
    -- A changed definition waits here until a rebuild swaps it in.
    next_definition           jsonb,
    -- Settings from the catalog.
    batch_size                integer     NOT NULL DEFAULT 500,
    max_retries               integer     NOT NULL DEFAULT 3,
    retry_base_ms             integer     NOT NULL DEFAULT 100,
    retry_max_ms              integer     NOT NULL DEFAULT 10000,
    circuit_failure_threshold integer     NOT NULL DEFAULT 5,
    circuit_recovery_seconds  integer     NOT NULL DEFAULT 30,
    -- Checkpoint: everything before (transaction_id, global_position) in
    -- aura.read_all order has been applied, nothing after it.
    status                    text        NOT NULL DEFAULT 'running',
    transaction_id            xid8        NOT NULL DEFAULT '0',
    global_position           bigint      NOT NULL DEFAULT 0,
    events_applied            bigint      NOT NULL DEFAULT 0,
    last_applied_position     bigint,
    last_applied_recorded_at  timestamptz,
    -- Health.
    last_error                text,
    last_error_at             timestamptz,
    consecutive_failures      integer     NOT NULL DEFAULT 0,
    circuit_state             text        NOT NULL DEFAULT 'closed',
    circuit_open_until        timestamptz,
    owner                     text,
    owner_since               timestamptz,
    -- Taken afresh (aura.projection_generation) by every new row, reset and
    -- swap: a batch read before one of those must not be applied after it,
    -- even at an equal checkpoint (it was read with the replaced
    -- definition's event types, and its session may still resolve names to
    -- the replaced model).
    generation                bigint      NOT NULL
                                          DEFAULT nextval('aura.projection_generation'),
    -- A rebuild's row names the projection it will replace; a shadow's
    -- (NAME__shadow, aura.begin_shadow) the live projection it runs beside.
    rebuild_of                text        REFERENCES aura.projection_checkpoints (name)
                                          ON DELETE CASCADE,
    shadow_of                 text        REFERENCES aura.projection_checkpoints (name)
                                          ON DELETE CASCADE,
    created_at                timestamptz NOT NULL DEFAULT now(),
    updated_at                timestamptz NOT NULL DEFAULT now(),
    -- 'sql': a read model folded in SQL by aura.project_batch; 'python': a
    -- Python processor whose handler the daemon runs (aura.processor_batch).
    kind                      text        NOT NULL DEFAULT 'sql',
    -- A partitioned processor has one row per partition, NAME/INDEX: it
    -- gets the events of the streams with aura.stream_partition(stream_id,
    -- partition_count) = partition_index.
    partition_index           integer,
    partition_count           integer,
    -- After `aura-pg projections repartition`: the previous partitioning's
    -- count and checkpoints ({"count": N, "checkpoints": [[tx, pos], ...]});
    -- events a previous partition had applied are not delivered again.
    handover                  jsonb,
    CONSTRAINT projection_name_valid
        CHECK (name ~ '^[a-z][a-z0-9]*(_[a-z0-9]+)*(__rebuild|__shadow|/[0-9]{1,2})?$'
               AND char_length(name) <= 48),
    CONSTRAINT projection_kind_valid CHECK (kind IN ('sql', 'python')),
    CONSTRAINT projection_schema_valid
        CHECK (CASE kind
                   WHEN 'sql' THEN schema_name ~ '^[a-z][a-z0-9]*(_[a-z0-9]+)*(__rebuild|__shadow)?$'
                                   AND char_length(schema_name) <= 50
                   ELSE schema_name IS NULL
               END),
    CONSTRAINT projection_handler_valid
        CHECK (CASE kind
                   WHEN 'sql' THEN handler ~ '^[a-z_][a-z0-9_]{0,62}$'
                   ELSE handler ~ '^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$'
                        AND char_length(handler) <= 300
               END),
    CONSTRAINT projection_partition_valid
        CHECK (CASE WHEN partition_count IS NULL
                    THEN partition_index IS NULL AND name !~ '/'
                    ELSE kind = 'python' AND partition_count BETWEEN 2 AND 64
                         AND partition_index BETWEEN 0 AND partition_count - 1
                         AND name ~ ('/' || partition_index || '$')
               END),
    CONSTRAINT projection_python_row_valid
        CHECK (kind = 'sql' OR rebuild_of IS NULL AND shadow_of IS NULL AND forget_handler IS NULL),
    CONSTRAINT projection_forget_handler_valid
        CHECK (forget_handler IS NULL OR forget_handler ~ '^[a-z_][a-z0-9_]{0,62}$'),
    CONSTRAINT projection_handler_kind_valid CHECK (handler_kind IN ('per_event', 'set_based')),
    CONSTRAINT projection_status_valid
        CHECK (status IN ('running', 'paused', 'failed', 'rebuilding')),
    CONSTRAINT projection_circuit_state_valid
        CHECK (circuit_state IN ('closed', 'open', 'half_open')),
    CONSTRAINT projection_settings_valid
        CHECK (batch_size BETWEEN 1 AND 100000 AND max_retries BETWEEN 0 AND 100
               AND retry_base_ms BETWEEN 0 AND 3600000 AND retry_max_ms >= retry_base_ms
               AND circuit_failure_threshold >= 1 AND circuit_recovery_seconds >= 0),
    CONSTRAINT projection_rebuild_row_valid
        CHECK ((rebuild_of IS NULL) = (name !~ '__rebuild$')),
    CONSTRAINT projection_shadow_row_valid
        CHECK ((shadow_of IS NULL) = (name !~ '__shadow$'))
) WITH (fillfactor = 50);

ALTER SEQUENCE aura.projection_generation OWNED BY aura.projection_checkpoints.generation;

COMMENT ON TABLE aura.projection_checkpoints IS
    'One row per projection: definition, checkpoint, status, errors, circuit breaker and owner';

-- Events a projection could not apply after its retries: skipped, kept
-- here for an operator to retry (aura.retry_dead_letter) or skip.
CREATE TABLE aura.dead_letters (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    projection       text        NOT NULL,
    global_position  bigint      NOT NULL,
    transaction_id   xid8        NOT NULL,
    event_id         uuid        NOT NULL,
    stream_id        text        NOT NULL,
    event_type       text        NOT NULL,
    error            text        NOT NULL,
    error_sqlstate   text,
    attempts         integer     NOT NULL,
    first_failed_at  timestamptz NOT NULL,
    last_failed_at   timestamptz NOT NULL,
    status           text        NOT NULL DEFAULT 'pending',
    resolved_at      timestamptz,
    resolution_note  text,
    CONSTRAINT dead_letter_status_valid
        CHECK (status IN ('pending', 'retried', 'skipped', 'superseded'))
);

CREATE UNIQUE INDEX dead_letters_pending_key
    ON aura.dead_letters (projection, global_position) WHERE status = 'pending';

COMMENT ON TABLE aura.dead_letters IS
    'Events a projection skipped after its retries; retry or skip them with aura.retry_dead_letter / aura.skip_dead_letter';
