-- agent_performance: how agents and debates perform over time.
--
-- Time series, one row per event, each written exactly once (a unique key
-- on (global_position, time): a replayed or duplicated event fails loudly
-- instead of counting twice):
--
--   agent_activity   a vote (DEBATE_VOTE_CAST, attributed to the voter) or a
--                    decision outcome (DECISION_APPROVED/REJECTED, attributed
--                    to the agent that proposed it, with its latency)
--   debate_endings   DEBATE_CONSENSUS_REACHED / DEBATE_FAILED / DEBATE_TIMED_OUT
--
-- Small state tables: proposals (DECISION_PROPOSED, for the latency) and
-- debates (start and end of each debate, for the active count).
--
-- Windowed views: agent_stats_5m, agent_stats_last_hour, consensus_rate_5m,
-- consensus_rate_last_hour, active_debate_count. Buckets come from
-- bucket_start(width, time), which is time_bucket on TimescaleDB and date_bin
-- (same origin, same buckets) on plain Postgres.
--
-- Storage: with the timescaledb extension available (and the setting
-- aura.timescaledb not 'off'), the two time series are hypertables (1-day
-- chunks) and the extension is created in schema public if needed.
-- Otherwise they are tables partitioned by range on time, one partition
-- per month created by the handler before it writes into that month, plus
-- a default partition, and a WARNING says so. The table `storage` tells
-- which. Both give the same query results.
--
-- Times are the events' recorded_at (database time). Latency is the
-- decision's recorded_at minus its DECISION_PROPOSED recorded_at.
--
-- Run by the projection engine with this projection's schema first on the
-- search_path: names below are unqualified on purpose (docs/projections.md).

CREATE TABLE storage (
    backend text NOT NULL CHECK (backend IN ('timescaledb', 'postgres')),
    note    text NOT NULL
);

DO $definition$
DECLARE
    v_setting    text := lower(coalesce(nullif(current_setting('aura.timescaledb', true), ''), 'on'));
    v_ext_schema text;
    v_reason     text;
    v_activity   text := $ddl$ (
        time            timestamptz      NOT NULL,
        agent_id        text             NOT NULL,
        kind            text             NOT NULL CHECK (kind IN ('vote', 'decision')),
        debate_id       text,
        decision_id     text,
        outcome         text             NOT NULL CHECK (outcome IN ('approve', 'reject')),
        latency_ms      double precision,
        decided_by      text,
        stream_id       text             NOT NULL,
        global_position bigint           NOT NULL,
        CONSTRAINT agent_activity_once UNIQUE (global_position, time)
    ) $ddl$;
    v_endings    text := $ddl$ (
        time            timestamptz      NOT NULL,
        debate_id       text             NOT NULL,
        ending          text             NOT NULL CHECK (ending IN ('consensus', 'failed', 'timed_out')),
        outcome         text             CHECK (outcome IN ('approve', 'reject')),
        stream_id       text             NOT NULL,
        global_position bigint           NOT NULL,
        CONSTRAINT debate_endings_once UNIQUE (global_position, time)
    ) $ddl$;
BEGIN
    IF v_setting IN ('off', 'false', '0', 'no') THEN
        v_reason := 'the setting aura.timescaledb is off';
    ELSIF NOT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') THEN
        v_reason := 'the timescaledb extension is not available on this server';
    ELSIF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')
          AND current_setting('shared_preload_libraries') !~ '(^|[\s,"])timescaledb([\s,"]|$)' THEN
        -- CREATE EXTENSION would fail, and leave the session unusable.
        v_reason := 'timescaledb is not in shared_preload_libraries';
    ELSE
        SELECT n.nspname INTO v_ext_schema
        FROM pg_extension x JOIN pg_namespace n ON n.oid = x.extnamespace
        WHERE x.extname = 'timescaledb';
        IF v_ext_schema IS NULL THEN
            BEGIN
                -- In public, never in this projection's schema (which a
                -- reset or rebuild drops).
                CREATE EXTENSION IF NOT EXISTS timescaledb SCHEMA public;
                v_ext_schema := 'public';
            EXCEPTION WHEN OTHERS THEN
                v_reason := format('CREATE EXTENSION timescaledb failed (%s)', SQLERRM);
            END;
        END IF;
    END IF;

    IF v_reason IS NULL THEN
        EXECUTE 'CREATE TABLE agent_activity ' || v_activity;
        EXECUTE 'CREATE TABLE debate_endings ' || v_endings;
        -- The indexes are created below, the same on both paths.
        EXECUTE format('SELECT %I.create_hypertable(%L::regclass, %L, chunk_time_interval => interval %L, '
                       'create_default_indexes => false)', v_ext_schema, 'agent_activity', 'time', '1 day');
        EXECUTE format('SELECT %I.create_hypertable(%L::regclass, %L, chunk_time_interval => interval %L, '
                       'create_default_indexes => false)', v_ext_schema, 'debate_endings', 'time', '1 day');
        EXECUTE format($f$CREATE FUNCTION bucket_start(width interval, ts timestamptz)
                          RETURNS timestamptz LANGUAGE sql IMMUTABLE PARALLEL SAFE
                          AS 'SELECT %I.time_bucket(width, ts)'$f$, v_ext_schema);
        INSERT INTO storage VALUES ('timescaledb', 'hypertables, time_bucket');
    ELSE
        RAISE WARNING 'agent_performance uses plain Postgres (tables partitioned by month on time, date_bin instead of time_bucket): %', v_reason;
        EXECUTE 'CREATE TABLE agent_activity ' || v_activity || ' PARTITION BY RANGE (time)';
        EXECUTE 'CREATE TABLE agent_activity_default PARTITION OF agent_activity DEFAULT';
        EXECUTE 'CREATE TABLE debate_endings ' || v_endings || ' PARTITION BY RANGE (time)';
        EXECUTE 'CREATE TABLE debate_endings_default PARTITION OF debate_endings DEFAULT';
        -- date_bin from time_bucket's default origin (Monday 2000-01-03 UTC):
        -- the same buckets for widths up to a week.
        CREATE FUNCTION bucket_start(width interval, ts timestamptz)
            RETURNS timestamptz LANGUAGE sql IMMUTABLE PARALLEL SAFE
            AS $f$SELECT date_bin(width, ts, timestamptz '2000-01-03 00:00:00+00')$f$;
        INSERT INTO storage VALUES ('postgres', 'partitioned by month, date_bin: ' || v_reason);
    END IF;
END
$definition$;

CREATE INDEX agent_activity_agent_idx ON agent_activity (agent_id, time DESC);
CREATE INDEX debate_endings_time_idx ON debate_endings (time DESC);

CREATE TABLE proposals (
    decision_id     text        PRIMARY KEY,
    debate_id       text,
    proposed_by     text,
    proposed_at     timestamptz NOT NULL,
    stream_id       text        NOT NULL,
    global_position bigint      NOT NULL
);

CREATE TABLE debates (
    debate_id  text        PRIMARY KEY,
    stream_id  text        NOT NULL UNIQUE,
    started_at timestamptz,
    ended_at   timestamptz,
    ending     text        CHECK (ending IN ('consensus', 'failed', 'timed_out'))
);

CREATE INDEX debates_open_idx ON debates (debate_id) WHERE ended_at IS NULL;

-- Plain-Postgres path only: creates the monthly partitions (UTC months)
-- that the batch's events fall into, before they are written (a row in the
-- default partition would block creating its month later). A no-op for
-- hypertables, which make their own chunks.
CREATE FUNCTION prepare_partitions(batch aura.events[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_table  text;
    v_schema text;
    v_month  timestamp;
    v_name   text;
BEGIN
    FOREACH v_table IN ARRAY ARRAY['agent_activity', 'debate_endings'] LOOP
        SELECT n.nspname INTO v_schema
        FROM pg_partitioned_table p
        JOIN pg_class c ON c.oid = p.partrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE p.partrelid = to_regclass(v_table);
        CONTINUE WHEN v_schema IS NULL;
        FOR v_month IN
            SELECT DISTINCT date_trunc('month', e.recorded_at AT TIME ZONE 'UTC')
            FROM unnest(batch) AS e
        LOOP
            v_name := v_table || '_' || to_char(v_month, 'YYYYMM');
            CONTINUE WHEN to_regclass(format('%I.%I', v_schema, v_name)) IS NOT NULL;
            EXECUTE format('CREATE TABLE %I.%I PARTITION OF %I.%I FOR VALUES FROM (%L) TO (%L)',
                           v_schema, v_name, v_schema, v_table,
                           v_month AT TIME ZONE 'UTC',
                           (v_month + interval '1 month') AT TIME ZONE 'UTC');
        END LOOP;
    END LOOP;
END;
$$;

-- Set-based handler. Statements run in this order so that a decision
-- proposed and decided in the same batch finds its proposal.
CREATE FUNCTION apply_events(batch aura.events[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM prepare_partitions(batch);

    INSERT INTO proposals (decision_id, debate_id, proposed_by, proposed_at, stream_id, global_position)
    SELECT DISTINCT ON (e.stream_id)
           substr(e.stream_id, length('decision-') + 1), e.data->>'debate_id',
           e.data->>'proposed_by', e.recorded_at, e.stream_id, e.global_position
    FROM unnest(batch) AS e
    WHERE e.type = 'DECISION_PROPOSED' AND e.stream_id LIKE 'decision-%'
    ORDER BY e.stream_id, e.version
    ON CONFLICT (decision_id) DO NOTHING;

    INSERT INTO agent_activity (time, agent_id, kind, debate_id, decision_id, outcome, latency_ms,
                                decided_by, stream_id, global_position)
    SELECT e.recorded_at, e.data->>'agent_id', 'vote', substr(e.stream_id, length('debate-') + 1),
           NULL, e.data->>'vote', NULL, NULL, e.stream_id, e.global_position
    FROM unnest(batch) AS e
    WHERE e.type = 'DEBATE_VOTE_CAST' AND e.stream_id LIKE 'debate-%'
    UNION ALL
    SELECT e.recorded_at,
           coalesce(p.proposed_by, d.decided_by), 'decision', p.debate_id,
           substr(e.stream_id, length('decision-') + 1),
           CASE e.type WHEN 'DECISION_APPROVED' THEN 'approve' ELSE 'reject' END,
           extract(epoch FROM e.recorded_at - p.proposed_at)::double precision * 1000,
           d.decided_by, e.stream_id, e.global_position
    FROM unnest(batch) AS e
    CROSS JOIN LATERAL (SELECT CASE e.type WHEN 'DECISION_APPROVED' THEN e.data->>'approved_by'
                                           ELSE e.data->>'rejected_by' END AS decided_by) AS d
    LEFT JOIN proposals AS p ON p.decision_id = substr(e.stream_id, length('decision-') + 1)
    WHERE e.type IN ('DECISION_APPROVED', 'DECISION_REJECTED') AND e.stream_id LIKE 'decision-%';

    INSERT INTO debates AS d (debate_id, stream_id, started_at)
    SELECT DISTINCT ON (e.stream_id)
           substr(e.stream_id, length('debate-') + 1), e.stream_id, e.recorded_at
    FROM unnest(batch) AS e
    WHERE e.type = 'DEBATE_STARTED' AND e.stream_id LIKE 'debate-%'
    ORDER BY e.stream_id, e.version
    ON CONFLICT (debate_id) DO UPDATE SET started_at = coalesce(d.started_at, excluded.started_at);

    INSERT INTO debate_endings (time, debate_id, ending, outcome, stream_id, global_position)
    SELECT e.recorded_at, substr(e.stream_id, length('debate-') + 1),
           CASE e.type WHEN 'DEBATE_CONSENSUS_REACHED' THEN 'consensus'
                       WHEN 'DEBATE_FAILED' THEN 'failed' ELSE 'timed_out' END,
           e.data->>'outcome', e.stream_id, e.global_position
    FROM unnest(batch) AS e
    WHERE e.type IN ('DEBATE_CONSENSUS_REACHED', 'DEBATE_FAILED', 'DEBATE_TIMED_OUT')
      AND e.stream_id LIKE 'debate-%';

    -- The first ending ends a debate.
    INSERT INTO debates AS d (debate_id, stream_id, ended_at, ending)
    SELECT DISTINCT ON (e.stream_id)
           substr(e.stream_id, length('debate-') + 1), e.stream_id, e.recorded_at,
           CASE e.type WHEN 'DEBATE_CONSENSUS_REACHED' THEN 'consensus'
                       WHEN 'DEBATE_FAILED' THEN 'failed' ELSE 'timed_out' END
    FROM unnest(batch) AS e
    WHERE e.type IN ('DEBATE_CONSENSUS_REACHED', 'DEBATE_FAILED', 'DEBATE_TIMED_OUT')
      AND e.stream_id LIKE 'debate-%'
    ORDER BY e.stream_id, e.version
    ON CONFLICT (debate_id) DO UPDATE
        SET ended_at = coalesce(d.ended_at, excluded.ended_at),
            ending = coalesce(d.ending, excluded.ending);
END;
$$;

-- For aura.replay_stream: what this model holds for one stream.
CREATE FUNCTION forget_stream(p_stream_id text) RETURNS void
LANGUAGE sql AS $$
    DELETE FROM agent_activity WHERE stream_id = p_stream_id;
    DELETE FROM debate_endings WHERE stream_id = p_stream_id;
    DELETE FROM proposals WHERE stream_id = p_stream_id;
    DELETE FROM debates WHERE stream_id = p_stream_id;
$$;

-- Windowed views ---------------------------------------------------------------

-- Per agent per 5 minutes. approval_rate: approved / decided, of the
-- decisions the agent proposed; latencies in milliseconds.
CREATE VIEW agent_stats_5m AS
SELECT bucket_start(interval '5 minutes', time) AS bucket,
       agent_id,
       count(*) FILTER (WHERE kind = 'decision') AS decisions,
       count(*) FILTER (WHERE kind = 'decision' AND outcome = 'approve') AS approvals,
       count(*) FILTER (WHERE kind = 'decision' AND outcome = 'reject') AS rejections,
       round(count(*) FILTER (WHERE kind = 'decision' AND outcome = 'approve')::numeric
             / nullif(count(*) FILTER (WHERE kind = 'decision'), 0), 4) AS approval_rate,
       avg(latency_ms) FILTER (WHERE kind = 'decision') AS avg_latency_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms)
           FILTER (WHERE kind = 'decision') AS p95_latency_ms,
       count(*) FILTER (WHERE kind = 'vote') AS votes,
       count(*) FILTER (WHERE kind = 'vote' AND outcome = 'approve') AS approve_votes,
       count(*) FILTER (WHERE kind = 'vote' AND outcome = 'reject') AS reject_votes
FROM agent_activity
GROUP BY 1, 2;

-- Per agent over the sliding last hour (now() - 1 hour < time).
CREATE VIEW agent_stats_last_hour AS
SELECT agent_id,
       count(*) FILTER (WHERE kind = 'decision') AS decisions,
       count(*) FILTER (WHERE kind = 'decision' AND outcome = 'approve') AS approvals,
       count(*) FILTER (WHERE kind = 'decision' AND outcome = 'reject') AS rejections,
       round(count(*) FILTER (WHERE kind = 'decision' AND outcome = 'approve')::numeric
             / nullif(count(*) FILTER (WHERE kind = 'decision'), 0), 4) AS approval_rate,
       avg(latency_ms) FILTER (WHERE kind = 'decision') AS avg_latency_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms)
           FILTER (WHERE kind = 'decision') AS p95_latency_ms,
       count(*) FILTER (WHERE kind = 'vote') AS votes,
       count(*) FILTER (WHERE kind = 'vote' AND outcome = 'approve') AS approve_votes,
       count(*) FILTER (WHERE kind = 'vote' AND outcome = 'reject') AS reject_votes
FROM agent_activity
WHERE time > now() - interval '1 hour'
GROUP BY agent_id;

-- Debates ended by consensus / debates ended, per 5 minutes.
CREATE VIEW consensus_rate_5m AS
SELECT bucket_start(interval '5 minutes', time) AS bucket,
       count(*) AS debates_ended,
       count(*) FILTER (WHERE ending = 'consensus') AS consensus,
       count(*) FILTER (WHERE ending = 'failed') AS failed,
       count(*) FILTER (WHERE ending = 'timed_out') AS timed_out,
       round(count(*) FILTER (WHERE ending = 'consensus')::numeric / count(*), 4) AS consensus_rate
FROM debate_endings
GROUP BY 1;

-- The same over the sliding last hour (one row; zeros and a NULL rate when
-- no debate ended).
CREATE VIEW consensus_rate_last_hour AS
SELECT count(*) AS debates_ended,
       count(*) FILTER (WHERE ending = 'consensus') AS consensus,
       count(*) FILTER (WHERE ending = 'failed') AS failed,
       count(*) FILTER (WHERE ending = 'timed_out') AS timed_out,
       round(count(*) FILTER (WHERE ending = 'consensus')::numeric / nullif(count(*), 0), 4)
           AS consensus_rate
FROM debate_endings
WHERE time > now() - interval '1 hour';

-- Debates started and not ended (one row).
CREATE VIEW active_debate_count AS
SELECT count(*) AS active_debates
FROM debates
WHERE started_at IS NOT NULL AND ended_at IS NULL;
