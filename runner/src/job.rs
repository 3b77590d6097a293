//! Runs one job: the first heartbeat, then heartbeats, the steps, the log, step reports and the
//! final `complete`.
//!
//! The executor talks to the server only through [`JobApi`], which production implements with the
//! protocol client ([`LeasedJob`]) and tests implement with a fake.
//!
//! Invariants:
//! - nothing runs before the first heartbeat succeeded (the server may re-queue a job whose first
//!   heartbeat never came);
//! - a lease that is gone (`409` from any per-job call) kills the running step at once, runs nothing
//!   more and reports nothing more: another runner may hold the job now;
//! - the child never waits on the network: output goes to the log buffer, step reports to a queue.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use outpost_protocol::{
    AssignedJob, Client, ClientError, CompleteRequest, HeartbeatResponse, JobStatus, Lease,
    LogAppendResponse, StepAction, StepSpec, StepStatus, StepUpdate, When,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use uuid::Uuid;

pub use crate::backoff::lease_is_gone;
use crate::backoff::{Backoff, error_chain, human};
use crate::checkout;
use crate::expand;
use crate::logs::{self, LogConfig, LogError, LogSink, LogWriter};
use crate::process::{self, CommandSpec, KillMode, KillTiming};
use crate::settings::Settings;

/// The per-job calls of the runner protocol, bound to one job and its lease.
pub trait JobApi: Clone + Send + Sync + 'static {
    /// `POST /api/v1/runner/jobs/{id}/heartbeat`.
    fn heartbeat(&self) -> impl Future<Output = Result<HeartbeatResponse, ClientError>> + Send;
    /// `PUT /api/v1/runner/jobs/{id}/log?offset=N`.
    fn append_log(
        &self,
        offset: u64,
        data: Bytes,
    ) -> impl Future<Output = Result<LogAppendResponse, ClientError>> + Send;
    /// `POST /api/v1/runner/jobs/{id}/steps/{index}`.
    fn update_step(
        &self,
        index: u32,
        update: StepUpdate,
    ) -> impl Future<Output = Result<(), ClientError>> + Send;
    /// `POST /api/v1/runner/jobs/{id}/complete`.
    fn complete(
        &self,
        req: CompleteRequest,
    ) -> impl Future<Output = Result<(), ClientError>> + Send;
}

/// The production [`JobApi`]: the protocol client with the job's lease token.
#[derive(Debug, Clone)]
pub struct LeasedJob {
    client: Client,
    job: Uuid,
    lease: String,
}

impl LeasedJob {
    /// Binds `client` to `job` under `lease_token`.
    pub fn new(client: &Client, job: Uuid, lease_token: &str) -> Self {
        Self {
            client: client.clone(),
            job,
            lease: lease_token.to_string(),
        }
    }
}

impl JobApi for LeasedJob {
    async fn heartbeat(&self) -> Result<HeartbeatResponse, ClientError> {
        self.client.heartbeat(self.job, &self.lease).await
    }

    async fn append_log(&self, offset: u64, data: Bytes) -> Result<LogAppendResponse, ClientError> {
        self.client
            .append_log(self.job, &self.lease, offset, data)
            .await
    }

    async fn update_step(&self, index: u32, update: StepUpdate) -> Result<(), ClientError> {
        self.client
            .update_step(self.job, &self.lease, index, &update)
            .await
    }

    async fn complete(&self, req: CompleteRequest) -> Result<(), ClientError> {
        self.client.complete(self.job, &self.lease, &req).await
    }
}

/// Sends the log through a [`JobApi`].
struct ApiLog<A>(A);

impl<A: JobApi> LogSink for ApiLog<A> {
    async fn append(&self, offset: u64, data: Bytes) -> Result<u64, ClientError> {
        self.0.append_log(offset, data).await.map(|r| r.next_offset)
    }
}

/// What the executor takes from the runner's settings.
#[derive(Debug, Clone)]
pub struct ExecConfig {
    /// The runner's name, shown at the top of each log.
    pub runner_name: String,
    /// Parent of the per-job workspaces.
    pub work_dir: PathBuf,
    /// Default shell command line for `run` steps; `{0}` is the script.
    pub shell: String,
    /// The `kubectl` binary.
    pub kubectl: PathBuf,
    /// The `helm` binary.
    pub helm: PathBuf,
    /// The `git` binary.
    pub git: PathBuf,
    /// Keep workspaces after the job.
    pub keep_workspaces: bool,
    /// Time from `SIGINT` to `SIGKILL` when stopping a step.
    pub kill_grace: Duration,
    /// Time `always`/`on_failure` steps get in total after a cancellation or a job timeout.
    pub cleanup_budget: Duration,
    /// Time to deliver the rest of the log, the step reports and `complete` after the last step.
    pub flush_budget: Duration,
    /// Log batching.
    pub log: LogConfig,
    /// The clusters jobs may name, for their kubeconfig.
    pub clusters: crate::clusters::JobClusters,
}

impl ExecConfig {
    /// The executor's view of `settings`.
    pub fn from_settings(settings: &Settings, runner_name: &str) -> Self {
        Self {
            runner_name: runner_name.to_string(),
            work_dir: settings.work_dir.clone(),
            shell: settings.shell.clone(),
            kubectl: settings.kubectl.clone(),
            helm: settings.helm.clone(),
            git: settings.git.clone(),
            keep_workspaces: settings.keep_workspaces,
            kill_grace: Duration::from_secs(settings.kill_grace_secs),
            cleanup_budget: Duration::from_secs(5 * 60),
            flush_budget: Duration::from_secs(2 * 60),
            log: LogConfig {
                spool_dir: Some(settings.log_spool_dir()),
                spool_max_bytes: settings.log_spool_max_bytes,
                ..LogConfig::default()
            },
            clusters: crate::clusters::JobClusters {
                clusters: settings.resolved_clusters().unwrap_or_else(|e| {
                    tracing::warn!("the clusters in the runner settings are not valid: {e:#}");
                    Default::default()
                }),
                config_dir: settings.config_dir.clone(),
                exe: std::env::current_exe().unwrap_or_else(|_| "outpost-runner".into()),
            },
        }
    }
}

/// How running a job ended, from the runner's side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobOutcome {
    /// The job ran and `complete` reached the server.
    Completed {
        /// The final status.
        status: JobStatus,
        /// The exit code reported.
        exit_code: Option<i32>,
    },
    /// The job ran but `complete` did not reach the server in time.
    NotReported {
        /// The status it would have reported.
        status: JobStatus,
        /// Why it could not.
        reason: String,
    },
    /// The lease was lost: the job was stopped at once and nothing more was reported.
    LeaseLost,
    /// The first heartbeat never got through, so nothing ran.
    NotStarted {
        /// Why.
        reason: String,
    },
}

/// The interval between heartbeats: a quarter of the lease, at most 5 s, at least 100 ms.
///
/// Heartbeats also carry cancellation, so their interval bounds how long a cancel takes to reach
/// the step; one small write every 5 s per running job is cheap for that.
pub fn heartbeat_interval(lease_secs: u64) -> Duration {
    (Duration::from_secs(lease_secs) / 4).clamp(Duration::from_millis(100), Duration::from_secs(5))
}

/// Runs `job` to the end and reports it through `api`.
///
/// `abort` is the runner's hard stop (a second signal, or the drain grace running out): the running
/// step is stopped like a cancellation, later steps are skipped, and the job is reported cancelled.
pub async fn execute<A: JobApi>(
    api: A,
    job: AssignedJob,
    lease: Lease,
    config: &ExecConfig,
    abort: CancellationToken,
) -> JobOutcome {
    let started = Instant::now();
    let lease_lost = CancellationToken::new();
    let cancel = CancellationToken::new();

    match first_heartbeat(&api, &lease, &abort).await {
        Ok(resp) => {
            if resp.cancel_requested {
                cancel.cancel();
            }
        }
        Err(FirstHeartbeat::LeaseGone(reason)) => {
            tracing::warn!(
                "the server no longer gives this runner the job ({reason}); not running it"
            );
            return JobOutcome::LeaseLost;
        }
        Err(FirstHeartbeat::GaveUp(reason)) => {
            tracing::warn!("{reason}; not running the job");
            return JobOutcome::NotStarted { reason };
        }
    }

    let heartbeat_stop = CancellationToken::new();
    // Heartbeats stop when this function returns or its future is dropped mid-job.
    let _stop_heartbeats = heartbeat_stop.clone().drop_guard();
    let heartbeat = tokio::spawn(
        heartbeats(
            api.clone(),
            heartbeat_interval(lease.duration_secs),
            cancel.clone(),
            lease_lost.clone(),
            heartbeat_stop.clone(),
        )
        .in_current_span(),
    );
    // The log masks the job's secrets before anything is buffered, and spools what the server
    // has not acknowledged beside the workspaces unless configured elsewhere.
    let mut log_config = config.log.clone();
    log_config
        .spool_dir
        .get_or_insert_with(|| config.work_dir.join(".spool"));
    let (log, uploader) = logs::start_for_job(
        ApiLog(api.clone()),
        log_config,
        lease_lost.clone(),
        job.id,
        &job.secrets,
    );
    let reporter = StepReporter::start(api.clone(), lease_lost.clone());
    let workspace = config.work_dir.join(job.id.to_string());

    let verdict = {
        let mut run = JobRun {
            job: &job,
            config,
            log: log.clone(),
            reporter: &reporter,
            cancel: cancel.clone(),
            abort,
            lease_lost: lease_lost.clone(),
            workspace: workspace.clone(),
            scripts: None,
            vars: BTreeMap::new(),
            env: Vec::new(),
        };
        run.run_steps(started).await
    };

    let outcome = match verdict {
        None => {
            tracing::warn!("the lease on the job was lost; stopped it without reporting");
            uploader.abort();
            reporter.abort();
            JobOutcome::LeaseLost
        }
        Some(verdict) => {
            let (status, exit_code) = verdict.status();
            // An invoke's log is the command's output and nothing else: the CLI shows it as if
            // the command ran locally, and reports the outcome itself.
            if job.trigger.kind != outpost_protocol::TriggerKind::Invoke {
                log.line(&format!(
                    "\n{} Job {} in {}",
                    if status == JobStatus::Succeeded {
                        "✔"
                    } else {
                        "✘"
                    },
                    describe_job_status(status, exit_code),
                    human(started.elapsed())
                ));
            }
            finish(
                &api,
                uploader,
                reporter,
                &lease_lost,
                config,
                status,
                exit_code,
            )
            .await
        }
    };
    heartbeat_stop.cancel();
    let _ = heartbeat.await;
    remove_workspace(&workspace, config.keep_workspaces).await;
    outcome
}

fn describe_job_status(status: JobStatus, exit_code: Option<i32>) -> String {
    match (status, exit_code) {
        (JobStatus::Failed, Some(code)) => format!("failed with exit code {code}"),
        (JobStatus::TimedOut, _) => "timed out".into(),
        (s, _) => s.as_str().into(),
    }
}

/// Delivers the rest of the log and the step reports, then `complete`.
async fn finish<A: JobApi>(
    api: &A,
    uploader: logs::LogUploader,
    reporter: StepReporter,
    lease_lost: &CancellationToken,
    config: &ExecConfig,
    status: JobStatus,
    exit_code: Option<i32>,
) -> JobOutcome {
    let deadline = Instant::now() + config.flush_budget;
    let steps_delivered = reporter.finish(deadline).await;
    match uploader
        .finish(deadline.saturating_duration_since(Instant::now()))
        .await
    {
        Ok(()) => {}
        Err(LogError::LeaseLost) => return JobOutcome::LeaseLost,
        Err(e) => tracing::warn!("{e}; completing the job anyway"),
    }
    if lease_lost.is_cancelled() {
        return JobOutcome::LeaseLost;
    }
    if !steps_delivered {
        tracing::warn!("some step reports did not reach the server in time");
    }
    // The final status matters more than the log's tail: give `complete` time of its own.
    let deadline = deadline.max(Instant::now() + Duration::from_secs(30));
    let req = CompleteRequest { status, exit_code };
    let mut backoff = Backoff::new();
    loop {
        match api.complete(req.clone()).await {
            Ok(()) => {
                tracing::info!(status = status.as_str(), ?exit_code, "job finished");
                return JobOutcome::Completed { status, exit_code };
            }
            Err(e) if lease_is_gone(&e) => {
                tracing::warn!(
                    "the server refused the job's completion because the lease is gone ({})",
                    error_chain(&e)
                );
                return JobOutcome::LeaseLost;
            }
            Err(e) => {
                let delay = backoff.next_delay();
                let reason = error_chain(&e);
                if Instant::now() + delay > deadline || !e.is_transient() {
                    tracing::error!("could not report the job's completion ({reason}); giving up");
                    return JobOutcome::NotReported { status, reason };
                }
                tracing::warn!(
                    "could not report the job's completion ({reason}); retrying in {}",
                    human(delay)
                );
                tokio::time::sleep(delay).await;
            }
        }
    }
}

async fn remove_workspace(workspace: &Path, keep: bool) {
    if keep {
        tracing::info!(workspace = %workspace.display(), "keeping the workspace");
        return;
    }
    let path = workspace.to_path_buf();
    let removed = tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    })
    .await;
    if let Ok(Err(e)) = removed {
        tracing::warn!(workspace = %workspace.display(), error = %e, "could not remove the workspace");
    }
}

enum FirstHeartbeat {
    LeaseGone(String),
    GaveUp(String),
}

/// The first heartbeat, retried on transient errors for as long as the lease lasts.
async fn first_heartbeat<A: JobApi>(
    api: &A,
    lease: &Lease,
    abort: &CancellationToken,
) -> Result<HeartbeatResponse, FirstHeartbeat> {
    let deadline = Instant::now() + Duration::from_secs(lease.duration_secs.max(1));
    let mut backoff = Backoff::new();
    loop {
        match api.heartbeat().await {
            Ok(resp) => return Ok(resp),
            Err(e) if lease_is_gone(&e) => return Err(FirstHeartbeat::LeaseGone(error_chain(&e))),
            Err(e) => {
                let reason = error_chain(&e);
                let delay = backoff.next_delay();
                if !e.is_transient() || Instant::now() + delay >= deadline {
                    return Err(FirstHeartbeat::GaveUp(format!(
                        "the first heartbeat did not get through before the lease ran out ({reason})"
                    )));
                }
                tracing::warn!(
                    "the first heartbeat failed ({reason}); retrying in {}",
                    human(delay)
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = abort.cancelled() => return Err(FirstHeartbeat::GaveUp("the runner is shutting down".into())),
                }
            }
        }
    }
}

/// Renews the lease every `every` until `stop`; cancels `cancel` when the server asks and
/// `lease_lost` when the lease is gone. Transient errors are retried sooner, without stopping
/// the job: the server decides when a lease has expired.
async fn heartbeats<A: JobApi>(
    api: A,
    every: Duration,
    cancel: CancellationToken,
    lease_lost: CancellationToken,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new();
    let mut next = Instant::now() + every;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = lease_lost.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
        }
        let result = tokio::select! {
            r = api.heartbeat() => r,
            _ = stop.cancelled() => return,
        };
        match result {
            Ok(resp) => {
                backoff.reset();
                if resp.cancel_requested && !cancel.is_cancelled() {
                    tracing::info!("the server asks to cancel the job");
                    cancel.cancel();
                }
                next = Instant::now() + every;
            }
            Err(e) if lease_is_gone(&e) => {
                tracing::warn!(
                    "the server says the lease on the job is gone ({}); stopping the job",
                    error_chain(&e)
                );
                lease_lost.cancel();
                return;
            }
            Err(e) => {
                let delay = backoff.next_delay().min(every);
                tracing::warn!(
                    "heartbeat failed ({}); retrying in {}",
                    error_chain(&e),
                    human(delay)
                );
                next = Instant::now() + delay;
            }
        }
    }
}

/// Sends step reports in order, retrying transient errors, without holding up the steps.
/// Dropping it stops its task.
struct StepReporter {
    tx: mpsc::Sender<(u32, StepUpdate)>,
    task: Option<JoinHandle<()>>,
}

impl Drop for StepReporter {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl StepReporter {
    fn start<A: JobApi>(api: A, lease_lost: CancellationToken) -> Self {
        let (tx, mut rx) = mpsc::channel::<(u32, StepUpdate)>(256);
        let task = tokio::spawn(
            async move {
            while let Some((index, update)) = rx.recv().await {
                let mut backoff = Backoff::new();
                loop {
                    let result = tokio::select! {
                        r = api.update_step(index, update.clone()) => r,
                        _ = lease_lost.cancelled() => return,
                    };
                    match result {
                        Ok(()) => break,
                        Err(e) if lease_is_gone(&e) => {
                            tracing::warn!(
                                "the server says the lease on the job is gone ({}); stopping the job",
                                error_chain(&e)
                            );
                            lease_lost.cancel();
                            return;
                        }
                        Err(e) if e.is_transient() => {
                            let delay = backoff.next_delay();
                            tracing::warn!(
                                "could not report step {} ({}); retrying in {}",
                                index + 1,
                                error_chain(&e),
                                human(delay)
                            );
                            tokio::select! {
                                _ = tokio::time::sleep(delay) => {}
                                _ = lease_lost.cancelled() => return,
                            }
                        }
                        Err(e) => {
                            tracing::error!(
                                "the server refused the report of step {} ({}); dropping it",
                                index + 1,
                                error_chain(&e)
                            );
                            break;
                        }
                    }
                }
            }
        }
            .in_current_span(),
        );
        Self {
            tx,
            task: Some(task),
        }
    }

    async fn send(&self, index: u32, status: StepStatus, exit_code: Option<i32>, log_offset: u64) {
        let update = StepUpdate {
            status,
            exit_code,
            log_offset,
        };
        // The reporter only stops early when the lease is lost, which the caller notices itself.
        let _ = self.tx.send((index, update)).await;
    }

    /// Waits until every report was delivered or `deadline`; answers whether all were.
    async fn finish(mut self, deadline: Instant) -> bool {
        let Some(mut task) = self.task.take() else {
            return true;
        };
        // Closing the queue lets the task end once it has sent what is in it.
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.tx, closed));
        match tokio::time::timeout_at(deadline, &mut task).await {
            Ok(_) => true,
            Err(_) => {
                task.abort();
                false
            }
        }
    }

    fn abort(self) {
        // Dropping `self` stops the task.
    }
}

/// The first thing that went wrong in a job, which decides its final status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trouble {
    Failed(Option<i32>),
    TimedOut,
    Cancelled,
}

/// The job's result so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Verdict {
    trouble: Option<Trouble>,
}

impl Verdict {
    fn note(&mut self, t: Trouble) {
        self.trouble.get_or_insert(t);
    }

    fn status(self) -> (JobStatus, Option<i32>) {
        match self.trouble {
            None => (JobStatus::Succeeded, Some(0)),
            Some(Trouble::Failed(code)) => (JobStatus::Failed, code),
            Some(Trouble::TimedOut) => (JobStatus::TimedOut, None),
            Some(Trouble::Cancelled) => (JobStatus::Cancelled, None),
        }
    }
}

/// Why a running command was stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    StepTimeout,
    JobTimeout,
    CleanupTimeout,
    Cancel,
    Abort,
    LeaseLost,
}

/// How one command of a step ended.
pub(crate) enum CommandEnd {
    Exited(i32),
    Stopped(Cause, i32),
    NotStarted(Option<i32>),
}

/// How one step ended.
struct StepEnd {
    status: StepStatus,
    exit_code: Option<i32>,
    cause: Option<Cause>,
}

impl StepEnd {
    fn from_command(end: CommandEnd) -> Self {
        match end {
            CommandEnd::Exited(0) => StepEnd {
                status: StepStatus::Succeeded,
                exit_code: Some(0),
                cause: None,
            },
            CommandEnd::Exited(code) => StepEnd::failed(Some(code)),
            CommandEnd::NotStarted(code) => StepEnd::failed(code),
            CommandEnd::Stopped(cause, code) => StepEnd {
                status: match cause {
                    Cause::Cancel | Cause::Abort | Cause::LeaseLost => StepStatus::Cancelled,
                    Cause::StepTimeout | Cause::JobTimeout | Cause::CleanupTimeout => {
                        StepStatus::TimedOut
                    }
                },
                exit_code: Some(code),
                cause: Some(cause),
            },
        }
    }

    fn failed(exit_code: Option<i32>) -> Self {
        StepEnd {
            status: StepStatus::Failed,
            exit_code,
            cause: None,
        }
    }
}

/// Whether the job is in its normal course or running cleanup steps after a stop.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Bounded by the job's timeout.
    Normal { deadline: Instant },
    /// After a cancellation or the job's timeout: `always`/`on_failure` steps until `deadline`.
    Cleanup { deadline: Instant },
    /// The runner is shutting down or setting up failed: nothing more runs.
    Stopped,
}

struct JobRun<'a> {
    job: &'a AssignedJob,
    config: &'a ExecConfig,
    log: LogWriter,
    reporter: &'a StepReporter,
    cancel: CancellationToken,
    abort: CancellationToken,
    lease_lost: CancellationToken,
    workspace: PathBuf,
    scripts: Option<tempfile::TempDir>,
    /// What `${NAME}` expands to.
    vars: BTreeMap<String, String>,
    /// What every step's environment gets on top of the runner's.
    env: Vec<(String, String)>,
}

impl JobRun<'_> {
    /// Runs the steps; `None` when the lease was lost.
    async fn run_steps(&mut self, started: Instant) -> Option<Verdict> {
        let job = self.job;
        let total = job.steps.len();
        let job_deadline = started
            + if job.timeout_secs == 0 {
                Duration::from_secs(10 * 365 * 24 * 3600)
            } else {
                Duration::from_secs(job.timeout_secs)
            };
        let mut verdict = Verdict::default();
        let mut phase = Phase::Normal {
            deadline: job_deadline,
        };

        if !self.quiet() {
            self.log.line(&format!(
                "Outpost runner {} ({}) running job `{}` of pipeline `{}`, run #{}",
                self.config.runner_name,
                outpost_protocol::VERSION,
                job.name,
                job.pipeline,
                job.run_number
            ));
        }
        if let Err(e) = self.prepare() {
            self.log.line(&format!(
                "✘ could not prepare the job: {}",
                error_chain(&*e)
            ));
            verdict.note(Trouble::Failed(None));
            phase = Phase::Stopped;
        } else if let Err(e) = self.prepare_cluster().await {
            self.log.line(&format!(
                "✘ could not set up the job's cluster: {}",
                error_chain(&*e)
            ));
            verdict.note(Trouble::Failed(None));
            phase = Phase::Stopped;
        }

        for (i, step) in job.steps.iter().enumerate() {
            let number = i + 1;
            if self.lease_lost.is_cancelled() {
                return None;
            }
            // Notice stops that came between steps.
            if let Phase::Normal { .. } = phase {
                if self.cancel.is_cancelled() {
                    self.log.line("\n⏹ The job was cancelled.");
                    verdict.note(Trouble::Cancelled);
                    phase = self.cleanup_phase();
                } else if Instant::now() >= job_deadline {
                    self.log.line(&format!(
                        "\n⏱ The job ran past its timeout of {}.",
                        human(Duration::from_secs(job.timeout_secs))
                    ));
                    verdict.note(Trouble::TimedOut);
                    phase = self.cleanup_phase();
                }
            }
            if self.abort.is_cancelled() && !matches!(phase, Phase::Stopped) {
                self.log
                    .line("\n⏹ The runner is shutting down: the remaining steps are skipped.");
                verdict.note(Trouble::Cancelled);
                phase = Phase::Stopped;
            }

            let skip_reason = match (phase, step.when, verdict.trouble) {
                (Phase::Stopped, _, _) => Some("the job was stopped"),
                (Phase::Cleanup { deadline }, _, _) if Instant::now() >= deadline => {
                    Some("no time was left for cleanup steps")
                }
                (_, When::OnSuccess, Some(Trouble::Failed(_))) => Some("an earlier step failed"),
                (_, When::OnSuccess, Some(Trouble::TimedOut)) => Some("the job timed out"),
                (_, When::OnSuccess, Some(Trouble::Cancelled)) => Some("the job was cancelled"),
                (_, When::OnFailure, None) => Some("it runs only after a failure"),
                _ => None,
            };
            if let Some(reason) = skip_reason {
                let offset = self.log.offset();
                self.log.line(&format!(
                    "\n○ Step {number}/{total}: {} (skipped: {reason})",
                    step.name
                ));
                self.reporter
                    .send(step.index, StepStatus::Skipped, None, offset)
                    .await;
                continue;
            }

            let end = self.run_step(step, number, total, phase).await;
            match (end.status, end.cause) {
                (_, Some(Cause::LeaseLost)) => return None,
                (StepStatus::Succeeded, _) => {}
                (StepStatus::Failed, _) => verdict.note(Trouble::Failed(end.exit_code)),
                (_, Some(Cause::StepTimeout)) => verdict.note(Trouble::TimedOut),
                (_, Some(Cause::JobTimeout)) => {
                    verdict.note(Trouble::TimedOut);
                    phase = self.cleanup_phase();
                }
                (_, Some(Cause::CleanupTimeout)) => {
                    verdict.note(Trouble::TimedOut);
                }
                (_, Some(Cause::Cancel)) => {
                    verdict.note(Trouble::Cancelled);
                    phase = self.cleanup_phase();
                }
                (_, Some(Cause::Abort)) => {
                    verdict.note(Trouble::Cancelled);
                    phase = Phase::Stopped;
                }
                (_, None) => verdict.note(Trouble::Failed(end.exit_code)),
            }
        }
        if self.lease_lost.is_cancelled() {
            return None;
        }
        Some(verdict)
    }

    fn cleanup_phase(&self) -> Phase {
        Phase::Cleanup {
            deadline: Instant::now() + self.config.cleanup_budget,
        }
    }

    /// Creates the workspace and the script directory and works out variables and environment.
    fn prepare(&mut self) -> anyhow::Result<()> {
        use anyhow::Context as _;
        let job = self.job;
        std::fs::create_dir_all(&self.config.work_dir).with_context(|| {
            format!(
                "could not create the work directory {}",
                self.config.work_dir.display()
            )
        })?;
        match std::fs::remove_dir_all(&self.workspace) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| {
                    format!(
                        "could not clear the old workspace {}",
                        self.workspace.display()
                    )
                });
            }
            _ => {}
        }
        std::fs::create_dir_all(&self.workspace).with_context(|| {
            format!(
                "could not create the workspace {}",
                self.workspace.display()
            )
        })?;
        // Scripts live beside the workspace, not in it, so a step cannot trip over them.
        self.scripts = Some(
            tempfile::Builder::new()
                .prefix(&format!(".scripts-{}-", job.id))
                .tempdir_in(&self.config.work_dir)
                .context("could not create a directory for step scripts")?,
        );
        if !self.quiet() {
            self.log
                .line(&format!("Workspace: {}", self.workspace.display()));
        }

        let builtins = builtin_vars(job, &self.workspace);
        let mut env = Vec::new();
        for (name, value) in job.variables.iter().chain(job.secrets.iter()) {
            if expand::is_valid_name(name) {
                self.vars.insert(name.clone(), value.clone());
                env.push((name.clone(), value.clone()));
            } else {
                self.log.line(&format!(
                    "⚠ `{name}` is not a valid variable name (letters, digits and underscores, not starting with a digit); steps do not see it"
                ));
            }
        }
        for (name, value) in builtins {
            self.vars.insert(name.clone(), value.clone());
            env.push((name, value));
        }
        self.env = env;
        Ok(())
    }

    /// Writes the kubeconfig of the job's cluster, if it names one, beside the workspace and
    /// points every step's `KUBECONFIG` at it.
    async fn prepare_cluster(&mut self) -> anyhow::Result<()> {
        use anyhow::Context as _;
        let Some(name) = &self.job.cluster else {
            return Ok(());
        };
        let dir = self
            .scripts
            .as_ref()
            .map(|d| d.path().to_path_buf())
            .context("the job's private directory is missing")?;
        let path = crate::clusters::write_job_kubeconfig(
            &self.config.clusters,
            name,
            &dir,
            &self.config.kubectl,
        )
        .await?;
        if !self.quiet() {
            self.log.line(&format!("Cluster: {name}"));
        }
        self.env
            .push(("KUBECONFIG".into(), path.to_string_lossy().into_owned()));
        Ok(())
    }

    async fn run_step(
        &mut self,
        step: &StepSpec,
        number: usize,
        total: usize,
        phase: Phase,
    ) -> StepEnd {
        let started = Instant::now();
        let offset = self.log.offset();
        self.reporter
            .send(step.index, StepStatus::Running, None, offset)
            .await;
        if !self.quiet() {
            self.log.line(&format!(
                "\n▶ Step {number}/{total}: {} (started {} UTC)",
                step.name,
                chrono::Utc::now().format("%H:%M:%S")
            ));
        }
        let step_deadline = step.timeout_secs.map(|s| started + Duration::from_secs(s));

        let end = match &step.action {
            StepAction::Run { script, shell } => {
                self.run_script(step, script, shell.as_deref(), step_deadline, phase)
                    .await
            }
            StepAction::Kubectl { args } => {
                let program = self.config.kubectl.clone();
                self.run_tool("kubectl", &program, args, step, step_deadline, phase)
                    .await
            }
            StepAction::Helm { args } => {
                let program = self.config.helm.clone();
                self.run_tool("helm", &program, args, step, step_deadline, phase)
                    .await
            }
            StepAction::Invoke { argv, shell, files } => {
                self.run_invoke(step, argv, *shell, files, step_deadline, phase)
                    .await
            }
            StepAction::Checkout {
                path,
                depth,
                token_secret,
            } => {
                let (job, config, log) = (self.job, self.config, self.log.clone());
                let (env, workspace) = (self.env.clone(), self.workspace.clone());
                let request = checkout::Checkout {
                    job,
                    path: path.as_deref(),
                    depth: *depth,
                    token_secret: token_secret.as_deref(),
                    workspace: &workspace,
                    git: &config.git,
                    env: &env,
                };
                let mut commands = StepCommands {
                    run: self,
                    step,
                    step_deadline,
                    phase,
                };
                StepEnd::from_command(checkout::run(&request, &log, &mut commands).await)
            }
        };

        let took = human(started.elapsed());
        let code = end
            .exit_code
            .map(|c| format!(" (exit code {c})"))
            .unwrap_or_default();
        let line = match (end.status, end.exit_code, end.cause) {
            (StepStatus::Succeeded, _, _) => {
                format!("✔ Step {number}/{total} succeeded in {took}{code}")
            }
            (StepStatus::Failed, Some(code), _) => {
                format!("✘ Step {number}/{total} failed with exit code {code} in {took}")
            }
            (StepStatus::Failed, None, _) => format!("✘ Step {number}/{total} failed in {took}"),
            (StepStatus::TimedOut, _, _) => {
                format!("✘ Step {number}/{total} timed out after {took}{code}")
            }
            (_, _, Some(Cause::LeaseLost)) => {
                format!("✘ Step {number}/{total} was killed after {took}{code}: the lease was lost")
            }
            _ => format!("✘ Step {number}/{total} was cancelled after {took}{code}"),
        };
        if !self.quiet() {
            self.log.line(&line);
        }
        if end.cause != Some(Cause::LeaseLost) {
            self.reporter
                .send(step.index, end.status, end.exit_code, self.log.offset())
                .await;
        }
        end
    }

    async fn run_script(
        &mut self,
        step: &StepSpec,
        script: &str,
        shell: Option<&str>,
        step_deadline: Option<Instant>,
        phase: Phase,
    ) -> StepEnd {
        let Some(dir) = self.scripts.as_ref() else {
            return StepEnd::failed(None);
        };
        let path = dir.path().join(format!("step-{}.sh", step.index + 1));
        let mut text = script.to_string();
        if !text.ends_with('\n') {
            text.push('\n');
        }
        if let Err(e) = write_script(&path, &text) {
            self.log.line(&format!(
                "✘ could not write the script to {}: {e}",
                path.display()
            ));
            return StepEnd::failed(None);
        }
        let line = shell.unwrap_or(&self.config.shell);
        let argv = match expand::shell_command(line, &path) {
            Ok(argv) => argv,
            Err(e) => {
                self.log.line(&format!("✘ {e}"));
                return StepEnd::failed(None);
            }
        };
        const SHOWN: usize = 50;
        let lines: Vec<&str> = script.lines().collect();
        for l in lines.iter().take(SHOWN) {
            self.log.line(&format!("$ {l}"));
        }
        if lines.len() > SHOWN {
            self.log
                .line(&format!("$ … ({} more lines)", lines.len() - SHOWN));
        }
        let spec = CommandSpec {
            program: PathBuf::from(&argv[0]),
            args: argv[1..].to_vec(),
            cwd: self.workspace.clone(),
            env: self.env.clone(),
        };
        let end = self.command(&spec, step, step_deadline, phase).await;
        StepEnd::from_command(end)
    }

    /// Whether the log is the bare output of an ad-hoc command (`outpost invoke`), without the
    /// lines that frame pipeline steps.
    fn quiet(&self) -> bool {
        self.job.trigger.kind == outpost_protocol::TriggerKind::Invoke
    }

    /// An `outpost invoke` command: its files into the workspace, then the command itself,
    /// directly or (`shell`) as a script; see [`crate::invoke`].
    async fn run_invoke(
        &mut self,
        step: &StepSpec,
        argv: &[String],
        shell: bool,
        files: &[outpost_protocol::UploadedFile],
        step_deadline: Option<Instant>,
        phase: Phase,
    ) -> StepEnd {
        if let Err(e) = crate::invoke::write_files(&self.workspace, files) {
            self.log.line(&format!("✘ {e}"));
            return StepEnd::failed(None);
        }
        let Some(first) = argv.first() else {
            self.log.line("✘ the command is empty");
            return StepEnd::failed(None);
        };
        let spec = if shell {
            let Some(dir) = self.scripts.as_ref() else {
                return StepEnd::failed(None);
            };
            let path = dir.path().join("invoke.sh");
            if let Err(e) = write_script(&path, &crate::invoke::script(argv)) {
                self.log.line(&format!(
                    "✘ could not write the script to {}: {e}",
                    path.display()
                ));
                return StepEnd::failed(None);
            }
            let argv = match expand::shell_command(&self.config.shell, &path) {
                Ok(argv) => argv,
                Err(e) => {
                    self.log.line(&format!("✘ {e}"));
                    return StepEnd::failed(None);
                }
            };
            CommandSpec {
                program: PathBuf::from(&argv[0]),
                args: argv[1..].to_vec(),
                cwd: self.workspace.clone(),
                env: self.env.clone(),
            }
        } else {
            CommandSpec {
                program: crate::invoke::program(
                    first,
                    &self.workspace,
                    &self.config.kubectl,
                    &self.config.helm,
                ),
                args: argv[1..].to_vec(),
                cwd: self.workspace.clone(),
                env: self.env.clone(),
            }
        };
        StepEnd::from_command(self.command(&spec, step, step_deadline, phase).await)
    }

    async fn run_tool(
        &mut self,
        name: &str,
        program: &Path,
        args: &[String],
        step: &StepSpec,
        step_deadline: Option<Instant>,
        phase: Phase,
    ) -> StepEnd {
        let expanded = match expand::expand_args(args, &self.vars) {
            Ok(a) => a,
            Err(e) => {
                self.log
                    .line(&format!("$ {name} {}", shell_words::join(args)));
                self.log.line(&format!("✘ {e}"));
                return StepEnd::failed(None);
            }
        };
        self.log.line(&format!(
            "$ {name} {}",
            expand::display_args(args, &self.vars, &self.job.secrets)
        ));
        let spec = CommandSpec {
            program: program.to_path_buf(),
            args: expanded,
            cwd: self.workspace.clone(),
            env: self.env.clone(),
        };
        StepEnd::from_command(self.command(&spec, step, step_deadline, phase).await)
    }

    /// Runs one command of a step until it exits or something stops it.
    async fn command(
        &mut self,
        spec: &CommandSpec,
        step: &StepSpec,
        step_deadline: Option<Instant>,
        phase: Phase,
    ) -> CommandEnd {
        let (phase_deadline, cleanup) = match phase {
            Phase::Normal { deadline } => (deadline, false),
            Phase::Cleanup { deadline } => (deadline, true),
            Phase::Stopped => return CommandEnd::NotStarted(None),
        };
        let cancel = self.cancel.clone();
        let abort = self.abort.clone();
        let lease_lost = self.lease_lost.clone();
        let notices = self.log.clone();
        let grace = self.config.kill_grace;
        let cleanup_budget = self.config.cleanup_budget;
        let job_timeout = self.job.timeout_secs;
        let step_timeout = step.timeout_secs.unwrap_or(0);
        // A cancellation stops ordinary steps at once; `always`/`on_failure` steps, which exist to
        // clean up, get the cleanup budget to finish first.
        let cancel_delay = match step.when {
            When::OnSuccess => Duration::ZERO,
            When::OnFailure | When::Always => cleanup_budget,
        };
        let stop = async move {
            let far = Instant::now() + Duration::from_secs(10 * 365 * 24 * 3600);
            let cause = tokio::select! {
                biased;
                _ = lease_lost.cancelled() => Cause::LeaseLost,
                _ = abort.cancelled() => Cause::Abort,
                _ = async { cancel.cancelled().await; tokio::time::sleep(cancel_delay).await }, if !cleanup => Cause::Cancel,
                _ = tokio::time::sleep_until(step_deadline.unwrap_or(far)) => Cause::StepTimeout,
                _ = tokio::time::sleep_until(phase_deadline) => {
                    if cleanup { Cause::CleanupTimeout } else { Cause::JobTimeout }
                }
            };
            let how = format!("SIGINT, then SIGTERM; SIGKILL after {}", human(grace));
            let (mode, line) = match cause {
                Cause::LeaseLost => (
                    KillMode::Immediate,
                    "⛔ The lease on this job was lost (another runner may hold it now): killing the step".to_string(),
                ),
                Cause::Abort => (
                    KillMode::Graceful,
                    format!("⏹ The runner is shutting down: stopping the step ({how})"),
                ),
                Cause::Cancel => (
                    KillMode::Graceful,
                    format!("⏹ The job was cancelled: stopping the step ({how})"),
                ),
                Cause::StepTimeout => (
                    KillMode::Graceful,
                    format!(
                        "⏱ The step ran past its timeout of {}: stopping it ({how})",
                        human(Duration::from_secs(step_timeout))
                    ),
                ),
                Cause::JobTimeout => (
                    KillMode::Graceful,
                    format!(
                        "⏱ The job ran past its timeout of {}: stopping the step ({how})",
                        human(Duration::from_secs(job_timeout))
                    ),
                ),
                Cause::CleanupTimeout => (
                    KillMode::Graceful,
                    format!(
                        "⏱ Cleanup steps ran past their {} after the job was stopped: stopping the step ({how})",
                        human(cleanup_budget)
                    ),
                ),
            };
            notices.line(&line);
            (mode, cause)
        };
        let mut out = self.log.clone();
        match process::run(spec, KillTiming::with_grace(grace), &mut out, stop).await {
            Ok((exit, None)) => CommandEnd::Exited(exit.code),
            Ok((exit, Some(cause))) => CommandEnd::Stopped(cause, exit.code),
            Err(e) => {
                let program = spec.program.display();
                let (code, hint) = match e.kind() {
                    std::io::ErrorKind::NotFound => (
                        Some(127),
                        format!(
                            ": install it on the runner, or set its path in {} (kubectl, helm, git) or the step's shell",
                            "runner.toml"
                        ),
                    ),
                    std::io::ErrorKind::PermissionDenied => (Some(126), String::new()),
                    _ => (None, String::new()),
                };
                self.log
                    .line(&format!("✘ could not start `{program}`: {e}{hint}"));
                CommandEnd::NotStarted(code)
            }
        }
    }
}

/// The commands of a `checkout`, run as parts of its step.
struct StepCommands<'r, 'a> {
    run: &'r mut JobRun<'a>,
    step: &'r StepSpec,
    step_deadline: Option<Instant>,
    phase: Phase,
}

impl checkout::Exec for StepCommands<'_, '_> {
    fn exec(&mut self, spec: &CommandSpec) -> impl Future<Output = CommandEnd> + Send {
        self.run
            .command(spec, self.step, self.step_deadline, self.phase)
    }
}

fn write_script(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o700)
        .open(path)?;
    f.write_all(text.as_bytes())
}

/// The short branch or tag name of a full ref, or "" when the ref is of another kind.
fn ref_name(git_ref: Option<&str>, prefix: &str) -> String {
    git_ref
        .and_then(|r| r.strip_prefix(prefix))
        .unwrap_or_default()
        .to_string()
}

/// The `OUTPOST_*` variables and `CI`; empty strings where the run has no value.
pub fn builtin_vars(job: &AssignedJob, workspace: &Path) -> Vec<(String, String)> {
    let t = &job.trigger;
    let opt = |v: &Option<String>| v.clone().unwrap_or_default();
    vec![
        ("CI".into(), "true".into()),
        ("OUTPOST_RUN_ID".into(), job.run_id.to_string()),
        ("OUTPOST_JOB_ID".into(), job.id.to_string()),
        ("OUTPOST_JOB".into(), job.name.clone()),
        ("OUTPOST_PIPELINE".into(), job.pipeline.clone()),
        ("OUTPOST_RUN_NUMBER".into(), job.run_number.to_string()),
        ("OUTPOST_REPO".into(), opt(&t.repo)),
        ("OUTPOST_REF".into(), opt(&t.git_ref)),
        ("OUTPOST_SHA".into(), opt(&t.sha)),
        ("OUTPOST_TRIGGER".into(), t.kind.as_str().into()),
        ("OUTPOST_SOURCE".into(), opt(&t.source)),
        ("OUTPOST_EVENT".into(), opt(&t.event)),
        ("OUTPOST_CLONE_URL".into(), opt(&t.clone_url)),
        ("OUTPOST_ACTOR".into(), opt(&t.actor)),
        ("OUTPOST_MESSAGE".into(), opt(&t.message)),
        ("OUTPOST_URL".into(), opt(&t.url)),
        ("OUTPOST_DELIVERY_ID".into(), opt(&t.delivery_id)),
        (
            "OUTPOST_BRANCH".into(),
            ref_name(t.git_ref.as_deref(), "refs/heads/"),
        ),
        (
            "OUTPOST_TAG".into(),
            ref_name(t.git_ref.as_deref(), "refs/tags/"),
        ),
        (
            "OUTPOST_WORKSPACE".into(),
            workspace.to_string_lossy().into_owned(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branch_and_tag_come_from_the_ref() {
        assert_eq!(
            ref_name(Some("refs/heads/release/1.2"), "refs/heads/"),
            "release/1.2"
        );
        assert_eq!(ref_name(Some("refs/tags/v1"), "refs/heads/"), "");
        assert_eq!(ref_name(Some("refs/tags/v1"), "refs/tags/"), "v1");
        assert_eq!(ref_name(None, "refs/tags/"), "");
    }

    #[test]
    fn heartbeats_come_four_times_per_lease_and_at_least_every_5s() {
        assert_eq!(heartbeat_interval(2), Duration::from_millis(500));
        assert_eq!(heartbeat_interval(16), Duration::from_secs(4));
        assert_eq!(heartbeat_interval(60), Duration::from_secs(5));
        assert_eq!(heartbeat_interval(600), Duration::from_secs(5));
        assert_eq!(heartbeat_interval(0), Duration::from_millis(100));
    }
}
