-- The tables the Python processors of the benchmark write
-- (load/processor_handlers.py, measured by load/bench_processors.py). The
-- benchmark drops the schema and runs this file before each run.

CREATE SCHEMA bench_py;

-- One row per event, in the transaction that advances the processor's
-- checkpoint: the "insert" catch-up handlers (sync and async).
CREATE TABLE bench_py.insert_rows (
    event_id        uuid        PRIMARY KEY,
    stream_id       text        NOT NULL,
    version         bigint      NOT NULL,
    type            text        NOT NULL,
    global_position bigint      NOT NULL,
    applied_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE bench_py.insert_rows_async (LIKE bench_py.insert_rows INCLUDING ALL);

-- The end-to-end latency run: applied_at is when the handler inserted the
-- row; the row's xmin is the handler's transaction, whose commit record
-- time pg_xact_commit_timestamp() gives when track_commit_timestamp is on.
CREATE TABLE bench_py.live (LIKE bench_py.insert_rows INCLUDING ALL);

-- The I/O-bound run: one row per batch, written when the handler's wait is
-- over (done_at), just before the checkpoint's commit.
CREATE TABLE bench_py.io_batches (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    pid          integer     NOT NULL,
    events       integer     NOT NULL,
    first_stream text        NOT NULL,
    event_ids    uuid[]      NOT NULL,
    done_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
