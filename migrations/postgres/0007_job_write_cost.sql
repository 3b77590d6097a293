-- What a job's writes cost PostgreSQL (BENCHMARKS.md, "Third round").
--
-- `jobs_runner (runner_id, status)` took a new entry at every insert and at every status change of
-- every job, but only the runner list reads it, for the one job a runner is running. A partial
-- index on running jobs holds just those: a job enters it when claimed and leaves it when it ends.
DROP INDEX jobs_runner;
CREATE INDEX jobs_running_runner ON jobs (runner_id) WHERE status = 'running';

-- A job row is updated several times in its life (claimed, confirmed, completed). Free space on
-- its page lets the updates that change no indexed column (confirmation, heartbeats) be HOT
-- updates, which write no index entries.
ALTER TABLE jobs SET (fillfactor = 80);

-- The oldest `n` queued jobs a runner with `labels` may run, locked for the caller's transaction
-- (`FOR UPDATE SKIP LOCKED`): the claim's choice of jobs, in a function only so that it can be
-- planned without bitmap scans. On a table without statistics (a new database, until autovacuum
-- first analyses `jobs`) the planner guesses that only a few jobs are queued and that the labels
-- filter keeps almost none of them, and plans "fetch every queued job from `jobs_queued`, sort
-- them, take the first": a claim then costs as much as the queue is long (600 to 700 buffer
-- reads per claim with 5,000 jobs queued). Walking `jobs_queued` in order stops at the first
-- free job whatever the statistics say.
CREATE FUNCTION outpost_pick_queued(labels JSONB, n BIGINT)
RETURNS TABLE (id UUID, queued_at TIMESTAMPTZ)
LANGUAGE sql VOLATILE
-- A claim takes a few jobs: the default guess of 1,000 rows could make the planner join them to
-- `jobs` with a sequential scan.
ROWS 10
SET enable_bitmapscan = off
AS $$
    SELECT j.id, j.queued_at FROM jobs j WHERE j.status = 'queued' AND j.runs_on <@ labels
    ORDER BY j.queued_at, j.id LIMIT n FOR UPDATE SKIP LOCKED
$$;
