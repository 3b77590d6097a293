//! The web UI's authorisation matrix: every page and form × every kind of browser caller → what it
//! must answer.
//!
//! The matrix is data ([`MATRIX`]); the test walks the web router's own route table
//! (`web::route_table()`, which `web::router()` is built from) and fails when it names a route the
//! matrix has no row for, or the other way round, so a page or form cannot ship without deciding
//! who may open or post it.
//! A `303` is told apart by where it goes: to the sign-in page (no usable session), elsewhere (the
//! action was done), or with the session cookie set or cleared (sign-in, sign-out).
//! Every cell runs against a fresh pipeline and run, and after each cell that can change state
//! the test checks that an allowed request did its work and a refused one did nothing.
//! The client never follows redirects.

use std::collections::BTreeSet;
use std::time::Duration;

use outpost_server::web::session;
use outpost_tests::outpost_protocol::{JobStatus, RunStatus};
use outpost_tests::{Backend, Scope, TestServer, apply_and_trigger, backend_tests, test_db};
use reqwest::header::{COOKIE, LOCATION, ORIGIN, SET_COOKIE};

backend_tests!(every_web_route_answers_every_browser_caller_as_the_matrix_says);

/// The kinds of browser caller, in the order of the matrix's columns.
///
/// Each sends the credentials its name says and, for a form, the CSRF token that belongs with
/// them, so that only one thing is wrong in each refused cell; every form also carries the
/// server's own `Origin`, as a browser would, except in `cross_site`.
const CALLERS: [&str; 13] = [
    "none",            // no cookie (the form carries the admin session's CSRF token)
    "read",            // a session cookie of a token with the read scope, and its CSRF token
    "trigger",         // … the trigger scope
    "invoke",          // … the invoke scope
    "admin",           // … the admin scope
    "revoked",         // an admin session whose token was revoked after it signed in
    "expired_session", // an admin session cookie whose own expiry has passed
    "expired_token",   // an unexpired session cookie holding an admin token that has expired
    "tampered",        // an admin session cookie with one character of its ciphertext changed
    "bearer",          // an admin API token as `Authorization: Bearer`, no cookie
    "no_csrf",         // an admin session, the form without its `csrf` field
    "other_csrf",      // an admin session, the form with the read session's CSRF token
    "cross_site",      // an admin session and its CSRF token, `Origin: https://evil.example`
];

/// What a cell must answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// `200`: the page.
    Page,
    /// `303` to `/login?next=…` without touching the cookie: no usable session.
    Login,
    /// `303` elsewhere: the form's action was done.
    Done,
    /// `303` that sets a session cookie.
    SignedIn,
    /// `303` to `/login` that clears the session cookie.
    SignedOut,
    /// `403` (scope too small, CSRF token missing or wrong, or a form from another site).
    Forbidden,
    /// Anything else, for reporting.
    Other(u16),
}

use Want::{Done, Forbidden as F, Login as L, Page as P, SignedIn, SignedOut};

/// Open to everyone: the sign-in form and the static assets.
const PUBLIC: [Want; 13] = [P; 13];
/// A page any signed-in person may see; the bearer token opens no page (the UI reads only its
/// cookie), and a `GET` needs no CSRF token and has no `Origin` to check.
const VIEW: [Want; 13] = [L, P, P, P, P, L, L, L, L, L, P, P, P];
/// A page for admins only.
const ADMIN_VIEW: [Want; 13] = [L, F, F, F, P, L, L, L, L, L, P, P, P];
/// A form that needs the trigger scope (cancel, re-run, run a pipeline).
const CHANGE: [Want; 13] = [L, F, Done, Done, Done, L, L, L, L, L, F, F, F];
/// The Run command form: the invoke scope, or admin.
const INVOKE: [Want; 13] = [L, F, F, Done, Done, L, L, L, L, L, F, F, F];
/// Signing out needs a session and its CSRF token, at any scope.
const LOGOUT: [Want; 13] = [
    L, SignedOut, SignedOut, SignedOut, SignedOut, L, L, L, L, L, F, F, F,
];
/// Signing in (the form carries a valid read token) ignores any session, but not another site.
const LOGIN: [Want; 13] = [
    SignedIn, SignedIn, SignedIn, SignedIn, SignedIn, SignedIn, SignedIn, SignedIn, SignedIn,
    SignedIn, SignedIn, SignedIn, F,
];

/// What an allowed request changes, checked after every cell of its row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    /// Nothing on the server.
    Nothing,
    /// The cell's run is cancelled.
    RunCancelled,
    /// The cell's job is cancelled.
    JobCancelled,
    /// The cell's pipeline has a second run.
    NewRun,
    /// An invoke with the cell's command is in the audit trail.
    Invoked,
}

/// method, path (as `web::route_table()` spells it), expected answer per caller, effect.
const MATRIX: &[(&str, &str, [Want; 13], Effect)] = &[
    ("GET", "/", VIEW, Effect::Nothing),
    ("GET", "/login", PUBLIC, Effect::Nothing),
    ("POST", "/login", LOGIN, Effect::Nothing),
    ("POST", "/logout", LOGOUT, Effect::Nothing),
    ("GET", "/runs/{id}", VIEW, Effect::Nothing),
    ("POST", "/runs/{id}/cancel", CHANGE, Effect::RunCancelled),
    ("POST", "/runs/{id}/rerun", CHANGE, Effect::NewRun),
    ("GET", "/jobs/{id}", VIEW, Effect::Nothing),
    ("POST", "/jobs/{id}/cancel", CHANGE, Effect::JobCancelled),
    ("GET", "/runners", VIEW, Effect::Nothing),
    ("POST", "/runners/invoke", INVOKE, Effect::Invoked),
    ("GET", "/pipelines", VIEW, Effect::Nothing),
    ("GET", "/pipelines/{name}", VIEW, Effect::Nothing),
    ("POST", "/pipelines/{name}/run", CHANGE, Effect::NewRun),
    ("GET", "/webhooks", ADMIN_VIEW, Effect::Nothing),
    ("GET", "/static/app.css", PUBLIC, Effect::Nothing),
    ("GET", "/static/app.js", PUBLIC, Effect::Nothing),
];

const PIPELINE: &str = r#"
jobs:
  deploy:
    runs_on: [web-matrix]
    steps:
      - run: echo "never run, no runner has this label"
"#;

const EVIL_ORIGIN: &str = "https://evil.example";

/// What one column sends.
#[derive(Debug, Clone, Default)]
struct Credentials {
    /// The session cookie's value.
    cookie: Option<String>,
    /// The `csrf` form field.
    csrf: Option<String>,
    /// An `Authorization: Bearer` token.
    bearer: Option<String>,
    /// Whether the form comes from another site.
    cross_site: bool,
}

async fn every_web_route_answers_every_browser_caller_as_the_matrix_says(backend: Backend) {
    // The matrix and the router's table must name the same routes.
    let matrix: BTreeSet<(String, String)> = MATRIX
        .iter()
        .map(|(m, p, _, _)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(
        matrix.len(),
        MATRIX.len(),
        "the web matrix has a duplicate row"
    );
    let router: BTreeSet<(String, String)> = outpost_server::web::route_table()
        .iter()
        .map(|r| (r.method.as_str().to_string(), r.path.to_string()))
        .collect();
    let missing: Vec<_> = router.difference(&matrix).collect();
    assert!(
        missing.is_empty(),
        "web routes without rows in the web authorisation matrix: {missing:?}"
    );
    let extra: Vec<_> = matrix.difference(&router).collect();
    assert!(
        extra.is_empty(),
        "web matrix rows for routes the web router does not have: {extra:?}"
    );

    let db = test_db!(backend);
    // The data dir is the test's own, so that the session key is reachable to forge expired
    // sessions with: the server makes the key on the first sign-in.
    let data_dir = tempfile::Builder::new()
        .prefix("outpost-web-matrix-")
        .tempdir()
        .expect("a temporary directory can be created");
    let data_path = data_dir.path().to_str().expect("a UTF-8 temporary path");
    let server = TestServer::start(&db, &[("OUTPOST__DATA_DIR", data_path)]).await;
    let admin_api = server.client();
    let browser = Browser::new(&server);

    let admin = server.admin_token().to_string();
    let read = server.token(Scope::Read).await;
    let trigger = server.token(Scope::Trigger).await;
    let invoke = server.token(Scope::Invoke).await;
    let doomed = last_word(
        &server
            .cli(&[
                "token",
                "create",
                "--name",
                "web-revoked",
                "--scope",
                "admin",
            ])
            .await,
    );
    let expired = last_word(
        &server
            .cli(&[
                "token",
                "create",
                "--name",
                "web-expired",
                "--scope",
                "admin",
                "--expires-in-days",
                "0",
            ])
            .await,
    );

    // Real sessions, through the sign-in form, with the CSRF tokens their pages hand out.
    let mut columns: Vec<Credentials> = vec![Credentials::default(); CALLERS.len()];
    let col = |name: &str| CALLERS.iter().position(|c| *c == name).unwrap();
    for (name, token) in [
        ("read", &read),
        ("trigger", &trigger),
        ("invoke", &invoke),
        ("admin", &admin),
        ("revoked", &doomed),
    ] {
        let cookie = browser.sign_in(token).await;
        let csrf = browser.csrf_of(&cookie).await;
        columns[col(name)] = Credentials {
            cookie: Some(cookie),
            csrf: Some(csrf),
            ..Default::default()
        };
    }
    server.cli(&["token", "revoke", "web-revoked"]).await;
    let admin_session = columns[col("admin")].clone();

    let key: [u8; 32] = std::fs::read(data_dir.path().join("web-session.key"))
        .expect("the server keeps its session key in the data dir")
        .try_into()
        .expect("the session key is 32 bytes");
    let forged = |token: &str, expires: i64| {
        let cookie = session::seal(&key, token, expires);
        Credentials {
            csrf: Some(session::csrf(&key, &cookie)),
            cookie: Some(cookie),
            ..Default::default()
        }
    };
    columns[col("expired_session")] = forged(&admin, session::now() - 60);
    columns[col("expired_token")] = forged(&expired, session::now() + 3600);
    let mut tampered = admin_session.cookie.clone().unwrap().into_bytes();
    // The middle of the value is ciphertext (the first 32 characters are the nonce).
    let i = tampered.len() / 2;
    tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
    columns[col("tampered")] = Credentials {
        cookie: Some(String::from_utf8(tampered).unwrap()),
        ..admin_session.clone()
    };
    columns[col("none")] = Credentials {
        cookie: None,
        ..admin_session.clone()
    };
    columns[col("bearer")] = Credentials {
        cookie: None,
        bearer: Some(admin.clone()),
        ..admin_session.clone()
    };
    columns[col("no_csrf")] = Credentials {
        csrf: None,
        ..admin_session.clone()
    };
    columns[col("other_csrf")] = Credentials {
        csrf: columns[col("read")].csrf.clone(),
        ..admin_session.clone()
    };
    columns[col("cross_site")] = Credentials {
        cross_site: true,
        ..admin_session.clone()
    };

    let mut failures = Vec::new();
    let mut cells = 0;
    for (n, (method, path, expected, effect)) in MATRIX.iter().enumerate() {
        for (c, caller) in CALLERS.iter().enumerate() {
            // Fresh objects: a pipeline of its own with one queued run.
            let tag = format!("web-m{n}-{c}");
            let run = apply_and_trigger(&admin_api, &tag, PIPELINE, &[]).await;
            let job = run.jobs[0].id;
            let url = path.replace("{name}", &tag).replace(
                "{id}",
                &if path.starts_with("/runs/") {
                    run.id
                } else {
                    job
                }
                .to_string(),
            );
            let creds = &columns[c];
            let mut form = form_urlencoded::Serializer::new(String::new());
            if let Some(csrf) = &creds.csrf {
                form.append_pair("csrf", csrf);
            }
            match *path {
                "/login" => {
                    form.append_pair("token", &read).append_pair("next", "/");
                }
                "/runners/invoke" => {
                    form.append_pair("command", &format!("echo {tag}"))
                        .append_pair("labels", "web-matrix")
                        .append_pair("timeout", "5m");
                }
                "/pipelines/{name}/run" => {
                    form.append_pair("ref", "main")
                        .append_pair("sha", "")
                        .append_pair("variables", "");
                }
                _ => {}
            }
            let resp = browser
                .send(
                    method,
                    &url,
                    creds,
                    (*method == "POST").then(|| form.finish()),
                )
                .await;
            let got = classify(&resp);
            cells += 1;
            if got != expected[c] {
                let body = resp.text().await.unwrap_or_default();
                let body: String = body.chars().take(200).collect();
                failures.push(format!(
                    "{method} {path} as {caller}: expected {:?}, got {got:?} {body}",
                    expected[c]
                ));
                continue;
            }
            let done = matches!(expected[c], Done);
            let happened = match effect {
                Effect::Nothing => continue,
                Effect::RunCancelled => {
                    admin_api.get_run(run.id).await.unwrap().status == RunStatus::Cancelled
                }
                Effect::JobCancelled => {
                    admin_api.get_job(job).await.unwrap().status == JobStatus::Cancelled
                }
                Effect::NewRun => {
                    admin_api
                        .list_runs(Some(&tag), None, None, None)
                        .await
                        .unwrap()
                        .runs
                        .len()
                        == 2
                }
                Effect::Invoked => admin_api
                    .list_audit(Some("invoke"), Some(20), None)
                    .await
                    .unwrap()
                    .events
                    .iter()
                    .any(|e| e.command.as_deref() == Some(&format!("echo {tag}"))),
            };
            if happened != done {
                failures.push(format!(
                    "{method} {path} as {caller}: answered {got:?} but the {effect:?} effect {}",
                    if happened {
                        "happened"
                    } else {
                        "did not happen"
                    }
                ));
            }
        }
    }
    println!(
        "web authorisation matrix: {} routes × {} callers = {cells} cells, {} wrong",
        MATRIX.len(),
        CALLERS.len(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "cells that answered differently from the web matrix:\n{}",
        failures.join("\n")
    );

    // Signing in needs a token that authenticates now.
    for (what, token) in [
        ("unknown", "op_not_a_token".to_string()),
        ("revoked", doomed),
        ("expired", expired),
    ] {
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("token", &token).append_pair("next", "/");
        let resp = browser
            .send(
                "POST",
                "/login",
                &Credentials::default(),
                Some(form.finish()),
            )
            .await;
        assert_eq!(resp.status(), 401, "signing in with an {what} token");
        assert!(
            resp.headers().get(SET_COOKIE).is_none(),
            "signing in with an {what} token sets no cookie"
        );
    }
}

/// A browser that follows no redirects and keeps no cookies: each request says what it sends.
struct Browser {
    http: reqwest::Client,
    base: String,
}

impl Browser {
    fn new(server: &TestServer) -> Browser {
        Browser {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(60))
                .build()
                .expect("a client can be built"),
            base: server.url().to_string(),
        }
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        creds: &Credentials,
        form: Option<String>,
    ) -> reqwest::Response {
        let mut req = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(c) = &creds.cookie {
            req = req.header(COOKIE, format!("{}={c}", session::COOKIE));
        }
        if let Some(t) = &creds.bearer {
            req = req.bearer_auth(t);
        }
        if let Some(body) = form {
            let origin = if creds.cross_site {
                EVIL_ORIGIN
            } else {
                &self.base
            };
            req = req
                .header(ORIGIN, origin)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(body);
        }
        req.send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// Signs in with `token` through the form and returns the session cookie's value.
    async fn sign_in(&self, token: &str) -> String {
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("token", token).append_pair("next", "/");
        let resp = self
            .send(
                "POST",
                "/login",
                &Credentials::default(),
                Some(form.finish()),
            )
            .await;
        assert_eq!(classify(&resp), SignedIn, "signing in");
        session_cookie(&resp).expect("signing in sets the session cookie")
    }

    /// The CSRF token the runs page hands out to the session `cookie`.
    async fn csrf_of(&self, cookie: &str) -> String {
        let creds = Credentials {
            cookie: Some(cookie.to_string()),
            ..Default::default()
        };
        let resp = self.send("GET", "/", &creds, None).await;
        assert_eq!(resp.status(), 200, "the runs page opens for a session");
        let page = resp.text().await.unwrap();
        let marker = r#"<meta name="csrf-token" content=""#;
        let start = page.find(marker).expect("the page carries a CSRF token") + marker.len();
        let len = page[start..].find('"').expect("the attribute ends");
        page[start..start + len].to_string()
    }
}

/// The value of the `Set-Cookie` for the session, if the response has one.
fn session_cookie(resp: &reqwest::Response) -> Option<String> {
    let prefix = format!("{}=", session::COOKIE);
    resp.headers()
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| v.strip_prefix(&prefix))
        .map(|v| v.split(';').next().unwrap_or("").to_string())
}

/// What an answer means, in the matrix's terms.
fn classify(resp: &reqwest::Response) -> Want {
    let status = resp.status().as_u16();
    match status {
        200 => Want::Page,
        403 => Want::Forbidden,
        303 => {
            let location = resp
                .headers()
                .get(LOCATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            match session_cookie(resp) {
                Some(v) if v.is_empty() && location == "/login" => Want::SignedOut,
                Some(v) if !v.is_empty() => Want::SignedIn,
                Some(_) => Want::Other(status),
                None if location.starts_with("/login?next=") => Want::Login,
                None if location.starts_with('/') && !location.starts_with("/login") => Want::Done,
                None => Want::Other(status),
            }
        }
        _ => Want::Other(status),
    }
}

/// The token printed by `token create` (its last word).
fn last_word(out: &str) -> String {
    out.split_whitespace()
        .last()
        .expect("the CLI printed a token")
        .to_string()
}
