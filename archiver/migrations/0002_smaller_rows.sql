-- Less WAL per archived operation (docs/benchmarks.md, section Archiver):
-- the status index holds only the minority statuses. Succeeded operations, nearly all
-- rows, are found through archived_operations_finished with a filter (archiver.read adds
-- "status <> 'succeeded'" to searches without succeeded so that this index matches them).
DROP INDEX archived_operations_status;
CREATE INDEX archived_operations_status ON archived_operations (status, finished_at, id)
    WHERE status <> 'succeeded';
-- From this version on, history holds one array [at, to, from, stage, attempt, worker, event]
-- per transition, "at" in microseconds since created_at, instead of an object
-- (archiver.rows.encode_history); older rows keep objects and both read back alike.
