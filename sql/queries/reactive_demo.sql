-- What `aura-pg demo --reactive` watches and prints: the debates the agents
-- carry on by themselves, and the agents' processors. Each starts at a
-- "-- name:" line; %(streams)s is the demo's debate and decision streams.

-- name: progress
-- How far the demo's debates have come.
SELECT count(*) FILTER (WHERE e.type = 'DEBATE_ARGUMENT_ADDED')      AS arguments,
       count(*) FILTER (WHERE e.type = 'DEBATE_VOTE_CAST')           AS votes,
       count(*) FILTER (WHERE e.type IN ('DEBATE_CONSENSUS_REACHED', 'DEBATE_FAILED',
                                         'DEBATE_TIMED_OUT'))        AS ended,
       count(*) FILTER (WHERE e.type = 'DEBATE_CONSENSUS_REACHED')   AS consensus,
       count(*) FILTER (WHERE e.type IN ('DECISION_APPROVED', 'DECISION_REJECTED')) AS resolved
FROM aura.events e
WHERE e.stream_id = ANY (%(streams)s::text[]);

-- name: debates
-- The first debates, as the debate_state read model has them.
SELECT d.debate_id AS debate, d.started_by AS moderator,
       array_to_string(d.participants, ' ') AS agents, d.rounds_completed AS rounds,
       d.argument_count AS arguments, d.votes_for AS approve, d.votes_against AS reject,
       d.status
FROM debate_state.debates d
WHERE d.debate_id = ANY (%(debate_ids)s::text[])
ORDER BY d.debate_id
LIMIT 10;

-- name: agents
-- Per agent's processor: the events it heard, what its reactions wrote
-- (the events naming it in their metadata), and its dead letters.
SELECT s.name AS processor, s.events_applied AS heard,
       coalesce(w.arguments, 0) AS arguments, coalesce(w.votes, 0) AS votes,
       coalesce(w.moderated, 0) AS moderated, s.dead_letters, s.events_behind AS behind
FROM aura.projection_status s
LEFT JOIN (
    SELECT e.metadata ->> 'processor' AS processor,
           count(*) FILTER (WHERE e.type = 'DEBATE_ARGUMENT_ADDED') AS arguments,
           count(*) FILTER (WHERE e.type = 'DEBATE_VOTE_CAST')      AS votes,
           count(*) FILTER (WHERE e.type NOT IN ('DEBATE_ARGUMENT_ADDED',
                                                 'DEBATE_VOTE_CAST')) AS moderated
    FROM aura.events e
    WHERE e.stream_id = ANY (%(streams)s::text[]) AND e.metadata ? 'processor'
    GROUP BY 1
) AS w ON w.processor = s.name
WHERE s.name = ANY (%(names)s::text[])
ORDER BY s.name;
