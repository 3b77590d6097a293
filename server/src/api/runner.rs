//! The runner protocol: register, acquire (long poll), and the lease-fenced per-job calls.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use outpost_protocol::{
    AcquireRequest, AcquireResponse, CompleteRequest, EntraRegistrationInfo, ErrorBody,
    HeartbeatResponse, LogAppendResponse, RegisterRequest, RegisterResponse, RegistrationInfo,
    RunnerIdentity, RunnerList, StepUpdate,
};
use serde::Deserialize;

use super::extract::{Body, Caller, LeaseToken, RunnerCaller, bearer, parse_id};
use super::{ApiError, ApiResult, AppState};
use crate::queue;
use crate::store::Scope;

/// `GET /runners`.
#[utoipa::path(
    get,
    path = "/api/v1/runners",
    tag = "runners",
    operation_id = "list_runners",
    summary = "Registered runners (read)",
    security(("api_token" = [])),
    responses(
        (status = 200, description = "The runners", body = RunnerList),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The token's scope is too small", body = ErrorBody),
    )
)]
pub async fn list(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<RunnerList>> {
    caller.require(Scope::Read)?;
    Ok(Json(RunnerList {
        runners: state.store.list_runners().await?,
    }))
}

/// `GET /runner/registration-info`: whether Entra ID registration is on, and which audience and
/// scope a runner's token must be for. No authentication: a runner asks before it has any
/// credential, and nothing here is secret.
#[utoipa::path(
    get,
    path = "/api/v1/runner/registration-info",
    tag = "runners",
    operation_id = "registration_info",
    summary = "How a runner may register: whether Entra ID tokens are accepted, for which audience",
    responses(
        (status = 200, description = "Registration options", body = RegistrationInfo),
    )
)]
pub async fn registration_info(State(state): State<AppState>) -> Json<RegistrationInfo> {
    Json(RegistrationInfo {
        entra: state.entra.as_ref().map(|v| EntraRegistrationInfo {
            tenant_id: v.tenant_id().to_string(),
            audience: v.audience().to_string(),
            scope: format!("{}/.default", v.audience().trim_end_matches('/')),
        }),
    })
}

/// `POST /runner/register` with a registration token, or with an Entra ID access token (a bearer
/// that is a JWT) when `[entra]` is configured.
#[utoipa::path(
    post,
    path = "/api/v1/runner/register",
    tag = "runners",
    operation_id = "register_runner",
    summary = "Register a runner with a registration token or an Entra ID token",
    request_body(content = RegisterRequest),
    security(("registration_token" = [])),
    responses(
        (status = 201, description = "The runner's id and token", body = RegisterResponse),
        (status = 400, description = "The request is malformed", body = ErrorBody),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 413, description = "The body is larger than the server accepts", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all, err(Debug))]
pub async fn register(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<RegisterResponse>)> {
    let token = bearer(&headers)?;
    let (pool, principal) = if crate::entra::looks_like_jwt(token) {
        let principal = entra_principal(&state, token).await?;
        (principal.pool.clone(), Some(principal))
    } else {
        let pool = state.store.authenticate_registration(token).await?.ok_or_else(|| {
            ApiError::unauthenticated(
                "not a valid registration token: create one with `outpost-server registration-token create --pool NAME`",
            )
        })?;
        (pool, None)
    };
    let req: RegisterRequest = body.json_required()?;
    if req.name.trim().is_empty() || req.name.len() > 200 {
        return Err(ApiError::bad_request(
            "a runner needs a name of 1 to 200 characters",
        ));
    }
    if let Some(bad) = req
        .labels
        .iter()
        .find(|l| l.is_empty() || l.len() > 100 || l.chars().any(|c| c.is_whitespace() || c == ','))
    {
        return Err(ApiError::bad_request(format!(
            "label {bad:?} is not valid: labels are 1 to 100 characters without spaces or commas"
        )));
    }
    if let Some(bad) = req.clusters.iter().find(|c| {
        c.is_empty()
            || c.len() > 63
            || !c
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.'))
    }) {
        return Err(ApiError::bad_request(format!(
            "cluster name {bad:?} is not valid: 1 to 63 letters, digits, `-`, `_` or `.`"
        )));
    }
    let resp = state.store.register_runner(&pool, &req).await?;
    match &principal {
        Some(p) => tracing::info!(
            runner.id = %resp.runner_id, name = %req.name, pool = %pool, labels = ?req.labels,
            clusters = ?req.clusters, entra.object_id = %p.object_id, entra.client_id = ?p.client_id,
            "runner registered with an Entra ID token"
        ),
        None => {
            tracing::info!(runner.id = %resp.runner_id, name = %req.name, pool = %pool, labels = ?req.labels, clusters = ?req.clusters, "runner registered")
        }
    }
    Ok((StatusCode::CREATED, Json(resp)))
}

/// `GET /runner/me`: who a runner token belongs to, for `outpost-runner doctor`.
#[utoipa::path(
    get,
    path = "/api/v1/runner/me",
    tag = "runners",
    operation_id = "runner_me",
    summary = "Who a runner token belongs to",
    security(("runner_token" = [])),
    responses(
        (status = 200, description = "The runner", body = RunnerIdentity),
        (status = 401, description = "No valid credential", body = ErrorBody),
    )
)]
pub async fn me(runner: RunnerCaller) -> Json<RunnerIdentity> {
    Json(RunnerIdentity {
        runner_id: runner.0.id,
        name: runner.0.name,
        labels: runner.0.labels,
    })
}

/// The principal behind an Entra ID token, or the `401` that says which check failed.
async fn entra_principal(state: &AppState, token: &str) -> ApiResult<crate::entra::EntraPrincipal> {
    let Some(verifier) = &state.entra else {
        return Err(ApiError::unauthenticated(
            "this server does not accept Entra ID tokens (no [entra] section in its configuration): register with a registration token",
        ));
    };
    verifier.verify(token).await.map_err(|e| {
        if e.is_unavailable() {
            // The server's fault, not the token's: the cause is logged, the runner may retry.
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "entra_unavailable",
                e.to_string(),
            )
        } else {
            tracing::warn!(reason = %e, "refused an Entra ID registration");
            ApiError::unauthenticated(format!("Entra ID token refused: {e}"))
        }
    })
}

/// `POST /runner/acquire`: holds the request until a matching job is queued or the wait ends.
#[utoipa::path(
    post,
    path = "/api/v1/runner/acquire",
    tag = "runners",
    operation_id = "acquire_job",
    summary = "Long poll for a job",
    request_body(content = AcquireRequest, description = "Optional; `{}` is valid"),
    security(("runner_token" = [])),
    responses(
        (status = 200, description = "A job and its lease", body = AcquireResponse),
        (status = 204, description = "No job within the wait"),
        (status = 400, description = "The request is malformed", body = ErrorBody),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 413, description = "The body is larger than the server accepts", body = ErrorBody),
    )
)]
// No `tracing::instrument` here, unlike the other handlers: a span lives as long as the long poll,
// and its formatted fields cost every waiting runner about 1 KiB. The runner's id goes into the
// events instead.
pub async fn acquire(
    State(state): State<AppState>,
    runner: RunnerCaller,
    body: Body,
) -> ApiResult<Response> {
    let result = acquire_job(&state, &runner.0, body).await;
    if let Err(e) = &result {
        tracing::error!(runner.id = %runner.0.id, error = ?e, "acquire failed");
    }
    result
}

async fn acquire_job(
    state: &AppState,
    runner: &crate::store::runners::RunnerPrincipal,
    body: Body,
) -> ApiResult<Response> {
    let req: AcquireRequest = body.json(true)?;
    let max = state.settings.queue.acquire_wait_secs;
    let wait = Duration::from_secs(req.wait_secs.unwrap_or(max).min(max));
    match queue::acquire(state, runner, wait).await? {
        Some(claimed) => {
            tracing::info!(runner.id = %runner.id, job.id = %claimed.job.id, run.id = %claimed.job.run_id, "job assigned");
            Ok(Json(AcquireResponse {
                job: claimed.job,
                lease: claimed.lease,
            })
            .into_response())
        }
        None => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

/// `POST /runner/jobs/{id}/heartbeat`.
#[utoipa::path(
    post,
    path = "/api/v1/runner/jobs/{id}/heartbeat",
    tag = "runners",
    operation_id = "heartbeat",
    summary = "Renew the lease",
    params(("id" = String, Path, description = "The job's id (UUID)")),
    security(("lease_token" = [])),
    responses(
        (status = 200, description = "The new expiry and whether cancellation was asked for", body = HeartbeatResponse),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 404, description = "No such object", body = ErrorBody),
        (status = 409, description = "The lease is not this job's current lease: stop working on the job", body = ErrorBody),
    )
)]
pub async fn heartbeat(
    State(state): State<AppState>,
    Path(id): Path<String>,
    lease: LeaseToken,
) -> ApiResult<Json<HeartbeatResponse>> {
    let id = parse_id(&id, "job")?;
    Ok(Json(
        state
            .store
            .heartbeat(id, &lease.0, state.settings.queue.lease_secs)
            .await?,
    ))
}

#[derive(Debug, Deserialize)]
struct OffsetQuery {
    offset: u64,
}

/// `PUT /runner/jobs/{id}/log?offset=N`: raw bytes; idempotent; `416` on a gap.
#[utoipa::path(
    put,
    path = "/api/v1/runner/jobs/{id}/log",
    tag = "runners",
    operation_id = "append_log",
    summary = "Append log bytes at an offset; idempotent",
    params(("id" = String, Path, description = "The job's id (UUID)"), ("offset" = u64, Query, description = "The byte offset of the body's first byte")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "Raw log bytes"),
    security(("lease_token" = [])),
    responses(
        (status = 200, description = "Where the next append starts", body = LogAppendResponse),
        (status = 400, description = "The request is malformed", body = ErrorBody),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 404, description = "No such object", body = ErrorBody),
        (status = 409, description = "The lease is not this job's current lease: stop working on the job", body = ErrorBody),
        (status = 413, description = "The body is larger than the server accepts", body = ErrorBody),
        (status = 416, description = "A gap: resend from `next_offset`", body = ErrorBody),
    )
)]
pub async fn append_log(
    State(state): State<AppState>,
    Path(id): Path<String>,
    uri: Uri,
    lease: LeaseToken,
    body: Body,
) -> ApiResult<Json<LogAppendResponse>> {
    let id = parse_id(&id, "job")?;
    let axum::extract::Query(q) = axum::extract::Query::<OffsetQuery>::try_from_uri(&uri)
        .map_err(|_| ApiError::bad_request("the log append needs ?offset=N (a byte offset)"))?;
    let next_offset = state
        .store
        .append_log(id, &lease.0, q.offset, &body.0)
        .await?;
    Ok(Json(LogAppendResponse { next_offset }))
}

/// `POST /runner/jobs/{id}/steps/{index}`.
#[utoipa::path(
    post,
    path = "/api/v1/runner/jobs/{id}/steps/{index}",
    tag = "runners",
    operation_id = "update_step",
    summary = "Report a step's status",
    params(("id" = String, Path, description = "The job's id (UUID)"), ("index" = u32, Path, description = "The step's zero-based index")),
    request_body(content = StepUpdate),
    security(("lease_token" = [])),
    responses(
        (status = 204, description = "Recorded"),
        (status = 400, description = "The request is malformed", body = ErrorBody),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 404, description = "No such object", body = ErrorBody),
        (status = 409, description = "The lease is not this job's current lease: stop working on the job", body = ErrorBody),
        (status = 413, description = "The body is larger than the server accepts", body = ErrorBody),
    )
)]
pub async fn update_step(
    State(state): State<AppState>,
    Path((id, index)): Path<(String, String)>,
    lease: LeaseToken,
    body: Body,
) -> ApiResult<StatusCode> {
    let id = parse_id(&id, "job")?;
    let index: u32 = index
        .parse()
        .map_err(|_| ApiError::bad_request(format!("{index} is not a step index")))?;
    let update: StepUpdate = body.json_required()?;
    state
        .store
        .update_step(id, &lease.0, index, &update)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /runner/jobs/{id}/complete`.
#[utoipa::path(
    post,
    path = "/api/v1/runner/jobs/{id}/complete",
    tag = "runners",
    operation_id = "complete_job",
    summary = "Finish the job",
    params(("id" = String, Path, description = "The job's id (UUID)")),
    request_body(content = CompleteRequest),
    security(("lease_token" = [])),
    responses(
        (status = 204, description = "Recorded"),
        (status = 400, description = "The request is malformed", body = ErrorBody),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 404, description = "No such object", body = ErrorBody),
        (status = 409, description = "The lease is not this job's current lease: stop working on the job", body = ErrorBody),
        (status = 413, description = "The body is larger than the server accepts", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all, fields(job.id = %id), err(Debug))]
pub async fn complete(
    State(state): State<AppState>,
    Path(id): Path<String>,
    lease: LeaseToken,
    body: Body,
) -> ApiResult<StatusCode> {
    let id = parse_id(&id, "job")?;
    let req: CompleteRequest = body.json_required()?;
    let outcome = state.store.complete_job(id, &lease.0, &req).await?;
    tracing::info!(run.id = %outcome.run_id, status = req.status.as_str(), exit_code = ?req.exit_code, "job completed");
    Ok(StatusCode::NO_CONTENT)
}
