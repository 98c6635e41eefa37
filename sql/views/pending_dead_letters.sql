-- Dead letters waiting for an operator, oldest first.
CREATE OR REPLACE VIEW aura.pending_dead_letters AS
SELECT d.id, d.projection, d.global_position, d.event_id, d.stream_id, d.event_type,
       d.attempts, d.error, d.first_failed_at, d.last_failed_at
FROM aura.dead_letters d
WHERE d.status = 'pending'
ORDER BY d.id;
