-- Read model of the task service: the tasks not completed yet, with the
-- agent holding each, and per agent the tasks it holds. Applied per event
-- by the projection `open_tasks` (catalog.yaml); unqualified names, so the
-- engine creates them in the projection's schema.
--
-- SQL handlers read the events as stored: a TASK_CREATED of v1 has no
-- claim_timeout_seconds (the Python upcaster does not run here), hence the
-- default below, the same as events.DEFAULT_CLAIM_TIMEOUT_SECONDS.

CREATE TABLE tasks (
    task_id               text PRIMARY KEY,
    title                 text NOT NULL,
    agent                 text,            -- NULL: open, nobody holds it
    claimed_at            timestamptz,
    claim_timeout_seconds double precision NOT NULL,
    claims                integer NOT NULL DEFAULT 0
);

CREATE INDEX tasks_agent ON tasks (agent) WHERE agent IS NOT NULL;

-- The open tasks each agent holds (an agent with none has no row).
CREATE VIEW per_agent AS
SELECT agent, count(*) AS open_tasks, min(claimed_at) AS oldest_claim
FROM tasks
WHERE agent IS NOT NULL
GROUP BY agent;

CREATE FUNCTION task_id_of(stream_id text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT substr(stream_id, length('task-') + 1) $$;

CREATE FUNCTION apply_event(e aura.events) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    CASE e.type
    WHEN 'TASK_CREATED' THEN
        INSERT INTO tasks (task_id, title, claim_timeout_seconds)
        VALUES (task_id_of(e.stream_id), e.data->>'title',
                coalesce((e.data->>'claim_timeout_seconds')::double precision, 300));
    WHEN 'TASK_CLAIMED', 'TASK_REASSIGNED' THEN
        UPDATE tasks
        SET agent = e.data->>'agent',
            claimed_at = (e.data->>'claimed_at')::timestamptz,
            claims = claims + 1
        WHERE task_id = task_id_of(e.stream_id);
    WHEN 'TASK_COMPLETED' THEN
        DELETE FROM tasks WHERE task_id = task_id_of(e.stream_id);
    ELSE
        NULL;
    END CASE;
END;
$$;

-- For `aura-pg projections replay open_tasks task-42`: forget the task first.
CREATE FUNCTION forget_stream(stream_id text) RETURNS void
LANGUAGE sql AS $$ DELETE FROM tasks WHERE task_id = task_id_of(stream_id) $$;
