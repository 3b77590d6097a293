//! `/hooks/*`: forge webhooks (the signature is the credential), and
//! `/api/v1/webhook-deliveries` (admin): what was received and what came of it.

use axum::Json;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use tracing::Instrument as _;

use super::extract::Caller;
use super::{ApiError, ApiResult, AppState};
use crate::hooks::{self, BodyError, HookReply, Inbound, ReplyBody, Source};
use crate::store::{Scope, WebhookDeliveryList};
use outpost_protocol::ErrorBody;

/// `POST /hooks/github`.
#[utoipa::path(
    post,
    path = "/hooks/github",
    tag = "webhooks",
    operation_id = "github_webhook",
    summary = "A GitHub delivery, signed with `X-Hub-Signature-256`",
    request_body(content = serde_json::Value, content_type = "application/json", description = "The forge's event payload"),
    responses(
        (status = 200, description = "Accepted: runs started, or a redelivery", body = HookReply),
        (status = 202, description = "Handled without starting anything, and why", body = HookReply),
        (status = 400, description = "The request is malformed", body = ErrorBody),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 404, description = "No such object", body = ErrorBody),
        (status = 413, description = "The body is larger than the server accepts", body = ErrorBody),
    )
)]
pub async fn github(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    receive(state, Source::Github, None, headers, body).await
}

/// `POST /hooks/gitlab`.
#[utoipa::path(
    post,
    path = "/hooks/gitlab",
    tag = "webhooks",
    operation_id = "gitlab_webhook",
    summary = "A GitLab delivery, authenticated by `X-Gitlab-Token`",
    request_body(content = serde_json::Value, content_type = "application/json", description = "The forge's event payload"),
    responses(
        (status = 200, description = "Accepted: runs started, or a redelivery", body = HookReply),
        (status = 202, description = "Handled without starting anything, and why", body = HookReply),
        (status = 400, description = "The request is malformed", body = ErrorBody),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 404, description = "No such object", body = ErrorBody),
        (status = 413, description = "The body is larger than the server accepts", body = ErrorBody),
    )
)]
pub async fn gitlab(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    receive(state, Source::Gitlab, None, headers, body).await
}

/// `POST /hooks/azure-devops`.
#[utoipa::path(
    post,
    path = "/hooks/azure-devops",
    tag = "webhooks",
    operation_id = "azure_devops_webhook",
    summary = "An Azure DevOps service hook, authenticated by basic auth or a header secret",
    request_body(content = serde_json::Value, content_type = "application/json", description = "The forge's event payload"),
    responses(
        (status = 200, description = "Accepted: runs started, or a redelivery", body = HookReply),
        (status = 202, description = "Handled without starting anything, and why", body = HookReply),
        (status = 400, description = "The request is malformed", body = ErrorBody),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 404, description = "No such object", body = ErrorBody),
        (status = 413, description = "The body is larger than the server accepts", body = ErrorBody),
    )
)]
pub async fn azure_devops(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    receive(state, Source::AzureDevops, None, headers, body).await
}

/// `POST /hooks/generic/{pipeline}`.
#[utoipa::path(
    post,
    path = "/hooks/generic/{pipeline}",
    tag = "webhooks",
    operation_id = "generic_webhook",
    summary = "A generic delivery for one pipeline, signed with `X-Outpost-Signature`",
    params(("pipeline" = String, Path, description = "The pipeline to trigger")),
    request_body(content = serde_json::Value, content_type = "application/json", description = "The forge's event payload"),
    responses(
        (status = 200, description = "Accepted: runs started, or a redelivery", body = HookReply),
        (status = 202, description = "Handled without starting anything, and why", body = HookReply),
        (status = 400, description = "The request is malformed", body = ErrorBody),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 404, description = "No such object", body = ErrorBody),
        (status = 413, description = "The body is larger than the server accepts", body = ErrorBody),
    )
)]
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
    // Handled in a task of its own, so that a sender hanging up (GitHub waits 10 s) cannot stop it
    // between starting runs and recording them: the delivery would stay `processing` and its
    // redelivery would be turned away until it is stale.
    let handling = tokio::spawn(
        async move { hooks::receive(&state.store, &state.settings.webhooks, inbound).await }
            .in_current_span(),
    );
    let reply = match handling.await {
        Ok(reply) => reply,
        Err(e) => {
            return ApiError::internal(format!("handling a webhook delivery failed: {e}"))
                .into_response();
        }
    };
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
#[utoipa::path(
    get,
    path = "/api/v1/webhook-deliveries",
    tag = "admin",
    operation_id = "list_webhook_deliveries",
    summary = "Recorded webhook deliveries, newest first (admin)",
    params(("source" = Option<String>, Query, description = "github, gitlab, azure_devops or generic"), ("limit" = Option<u32>, Query, description = "Page size"), ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page")),
    security(("api_token" = [])),
    responses(
        (status = 200, description = "A page of deliveries", body = WebhookDeliveryList),
        (status = 400, description = "The request is malformed", body = ErrorBody),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The token's scope is too small", body = ErrorBody),
    )
)]
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
