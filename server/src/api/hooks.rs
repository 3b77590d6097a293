//! `/hooks/*`: forge webhooks (the signature is the credential), and
//! `/api/v1/webhook-deliveries` (admin): what was received and what came of it.

use axum::Json;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;

use super::extract::Caller;
use super::{ApiError, ApiResult, AppState};
use crate::hooks::{self, BodyError, Inbound, ReplyBody, Source};
use crate::store::{Scope, WebhookDeliveryList};

/// `POST /hooks/github`.
pub async fn github(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    receive(state, Source::Github, None, headers, body).await
}

/// `POST /hooks/gitlab`.
pub async fn gitlab(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    receive(state, Source::Gitlab, None, headers, body).await
}

/// `POST /hooks/azure-devops`.
pub async fn azure_devops(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    receive(state, Source::AzureDevops, None, headers, body).await
}

/// `POST /hooks/generic/{pipeline}`.
pub async fn generic(
    State(state): State<AppState>,
    Path(pipeline): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    receive(state, Source::Generic, Some(pipeline), headers, body).await
}

async fn receive(
    state: AppState,
    source: Source,
    pipeline: Option<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            BodyError::TooLarge
        } else {
            BodyError::Unreadable(e.body_text())
        }
    });
    let inbound = Inbound {
        source,
        pipeline,
        headers,
        body,
    };
    let reply = hooks::receive(&state.store, &state.settings.webhooks, inbound).await;
    match reply.body {
        ReplyBody::Done(done) => (reply.status, Json(done)).into_response(),
        // The cause of a 5xx is logged by the middleware and never shown.
        ReplyBody::Error { message, .. } if reply.status.is_server_error() => {
            ApiError::internal(message).into_response()
        }
        ReplyBody::Error { code, message } => {
            ApiError::new(reply.status, code, message).into_response()
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeliveriesQuery {
    source: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

/// `GET /api/v1/webhook-deliveries?source=&limit=&cursor=` (admin): newest first.
pub async fn list_deliveries(
    State(state): State<AppState>,
    caller: Caller,
    uri: Uri,
) -> ApiResult<Json<WebhookDeliveryList>> {
    caller.require(Scope::Admin)?;
    let Query(q) = Query::<DeliveriesQuery>::try_from_uri(&uri).map_err(|e| {
        ApiError::bad_request(format!(
            "invalid query: {} (the parameters are `source`, `limit` and `cursor`)",
            e.body_text()
        ))
    })?;
    let source = match q.source.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => {
            let normal = s.replace('-', "_");
            if !["github", "gitlab", "azure_devops", "generic"].contains(&normal.as_str()) {
                return Err(ApiError::bad_request(format!(
                    "unknown source {s:?}: use github, gitlab, azure_devops or generic"
                )));
            }
            Some(normal)
        }
    };
    let cursor = match q.cursor.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(c) => Some(uuid::Uuid::parse_str(c).map_err(|_| {
            ApiError::bad_request("invalid cursor: pass next_cursor from the previous page")
        })?),
    };
    Ok(Json(
        state
            .store
            .list_deliveries(source.as_deref(), q.limit.unwrap_or(50), cursor)
            .await?,
    ))
}
