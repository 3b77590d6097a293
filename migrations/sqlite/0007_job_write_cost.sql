-- The same index as on PostgreSQL (see migrations/postgres/0007_job_write_cost.sql): only the
-- runner list reads `jobs_runner`, and only for running jobs, so the index holds running jobs only.
DROP INDEX jobs_runner;
CREATE INDEX jobs_running_runner ON jobs (runner_id) WHERE status = 'running';
