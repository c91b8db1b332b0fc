-- One row per finished operation: the snapshot the archiver took of its terminal state.
CREATE TABLE archived_operations (
    id            text COLLATE "C" PRIMARY KEY,   -- "C" so that id prefix searches use the index
    pipeline      text NOT NULL,
    status        text NOT NULL CHECK (status IN ('succeeded', 'failed', 'cancelled')),
    failed_stage  text,                            -- first stage that failed for good (failed operations)
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL,
    finished_at   timestamptz NOT NULL,
    duration      double precision,                -- seconds from created_at to finished_at
    revision      bigint NOT NULL,                 -- KV revision of the snapshot; newer replaces older only
    archived_at   timestamptz NOT NULL DEFAULT now(),
    value_schema  integer NOT NULL,                -- "schema" of the stored value (docs/state-format.md)
    origin        text,                            -- event id of the creation
    cancel        jsonb,                           -- {"at", "reason", "by"} when cancelled
    metadata      jsonb NOT NULL,                  -- shared metadata
    stages        jsonb NOT NULL,                  -- per-stage state, timings, errors and metadata
    history       json NOT NULL                    -- transitions, oldest first (json: smaller than jsonb, never searched)
);

-- Newest finished first, keyset pagination on (finished_at, id).
CREATE INDEX archived_operations_finished ON archived_operations (finished_at, id);
CREATE INDEX archived_operations_status ON archived_operations (status, finished_at, id);
CREATE INDEX archived_operations_failed_stage ON archived_operations (failed_stage, finished_at, id)
    WHERE failed_stage IS NOT NULL;
-- Metadata containment (metadata @> '{"customer": 42}').
CREATE INDEX archived_operations_metadata ON archived_operations USING gin (metadata jsonb_path_ops);

-- Values the archiver could not decode, parked with their raw bytes.
CREATE TABLE archive_dead_letters (
    key          text NOT NULL,
    revision     bigint NOT NULL,
    raw          bytea NOT NULL,
    error        text NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (key, revision)
);
