//! The authorisation matrix: every route × every kind of caller → the status it must answer.
//!
//! The matrix is data ([`MATRIX`]); the test walks the router's own route table and the served
//! OpenAPI document, and fails when either names a route the matrix has no row for (or the other
//! way round), so a new route cannot ship without deciding who may call it.
//! Two columns are the web UI's session cookie, which the API accepts in place of a bearer token
//! (the page script calls it that way): with its CSRF header it may do what its token may, and
//! without the header it may only read.
//! Each cell runs against fresh objects (a pipeline, two claimed jobs, a secret), so cells that
//! change state (cancel, complete, delete) cannot affect each other.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use outpost_tests::outpost_protocol::{AcquireResponse, JobStatus};
use outpost_tests::{
    Backend, SECRETS_KEY_ENV, Scope, TestServer, backend_tests, test_db, wait_for_job_status,
};
use reqwest::Method;
use uuid::Uuid;

backend_tests!(every_route_answers_every_caller_as_the_matrix_says);

/// The kinds of caller, in the order of the matrix's columns.
const CALLERS: [&str; 14] = [
    "none",            // no Authorization header
    "read",            // an API token with the read scope
    "trigger",         // … the trigger scope
    "invoke",          // … the invoke scope
    "admin",           // … the admin scope
    "revoked",         // an admin token that was revoked
    "expired",         // an admin token that has expired
    "runner",          // a runner token
    "registration",    // a registration token
    "lease",           // the current lease token of the job in the path
    "lease_other",     // the current lease token of a different job
    "lease_stale",     // the lease token of a job whose lease ran out (the path names that job)
    "session",         // an admin's web session cookie and its `X-CSRF-Token`, no Authorization
    "session_no_csrf", // the same cookie without the CSRF header
];

const PUBLIC: [u16; 14] = [200; 14];
/// Reading needs no CSRF header, so the session cookie reads without one.
const READ: [u16; 14] = [
    401, 200, 200, 200, 200, 401, 401, 401, 401, 401, 401, 401, 200, 200,
];
const ADMIN_READ: [u16; 14] = [
    401, 403, 403, 403, 200, 401, 401, 401, 401, 401, 401, 401, 200, 200,
];
/// A change through the session cookie needs the CSRF header.
const fn trigger(ok: u16) -> [u16; 14] {
    [
        401, 403, ok, ok, ok, 401, 401, 401, 401, 401, 401, 401, ok, 403,
    ]
}
const fn admin(ok: u16) -> [u16; 14] {
    [
        401, 403, 403, 403, ok, 401, 401, 401, 401, 401, 401, 401, ok, 403,
    ]
}
/// The columns of the runner token and the registration token.
const RUNNER: usize = 7;
const REGISTRATION: usize = 8;
/// Runner routes open only to the bearer token in column `col`: a session cookie is no
/// credential there.
const fn runner_only(col: usize, ok: u16) -> [u16; 14] {
    let mut row = [401; 14];
    row[col] = ok;
    row
}
/// Per-job runner calls: only the job's current lease gets through; any other bearer is a lease
/// that is not current, which answers 409 so that a runner holding it stops.
/// A request with no bearer (a session cookie) is unauthenticated.
const fn lease(ok: u16) -> [u16; 14] {
    [
        401, 409, 409, 409, 409, 409, 409, 409, 409, ok, 409, 409, 401, 401,
    ]
}
/// Webhooks authenticate by signature; no bearer token or cookie opens them.
const HOOK: [u16; 14] = [401; 14];

/// method, path (as the router and the OpenAPI document spell it), expected status per caller.
const MATRIX: &[(&str, &str, [u16; 14])] = &[
    ("GET", "/healthz", PUBLIC),
    ("GET", "/readyz", PUBLIC),
    ("GET", "/api/v1/openapi.json", PUBLIC),
    ("GET", "/api/v1/pipelines", READ),
    ("PUT", "/api/v1/pipelines/{name}", admin(200)),
    ("GET", "/api/v1/pipelines/{name}", READ),
    ("DELETE", "/api/v1/pipelines/{name}", admin(204)),
    ("POST", "/api/v1/pipelines/{name}/runs", trigger(201)),
    ("GET", "/api/v1/runs", READ),
    ("GET", "/api/v1/runs/{id}", READ),
    ("POST", "/api/v1/runs/{id}/cancel", trigger(200)),
    ("GET", "/api/v1/jobs/{id}", READ),
    ("POST", "/api/v1/jobs/{id}/cancel", trigger(200)),
    ("GET", "/api/v1/jobs/{id}/log", READ),
    ("GET", "/api/v1/jobs/{id}/log/stream", READ),
    (
        "POST",
        "/api/v1/invoke",
        [
            401, 403, 403, 201, 201, 401, 401, 401, 401, 401, 401, 401, 201, 403,
        ],
    ),
    ("GET", "/api/v1/audit", ADMIN_READ),
    ("GET", "/api/v1/webhook-deliveries", ADMIN_READ),
    ("GET", "/api/v1/secrets", ADMIN_READ),
    ("PUT", "/api/v1/secrets/{name}", admin(200)),
    ("DELETE", "/api/v1/secrets/{name}", admin(204)),
    ("GET", "/api/v1/runners", READ),
    (
        "POST",
        "/api/v1/runner/register",
        runner_only(REGISTRATION, 201),
    ),
    ("GET", "/api/v1/runner/me", runner_only(RUNNER, 200)),
    ("GET", "/api/v1/runner/registration-info", PUBLIC),
    ("POST", "/api/v1/runner/acquire", runner_only(RUNNER, 204)),
    ("POST", "/api/v1/runner/jobs/{id}/heartbeat", lease(200)),
    ("PUT", "/api/v1/runner/jobs/{id}/log", lease(200)),
    ("POST", "/api/v1/runner/jobs/{id}/steps/{index}", lease(204)),
    ("POST", "/api/v1/runner/jobs/{id}/complete", lease(204)),
    ("POST", "/hooks/github", HOOK),
    ("POST", "/hooks/gitlab", HOOK),
    ("POST", "/hooks/azure-devops", HOOK),
    ("POST", "/hooks/generic/{pipeline}", HOOK),
];

const PIPELINE: &str = r#"
jobs:
  deploy:
    runs_on: [matrix]
    steps:
      - run: echo "never run, the test holds the lease itself"
"#;

/// Lease length: short, so that a stale lease can be made within the test.
const LEASE_SECS: &str = "4";

/// The objects one cell's request is about.
struct Cell {
    pipeline: String,
    secret: String,
    run: Uuid,
    job: Uuid,
    lease: String,
    other_lease: String,
}

async fn every_route_answers_every_caller_as_the_matrix_says(backend: Backend) {
    let db = test_db!(backend);
    let server = TestServer::start(
        &db,
        &[("OUTPOST__QUEUE__LEASE_SECS", LEASE_SECS), SECRETS_KEY_ENV],
    )
    .await;
    let http = server.http().clone();
    let admin = server.admin_token().to_string();

    // The three lists that must agree: the matrix, the router's table and the served document.
    let matrix: BTreeSet<(String, String)> = MATRIX
        .iter()
        .map(|(m, p, _)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(matrix.len(), MATRIX.len(), "the matrix has a duplicate row");
    let router: BTreeSet<(String, String)> = outpost_server::api::route_table()
        .iter()
        .map(|r| (r.method.as_str().to_string(), r.path.to_string()))
        .collect();
    let doc: serde_json::Value = http
        .get(server.api("/api/v1/openapi.json"))
        .send()
        .await
        .expect("GET /api/v1/openapi.json")
        .json()
        .await
        .expect("the OpenAPI document is JSON");
    assert_eq!(doc["openapi"], "3.1.0");
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("a path item").keys() {
            if let Ok(m) = method.to_uppercase().parse::<Method>() {
                documented.insert((m.as_str().to_string(), path.clone()));
            }
        }
    }
    let missing: Vec<_> = router.difference(&matrix).collect();
    assert!(
        missing.is_empty(),
        "routes without rows in the authorisation matrix: {missing:?}"
    );
    let extra: Vec<_> = matrix.difference(&router).collect();
    assert!(
        extra.is_empty(),
        "matrix rows for routes the router does not have: {extra:?}"
    );
    assert_eq!(
        documented, router,
        "the OpenAPI document and the router disagree"
    );

    // The callers' credentials.
    let mut tokens: BTreeMap<&str, String> = BTreeMap::new();
    tokens.insert("read", server.token(Scope::Read).await);
    tokens.insert("trigger", server.token(Scope::Trigger).await);
    tokens.insert("invoke", server.token(Scope::Invoke).await);
    tokens.insert("admin", admin.clone());
    let revoked = server
        .cli(&[
            "token",
            "create",
            "--name",
            "matrix-revoked",
            "--scope",
            "admin",
        ])
        .await;
    server.cli(&["token", "revoke", "matrix-revoked"]).await;
    tokens.insert("revoked", last_word(&revoked));
    let expired = server
        .cli(&[
            "token",
            "create",
            "--name",
            "matrix-expired",
            "--scope",
            "admin",
            "--expires-in-days",
            "0",
        ])
        .await;
    tokens.insert("expired", last_word(&expired));
    let registration = server.registration_token().await;
    tokens.insert("registration", registration);
    let runner_token = runner_token(&server, &tokens["registration"]).await;
    tokens.insert("runner", runner_token.clone());
    let session = WebSession::sign_in(&server, &admin).await;

    // A stale lease: claimed, heartbeaten once (so the job counts as started and is not
    // re-queued), then left to run out; the job ends `lost`.
    let setup = Setup {
        server: &server,
        http: http.clone(),
        admin: admin.clone(),
        runner: runner_token.clone(),
    };
    let stale = setup.cell("stale").await;
    wait_for_job_status(
        &server.client(),
        stale.job,
        JobStatus::Lost,
        Duration::from_secs(60),
    )
    .await;

    let mut failures = Vec::new();
    let mut cells = 0;
    for (n, (method, path, expected)) in MATRIX.iter().enumerate() {
        for (c, caller) in CALLERS.iter().enumerate() {
            let cell = setup.cell(&format!("m{n}-{c}")).await;
            let token = match *caller {
                "none" => None,
                "lease" => Some(cell.lease.clone()),
                "lease_other" => Some(cell.other_lease.clone()),
                "lease_stale" => Some(stale.lease.clone()),
                "session" | "session_no_csrf" => None,
                other => Some(tokens[other].clone()),
            };
            // The stale lease is presented for its own job, so that only its staleness is wrong.
            let job = if *caller == "lease_stale" && path.starts_with("/api/v1/runner/jobs/") {
                stale.job
            } else {
                cell.job
            };
            let url = path
                .replace(
                    "{name}",
                    if path.contains("/secrets/") {
                        &cell.secret
                    } else {
                        &cell.pipeline
                    },
                )
                .replace("{pipeline}", &cell.pipeline)
                .replace(
                    "{id}",
                    &if path.starts_with("/api/v1/runs/") {
                        cell.run
                    } else {
                        job
                    }
                    .to_string(),
                )
                .replace("{index}", "0");
            let (url, body, content_type) = request_for(method, &url);
            let mut req = http.request(method.parse().unwrap(), server.api(&url));
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            if caller.starts_with("session") {
                req = req.header("cookie", &session.cookie);
            }
            if *caller == "session" {
                req = req.header("x-csrf-token", &session.csrf);
            }
            if let Some(ct) = content_type {
                req = req.header("content-type", ct);
            }
            if let Some(b) = body {
                req = req.body(b);
            }
            let resp = req
                .send()
                .await
                .unwrap_or_else(|e| panic!("{method} {url} as {caller}: {e}"));
            let got = resp.status().as_u16();
            cells += 1;
            if got != expected[c] {
                // A stream's body is read only when the cell failed, to say why.
                let why = match resp.headers().get("content-type") {
                    Some(ct) if ct.as_bytes().starts_with(b"application/json") => {
                        resp.text().await.unwrap_or_default()
                    }
                    _ => String::new(),
                };
                failures.push(format!(
                    "{method} {path} as {caller}: expected {}, got {got} {why}",
                    expected[c]
                ));
            }
        }
    }
    println!(
        "authorisation matrix: {} routes × {} callers = {cells} cells, {} wrong",
        MATRIX.len(),
        CALLERS.len(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "cells that answered differently from the matrix:\n{}",
        failures.join("\n")
    );
}

/// The request a cell sends: the URL with its query, the body and its content type.
fn request_for(method: &str, url: &str) -> (String, Option<Vec<u8>>, Option<&'static str>) {
    let json = |v: serde_json::Value| Some(serde_json::to_vec(&v).unwrap());
    let (body, ct) = match (method, url) {
        ("PUT", u) if u.starts_with("/api/v1/pipelines/") => {
            (Some(PIPELINE.as_bytes().to_vec()), Some("application/yaml"))
        }
        ("PUT", u) if u.starts_with("/api/v1/secrets/") => {
            (Some(b"s3cret".to_vec()), Some("text/plain"))
        }
        ("POST", "/api/v1/runner/register") => (
            json(serde_json::json!({"name": "matrix-registered", "labels": ["other"]})),
            Some("application/json"),
        ),
        ("POST", "/api/v1/invoke") => (
            json(serde_json::json!({"argv": ["echo", "matrix"], "labels": ["matrix"]})),
            Some("application/json"),
        ),
        ("POST", "/api/v1/runner/acquire") => (
            json(serde_json::json!({"wait_secs": 0})),
            Some("application/json"),
        ),
        ("PUT", u) if u.ends_with("/log") => {
            return (
                format!("{u}?offset=0"),
                Some(b"hello\n".to_vec()),
                Some("application/octet-stream"),
            );
        }
        ("POST", u) if u.contains("/steps/") => (
            json(serde_json::json!({"status": "running", "log_offset": 0})),
            Some("application/json"),
        ),
        ("POST", u) if u.ends_with("/complete") => (
            json(serde_json::json!({"status": "succeeded", "exit_code": 0})),
            Some("application/json"),
        ),
        ("POST", u) if u.starts_with("/hooks/") || u.ends_with("/runs") => {
            (json(serde_json::json!({})), Some("application/json"))
        }
        _ => (None, None),
    };
    (url.to_string(), body, ct)
}

/// What every cell needs to make its objects.
struct Setup<'a> {
    server: &'a TestServer,
    http: reqwest::Client,
    admin: String,
    runner: String,
}

impl Setup<'_> {
    /// A fresh pipeline `name` with two claimed runs, and a fresh secret; the queue is left empty.
    async fn cell(&self, name: &str) -> Cell {
        let api = |p: &str| self.server.api(p);
        let ok = |what: &str, resp: reqwest::Response| {
            assert!(
                resp.status().is_success(),
                "{what} answered {}",
                resp.status()
            );
            resp
        };
        ok(
            "PUT pipeline",
            self.http
                .put(api(&format!("/api/v1/pipelines/{name}")))
                .bearer_auth(&self.admin)
                .header("content-type", "application/yaml")
                .body(PIPELINE)
                .send()
                .await
                .unwrap(),
        );
        let secret = format!("S_{}", name.replace('-', "_").to_uppercase());
        ok(
            "PUT secret",
            self.http
                .put(api(&format!("/api/v1/secrets/{secret}")))
                .bearer_auth(&self.admin)
                .body("value")
                .send()
                .await
                .unwrap(),
        );
        let mut runs = Vec::new();
        for _ in 0..2 {
            let run: serde_json::Value = ok(
                "POST runs",
                self.http
                    .post(api(&format!("/api/v1/pipelines/{name}/runs")))
                    .bearer_auth(&self.admin)
                    .json(&serde_json::json!({}))
                    .send()
                    .await
                    .unwrap(),
            )
            .json()
            .await
            .unwrap();
            runs.push(Uuid::parse_str(run["id"].as_str().unwrap()).unwrap());
        }
        // Claim everything queued (earlier cells' triggers included), heartbeating each claim so
        // that an expired lease ends the job `lost` instead of re-queueing it.
        let mut claimed: BTreeMap<Uuid, AcquireResponse> = BTreeMap::new();
        loop {
            let resp = self
                .http
                .post(api("/api/v1/runner/acquire"))
                .bearer_auth(&self.runner)
                .json(&serde_json::json!({"wait_secs": 0}))
                .send()
                .await
                .unwrap();
            if resp.status().as_u16() == 204 {
                break;
            }
            let got: AcquireResponse = ok("acquire", resp).json().await.unwrap();
            ok(
                "heartbeat",
                self.http
                    .post(api(&format!(
                        "/api/v1/runner/jobs/{}/heartbeat",
                        got.job.id
                    )))
                    .bearer_auth(&got.lease.token)
                    .send()
                    .await
                    .unwrap(),
            );
            claimed.insert(got.job.run_id, got);
        }
        let mine = |run: Uuid| {
            claimed
                .get(&run)
                .unwrap_or_else(|| panic!("the job of run {run} was not handed out"))
        };
        Cell {
            pipeline: name.to_string(),
            secret,
            run: runs[0],
            job: mine(runs[0]).job.id,
            lease: mine(runs[0]).lease.token.clone(),
            other_lease: mine(runs[1]).lease.token.clone(),
        }
    }
}

/// The token of a runner registered with `registration`.
async fn runner_token(server: &TestServer, registration: &str) -> String {
    let answer: serde_json::Value = server
        .http()
        .post(server.api("/api/v1/runner/register"))
        .bearer_auth(registration)
        .json(&serde_json::json!({"name": "matrix-runner", "labels": ["matrix"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    answer["runner_token"]
        .as_str()
        .expect("a runner token")
        .to_string()
}

/// A web UI session: the `Cookie` header a signed-in browser sends, and the CSRF token its pages
/// hand to the page script.
struct WebSession {
    cookie: String,
    csrf: String,
}

impl WebSession {
    /// Signs in through the web UI's form with `token`.
    async fn sign_in(server: &TestServer, token: &str) -> WebSession {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("a client can be built");
        let form = form_urlencoded::Serializer::new(String::new())
            .append_pair("token", token)
            .append_pair("next", "/")
            .finish();
        let resp = http
            .post(server.api("/login"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form)
            .send()
            .await
            .expect("POST /login");
        assert_eq!(resp.status(), 303, "signing in to the web UI");
        let cookie = resp.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_string();
        let page = http
            .get(server.api("/"))
            .header("cookie", &cookie)
            .send()
            .await
            .expect("GET /")
            .text()
            .await
            .unwrap();
        let marker = r#"<meta name="csrf-token" content=""#;
        let start = page.find(marker).expect("the page carries a CSRF token") + marker.len();
        let len = page[start..].find('"').expect("the attribute ends");
        WebSession {
            csrf: page[start..start + len].to_string(),
            cookie,
        }
    }
}

/// The token printed by `token create` (its last word).
fn last_word(out: &str) -> String {
    out.split_whitespace()
        .last()
        .expect("the CLI printed a token")
        .to_string()
}
