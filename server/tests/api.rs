//! Handler tests: the real router over a real SQLite store, driven with `oneshot`.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use outpost_protocol::{AcquireResponse, ErrorBody, LogAppendResponse, RegisterResponse, Run};
use outpost_server::api::{AppState, router};
use outpost_server::store::Scope;
use outpost_server::{Settings, Store};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

struct Env {
    _dir: tempfile::TempDir,
    state: AppState,
    admin: String,
    read: String,
}

async fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings {
        data_dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    settings.server.max_body_bytes = 64 * 1024;
    settings.queue.lease_secs = 30;
    let store = Arc::new(
        Store::connect(&settings.database_url(), 4)
            .await
            .expect("sqlite store"),
    );
    let (_, admin) = store
        .create_api_token("admin", Scope::Admin, None)
        .await
        .unwrap();
    let (_, read) = store
        .create_api_token("reader", Scope::Read, None)
        .await
        .unwrap();
    Env {
        _dir: dir,
        state: AppState {
            store,
            settings: Arc::new(settings),
            shutdown: CancellationToken::new(),
            entra: None,
        },
        admin,
        read,
    }
}

impl Env {
    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: impl Into<Body>,
    ) -> (StatusCode, bytes::Bytes) {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let resp = router(self.state.clone())
            .oneshot(req.body(body.into()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, bytes)
    }
}

const PIPELINE: &str = "jobs:\n  build:\n    runs_on: [x]\n    steps:\n      - run: echo hi\n  deploy:\n    needs: [build]\n    runs_on: [x]\n    steps:\n      - run: echo deploy\n";

fn error(bytes: &[u8]) -> ErrorBody {
    serde_json::from_slice(bytes).unwrap_or_else(|e| {
        panic!(
            "not an error body ({e}): {}",
            String::from_utf8_lossy(bytes)
        )
    })
}

#[tokio::test]
async fn authentication_and_scopes() {
    let env = env().await;
    let (status, body) = env.call("GET", "/api/v1/pipelines", None, "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error(&body).error.code, "unauthenticated");

    let (status, _) = env
        .call("GET", "/api/v1/pipelines", Some("opa_wrong"), "")
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let (status, body) = env
        .call("PUT", "/api/v1/pipelines/web", Some(&env.read), PIPELINE)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(error(&body).error.message.contains("admin"));

    let (status, _) = env
        .call("PUT", "/api/v1/pipelines/web", Some(&env.admin), PIPELINE)
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = env
        .call("PUT", "/api/v1/pipelines/web", Some(&env.admin), PIPELINE)
        .await;
    assert_eq!(status, StatusCode::OK);

    let (status, _) = env
        .call("POST", "/api/v1/pipelines/web/runs", Some(&env.read), "")
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    env.state.store.revoke_api_token("admin").await.unwrap();
    let (status, _) = env
        .call("GET", "/api/v1/pipelines", Some(&env.admin), "")
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn malformed_pipelines_are_rejected_with_a_position_and_nothing_is_stored() {
    let env = env().await;
    let bad = "jobs:\n  build:\n    steps:\n      - run: echo\n        colour: red\n";
    let (status, body) = env
        .call("PUT", "/api/v1/pipelines/web", Some(&env.admin), bad)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let err = error(&body).error;
    assert_eq!(err.code, "invalid_pipeline");
    assert_eq!(err.line, Some(5), "{}", err.message);
    assert!(err.message.contains("colour"), "{}", err.message);

    let (status, body) = env
        .call(
            "PUT",
            "/api/v1/pipelines/web",
            Some(&env.admin),
            "jobs: [\n",
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error(&body).error.line.is_some());

    let (status, _) = env
        .call(
            "PUT",
            "/api/v1/pipelines/Bad_Name",
            Some(&env.admin),
            PIPELINE,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let (status, _) = env
        .call("GET", "/api/v1/pipelines/web", Some(&env.admin), "")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let huge = format!("description: \"{}\"\n{PIPELINE}", "x".repeat(70 * 1024));
    let (status, body) = env
        .call("PUT", "/api/v1/pipelines/web", Some(&env.admin), huge)
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error(&body).error.code, "payload_too_large");
}

#[tokio::test]
async fn runner_protocol_leases_logs_and_the_dag() {
    let env = env().await;
    env.call("PUT", "/api/v1/pipelines/web", Some(&env.admin), PIPELINE)
        .await;
    let (status, body) = env
        .call("POST", "/api/v1/pipelines/web/runs", Some(&env.admin), "")
        .await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&body)
    );
    let run: Run = serde_json::from_slice(&body).unwrap();
    assert_eq!(run.number, 1);
    assert_eq!(run.jobs.len(), 2);

    let (_, reg) = env
        .state
        .store
        .create_registration_token("p", None)
        .await
        .unwrap();
    let register = json!({"name": "r1", "labels": ["x", "y"], "version": "t", "os": "linux", "arch": "x86_64"}).to_string();
    let (status, _) = env
        .call(
            "POST",
            "/api/v1/runner/register",
            Some(&env.admin),
            register.clone(),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "an API token is not a registration token"
    );
    let (status, body) = env
        .call("POST", "/api/v1/runner/register", Some(&reg), register)
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let runner: RegisterResponse = serde_json::from_slice(&body).unwrap();

    let (status, body) = env
        .call(
            "POST",
            "/api/v1/runner/acquire",
            Some(&runner.runner_token),
            "{\"wait_secs\": 1}",
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let acquired: AcquireResponse = serde_json::from_slice(&body).unwrap();
    assert_eq!(acquired.job.name, "build");
    let job = acquired.job.id;
    let lease = acquired.lease.token.clone();

    // `deploy` needs `build`, so nothing else is available yet.
    let (status, _) = env
        .call(
            "POST",
            "/api/v1/runner/acquire",
            Some(&runner.runner_token),
            "{\"wait_secs\": 1}",
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    let log = |offset: u64, data: &'static str| {
        let path = format!("/api/v1/runner/jobs/{job}/log?offset={offset}");
        let env = &env;
        let lease = lease.clone();
        async move { env.call("PUT", &path, Some(&lease), data).await }
    };
    let (status, body) = log(0, "hello ").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_slice::<LogAppendResponse>(&body)
            .unwrap()
            .next_offset,
        6
    );
    // A resend of bytes already stored, overlapping new ones, stores only the new part.
    let (_, body) = log(0, "hello world\n").await;
    assert_eq!(
        serde_json::from_slice::<LogAppendResponse>(&body)
            .unwrap()
            .next_offset,
        12
    );
    let (status, body) = log(20, "gap").await;
    assert_eq!(status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(error(&body).next_offset, Some(12));
    let (_, body) = env
        .call(
            "GET",
            &format!("/api/v1/jobs/{job}/log"),
            Some(&env.read),
            "",
        )
        .await;
    assert_eq!(&body[..], b"hello world\n");

    let (status, _) = env
        .call(
            "POST",
            &format!("/api/v1/runner/jobs/{job}/heartbeat"),
            Some("opl_not_the_lease"),
            "",
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);

    let (status, _) = env
        .call(
            "POST",
            &format!("/api/v1/runner/jobs/{job}/complete"),
            Some(&lease),
            "{\"status\": \"succeeded\", \"exit_code\": 0}",
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // Completing is idempotent for the lease holder; logging after it is fenced.
    let (status, _) = env
        .call(
            "POST",
            &format!("/api/v1/runner/jobs/{job}/complete"),
            Some(&lease),
            "{\"status\": \"succeeded\", \"exit_code\": 0}",
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = log(12, "late").await;
    assert_eq!(status, StatusCode::CONFLICT);

    let (status, body) = env
        .call(
            "POST",
            "/api/v1/runner/acquire",
            Some(&runner.runner_token),
            "{}",
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let next: AcquireResponse = serde_json::from_slice(&body).unwrap();
    assert_eq!(next.job.name, "deploy");
    assert_ne!(next.lease.token, lease, "every claim gets a fresh lease");
}
