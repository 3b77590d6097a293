//! Webhooks: prove a delivery genuine, normalise it into [`Event`]s, de-duplicate it, match the
//! events against the pipelines' triggers, start the runs, and record the delivery with its
//! outcome.
//!
//! Each forge has a file that knows its headers and payloads (`verify`, `parse`); this file holds
//! the flow they share. The order matters: the body size is checked while it is read, the
//! signature before anything in the body is looked at, and the delivery id is claimed only for a
//! verified delivery, so an unsigned request can neither start a run nor occupy a genuine
//! delivery's id.

mod azure_devops;
mod generic;
mod github;
mod gitlab;
pub mod triggers;

use std::collections::{BTreeMap, HashSet};

use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use hmac::{Hmac, Mac};
use outpost_protocol::{TriggerInfo, TriggerKind};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::pipeline::PipelineDef;
use crate::settings::WebhookSettings;
use crate::store::{Claim, NewDelivery, NewRun, Store, StoreError, WebhookDelivery};

use self::triggers::Selection;

/// How long a recorded header value, reason or commit message may be; longer ones are cut.
const MAX_RECORDED_CHARS: usize = 200;
const MAX_MESSAGE_CHARS: usize = 4000;
/// How many pipelines a "nothing matched" answer names before it summarises the rest.
const MAX_LISTED: usize = 10;

/// Where a delivery comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// `POST /hooks/github`.
    Github,
    /// `POST /hooks/gitlab`.
    Gitlab,
    /// `POST /hooks/azure-devops`.
    AzureDevops,
    /// `POST /hooks/generic/{pipeline}`.
    Generic,
}

impl Source {
    /// The stored and wire spelling, which is also the trigger's key in pipeline YAML.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Github => "github",
            Source::Gitlab => "gitlab",
            Source::AzureDevops => "azure_devops",
            Source::Generic => "generic",
        }
    }

    /// The name people know it by.
    pub fn label(self) -> &'static str {
        match self {
            Source::Github => "GitHub",
            Source::Gitlab => "GitLab",
            Source::AzureDevops => "Azure DevOps",
            Source::Generic => "generic",
        }
    }
}

/// Why the body could not be read.
#[derive(Debug, Clone, PartialEq)]
pub enum BodyError {
    /// It is larger than `webhooks.max_body_bytes`.
    TooLarge,
    /// The connection failed while it was read.
    Unreadable(String),
}

/// A delivery as it arrived.
#[derive(Debug)]
pub struct Inbound {
    /// Which endpoint it was sent to.
    pub source: Source,
    /// The pipeline named in a generic hook's path.
    pub pipeline: Option<String>,
    /// The request headers.
    pub headers: HeaderMap,
    /// The raw body, exactly as signed.
    pub body: Result<Bytes, BodyError>,
}

/// Which ref an event is about, for the `branches` and `tags` filters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefTarget {
    /// A branch; for pull and merge requests, the branch they would merge into.
    Branch(String),
    /// A tag.
    Tag(String),
    /// Neither, or not known (a generic delivery).
    Other,
}

/// A forge event, normalised: what the triggers are matched against and what a run records.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Where it came from.
    pub source: Source,
    /// The forge's name for the event, recorded with the run: `push`, `tag_push`,
    /// `pull_request`, `merge_request`, `git.push`, `git.pullrequest.created`, `generic`, ….
    pub name: String,
    /// The names a trigger's `events:` list may use for it (normalised, see
    /// [`triggers::normalise_event`]).
    pub names: Vec<&'static str>,
    /// Whether this is a pull or merge request rather than a push.
    pub pull_request: bool,
    /// The repository: `owner/name` on GitHub, the project path on GitLab, `project/name` on
    /// Azure DevOps.
    pub repo: Option<String>,
    /// The repository name alone, where it differs from `repo` (Azure DevOps).
    pub repo_name: Option<String>,
    /// Where `checkout` clones from.
    pub clone_url: Option<String>,
    /// The full ref: `refs/heads/main`, `refs/tags/v1`, `refs/pull/2/head`, ….
    pub git_ref: Option<String>,
    /// The commit to build (the new tip of a push, the head of a pull request).
    pub sha: Option<String>,
    /// The ref's previous commit, when the forge says.
    pub before: Option<String>,
    /// Whether the push deletes the ref.
    pub deleted: bool,
    /// The branch or tag the filters look at.
    pub target: RefTarget,
    /// The files the push changed, when the payload lists all of them.
    pub changed_paths: Option<Vec<String>>,
    /// Why `changed_paths` is `None`.
    pub paths_unknown: Option<String>,
    /// Who pushed or opened the request.
    pub actor: Option<String>,
    /// The head commit's message or the request's title.
    pub message: Option<String>,
    /// A link to the commit or the request.
    pub url: Option<String>,
    /// The forge's delivery id.
    pub delivery_id: Option<String>,
    /// Variables a generic delivery passes to the run.
    pub variables: BTreeMap<String, String>,
}

impl Event {
    /// An event with only its source and names set; the forge modules fill in the rest.
    fn new(source: Source, name: impl Into<String>, names: Vec<&'static str>) -> Self {
        Self {
            source,
            name: name.into(),
            names,
            pull_request: false,
            repo: None,
            repo_name: None,
            clone_url: None,
            git_ref: None,
            sha: None,
            before: None,
            deleted: false,
            target: RefTarget::Other,
            changed_paths: None,
            paths_unknown: None,
            actor: None,
            message: None,
            url: None,
            delivery_id: None,
            variables: BTreeMap::new(),
        }
    }

    /// The ref in words, for reasons: "branch `main`", "tag `v1`", "pull request #2 into `main`".
    fn describe_ref(&self) -> String {
        match &self.target {
            RefTarget::Branch(b) if self.pull_request => format!("a request into branch `{b}`"),
            RefTarget::Branch(b) => format!("branch `{b}`"),
            RefTarget::Tag(t) => format!("tag `{t}`"),
            RefTarget::Other => match &self.git_ref {
                Some(r) => format!("`{r}`"),
                None => "no ref".into(),
            },
        }
    }

    /// What a run started by this event records about it.
    fn trigger_info(&self, def: &PipelineDef) -> TriggerInfo {
        TriggerInfo {
            kind: TriggerKind::Webhook,
            source: Some(self.source.as_str().into()),
            event: Some(self.name.clone()),
            repo: self.repo.clone(),
            clone_url: self.clone_url.clone().or_else(|| def.repository.clone()),
            git_ref: self.git_ref.clone(),
            sha: self.sha.clone(),
            actor: self.actor.clone(),
            message: self.message.clone(),
            url: self.url.clone(),
            delivery_id: self.delivery_id.clone(),
        }
    }
}

/// What a forge module makes of a verified delivery.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Parsed {
    /// The forge's event name, recorded with the delivery.
    pub event: String,
    /// The delivery id found in the body (Azure DevOps), if the headers had none.
    pub delivery_id: Option<String>,
    /// What to do.
    pub action: Action,
}

/// What a verified delivery asks for.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    /// Match these events (one per ref a push updated) against the triggers.
    Run(Vec<Event>),
    /// Nothing: an event or action Outpost does not act on, and why.
    Ignore(String),
    /// A forge's hello when the webhook is set up.
    Ping(String),
}

/// Why a delivery was refused before its body was looked at.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Refusal {
    code: &'static str,
    message: String,
}

impl Refusal {
    fn not_configured(message: impl Into<String>) -> Self {
        Self {
            code: "webhook_not_configured",
            message: message.into(),
        }
    }

    fn missing(message: impl Into<String>) -> Self {
        Self {
            code: "missing_signature",
            message: message.into(),
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self {
            code: "invalid_signature",
            message: message.into(),
        }
    }
}

/// A run a delivery started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StartedRun {
    /// The run's id.
    pub id: Uuid,
    /// Its pipeline.
    pub pipeline: String,
    /// Its number within the pipeline.
    pub number: i64,
    /// The ref it builds.
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<String>,
    /// The commit it builds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha: Option<String>,
    /// Something worth knowing about why it fired, e.g. that a `paths` filter could not be checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// A pipeline and a sentence about it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PipelineNote {
    /// The pipeline.
    pub pipeline: String,
    /// What happened, or why not.
    pub reason: String,
}

/// The answer to a delivery that was accepted (`200`) or handled without starting anything (`202`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HookReply {
    /// `triggered`, `partial`, `no_match`, `ignored`, `ping` or `redelivery`.
    pub outcome: String,
    /// The id of the delivery's record in `GET /api/v1/webhook-deliveries`.
    pub record: Uuid,
    /// The forge's delivery id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_id: Option<String>,
    /// The forge's event name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// Why nothing (or not everything) was started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The runs this delivery started now; empty for a redelivery.
    pub run_ids: Vec<Uuid>,
    /// The same runs, described.
    #[serde(default)]
    pub runs: Vec<StartedRun>,
    /// Pipelines with a trigger for this source and repository that did not fire, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<PipelineNote>,
    /// Pipelines whose trigger fired but whose run could not be started, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<PipelineNote>,
    /// For a redelivery or a retry: the runs earlier deliveries with this id started.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous_run_ids: Vec<Uuid>,
}

/// How a delivery was answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The HTTP status.
    pub status: StatusCode,
    /// The body.
    pub body: ReplyBody,
}

/// The body of a [`Reply`].
#[derive(Debug, Clone, PartialEq)]
pub enum ReplyBody {
    /// An accepted or ignored delivery.
    Done(HookReply),
    /// A refused one: an error code and a sentence (for a 5xx, the cause, which is logged and
    /// not shown).
    Error {
        /// The stable error code.
        code: &'static str,
        /// What was wrong.
        message: String,
    },
}

impl Reply {
    fn error(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ReplyBody::Error {
                code,
                message: message.into(),
            },
        }
    }
}

/// Handles one delivery from start to end; every path through it records the delivery.
#[tracing::instrument(skip_all, fields(source = inbound.source.as_str(), delivery))]
pub async fn receive(store: &Store, settings: &WebhookSettings, inbound: Inbound) -> Reply {
    let Inbound {
        source,
        pipeline,
        headers,
        body,
    } = inbound;
    let mut record = NewDelivery {
        source: source.as_str().into(),
        delivery_id: header_delivery_id(source, &headers).map(|d| clip(&d, MAX_RECORDED_CHARS)),
        event: event_header(source, &headers).map(|e| clip(&e, MAX_RECORDED_CHARS)),
        pipeline: pipeline.as_deref().map(|p| clip(p, MAX_RECORDED_CHARS)),
        ..Default::default()
    };
    if let Some(id) = &record.delivery_id {
        tracing::Span::current().record("delivery", id.as_str());
    }

    let body = match body {
        Ok(body) => body,
        Err(BodyError::TooLarge) => {
            let message = format!(
                "the webhook body is larger than the {} bytes this server accepts \
                 (webhooks.max_body_bytes)",
                settings.max_body_bytes
            );
            return refuse(
                store,
                record,
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "payload_too_large",
                message,
            )
            .await;
        }
        Err(BodyError::Unreadable(e)) => {
            let message = format!("could not read the webhook body: {e}");
            return refuse(
                store,
                record,
                StatusCode::BAD_REQUEST,
                "malformed",
                "bad_request",
                message,
            )
            .await;
        }
    };

    let verified = match source {
        Source::Github => github::verify(settings, &headers, &body),
        Source::Gitlab => gitlab::verify(settings, &headers),
        Source::AzureDevops => azure_devops::verify(settings, &headers),
        Source::Generic => {
            generic::verify(settings, pipeline.as_deref().unwrap_or(""), &headers, &body)
        }
    };
    if let Err(refusal) = verified {
        tracing::warn!(code = refusal.code, reason = %refusal.message, "webhook delivery refused");
        return refuse(
            store,
            record,
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            refusal.code,
            refusal.message,
        )
        .await;
    }

    let parsed = match source {
        Source::Github => github::parse(&headers, &body),
        Source::Gitlab => gitlab::parse(&headers, &body),
        Source::AzureDevops => azure_devops::parse(&body),
        Source::Generic => generic::parse(&body),
    };
    let mut parsed = match parsed {
        Ok(parsed) => parsed,
        Err(message) => {
            return refuse(
                store,
                record,
                StatusCode::BAD_REQUEST,
                "malformed",
                "bad_request",
                message,
            )
            .await;
        }
    };
    record.event = Some(clip(&parsed.event, MAX_RECORDED_CHARS));
    if record.delivery_id.is_none() {
        record.delivery_id = parsed
            .delivery_id
            .as_deref()
            .map(|d| clip(d, MAX_RECORDED_CHARS));
    }
    if let Action::Run(events) = &mut parsed.action {
        for event in events {
            event.delivery_id = record.delivery_id.clone();
        }
    }

    // Claim the delivery id before anything is started: of two identical deliveries, only the one
    // that claims it goes on.
    let dedupe_key = record.delivery_id.as_ref().map(|id| match &pipeline {
        Some(p) => format!("{p}:{id}"),
        None => id.clone(),
    });
    let (claimed, previous_run_ids) = match &dedupe_key {
        None => (None, Vec::new()),
        Some(key) => match store.claim_delivery(&record, key).await {
            Ok(Claim::New { id }) => (Some(id), Vec::new()),
            Ok(Claim::Retry { id, run_ids }) => (Some(id), run_ids),
            Ok(Claim::Seen(previous)) => return redelivery(store, record, previous).await,
            Err(e) => {
                return Reply::error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    format!("could not record the webhook delivery: {e:?}"),
                );
            }
        },
    };

    let handled = handle(store, pipeline.as_deref(), parsed.action, &previous_run_ids).await;
    let mut all_run_ids = previous_run_ids.clone();
    all_run_ids.extend(handled.runs.iter().map(|r| r.id));
    let saved = match claimed {
        Some(id) => store
            .finish_delivery(
                id,
                handled.outcome,
                handled.status.as_u16(),
                handled.reason.as_deref(),
                &all_run_ids,
            )
            .await
            .map(|()| id),
        None => {
            store
                .record_delivery(NewDelivery {
                    outcome: handled.outcome.into(),
                    status_code: handled.status.as_u16(),
                    reason: handled.reason.clone(),
                    run_ids: all_run_ids.clone(),
                    ..record.clone()
                })
                .await
        }
    };
    let record_id = match saved {
        Ok(id) => id,
        Err(e) => {
            return Reply::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("could not record the outcome of a webhook delivery: {e:?}"),
            );
        }
    };
    tracing::info!(
        outcome = handled.outcome,
        status = handled.status.as_u16(),
        runs = handled.runs.len(),
        reason = handled.reason.as_deref().unwrap_or(""),
        "webhook delivery handled"
    );
    if let Some(cause) = handled.internal {
        return Reply::error(StatusCode::INTERNAL_SERVER_ERROR, "internal", cause);
    }
    if handled.status == StatusCode::UNPROCESSABLE_ENTITY {
        return Reply::error(
            handled.status,
            "runs_not_started",
            handled.reason.unwrap_or_default(),
        );
    }
    if handled.status == StatusCode::NOT_FOUND {
        return Reply::error(
            handled.status,
            "not_found",
            handled.reason.unwrap_or_default(),
        );
    }
    Reply {
        status: handled.status,
        body: ReplyBody::Done(HookReply {
            outcome: handled.outcome.into(),
            record: record_id,
            delivery_id: record.delivery_id,
            event: record.event,
            reason: handled.reason,
            run_ids: handled.runs.iter().map(|r| r.id).collect(),
            runs: handled.runs,
            skipped: handled.skipped,
            errors: handled.errors,
            previous_run_ids,
        }),
    }
}

/// Records a refused delivery and answers it with an error.
async fn refuse(
    store: &Store,
    record: NewDelivery,
    status: StatusCode,
    outcome: &str,
    code: &'static str,
    message: String,
) -> Reply {
    let saved = store
        .record_delivery(NewDelivery {
            outcome: outcome.into(),
            status_code: status.as_u16(),
            reason: Some(message.clone()),
            ..record
        })
        .await;
    if let Err(e) = saved {
        return Reply::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("could not record a refused webhook delivery: {e:?}"),
        );
    }
    Reply::error(status, code, message)
}

/// Answers a delivery whose id was seen before: `200`, nothing new started.
async fn redelivery(store: &Store, record: NewDelivery, previous: WebhookDelivery) -> Reply {
    let reason = if previous.outcome == "processing" {
        format!(
            "delivery {} is being handled right now (it arrived at {}); nothing new was started. \
             A redelivery after {} minutes without an outcome takes it over",
            previous.delivery_id.as_deref().unwrap_or(""),
            previous.received_at.to_rfc3339(),
            crate::store::STALE_PROCESSING_SECS / 60
        )
    } else {
        format!(
            "delivery {} was already received at {} (outcome: {}, {} run(s) started); nothing new \
             was started",
            previous.delivery_id.as_deref().unwrap_or(""),
            previous.received_at.to_rfc3339(),
            previous.outcome,
            previous.run_ids.len()
        )
    };
    let saved = store
        .record_delivery(NewDelivery {
            outcome: "redelivery".into(),
            status_code: StatusCode::OK.as_u16(),
            reason: Some(reason.clone()),
            ..record.clone()
        })
        .await;
    let record_id = match saved {
        Ok(id) => id,
        Err(e) => {
            return Reply::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("could not record a redelivery: {e:?}"),
            );
        }
    };
    tracing::info!(previous = %previous.id, "webhook redelivery: nothing new started");
    Reply {
        status: StatusCode::OK,
        body: ReplyBody::Done(HookReply {
            outcome: "redelivery".into(),
            record: record_id,
            delivery_id: record.delivery_id,
            event: record.event,
            reason: Some(reason),
            run_ids: Vec::new(),
            runs: Vec::new(),
            skipped: Vec::new(),
            errors: Vec::new(),
            previous_run_ids: previous.run_ids,
        }),
    }
}

/// The result of acting on a verified, claimed delivery.
struct Handled {
    outcome: &'static str,
    status: StatusCode,
    reason: Option<String>,
    runs: Vec<StartedRun>,
    skipped: Vec<PipelineNote>,
    errors: Vec<PipelineNote>,
    /// The cause of a server-side failure, for the log.
    internal: Option<String>,
}

impl Handled {
    fn nothing(outcome: &'static str, status: StatusCode, reason: String) -> Self {
        Self {
            outcome,
            status,
            reason: Some(reason),
            runs: Vec::new(),
            skipped: Vec::new(),
            errors: Vec::new(),
            internal: None,
        }
    }
}

/// Matches the events against the triggers and starts the runs they select.
///
/// `previous_run_ids` are the runs an earlier attempt at this delivery started; their pipelines
/// are not started again for the same ref.
async fn handle(
    store: &Store,
    generic_pipeline: Option<&str>,
    action: Action,
    previous_run_ids: &[Uuid],
) -> Handled {
    let events = match action {
        Action::Ignore(reason) => {
            return Handled::nothing("ignored", StatusCode::ACCEPTED, reason);
        }
        Action::Ping(reason) => return Handled::nothing("ping", StatusCode::ACCEPTED, reason),
        Action::Run(events) => events,
    };
    let (deleted, live): (Vec<Event>, Vec<Event>) = events.into_iter().partition(|e| e.deleted);
    if live.is_empty() {
        let what: Vec<String> = deleted.iter().map(Event::describe_ref).collect();
        return Handled::nothing(
            "ignored",
            StatusCode::ACCEPTED,
            format!(
                "the push deletes {}; a deletion starts nothing",
                what.join(" and ")
            ),
        );
    }

    let pipelines = match generic_pipeline {
        Some(name) => match store.get_pipeline(name).await {
            Ok((_, def)) => vec![(name.to_string(), def)],
            Err(StoreError::NotFound(_)) => {
                return Handled::nothing(
                    "not_found",
                    StatusCode::NOT_FOUND,
                    format!("there is no pipeline named {name}"),
                );
            }
            Err(e) => return internal(format!("could not load pipeline {name}: {e:?}")),
        },
        None => match store.pipeline_definitions().await {
            Ok(all) => all,
            Err(e) => return internal(format!("could not load the pipelines: {e:?}")),
        },
    };

    // Which (pipeline, ref) pairs an earlier attempt at this delivery already started.
    let mut done: HashSet<(String, Option<String>)> = HashSet::new();
    for id in previous_run_ids {
        match store.get_run(*id).await {
            Ok(run) => {
                done.insert((run.pipeline, run.trigger.git_ref));
            }
            Err(StoreError::NotFound(_)) => {}
            Err(e) => return internal(format!("could not load run {id}: {e:?}")),
        }
    }

    let mut runs = Vec::new();
    let mut skipped = Vec::new();
    let mut errors = Vec::new();
    let mut selected_any = false;
    let mut interested_any = false;
    for event in &live {
        for (name, def) in &pipelines {
            let note = match triggers::select(def, event) {
                None => continue,
                Some(Selection::Skip(reason)) => {
                    interested_any = true;
                    skipped.push(PipelineNote {
                        pipeline: name.clone(),
                        reason,
                    });
                    continue;
                }
                Some(Selection::Fire { note }) => note,
            };
            interested_any = true;
            selected_any = true;
            if done.contains(&(name.clone(), event.git_ref.clone())) {
                continue;
            }
            let new = NewRun {
                pipeline: name.clone(),
                trigger: event.trigger_info(def),
                variables: event.variables.clone(),
            };
            match store.create_run(new, def).await {
                Ok(run) => {
                    tracing::info!(run.id = %run.id, pipeline = %name, number = run.number, "run queued by webhook");
                    runs.push(StartedRun {
                        id: run.id,
                        pipeline: name.clone(),
                        number: run.number,
                        git_ref: run.trigger.git_ref,
                        sha: run.trigger.sha,
                        note,
                    });
                }
                Err(StoreError::Db(e)) => {
                    let mut handled =
                        internal(format!("could not start a run of pipeline {name}: {e:?}"));
                    handled.runs = runs;
                    return handled;
                }
                Err(e) => errors.push(PipelineNote {
                    pipeline: name.clone(),
                    reason: e.to_string(),
                }),
            }
        }
    }

    if !selected_any {
        let reason = if !interested_any {
            match generic_pipeline {
                Some(name) => format!(
                    "pipeline {name} has no `generic` trigger; add `- generic: {{}}` to its `triggers`"
                ),
                None => {
                    let repo = live[0]
                        .repo
                        .as_deref()
                        .map(|r| format!(" (repository {r})"))
                        .unwrap_or_default();
                    format!(
                        "no pipeline has a `{}` trigger for this repository{repo}, so this {} \
                         event starts nothing",
                        live[0].source.as_str(),
                        live[0].source.label()
                    )
                }
            }
        } else {
            let mut parts: Vec<String> = skipped
                .iter()
                .take(MAX_LISTED)
                .map(|s| format!("{}: {}", s.pipeline, s.reason))
                .collect();
            if skipped.len() > MAX_LISTED {
                parts.push(format!("and {} more", skipped.len() - MAX_LISTED));
            }
            format!(
                "no trigger matched {}: {}",
                live[0].describe_ref(),
                parts.join("; ")
            )
        };
        let mut handled = Handled::nothing("no_match", StatusCode::ACCEPTED, reason);
        handled.skipped = skipped;
        return handled;
    }

    let failures = || {
        errors
            .iter()
            .map(|e| format!("{}: {}", e.pipeline, e.reason))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let (outcome, status, reason) = if errors.is_empty() {
        let reason = (runs.is_empty() && !previous_run_ids.is_empty())
            .then(|| "an earlier attempt at this delivery already started its runs".to_string());
        ("triggered", StatusCode::OK, reason)
    } else if !runs.is_empty() || !previous_run_ids.is_empty() {
        (
            "partial",
            StatusCode::OK,
            Some(format!("some runs could not be started: {}", failures())),
        )
    } else {
        (
            "failed",
            StatusCode::UNPROCESSABLE_ENTITY,
            Some(format!("no run could be started: {}", failures())),
        )
    };
    Handled {
        outcome,
        status,
        reason,
        runs,
        skipped,
        errors,
        internal: None,
    }
}

fn internal(cause: String) -> Handled {
    Handled {
        outcome: "error",
        status: StatusCode::INTERNAL_SERVER_ERROR,
        reason: Some("the server failed while handling the delivery; it can be redelivered".into()),
        runs: Vec::new(),
        skipped: Vec::new(),
        errors: Vec::new(),
        internal: Some(cause),
    }
}

/// The delivery id a source's headers carry.
fn header_delivery_id(source: Source, headers: &HeaderMap) -> Option<String> {
    match source {
        Source::Github => header(headers, "x-github-delivery"),
        // GitLab keeps `Idempotency-Key` across retries and manual resends, while older versions
        // send only the event's UUID.
        Source::Gitlab => {
            header(headers, "idempotency-key").or_else(|| header(headers, "x-gitlab-event-uuid"))
        }
        Source::AzureDevops => None,
        Source::Generic => header(headers, "x-outpost-delivery"),
    }
}

/// The event name a source's headers carry.
fn event_header(source: Source, headers: &HeaderMap) -> Option<String> {
    match source {
        Source::Github => header(headers, "x-github-event"),
        Source::Gitlab => header(headers, "x-gitlab-event"),
        Source::AzureDevops | Source::Generic => None,
    }
}

/// Parses a delivery body as the `source` forge's module does once the delivery is verified, and
/// returns the events it would match against the triggers (none for an ignored event or a ping).
///
/// This is the parsing half of [`receive`] without the database and without the signature check,
/// so the fuzz targets in `fuzz/` can reach each forge's parser directly.
#[doc(hidden)]
pub fn parse_verified(
    source: Source,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Vec<Event>, String> {
    let parsed = match source {
        Source::Github => github::parse(headers, body),
        Source::Gitlab => gitlab::parse(headers, body),
        Source::AzureDevops => azure_devops::parse(body),
        Source::Generic => generic::parse(body),
    }?;
    Ok(match parsed.action {
        Action::Run(events) => events,
        Action::Ignore(_) | Action::Ping(_) => Vec::new(),
    })
}

/// A header's value as trimmed text, if present, readable and not blank.
pub(crate) fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

/// Checks `header_value` (`sha256=<hex>`) against the HMAC-SHA256 of `body` under `secret`, in
/// constant time.
pub(crate) fn verify_hmac_sha256(
    secret: &str,
    body: &[u8],
    header_value: &str,
    header_name: &str,
) -> Result<(), Refusal> {
    let Some(hex_sig) = header_value.strip_prefix("sha256=") else {
        return Err(Refusal::invalid(format!(
            "the {header_name} header must be `sha256=<hex digest>`"
        )));
    };
    let invalid = || {
        Refusal::invalid(format!(
            "the {header_name} signature does not match the body: the secret differs from the \
             configured one, or the body was changed after it was signed"
        ))
    };
    let signature = hex::decode(hex_sig.trim()).map_err(|_| invalid())?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .expect("HMAC accepts a key of any length");
    mac.update(body);
    mac.verify_slice(&signature).map_err(|_| invalid())
}

/// Compares a presented token with the configured one in constant time (both are hashed first,
/// so not even their lengths are compared directly).
pub(crate) fn same_secret(presented: &[u8], configured: &[u8]) -> bool {
    let a = Sha256::digest(presented);
    let b = Sha256::digest(configured);
    a.ct_eq(&b).into()
}

/// Whether a commit id is the all-zero id forges use for "no commit" (a created or deleted ref).
pub(crate) fn is_zero_sha(sha: &str) -> bool {
    !sha.is_empty() && sha.bytes().all(|b| b == b'0')
}

/// The body as a JSON object.
pub(crate) fn json_object(body: &[u8]) -> Result<Value, String> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| format!("the webhook body is not valid JSON: {e}"))?;
    if !value.is_object() {
        return Err("the webhook body must be a JSON object".into());
    }
    Ok(value)
}

/// The text at a JSON pointer, if it is a non-blank string (or a number, as its text).
pub(crate) fn text(value: &Value, pointer: &str) -> Option<String> {
    match value.pointer(pointer)? {
        Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Like [`text`], but its absence makes the payload malformed.
pub(crate) fn required(value: &Value, pointer: &str, what: &str) -> Result<String, String> {
    text(value, pointer).ok_or_else(|| {
        format!(
            "the {what} payload has no `{}`",
            pointer.trim_start_matches('/').replace('/', ".")
        )
    })
}

/// The branch or tag a full ref names.
pub(crate) fn ref_target(git_ref: &str) -> RefTarget {
    if let Some(branch) = git_ref.strip_prefix("refs/heads/") {
        RefTarget::Branch(branch.to_string())
    } else if let Some(tag) = git_ref.strip_prefix("refs/tags/") {
        RefTarget::Tag(tag.to_string())
    } else {
        RefTarget::Other
    }
}

/// The sorted, de-duplicated `added`, `modified` and `removed` files of a list of commits.
pub(crate) fn files_of(commits: &[Value]) -> Vec<String> {
    let mut files: Vec<String> = commits
        .iter()
        .flat_map(|c| ["added", "modified", "removed"].map(|k| c.get(k)))
        .flatten()
        .filter_map(Value::as_array)
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect();
    files.sort();
    files.dedup();
    files
}

/// At most `max` characters of `s`, ending in `…` when something was cut.
pub(crate) fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut cut: String = s.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// A commit message or title as recorded with a run.
pub(crate) fn message(s: Option<String>) -> Option<String> {
    s.map(|m| clip(m.trim_end(), MAX_MESSAGE_CHARS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_the_example_github_documents() {
        // From GitHub's "Validating webhook deliveries" page.
        let secret = "It's a Secret to Everybody";
        let header = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert!(
            verify_hmac_sha256(secret, b"Hello, World!", header, "X-Hub-Signature-256").is_ok()
        );
        assert!(
            verify_hmac_sha256(secret, b"Hello, World?", header, "X-Hub-Signature-256").is_err()
        );
        assert!(
            verify_hmac_sha256("another", b"Hello, World!", header, "X-Hub-Signature-256").is_err()
        );
        let no_prefix = header.trim_start_matches("sha256=");
        assert!(
            verify_hmac_sha256(secret, b"Hello, World!", no_prefix, "X-Hub-Signature-256").is_err()
        );
        assert!(
            verify_hmac_sha256(secret, b"Hello, World!", "sha256=zz", "X-Hub-Signature-256")
                .is_err()
        );
    }

    #[test]
    fn tokens_compare_by_value() {
        assert!(same_secret(b"token", b"token"));
        assert!(!same_secret(b"token", b"token2"));
        assert!(!same_secret(b"", b"token"));
    }

    #[test]
    fn zero_ids_and_refs() {
        assert!(is_zero_sha("0000000000000000000000000000000000000000"));
        assert!(!is_zero_sha(""));
        assert!(!is_zero_sha("6113728f27ae82c7b1a177c8d03f9e96e0adf246"));
        assert_eq!(
            ref_target("refs/heads/release/1.2"),
            RefTarget::Branch("release/1.2".into())
        );
        assert_eq!(ref_target("refs/tags/v1"), RefTarget::Tag("v1".into()));
        assert_eq!(ref_target("refs/pull/2/head"), RefTarget::Other);
    }
}
