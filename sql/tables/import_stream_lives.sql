-- The lives of the source streams `aura-pg import` has read. A JetStream
-- stream deleted and created again under the same name (or another
-- cluster's stream of that name) starts its sequences at 1 again; its
-- creation time tells the lives apart.
--
-- A message without a key of its own (no key from the mapping, no
-- Nats-Msg-Id) is appended under a key made of its sequence. The first life
-- of a stream this database sees keeps the plain keys
-- nats:<stream>:<sequence> (plain_keys: so keys already imported stay valid
-- for that stream); every later life gets nats:<stream>@<created>:<sequence>,
-- so its sequence 1 is not taken for the old life's event.
CREATE TABLE aura.import_stream_lives (
    source        text        NOT NULL,
    stream        text        NOT NULL,
    created       timestamptz NOT NULL,
    plain_keys    boolean     NOT NULL,
    first_seen_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT import_stream_lives_pkey PRIMARY KEY (source, stream, created),
    CONSTRAINT import_stream_life_source_valid CHECK (source ~ '^[a-z][a-z0-9_]{0,62}$')
);

-- One life per stream keeps the plain keys: concurrent importers of two
-- lives cannot both claim them.
CREATE UNIQUE INDEX import_stream_lives_plain_keys
    ON aura.import_stream_lives (source, stream) WHERE plain_keys;

COMMENT ON TABLE aura.import_stream_lives IS
    'Lives (creation times) of the source streams aura-pg import has read; which one keeps the plain sequence keys';

-- Privileges as for aura.import_dead_letters: the importer (a writer)
-- records lives and reads them; the projector and reader roles read them.
DO $$
DECLARE
    v_owner     text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'owner');
    v_writer    text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'writer');
    v_projector text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'projector');
    v_reader    text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'reader');
BEGIN
    EXECUTE format('ALTER TABLE aura.import_stream_lives OWNER TO %I', v_owner);
    REVOKE ALL ON aura.import_stream_lives FROM PUBLIC;
    EXECUTE format('GRANT SELECT, INSERT ON aura.import_stream_lives TO %I', v_writer);
    EXECUTE format('GRANT SELECT ON aura.import_stream_lives TO %I, %I', v_projector, v_reader);
END
$$;
