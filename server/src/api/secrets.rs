//! `/api/v1/secrets`: list, set and delete secrets (admin). No answer ever contains a value.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, Uri};
use axum::response::IntoResponse;
use serde::Deserialize;

use super::extract::{Body, Caller};
use super::{ApiError, ApiResult, AppState};
use crate::store::{Scope, SecretInfo, SecretList};
use outpost_protocol::ErrorBody;

/// `?pipeline=P`: the secret's scope; global when absent or empty.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScopeQuery {
    pipeline: Option<String>,
}

fn scope_query(uri: &Uri) -> Result<Option<String>, ApiError> {
    let Query(q) = Query::<ScopeQuery>::try_from_uri(uri).map_err(|e| {
        ApiError::bad_request(format!(
            "invalid query: {} (the only parameter is `pipeline`)",
            e.body_text()
        ))
    })?;
    Ok(q.pipeline.filter(|p| !p.is_empty()))
}

/// `GET /secrets`: names, scopes and timestamps, never values.
#[utoipa::path(
    get,
    path = "/api/v1/secrets",
    tag = "admin",
    operation_id = "list_secrets",
    summary = "Secrets without their values (admin)",
    security(("api_token" = [])),
    responses(
        (status = 200, description = "The secrets", body = SecretList),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The token's scope is too small", body = ErrorBody),
    )
)]
pub async fn list(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<SecretList>> {
    caller.require(Scope::Admin)?;
    Ok(Json(SecretList {
        secrets: state.store.list_secrets().await?,
    }))
}

/// `PUT /secrets/{name}?pipeline=P` with the raw value as the body: `201` when new, `200` when
/// replaced; the answer describes the secret without its value.
#[utoipa::path(
    put,
    path = "/api/v1/secrets/{name}",
    tag = "admin",
    operation_id = "put_secret",
    summary = "Set a secret; the body is its value (admin)",
    params(("name" = String, Path, description = "The secret's name"), ("pipeline" = Option<String>, Query, description = "The pipeline the secret is for; global when absent")),
    request_body(content = String, content_type = "text/plain", description = "The secret value"),
    security(("api_token" = [])),
    responses(
        (status = 200, description = "Replaced", body = SecretInfo),
        (status = 201, description = "Created", body = SecretInfo),
        (status = 400, description = "The request is malformed", body = ErrorBody),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The token's scope is too small", body = ErrorBody),
        (status = 404, description = "No such object", body = ErrorBody),
        (status = 413, description = "The body is larger than the server accepts", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all, fields(secret = %name), err(Debug))]
pub async fn put(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    uri: Uri,
    body: Body,
) -> ApiResult<impl IntoResponse> {
    caller.require(Scope::Admin)?;
    let pipeline = scope_query(&uri)?;
    let value = std::str::from_utf8(&body.0)
        .map_err(|_| ApiError::bad_request("a secret value must be UTF-8 text"))?;
    let (info, created) = state
        .store
        .put_secret(&name, pipeline.as_deref(), value, &caller.0.name)
        .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(info)))
}

/// `DELETE /secrets/{name}?pipeline=P`: `204`.
#[utoipa::path(
    delete,
    path = "/api/v1/secrets/{name}",
    tag = "admin",
    operation_id = "delete_secret",
    summary = "Delete a secret (admin)",
    params(("name" = String, Path, description = "The secret's name"), ("pipeline" = Option<String>, Query, description = "The pipeline the secret is for; global when absent")),
    security(("api_token" = [])),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "The request is malformed", body = ErrorBody),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The token's scope is too small", body = ErrorBody),
        (status = 404, description = "No such object", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all, fields(secret = %name), err(Debug))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    uri: Uri,
) -> ApiResult<StatusCode> {
    caller.require(Scope::Admin)?;
    let pipeline = scope_query(&uri)?;
    state
        .store
        .delete_secret(&name, pipeline.as_deref(), &caller.0.name)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
