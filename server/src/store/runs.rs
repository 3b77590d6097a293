//! Runs and the job graph: creating a run's jobs, moving the DAG forward, cancelling.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use outpost_protocol::{
    AssignedJob, Job, JobStatus, Lease, Run, RunList, RunStatus, Step, StepStatus, TriggerInfo,
};
use sqlx::Connection as _;
use sqlx::types::Json;
use uuid::Uuid;

use super::{
    Claimed, KnownToken, Store, StoreError, StoreResult, dispatch, hash_token, new_token,
    with_writer,
};
use crate::pipeline::PipelineDef;
use crate::queue::Handoff;

/// What a new run starts from.
#[derive(Debug, Clone)]
pub struct NewRun {
    /// The pipeline's name.
    pub pipeline: String,
    /// What started it.
    pub trigger: TriggerInfo,
    /// Variables that override the pipeline's.
    pub variables: BTreeMap<String, String>,
}

#[derive(sqlx::FromRow)]
pub(crate) struct RunRow {
    id: Uuid,
    pipeline: String,
    number: i64,
    status: String,
    trigger: Json<TriggerInfo>,
    variables: Json<BTreeMap<String, String>>,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
}

impl RunRow {
    fn into_api(self, jobs: Vec<Job>) -> StoreResult<Run> {
        Ok(Run {
            id: self.id,
            pipeline: self.pipeline,
            number: self.number,
            status: RunStatus::parse(&self.status)
                .ok_or_else(|| StoreError::Corrupt(format!("run status {}", self.status)))?,
            trigger: self.trigger.0,
            variables: self.variables.0,
            created_at: self.created_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
            jobs,
        })
    }
}

pub(crate) const RUN_COLS: &str =
    "id, pipeline, number, status, trigger, variables, created_at, started_at, finished_at";

#[derive(sqlx::FromRow)]
pub(crate) struct JobRow {
    pub(crate) id: Uuid,
    pub(crate) run_id: Uuid,
    pipeline: String,
    name: String,
    status: String,
    runs_on: Json<Vec<String>>,
    needs: Json<Vec<String>>,
    cluster: Option<String>,
    environment: Option<String>,
    timeout_secs: i64,
    runner_id: Option<Uuid>,
    attempt: i64,
    cancel_requested: bool,
    exit_code: Option<i32>,
    log_size: i64,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
}

pub(crate) const JOB_COLS: &str = "id, run_id, pipeline, name, status, runs_on, needs, cluster, environment, \
     timeout_secs, runner_id, attempt, cancel_requested, exit_code, log_size, created_at, started_at, finished_at";

impl JobRow {
    pub(crate) fn into_api(self, steps: Vec<Step>) -> StoreResult<Job> {
        Ok(Job {
            id: self.id,
            run_id: self.run_id,
            pipeline: self.pipeline,
            name: self.name,
            status: JobStatus::parse(&self.status)
                .ok_or_else(|| StoreError::Corrupt(format!("job status {}", self.status)))?,
            runs_on: self.runs_on.0,
            needs: self.needs.0,
            cluster: self.cluster,
            environment: self.environment,
            timeout_secs: self.timeout_secs.max(0) as u64,
            runner_id: self.runner_id,
            attempt: self.attempt,
            cancel_requested: self.cancel_requested,
            exit_code: self.exit_code,
            log_size: self.log_size.max(0) as u64,
            created_at: self.created_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
            steps,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct StepRow {
    pub(crate) job_id: Uuid,
    idx: i32,
    name: String,
    kind: String,
    status: String,
    exit_code: Option<i32>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    log_start: Option<i64>,
    log_end: Option<i64>,
}

pub(crate) const STEP_COLS: &str =
    "job_id, idx, name, kind, status, exit_code, started_at, finished_at, log_start, log_end";

impl StepRow {
    pub(crate) fn into_api(self) -> StoreResult<Step> {
        Ok(Step {
            index: self.idx.max(0) as u32,
            name: self.name,
            kind: self.kind,
            status: StepStatus::parse(&self.status)
                .ok_or_else(|| StoreError::Corrupt(format!("step status {}", self.status)))?,
            exit_code: self.exit_code,
            started_at: self.started_at,
            finished_at: self.finished_at,
            log_start: self.log_start.map(|v| v.max(0) as u64),
            log_end: self.log_end.map(|v| v.max(0) as u64),
        })
    }
}

/// Groups step rows under their jobs.
pub(crate) fn attach_steps(jobs: Vec<JobRow>, steps: Vec<StepRow>) -> StoreResult<Vec<Job>> {
    let mut by_job: HashMap<Uuid, Vec<Step>> = HashMap::new();
    for s in steps {
        let job_id = s.job_id;
        by_job.entry(job_id).or_default().push(s.into_api()?);
    }
    jobs.into_iter()
        .map(|j| {
            let steps = by_job.remove(&j.id).unwrap_or_default();
            j.into_api(steps)
        })
        .collect()
}

/// The status changes that follow from the jobs' current statuses.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Advance {
    /// Jobs whose status changes: pending jobs become queued or skipped.
    pub(crate) jobs: Vec<(Uuid, JobStatus)>,
    /// The run's status afterwards.
    pub(crate) run_status: Option<RunStatus>,
}

/// Works out which pending jobs are now ready or must be skipped, and the run's status.
///
/// A job is queued when every job it needs succeeded and skipped when one of them ended in any
/// other way; skips cascade. The run is queued until a job starts, running until every job has
/// ended, then the worst outcome: failed (including timed out and lost) beats cancelled beats
/// succeeded.
pub(crate) fn plan_advance(jobs: &[(Uuid, String, JobStatus, Vec<String>)]) -> Advance {
    let mut status: HashMap<&str, JobStatus> =
        jobs.iter().map(|(_, n, s, _)| (n.as_str(), *s)).collect();
    let mut changes = Vec::new();
    loop {
        let mut changed = false;
        for (id, name, _, needs) in jobs {
            if status[name.as_str()] != JobStatus::Pending {
                continue;
            }
            let mut all_ok = true;
            let mut any_bad = false;
            for need in needs {
                match status.get(need.as_str()) {
                    Some(JobStatus::Succeeded) => {}
                    Some(s) if s.is_final() => any_bad = true,
                    _ => all_ok = false,
                }
            }
            let next = if any_bad {
                JobStatus::Skipped
            } else if all_ok {
                JobStatus::Queued
            } else {
                continue;
            };
            status.insert(name.as_str(), next);
            changes.push((*id, next));
            changed = true;
        }
        if !changed {
            break;
        }
    }
    let all_final = status.values().all(|s| s.is_final());
    let run_status = if all_final {
        let mut worst = RunStatus::Succeeded;
        for s in status.values() {
            match s {
                JobStatus::Failed | JobStatus::TimedOut | JobStatus::Lost => {
                    worst = RunStatus::Failed
                }
                JobStatus::Cancelled if worst != RunStatus::Failed => worst = RunStatus::Cancelled,
                _ => {}
            }
        }
        worst
    } else if status
        .values()
        .any(|s| *s == JobStatus::Running || s.is_final())
    {
        RunStatus::Running
    } else {
        RunStatus::Queued
    };
    Advance {
        jobs: changes,
        run_status: Some(run_status),
    }
}

/// One aggregate row about a run: its status, and how many of its jobs are pending and how many
/// queued or running.
pub(crate) const RUN_PROGRESS: &str = "SELECT (SELECT status FROM runs WHERE id = $1), \
     COALESCE(SUM(CASE WHEN status = 'pending' THEN 1 ELSE 0 END), 0), \
     COALESCE(SUM(CASE WHEN status IN ('queued', 'running') THEN 1 ELSE 0 END), 0) \
     FROM jobs WHERE run_id = $1";

/// A row of [`RUN_PROGRESS`].
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RunProgress(Option<String>, i64, i64);

impl RunProgress {
    /// Whether a job ending now changes nothing else: no job waits on `needs`, some are still
    /// queued or running, and the run is already `running`.
    pub(crate) fn quiet(&self) -> bool {
        self.1 == 0 && self.2 > 0 && self.0.as_deref() == Some("running")
    }

    /// Whether the run has ended or can only end or move on by an advance: not final, and no job
    /// queued or running that would advance it when it ends.
    pub(crate) fn stalled(&self) -> bool {
        self.2 == 0
            && !self
                .0
                .as_deref()
                .and_then(RunStatus::parse)
                .is_some_and(|s| s.is_final())
    }
}

/// Moves a run's job graph forward inside an open transaction `$tx`; evaluates to
/// `StoreResult<bool>`: whether any job became queued.
macro_rules! advance_run {
    ($store:expr, $tx:expr, $run_id:expr, $now:expr) => {{
        let run_id: ::uuid::Uuid = $run_id;
        let now: ::chrono::DateTime<::chrono::Utc> = $now;
        // Lock the run row first: two jobs of one run completing at once must not both read the
        // other as still running (READ COMMITTED) and leave the run `running` forever. The
        // second waits here and then sees the first one's committed status. A store whose writes
        // are serialised already (SQLite's writer lock) needs no row lock.
        if !$store.writes_serialised() {
            // A row lock, not a dummy update: 50 completions of a 50-job run would otherwise
            // leave 50 dead versions of the run row behind.
            ::sqlx::query("SELECT 1 FROM runs WHERE id = $1 FOR UPDATE")
                .bind(run_id)
                .execute(&mut *$tx)
                .await?;
        }
        // Most completions change nothing else: no job of the run waits on `needs`, some are
        // still queued or running, and the run is already `running`. One aggregate row says so
        // without reading and planning every job of the run.
        let progress: $crate::store::runs::RunProgress = ::sqlx::query_as($crate::store::runs::RUN_PROGRESS)
            .bind(run_id)
            .fetch_one(&mut *$tx)
            .await?;
        if progress.quiet() {
            Ok::<bool, $crate::store::StoreError>(false)
        } else {
        let rows: Vec<(::uuid::Uuid, String, String, ::sqlx::types::Json<Vec<String>>)> =
            ::sqlx::query_as("SELECT id, name, status, needs FROM jobs WHERE run_id = $1 ORDER BY position")
                .bind(run_id)
                .fetch_all(&mut *$tx)
                .await?;
        let mut jobs = Vec::with_capacity(rows.len());
        for (id, name, status, needs) in rows {
            let status = ::outpost_protocol::JobStatus::parse(&status).ok_or_else(|| {
                $crate::store::StoreError::Corrupt(format!("job status {status}"))
            })?;
            jobs.push((id, name, status, needs.0));
        }
        let plan = $crate::store::runs::plan_advance(&jobs);
        let mut queued_any = false;
        for (id, status) in &plan.jobs {
            let queued = *status == ::outpost_protocol::JobStatus::Queued;
            queued_any |= queued;
            ::sqlx::query("UPDATE jobs SET status = $2, queued_at = $3, finished_at = $4 WHERE id = $1")
                .bind(*id)
                .bind(status.as_str())
                .bind(if queued { Some(now) } else { None })
                .bind(if queued { None } else { Some(now) })
                .execute(&mut *$tx)
                .await?;
            if !queued {
                ::sqlx::query("UPDATE steps SET status = 'skipped' WHERE job_id = $1 AND status = 'pending'")
                    .bind(*id)
                    .execute(&mut *$tx)
                    .await?;
            }
        }
        if let Some(rs) = plan.run_status {
            ::sqlx::query(
                "UPDATE runs SET status = $2, started_at = CASE WHEN $2 = 'queued' THEN started_at ELSE COALESCE(started_at, $3) END, \
                 finished_at = $4 WHERE id = $1",
            )
            .bind(run_id)
            .bind(rs.as_str())
            .bind(now)
            .bind(if rs.is_final() { Some(now) } else { None })
            .execute(&mut *$tx)
            .await?;
        }
        Ok::<bool, $crate::store::StoreError>(queued_any)
        }
    }};
}
pub(crate) use advance_run;

impl Store {
    /// Creates a run with its jobs and steps from a pipeline definition. Jobs without needs are
    /// queued, or, when a runner that can run one is long-polling this replica, claimed for it
    /// in the same statement and handed to its poll ([`crate::queue::Waiters`]).
    pub async fn create_run(&self, new: NewRun, def: &PipelineDef) -> StoreResult<Run> {
        let pipeline = new.pipeline.clone();
        self.insert_run(new, def, RunChecks::default())
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("pipeline {pipeline}")))
    }

    /// Creates a run of the stored pipeline `name`, made by `make` from its definition.
    ///
    /// The definition is this replica's copy when it has one ([`Store::pipeline_for_run`]), which
    /// saves reading it before every run: the statement that takes the run's number also checks
    /// that the pipeline is still at the copy's revision. If it is not (applied or deleted since),
    /// nothing was created, and the run is made again from the definition read afresh.
    pub async fn trigger_run(
        &self,
        name: &str,
        make: impl Fn(&PipelineDef) -> NewRun,
    ) -> StoreResult<Run> {
        for attempt in 0..3 {
            if let Some(run) = self.trigger_once(name, attempt > 0, None, &make).await? {
                return Ok(run);
            }
        }
        Err(StoreError::Conflict(format!(
            "pipeline {name} was applied again while a run of it was being created; try again"
        )))
    }

    /// [`Store::trigger_run`] for a caller whose token was only found in memory
    /// ([`Store::known_api_token`]): the statement that takes the run's number also checks that
    /// the token is still valid (not revoked, not expired), which saves a round trip to check it
    /// first. `None` if it is not, or if the pipeline is no longer at this replica's copy: then
    /// nothing was created, and the caller checks the token on its own and triggers as usual.
    pub async fn trigger_run_as(
        &self,
        name: &str,
        token: &KnownToken,
        make: impl Fn(&PipelineDef) -> NewRun,
    ) -> StoreResult<Option<Run>> {
        self.trigger_once(name, false, Some(&token.hash), &make)
            .await
    }

    /// One attempt of [`Store::trigger_run`]: `None` if the statement created nothing.
    async fn trigger_once(
        &self,
        name: &str,
        reread: bool,
        token_hash: Option<&str>,
        make: &impl Fn(&PipelineDef) -> NewRun,
    ) -> StoreResult<Option<Run>> {
        let (revision, def) = self.pipeline_for_run(name, reread).await?;
        let new = NewRun {
            pipeline: name.to_string(),
            ..make(&def)
        };
        let run = self
            .insert_run(
                new,
                &def,
                RunChecks {
                    revision: Some(revision),
                    token_hash,
                },
            )
            .await?;
        if run.is_none() {
            self.pipeline_cache.forget(name);
        }
        Ok(run)
    }

    /// [`Store::create_run`], only if `checks` hold: `None` when there is no such pipeline or a
    /// check failed, and then nothing changed.
    async fn insert_run(
        &self,
        new: NewRun,
        def: &PipelineDef,
        checks: RunChecks<'_>,
    ) -> StoreResult<Option<Run>> {
        let now = Utc::now();
        let run_id = Uuid::now_v7();
        let mut variables = def.variables.clone();
        variables.extend(new.variables.clone());
        // Secrets: every one the pipeline lists must be set now; the jobs record only the names.
        self.require_secrets(&new.pipeline, &def.secrets).await?;
        // The jobs and the specs their runners will get; the run's number is filled in when the
        // database has handed it out.
        let mut jobs = Vec::with_capacity(def.jobs.len());
        let mut specs = Vec::with_capacity(def.jobs.len());
        for job in &def.jobs {
            let job_id = Uuid::now_v7();
            let status = if job.needs.is_empty() {
                JobStatus::Queued
            } else {
                JobStatus::Pending
            };
            specs.push(AssignedJob {
                id: job_id,
                run_id,
                run_number: 0,
                pipeline: new.pipeline.clone(),
                name: job.name.clone(),
                steps: job.steps.clone(),
                variables: variables.clone(),
                secrets: super::secrets::placeholders(&def.secrets),
                timeout_secs: job.timeout_secs,
                cluster: job.cluster.clone(),
                environment: job.environment.clone(),
                trigger: new.trigger.clone(),
            });
            jobs.push(Job {
                id: job_id,
                run_id,
                pipeline: new.pipeline.clone(),
                name: job.name.clone(),
                status,
                runs_on: required_labels(&job.runs_on, job.cluster.as_deref()),
                needs: job.needs.clone(),
                cluster: job.cluster.clone(),
                environment: job.environment.clone(),
                timeout_secs: job.timeout_secs,
                runner_id: None,
                attempt: 0,
                cancel_requested: false,
                exit_code: None,
                log_size: 0,
                created_at: now,
                started_at: None,
                finished_at: None,
                steps: job
                    .steps
                    .iter()
                    .map(|st| Step {
                        index: st.index,
                        name: st.name.clone(),
                        kind: st.action.kind().to_string(),
                        status: StepStatus::Pending,
                        exit_code: None,
                        started_at: None,
                        finished_at: None,
                        log_start: None,
                        log_end: None,
                    })
                    .collect(),
            });
        }
        // Runners long-polling this replica get new jobs they can run at once: each such job is
        // inserted already claimed for one of them, under a fresh lease, in the statement that
        // creates the run, and their polls are answered once it committed.
        let mut handoffs: Vec<(usize, Handoff, Lease)> = Vec::new();
        let mut leases: Vec<Option<NewLease>> = vec![None; jobs.len()];
        if !self.events.waiters.is_empty() {
            for (i, job) in jobs.iter_mut().enumerate() {
                if job.status != JobStatus::Queued {
                    continue;
                }
                let Some(handoff) = self.events.waiters.take(&job.runs_on) else {
                    continue;
                };
                let token = new_token("opl_");
                let expires_at = now + chrono::Duration::seconds(handoff.lease_secs as i64);
                job.status = JobStatus::Running;
                job.runner_id = Some(handoff.runner_id);
                job.attempt = 1;
                job.started_at = Some(now);
                leases[i] = Some(NewLease {
                    runner_id: handoff.runner_id,
                    token_hash: hash_token(&token),
                    expires_at,
                });
                let lease = Lease {
                    token,
                    expires_at,
                    duration_secs: handoff.lease_secs,
                };
                handoffs.push((i, handoff, lease));
            }
        }
        let started = (!handoffs.is_empty()).then_some(now);
        let queued_left = jobs.iter().any(|j| j.status == JobStatus::Queued);
        let rows = NewRows {
            jobs: &jobs,
            specs: &specs,
            leases: &leases,
            started,
            queued_left,
        };
        let created = match self.writer().await {
            Err(e) => Err(e),
            Ok(super::Writer::Postgres(pool)) => {
                create_run_postgres(pool, run_id, &new, now, rows, checks).await
            }
            Ok(super::Writer::Sqlite(mut conn)) => {
                self.create_run_sqlite(&mut conn, run_id, &new, now, rows, checks)
                    .await
            }
        };
        let number = match created {
            Ok(Some(number)) => number,
            failed => {
                // Nothing was created: the polls taken claim as usual.
                for (_, handoff, _) in handoffs {
                    handoff.deliver(None);
                }
                return failed.map(|_| None);
            }
        };
        for (i, handoff, lease) in handoffs {
            let mut job = specs[i].clone();
            job.run_number = number;
            // The stored spec names the job's secrets with empty values; the values are
            // decrypted here, as for a claim.
            if !job.secrets.is_empty()
                && let Err(e) = self.fill_secrets(&mut job).await
            {
                tracing::warn!(job.id = %job.id, error = %e, "could not read a handed-off job's secrets; it is queued again when its lease expires");
                handoff.deliver(None);
                continue;
            }
            let job_id = job.id;
            if !handoff.deliver(Some(Claimed { job, lease })) {
                tracing::info!(job.id = %job_id, "a runner left before its handed-off job reached it; the job is queued again when its lease expires");
            }
        }
        // Other replicas: the PostgreSQL statement notified them; SQLite has none.
        if queued_left {
            self.events.wake_jobs_local();
        }
        Ok(Some(Run {
            id: run_id,
            pipeline: new.pipeline,
            number,
            status: if started.is_some() {
                RunStatus::Running
            } else {
                RunStatus::Queued
            },
            trigger: new.trigger,
            variables: new.variables,
            created_at: now,
            started_at: started,
            finished_at: None,
            jobs,
        }))
    }

    /// [`Store::create_run`] on SQLite: the number in its own statement, then one transaction of
    /// multi-row inserts, on the writer connection `conn` the caller holds locked. `None` if
    /// there is no such pipeline, or one of `checks` failed.
    async fn create_run_sqlite(
        &self,
        conn: &mut sqlx::SqliteConnection,
        run_id: Uuid,
        new: &NewRun,
        now: DateTime<Utc>,
        rows: NewRows<'_>,
        checks: RunChecks<'_>,
    ) -> StoreResult<Option<i64>> {
        // The number is its own statement, outside the transaction: a run whose insert then
        // fails leaves a gap in the numbering, nothing worse. Triggers are serialised by the
        // writer lock the caller holds.
        let number: Option<(i64,)> = if new.pipeline == outpost_protocol::INVOKE_PIPELINE {
            // Invoke runs have no pipeline row: they count in a table of their own.
            sqlx::query_as(NEXT_INVOKE_NUMBER)
                .bind(&new.pipeline)
                .fetch_optional(&mut *conn)
                .await?
        } else {
            sqlx::query_as(NEXT_PIPELINE_NUMBER_SQLITE)
                .bind(&new.pipeline)
                .bind(checks.revision)
                .bind(checks.token_hash)
                .bind(now)
                .fetch_optional(&mut *conn)
                .await?
        };
        let Some((number,)) = number else {
            return Ok(None);
        };
        let jobs = rows.jobs;
        let mut tx = conn.begin_with(self.begin_write()).await?;
        sqlx::query(
            "INSERT INTO runs (id, pipeline, number, status, trigger, variables, created_at, started_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(run_id)
        .bind(&new.pipeline)
        .bind(number)
        .bind(rows.run_status())
        .bind(Json(&new.trigger))
        .bind(Json(&new.variables))
        .bind(now)
        .bind(rows.started)
        .execute(&mut *tx)
        .await?;
        // Multi-row inserts: one statement per table rather than one per job and step.
        for chunk in jobs
            .iter()
            .zip(rows.specs.iter().zip(rows.leases))
            .enumerate()
            .collect::<Vec<_>>()
            .chunks(400)
        {
            let mut qb = sqlx::QueryBuilder::new(
                "INSERT INTO jobs (id, run_id, pipeline, name, position, status, runs_on, needs, cluster, \
                 environment, timeout_secs, spec, created_at, queued_at, runner_id, lease_token_hash, \
                 lease_expires_at, attempt, started_at) ",
            );
            qb.push_values(chunk, |mut b, (position, (job, (spec, lease)))| {
                let spec = AssignedJob {
                    run_number: number,
                    ..(*spec).clone()
                };
                b.push_bind(job.id)
                    .push_bind(run_id)
                    .push_bind(job.pipeline.clone())
                    .push_bind(job.name.clone())
                    .push_bind(*position as i32)
                    .push_bind(job.status.as_str())
                    .push_bind(Json(job.runs_on.clone()))
                    .push_bind(Json(job.needs.clone()))
                    .push_bind(job.cluster.clone())
                    .push_bind(job.environment.clone())
                    .push_bind(job.timeout_secs as i64)
                    .push_bind(Json(spec))
                    .push_bind(now)
                    .push_bind(if job.status == JobStatus::Pending {
                        None
                    } else {
                        Some(now)
                    })
                    .push_bind(lease.as_ref().map(|l| l.runner_id))
                    .push_bind(lease.as_ref().map(|l| l.token_hash.clone()))
                    .push_bind(lease.as_ref().map(|l| l.expires_at))
                    .push_bind(job.attempt)
                    .push_bind(job.started_at);
            });
            qb.build().execute(&mut *tx).await?;
        }
        let steps: Vec<(Uuid, &Step)> = jobs
            .iter()
            .flat_map(|j| j.steps.iter().map(move |st| (j.id, st)))
            .collect();
        for chunk in steps.chunks(1000) {
            let mut qb =
                sqlx::QueryBuilder::new("INSERT INTO steps (job_id, idx, name, kind, status) ");
            qb.push_values(chunk, |mut b, (job_id, st)| {
                b.push_bind(*job_id)
                    .push_bind(st.index as i32)
                    .push_bind(st.name.clone())
                    .push_bind(st.kind.clone())
                    .push_bind("pending");
            });
            qb.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(Some(number))
    }

    /// After a job ended outside the run's lock (PostgreSQL), advances the run if nothing else
    /// will: when no job of the run is queued or running any more and the run is not final.
    ///
    /// A completion that finds its run quiet commits without locking the run row, so that the
    /// jobs of one run can complete in parallel. Two of the last jobs completing at once may then
    /// each see the other still running; whichever commits last sees the other's commit here,
    /// after its own, and advances the run under the lock. Returns whether any job became queued.
    pub(crate) async fn settle_run(&self, run_id: Uuid) -> StoreResult<bool> {
        let progress: RunProgress = dispatch!(self, pool => {
            sqlx::query_as(RUN_PROGRESS).bind(run_id).fetch_one(pool).await?
        });
        if !progress.stalled() {
            return Ok(false);
        }
        let now = Utc::now();
        let mut w = self.writer().await?;
        let queued = with_writer!(w, db => {
            let mut tx = db.begin_with(self.begin_write()).await?;
            let queued = advance_run!(self, tx, run_id, now)?;
            tx.commit().await?;
            queued
        });
        drop(w);
        Ok(queued)
    }

    /// Advances the runs that no job will advance any more: not final, and none of their jobs
    /// queued or running. A completion on PostgreSQL settles its run after its commit (see
    /// [`Store::settle_run`]); a replica that stopped between the two leaves such a run behind,
    /// and the reaper calls this now and then to finish it. Returns how many runs it advanced.
    pub async fn repair_runs(&self) -> StoreResult<usize> {
        let stalled: Vec<(Uuid,)> = dispatch!(self, pool => {
            sqlx::query_as(
                "SELECT r.id FROM runs r WHERE r.status IN ('queued', 'running') AND NOT EXISTS \
                 (SELECT 1 FROM jobs j WHERE j.run_id = r.id AND j.status IN ('queued', 'running'))",
            )
            .fetch_all(pool)
            .await?
        });
        let mut advanced = 0;
        for (run_id,) in stalled {
            if self.settle_run(run_id).await? {
                self.events.publish_jobs().await;
            }
            advanced += 1;
        }
        Ok(advanced)
    }

    /// A run with its jobs and their steps.
    pub async fn get_run(&self, id: Uuid) -> StoreResult<Run> {
        let postgres = self.is_postgres();
        let (run, jobs, steps): (Option<RunRow>, Vec<JobRow>, Vec<StepRow>) = dispatch!(self, pool => {
            let run = sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT {RUN_COLS} FROM runs WHERE id = $1")))
                .bind(id)
                .fetch_optional(pool)
                .await?;
            let jobs = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT {JOB_COLS} FROM jobs WHERE run_id = $1 ORDER BY position"
            )))
            .bind(id)
            .fetch_all(pool)
            .await?;
            let filter = if postgres { RUN_STEPS_WHERE_POSTGRES } else { RUN_STEPS_WHERE_SQLITE };
            let steps = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT {STEP_COLS} FROM steps WHERE {filter} ORDER BY idx"
            )))
            .bind(id)
            .fetch_all(pool)
            .await?;
            (run, jobs, steps)
        });
        let run = run.ok_or_else(|| StoreError::NotFound(format!("run {id}")))?;
        run.into_api(attach_steps(jobs, steps)?)
    }

    /// Runs newest first, optionally filtered; `cursor` is the last id of the previous page.
    pub async fn list_runs(
        &self,
        pipeline: Option<&str>,
        status: Option<RunStatus>,
        limit: u32,
        cursor: Option<Uuid>,
    ) -> StoreResult<RunList> {
        let limit = limit.clamp(1, 200);
        let before = cursor.unwrap_or(Uuid::max());
        let rows: Vec<RunRow> = dispatch!(self, pool => {
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT {RUN_COLS} FROM runs WHERE ($1 IS NULL OR pipeline = $1) AND ($2 IS NULL OR status = $2) \
                 AND id < $3 ORDER BY id DESC LIMIT $4"
            )))
            .bind(pipeline)
            .bind(status.map(|s| s.as_str()))
            .bind(before)
            .bind(i64::from(limit) + 1)
            .fetch_all(pool)
            .await?
        });
        let more = rows.len() > limit as usize;
        let mut runs = rows
            .into_iter()
            .take(limit as usize)
            .map(|r| r.into_api(Vec::new()))
            .collect::<StoreResult<Vec<_>>>()?;
        let next_cursor = if more {
            runs.last().map(|r| r.id.to_string())
        } else {
            None
        };
        runs.shrink_to_fit();
        Ok(RunList { runs, next_cursor })
    }

    /// Cancels every unfinished job of a run: waiting jobs end at once, running jobs are flagged
    /// for their runner (which sees it in its next heartbeat).
    pub async fn cancel_run(&self, id: Uuid) -> StoreResult<Run> {
        self.cancel_where(id, None).await?;
        self.get_run(id).await
    }

    /// Cancels one job; see [`Store::cancel_run`].
    pub async fn cancel_job(&self, job_id: Uuid) -> StoreResult<Job> {
        let run_id = self.get_job(job_id).await?.run_id;
        self.cancel_where(run_id, Some(job_id)).await?;
        self.get_job(job_id).await
    }

    async fn cancel_where(&self, run_id: Uuid, job: Option<Uuid>) -> StoreResult<()> {
        let now = Utc::now();
        let mut w = self.writer().await?;
        // Found by schemathesis with two concurrent workers: see `Store::begin_write`.
        with_writer!(w, db => {
            let mut tx = db.begin_with(self.begin_write()).await?;
            let exists: Option<(Uuid,)> = sqlx::query_as("SELECT id FROM runs WHERE id = $1")
                .bind(run_id)
                .fetch_optional(&mut *tx)
                .await?;
            if exists.is_none() {
                return Err(StoreError::NotFound(format!("run {run_id}")));
            }
            let job_filter = job.unwrap_or(Uuid::nil());
            let waiting: Vec<(Uuid,)> = sqlx::query_as(
                "UPDATE jobs SET status = 'cancelled', finished_at = $3, cancel_requested = TRUE \
                 WHERE run_id = $1 AND ($2 = $4 OR id = $2) AND status IN ('pending', 'queued') RETURNING id",
            )
            .bind(run_id)
            .bind(job_filter)
            .bind(now)
            .bind(Uuid::nil())
            .fetch_all(&mut *tx)
            .await?;
            for (id,) in &waiting {
                sqlx::query("UPDATE steps SET status = 'skipped' WHERE job_id = $1 AND status = 'pending'")
                    .bind(*id)
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query(
                "UPDATE jobs SET cancel_requested = TRUE WHERE run_id = $1 AND ($2 = $3 OR id = $2) AND status = 'running'",
            )
            .bind(run_id)
            .bind(job_filter)
            .bind(Uuid::nil())
            .execute(&mut *tx)
            .await?;
            let queued = advance_run!(self, tx, run_id, now)?;
            tx.commit().await?;
            if queued {
                self.events.publish_jobs().await;
            }
            for (id,) in waiting {
                self.events.publish_log(id).await;
            }
        });
        drop(w);
        // A completion of a job of this run may have committed, without the run's lock, after
        // the advance above read it: see `Store::settle_run`.
        if !self.writes_serialised() && self.settle_run(run_id).await? {
            self.events.publish_jobs().await;
        }
        Ok(())
    }
}

/// Which steps are a run's (`$1` the run), as [`Store::get_run`] reads them on SQLite.
const RUN_STEPS_WHERE_SQLITE: &str = "job_id IN (SELECT id FROM jobs WHERE run_id = $1)";

/// The same on PostgreSQL, with the run's job ids gathered first into an array, so that the steps
/// are read through their primary key whatever the planner knows of the tables. On tables it has
/// not analysed yet (a new database, until autovacuum first gets to it) a join was planned as a
/// sequential scan of every step and a hash join: 0.9 ms and 96 buffers for a run of one job
/// among 10,000, growing with the table; this way, 8 buffers and under 0.2 ms among 30,000 steps,
/// analysed or not (BENCHMARKS.md, tenth round).
const RUN_STEPS_WHERE_POSTGRES: &str = "job_id = ANY(ARRAY(SELECT id FROM jobs WHERE run_id = $1))";

/// Takes a pipeline's next run number in [`CREATE_RUN_POSTGRES`] (`$12` the revision the run's
/// definition was read at, if any; `$13` the hash of the API token the run is triggered with, if
/// it was not checked before; `$5` now); no row if there is no such pipeline, it is at another
/// revision, or the token is revoked, expired or unknown. The token is read in the statement's
/// snapshot, so a revocation committed before the trigger's statement began stops it.
const NEXT_PIPELINE_NUMBER: &str = "UPDATE pipelines SET next_run_number = next_run_number + 1 \
     WHERE name = $1 AND ($12 IS NULL OR revision = $12) \
     AND ($13::text IS NULL OR EXISTS (SELECT 1 FROM api_tokens WHERE token_hash = $13 \
       AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $5))) \
     RETURNING next_run_number - 1 AS number";

/// [`NEXT_PIPELINE_NUMBER`] on its own, as SQLite takes it (`$2` the revision, if any; `$3` the
/// token's hash, if any; `$4` now).
const NEXT_PIPELINE_NUMBER_SQLITE: &str = "UPDATE pipelines SET next_run_number = next_run_number + 1 \
     WHERE name = $1 AND ($2 IS NULL OR revision = $2) \
     AND ($3 IS NULL OR EXISTS (SELECT 1 FROM api_tokens WHERE token_hash = $3 \
       AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $4))) \
     RETURNING next_run_number - 1 AS number";

/// Takes the next number of the invoke runs, which have no pipeline row and count in a table of
/// their own.
const NEXT_INVOKE_NUMBER: &str = "INSERT INTO run_numbers (pipeline, next_number) VALUES ($1, 2) \
     ON CONFLICT (pipeline) DO UPDATE SET next_number = run_numbers.next_number + 1 \
     RETURNING next_number - 1 AS number";

/// A new run on PostgreSQL as one statement: its number, the run, its jobs (some perhaps already
/// claimed for waiting runners) and their steps, and the notification to the other replicas,
/// queued only when the run was created and left a job queued (`$1` pipeline, `$2` run id, `$3`
/// trigger, `$4` variables, `$5` now, `$6` the jobs and `$7` the steps as JSON arrays, `$8` the
/// channel, `$9` the run's status, `$10` its start, `$11` whether a job is left queued).
///
/// One statement is one round trip and one durable commit, where the number, a transaction of
/// three inserts and the notification took seven round trips and three commits, all of them
/// between a trigger and the moment a waiting runner can claim its job. The foreign keys of jobs
/// and steps are checked at the end of the statement, when the run and the jobs exist. The
/// pipeline's row is locked from the number to the commit, so triggers of one pipeline commit one
/// after another, as they did when the number was its own statement.
const CREATE_RUN_POSTGRES: &str = "WITH n AS ({number}), \
     r AS (INSERT INTO runs (id, pipeline, number, status, trigger, variables, created_at, started_at) \
       SELECT $2, $1, n.number, $9, $3, $4, $5, $10 FROM n), \
     j AS (INSERT INTO jobs (id, run_id, pipeline, name, position, status, runs_on, needs, cluster, \
         environment, timeout_secs, spec, created_at, queued_at, runner_id, lease_token_hash, \
         lease_expires_at, attempt, started_at) \
       SELECT (e->>'id')::uuid, $2, $1, e->>'name', (e->>'position')::int, e->>'status', e->'runs_on', \
         e->'needs', e->>'cluster', e->>'environment', (e->>'timeout_secs')::bigint, \
         jsonb_set(e->'spec', '{run_number}', to_jsonb(n.number)), $5, \
         CASE WHEN e->>'status' <> 'pending' THEN $5 END, (e->>'runner_id')::uuid, e->>'lease_token_hash', \
         (e->>'lease_expires_at')::timestamptz, (e->>'attempt')::bigint, (e->>'started_at')::timestamptz \
       FROM n, jsonb_array_elements($6) AS e), \
     s AS (INSERT INTO steps (job_id, idx, name, kind, status) \
       SELECT (e->>'job_id')::uuid, (e->>'idx')::int, e->>'name', e->>'kind', 'pending' \
       FROM n, jsonb_array_elements($7) AS e) \
     SELECT n.number, (SELECT pg_notify($8, 'jobs') WHERE $11) IS NULL AS notified FROM n";

/// One job of [`CREATE_RUN_POSTGRES`]'s `$6`.
#[derive(serde::Serialize)]
struct NewJobRow<'a> {
    id: Uuid,
    name: &'a str,
    position: usize,
    status: &'static str,
    runs_on: &'a [String],
    needs: &'a [String],
    cluster: Option<&'a str>,
    environment: Option<&'a str>,
    timeout_secs: u64,
    spec: &'a AssignedJob,
    runner_id: Option<Uuid>,
    lease_token_hash: Option<&'a str>,
    lease_expires_at: Option<DateTime<Utc>>,
    attempt: i64,
    started_at: Option<DateTime<Utc>>,
}

/// The lease of a new job handed straight to a waiting runner.
#[derive(Debug, Clone)]
struct NewLease {
    runner_id: Uuid,
    token_hash: String,
    expires_at: DateTime<Utc>,
}

/// What the statement that takes a new run's number checks besides the pipeline's existence; the
/// run is created only if all hold.
#[derive(Debug, Clone, Copy, Default)]
struct RunChecks<'a> {
    /// The pipeline is still at this revision (the one its definition was read at).
    revision: Option<Uuid>,
    /// The API token with this hash is valid: not revoked, not expired.
    token_hash: Option<&'a str>,
}

/// What [`Store::create_run`] inserts besides the run's own fields.
struct NewRows<'a> {
    jobs: &'a [Job],
    specs: &'a [AssignedJob],
    /// Per job, the lease of a job handed to a waiting runner.
    leases: &'a [Option<NewLease>],
    /// When a job was handed off: the run started then.
    started: Option<DateTime<Utc>>,
    /// Whether a job is left queued for runners to claim.
    queued_left: bool,
}

impl NewRows<'_> {
    fn run_status(&self) -> &'static str {
        match self.started {
            Some(_) => RunStatus::Running.as_str(),
            None => RunStatus::Queued.as_str(),
        }
    }
}

/// One step of [`CREATE_RUN_POSTGRES`]'s `$7`.
#[derive(serde::Serialize)]
struct NewStepRow<'a> {
    job_id: Uuid,
    idx: u32,
    name: &'a str,
    kind: &'a str,
}

/// [`Store::create_run`] on PostgreSQL: one statement ([`CREATE_RUN_POSTGRES`]). `None` if there
/// is no such pipeline, or one of `checks` failed.
async fn create_run_postgres(
    pool: &sqlx::PgPool,
    run_id: Uuid,
    new: &NewRun,
    now: DateTime<Utc>,
    rows: NewRows<'_>,
    checks: RunChecks<'_>,
) -> StoreResult<Option<i64>> {
    let invoke = new.pipeline == outpost_protocol::INVOKE_PIPELINE;
    let number_sql = if invoke {
        NEXT_INVOKE_NUMBER
    } else {
        NEXT_PIPELINE_NUMBER
    };
    let sql = CREATE_RUN_POSTGRES.replace("{number}", number_sql);
    let jobs = rows.jobs;
    let job_rows: Vec<NewJobRow> = jobs
        .iter()
        .zip(rows.specs.iter().zip(rows.leases))
        .enumerate()
        .map(|(position, (job, (spec, lease)))| NewJobRow {
            id: job.id,
            name: &job.name,
            position,
            status: job.status.as_str(),
            runs_on: &job.runs_on,
            needs: &job.needs,
            cluster: job.cluster.as_deref(),
            environment: job.environment.as_deref(),
            timeout_secs: job.timeout_secs,
            spec,
            runner_id: lease.as_ref().map(|l| l.runner_id),
            lease_token_hash: lease.as_ref().map(|l| l.token_hash.as_str()),
            lease_expires_at: lease.as_ref().map(|l| l.expires_at),
            attempt: job.attempt,
            started_at: job.started_at,
        })
        .collect();
    let step_rows: Vec<NewStepRow> = jobs
        .iter()
        .flat_map(|j| {
            j.steps.iter().map(move |st| NewStepRow {
                job_id: j.id,
                idx: st.index,
                name: &st.name,
                kind: &st.kind,
            })
        })
        .collect();
    let query = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(&new.pipeline)
        .bind(run_id)
        .bind(Json(&new.trigger))
        .bind(Json(&new.variables))
        .bind(now)
        .bind(Json(&job_rows))
        .bind(Json(&step_rows))
        .bind(crate::events::CHANNEL)
        .bind(rows.run_status())
        .bind(rows.started)
        .bind(rows.queued_left);
    // Only a pipeline's number statement checks a revision (`$12`) and a token (`$13`); invoke
    // runs have neither.
    let query = if invoke {
        query
    } else {
        query.bind(checks.revision).bind(checks.token_hash)
    };
    let number: Option<(i64, bool)> = query.fetch_optional(pool).await?;
    Ok(number.map(|(n, _)| n))
}

/// The labels a runner needs for a job: its `runs_on`, plus `cluster:NAME` when it names a
/// cluster, which runners carry for each cluster they registered with.
fn required_labels(runs_on: &[String], cluster: Option<&str>) -> Vec<String> {
    let mut labels = runs_on.to_vec();
    if let Some(cluster) = cluster {
        let label = super::runners::cluster_label(cluster);
        if !labels.contains(&label) {
            labels.push(label);
        }
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(
        name: &str,
        status: JobStatus,
        needs: &[&str],
    ) -> (Uuid, String, JobStatus, Vec<String>) {
        (
            Uuid::now_v7(),
            name.into(),
            status,
            needs.iter().map(|s| s.to_string()).collect(),
        )
    }

    #[test]
    fn dependant_is_queued_once_its_needs_succeed() {
        let jobs = vec![
            job("build", JobStatus::Succeeded, &[]),
            job("deploy", JobStatus::Pending, &["build"]),
        ];
        let plan = plan_advance(&jobs);
        assert_eq!(plan.jobs, vec![(jobs[1].0, JobStatus::Queued)]);
        assert_eq!(plan.run_status, Some(RunStatus::Running));
    }

    #[test]
    fn failure_skips_dependants_transitively_and_fails_the_run() {
        let jobs = vec![
            job("build", JobStatus::Failed, &[]),
            job("deploy", JobStatus::Pending, &["build"]),
            job("notify", JobStatus::Pending, &["deploy"]),
        ];
        let plan = plan_advance(&jobs);
        assert_eq!(
            plan.jobs,
            vec![
                (jobs[1].0, JobStatus::Skipped),
                (jobs[2].0, JobStatus::Skipped)
            ]
        );
        assert_eq!(plan.run_status, Some(RunStatus::Failed));
    }

    #[test]
    fn worst_outcome_wins() {
        let plan = plan_advance(&[
            job("a", JobStatus::Cancelled, &[]),
            job("b", JobStatus::Succeeded, &[]),
        ]);
        assert_eq!(plan.run_status, Some(RunStatus::Cancelled));
        let plan = plan_advance(&[
            job("a", JobStatus::Cancelled, &[]),
            job("b", JobStatus::Lost, &[]),
        ]);
        assert_eq!(plan.run_status, Some(RunStatus::Failed));
        let plan = plan_advance(&[job("a", JobStatus::Queued, &[])]);
        assert_eq!(plan.run_status, Some(RunStatus::Queued));
    }
}
