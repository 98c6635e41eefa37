-- Installs the aura-pg schema into the current database, as the migrations
-- do. From psql:  \i sql/install.sql
-- Prefer `aura-pg migrate`, which records the schema version.
\set ON_ERROR_STOP on
BEGIN;
\ir schema.sql
\ir tables/streams.sql
\ir tables/events.sql
\ir triggers/append_only.sql
\ir functions/append_events.sql
\ir functions/read.sql
\ir views/read_horizon_status.sql
\ir tables/projections.sql
\ir tables/outbox.sql
\ir triggers/notify_events.sql
\ir functions/projections.sql
\ir functions/outbox.sql
\ir views/projection_status.sql
\ir extensions/timescaledb.sql
\ir functions/project_batch.sql
\ir triggers/notify_opt_in.sql
\ir roles/roles.sql
\ir functions/read_model_grants.sql
\ir roles/grants.sql
\ir roles/append_definer.sql
\ir views/operator.sql
\ir roles/read_model_roles.sql
\ir data/rehash_colon_streams.sql
\ir functions/shadows.sql
\ir tables/import_dead_letters.sql
\ir upgrades/0009_import_dead_letter_identity.sql
\ir tables/import_stream_lives.sql
\ir views/stream_order_inversions.sql
\ir upgrades/0009_read_model_role_names.sql
\ir upgrades/0009_projection_incarnations.sql
COMMIT;
