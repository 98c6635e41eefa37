"""Every metric aura-pg exports, by name: one place for the code, the
dashboards, the alert rules and their tests to agree on.

Names are the family names; histograms also expose ``_bucket``, ``_sum`` and
``_count`` series and counters a ``_total`` suffix (already part of the
names below) plus ``_created``.
"""

from __future__ import annotations

from typing import Final

# Seconds. Fine below 100 ms, where the processing target lies.
LATENCY_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

# Counted and timed in the process that does the work.
EVENTS_PROCESSED: Final = "aura_events_processed_total"  # {event_type,status}
EVENT_PROCESSING_DURATION: Final = "aura_event_processing_duration_seconds"  # {event_type}
EVENT_END_TO_END: Final = "aura_event_end_to_end_seconds"  # {projection_name}
PROJECTION_ERRORS: Final = "aura_projection_errors_total"  # {projection_name,error_type}
PROJECTION_BATCH_DURATION: Final = "aura_projection_batch_duration_seconds"  # {projection_name}
EVENTS_APPENDED: Final = "aura_events_appended_total"  # {event_type}
APPEND_DURATION: Final = "aura_append_duration_seconds"
APPEND_DUPLICATES: Final = "aura_append_duplicates_total"
APPEND_CONFLICTS: Final = "aura_append_conflicts_total"
APPEND_RETRIES: Final = "aura_append_retries_total"  # {reason}
OUTBOX_PUBLISHED: Final = "aura_outbox_published_total"  # {sink}
OUTBOX_PUBLISH_FAILURES: Final = "aura_outbox_publish_failures_total"  # {sink}
OUTBOX_PUBLISH_DURATION: Final = "aura_outbox_publish_duration_seconds"  # {sink}
IMPORT_MESSAGES: Final = "aura_import_messages_total"  # {source,stream,outcome}
IMPORT_LAG_MESSAGES: Final = "aura_import_lag_messages"  # {source,stream}

# Read from the database at each scrape, so every daemon reports the same.
DATABASE_UP: Final = "aura_database_up"
SYSTEM_HEALTH_SCORE: Final = "aura_system_health_score"
PROJECTION_LAG: Final = "aura_projection_lag_seconds"  # {projection_name}
PROJECTION_EVENTS_BEHIND: Final = "aura_projection_events_behind"  # {projection_name}
PROJECTION_CHECKPOINT: Final = "aura_projection_checkpoint_position"  # {projection_name}
PROJECTION_DEAD_LETTERS: Final = "aura_projection_dead_letters"  # {projection_name}
PROJECTION_CIRCUIT_STATE: Final = "aura_projection_circuit_state"  # {projection_name,state}
PROJECTION_STATUS: Final = "aura_projection_status"  # {projection_name,status}
EVENT_STORE_HEAD: Final = "aura_event_store_head_position"
OLDEST_TRANSACTION_AGE: Final = "aura_oldest_transaction_age_seconds"
OUTBOX_PENDING: Final = "aura_outbox_pending"  # {sink,topic}
OUTBOX_DEAD: Final = "aura_outbox_dead"  # {sink,topic}
OUTBOX_OLDEST_PENDING_AGE: Final = "aura_outbox_oldest_pending_age_seconds"
ACTIVE_DEBATES: Final = "aura_active_debates"
DEBATE_CONSENSUS_RATE: Final = "aura_debate_consensus_rate"  # {time_window}
SHADOW_LAG: Final = "aura_shadow_lag_seconds"  # {projection_name}
SHADOW_DIFFERING_ROWS: Final = "aura_shadow_differing_rows"  # {projection_name}

EXPORTED_METRIC_NAMES: Final = frozenset(
    value for key, value in dict(globals()).items() if key.isupper() and isinstance(value, str)
)
