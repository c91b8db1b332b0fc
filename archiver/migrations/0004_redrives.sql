-- Re-driven operations (docs/archive.md, "Re-drives"). `kvstate archive redrive` puts an archived
-- operation back into the bucket under its id, and it is archived again when it finishes again,
-- from the same source. The value counts its lives ("redrives": 0 for the original, one more per
-- re-drive); the row carries that count in its primary key, so each life keeps a row of its own
-- and the earlier snapshot is never overwritten. "actions" holds who cancelled, retried or
-- re-drove the operation, when and why (the value's "actions"; NULL when there were none).
ALTER TABLE archived_operations ADD COLUMN redrives integer NOT NULL DEFAULT 0;
ALTER TABLE archived_operations ADD COLUMN actions jsonb;
ALTER TABLE archived_operations DROP CONSTRAINT archived_operations_pkey;
ALTER TABLE archived_operations ADD PRIMARY KEY (id, source, redrives);
