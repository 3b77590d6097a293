//! `ApiError`: a status and `{"error": {"code", "message"}}`; 5xx never leak internals.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use outpost_protocol::{ErrorBody, ErrorDetail};

use crate::pipeline::PipelineError;
use crate::store::StoreError;

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    line: Option<usize>,
    column: Option<usize>,
    next_offset: Option<u64>,
}

/// The cause of a 5xx, carried to the logging middleware as a response extension.
#[derive(Debug, Clone)]
pub struct InternalCause(pub String);

/// Result type of handlers.
pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    /// An error with a status, a stable code and a sentence.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            line: None,
            column: None,
            next_offset: None,
        }
    }

    /// `400 bad_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// `404 not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// `401 unauthenticated`.
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthenticated", message)
    }

    /// `403 forbidden`.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// `500`: logs `cause` once (in middleware) and tells the client only "internal error".
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            cause.to_string(),
        )
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => ApiError::not_found(format!("{what} not found")),
            StoreError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            StoreError::LeaseLost => ApiError::new(
                StatusCode::CONFLICT,
                "lease_lost",
                "the lease on this job is no longer current: stop working on it",
            ),
            StoreError::Gap { next_offset } => {
                let mut err = ApiError::new(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    "log_gap",
                    format!("the stored log ends at byte {next_offset}; resend from there"),
                );
                err.next_offset = Some(next_offset);
                err
            }
            StoreError::Invalid(m) => ApiError::bad_request(m),
            StoreError::Db(e) => {
                let mut err = ApiError::internal(format!("database error: {e}"));
                if matches!(
                    e,
                    sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed
                ) {
                    err.status = StatusCode::SERVICE_UNAVAILABLE;
                    err.code = "unavailable";
                }
                err
            }
            StoreError::Corrupt(m) => ApiError::internal(format!("corrupt data: {m}")),
        }
    }
}

impl From<PipelineError> for ApiError {
    fn from(e: PipelineError) -> Self {
        let mut err = ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_pipeline",
            format!("line {}, column {}: {}", e.line, e.column, e.message),
        );
        err.line = Some(e.line);
        err.column = Some(e.column);
        err
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let server_side = self.status.is_server_error();
        let message = if server_side {
            match self.status {
                StatusCode::SERVICE_UNAVAILABLE if self.code == "entra_unavailable" => {
                    "the server cannot fetch the Entra ID signing keys right now; retry shortly"
                        .to_string()
                }
                StatusCode::SERVICE_UNAVAILABLE => {
                    "the server cannot reach its database right now; retry shortly".to_string()
                }
                _ => "internal error".to_string(),
            }
        } else {
            self.message.clone()
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message,
                line: self.line,
                column: self.column,
            },
            next_offset: self.next_offset,
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        if server_side {
            resp.extensions_mut().insert(InternalCause(self.message));
        }
        resp
    }
}
