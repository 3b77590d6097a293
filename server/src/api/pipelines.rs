//! `/api/v1/pipelines`: apply, list, show, delete.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use outpost_protocol::{Pipeline, PipelineList};

use super::extract::{Body, Caller};
use super::{ApiError, ApiResult, AppState};
use crate::pipeline;
use crate::store::Scope;

/// `PUT /pipelines/{name}`: create or replace from YAML; `201` when new, `200` when replaced.
#[tracing::instrument(skip_all, fields(pipeline = %name), err(Debug))]
pub async fn apply(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    body: Body,
) -> ApiResult<impl IntoResponse> {
    caller.require(Scope::Admin)?;
    pipeline::validate_name(&name)
        .map_err(|m| ApiError::bad_request(format!("invalid pipeline name {name:?}: {m}")))?;
    let yaml = std::str::from_utf8(&body.0)
        .map_err(|_| ApiError::bad_request("the pipeline must be UTF-8 text"))?;
    let def = pipeline::parse(yaml)?;
    let (pipeline, created) = state.store.put_pipeline(&name, yaml, &def).await?;
    tracing::info!(actor = %caller.0.name, created, "pipeline applied");
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(pipeline)))
}

/// `GET /pipelines`.
pub async fn list(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<PipelineList>> {
    caller.require(Scope::Read)?;
    Ok(Json(PipelineList {
        pipelines: state.store.list_pipelines().await?,
    }))
}

/// `GET /pipelines/{name}`.
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<Pipeline>> {
    caller.require(Scope::Read)?;
    Ok(Json(state.store.get_pipeline(&name).await?.0))
}

/// `DELETE /pipelines/{name}`: the pipeline goes, its runs stay as history.
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require(Scope::Admin)?;
    state.store.delete_pipeline(&name).await?;
    tracing::info!(actor = %caller.0.name, pipeline = %name, "pipeline deleted");
    Ok(StatusCode::NO_CONTENT)
}
