//! `/api/v1/secrets`: list, set and delete secrets (admin). No answer ever contains a value.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, Uri};
use axum::response::IntoResponse;
use serde::Deserialize;

use super::extract::{Body, Caller};
use super::{ApiError, ApiResult, AppState};
use crate::store::{Scope, SecretList};

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
pub async fn list(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<SecretList>> {
    caller.require(Scope::Admin)?;
    Ok(Json(SecretList {
        secrets: state.store.list_secrets().await?,
    }))
}

/// `PUT /secrets/{name}?pipeline=P` with the raw value as the body: `201` when new, `200` when
/// replaced; the answer describes the secret without its value.
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
