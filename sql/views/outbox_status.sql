-- Outbox backlog per sink and topic.
CREATE OR REPLACE VIEW aura.outbox_status AS
SELECT o.sink, o.topic,
       count(*) FILTER (WHERE o.status = 'pending')   AS pending,
       count(*) FILTER (WHERE o.status = 'dead')      AS dead,
       count(*) FILTER (WHERE o.status = 'delivered') AS delivered,
       min(o.created_at) FILTER (WHERE o.status = 'pending') AS oldest_pending_at,
       max(o.attempts) FILTER (WHERE o.status = 'pending')  AS max_attempts
FROM aura.outbox o
GROUP BY o.sink, o.topic
ORDER BY o.sink, o.topic;
