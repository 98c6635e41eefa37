-- The transactional outbox: messages for external systems, written in the
-- transaction that produced them (an append, or a projection's batch), and
-- published by `aura-pg relay`, at least once, carrying message_id so that
-- receivers can drop duplicates.
CREATE TABLE aura.outbox (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sink             text        NOT NULL,
    topic            text        NOT NULL,
    message_id       uuid        NOT NULL,
    payload          jsonb       NOT NULL,
    headers          jsonb       NOT NULL DEFAULT '{}'::jsonb,
    global_position  bigint,
    status           text        NOT NULL DEFAULT 'pending',
    attempts         integer     NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    CONSTRAINT outbox_status_valid CHECK (status IN ('pending', 'delivered', 'dead')),
    CONSTRAINT outbox_headers_is_object CHECK (jsonb_typeof(headers) = 'object'),
    CONSTRAINT outbox_sink_valid CHECK (sink ~ '^[a-z][a-z0-9_]{0,62}$'),
    CONSTRAINT outbox_topic_valid
        CHECK (char_length(topic) BETWEEN 1 AND 255 AND topic !~ '[[:cntrl:]]'),
    CONSTRAINT outbox_message_once UNIQUE (sink, topic, message_id)
);

-- The relay's work queue: pending messages due now, oldest first.
CREATE INDEX outbox_pending_idx ON aura.outbox (next_attempt_at, id) WHERE status = 'pending';

COMMENT ON TABLE aura.outbox IS
    'Messages for external systems, written in the producing transaction, published by aura-pg relay';

-- Which appended events go to the outbox: every event whose type is in
-- event_types (NULL: all) is copied by a trigger on aura.events in the
-- append transaction. The trigger exists only while there is a route, so
-- appends pay nothing for an unused outbox.
CREATE TABLE aura.outbox_routes (
    name         text   PRIMARY KEY,
    event_types  text[],
    sink         text   NOT NULL,
    topic        text   NOT NULL,
    CONSTRAINT outbox_route_name_valid CHECK (name ~ '^[a-z][a-z0-9_]{0,62}$'),
    CONSTRAINT outbox_route_sink_valid CHECK (sink ~ '^[a-z][a-z0-9_]{0,62}$'),
    CONSTRAINT outbox_route_topic_valid
        CHECK (char_length(topic) BETWEEN 1 AND 255 AND topic !~ '[[:cntrl:]]')
);

COMMENT ON TABLE aura.outbox_routes IS
    'Event types copied into aura.outbox at append time; manage with aura.add_outbox_route';
