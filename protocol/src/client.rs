//! A typed HTTP client for the Outpost API, used by the runner, the CLI and the tests.

use std::time::Duration;

use bytes::Bytes;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::types::*;

/// What can go wrong talking to the server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error status.
    #[error("the server answered {status}: {message} ({code})")]
    Api {
        /// The HTTP status.
        status: StatusCode,
        /// The error code from the body, or `http_<status>` if the body was not JSON.
        code: String,
        /// The error message from the body.
        message: String,
        /// On a `416` log append, where the server's log ends.
        next_offset: Option<u64>,
    },
    /// The server could not be reached or the connection broke.
    #[error("could not reach the server: {0}")]
    Transport(#[source] reqwest::Error),
    /// The server answered something that is not what the protocol says.
    #[error("unexpected answer from the server: {0}")]
    Decode(String),
}

impl ClientError {
    /// The HTTP status, when the server answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the lease this call used is no longer current (`409`): the runner must stop the job.
    pub fn is_lease_lost(&self) -> bool {
        self.status() == Some(StatusCode::CONFLICT)
    }

    /// Whether retrying the same call later could succeed (network trouble or a 5xx/429).
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Transport(_) => true,
            ClientError::Api { status, .. } => {
                status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
            ClientError::Decode(_) => false,
        }
    }
}

/// Result of an acquire long poll.
pub type Acquired = Option<AcquireResponse>;

/// A client bound to one server and one bearer token.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

/// How long an ordinary call may take before it counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

impl Client {
    /// A client for `base_url` (e.g. `http://127.0.0.1:8080`) that sends `token` as a bearer token.
    pub fn new(base_url: &str, token: Option<String>) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("outpost/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(ClientError::Transport)?;
        Ok(Self::with_http(http, base_url, token))
    }

    /// A client that shares an existing `reqwest::Client` (and so its connection pool).
    pub fn with_http(http: reqwest::Client, base_url: &str, token: Option<String>) -> Self {
        Self {
            http,
            base: base_url.trim_end_matches('/').to_string(),
            token,
        }
    }

    /// The same server with another token.
    pub fn with_token(&self, token: impl Into<String>) -> Self {
        Self {
            http: self.http.clone(),
            base: self.base.clone(),
            token: Some(token.into()),
        }
    }

    /// The server's base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn request(&self, method: Method, path: &str, token: Option<&str>) -> RequestBuilder {
        let mut req = self
            .http
            .request(method, format!("{}{}", self.base, path))
            .timeout(CALL_TIMEOUT);
        if let Some(t) = token.or(self.token.as_deref()) {
            req = req.bearer_auth(t);
        }
        req
    }

    async fn send(req: RequestBuilder) -> Result<Response, ClientError> {
        let resp = req.send().await.map_err(ClientError::Transport)?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(Self::error_from(resp).await)
    }

    async fn error_from(resp: Response) -> ClientError {
        let status = resp.status();
        let bytes = resp.bytes().await.unwrap_or_default();
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => ClientError::Api {
                status,
                code: body.error.code,
                message: body.error.message,
                next_offset: body.next_offset,
            },
            Err(_) => ClientError::Api {
                status,
                code: format!("http_{}", status.as_u16()),
                message: String::from_utf8_lossy(&bytes).chars().take(500).collect(),
                next_offset: None,
            },
        }
    }

    async fn json<T: DeserializeOwned>(req: RequestBuilder) -> Result<T, ClientError> {
        let resp = Self::send(req).await?;
        let bytes = resp.bytes().await.map_err(ClientError::Transport)?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }

    // -- runner protocol ---------------------------------------------------

    /// Registers a runner with a registration token (the client's token).
    pub async fn register(&self, req: &RegisterRequest) -> Result<RegisterResponse, ClientError> {
        Self::json(
            self.request(Method::POST, "/api/v1/runner/register", None)
                .json(req),
        )
        .await
    }

    /// The runner this client's runner token belongs to; claims nothing.
    pub async fn runner_me(&self) -> Result<RunnerIdentity, ClientError> {
        Self::json(self.request(Method::GET, "/api/v1/runner/me", None)).await
    }

    /// How this server lets runners register (`GET /api/v1/runner/registration-info`, no token).
    pub async fn registration_info(&self) -> Result<RegistrationInfo, ClientError> {
        let req = self
            .http
            .get(format!("{}/api/v1/runner/registration-info", self.base))
            .timeout(CALL_TIMEOUT);
        Self::json(req).await
    }

    /// Long-polls for a job for up to `wait` (the server may cap it); `None` when none came.
    pub async fn acquire(&self, wait: Duration) -> Result<Acquired, ClientError> {
        let body = AcquireRequest {
            wait_secs: Some(wait.as_secs()),
        };
        let req = self
            .request(Method::POST, "/api/v1/runner/acquire", None)
            .timeout(wait + Duration::from_secs(15))
            .json(&body);
        let resp = Self::send(req).await?;
        if resp.status() == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        let bytes = resp.bytes().await.map_err(ClientError::Transport)?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// Renews the lease on `job` and learns whether it was cancelled.
    pub async fn heartbeat(
        &self,
        job: Uuid,
        lease: &str,
    ) -> Result<HeartbeatResponse, ClientError> {
        Self::json(self.request(
            Method::POST,
            &format!("/api/v1/runner/jobs/{job}/heartbeat"),
            Some(lease),
        ))
        .await
    }

    /// Appends `data` to the job's log at `offset`.
    pub async fn append_log(
        &self,
        job: Uuid,
        lease: &str,
        offset: u64,
        data: Bytes,
    ) -> Result<LogAppendResponse, ClientError> {
        Self::json(
            self.request(
                Method::PUT,
                &format!("/api/v1/runner/jobs/{job}/log?offset={offset}"),
                Some(lease),
            )
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(data),
        )
        .await
    }

    /// Reports a step's status change.
    pub async fn update_step(
        &self,
        job: Uuid,
        lease: &str,
        index: u32,
        update: &StepUpdate,
    ) -> Result<(), ClientError> {
        Self::send(
            self.request(
                Method::POST,
                &format!("/api/v1/runner/jobs/{job}/steps/{index}"),
                Some(lease),
            )
            .json(update),
        )
        .await
        .map(drop)
    }

    /// Reports the job's final status.
    pub async fn complete(
        &self,
        job: Uuid,
        lease: &str,
        req: &CompleteRequest,
    ) -> Result<(), ClientError> {
        Self::send(
            self.request(
                Method::POST,
                &format!("/api/v1/runner/jobs/{job}/complete"),
                Some(lease),
            )
            .json(req),
        )
        .await
        .map(drop)
    }

    // -- public API ----------------------------------------------------------

    /// Creates or replaces a pipeline from YAML.
    pub async fn apply_pipeline(&self, name: &str, yaml: &str) -> Result<Pipeline, ClientError> {
        Self::json(
            self.request(Method::PUT, &format!("/api/v1/pipelines/{name}"), None)
                .header(reqwest::header::CONTENT_TYPE, "application/yaml")
                .body(yaml.to_string()),
        )
        .await
    }

    /// Lists pipelines.
    pub async fn list_pipelines(&self) -> Result<PipelineList, ClientError> {
        Self::json(self.request(Method::GET, "/api/v1/pipelines", None)).await
    }

    /// Gets one pipeline.
    pub async fn get_pipeline(&self, name: &str) -> Result<Pipeline, ClientError> {
        Self::json(self.request(Method::GET, &format!("/api/v1/pipelines/{name}"), None)).await
    }

    /// Deletes a pipeline.
    pub async fn delete_pipeline(&self, name: &str) -> Result<(), ClientError> {
        Self::send(self.request(Method::DELETE, &format!("/api/v1/pipelines/{name}"), None))
            .await
            .map(drop)
    }

    /// Starts a run.
    pub async fn trigger_run(
        &self,
        pipeline: &str,
        req: &TriggerRunRequest,
    ) -> Result<Run, ClientError> {
        Self::json(
            self.request(
                Method::POST,
                &format!("/api/v1/pipelines/{pipeline}/runs"),
                None,
            )
            .json(req),
        )
        .await
    }

    /// Lists runs, newest first.
    pub async fn list_runs(
        &self,
        pipeline: Option<&str>,
        status: Option<RunStatus>,
        limit: Option<u32>,
        cursor: Option<&str>,
    ) -> Result<RunList, ClientError> {
        let mut query: Vec<(&str, String)> = Vec::new();
        if let Some(p) = pipeline {
            query.push(("pipeline", p.to_string()));
        }
        if let Some(s) = status {
            query.push(("status", s.as_str().to_string()));
        }
        if let Some(l) = limit {
            query.push(("limit", l.to_string()));
        }
        if let Some(c) = cursor {
            query.push(("cursor", c.to_string()));
        }
        Self::json(
            self.request(Method::GET, "/api/v1/runs", None)
                .query(&query),
        )
        .await
    }

    /// Gets a run with its jobs and steps.
    pub async fn get_run(&self, id: Uuid) -> Result<Run, ClientError> {
        Self::json(self.request(Method::GET, &format!("/api/v1/runs/{id}"), None)).await
    }

    /// Cancels every unfinished job of a run.
    pub async fn cancel_run(&self, id: Uuid) -> Result<Run, ClientError> {
        Self::json(self.request(Method::POST, &format!("/api/v1/runs/{id}/cancel"), None)).await
    }

    /// Gets a job with its steps.
    pub async fn get_job(&self, id: Uuid) -> Result<Job, ClientError> {
        Self::json(self.request(Method::GET, &format!("/api/v1/jobs/{id}"), None)).await
    }

    /// Cancels a job.
    pub async fn cancel_job(&self, id: Uuid) -> Result<Job, ClientError> {
        Self::json(self.request(Method::POST, &format!("/api/v1/jobs/{id}/cancel"), None)).await
    }

    /// Reads a job's log from byte `from` on.
    pub async fn get_log(&self, id: Uuid, from: u64) -> Result<Bytes, ClientError> {
        let mut req = self.request(Method::GET, &format!("/api/v1/jobs/{id}/log"), None);
        if from > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={from}-"));
        }
        let resp = Self::send(req).await?;
        resp.bytes().await.map_err(ClientError::Transport)
    }

    /// Lists runners.
    pub async fn list_runners(&self) -> Result<RunnerList, ClientError> {
        Self::json(self.request(Method::GET, "/api/v1/runners", None)).await
    }

    /// Follows a job's log live, from byte `from_offset` on (`Last-Event-ID`).
    ///
    /// The stream yields the stored log, then the text as the runner appends it, and ends after
    /// [`LogEvent::End`].
    /// It ends without `End` when the connection drops or stays silent for
    /// [`crate::sse::LOG_STREAM_IDLE_TIMEOUT`]: call again with the last `next_offset` to resume
    /// with no byte lost or repeated.
    /// The request keeps the connect timeout but not the 30 s limit of ordinary calls, since a
    /// job may run for hours.
    pub fn stream_log(&self, job: Uuid, from_offset: u64) -> crate::sse::LogEventStream {
        let mut req = self
            .request(Method::GET, &format!("/api/v1/jobs/{job}/log/stream"), None)
            .timeout(crate::sse::LOG_STREAM_MAX_DURATION)
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if from_offset > 0 {
            req = req.header("Last-Event-ID", from_offset.to_string());
        }
        let connect = futures::stream::once(async move {
            let resp = Self::send(req).await?;
            let content_type = resp
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            if !content_type.starts_with("text/event-stream") {
                return Err(ClientError::Decode(format!(
                    "the log stream answered with content type {content_type:?}, \
                     not text/event-stream"
                )));
            }
            let bytes = futures::TryStreamExt::map_err(resp.bytes_stream(), ClientError::Transport);
            Ok(crate::sse::decode_log_stream(
                bytes,
                crate::sse::LOG_STREAM_IDLE_TIMEOUT,
            ))
        });
        Box::pin(futures::TryStreamExt::try_flatten(connect))
    }

    /// Queues an ad-hoc command (`outpost invoke`); answers the run it created, with its job.
    pub async fn invoke(&self, req: &InvokeRequest) -> Result<Run, ClientError> {
        Self::json(self.request(Method::POST, "/api/v1/invoke", None).json(req)).await
    }

    /// Lists audit records, newest first; `kind` filters (e.g. `invoke`).
    pub async fn list_audit(
        &self,
        kind: Option<&str>,
        limit: Option<u32>,
        cursor: Option<&str>,
    ) -> Result<AuditList, ClientError> {
        let mut query: Vec<(&str, String)> = Vec::new();
        if let Some(k) = kind {
            query.push(("kind", k.to_string()));
        }
        if let Some(l) = limit {
            query.push(("limit", l.to_string()));
        }
        if let Some(c) = cursor {
            query.push(("cursor", c.to_string()));
        }
        Self::json(
            self.request(Method::GET, "/api/v1/audit", None)
                .query(&query),
        )
        .await
    }

    /// Like [`Client::apply_pipeline`], and also tells whether the pipeline was created (`201`)
    /// rather than replaced (`200`).
    pub async fn apply_pipeline_created(
        &self,
        name: &str,
        yaml: &str,
    ) -> Result<(Pipeline, bool), ClientError> {
        let resp = Self::send(
            self.request(Method::PUT, &format!("/api/v1/pipelines/{name}"), None)
                .header(reqwest::header::CONTENT_TYPE, "application/yaml")
                .body(yaml.to_string()),
        )
        .await?;
        let created = resp.status() == StatusCode::CREATED;
        let bytes = resp.bytes().await.map_err(ClientError::Transport)?;
        let pipeline =
            serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))?;
        Ok((pipeline, created))
    }
}
