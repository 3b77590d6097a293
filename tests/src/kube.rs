//! The stand-in for a Kubernetes API server, the one part of a deployment that cannot run on a
//! test machine.
//!
//! It speaks just enough of the real wire format for the real `kubectl` to do client-side work
//! that still consults the server: discovery (`/version`, `/api`, `/apis`, `/api/v1`, legacy JSON,
//! which `kubectl` accepts when the server offers no aggregated discovery) and `404` `Status`
//! answers for objects, which `kubectl apply --dry-run=client` reads as "would be created".
//! It records every request so that tests can see what `kubectl` asked for.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// One request the fake API server answered.
#[derive(Debug, Clone)]
pub struct KubeRequest {
    /// `GET`, `POST`, …
    pub method: String,
    /// The path, percent-encoded as sent.
    pub path: String,
}

/// A fake Kubernetes API server on `127.0.0.1`, plain HTTP.
pub struct FakeKubeApi {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<KubeRequest>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeKubeApi {
    /// Starts it on a free port.
    pub async fn start() -> FakeKubeApi {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let app = axum::Router::new()
            .fallback(answer)
            .with_state(requests.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port on 127.0.0.1 can be bound");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeKubeApi {
            addr,
            requests,
            task,
        }
    }

    /// The server's URL, e.g. `http://127.0.0.1:40123`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig for this server into `dir` (context `outpost-e2e`, namespace `web`)
    /// and returns its path.
    pub fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: outpost-e2e\n  cluster:\n    server: {}\n\
             users:\n\
             - name: outpost-e2e\n  user:\n    token: fake-kube-token\n\
             contexts:\n\
             - name: outpost-e2e\n  context:\n    cluster: outpost-e2e\n    user: outpost-e2e\n    namespace: web\n\
             current-context: outpost-e2e\n",
            self.url()
        );
        std::fs::write(&path, text).expect("the kubeconfig can be written");
        path
    }

    /// The requests answered so far.
    pub fn requests(&self) -> Vec<KubeRequest> {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for FakeKubeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(
    State(requests): State<Arc<Mutex<Vec<KubeRequest>>>>,
    method: Method,
    uri: Uri,
) -> Response {
    requests
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(KubeRequest {
            method: method.to_string(),
            path: uri.path().to_string(),
        });
    if method != Method::GET {
        return status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "read only",
        );
    }
    match uri.path() {
        "/version" => Json(json!({
            "major": "1",
            "minor": "35",
            "gitVersion": "v1.35.0-outpost-fake",
            "platform": "linux/amd64"
        }))
        .into_response(),
        "/api" => Json(json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]
        }))
        .into_response(),
        "/apis" => Json(json!({
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [{
                "name": "apps",
                "versions": [{"groupVersion": "apps/v1", "version": "v1"}],
                "preferredVersion": {"groupVersion": "apps/v1", "version": "v1"}
            }]
        }))
        .into_response(),
        "/api/v1" => Json(json!({
            "kind": "APIResourceList",
            "groupVersion": "v1",
            "resources": [
                resource("configmaps", "configmap", "ConfigMap", true, &["cm"]),
                resource("namespaces", "namespace", "Namespace", false, &["ns"]),
                resource("pods", "pod", "Pod", true, &["po"]),
            ]
        }))
        .into_response(),
        "/apis/apps/v1" => Json(json!({
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": "apps/v1",
            "resources": [resource("deployments", "deployment", "Deployment", true, &["deploy"])]
        }))
        .into_response(),
        _ => status(StatusCode::NOT_FOUND, "NotFound", "not found"),
    }
}

fn resource(
    name: &str,
    singular: &str,
    kind: &str,
    namespaced: bool,
    short: &[&str],
) -> serde_json::Value {
    json!({
        "name": name,
        "singularName": singular,
        "namespaced": namespaced,
        "kind": kind,
        "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
        "shortNames": short
    })
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    (
        code,
        Json(json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code.as_u16()
        })),
    )
        .into_response()
}
