//! Everything that crosses the wire, as JSON.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The error body every non-2xx JSON answer carries.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
    /// On `416` from a log append: the offset the server has stored up to, where the runner resumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_offset: Option<u64>,
}

/// A machine-readable code and a sentence for people.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    /// Stable, snake_case, e.g. `not_found`, `lease_lost`, `invalid_pipeline`.
    pub code: String,
    /// What was wrong and, where possible, what to do.
    pub message: String,
    /// For pipeline errors: 1-based line of the offending YAML node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    /// For pipeline errors: 1-based column of the offending YAML node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<usize>,
}

/// Status of a job.
///
/// `pending` is a job whose `needs` have not all succeeded yet; runners never see it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Waiting for the jobs it needs.
    Pending,
    /// Ready for a runner.
    Queued,
    /// Held by a runner under a lease.
    Running,
    /// Every step that ran succeeded.
    Succeeded,
    /// A step failed.
    Failed,
    /// Cancelled by a person or by the run's cancellation.
    Cancelled,
    /// The job or a step ran past its timeout.
    TimedOut,
    /// The runner stopped heartbeating; the job is not re-run automatically.
    Lost,
    /// A job it needs did not succeed.
    Skipped,
}

impl JobStatus {
    /// The database and wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
            JobStatus::TimedOut => "timed_out",
            JobStatus::Lost => "lost",
            JobStatus::Skipped => "skipped",
        }
    }

    /// Parses the database and wire spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => JobStatus::Pending,
            "queued" => JobStatus::Queued,
            "running" => JobStatus::Running,
            "succeeded" => JobStatus::Succeeded,
            "failed" => JobStatus::Failed,
            "cancelled" => JobStatus::Cancelled,
            "timed_out" => JobStatus::TimedOut,
            "lost" => JobStatus::Lost,
            "skipped" => JobStatus::Skipped,
            _ => return None,
        })
    }

    /// Whether the job has ended and will not change again.
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            JobStatus::Pending | JobStatus::Queued | JobStatus::Running
        )
    }
}

/// Status of a run: queued, running, then the worst of its jobs' final statuses.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// No job has started yet.
    Queued,
    /// At least one job started and not all have ended.
    Running,
    /// Every job succeeded.
    Succeeded,
    /// A job failed, timed out or was lost.
    Failed,
    /// A job was cancelled and none failed.
    Cancelled,
}

impl RunStatus {
    /// The database and wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
        }
    }

    /// Parses the database and wire spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => RunStatus::Queued,
            "running" => RunStatus::Running,
            "succeeded" => RunStatus::Succeeded,
            "failed" => RunStatus::Failed,
            "cancelled" => RunStatus::Cancelled,
            _ => return None,
        })
    }

    /// Whether the run has ended.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RunStatus::Succeeded | RunStatus::Failed | RunStatus::Cancelled
        )
    }
}

/// Status of one step, as the runner reports it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Not started.
    Pending,
    /// Started.
    Running,
    /// Exited 0.
    Succeeded,
    /// Exited non-zero or could not start.
    Failed,
    /// Its `when` condition did not hold.
    Skipped,
    /// Stopped by a cancellation.
    Cancelled,
    /// Stopped by its own or the job's timeout.
    TimedOut,
}

impl StepStatus {
    /// The database and wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Pending => "pending",
            StepStatus::Running => "running",
            StepStatus::Succeeded => "succeeded",
            StepStatus::Failed => "failed",
            StepStatus::Skipped => "skipped",
            StepStatus::Cancelled => "cancelled",
            StepStatus::TimedOut => "timed_out",
        }
    }

    /// Parses the database and wire spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => StepStatus::Pending,
            "running" => StepStatus::Running,
            "succeeded" => StepStatus::Succeeded,
            "failed" => StepStatus::Failed,
            "skipped" => StepStatus::Skipped,
            "cancelled" => StepStatus::Cancelled,
            "timed_out" => StepStatus::TimedOut,
            _ => return None,
        })
    }
}

/// When a step runs, given how the job has gone so far.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum When {
    /// Only while every earlier step succeeded (the default).
    #[default]
    OnSuccess,
    /// Only after an earlier step failed, timed out or was cancelled.
    OnFailure,
    /// Always, including after cancellation or timeout.
    Always,
}

/// What a step does.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StepAction {
    /// A script run by a shell (`bash -eo pipefail {0}` unless the step names another).
    Run {
        /// The script text.
        script: String,
        /// The shell command line; `{0}` stands for the script file.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        shell: Option<String>,
    },
    /// `kubectl` with these arguments, already split shell-style; `${VAR}` is expanded by the runner.
    Kubectl {
        /// The arguments, one word each.
        args: Vec<String>,
    },
    /// `helm` with these arguments, already split shell-style; `${VAR}` is expanded by the runner.
    Helm {
        /// The arguments, one word each.
        args: Vec<String>,
    },
    /// An ad-hoc command from `outpost invoke`: optional uploaded files written into the
    /// workspace first, then the command, run directly (argv, no shell) unless `shell` is set.
    ///
    /// A first word of `kubectl` or `helm` runs the runner's configured binary, exactly like a
    /// `kubectl:`/`helm:` step; unlike those, nothing is expanded: the words arrive as the
    /// person's own shell passed them.
    Invoke {
        /// The command line, one word each; with `shell`, the words joined by spaces are the script.
        argv: Vec<String>,
        /// Run the words as a script with the runner's shell instead of as a direct process.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        shell: bool,
        /// Files to write into the workspace before the command starts.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        files: Vec<UploadedFile>,
    },
    /// Clone the triggering repository at the triggering sha into the workspace.
    Checkout {
        /// Sub-directory of the workspace to clone into (default: the workspace itself).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<String>,
        /// Shallow-clone depth; `None` clones what is needed for the sha.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        depth: Option<u32>,
        /// The name of the secret (one of the pipeline's `secrets`) that holds the token for a
        /// private repository; the runner hands it to git through the environment only.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token_secret: Option<String>,
    },
}

impl StepAction {
    /// The kind as spelled in YAML and JSON.
    pub fn kind(&self) -> &'static str {
        match self {
            StepAction::Run { .. } => "run",
            StepAction::Kubectl { .. } => "kubectl",
            StepAction::Helm { .. } => "helm",
            StepAction::Checkout { .. } => "checkout",
            StepAction::Invoke { .. } => "invoke",
        }
    }
}

/// One step of a job, resolved from the pipeline YAML.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StepSpec {
    /// Zero-based position in the job.
    pub index: u32,
    /// Display name (given, or derived from the action).
    pub name: String,
    /// What the step does.
    #[serde(flatten)]
    pub action: StepAction,
    /// When it runs.
    #[serde(default)]
    pub when: When,
    /// Step timeout in seconds, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
}

/// How a run was started.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum TriggerKind {
    /// From the web UI.
    Manual,
    /// From the HTTP API or the CLI.
    #[default]
    Api,
    /// From a forge's webhook.
    Webhook,
    /// An ad-hoc command.
    Invoke,
}

impl TriggerKind {
    /// The database and wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TriggerKind::Manual => "manual",
            TriggerKind::Api => "api",
            TriggerKind::Webhook => "webhook",
            TriggerKind::Invoke => "invoke",
        }
    }

    /// Parses the database and wire spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "manual" => TriggerKind::Manual,
            "api" => TriggerKind::Api,
            "webhook" => TriggerKind::Webhook,
            "invoke" => TriggerKind::Invoke,
            _ => return None,
        })
    }
}

/// What started a run, and the source coordinates its jobs work on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TriggerInfo {
    /// How the run was started.
    pub kind: TriggerKind,
    /// The webhook source (`github`, `gitlab`, `azure_devops`, `generic`) or the client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The forge event, e.g. `push`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// Repository, e.g. `acme/web`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    /// Where `checkout` clones from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_url: Option<String>,
    /// The git ref, e.g. `refs/heads/main`.
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<String>,
    /// The commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha: Option<String>,
    /// Who triggered it: a token name or a forge user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// The commit message, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// A link to the commit or pull request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The forge's delivery id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_id: Option<String>,
}

// ---------------------------------------------------------------------------
// Runner protocol
// ---------------------------------------------------------------------------

/// `POST /api/v1/runner/register` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RegisterRequest {
    /// A name people recognise, e.g. the host name.
    pub name: String,
    /// Labels jobs select runners by (`runs_on`).
    #[serde(default)]
    pub labels: Vec<String>,
    /// The runner's version.
    #[serde(default)]
    pub version: String,
    /// Operating system, e.g. `linux`.
    #[serde(default)]
    pub os: String,
    /// CPU architecture, e.g. `x86_64`.
    #[serde(default)]
    pub arch: String,
    /// The clusters the runner has configured (`[clusters.NAME]`); the server gives the runner
    /// the label `cluster:NAME` for each, which a job naming that cluster requires.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<String>,
}

/// `GET /api/v1/runner/me`: the runner a runner token belongs to (what `doctor` checks).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunnerIdentity {
    /// The runner's id.
    pub runner_id: Uuid,
    /// Its name.
    pub name: String,
    /// Its labels, including `cluster:NAME` for each cluster it registered with.
    pub labels: Vec<String>,
}

/// `POST /api/v1/runner/register` answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RegisterResponse {
    /// The runner's id.
    pub runner_id: Uuid,
    /// The runner's own credential; the server keeps only its hash.
    pub runner_token: String,
}

/// `GET /api/v1/runner/registration-info` answer (no authentication): how a runner may register.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RegistrationInfo {
    /// Set when the server accepts Entra ID access tokens in place of a registration token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entra: Option<EntraRegistrationInfo>,
}

/// What a runner needs to ask Entra ID for a token this server accepts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EntraRegistrationInfo {
    /// The directory (tenant) the token must come from.
    pub tenant_id: String,
    /// The audience (`aud`) the token must carry.
    pub audience: String,
    /// The scope to request, `<audience>/.default`.
    pub scope: String,
}

/// `POST /api/v1/runner/acquire` body (`{}` is valid).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AcquireRequest {
    /// How long the server may hold the request, in seconds (capped by the server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_secs: Option<u64>,
}

/// A lease on one job: the token is the credential for that job's calls.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Lease {
    /// Fresh random token for this claim.
    pub token: String,
    /// When the lease runs out unless renewed by a heartbeat.
    pub expires_at: DateTime<Utc>,
    /// Length of the lease in seconds; the runner heartbeats well inside it.
    pub duration_secs: u64,
}

/// Everything a runner needs to run one job.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AssignedJob {
    /// The job's id.
    pub id: Uuid,
    /// The run's id.
    pub run_id: Uuid,
    /// The run's number within its pipeline.
    pub run_number: i64,
    /// The pipeline's name.
    pub pipeline: String,
    /// The job's name within the pipeline.
    pub name: String,
    /// The steps in order.
    pub steps: Vec<StepSpec>,
    /// Pipeline variables merged with the run's variables.
    pub variables: BTreeMap<String, String>,
    /// Secret values the pipeline lists; the runner masks them in the log.
    #[serde(default)]
    pub secrets: BTreeMap<String, String>,
    /// Job timeout in seconds.
    pub timeout_secs: u64,
    /// The cluster the runner sets `KUBECONFIG` for, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// The deployment environment, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    /// What started the run.
    pub trigger: TriggerInfo,
}

/// `POST /api/v1/runner/acquire` answer when a job was claimed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AcquireResponse {
    /// The job.
    pub job: AssignedJob,
    /// The lease that fences it.
    pub lease: Lease,
}

/// `POST /api/v1/runner/jobs/{id}/heartbeat` answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HeartbeatResponse {
    /// The renewed expiry.
    pub expires_at: DateTime<Utc>,
    /// Whether someone asked to cancel the job.
    pub cancel_requested: bool,
}

/// `PUT /api/v1/runner/jobs/{id}/log?offset=N` answer.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogAppendResponse {
    /// The offset up to which the log is now stored.
    pub next_offset: u64,
}

/// `POST /api/v1/runner/jobs/{id}/steps/{index}` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StepUpdate {
    /// The new status.
    pub status: StepStatus,
    /// The exit code, once it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The log offset where the step's output starts (with `running`) or ends (with a final status).
    pub log_offset: u64,
}

/// `POST /api/v1/runner/jobs/{id}/complete` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CompleteRequest {
    /// `succeeded`, `failed`, `cancelled` or `timed_out`.
    pub status: JobStatus,
    /// The exit code of the step that decided the outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

// ---------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------

/// A pipeline as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Pipeline {
    /// Unique name.
    pub name: String,
    /// The `description` from the YAML.
    #[serde(default)]
    pub description: Option<String>,
    /// The YAML source as applied.
    pub yaml: String,
    /// The job names in the order they appear.
    pub jobs: Vec<String>,
    /// When it was first applied.
    pub created_at: DateTime<Utc>,
    /// When it was last applied.
    pub updated_at: DateTime<Utc>,
}

/// `GET /api/v1/pipelines` answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PipelineList {
    /// Pipelines by name.
    pub pipelines: Vec<Pipeline>,
}

/// `POST /api/v1/pipelines/{name}/runs` body; every field is optional.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TriggerRunRequest {
    /// Variables that override the pipeline's.
    #[serde(default)]
    pub variables: BTreeMap<String, String>,
    /// The git ref to work on.
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<String>,
    /// The commit to work on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha: Option<String>,
    /// The repository, e.g. `acme/web`, shown with the run and given to steps as `OUTPOST_REPO`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    /// Where `checkout` clones from; the pipeline's `repository` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_url: Option<String>,
}

/// A run and, where asked for, its jobs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Run {
    /// UUID v7.
    pub id: Uuid,
    /// The pipeline's name.
    pub pipeline: String,
    /// 1, 2, … per pipeline.
    pub number: i64,
    /// The run's status.
    pub status: RunStatus,
    /// What started it.
    pub trigger: TriggerInfo,
    /// The variables it was started with (overrides only).
    #[serde(default)]
    pub variables: BTreeMap<String, String>,
    /// When it was queued.
    pub created_at: DateTime<Utc>,
    /// When its first job started.
    pub started_at: Option<DateTime<Utc>>,
    /// When its last job ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// The jobs with their steps (`GET /runs/{id}` only; empty in lists).
    #[serde(default)]
    pub jobs: Vec<Job>,
}

/// `GET /api/v1/runs` answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunList {
    /// Newest first.
    pub runs: Vec<Run>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// A job as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Job {
    /// UUID v7.
    pub id: Uuid,
    /// The run it belongs to.
    pub run_id: Uuid,
    /// The pipeline's name.
    pub pipeline: String,
    /// The job's name.
    pub name: String,
    /// The job's status.
    pub status: JobStatus,
    /// Labels a runner must carry.
    pub runs_on: Vec<String>,
    /// Jobs that must succeed first.
    pub needs: Vec<String>,
    /// The cluster, if any.
    pub cluster: Option<String>,
    /// The environment, if any.
    pub environment: Option<String>,
    /// Job timeout in seconds.
    pub timeout_secs: u64,
    /// The runner that holds or held it.
    pub runner_id: Option<Uuid>,
    /// How many times it was claimed.
    pub attempt: i64,
    /// Whether someone asked to cancel it.
    pub cancel_requested: bool,
    /// The exit code the runner reported.
    pub exit_code: Option<i32>,
    /// Bytes of log stored.
    pub log_size: u64,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When a runner claimed it.
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// The steps with their statuses.
    #[serde(default)]
    pub steps: Vec<Step>,
}

/// A step as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Step {
    /// Zero-based position.
    pub index: u32,
    /// Display name.
    pub name: String,
    /// `run`, `kubectl`, `helm` or `checkout`.
    pub kind: String,
    /// The step's status.
    pub status: StepStatus,
    /// Its exit code, once ended.
    pub exit_code: Option<i32>,
    /// When it started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// Log offset where its output starts.
    pub log_start: Option<u64>,
    /// Log offset where its output ends.
    pub log_end: Option<u64>,
}

/// State of a runner.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum RunnerState {
    /// Seen recently, holding no job.
    Idle,
    /// Holding a job.
    Busy,
    /// Finishing its job before it stops.
    Draining,
    /// Not seen recently.
    Offline,
}

/// A runner as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Runner {
    /// Its id.
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// Its labels.
    pub labels: Vec<String>,
    /// The pool of the registration token it used.
    pub pool: String,
    /// Its version.
    pub version: String,
    /// Its operating system.
    pub os: String,
    /// Its architecture.
    pub arch: String,
    /// Derived from its jobs and when it was last seen.
    pub state: RunnerState,
    /// The job it is running, if any.
    pub current_job: Option<Uuid>,
    /// When it last called the server.
    pub last_seen_at: Option<DateTime<Utc>>,
    /// When it registered.
    pub created_at: DateTime<Utc>,
}

/// `GET /api/v1/runners` answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunnerList {
    /// Runners by name.
    pub runners: Vec<Runner>,
}

// ---------------------------------------------------------------------------
// Invoke and audit
// ---------------------------------------------------------------------------

/// The largest file `outpost invoke --file` may upload, in bytes (before base64).
pub const INVOKE_MAX_FILE_BYTES: usize = 1024 * 1024;
/// The most bytes all the files of one invoke may add up to (before base64).
pub const INVOKE_MAX_TOTAL_BYTES: usize = 4 * 1024 * 1024;
/// The reserved pipeline name invoke runs are filed under; no real pipeline can have it, since
/// pipeline names start with a letter or a digit.
pub const INVOKE_PIPELINE: &str = "_invoke";

/// A small file uploaded with an invoke, written into the job's workspace before the command.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UploadedFile {
    /// Relative path inside the workspace, `/`-separated, without `..`.
    pub path: String,
    /// The bytes, base64 (standard alphabet, padded).
    pub content_base64: String,
    /// Whether the file is made executable (mode 0755 rather than 0644).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub executable: bool,
}

/// `POST /api/v1/invoke` body: an ad-hoc command on a runner.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct InvokeRequest {
    /// The command, one word each (at least one word).
    pub argv: Vec<String>,
    /// Run the words as a shell script rather than as a direct process.
    #[serde(default)]
    pub shell: bool,
    /// A cluster the runner has configured: the job needs the `cluster:NAME` label and gets
    /// `KUBECONFIG` for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Labels the runner must all carry.
    #[serde(default)]
    pub labels: Vec<String>,
    /// The job's timeout in seconds (default 300, at most 24 hours).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// Files written into the workspace before the command starts.
    #[serde(default)]
    pub files: Vec<UploadedFile>,
}

/// One audit record: who did what, when, and how it ended.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditEvent {
    /// UUID v7.
    pub id: Uuid,
    /// What was done, e.g. `invoke`.
    pub kind: String,
    /// The API token's name.
    pub actor: String,
    /// The API token's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor_id: Option<Uuid>,
    /// When it was done.
    pub created_at: DateTime<Utc>,
    /// For `invoke`: the command line as recorded, with secrets masked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// The run it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<Uuid>,
    /// The job it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<Uuid>,
    /// The cluster asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// The labels asked for.
    #[serde(default)]
    pub labels: Vec<String>,
    /// The names of the uploaded files.
    #[serde(default)]
    pub files: Vec<String>,
    /// The runner that took the job, once one has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_id: Option<Uuid>,
    /// That runner's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_name: Option<String>,
    /// The job's status now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<JobStatus>,
    /// The command's exit code, once it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

/// `GET /api/v1/audit` answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditList {
    /// Newest first.
    pub events: Vec<AuditEvent>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_spec_is_flat_json() {
        let step = StepSpec {
            index: 0,
            name: "apply".into(),
            action: StepAction::Kubectl {
                args: vec!["apply".into(), "-f".into(), "k8s/".into()],
            },
            when: When::Always,
            timeout_secs: Some(30),
        };
        let json = serde_json::to_value(&step).unwrap();
        assert_eq!(json["kind"], "kubectl");
        assert_eq!(json["args"][1], "-f");
        assert_eq!(json["when"], "always");
        let back: StepSpec = serde_json::from_value(json).unwrap();
        assert_eq!(back, step);
    }

    #[test]
    fn statuses_round_trip_their_spelling() {
        for s in [
            JobStatus::Pending,
            JobStatus::Queued,
            JobStatus::Running,
            JobStatus::Succeeded,
            JobStatus::Failed,
            JobStatus::Cancelled,
            JobStatus::TimedOut,
            JobStatus::Lost,
            JobStatus::Skipped,
        ] {
            assert_eq!(JobStatus::parse(s.as_str()), Some(s));
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::Value::String(s.as_str().into())
            );
        }
        assert!(JobStatus::Lost.is_final());
        assert!(!JobStatus::Running.is_final());
    }

    #[test]
    fn trigger_ref_is_spelled_ref() {
        let t = TriggerInfo {
            git_ref: Some("refs/heads/main".into()),
            ..Default::default()
        };
        let json = serde_json::to_value(&t).unwrap();
        assert_eq!(json["ref"], "refs/heads/main");
        assert_eq!(json["kind"], "api");
    }
}
