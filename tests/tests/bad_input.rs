//! Wrong requests get the right status and a useful error body, and change nothing.

use std::time::Duration;

use bytes::Bytes;
use outpost_tests::outpost_protocol::{CompleteRequest, ErrorBody, JobStatus, RegisterRequest};
use outpost_tests::{Backend, Scope, TestServer, backend_tests, expect_status, test_db};
use reqwest::StatusCode;

backend_tests!(
    malformed_yaml_is_rejected_with_its_position,
    unknown_key_is_rejected_with_its_position,
    unknown_pipeline_is_not_found,
    tokens_are_checked,
    oversized_body_is_rejected,
    log_append_past_the_end_answers_416,
);

const VALID: &str = r#"
jobs:
  build:
    runs_on: [e2e]
    steps:
      - run: echo hi
"#;

/// PUTs `yaml` as pipeline `name` and returns the status and the parsed error body.
async fn put_pipeline(server: &TestServer, name: &str, yaml: &str) -> (StatusCode, ErrorBody) {
    let resp = server
        .http()
        .put(server.api(&format!("/api/v1/pipelines/{name}")))
        .bearer_auth(server.admin_token())
        .header(reqwest::header::CONTENT_TYPE, "application/yaml")
        .body(yaml.to_string())
        .send()
        .await
        .expect("PUT pipeline");
    let status = resp.status();
    let text = resp.text().await.expect("body");
    let body: ErrorBody = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("the {status} answer is not an error body ({e}): {text}"));
    (status, body)
}

async fn malformed_yaml_is_rejected_with_its_position(backend: Backend) {
    let db = test_db!(backend);
    let server = TestServer::start(&db, &[]).await;
    // Line 3 has a second `:` where a plain mapping value cannot hold one.
    let yaml = "description: broken\njobs:\n  build: runs_on: [e2e]\n";
    let (status, body) = put_pipeline(&server, "broken", yaml).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body:?}");
    assert_eq!(body.error.code, "invalid_pipeline", "{body:?}");
    assert!(!body.error.message.is_empty());
    assert_eq!(body.error.line, Some(3), "the error is on line 3: {body:?}");
    let column = body.error.column.expect("a column");
    let line_len = "  build: runs_on: [e2e]".len();
    assert!(
        (1..=line_len + 1).contains(&column),
        "column {column} is not on line 3 (1..={})",
        line_len + 1
    );

    // Nothing was stored.
    let status = expect_status(server.client().get_pipeline("broken").await, "GET broken");
    assert_eq!(status, StatusCode::NOT_FOUND);
}

async fn unknown_key_is_rejected_with_its_position(backend: Backend) {
    let db = test_db!(backend);
    let server = TestServer::start(&db, &[]).await;
    // `stepz` is on line 4, column 5.
    let yaml = "jobs:\n  build:\n    runs_on: [e2e]\n    stepz:\n      - run: echo hi\n";
    let (status, body) = put_pipeline(&server, "typo", yaml).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body:?}");
    assert_eq!(body.error.code, "invalid_pipeline", "{body:?}");
    assert!(
        body.error.message.contains("stepz"),
        "the message names the unknown key: {body:?}"
    );
    assert_eq!(
        (body.error.line, body.error.column),
        (Some(4), Some(5)),
        "the position of `stepz`: {body:?}"
    );
    let status = expect_status(server.client().get_pipeline("typo").await, "GET typo");
    assert_eq!(status, StatusCode::NOT_FOUND, "nothing is stored");

    // The same pipeline without the typo is accepted: the rejection was about the key.
    let fixed = yaml.replace("stepz", "steps");
    let pipeline = server
        .client()
        .apply_pipeline("typo", &fixed)
        .await
        .expect("the corrected pipeline is accepted");
    assert_eq!(pipeline.jobs, vec!["build".to_string()]);
}

async fn unknown_pipeline_is_not_found(backend: Backend) {
    let db = test_db!(backend);
    let server = TestServer::start(&db, &[]).await;
    let client = server.client();
    let status = expect_status(client.get_pipeline("no-such-pipeline").await, "GET unknown");
    assert_eq!(status, StatusCode::NOT_FOUND);
    let status = expect_status(
        client
            .trigger_run("no-such-pipeline", &Default::default())
            .await,
        "trigger unknown",
    );
    assert_eq!(status, StatusCode::NOT_FOUND);

    let resp = server
        .http()
        .get(server.api("/api/v1/pipelines/no-such-pipeline"))
        .bearer_auth(server.admin_token())
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let body: ErrorBody = resp.json().await.expect("a 404 carries an error body");
    assert_eq!(body.error.code, "not_found");
}

async fn tokens_are_checked(backend: Backend) {
    let db = test_db!(backend);
    let server = TestServer::start(&db, &[]).await;
    let admin = server.client();
    admin.apply_pipeline("guarded", VALID).await.expect("apply");

    // No token at all.
    let resp = server
        .http()
        .get(server.api("/api/v1/pipelines"))
        .send()
        .await
        .expect("GET without a token");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let body: ErrorBody = resp.json().await.expect("a 401 carries an error body");
    assert!(!body.error.code.is_empty());
    let resp = server
        .http()
        .post(server.api("/api/v1/pipelines/guarded/runs"))
        .json(&serde_json::json!({}))
        .send()
        .await
        .expect("trigger without a token");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    // A token the server never issued.
    let status = expect_status(
        server
            .client_with(Some("not-a-real-token".into()))
            .list_pipelines()
            .await,
        "a made-up token",
    );
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // A read token can read but not trigger.
    let read = server.client_with(Some(server.token(Scope::Read).await));
    read.get_pipeline("guarded")
        .await
        .expect("read can see pipelines");
    let status = expect_status(
        read.trigger_run("guarded", &Default::default()).await,
        "read token triggers",
    );
    assert_eq!(status, StatusCode::FORBIDDEN);
    let runs = admin
        .list_runs(Some("guarded"), None, None, None)
        .await
        .expect("runs");
    assert!(
        runs.runs.is_empty(),
        "a forbidden trigger queued nothing: {runs:?}"
    );

    // A trigger token can trigger but not change pipelines.
    let trigger = server.client_with(Some(server.token(Scope::Trigger).await));
    let run = trigger
        .trigger_run("guarded", &Default::default())
        .await
        .expect("trigger can start runs");
    assert_eq!(run.number, 1);
    let status = expect_status(
        trigger.apply_pipeline("guarded", VALID).await,
        "trigger token applies a pipeline",
    );
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Runner routes take runner credentials only, never an API token.
    let resp = server
        .http()
        .post(server.api("/api/v1/runner/acquire"))
        .bearer_auth(server.admin_token())
        .json(&serde_json::json!({}))
        .send()
        .await
        .expect("acquire with an admin token");
    assert_eq!(
        resp.status(),
        StatusCode::UNAUTHORIZED,
        "acquire with an admin token"
    );
    let job = admin
        .get_run(run.id)
        .await
        .expect("GET run")
        .jobs
        .first()
        .expect("the run lists its job")
        .id;
    let status = expect_status(
        admin
            .register(&RegisterRequest {
                name: "impostor".into(),
                labels: vec!["e2e".into()],
                version: String::new(),
                os: String::new(),
                arch: String::new(),
                clusters: Vec::new(),
            })
            .await,
        "register with an admin token",
    );
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "register with an admin token"
    );
    // A per-job route takes only the job's current lease. The server cannot tell an admin token
    // from a lease that is no longer current, so 409 is as right as 401 here; what matters is
    // that the call is refused and changes nothing.
    let status = expect_status(
        admin.heartbeat(job, server.admin_token()).await,
        "heartbeat with an admin token",
    );
    assert!(
        status == StatusCode::UNAUTHORIZED || status == StatusCode::CONFLICT,
        "heartbeat with an admin token answered {status}"
    );
    let status = expect_status(
        admin
            .complete(
                job,
                server.admin_token(),
                &CompleteRequest {
                    status: JobStatus::Succeeded,
                    exit_code: Some(0),
                },
            )
            .await,
        "complete with an admin token",
    );
    assert!(
        status == StatusCode::UNAUTHORIZED || status == StatusCode::CONFLICT,
        "complete with an admin token answered {status}"
    );
    let untouched = admin.get_job(job).await.expect("GET job");
    assert_eq!(untouched.status, JobStatus::Queued, "{untouched:#?}");
    assert_eq!(untouched.runner_id, None);
    let runners = admin.list_runners().await.expect("GET runners");
    assert!(
        runners.runners.is_empty(),
        "no runner was registered: {runners:?}"
    );
    let resp = server
        .http()
        .post(server.api("/api/v1/runner/acquire"))
        .json(&serde_json::json!({}))
        .send()
        .await
        .expect("acquire without a token");
    assert_eq!(
        resp.status(),
        StatusCode::UNAUTHORIZED,
        "acquire without a token"
    );
}

async fn oversized_body_is_rejected(backend: Backend) {
    const LIMIT: usize = 1024 * 1024;
    let db = test_db!(backend);
    let limit = LIMIT.to_string();
    let server = TestServer::start(&db, &[("OUTPOST__SERVER__MAX_BODY_BYTES", &limit)]).await;

    // A valid pipeline padded with a comment to one byte over the limit.
    let mut yaml = VALID.to_string();
    yaml.push('#');
    yaml.push_str(&"x".repeat(LIMIT - yaml.len()));
    yaml.push('\n');
    assert_eq!(yaml.len(), LIMIT + 1);
    let resp = server
        .http()
        .put(server.api("/api/v1/pipelines/huge"))
        .bearer_auth(server.admin_token())
        .header(reqwest::header::CONTENT_TYPE, "application/yaml")
        .body(yaml)
        .send()
        .await
        .expect("PUT an oversized pipeline");
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let status = expect_status(server.client().get_pipeline("huge").await, "GET huge");
    assert_eq!(status, StatusCode::NOT_FOUND, "nothing is stored");

    // The same pipeline well under the limit is fine.
    let mut small = VALID.to_string();
    small.push_str(&format!("#{}\n", "x".repeat(LIMIT / 2)));
    server
        .client()
        .apply_pipeline("huge", &small)
        .await
        .expect("a body under the limit is accepted");
}

async fn log_append_past_the_end_answers_416(backend: Backend) {
    let db = test_db!(backend);
    let server = TestServer::start(&db, &[]).await;
    let client = server.client();
    let fake = server.fake_runner("fake-runner", &["e2e"]).await;
    client.apply_pipeline("logs", VALID).await.expect("apply");
    client
        .trigger_run("logs", &Default::default())
        .await
        .expect("trigger");
    let acquired = fake
        .client
        .acquire(Duration::from_secs(10))
        .await
        .expect("acquire")
        .expect("a job");
    let (job, lease) = (acquired.job.id, acquired.lease.token.as_str());

    let first = fake
        .client
        .append_log(job, lease, 0, Bytes::from_static(b"abc"))
        .await
        .expect("first append");
    assert_eq!(first.next_offset, 3);

    // A gap: the server says where its log ends.
    let err = fake
        .client
        .append_log(job, lease, 10, Bytes::from_static(b"xyz"))
        .await
        .expect_err("an append past the end must fail");
    match &err {
        outpost_tests::outpost_protocol::ClientError::Api {
            status,
            next_offset,
            ..
        } => {
            assert_eq!(*status, StatusCode::RANGE_NOT_SATISFIABLE, "{err}");
            assert_eq!(*next_offset, Some(3), "the 416 names the stored end: {err}");
        }
        other => panic!("expected a 416 answer, got {other}"),
    }

    // Resending bytes already stored is acknowledged, and the log holds each byte once.
    let again = fake
        .client
        .append_log(job, lease, 0, Bytes::from_static(b"abc"))
        .await
        .expect("an idempotent resend");
    assert_eq!(again.next_offset, 3);
    let more = fake
        .client
        .append_log(job, lease, 3, Bytes::from_static(b"def"))
        .await
        .expect("append at the end");
    assert_eq!(more.next_offset, 6);
    let log = client.get_log(job, 0).await.expect("log");
    assert_eq!(&log[..], b"abcdef");
    assert_eq!(client.get_job(job).await.expect("job").log_size, 6);
}
