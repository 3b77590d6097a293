//! `/api/v1/runs` and `/api/v1/jobs`: trigger, list, show, cancel.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, Uri};
use axum::response::IntoResponse;
use outpost_protocol::{Job, Run, RunList, RunStatus, TriggerInfo, TriggerKind, TriggerRunRequest};
use serde::Deserialize;

use super::extract::{Body, Caller, parse_id};
use super::{ApiError, ApiResult, AppState};
use crate::store::{NewRun, Scope};

/// Whether `name` can be an environment variable.
pub fn valid_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `POST /pipelines/{name}/runs`: `201` with the run.
#[tracing::instrument(skip_all, fields(pipeline = %name), err(Debug))]
pub async fn trigger(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    body: Body,
) -> ApiResult<impl IntoResponse> {
    caller.require(Scope::Trigger)?;
    let req: TriggerRunRequest = body.json(true)?;
    if let Some(bad) = req.variables.keys().find(|k| !valid_variable_name(k)) {
        return Err(ApiError::bad_request(format!(
            "variable name {bad:?} is not valid: use letters, digits and underscores, not starting with a digit"
        )));
    }
    let (_, def) = state.store.get_pipeline(&name).await?;
    let run = state
        .store
        .create_run(
            NewRun {
                pipeline: name,
                trigger: TriggerInfo {
                    kind: TriggerKind::Api,
                    source: Some("api".into()),
                    actor: Some(caller.0.name.clone()),
                    git_ref: req.git_ref,
                    sha: req.sha,
                    repo: req.repo,
                    clone_url: req.clone_url.or_else(|| def.repository.clone()),
                    ..Default::default()
                },
                variables: req.variables,
            },
            &def,
        )
        .await?;
    tracing::info!(run.id = %run.id, number = run.number, actor = %caller.0.name, "run queued");
    Ok((StatusCode::CREATED, Json(run)))
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
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Run>> {
    caller.require(Scope::Read)?;
    Ok(Json(state.store.get_run(parse_id(&id, "run")?).await?))
}

/// `POST /runs/{id}/cancel`.
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
pub async fn get_job(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Job>> {
    caller.require(Scope::Read)?;
    Ok(Json(state.store.get_job(parse_id(&id, "job")?).await?))
}

/// `POST /jobs/{id}/cancel`.
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
