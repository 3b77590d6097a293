-- The queue and the reaper only ever look for queued and for running jobs. Partial indexes hold
-- just those rows, so a claim no longer steps over the index entries of every job that ever ran,
-- and a finished job leaves both indexes.
DROP INDEX jobs_queue;
CREATE INDEX jobs_queued ON jobs (queued_at, id) WHERE status = 'queued';
DROP INDEX jobs_lease;
CREATE INDEX jobs_leased ON jobs (lease_expires_at) WHERE status = 'running';
