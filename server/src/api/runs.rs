//! `/api/v1/runs` and `/api/v1/jobs`: trigger, list, show, cancel.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, Uri};
use axum::response::IntoResponse;
use outpost_protocol::{
    ErrorBody, Job, Run, RunList, RunStatus, TriggerInfo, TriggerKind, TriggerRunRequest,
};
use serde::Deserialize;

use super::extract::{Body, Caller, TriggerCaller, parse_id};
use super::{ApiError, ApiResult, AppState};
use crate::pipeline::PipelineDef;
use crate::store::{KnownToken, NewRun, Scope};

/// Whether `name` can be an environment variable.
pub fn valid_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `POST /pipelines/{name}/runs`: `201` with the run.
#[utoipa::path(
    post,
    path = "/api/v1/pipelines/{name}/runs",
    tag = "runs",
    operation_id = "trigger_run",
    summary = "Start a run (trigger)",
    params(("name" = String, Path, description = "The pipeline's name")),
    request_body(content = TriggerRunRequest, description = "All fields optional; an empty body is `{}`"),
    security(("api_token" = [])),
    responses(
        (status = 201, description = "The queued run", body = Run),
        (status = 400, description = "The request is malformed", body = ErrorBody),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The token's scope is too small", body = ErrorBody),
        (status = 404, description = "No such object", body = ErrorBody),
        (status = 413, description = "The body is larger than the server accepts", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all, fields(pipeline = %name), err(Debug))]
pub async fn trigger(
    State(state): State<AppState>,
    caller: TriggerCaller,
    Path(name): Path<String>,
    body: Body,
) -> ApiResult<impl IntoResponse> {
    let caller = match caller {
        TriggerCaller::Checked(caller) => caller,
        // A token seen valid here before is checked in the statement that creates the run.
        // Anything else than a run created that way is answered only once the token has been
        // checked on its own, as for every other call: a revoked token learns nothing.
        TriggerCaller::Known { token, known } => {
            let caller = Caller(known.principal.clone());
            match create_run(&state, &caller, &name, &body, Some(&known)).await {
                Ok(Some(run)) => return Ok((StatusCode::CREATED, Json(run))),
                outcome => {
                    let checked = Caller::authenticate(&state, &token).await?;
                    outcome?;
                    checked
                }
            }
        }
    };
    let run = create_run(&state, &caller, &name, &body, None)
        .await?
        .ok_or_else(|| {
            ApiError::internal("a run triggered with a checked token was not created")
        })?;
    Ok((StatusCode::CREATED, Json(run)))
}

/// The run a trigger asks for, made from this replica's copy of the pipeline's definition, which
/// the statement that creates the run checks against the stored revision: no read of the
/// pipeline before each run. With `known`, only if that token is still valid
/// ([`crate::store::Store::trigger_run_as`]); `None` if it was not created for that reason.
async fn create_run(
    state: &AppState,
    caller: &Caller,
    name: &str,
    body: &Body,
    known: Option<&KnownToken>,
) -> ApiResult<Option<Run>> {
    caller.require(Scope::Trigger)?;
    let req: TriggerRunRequest = body.json(true)?;
    if let Some(bad) = req.variables.keys().find(|k| !valid_variable_name(k)) {
        return Err(ApiError::bad_request(format!(
            "variable name {bad:?} is not valid: use letters, digits and underscores, not starting with a digit"
        )));
    }
    let make = |def: &PipelineDef| NewRun {
        pipeline: name.to_string(),
        trigger: TriggerInfo {
            kind: TriggerKind::Api,
            source: Some("api".into()),
            actor: Some(caller.0.name.clone()),
            git_ref: req.git_ref.clone(),
            sha: req.sha.clone(),
            repo: req.repo.clone(),
            clone_url: req.clone_url.clone().or_else(|| def.repository.clone()),
            ..Default::default()
        },
        variables: req.variables.clone(),
    };
    let run = match known {
        Some(token) => state.store.trigger_run_as(name, token, make).await?,
        None => Some(state.store.trigger_run(name, make).await?),
    };
    if let Some(run) = &run {
        tracing::info!(run.id = %run.id, number = run.number, actor = %caller.0.name, "run queued");
    }
    Ok(run)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunsQuery {
    pipeline: Option<String>,
    status: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

/// `GET /runs?pipeline=&status=&limit=&cursor=`: newest first.
#[utoipa::path(
    get,
    path = "/api/v1/runs",
    tag = "runs",
    operation_id = "list_runs",
    summary = "Runs, newest first (read)",
    params(("pipeline" = Option<String>, Query, description = "Only this pipeline's runs"), ("status" = Option<RunStatus>, Query, description = "Only runs with this status"), ("limit" = Option<u32>, Query, description = "Page size"), ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page")),
    security(("api_token" = [])),
    responses(
        (status = 200, description = "A page of runs", body = RunList),
        (status = 400, description = "The request is malformed", body = ErrorBody),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The token's scope is too small", body = ErrorBody),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    uri: Uri,
) -> ApiResult<Json<RunList>> {
    caller.require(Scope::Read)?;
    let Query(q) = Query::<RunsQuery>::try_from_uri(&uri)
        .map_err(|e| ApiError::bad_request(format!("invalid query: {}", e.body_text())))?;
    let status = match q.status.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(RunStatus::parse(s).ok_or_else(|| {
            ApiError::bad_request(format!(
                "unknown status {s:?}: use queued, running, succeeded, failed or cancelled"
            ))
        })?),
    };
    let cursor = match q.cursor.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(c) => Some(uuid::Uuid::parse_str(c).map_err(|_| {
            ApiError::bad_request("invalid cursor: pass next_cursor from the previous page")
        })?),
    };
    let pipeline = q.pipeline.as_deref().filter(|s| !s.is_empty());
    Ok(Json(
        state
            .store
            .list_runs(pipeline, status, q.limit.unwrap_or(50), cursor)
            .await?,
    ))
}

/// `GET /runs/{id}`: the run with its jobs and steps.
#[utoipa::path(
    get,
    path = "/api/v1/runs/{id}",
    tag = "runs",
    operation_id = "get_run",
    summary = "A run with its jobs and steps (read)",
    params(("id" = String, Path, description = "The run's id (UUID)")),
    security(("api_token" = [])),
    responses(
        (status = 200, description = "The run", body = Run),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The token's scope is too small", body = ErrorBody),
        (status = 404, description = "No such object", body = ErrorBody),
    )
)]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Run>> {
    caller.require(Scope::Read)?;
    Ok(Json(state.store.get_run(parse_id(&id, "run")?).await?))
}

/// `POST /runs/{id}/cancel`.
#[utoipa::path(
    post,
    path = "/api/v1/runs/{id}/cancel",
    tag = "runs",
    operation_id = "cancel_run",
    summary = "Cancel a run (trigger)",
    params(("id" = String, Path, description = "The run's id (UUID)")),
    security(("api_token" = [])),
    responses(
        (status = 200, description = "The run, cancelling", body = Run),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The token's scope is too small", body = ErrorBody),
        (status = 404, description = "No such object", body = ErrorBody),
        (status = 409, description = "Conflict with the object's state", body = ErrorBody),
    )
)]
pub async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Run>> {
    caller.require(Scope::Trigger)?;
    let id = parse_id(&id, "run")?;
    let run = state.store.cancel_run(id).await?;
    tracing::info!(run.id = %id, actor = %caller.0.name, "run cancel requested");
    Ok(Json(run))
}

/// `GET /jobs/{id}`.
#[utoipa::path(
    get,
    path = "/api/v1/jobs/{id}",
    tag = "runs",
    operation_id = "get_job",
    summary = "A job with its steps (read)",
    params(("id" = String, Path, description = "The job's id (UUID)")),
    security(("api_token" = [])),
    responses(
        (status = 200, description = "The job", body = Job),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The token's scope is too small", body = ErrorBody),
        (status = 404, description = "No such object", body = ErrorBody),
    )
)]
pub async fn get_job(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Job>> {
    caller.require(Scope::Read)?;
    Ok(Json(state.store.get_job(parse_id(&id, "job")?).await?))
}

/// `POST /jobs/{id}/cancel`.
#[utoipa::path(
    post,
    path = "/api/v1/jobs/{id}/cancel",
    tag = "runs",
    operation_id = "cancel_job",
    summary = "Cancel a job (trigger)",
    params(("id" = String, Path, description = "The job's id (UUID)")),
    security(("api_token" = [])),
    responses(
        (status = 200, description = "The job, cancelling", body = Job),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The token's scope is too small", body = ErrorBody),
        (status = 404, description = "No such object", body = ErrorBody),
        (status = 409, description = "Conflict with the object's state", body = ErrorBody),
    )
)]
pub async fn cancel_job(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Job>> {
    caller.require(Scope::Trigger)?;
    let id = parse_id(&id, "job")?;
    let job = state.store.cancel_job(id).await?;
    tracing::info!(job.id = %id, actor = %caller.0.name, "job cancel requested");
    Ok(Json(job))
}
