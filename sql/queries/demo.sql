-- What `aura-pg demo` prints: the read models, queried as an operator would
-- in psql. Each starts at a "-- name:" line.

-- name: debates_by_outcome
SELECT d.status,
       count(*)                                   AS debates,
       round(avg(d.rounds_completed), 1)          AS avg_rounds,
       round(avg(d.argument_count), 1)            AS avg_arguments,
       round(avg(extract(epoch FROM d.ended_at - d.started_at))::numeric, 3) AS avg_seconds
FROM debate_state.debates d
GROUP BY d.status
ORDER BY debates DESC, d.status;

-- name: top_agents_last_hour
SELECT a.agent_id, a.decisions, a.approvals, a.approval_rate,
       round(a.avg_latency_ms::numeric, 1) AS avg_latency_ms, a.votes
FROM agent_performance.agent_stats_last_hour a
ORDER BY a.approval_rate DESC NULLS LAST, a.decisions DESC, a.agent_id
LIMIT 10;

-- name: consensus_rate_last_hour
SELECT c.debates_ended, c.consensus, c.failed, c.timed_out, c.consensus_rate
FROM agent_performance.consensus_rate_last_hour c;

-- name: projections_behind
SELECT s.name, s.events_behind FROM aura.projection_status s
WHERE s.name = ANY (%(names)s::text[]);
