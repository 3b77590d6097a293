//! A minimal Kubernetes API stand-in over HTTPS, for the private-cluster tests: it answers
//! `GET /version` (what `kubectl version` and `outpost-runner doctor` ask) to callers with an
//! accepted bearer token, and `401` with a `Status` to others, recording every request.
//!
//! The full stand-in (discovery, CRUD, patches for `kubectl apply` and `helm`) lives in
//! [`crate::kube`]; this one exists so that the exec credential plugin and TLS with the
//! cluster's own CA can be tested on their own.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::identity::TestCa;

/// One request the stand-in saw.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    /// The path and query.
    pub path: String,
    /// The bearer token sent, if any.
    pub bearer: Option<String>,
}

#[derive(Default)]
struct Shared {
    seen: Mutex<Vec<SeenRequest>>,
    accept: Mutex<Option<Vec<String>>>,
}

/// A Kubernetes API stand-in on `https://127.0.0.1:PORT` with its own CA.
pub struct KubeVersionApi {
    addr: SocketAddr,
    ca: TestCa,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for KubeVersionApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl KubeVersionApi {
    /// Starts it; it accepts any bearer token until [`KubeVersionApi::accept_only`].
    pub async fn start() -> KubeVersionApi {
        let shared = Arc::new(Shared::default());
        let app = axum::Router::new()
            .fallback(answer)
            .with_state(shared.clone());
        let ca = TestCa::new("Outpost test cluster CA");
        let (addr, task) = crate::identity::serve_https(app, &ca).await;
        KubeVersionApi {
            addr,
            ca,
            shared,
            task,
        }
    }

    /// Its URL, e.g. `https://127.0.0.1:40123`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Its CA certificate, PEM.
    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// Accepts only these bearer tokens from now on.
    pub fn accept_only(&self, tokens: Vec<String>) {
        *self.shared.accept.lock().unwrap_or_else(|e| e.into_inner()) = Some(tokens);
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<SeenRequest> {
        self.shared
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

async fn answer(State(shared): State<Arc<Shared>>, uri: Uri, headers: HeaderMap) -> Response {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    shared
        .seen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(SeenRequest {
            path: path.clone(),
            bearer: bearer.clone(),
        });
    let accepted = match &*shared.accept.lock().unwrap_or_else(|e| e.into_inner()) {
        None => bearer.is_some(),
        Some(list) => bearer.as_ref().is_some_and(|b| list.contains(b)),
    };
    let status = |code: StatusCode, reason: &str, message: &str| {
        (
            code,
            axum::Json(json!({
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": message,
                "reason": reason,
                "code": code.as_u16(),
            })),
        )
            .into_response()
    };
    if !accepted {
        return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    if uri.path() == "/version" {
        return axum::Json(json!({
            "major": "1",
            "minor": "31",
            "gitVersion": "v1.31.0-outpost-stand-in",
            "gitCommit": "0000000000000000000000000000000000000000",
            "gitTreeState": "clean",
            "buildDate": "2026-01-01T00:00:00Z",
            "goVersion": "go1.23.0",
            "compiler": "gc",
            "platform": "linux/amd64",
        }))
        .into_response();
    }
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        "the page could not be found",
    )
}
