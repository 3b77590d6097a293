//! `/api/v1/pipelines`: apply, list, show, delete.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use outpost_protocol::{ErrorBody, Pipeline, PipelineList};

use super::extract::{Body, Caller};
use super::{ApiError, ApiResult, AppState};
use crate::pipeline;
use crate::store::Scope;

/// `PUT /pipelines/{name}`: create or replace from YAML; `201` when new, `200` when replaced.
#[utoipa::path(
    put,
    path = "/api/v1/pipelines/{name}",
    tag = "pipelines",
    operation_id = "apply_pipeline",
    summary = "Create or replace a pipeline from YAML (admin)",
    params(("name" = String, Path, description = "The pipeline's name")),
    request_body(content = String, content_type = "application/yaml", description = "The pipeline YAML"),
    security(("api_token" = [])),
    responses(
        (status = 200, description = "Replaced", body = Pipeline),
        (status = 201, description = "Created", body = Pipeline),
        (status = 400, description = "The request is malformed", body = ErrorBody),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The token's scope is too small", body = ErrorBody),
        (status = 413, description = "The body is larger than the server accepts", body = ErrorBody),
    )
)]
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
#[utoipa::path(
    get,
    path = "/api/v1/pipelines",
    tag = "pipelines",
    operation_id = "list_pipelines",
    summary = "Every pipeline (read)",
    security(("api_token" = [])),
    responses(
        (status = 200, description = "The pipelines", body = PipelineList),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The token's scope is too small", body = ErrorBody),
    )
)]
pub async fn list(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<PipelineList>> {
    caller.require(Scope::Read)?;
    Ok(Json(PipelineList {
        pipelines: state.store.list_pipelines().await?,
    }))
}

/// `GET /pipelines/{name}`.
#[utoipa::path(
    get,
    path = "/api/v1/pipelines/{name}",
    tag = "pipelines",
    operation_id = "get_pipeline",
    summary = "One pipeline (read)",
    params(("name" = String, Path, description = "The pipeline's name")),
    security(("api_token" = [])),
    responses(
        (status = 200, description = "The pipeline", body = Pipeline),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The token's scope is too small", body = ErrorBody),
        (status = 404, description = "No such object", body = ErrorBody),
    )
)]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<Pipeline>> {
    caller.require(Scope::Read)?;
    Ok(Json(state.store.get_pipeline(&name).await?.0))
}

/// `DELETE /pipelines/{name}`: the pipeline goes, its runs stay as history.
#[utoipa::path(
    delete,
    path = "/api/v1/pipelines/{name}",
    tag = "pipelines",
    operation_id = "delete_pipeline",
    summary = "Delete a pipeline; its runs stay (admin)",
    params(("name" = String, Path, description = "The pipeline's name")),
    security(("api_token" = [])),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The token's scope is too small", body = ErrorBody),
        (status = 404, description = "No such object", body = ErrorBody),
    )
)]
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
