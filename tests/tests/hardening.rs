//! Hardening: credentials never reach the database in plaintext, every kind of route refuses an
//! oversized body, repeated failed authentication from one address is throttled without
//! throttling valid traffic, and UI pages carry the security headers.

use std::time::Duration;

use bytes::Bytes;
use outpost_tests::outpost_protocol::{
    RegisterRequest, RegisterResponse, TriggerRunRequest, VERSION,
};
use outpost_tests::{Backend, SECRETS_KEY_ENV, Scope, TestServer, backend_tests, eventually};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, RETRY_AFTER};
use uuid::Uuid;

backend_tests!(
    no_credential_is_stored_in_plaintext,
    every_kind_of_route_refuses_an_oversized_body,
    failed_authentication_is_throttled_per_address,
    ui_pages_carry_the_security_headers,
);

/// Searches `haystack` for `needle` as raw bytes and as lowercase hex (how `pg_dump` shows
/// `bytea` and how a careless implementation might store a value "encoded").
fn contains(haystack: &[u8], needle: &str) -> bool {
    let raw = needle.as_bytes();
    let hex = hex::encode(raw);
    haystack.windows(raw.len()).any(|w| w == raw)
        || haystack.windows(hex.len()).any(|w| w == hex.as_bytes())
}

/// Every byte the database holds: the SQLite file with its WAL and shared-memory files, or a
/// `pg_dump` of the PostgreSQL database (every table, every column, `bytea` as hex).
async fn database_bytes(backend: Backend, db_url: &str) -> Vec<u8> {
    match backend {
        Backend::Sqlite => {
            let path = db_url
                .strip_prefix("sqlite://")
                .expect("a sqlite:// URL")
                .split('?')
                .next()
                .unwrap();
            let mut all = Vec::new();
            for suffix in ["", "-wal", "-shm", "-journal"] {
                if let Ok(bytes) = std::fs::read(format!("{path}{suffix}")) {
                    all.extend_from_slice(&bytes);
                }
            }
            assert!(!all.is_empty(), "the SQLite file {path} was not found");
            all
        }
        Backend::Postgres => {
            let out = tokio::process::Command::new("pg_dump")
                .args(["--data-only", "--no-owner", "--dbname", db_url])
                .output()
                .await
                .expect("pg_dump runs");
            assert!(
                out.status.success(),
                "pg_dump failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            out.stdout
        }
    }
}

async fn no_credential_is_stored_in_plaintext(backend: Backend) {
    let db = outpost_tests::test_db!(backend);
    let server = TestServer::start(&db, &[SECRETS_KEY_ENV]).await;
    let admin = server.client();

    // Credentials of every kind, each created the way a user creates it.
    let read_token = server.token(Scope::Read).await;
    let spare_registration = server.registration_token().await;
    let registration = server.registration_token().await;
    let registered = register(&server, &registration, "hardening").await;
    let runner = server.client_with(Some(registered.runner_token.clone()));
    let secret_value = format!("hunter2-{}", Uuid::now_v7().simple());
    let pipeline_secret = format!("pipeline-only-{}", Uuid::now_v7().simple());
    let put = |name: &'static str, query: &'static str, value: String| {
        server
            .http()
            .put(server.api(&format!("/api/v1/secrets/{name}{query}")))
            .bearer_auth(server.admin_token())
            .body(value)
            .send()
    };
    let resp = put("DEPLOY_KEY", "", secret_value.clone()).await.unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::CREATED,
        "{:?}",
        resp.text().await
    );
    let resp = put("SCOPED", "?pipeline=hardening", pipeline_secret.clone())
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::CREATED,
        "{:?}",
        resp.text().await
    );

    // A marker that is stored in plaintext (the pipeline's description): finding it proves the
    // search below reads what the server wrote, so not finding the credentials means something.
    let marker = format!("hardening-marker-{}", Uuid::now_v7().simple());
    let yaml = format!(
        "description: {marker}\nsecrets: [DEPLOY_KEY, SCOPED]\njobs:\n  j:\n    runs_on: [hardening]\n    steps:\n      - run: echo hi\n"
    );
    admin
        .apply_pipeline("hardening", &yaml)
        .await
        .expect("the pipeline applies");
    admin
        .trigger_run("hardening", &TriggerRunRequest::default())
        .await
        .expect("a run starts");
    let acquired = runner
        .acquire(Duration::from_secs(10))
        .await
        .expect("acquire answers")
        .expect("the job is handed out");
    assert_eq!(
        acquired.job.secrets.get("DEPLOY_KEY"),
        Some(&secret_value),
        "the job carries its secret, so the server did hold it"
    );
    let lease = acquired.lease.token.clone();
    runner
        .heartbeat(acquired.job.id, &lease)
        .await
        .expect("the lease is valid");

    let bytes = database_bytes(backend, db.url()).await;
    assert!(
        contains(&bytes, &marker),
        "the plaintext marker was not found: the search does not see the database's contents"
    );
    let credentials = [
        ("the admin API token", server.admin_token().to_string()),
        ("a read API token", read_token),
        ("an unused registration token", spare_registration),
        ("a used registration token", registration),
        ("a runner token", registered.runner_token),
        ("a lease token", lease),
        ("a global secret", secret_value),
        ("a pipeline secret", pipeline_secret),
    ];
    for (what, value) in &credentials {
        assert!(
            !contains(&bytes, value),
            "{what} is stored in plaintext in the {backend:?} database"
        );
    }
}

/// Asserts that an oversized body was refused: a `413`, or, when the server answered before the
/// client had finished writing, a connection the server closed under the body (the client then
/// sees a send error instead of the answer). Any other answer fails.
fn assert_refused(what: &str, result: Result<reqwest::Response, reqwest::Error>) {
    match result {
        Ok(resp) => assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE, "{what}"),
        Err(e) => assert!(
            !e.is_timeout() && (e.is_request() || e.is_body()),
            "{what}: {e:?}"
        ),
    }
}

/// Registers a runner labelled `label` with `registration` and returns its credentials.
async fn register(server: &TestServer, registration: &str, label: &str) -> RegisterResponse {
    server
        .client_with(Some(registration.to_string()))
        .register(&RegisterRequest {
            name: format!("{label}-runner"),
            labels: vec![label.into()],
            version: VERSION.into(),
            os: std::env::consts::OS.into(),
            arch: std::env::consts::ARCH.into(),
            clusters: Vec::new(),
        })
        .await
        .expect("the runner registers")
}

/// A body of `len` bytes sent in two chunks without a `Content-Length`, so only a limit applied
/// while reading can stop it. It is just over the limit it tests: a client still writing a large
/// rest when the server answers `413` and closes would see a broken pipe instead of the answer.
fn chunked(len: usize) -> reqwest::Body {
    let chunks = [
        Ok::<_, std::io::Error>(Bytes::from(vec![b'a'; len - 1])),
        Ok(Bytes::from_static(b"a")),
    ];
    reqwest::Body::wrap_stream(futures::stream::iter(chunks))
}

async fn every_kind_of_route_refuses_an_oversized_body(backend: Backend) {
    const API_LIMIT: usize = 64 * 1024;
    const HOOK_LIMIT: usize = 32 * 1024;
    let db = outpost_tests::test_db!(backend);
    let server = TestServer::start(
        &db,
        &[
            SECRETS_KEY_ENV,
            ("OUTPOST__SERVER__MAX_BODY_BYTES", "65536"),
            ("OUTPOST__WEBHOOKS__MAX_BODY_BYTES", "32768"),
        ],
    )
    .await;
    let runner = register(&server, &server.registration_token().await, "limits").await;
    let registration = server.registration_token().await;
    let admin = server.admin_token().to_string();
    let job = Uuid::now_v7();
    let run = Uuid::now_v7();
    // (method, path, bearer token): one route of every kind that takes a body.
    let api_routes: Vec<(reqwest::Method, String, Option<String>)> = vec![
        (
            reqwest::Method::PUT,
            "/api/v1/pipelines/big".into(),
            Some(admin.clone()),
        ),
        (
            reqwest::Method::POST,
            "/api/v1/pipelines/big/runs".into(),
            Some(admin.clone()),
        ),
        (
            reqwest::Method::PUT,
            "/api/v1/secrets/BIG".into(),
            Some(admin.clone()),
        ),
        (
            reqwest::Method::POST,
            "/api/v1/runner/register".into(),
            Some(registration),
        ),
        (
            reqwest::Method::POST,
            "/api/v1/runner/acquire".into(),
            Some(runner.runner_token.clone()),
        ),
        (
            reqwest::Method::PUT,
            format!("/api/v1/runner/jobs/{job}/log?offset=0"),
            Some("lease".into()),
        ),
        (
            reqwest::Method::POST,
            format!("/api/v1/runner/jobs/{job}/steps/0"),
            Some("lease".into()),
        ),
        (
            reqwest::Method::POST,
            format!("/api/v1/runner/jobs/{job}/complete"),
            Some("lease".into()),
        ),
        (reqwest::Method::POST, "/login".into(), None),
        (
            reqwest::Method::POST,
            format!("/runs/{run}/cancel"),
            Some(admin.clone()),
        ),
        // A route that never reads its body is refused too, before it runs.
        (
            reqwest::Method::GET,
            "/api/v1/runs".into(),
            Some(admin.clone()),
        ),
    ];
    let hook_routes = [
        "/hooks/github",
        "/hooks/gitlab",
        "/hooks/azure-devops",
        "/hooks/generic/big",
    ];
    let send = |method: reqwest::Method, path: &str, token: Option<&str>, body: reqwest::Body| {
        // Forms for the web UI, JSON for the rest, so no route refuses the type before the size.
        let content_type = if path.starts_with("/login") || path.starts_with("/runs/") {
            "application/x-www-form-urlencoded"
        } else {
            "application/json"
        };
        let mut req = server
            .http()
            .request(method, server.api(path))
            .header(CONTENT_TYPE, content_type)
            .body(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    for (method, path, token) in &api_routes {
        let declared = send(
            method.clone(),
            path,
            token.as_deref(),
            vec![b'a'; 2 * API_LIMIT].into(),
        )
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e:?}"));
        assert_eq!(
            declared.status(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "{method} {path} with a declared oversized body"
        );
        // The unread rest of the body spoils the connection: the answer must say it closes it,
        // or a pooling client sends its next request into a closing connection.
        assert_eq!(
            declared
                .headers()
                .get(reqwest::header::CONNECTION)
                .and_then(|v| v.to_str().ok()),
            Some("close"),
            "{method} {path}: a 413 answer closes the connection"
        );
        let body = declared.text().await.unwrap();
        assert!(
            body.contains("payload_too_large"),
            "{method} {path}: {body}"
        );
        // A route that refuses the caller before it reads the body needs no limit while reading.
        if *method == reqwest::Method::GET || path.starts_with("/runs/") {
            continue;
        }
        let streamed = send(
            method.clone(),
            path,
            token.as_deref(),
            chunked(API_LIMIT + 1),
        )
        .await;
        assert_refused(
            &format!("{method} {path} with a chunked oversized body"),
            streamed,
        );
    }
    for path in hook_routes {
        // Above the webhook limit but below the API's: the webhook limit applies to webhooks.
        for body in [
            reqwest::Body::from(vec![b'a'; HOOK_LIMIT + 1024]),
            chunked(HOOK_LIMIT + 1),
            reqwest::Body::from(vec![b'a'; 2 * API_LIMIT]),
        ] {
            let resp = send(reqwest::Method::POST, path, None, body).await;
            assert_refused(&format!("POST {path}"), resp);
        }
    }
    // Bodies at the limit still get through to the handlers (which refuse them for what they
    // say, not for their size).
    let resp = send(
        reqwest::Method::PUT,
        "/api/v1/pipelines/big",
        Some(&admin),
        vec![b'a'; API_LIMIT].into(),
    )
    .await
    .unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::BAD_REQUEST,
        "a body at the limit is read"
    );
    let resp = send(
        reqwest::Method::POST,
        "/hooks/github",
        None,
        vec![b'a'; HOOK_LIMIT].into(),
    )
    .await
    .unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::UNAUTHORIZED,
        "unsigned, not too large"
    );
}

async fn failed_authentication_is_throttled_per_address(backend: Backend) {
    let db = outpost_tests::test_db!(backend);
    let server = TestServer::start(
        &db,
        &[
            ("OUTPOST__SERVER__AUTH_FAILURES_MAX", "5"),
            ("OUTPOST__SERVER__AUTH_FAILURE_WINDOW_SECS", "60"),
            ("OUTPOST__SERVER__AUTH_BLOCK_SECS", "3"),
            ("OUTPOST__SERVER__AUTH_THROTTLE_LOOPBACK", "true"),
        ],
    )
    .await;
    let get = |token: Option<&str>| {
        let mut req = server.http().get(server.api("/api/v1/pipelines"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    // Plenty of valid traffic (several runners behind one NAT, say) counts for nothing.
    let runner = server.fake_runner("behind-nat", &["nat"]).await;
    let acquire = || runner.client.acquire(Duration::ZERO);
    for _ in 0..40 {
        assert_eq!(
            get(Some(server.admin_token())).await.unwrap().status(),
            StatusCode::OK
        );
        acquire().await.expect("valid traffic is never throttled");
    }
    let fresh_token = server.token(Scope::Read).await;

    for i in 1..=5 {
        let resp = get(Some("not-a-token")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "failure {i}");
    }
    let resp = get(Some("another-guess")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = resp
        .headers()
        .get(RETRY_AFTER)
        .expect("a Retry-After header")
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After in seconds");
    assert!((1..=3).contains(&retry), "Retry-After {retry}");
    let body = resp.text().await.unwrap();
    assert!(body.contains("too_many_failed_authentications"), "{body}");
    assert_eq!(
        get(None).await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS,
        "no credential at all is throttled too"
    );
    assert_eq!(
        get(Some(&fresh_token)).await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS,
        "a credential not yet seen from the address waits like the rest"
    );

    // Credentials that already authenticated from the address keep working during the block.
    assert_eq!(
        get(Some(server.admin_token())).await.unwrap().status(),
        StatusCode::OK
    );
    acquire()
        .await
        .expect("a runner that authenticated before is not throttled");

    // The block is bounded: afterwards a wrong token is simply refused again.
    eventually("the block ends", Duration::from_secs(15), || async {
        let status = get(Some("not-a-token")).await.unwrap().status();
        if status == StatusCode::UNAUTHORIZED {
            Ok(())
        } else {
            Err(format!("a wrong token still gets {status}"))
        }
    })
    .await;
    assert_eq!(
        get(Some(&fresh_token)).await.unwrap().status(),
        StatusCode::OK
    );
}

async fn ui_pages_carry_the_security_headers(backend: Backend) {
    let db = outpost_tests::test_db!(backend);
    let server = TestServer::start(&db, &[]).await;
    // A client that does not follow redirects, so every response (the login redirect too) is seen.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = http
        .post(server.api("/login"))
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(format!("token={}&next=%2F", server.admin_token()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER, "the login succeeds");
    check_headers("POST /login", &resp);
    let cookie = resp
        .headers()
        .get(reqwest::header::SET_COOKIE)
        .expect("a session cookie")
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    for path in [
        "/login",
        "/",
        "/runners",
        "/pipelines",
        "/webhooks",
        "/static/app.js",
    ] {
        let resp = http
            .get(server.api(path))
            .header(reqwest::header::COOKIE, &cookie)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "GET {path}: {}", resp.status());
        check_headers(path, &resp);
        let html = resp.text().await.unwrap();
        if path != "/static/app.js" {
            for (i, _) in html.match_indices("<script") {
                let tag = &html[i..html[i..].find('>').map_or(html.len(), |e| i + e)];
                assert!(tag.contains("src="), "{path} has an inline script: {tag}");
            }
            assert!(!html.contains(" style=\""), "{path} has an inline style");
        }
    }
}

fn check_headers(what: &str, resp: &reqwest::Response) {
    let h = |name: &str| {
        resp.headers()
            .get(name)
            .unwrap_or_else(|| panic!("{what} has no {name} header"))
            .to_str()
            .unwrap()
            .to_string()
    };
    let csp = h("content-security-policy");
    for directive in [
        "default-src 'self'",
        "script-src 'self'",
        "frame-ancestors 'none'",
        "object-src 'none'",
        "base-uri 'none'",
    ] {
        assert!(
            csp.contains(directive),
            "{what}: CSP {csp:?} lacks {directive}"
        );
    }
    assert!(
        !csp.contains("unsafe-inline"),
        "{what}: CSP allows inline code"
    );
    assert!(!csp.contains("unsafe-eval"), "{what}: CSP allows eval");
    assert_eq!(h("x-frame-options"), "DENY", "{what}");
    assert_eq!(h("x-content-type-options"), "nosniff", "{what}");
    // `same-origin`: the server's own pages get the referrer, no other origin does.
    assert_eq!(h("referrer-policy"), "same-origin", "{what}");
}
