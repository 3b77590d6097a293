-- A claim marks its run started in the same statement, as PostgreSQL's claim does with a
-- data-modifying CTE (`CLAIM_POSTGRES`): SQLite has no such CTEs, so a trigger does it. The claim
-- is then one autocommit statement, one hop to sqlx's SQLite worker thread instead of four
-- (BEGIN, the claim, the run's update, COMMIT). Only a claim moves a job from queued to running.
CREATE TRIGGER jobs_claim_starts_run AFTER UPDATE OF status ON jobs
WHEN OLD.status = 'queued' AND NEW.status = 'running'
BEGIN
    UPDATE runs SET status = 'running', started_at = COALESCE(started_at, NEW.started_at)
    WHERE id = NEW.run_id AND status = 'queued';
END;
