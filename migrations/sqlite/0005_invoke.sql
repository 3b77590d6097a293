-- Ad-hoc commands (`outpost invoke`) and their audit trail.
-- Invoke runs belong to no pipeline: they are filed under the reserved name `_invoke`, which no
-- pipeline can have, and take their numbers from this counter instead of `pipelines`.
CREATE TABLE run_numbers (
    pipeline    TEXT PRIMARY KEY,
    next_number INTEGER NOT NULL DEFAULT 1
);

-- The job an audit record is about, so that listing it can show the runner, status and exit
-- code as they are now rather than as they were when the record was written.
ALTER TABLE audit_events ADD COLUMN job_id BLOB;
CREATE INDEX audit_events_action ON audit_events (action, id);
