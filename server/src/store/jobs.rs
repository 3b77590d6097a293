//! Jobs under leases: claiming, heartbeats, step reports, completion and the reaper.
//!
//! Every per-job write is a conditional `UPDATE … WHERE status = 'running' AND lease_token_hash = $h
//! AND lease_expires_at > now`: a runner whose lease is no longer current changes nothing (fencing).

use chrono::Utc;
use outpost_protocol::{
    AssignedJob, CompleteRequest, HeartbeatResponse, Job, JobStatus, Lease, StepStatus, StepUpdate,
};
use sqlx::Connection as _;
use sqlx::types::Json;
use subtle::ConstantTimeEq;
use uuid::Uuid;

use super::runs::{JOB_COLS, JobRow, STEP_COLS, StepRow, advance_run, attach_steps};
use super::{Store, StoreError, StoreResult, dispatch, hash_token, new_token, with_writer};

/// A job claimed for a runner.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// What the runner needs.
    pub job: AssignedJob,
    /// The fresh lease.
    pub lease: Lease,
}

/// What completing a job led to.
#[derive(Debug, Clone)]
pub struct CompleteOutcome {
    /// The job's run.
    pub run_id: Uuid,
}

const CLAIM_SQLITE: &str = "UPDATE jobs SET status = 'running', runner_id = $1, lease_token_hash = $2, \
     lease_expires_at = $3, heartbeat_seen = FALSE, attempt = attempt + 1, started_at = $4, cancel_requested = FALSE \
     WHERE status = 'queued' AND id = (SELECT j.id FROM jobs j WHERE j.status = 'queued' \
       AND NOT EXISTS (SELECT 1 FROM json_each(j.runs_on) r WHERE r.value NOT IN (SELECT value FROM json_each($5))) \
       ORDER BY j.queued_at, j.id LIMIT 1) \
     RETURNING id, run_id, spec";

/// One statement, one round trip: claim the job and mark its run started. PostgreSQL runs
/// data-modifying CTEs even when the outer query does not read them. `outpost_pick_queued`
/// (migration 0007) picks and locks the oldest queued jobs the labels allow, `FOR UPDATE SKIP
/// LOCKED`, walking `jobs_queued` in order whatever the table's statistics say.
const CLAIM_POSTGRES: &str = "WITH claimed AS ( \
       UPDATE jobs SET status = 'running', runner_id = $1, lease_token_hash = $2, \
       lease_expires_at = $3, heartbeat_seen = FALSE, attempt = attempt + 1, started_at = $4, cancel_requested = FALSE \
       WHERE status = 'queued' AND id = (SELECT p.id FROM outpost_pick_queued($5, 1) p) \
       RETURNING id, run_id, spec), \
     started AS ( \
       UPDATE runs SET status = 'running', started_at = COALESCE(runs.started_at, $4) \
       FROM claimed WHERE runs.id = claimed.run_id AND runs.status = 'queued') \
     SELECT id, run_id, spec FROM claimed";

/// The same claim for several runners with the same labels at once: the oldest `$6` queued jobs
/// they may run, paired in queue order with the runners in `$1` (and their lease hashes in `$2`),
/// and their runs marked started, in one statement and one commit. A batch claims fewer jobs than
/// runners when fewer are queued; the runners left over get nothing.
const CLAIM_BATCH_POSTGRES: &str = "WITH picked AS (SELECT id, queued_at FROM outpost_pick_queued($5, $6)), \
     numbered AS (SELECT id, row_number() OVER (ORDER BY queued_at, id) AS n FROM picked), \
     assign AS (SELECT * FROM unnest($1::uuid[], $2::text[]) WITH ORDINALITY AS a(runner_id, token_hash, n)), \
     claimed AS ( \
       UPDATE jobs SET status = 'running', runner_id = assign.runner_id, lease_token_hash = assign.token_hash, \
       lease_expires_at = $3, heartbeat_seen = FALSE, attempt = jobs.attempt + 1, started_at = $4, cancel_requested = FALSE \
       FROM numbered JOIN assign ON assign.n = numbered.n \
       WHERE jobs.id = numbered.id AND jobs.status = 'queued' \
       RETURNING jobs.id, jobs.run_id, jobs.spec, assign.n), \
     started AS ( \
       UPDATE runs SET status = 'running', started_at = COALESCE(runs.started_at, $4) \
       FROM (SELECT DISTINCT run_id FROM claimed) c WHERE runs.id = c.run_id AND runs.status = 'queued') \
     SELECT id, run_id, spec, n FROM claimed";

/// The fenced completion: ends the job if the lease is current and answers with its run.
const COMPLETE_SQLITE: &str = "UPDATE jobs SET status = $3, exit_code = $4, finished_at = $5, lease_expires_at = NULL \
     WHERE id = $1 AND status = 'running' AND lease_token_hash = $2 AND lease_expires_at > $5 RETURNING run_id";

/// The same completion on PostgreSQL, which also tells the other replicas that the job's status
/// changed (`pg_notify($6, $7)`). The notification is queued only when a row is returned (the
/// sub-select runs when the first row is projected) and is sent only if the transaction commits:
/// no round trip and no commit of its own, where a separate `SELECT pg_notify` cost both.
const COMPLETE_POSTGRES: &str = "UPDATE jobs SET status = $3, exit_code = $4, finished_at = $5, lease_expires_at = NULL \
     WHERE id = $1 AND status = 'running' AND lease_token_hash = $2 AND lease_expires_at > $5 \
     RETURNING run_id, (SELECT pg_notify($6, $7)) IS NULL AS notified";

/// A completion on PostgreSQL that needs no plan of the job graph, as one statement: the run is
/// `running` and no job of it waits on `needs`. It makes the fenced update (with its
/// notification, like [`COMPLETE_POSTGRES`]) and ends the job's leftover steps (`$8` for a step
/// still running). When the job is the run's last open one (in the statement's snapshot the job
/// itself is still running, hence `open = 1`), the same statement also ends the run with the
/// worst outcome of its jobs, as [`super::runs::plan_advance`] would: failed (also timed out and
/// lost) beats cancelled beats succeeded (also skipped). The last column says whether it did.
///
/// Most completions are such; they take one round trip where the transaction of
/// [`Store::complete_job`] takes five to ten. Anything else (a job others need, a run not yet or
/// no longer `running`, a lost lease, a retry) returns no row, changes nothing, and takes the
/// transaction. Like the transaction's own check, the snapshot may miss a sibling completing at
/// the same moment (each then sees the other open, and neither ends the run);
/// [`Store::settle_run`] after the commit catches that.
const COMPLETE_ONE_POSTGRES: &str = "WITH progress AS ( \
       SELECT r.status AS run_status, \
         COUNT(*) FILTER (WHERE j.status = 'pending') AS pending, \
         COUNT(*) FILTER (WHERE j.status IN ('queued', 'running')) AS open, \
         COUNT(*) FILTER (WHERE j.id <> $1 AND j.status IN ('failed', 'timed_out', 'lost')) AS failed, \
         COUNT(*) FILTER (WHERE j.id <> $1 AND j.status = 'cancelled') AS cancelled \
       FROM jobs me JOIN runs r ON r.id = me.run_id JOIN jobs j ON j.run_id = me.run_id \
       WHERE me.id = $1 GROUP BY r.status), \
     done AS ( \
       UPDATE jobs SET status = $3, exit_code = $4, finished_at = $5, lease_expires_at = NULL \
       FROM progress \
       WHERE jobs.id = $1 AND jobs.status = 'running' AND jobs.lease_token_hash = $2 AND jobs.lease_expires_at > $5 \
         AND progress.run_status = 'running' AND progress.pending = 0 \
       RETURNING jobs.run_id, progress.open = 1 AS is_last, (SELECT pg_notify($6, $7)) IS NULL AS notified), \
     steps_ended AS ( \
       UPDATE steps SET status = CASE WHEN status = 'running' THEN $8 ELSE 'skipped' END, \
         finished_at = COALESCE(finished_at, $5) \
       WHERE job_id = $1 AND status IN ('pending', 'running') AND EXISTS (SELECT 1 FROM done)), \
     run_ended AS ( \
       UPDATE runs SET status = CASE \
           WHEN progress.failed > 0 OR $3 IN ('failed', 'timed_out') THEN 'failed' \
           WHEN progress.cancelled > 0 OR $3 = 'cancelled' THEN 'cancelled' \
           ELSE 'succeeded' END, \
         finished_at = $5 \
       FROM done, progress WHERE runs.id = done.run_id AND done.is_last AND runs.status = 'running' \
       RETURNING runs.id) \
     SELECT run_id, notified, EXISTS (SELECT 1 FROM run_ended) AS run_ended FROM done";

/// One runner asking for a job, in a batch of claims.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    /// The runner.
    pub runner_id: Uuid,
    /// Its labels.
    pub labels: Vec<String>,
}

/// Step statuses a finished job leaves behind for steps the runner never reported as ended.
fn leftover_step_status(job: JobStatus) -> StepStatus {
    match job {
        JobStatus::Cancelled => StepStatus::Cancelled,
        JobStatus::TimedOut => StepStatus::TimedOut,
        _ => StepStatus::Failed,
    }
}

impl Store {
    /// Claims the oldest queued job whose labels the runner carries, under a fresh lease.
    pub async fn claim_job(
        &self,
        runner_id: Uuid,
        labels: &[String],
        lease_secs: u64,
    ) -> StoreResult<Option<Claimed>> {
        let now = Utc::now();
        let token = new_token("opl_");
        let expires_at = now + chrono::Duration::seconds(lease_secs as i64);
        let mut w = self.writer().await?;
        let row: Option<(Uuid, Uuid, Json<AssignedJob>)> = match w {
            super::Writer::Postgres(pool) => {
                sqlx::query_as(CLAIM_POSTGRES)
                    .bind(runner_id)
                    .bind(hash_token(&token))
                    .bind(expires_at)
                    .bind(now)
                    .bind(Json(labels))
                    .fetch_optional(pool)
                    .await?
            }
            // One autocommit statement: the trigger of migration 0008 marks the run started.
            super::Writer::Sqlite(ref mut conn) => {
                sqlx::query_as(CLAIM_SQLITE)
                    .bind(runner_id)
                    .bind(hash_token(&token))
                    .bind(expires_at)
                    .bind(now)
                    .bind(Json(labels))
                    .fetch_optional(&mut **conn)
                    .await?
            }
        };
        drop(w);
        let mut claimed = row.map(|(_, _, spec)| Claimed {
            job: spec.0,
            lease: Lease {
                token,
                expires_at,
                duration_secs: lease_secs,
            },
        });
        // The stored spec names the job's secrets with empty values; the values are decrypted here.
        if let Some(c) = &mut claimed
            && !c.job.secrets.is_empty()
        {
            self.fill_secrets(&mut c.job).await?;
        }
        Ok(claimed)
    }

    /// Claims jobs for several runners at once, under one writer lock and as few statements and
    /// commits as the backend allows: one statement per label set on PostgreSQL, one transaction
    /// on SQLite. The answer has one entry per request, in order.
    pub async fn claim_jobs(
        &self,
        requests: &[ClaimRequest],
        lease_secs: u64,
    ) -> StoreResult<Vec<Option<Claimed>>> {
        if let [one] = requests {
            return Ok(vec![
                self.claim_job(one.runner_id, &one.labels, lease_secs)
                    .await?,
            ]);
        }
        let now = Utc::now();
        let expires_at = now + chrono::Duration::seconds(lease_secs as i64);
        let tokens: Vec<String> = requests.iter().map(|_| new_token("opl_")).collect();
        let hashes: Vec<String> = tokens.iter().map(|t| hash_token(t)).collect();
        let mut specs: Vec<Option<AssignedJob>> = vec![None; requests.len()];
        let mut w = self.writer().await?;
        match w {
            super::Writer::Postgres(pool) => {
                // Requests with the same labels share one statement.
                let mut groups: Vec<(&[String], Vec<usize>)> = Vec::new();
                for (i, r) in requests.iter().enumerate() {
                    match groups.iter_mut().find(|(l, _)| *l == r.labels.as_slice()) {
                        Some((_, members)) => members.push(i),
                        None => groups.push((&r.labels, vec![i])),
                    }
                }
                for (labels, members) in groups {
                    let runner_ids: Vec<Uuid> =
                        members.iter().map(|&i| requests[i].runner_id).collect();
                    let member_hashes: Vec<&str> =
                        members.iter().map(|&i| hashes[i].as_str()).collect();
                    let rows: Vec<(Uuid, Uuid, Json<AssignedJob>, i64)> =
                        sqlx::query_as(CLAIM_BATCH_POSTGRES)
                            .bind(&runner_ids)
                            .bind(&member_hashes)
                            .bind(expires_at)
                            .bind(now)
                            .bind(Json(labels))
                            .bind(members.len() as i64)
                            .fetch_all(pool)
                            .await?;
                    for (_, _, spec, n) in rows {
                        let slot = usize::try_from(n - 1)
                            .ok()
                            .and_then(|k| members.get(k))
                            .ok_or_else(|| {
                                StoreError::Corrupt(format!("claim batch position {n}"))
                            })?;
                        specs[*slot] = Some(spec.0);
                    }
                }
            }
            super::Writer::Sqlite(ref mut conn) => {
                let mut tx = (**conn).begin_with(self.begin_write()).await?;
                for (i, r) in requests.iter().enumerate() {
                    let row: Option<(Uuid, Uuid, Json<AssignedJob>)> = sqlx::query_as(CLAIM_SQLITE)
                        .bind(r.runner_id)
                        .bind(&hashes[i])
                        .bind(expires_at)
                        .bind(now)
                        .bind(Json(&r.labels))
                        .fetch_optional(&mut *tx)
                        .await?;
                    // The trigger of migration 0008 marks the run started.
                    if let Some((_, _, spec)) = row {
                        specs[i] = Some(spec.0);
                    }
                }
                tx.commit().await?;
            }
        }
        drop(w);
        let mut out = Vec::with_capacity(requests.len());
        for (spec, token) in specs.into_iter().zip(tokens) {
            let claimed = match spec {
                Some(mut job) => {
                    // The stored spec names the job's secrets with empty values; the values are
                    // decrypted here.
                    if !job.secrets.is_empty() {
                        self.fill_secrets(&mut job).await?;
                    }
                    Some(Claimed {
                        job,
                        lease: Lease {
                            token,
                            expires_at,
                            duration_secs: lease_secs,
                        },
                    })
                }
                None => None,
            };
            out.push(claimed);
        }
        Ok(out)
    }

    /// Tells apart "no such job" from "your lease is not current" after a fenced update matched nothing.
    async fn lease_failure(&self, job_id: Uuid) -> StoreError {
        let exists: Result<Option<(Uuid,)>, sqlx::Error> = dispatch!(self, pool => {
            sqlx::query_as("SELECT id FROM jobs WHERE id = $1")
                .bind(job_id)
                .fetch_optional(pool)
                .await
        });
        match exists {
            Ok(Some(_)) => StoreError::LeaseLost,
            Ok(None) => StoreError::NotFound(format!("job {job_id}")),
            Err(e) => e.into(),
        }
    }

    /// Renews a lease; answers whether cancellation was requested.
    pub async fn heartbeat(
        &self,
        job_id: Uuid,
        lease_token: &str,
        lease_secs: u64,
    ) -> StoreResult<HeartbeatResponse> {
        let now = Utc::now();
        let expires_at = now + chrono::Duration::seconds(lease_secs as i64);
        let mut w = self.writer().await?;
        let row: Option<(bool,)> = with_writer!(w, db => {
            sqlx::query_as(
                "UPDATE jobs SET lease_expires_at = $3, heartbeat_seen = TRUE \
                 WHERE id = $1 AND status = 'running' AND lease_token_hash = $2 AND lease_expires_at > $4 \
                 RETURNING cancel_requested",
            )
            .bind(job_id)
            .bind(hash_token(lease_token))
            .bind(expires_at)
            .bind(now)
            .fetch_optional(db)
            .await?
        });
        drop(w);
        match row {
            Some((cancel_requested,)) => Ok(HeartbeatResponse {
                expires_at,
                cancel_requested,
            }),
            None => Err(self.lease_failure(job_id).await),
        }
    }

    /// Records a step's status change reported by the runner holding the lease.
    pub async fn update_step(
        &self,
        job_id: Uuid,
        lease_token: &str,
        index: u32,
        update: &StepUpdate,
    ) -> StoreResult<()> {
        let now = Utc::now();
        let offset = i64::try_from(update.log_offset)
            .map_err(|_| StoreError::Invalid("log_offset is too large".into()))?;
        let mut w = self.writer().await?;
        let outcome: Result<bool, StoreError> = with_writer!(w, db => {
            let mut tx = db.begin_with(self.begin_write()).await?;
            let held: Option<(Uuid,)> = sqlx::query_as(
                "UPDATE jobs SET heartbeat_seen = TRUE \
                 WHERE id = $1 AND status = 'running' AND lease_token_hash = $2 AND lease_expires_at > $3 RETURNING id",
            )
            .bind(job_id)
            .bind(hash_token(lease_token))
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            if held.is_none() {
                Ok(false)
            } else {
                let n = if update.status == StepStatus::Running {
                    sqlx::query(
                        "UPDATE steps SET status = 'running', started_at = $3, log_start = $4 WHERE job_id = $1 AND idx = $2",
                    )
                    .bind(job_id)
                    .bind(index as i32)
                    .bind(now)
                    .bind(offset)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected()
                } else {
                    sqlx::query(
                        "UPDATE steps SET status = $3, exit_code = $4, finished_at = $5, log_end = $6, \
                         log_start = COALESCE(log_start, $6), started_at = COALESCE(started_at, $5) \
                         WHERE job_id = $1 AND idx = $2",
                    )
                    .bind(job_id)
                    .bind(index as i32)
                    .bind(update.status.as_str())
                    .bind(update.exit_code)
                    .bind(now)
                    .bind(offset)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected()
                };
                if n == 0 {
                    Err(StoreError::Invalid(format!("job {job_id} has no step {index}")))
                } else {
                    tx.commit().await?;
                    Ok(true)
                }
            }
        });
        drop(w);
        match outcome? {
            true => {
                self.events.publish_log(job_id).await;
                Ok(())
            }
            false => Err(self.lease_failure(job_id).await),
        }
    }

    /// Ends a job with the runner's final status and moves its run forward.
    ///
    /// Repeating the same completion with the same lease is acknowledged, so a runner whose
    /// answer was lost can safely retry.
    pub async fn complete_job(
        &self,
        job_id: Uuid,
        lease_token: &str,
        req: &CompleteRequest,
    ) -> StoreResult<CompleteOutcome> {
        if !matches!(
            req.status,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled | JobStatus::TimedOut
        ) {
            return Err(StoreError::Invalid(format!(
                "a runner can complete a job only as succeeded, failed, cancelled or timed_out, not {}",
                req.status.as_str()
            )));
        }
        let now = Utc::now();
        let hash = hash_token(lease_token);
        let postgres = self.is_postgres();
        if let super::Db::Postgres(pool) = &self.db {
            let one: Option<(Uuid, bool, bool)> = sqlx::query_as(COMPLETE_ONE_POSTGRES)
                .bind(job_id)
                .bind(&hash)
                .bind(req.status.as_str())
                .bind(req.exit_code)
                .bind(now)
                .bind(crate::events::CHANNEL)
                .bind(format!("log:{job_id}"))
                .bind(leftover_step_status(req.status).as_str())
                .fetch_optional(pool)
                .await?;
            if let Some((run_id, _, run_ended)) = one {
                return self.completed(job_id, run_id, false, !run_ended).await;
            }
        }
        let mut w = self.writer().await?;
        let done: Option<(Uuid, bool)> = with_writer!(w, db => {
            let mut tx = db.begin_with(self.begin_write()).await?;
            let query = sqlx::query_as(if postgres { COMPLETE_POSTGRES } else { COMPLETE_SQLITE })
                .bind(job_id)
                .bind(&hash)
                .bind(req.status.as_str())
                .bind(req.exit_code)
                .bind(now);
            let query = if postgres {
                query.bind(crate::events::CHANNEL).bind(format!("log:{job_id}"))
            } else {
                query
            };
            let row: Option<(Uuid,)> = query.fetch_optional(&mut *tx).await?;
            match row {
                Some((run_id,)) => {
                    sqlx::query(
                        "UPDATE steps SET status = CASE WHEN status = 'running' THEN $2 ELSE 'skipped' END, \
                         finished_at = COALESCE(finished_at, $3) WHERE job_id = $1 AND status IN ('pending', 'running')",
                    )
                    .bind(job_id)
                    .bind(leftover_step_status(req.status).as_str())
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                    // On PostgreSQL, every completion that needs no plan of the job graph took
                    // `COMPLETE_ONE_POSTGRES` above, without the run's lock; this one does.
                    let queued = advance_run!(self, tx, run_id, now)?;
                    tx.commit().await?;
                    Some((run_id, queued))
                }
                None => None,
            }
        });
        drop(w);
        match done {
            Some((run_id, queued)) => self.completed(job_id, run_id, queued, true).await,
            None => {
                // An identical retry by the lease holder is fine; anything else is fenced out.
                let row: Option<(String, Option<String>, Uuid)> = dispatch!(self, pool => {
                    sqlx::query_as("SELECT status, lease_token_hash, run_id FROM jobs WHERE id = $1")
                        .bind(job_id)
                        .fetch_optional(pool)
                        .await?
                });
                match row {
                    None => Err(StoreError::NotFound(format!("job {job_id}"))),
                    // The stored hash is compared in constant time, like every secret.
                    Some((status, Some(h), run_id))
                        if bool::from(h.as_bytes().ct_eq(hash.as_bytes()))
                            && status == req.status.as_str() =>
                    {
                        Ok(CompleteOutcome { run_id })
                    }
                    Some(_) => Err(StoreError::LeaseLost),
                }
            }
        }
    }

    /// What follows a committed completion of `job_id`; `queued` says whether it queued a job,
    /// `settle` whether its run may need [`Store::settle_run`] (not when the completion ended it).
    async fn completed(
        &self,
        job_id: Uuid,
        run_id: Uuid,
        queued: bool,
        settle: bool,
    ) -> StoreResult<CompleteOutcome> {
        // Two jobs completing at once without the run's lock may each have seen the other still
        // running; whichever committed last sees both ended here.
        let queued = if self.writes_serialised() || !settle {
            queued
        } else {
            self.settle_run(run_id).await? || queued
        };
        if queued {
            self.events.publish_jobs().await;
        }
        // Other replicas were notified by the completing statement itself (PostgreSQL); SQLite
        // has no other replicas.
        self.events.wake_log_local(job_id);
        Ok(CompleteOutcome { run_id })
    }

    /// Ends expired leases: a job whose runner never confirmed it (no heartbeat, log or step
    /// report) goes back to the queue; any other ends `lost` and is never re-run automatically.
    /// Returns how many jobs were requeued and how many were lost. Safe to run on every replica.
    pub async fn reap_expired(&self) -> StoreResult<(usize, usize)> {
        let now = Utc::now();
        let mut w = self.writer().await?;
        let (requeued, lost): (Vec<(Uuid,)>, Vec<(Uuid, Uuid)>) = with_writer!(w, db => {
            let mut tx = db.begin_with(self.begin_write()).await?;
            let requeued: Vec<(Uuid,)> = sqlx::query_as(
                "UPDATE jobs SET status = 'queued', runner_id = NULL, lease_token_hash = NULL, lease_expires_at = NULL \
                 WHERE status = 'running' AND lease_expires_at <= $1 AND heartbeat_seen = FALSE RETURNING id",
            )
            .bind(now)
            .fetch_all(&mut *tx)
            .await?;
            let lost: Vec<(Uuid, Uuid)> = sqlx::query_as(
                "UPDATE jobs SET status = 'lost', finished_at = $1 \
                 WHERE status = 'running' AND lease_expires_at <= $1 RETURNING id, run_id",
            )
            .bind(now)
            .fetch_all(&mut *tx)
            .await?;
            let mut runs: Vec<Uuid> = lost.iter().map(|(_, r)| *r).collect();
            runs.sort();
            runs.dedup();
            for (job_id, _) in &lost {
                sqlx::query(
                    "UPDATE steps SET status = CASE WHEN status = 'running' THEN 'failed' ELSE 'skipped' END, \
                     finished_at = COALESCE(finished_at, $2) WHERE job_id = $1 AND status IN ('pending', 'running')",
                )
                .bind(*job_id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            for run_id in runs {
                advance_run!(self, tx, run_id, now)?;
            }
            tx.commit().await?;
            (requeued, lost)
        });
        drop(w);
        let mut queued_any = false;
        if !self.writes_serialised() {
            // A completion of another job of these runs may have committed, without the run's
            // lock, after the advance above read it: see `Store::settle_run`.
            let mut runs: Vec<Uuid> = lost.iter().map(|(_, r)| *r).collect();
            runs.sort();
            runs.dedup();
            for run_id in runs {
                queued_any |= self.settle_run(run_id).await?;
            }
        }
        if !requeued.is_empty() || queued_any {
            if !requeued.is_empty() {
                tracing::warn!(
                    count = requeued.len(),
                    "requeued jobs whose runner never confirmed them"
                );
            }
            self.events.publish_jobs().await;
        }
        for (job_id, run_id) in &lost {
            tracing::warn!(job.id = %job_id, run.id = %run_id, "lease expired: job lost");
            self.events.publish_log(*job_id).await;
        }
        Ok((requeued.len(), lost.len()))
    }

    /// A job with its steps.
    pub async fn get_job(&self, id: Uuid) -> StoreResult<Job> {
        let (job, steps): (Option<JobRow>, Vec<StepRow>) = dispatch!(self, pool => {
            let job = sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT {JOB_COLS} FROM jobs WHERE id = $1")))
                .bind(id)
                .fetch_optional(pool)
                .await?;
            let steps = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT {STEP_COLS} FROM steps WHERE job_id = $1 ORDER BY idx"
            )))
            .bind(id)
            .fetch_all(pool)
            .await?;
            (job, steps)
        });
        let job = job.ok_or_else(|| StoreError::NotFound(format!("job {id}")))?;
        Ok(attach_steps(vec![job], steps)?.remove(0))
    }

    /// The job's status and stored log size, for log readers.
    pub async fn job_log_state(&self, id: Uuid) -> StoreResult<(JobStatus, u64)> {
        let row: Option<(String, i64)> = dispatch!(self, pool => {
            sqlx::query_as("SELECT status, log_size FROM jobs WHERE id = $1")
                .bind(id)
                .fetch_optional(pool)
                .await?
        });
        let (status, size) = row.ok_or_else(|| StoreError::NotFound(format!("job {id}")))?;
        let status = JobStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("job status {status}")))?;
        Ok((status, size.max(0) as u64))
    }
}
