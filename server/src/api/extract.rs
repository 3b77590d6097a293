//! Extractors: bearer-token callers, bodies and ids, each failing with an `ApiError`.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use super::AppState;
use super::error::ApiError;
use crate::store::runners::RunnerPrincipal;
use crate::store::{ApiPrincipal, KnownToken, Scope};

/// The bearer token of a request, if any.
pub fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    let value = headers.get(AUTHORIZATION).ok_or_else(|| {
        ApiError::unauthenticated(
            "missing Authorization header: send `Authorization: Bearer <token>`",
        )
    })?;
    let value = value
        .to_str()
        .map_err(|_| ApiError::unauthenticated("the Authorization header is not valid text"))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ApiError::unauthenticated("the Authorization header must be `Bearer <token>`")
        })?;
    Ok(token)
}

/// A caller with a valid API token.
#[derive(Debug, Clone)]
pub struct Caller(pub ApiPrincipal);

impl Caller {
    /// Fails with `403` unless the token has at least `scope`.
    pub fn require(&self, scope: Scope) -> Result<(), ApiError> {
        if self.0.scope >= scope {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "this needs a token with the `{}` scope; yours has `{}`",
                scope.as_str(),
                self.0.scope.as_str()
            )))
        }
    }
}

impl Caller {
    /// The caller behind an API token, checked against the database.
    pub async fn authenticate(state: &AppState, token: &str) -> Result<Self, ApiError> {
        match state.store.authenticate_api(token).await? {
            Some(p) => Ok(Caller(p)),
            None => Err(ApiError::unauthenticated(
                "the token is not valid: it is unknown, revoked or expired",
            )),
        }
    }
}

/// The API token of a request: its bearer token, or a browser's session cookie.
fn api_token(parts: &Parts, state: &AppState) -> Result<String, ApiError> {
    // A browser signed in to the web UI sends its session cookie instead of a bearer token.
    if !parts.headers.contains_key(AUTHORIZATION)
        && let Some(token) = crate::web::cookie_token(parts, state).transpose()?
    {
        return Ok(token);
    }
    bearer(&parts.headers).map(str::to_string)
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        Caller::authenticate(state, &api_token(parts, state)?).await
    }
}

/// The caller of a trigger: checked like a [`Caller`], unless this replica has seen its token
/// valid before. Then the check is left to the statement that creates the run
/// ([`crate::store::Store::trigger_run_as`]), one round trip fewer on the way to a deployment;
/// nothing may be answered on its strength but a run created that way.
#[derive(Debug)]
pub enum TriggerCaller {
    /// Checked against the database.
    Checked(Caller),
    /// Seen valid before, not checked for this request.
    Known {
        /// The token, to check it after all.
        token: String,
        /// What is known about it.
        known: KnownToken,
    },
}

impl FromRequestParts<AppState> for TriggerCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = api_token(parts, state)?;
        match state.store.known_api_token(&token) {
            Some(known) => Ok(TriggerCaller::Known { token, known }),
            None => Caller::authenticate(state, &token)
                .await
                .map(TriggerCaller::Checked),
        }
    }
}

/// A registered runner, by its runner token.
#[derive(Debug, Clone)]
pub struct RunnerCaller(pub RunnerPrincipal);

impl FromRequestParts<AppState> for RunnerCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(&parts.headers)?;
        match state.store.authenticate_runner(token).await? {
            Some(r) => Ok(RunnerCaller(r)),
            None => Err(ApiError::unauthenticated(
                "not a valid runner token: register the runner again with `outpost-runner register`",
            )),
        }
    }
}

/// The lease token presented for a per-job call; the store checks it against the job.
#[derive(Debug, Clone)]
pub struct LeaseToken(pub String);

impl<S: Send + Sync> FromRequestParts<S> for LeaseToken {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        Ok(LeaseToken(bearer(&parts.headers)?.to_string()))
    }
}

/// The raw body, with the size limit answered as a JSON `413`.
#[derive(Debug)]
pub struct Body(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        Bytes::from_request(req, state).await.map(Body).map_err(|e| {
            let status = e.status();
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    status,
                    "payload_too_large",
                    "the request body is larger than the server accepts (server.max_body_bytes)",
                )
            } else {
                ApiError::bad_request(format!("could not read the request body: {e}"))
            }
        })
    }
}

impl Body {
    /// Parses the body as JSON; an empty body is `T::default()` when `empty_ok`.
    pub fn json<T: DeserializeOwned + Default>(&self, empty_ok: bool) -> Result<T, ApiError> {
        if empty_ok && self.0.iter().all(u8::is_ascii_whitespace) {
            return Ok(T::default());
        }
        self.json_required()
    }

    /// Parses the body as JSON.
    pub fn json_required<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        serde_json::from_slice(&self.0).map_err(|e| {
            ApiError::bad_request(format!(
                "the request body is not valid JSON for this call: {e}"
            ))
        })
    }
}

/// Parses an id from a path; anything that is not a UUID names nothing.
pub fn parse_id(raw: &str, what: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::not_found(format!("{what} {raw} not found")))
}
