-- Installs the current aura-pg schema into the current database, the same
-- schema the migrations build. From psql:  \i sql/install.sql
-- Prefer `aura-pg migrate`, which records the schema version.
--
-- One file per object (or per small family of objects), each holding its
-- current definition. roles/grants.sql gives the owner and privileges of
-- everything installed before it; each file after it does so for its own
-- objects.
\set ON_ERROR_STOP on
BEGIN;
\ir schema.sql
\ir tables/events.sql
\ir views/streams.sql
\ir triggers/append_only.sql
\ir functions/append_events.sql
\ir functions/read.sql
\ir views/read_horizon_status.sql
\ir tables/projections.sql
\ir tables/outbox.sql
\ir triggers/notify_events.sql
\ir functions/projections.sql
\ir functions/project_batch.sql
\ir functions/processors.sql
\ir functions/outbox.sql
\ir views/projection_status.sql
\ir views/pending_dead_letters.sql
\ir views/outbox_status.sql
\ir extensions/timescaledb.sql
\ir roles/roles.sql
\ir functions/read_model_grants.sql
\ir roles/grants.sql
\ir functions/append_many.sql
\ir views/operator.sql
\ir roles/read_model_roles.sql
\ir tables/shadow_diffs.sql
\ir functions/shadows.sql
\ir views/shadow_status.sql
\ir tables/import_dead_letters.sql
\ir tables/import_stream_lives.sql
\ir views/stream_order_inversions.sql
\ir tables/snapshots.sql
COMMIT;
