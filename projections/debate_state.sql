-- debate_state: the current state of every debate, for operators and the UI.
--
--   debates         view, one row per debate (the table debate_fold joined
--                   with the decision a debate led to)
--   active_debates  view, the debates still open
--
-- Folds the debate streams (`debate-<debate_id>`), and records in
-- decision_links the debate each DECISION_PROPOSED of a decision stream
-- (`decision-<id>`) names. Events on other streams are ignored.
-- DEBATE_STARTED is read at the schema_version in its metadata (missing =
-- 1) as the upcaster in aura_pg/domain/events.py reads it: version 1 named
-- the participants `agents` (each once, in order), had no rules (max_rounds
-- defaults to 3) and no minimum of agents; a missing, null or empty
-- started_by is the first agent (NULL when there is none).
--
-- A debate's decision_id is the one its DEBATE_CONSENSUS_REACHED names, as
-- in the domain's fold: a proposal that merely names the debate (recorded
-- before the domain refused such proposals) is no decision of the debate.
--
-- Times are the events' recorded_at (database time), so the model is a pure
-- function of the log: a rebuild gives the same rows.
--
-- Run by the projection engine with this projection's schema first on the
-- search_path: names below are unqualified on purpose (see
-- docs/projections.md).

CREATE TABLE debate_fold (
    debate_id             text        PRIMARY KEY,
    stream_id             text        NOT NULL UNIQUE,
    topic                 text,
    status                text        NOT NULL DEFAULT 'open'
                          CHECK (status IN ('open', 'consensus', 'failed', 'timed_out')),
    participants          text[]      NOT NULL DEFAULT '{}',
    started_by            text,
    max_rounds            integer,
    rounds_completed      integer     NOT NULL DEFAULT 0,
    last_argument_round   integer     NOT NULL DEFAULT 0,
    -- The round being argued while open; the last round that happened after.
    current_round         integer     GENERATED ALWAYS AS (
                              CASE WHEN status = 'open'
                                   THEN greatest(last_argument_round, rounds_completed + 1)
                                   ELSE greatest(last_argument_round, rounds_completed) END) STORED,
    argument_count        integer     NOT NULL DEFAULT 0,
    votes_for             integer     NOT NULL DEFAULT 0,
    votes_against         integer     NOT NULL DEFAULT 0,
    outcome               text        CHECK (outcome IN ('approve', 'reject')),
    consensus_decision_id text,
    failure_reason        text,
    started_at            timestamptz,
    ended_at              timestamptz,
    last_version          bigint      NOT NULL,
    -- recorded_at of the last event applied to the debate.
    updated_at            timestamptz NOT NULL
);

CREATE INDEX debate_fold_status_idx ON debate_fold (status);

-- DECISION_PROPOSED: the debate each proposal names (for operators; the
-- debates view takes a debate's decision from its consensus alone).
CREATE TABLE decision_links (
    decision_id     text        PRIMARY KEY,
    stream_id       text        NOT NULL UNIQUE,
    debate_id       text        NOT NULL,
    proposed_at     timestamptz NOT NULL,
    global_position bigint      NOT NULL
);

CREATE INDEX decision_links_debate_idx ON decision_links (debate_id, global_position);

CREATE VIEW debates AS
SELECT d.debate_id, d.topic, d.status, d.participants, d.rounds_completed, d.current_round,
       d.argument_count, d.votes_for, d.votes_against, d.outcome,
       d.consensus_decision_id AS decision_id,
       d.started_at, d.ended_at, d.last_version, d.updated_at,
       d.started_by, d.max_rounds, d.failure_reason
FROM debate_fold d;

CREATE VIEW active_debates AS
SELECT debate_id, topic, participants, current_round, rounds_completed, argument_count,
       votes_for, votes_against, started_at, now() - started_at AS running_for,
       last_version, updated_at
FROM debates
WHERE status = 'open';

-- a, then the elements of b that are not in a yet (first occurrence, in order).
CREATE FUNCTION merge_distinct(a text[], b text[]) RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(a, '{}') || coalesce(
        (SELECT array_agg(x ORDER BY i)
         FROM (SELECT DISTINCT ON (x) x, i
               FROM unnest(b) WITH ORDINALITY AS u(x, i)
               WHERE x IS NOT NULL AND x <> ALL (coalesce(a, '{}'))
               ORDER BY x, i) AS firsts),
        '{}');
$$;

-- Set-based handler: one upsert per debate stream in the batch, one insert
-- per decision stream.
CREATE FUNCTION apply_events(batch aura.events[]) RETURNS void
LANGUAGE sql AS $$
    WITH ev AS (
        SELECT e.*
        FROM unnest(batch) AS e
        WHERE e.stream_id LIKE 'debate-%' AND e.type <> 'DECISION_PROPOSED'
    ),
    joined AS (
        -- Participants in order: DEBATE_STARTED's list (v1: agents), then
        -- each AGENT_JOINED.
        SELECT e.stream_id, array_agg(p.agent ORDER BY e.version, p.i) AS agents
        FROM ev AS e
        CROSS JOIN LATERAL jsonb_array_elements_text(
            CASE WHEN e.type = 'AGENT_JOINED' THEN jsonb_build_array(e.data->'agent_id')
                 WHEN coalesce((e.metadata->>'schema_version')::integer, 1) >= 2
                      THEN e.data->'participants'
                 ELSE e.data->'agents' END) WITH ORDINALITY AS p(agent, i)
        WHERE e.type IN ('DEBATE_STARTED', 'AGENT_JOINED')
        GROUP BY e.stream_id
    ),
    folded AS (
        SELECT
            e.stream_id,
            substr(e.stream_id, length('debate-') + 1) AS debate_id,
            (array_agg(e.data->>'topic' ORDER BY e.version)
                FILTER (WHERE e.type = 'DEBATE_STARTED'))[1] AS topic,
            (array_agg(CASE WHEN coalesce((e.metadata->>'schema_version')::integer, 1) >= 2
                            THEN e.data->>'started_by'
                            ELSE coalesce(nullif(e.data->>'started_by', ''),
                                          e.data->'agents'->>0) END
                       ORDER BY e.version)
                FILTER (WHERE e.type = 'DEBATE_STARTED'))[1] AS started_by,
            (array_agg(coalesce((e.data->>'max_rounds')::integer, 3) ORDER BY e.version)
                FILTER (WHERE e.type = 'DEBATE_STARTED'))[1] AS max_rounds,
            (array_agg(e.recorded_at ORDER BY e.version)
                FILTER (WHERE e.type = 'DEBATE_STARTED'))[1] AS started_at,
            coalesce(greatest(
                max((e.data->>'round')::integer) FILTER (WHERE e.type = 'DEBATE_ROUND_COMPLETED'),
                max((e.data->>'rounds_completed')::integer) FILTER (WHERE e.type = 'DEBATE_TIMED_OUT')),
                0) AS rounds_completed,
            coalesce(max((e.data->>'round')::integer)
                FILTER (WHERE e.type = 'DEBATE_ARGUMENT_ADDED'), 0) AS last_argument_round,
            count(*) FILTER (WHERE e.type = 'DEBATE_ARGUMENT_ADDED') AS argument_count,
            count(*) FILTER (WHERE e.type = 'DEBATE_VOTE_CAST' AND e.data->>'vote' = 'approve') AS votes_for,
            count(*) FILTER (WHERE e.type = 'DEBATE_VOTE_CAST' AND e.data->>'vote' = 'reject') AS votes_against,
            -- The first ending event decides; a debate never reopens.
            coalesce((array_agg(CASE e.type WHEN 'DEBATE_CONSENSUS_REACHED' THEN 'consensus'
                                            WHEN 'DEBATE_FAILED' THEN 'failed'
                                            ELSE 'timed_out' END ORDER BY e.version)
                FILTER (WHERE e.type IN ('DEBATE_CONSENSUS_REACHED', 'DEBATE_FAILED',
                                         'DEBATE_TIMED_OUT')))[1], 'open') AS status,
            (array_agg(e.data->>'outcome' ORDER BY e.version)
                FILTER (WHERE e.type IN ('DEBATE_CONSENSUS_REACHED', 'DEBATE_FAILED',
                                         'DEBATE_TIMED_OUT')))[1] AS outcome,
            (array_agg(e.data->>'decision_id' ORDER BY e.version)
                FILTER (WHERE e.type IN ('DEBATE_CONSENSUS_REACHED', 'DEBATE_FAILED',
                                         'DEBATE_TIMED_OUT')))[1] AS decision_id,
            (array_agg(e.data->>'reason' ORDER BY e.version)
                FILTER (WHERE e.type IN ('DEBATE_CONSENSUS_REACHED', 'DEBATE_FAILED',
                                         'DEBATE_TIMED_OUT')))[1] AS failure_reason,
            (array_agg(e.recorded_at ORDER BY e.version)
                FILTER (WHERE e.type IN ('DEBATE_CONSENSUS_REACHED', 'DEBATE_FAILED',
                                         'DEBATE_TIMED_OUT')))[1] AS ended_at,
            max(e.version) AS last_version,
            (array_agg(e.recorded_at ORDER BY e.version DESC))[1] AS updated_at
        FROM ev AS e
        GROUP BY e.stream_id
    )
    INSERT INTO debate_fold AS d (
        debate_id, stream_id, topic, status, participants, started_by, max_rounds,
        rounds_completed, last_argument_round, argument_count, votes_for, votes_against,
        outcome, consensus_decision_id, failure_reason, started_at, ended_at, last_version,
        updated_at)
    SELECT f.debate_id, f.stream_id, f.topic, f.status, merge_distinct('{}', j.agents),
           f.started_by, f.max_rounds, f.rounds_completed, f.last_argument_round,
           f.argument_count, f.votes_for, f.votes_against, f.outcome, f.decision_id,
           f.failure_reason, f.started_at, f.ended_at, f.last_version, f.updated_at
    FROM folded AS f
    LEFT JOIN joined AS j USING (stream_id)
    ON CONFLICT (debate_id) DO UPDATE
        SET topic = coalesce(d.topic, excluded.topic),
            participants = merge_distinct(d.participants, excluded.participants),
            started_by = coalesce(d.started_by, excluded.started_by),
            max_rounds = coalesce(d.max_rounds, excluded.max_rounds),
            started_at = coalesce(d.started_at, excluded.started_at),
            rounds_completed = greatest(d.rounds_completed, excluded.rounds_completed),
            last_argument_round = greatest(d.last_argument_round, excluded.last_argument_round),
            argument_count = d.argument_count + excluded.argument_count,
            votes_for = d.votes_for + excluded.votes_for,
            votes_against = d.votes_against + excluded.votes_against,
            status = CASE WHEN d.status = 'open' THEN excluded.status ELSE d.status END,
            outcome = CASE WHEN d.status = 'open' THEN excluded.outcome ELSE d.outcome END,
            consensus_decision_id = CASE WHEN d.status = 'open' THEN excluded.consensus_decision_id
                                         ELSE d.consensus_decision_id END,
            failure_reason = CASE WHEN d.status = 'open' THEN excluded.failure_reason
                                  ELSE d.failure_reason END,
            ended_at = CASE WHEN d.status = 'open' THEN excluded.ended_at ELSE d.ended_at END,
            last_version = greatest(d.last_version, excluded.last_version),
            updated_at = CASE WHEN excluded.last_version > d.last_version
                              THEN excluded.updated_at ELSE d.updated_at END;

    INSERT INTO decision_links (decision_id, stream_id, debate_id, proposed_at, global_position)
    SELECT DISTINCT ON (e.stream_id)
           substr(e.stream_id, length('decision-') + 1), e.stream_id, e.data->>'debate_id',
           e.recorded_at, e.global_position
    FROM unnest(batch) AS e
    WHERE e.type = 'DECISION_PROPOSED' AND e.stream_id LIKE 'decision-%'
    ORDER BY e.stream_id, e.version
    ON CONFLICT (decision_id) DO NOTHING;
$$;

-- For aura.replay_stream: what this model holds for one stream.
CREATE FUNCTION forget_stream(p_stream_id text) RETURNS void
LANGUAGE sql AS $$
    DELETE FROM debate_fold WHERE stream_id = p_stream_id;
    DELETE FROM decision_links WHERE stream_id = p_stream_id;
$$;
