//! Webhooks end to end: the forges' own example deliveries (stored complete under
//! `fixtures/webhooks/`, see its README), signed the way each forge signs them, sent through the
//! real router (`oneshot`) to a real SQLite file or PostgreSQL database. Every accepted delivery
//! must start exactly the runs its pipelines' triggers select, and nothing else may start any.

#[macro_use]
mod common;

use common::{Backend, TestDb};

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use base64::Engine;
use hmac::{Hmac, Mac};
use outpost_protocol::{Run, TriggerKind};
use outpost_server::Store;
use outpost_server::api::{AppState, router};
use outpost_server::secrets::Redacted;
use outpost_server::settings::GenericHookSettings;
use outpost_server::store::{Scope, WebhookDeliveryList};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use uuid::Uuid;

const GITHUB_SECRET: &str = "It's a Secret to Everybody";
const GITLAB_TOKEN: &str = "gl-t0ken-5e3a";
const ADO_USER: &str = "outpost";
const ADO_PASSWORD: &str = "ad0-Pa55-77c1";
const ADO_HEADER: &str = "X-Outpost-Token";
const ADO_HEADER_VALUE: &str = "ad0-header-9f2b";
const GENERIC_SECRET: &str = "generic-s3cret-4d1e";
const MAX_BODY: usize = 64 * 1024;

// ---------------------------------------------------------------------------------------------
// Set-up: a database per test, the router, signing as the forges do.
// ---------------------------------------------------------------------------------------------

struct Env {
    _db: TestDb,
    state: AppState,
    admin: String,
    read: String,
}

/// A fresh store with every webhook source configured, or `None` when PostgreSQL was asked for
/// and is not there.
async fn env(backend: Backend) -> Option<Env> {
    let db = TestDb::new(backend).await?;
    let mut settings = db.settings();
    // Smaller than every GitHub fixture: webhooks must have a limit of their own.
    settings.server.max_body_bytes = 4 * 1024;
    settings.secrets.key = Some(Redacted(outpost_server::secrets::generate_key()));
    let hooks = &mut settings.webhooks;
    hooks.max_body_bytes = MAX_BODY;
    hooks.github.secret = Some(Redacted(GITHUB_SECRET.into()));
    hooks.gitlab.token = Some(Redacted(GITLAB_TOKEN.into()));
    hooks.azure_devops.username = Some(ADO_USER.into());
    hooks.azure_devops.password = Some(Redacted(ADO_PASSWORD.into()));
    hooks.azure_devops.header_name = Some(ADO_HEADER.into());
    hooks.azure_devops.header_value = Some(Redacted(ADO_HEADER_VALUE.into()));
    for name in ["hook", "hook_plain", "nowhere"] {
        hooks.generic.insert(
            name.into(),
            GenericHookSettings {
                secret: Some(Redacted(GENERIC_SECRET.into())),
            },
        );
    }
    let store: Arc<Store> = outpost_server::open_store(&settings)
        .await
        .expect("the store opens");
    let (_, admin) = store
        .create_api_token("admin", Scope::Admin, None)
        .await
        .unwrap();
    let (_, read) = store
        .create_api_token("reader", Scope::Read, None)
        .await
        .unwrap();
    Some(Env {
        _db: db,
        state: AppState {
            store,
            settings: Arc::new(settings),
            shutdown: CancellationToken::new(),
            entra: None,
        },
        admin,
        read,
    })
}

/// What a delivery was answered with.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    json: Value,
}

impl Answer {
    fn outcome(&self) -> &str {
        self.json["outcome"].as_str().unwrap_or_default()
    }

    fn run_ids(&self) -> BTreeSet<String> {
        self.json["run_ids"]
            .as_array()
            .map(|ids| {
                ids.iter()
                    .map(|i| i.as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn pipelines(&self) -> BTreeSet<String> {
        self.json["runs"]
            .as_array()
            .map(|runs| {
                runs.iter()
                    .map(|r| r["pipeline"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn reason(&self) -> String {
        self.json["reason"]
            .as_str()
            .or_else(|| self.json["error"]["message"].as_str())
            .unwrap_or_default()
            .to_string()
    }

    fn error_code(&self) -> &str {
        self.json["error"]["code"].as_str().unwrap_or_default()
    }
}

impl Env {
    async fn send(&self, path: &str, headers: &[(&str, String)], body: Vec<u8>) -> Answer {
        send_to(self.state.clone(), path, headers, body).await
    }

    async fn api(&self, method: &str, path: &str, token: &str, body: &str) -> (StatusCode, Value) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Body::from(body.to_string()))
            .unwrap();
        let resp = router(self.state.clone()).oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn apply(&self, name: &str, triggers: &str) {
        let yaml = format!(
            "triggers:\n{triggers}\njobs:\n  deploy:\n    runs_on: [x]\n    steps:\n      - checkout\n      - run: echo \"$OUTPOST_SHA\"\n"
        );
        let (status, body) = self
            .api(
                "PUT",
                &format!("/api/v1/pipelines/{name}"),
                &self.admin,
                &yaml,
            )
            .await;
        assert!(
            status == StatusCode::CREATED || status == StatusCode::OK,
            "{name}: {status} {body}"
        );
    }

    /// Every run in the store, by id.
    async fn all_runs(&self) -> BTreeSet<String> {
        let list = self
            .state
            .store
            .list_runs(None, None, 200, None)
            .await
            .unwrap();
        list.runs.iter().map(|r| r.id.to_string()).collect()
    }

    async fn run(&self, id: &str) -> Run {
        let (status, body) = self
            .api("GET", &format!("/api/v1/runs/{id}"), &self.read, "")
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        serde_json::from_value(body).unwrap()
    }

    async fn deliveries(&self, query: &str) -> WebhookDeliveryList {
        let (status, body) = self
            .api(
                "GET",
                &format!("/api/v1/webhook-deliveries{query}"),
                &self.admin,
                "",
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        serde_json::from_value(body).unwrap()
    }

    /// Sends a delivery and checks that exactly the runs it reports are new in the store.
    async fn expect_runs(
        &self,
        path: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
        pipelines: &[&str],
    ) -> Answer {
        let before = self.all_runs().await;
        let answer = self.send(path, headers, body).await;
        let after = self.all_runs().await;
        let new: BTreeSet<String> = after.difference(&before).cloned().collect();
        let expected: BTreeSet<String> = pipelines.iter().map(|p| p.to_string()).collect();
        if expected.is_empty() {
            assert!(
                new.is_empty(),
                "no run may start, but {new:?} did: {answer:?}"
            );
            assert!(answer.run_ids().is_empty(), "{answer:?}");
        } else {
            assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
            assert_eq!(answer.outcome(), "triggered", "{answer:?}");
            assert_eq!(answer.pipelines(), expected, "{answer:?}");
            assert_eq!(
                answer.run_ids(),
                new,
                "the answer names exactly the new runs"
            );
        }
        answer
    }
}

async fn send_to(state: AppState, path: &str, headers: &[(&str, String)], body: Vec<u8>) -> Answer {
    let mut req = Request::builder().method("POST").uri(path);
    if !headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("content-type"))
    {
        req = req.header(header::CONTENT_TYPE, "application/json");
    }
    for (name, value) in headers {
        req = req.header(*name, value);
    }
    let resp = router(state)
        .oneshot(req.body(Body::from(body)).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    let json = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Answer { status, json }
}

fn fixture(path: &str) -> Vec<u8> {
    let full: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests/fixtures/webhooks", path]
        .iter()
        .collect();
    std::fs::read(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// A fixture with some fields changed, re-serialised.
fn edited(path: &str, edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut value: Value = serde_json::from_slice(&fixture(path)).unwrap();
    edit(&mut value);
    serde_json::to_vec(&value).unwrap()
}

/// `sha256=<hex>` of HMAC-SHA256 over the body, as GitHub and the generic hook sign.
fn hmac_sha256(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The headers GitHub sends with a delivery.
fn github_headers(
    event: &str,
    delivery: &str,
    body: &[u8],
    secret: &str,
) -> Vec<(&'static str, String)> {
    vec![
        ("X-GitHub-Event", event.into()),
        ("X-GitHub-Delivery", delivery.into()),
        ("X-GitHub-Hook-ID", "292430182".into()),
        ("User-Agent", "GitHub-Hookshot/044aadd".into()),
        ("X-Hub-Signature-256", hmac_sha256(secret, body)),
    ]
}

/// The headers GitLab sends with a delivery.
fn gitlab_headers(event: &str, uuid: &str, token: &str) -> Vec<(&'static str, String)> {
    vec![
        ("X-Gitlab-Event", event.into()),
        ("X-Gitlab-Event-UUID", uuid.into()),
        (
            "X-Gitlab-Webhook-UUID",
            "f3a1b2c4-0000-4000-8000-000000000001".into(),
        ),
        ("X-Gitlab-Instance", "https://gitlab.example.com".into()),
        ("User-Agent", "GitLab/17.5.0".into()),
        ("X-Gitlab-Token", token.into()),
    ]
}

/// The headers an Azure DevOps "Web Hooks" service hook with basic authentication sends.
fn ado_basic(user: &str, password: &str) -> Vec<(&'static str, String)> {
    let credentials =
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    vec![("Authorization", format!("Basic {credentials}"))]
}

fn new_id() -> String {
    Uuid::new_v4().to_string()
}

// ---------------------------------------------------------------------------------------------
// GitHub
// ---------------------------------------------------------------------------------------------

async fn github(env: Env) {
    let repo = "Codertocat/Hello-World";
    env.apply(
        "gh-master",
        &format!("  - github: {{ repo: {repo}, events: [push], branches: [master] }}"),
    )
    .await;
    env.apply(
        "gh-release",
        &format!("  - github: {{ repo: {repo}, branches: [\"release/*\"] }}"),
    )
    .await;
    env.apply(
        "gh-tags",
        &format!("  - github: {{ repo: {repo}, tags: [\"simple-*\"] }}"),
    )
    .await;
    env.apply(
        "gh-readme",
        &format!("  - github: {{ repo: {repo}, branches: [master], paths: [\"*.md\"] }}"),
    )
    .await;
    env.apply(
        "gh-src",
        &format!("  - github: {{ repo: {repo}, branches: [master], paths: [\"src/**\"] }}"),
    )
    .await;
    env.apply(
        "gh-pr",
        &format!("  - github: {{ repo: {repo}, events: [pull_request], branches: [master] }}"),
    )
    .await;
    env.apply(
        "gh-other",
        "  - github: { repo: acme/web, events: [push, pull_request] }",
    )
    .await;
    env.apply(
        "gl-only",
        "  - gitlab: { project: mike/diaspora, branches: [master] }",
    )
    .await;

    // A push to master: the branch glob and the paths filter (README.md is in the file list)
    // select gh-master and gh-readme, and nothing else.
    let push = fixture("github/push.json");
    let delivery = new_id();
    let headers = github_headers("push", &delivery, &push, GITHUB_SECRET);
    let answer = env
        .expect_runs(
            "/hooks/github",
            &headers,
            push.clone(),
            &["gh-master", "gh-readme"],
        )
        .await;
    let skipped = answer.json["skipped"].to_string();
    assert!(
        skipped.contains("gh-src") && skipped.contains("src/**"),
        "{skipped}"
    );
    assert!(
        skipped.contains("gh-release") && skipped.contains("release/*"),
        "{skipped}"
    );
    // Pipelines for other repositories are not the sender's business.
    assert!(!skipped.contains("gh-other"), "{skipped}");
    let first = answer.run_ids();

    // The run records its trigger.
    let run = env.run(first.iter().next().unwrap()).await;
    let t = &run.trigger;
    assert_eq!(t.kind, TriggerKind::Webhook);
    assert_eq!(t.source.as_deref(), Some("github"));
    assert_eq!(t.event.as_deref(), Some("push"));
    assert_eq!(t.repo.as_deref(), Some(repo));
    assert_eq!(
        t.clone_url.as_deref(),
        Some("https://github.com/Codertocat/Hello-World.git")
    );
    assert_eq!(t.git_ref.as_deref(), Some("refs/heads/master"));
    assert_eq!(
        t.sha.as_deref(),
        Some("6113728f27ae82c7b1a177c8d03f9e96e0adf246")
    );
    assert_eq!(t.actor.as_deref(), Some("Codertocat"));
    assert_eq!(t.message.as_deref(), Some("Initial commit"));
    assert_eq!(
        t.url.as_deref(),
        Some(
            "https://github.com/Codertocat/Hello-World/commit/6113728f27ae82c7b1a177c8d03f9e96e0adf246"
        )
    );
    assert_eq!(t.delivery_id.as_deref(), Some(delivery.as_str()));

    // Redelivery: the same delivery again answers 200 and starts nothing new.
    let again = env
        .expect_runs("/hooks/github", &headers, push.clone(), &[])
        .await;
    assert_eq!(again.status, StatusCode::OK, "{again:?}");
    assert_eq!(again.outcome(), "redelivery");
    let previous: BTreeSet<String> = again.json["previous_run_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(previous, first);

    // Two identical deliveries at the same moment start the runs once.
    let racing = new_id();
    let headers2 = github_headers("push", &racing, &push, GITHUB_SECRET);
    let before = env.all_runs().await;
    let (a, b) = tokio::join!(
        send_to(env.state.clone(), "/hooks/github", &headers2, push.clone()),
        send_to(env.state.clone(), "/hooks/github", &headers2, push.clone()),
    );
    let outcomes: BTreeSet<&str> = [a.outcome(), b.outcome()].into();
    assert_eq!(outcomes, ["redelivery", "triggered"].into(), "{a:?} {b:?}");
    assert_eq!((a.status, b.status), (StatusCode::OK, StatusCode::OK));
    assert_eq!(env.all_runs().await.len(), before.len() + 2);

    // The same push, form-encoded (a GitHub webhook set to application/x-www-form-urlencoded).
    let form: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("payload", std::str::from_utf8(&push).unwrap())
        .finish();
    let mut form_headers = github_headers("push", &new_id(), form.as_bytes(), GITHUB_SECRET);
    form_headers.push(("Content-Type", "application/x-www-form-urlencoded".into()));
    let answer = send_to(
        env.state.clone(),
        "/hooks/github",
        &form_headers,
        form.into_bytes(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    assert_eq!(
        answer.pipelines(),
        ["gh-master".to_string(), "gh-readme".to_string()].into()
    );

    // A repository no pipeline builds starts nothing, and says so.
    let stranger = edited("github/push.json", |v| {
        v["repository"]["full_name"] = json!("someone/else")
    });
    let h = github_headers("push", &new_id(), &stranger, GITHUB_SECRET);
    let answer = env.expect_runs("/hooks/github", &h, stranger, &[]).await;
    assert_eq!(
        (answer.status, answer.outcome()),
        (StatusCode::ACCEPTED, "no_match")
    );
    assert!(
        answer
            .reason()
            .contains("no pipeline has a `github` trigger for this repository")
            && answer.reason().contains("someone/else"),
        "{}",
        answer.reason()
    );
    assert!(answer.json.get("skipped").is_none(), "{answer:?}");

    // Branch globs: `release/*` takes release/1.0 but not release/1.0/hotfix.
    let release = edited("github/push.json", |v| {
        v["ref"] = json!("refs/heads/release/1.0")
    });
    let h = github_headers("push", &new_id(), &release, GITHUB_SECRET);
    env.expect_runs("/hooks/github", &h, release, &["gh-release"])
        .await;
    let nested = edited("github/push.json", |v| {
        v["ref"] = json!("refs/heads/release/1.0/hotfix")
    });
    let h = github_headers("push", &new_id(), &nested, GITHUB_SECRET);
    let answer = env.expect_runs("/hooks/github", &h, nested, &[]).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{answer:?}");
    assert_eq!(answer.outcome(), "no_match");
    assert!(
        answer.reason().contains("release/1.0/hotfix"),
        "{}",
        answer.reason()
    );

    // A tag push: only the trigger that lists tags fires (branch-only triggers ignore tags).
    let tag = fixture("github/push-tag.json");
    let h = github_headers("push", &new_id(), &tag, GITHUB_SECRET);
    let answer = env
        .expect_runs("/hooks/github", &h, tag, &["gh-tags"])
        .await;
    let run = env.run(answer.run_ids().iter().next().unwrap()).await;
    assert_eq!(run.trigger.git_ref.as_deref(), Some("refs/tags/simple-tag"));

    // Deletions start nothing: the documented tag deletion, and a branch deletion.
    let deleted_tag = fixture("github/push-delete-tag.json");
    let h = github_headers("push", &new_id(), &deleted_tag, GITHUB_SECRET);
    let answer = env.expect_runs("/hooks/github", &h, deleted_tag, &[]).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED);
    assert_eq!(answer.outcome(), "ignored");
    let deleted_branch = edited("github/push-delete-tag.json", |v| {
        v["ref"] = json!("refs/heads/master");
        v["repository"]["full_name"] = json!(repo);
    });
    let h = github_headers("push", &new_id(), &deleted_branch, GITHUB_SECRET);
    let answer = env
        .expect_runs("/hooks/github", &h, deleted_branch, &[])
        .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED);
    assert!(
        answer.reason().contains("deletes branch `master`"),
        "{}",
        answer.reason()
    );

    // Pull requests: opened, synchronize and reopened build the head; closed starts nothing.
    for (file, action) in [
        ("github/pull_request-opened.json", "opened"),
        ("github/pull_request-synchronize.json", "synchronize"),
        ("github/pull_request-reopened.json", "reopened"),
    ] {
        let body = fixture(file);
        let h = github_headers("pull_request", &new_id(), &body, GITHUB_SECRET);
        let answer = env.expect_runs("/hooks/github", &h, body, &["gh-pr"]).await;
        let run = env.run(answer.run_ids().iter().next().unwrap()).await;
        assert_eq!(
            run.trigger.event.as_deref(),
            Some("pull_request"),
            "{action}"
        );
        assert_eq!(run.trigger.git_ref.as_deref(), Some("refs/pull/2/head"));
        assert_eq!(
            run.trigger.sha.as_deref(),
            Some("ec26c3e57ca3a959ca5aad62de7213c562f8c821")
        );
        assert_eq!(
            run.trigger.url.as_deref(),
            Some("https://github.com/Codertocat/Hello-World/pull/2")
        );
    }
    let closed = fixture("github/pull_request-closed.json");
    let h = github_headers("pull_request", &new_id(), &closed, GITHUB_SECRET);
    let answer = env.expect_runs("/hooks/github", &h, closed, &[]).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED);
    assert_eq!(answer.outcome(), "ignored");
    assert!(answer.reason().contains("closed"), "{}", answer.reason());

    // Ping: answered, nothing started.
    let ping = fixture("github/ping.json");
    let h = github_headers("ping", &new_id(), &ping, GITHUB_SECRET);
    let answer = env.expect_runs("/hooks/github", &h, ping, &[]).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED);
    assert_eq!(answer.outcome(), "ping");

    // Refusals: none of these starts anything, and each is answered as the issue says.
    let wrong = github_headers("push", &new_id(), &push, "not the secret");
    let answer = env
        .expect_runs("/hooks/github", &wrong, push.clone(), &[])
        .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.error_code(), "invalid_signature");

    let signed = github_headers("push", &new_id(), &push, GITHUB_SECRET);
    let tampered = edited("github/push.json", |v| {
        v["ref"] = json!("refs/heads/release/evil")
    });
    let answer = env
        .expect_runs("/hooks/github", &signed, tampered, &[])
        .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    let mut appended = push.clone();
    appended.extend_from_slice(b" ");
    let answer = env
        .expect_runs("/hooks/github", &signed, appended, &[])
        .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);

    let unsigned: Vec<_> = signed
        .iter()
        .filter(|(n, _)| *n != "X-Hub-Signature-256")
        .cloned()
        .collect();
    let answer = env
        .expect_runs("/hooks/github", &unsigned, push.clone(), &[])
        .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.error_code(), "missing_signature");

    let no_event: Vec<_> = signed
        .iter()
        .filter(|(n, _)| *n != "X-GitHub-Event")
        .cloned()
        .collect();
    let answer = env
        .expect_runs("/hooks/github", &no_event, push.clone(), &[])
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert!(
        answer.reason().contains("X-GitHub-Event"),
        "{}",
        answer.reason()
    );

    let garbage = b"{\"ref\": \"refs/heads/master\", ".to_vec();
    let h = github_headers("push", &new_id(), &garbage, GITHUB_SECRET);
    let answer = env.expect_runs("/hooks/github", &h, garbage, &[]).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    let no_repo = edited("github/push.json", |v| {
        v.as_object_mut().unwrap().remove("repository");
    });
    let h = github_headers("push", &new_id(), &no_repo, GITHUB_SECRET);
    let answer = env.expect_runs("/hooks/github", &h, no_repo, &[]).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert!(
        answer.reason().contains("repository.full_name"),
        "{}",
        answer.reason()
    );

    let huge = {
        let mut v: Value = serde_json::from_slice(&push).unwrap();
        v["padding"] = json!("x".repeat(MAX_BODY));
        serde_json::to_vec(&v).unwrap()
    };
    let h = github_headers("push", &new_id(), &huge, GITHUB_SECRET);
    let answer = env.expect_runs("/hooks/github", &h, huge, &[]).await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE, "{answer:?}");

    // An unsigned delivery cannot occupy a genuine delivery's id: the genuine one still runs.
    let squatted = new_id();
    let fake = vec![
        ("X-GitHub-Event", "push".to_string()),
        ("X-GitHub-Delivery", squatted.clone()),
        ("X-Hub-Signature-256", hmac_sha256("guess", &push)),
    ];
    env.expect_runs("/hooks/github", &fake, push.clone(), &[])
        .await;
    let genuine = github_headers("push", &squatted, &push, GITHUB_SECRET);
    env.expect_runs(
        "/hooks/github",
        &genuine,
        push.clone(),
        &["gh-master", "gh-readme"],
    )
    .await;

    // Every delivery was recorded, newest first, with its outcome; only admins may look.
    let list = env.deliveries("?source=github&limit=200").await;
    let outcomes: BTreeSet<&str> = list.deliveries.iter().map(|d| d.outcome.as_str()).collect();
    for expected in [
        "triggered",
        "redelivery",
        "no_match",
        "ignored",
        "ping",
        "unauthorized",
        "malformed",
        "too_large",
    ] {
        assert!(
            outcomes.contains(expected),
            "{expected} missing from {outcomes:?}"
        );
    }
    assert!(
        list.deliveries.windows(2).all(|w| w[0].id > w[1].id),
        "newest first"
    );
    let original = list
        .deliveries
        .iter()
        .find(|d| d.delivery_id.as_deref() == Some(delivery.as_str()) && d.outcome == "triggered")
        .expect("the first push is listed");
    assert_eq!(original.status_code, 200);
    assert_eq!(original.event.as_deref(), Some("push"));
    let ids: BTreeSet<String> = original.run_ids.iter().map(Uuid::to_string).collect();
    assert_eq!(ids, first);
    let refused = list
        .deliveries
        .iter()
        .find(|d| d.outcome == "too_large")
        .unwrap();
    assert_eq!(refused.status_code, 413);
    let page = env.deliveries("?source=github&limit=2").await;
    assert_eq!(page.deliveries.len(), 2);
    let next = page.next_cursor.expect("there is a next page");
    let page2 = env
        .deliveries(&format!("?source=github&limit=2&cursor={next}"))
        .await;
    assert!(page2.deliveries[0].id < page.deliveries[1].id);
    assert!(env.deliveries("?source=gitlab").await.deliveries.is_empty());
    let (status, _) = env
        .api("GET", "/api/v1/webhook-deliveries", &env.read, "")
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = env
        .api(
            "GET",
            "/api/v1/webhook-deliveries?source=bitbucket",
            &env.admin,
            "",
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

// ---------------------------------------------------------------------------------------------
// GitLab
// ---------------------------------------------------------------------------------------------

async fn gitlab(env: Env) {
    env.apply(
        "gl-master",
        "  - gitlab: { project: mike/diaspora, events: [push], branches: [master] }",
    )
    .await;
    env.apply(
        "gl-paths",
        "  - gitlab: { project: mike/diaspora, branches: [master], paths: [\"src/**\"] }",
    )
    .await;
    env.apply(
        "gl-docs",
        "  - gitlab: { project: mike/diaspora, branches: [\"docs/*\"] }",
    )
    .await;
    env.apply(
        "gl-tags",
        "  - gitlab: { project: jsmith/example, events: [Tag Push Hook], tags: [\"v*\"] }",
    )
    .await;
    env.apply("gl-mr", "  - gitlab: { project: gitlabhq/gitlab-test, events: [merge_request], branches: [master] }").await;
    env.apply("gh-only", "  - github: { repo: mike/diaspora }")
        .await;

    // The documented push lists 2 of its 4 commits, so the `paths` filter cannot be checked:
    // the trigger fires and says why.
    let push = fixture("gitlab/push.json");
    let uuid = new_id();
    let headers = gitlab_headers("Push Hook", &uuid, GITLAB_TOKEN);
    let answer = env
        .expect_runs(
            "/hooks/gitlab",
            &headers,
            push.clone(),
            &["gl-master", "gl-paths"],
        )
        .await;
    let runs = answer.json["runs"].as_array().unwrap();
    let paths_run = runs.iter().find(|r| r["pipeline"] == "gl-paths").unwrap();
    let note = paths_run["note"].as_str().unwrap();
    assert!(
        note.contains("not checked") && note.contains("2 of the push's 4"),
        "{note}"
    );
    let run = env.run(paths_run["id"].as_str().unwrap()).await;
    let t = &run.trigger;
    assert_eq!(t.source.as_deref(), Some("gitlab"));
    assert_eq!(t.event.as_deref(), Some("push"));
    assert_eq!(t.repo.as_deref(), Some("mike/diaspora"));
    assert_eq!(
        t.clone_url.as_deref(),
        Some("http://example.com/mike/diaspora.git")
    );
    assert_eq!(t.git_ref.as_deref(), Some("refs/heads/master"));
    assert_eq!(
        t.sha.as_deref(),
        Some("da1560886d4f094c3e6c9ef40349f7d38b5d27d7")
    );
    assert_eq!(t.actor.as_deref(), Some("jsmith"));
    assert_eq!(t.message.as_deref(), Some("fixed readme"));
    assert_eq!(
        t.url.as_deref(),
        Some("http://example.com/mike/diaspora/commit/da1560886d4f094c3e6c9ef40349f7d38b5d27d7")
    );
    assert_eq!(t.delivery_id.as_deref(), Some(uuid.as_str()));

    // With every commit listed, the filter is checked: nothing under src/ changed.
    let complete = edited("gitlab/push.json", |v| v["total_commits_count"] = json!(2));
    let h = gitlab_headers("Push Hook", &new_id(), GITLAB_TOKEN);
    let answer = env
        .expect_runs("/hooks/gitlab", &h, complete, &["gl-master"])
        .await;
    assert!(
        answer.json["skipped"].to_string().contains("CHANGELOG"),
        "{answer:?}"
    );
    // ... and a change under src/ makes it fire.
    let src = edited("gitlab/push.json", |v| {
        v["total_commits_count"] = json!(2);
        v["commits"][1]["modified"] = json!(["src/main.rs"]);
    });
    let h = gitlab_headers("Push Hook", &new_id(), GITLAB_TOKEN);
    env.expect_runs("/hooks/gitlab", &h, src, &["gl-master", "gl-paths"])
        .await;

    // Redelivery by the same event UUID, and by GitLab's Idempotency-Key (which survives a
    // resend that carries a new event UUID).
    let answer = env
        .expect_runs("/hooks/gitlab", &headers, push.clone(), &[])
        .await;
    assert_eq!(
        (answer.status, answer.outcome()),
        (StatusCode::OK, "redelivery")
    );
    let key = new_id();
    let mut with_key = gitlab_headers("Push Hook", &new_id(), GITLAB_TOKEN);
    with_key.push(("Idempotency-Key", key.clone()));
    env.expect_runs(
        "/hooks/gitlab",
        &with_key,
        push.clone(),
        &["gl-master", "gl-paths"],
    )
    .await;
    let mut resent = gitlab_headers("Push Hook", &new_id(), GITLAB_TOKEN);
    resent.push(("Idempotency-Key", key));
    let answer = env
        .expect_runs("/hooks/gitlab", &resent, push.clone(), &[])
        .await;
    assert_eq!(
        (answer.status, answer.outcome()),
        (StatusCode::OK, "redelivery")
    );

    // Branch glob miss.
    let feature = edited("gitlab/push.json", |v| {
        v["ref"] = json!("refs/heads/feature/x")
    });
    let h = gitlab_headers("Push Hook", &new_id(), GITLAB_TOKEN);
    let answer = env.expect_runs("/hooks/gitlab", &h, feature, &[]).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED);
    assert_eq!(answer.outcome(), "no_match");
    let docs = edited("gitlab/push.json", |v| {
        v["ref"] = json!("refs/heads/docs/intro")
    });
    let h = gitlab_headers("Push Hook", &new_id(), GITLAB_TOKEN);
    env.expect_runs("/hooks/gitlab", &h, docs, &["gl-docs"])
        .await;

    // Tag push.
    let tag = fixture("gitlab/tag_push.json");
    let h = gitlab_headers("Tag Push Hook", &new_id(), GITLAB_TOKEN);
    let answer = env
        .expect_runs("/hooks/gitlab", &h, tag, &["gl-tags"])
        .await;
    let run = env.run(answer.run_ids().iter().next().unwrap()).await;
    assert_eq!(run.trigger.git_ref.as_deref(), Some("refs/tags/v1.0.0"));
    assert_eq!(run.trigger.event.as_deref(), Some("tag_push"));

    // Branch deletion.
    let deleted = edited("gitlab/push.json", |v| {
        v["after"] = json!("0000000000000000000000000000000000000000");
        v["checkout_sha"] = Value::Null;
        v["commits"] = json!([]);
        v["total_commits_count"] = json!(0);
    });
    let h = gitlab_headers("Push Hook", &new_id(), GITLAB_TOKEN);
    let answer = env.expect_runs("/hooks/gitlab", &h, deleted, &[]).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED);
    assert!(
        answer.reason().contains("deletes branch `master`"),
        "{}",
        answer.reason()
    );

    // Merge request opened; an update without new commits starts nothing, one with them does.
    let mr = fixture("gitlab/merge_request.json");
    let h = gitlab_headers("Merge Request Hook", &new_id(), GITLAB_TOKEN);
    let answer = env.expect_runs("/hooks/gitlab", &h, mr, &["gl-mr"]).await;
    let run = env.run(answer.run_ids().iter().next().unwrap()).await;
    assert_eq!(
        run.trigger.git_ref.as_deref(),
        Some("refs/merge-requests/1/head")
    );
    assert_eq!(
        run.trigger.sha.as_deref(),
        Some("da1560886d4f094c3e6c9ef40349f7d38b5d27d7")
    );
    assert_eq!(run.trigger.message.as_deref(), Some("MS-Viewport"));
    assert_eq!(run.trigger.actor.as_deref(), Some("root"));
    let relabel = edited("gitlab/merge_request.json", |v| {
        v["object_attributes"]["action"] = json!("update")
    });
    let h = gitlab_headers("Merge Request Hook", &new_id(), GITLAB_TOKEN);
    let answer = env.expect_runs("/hooks/gitlab", &h, relabel, &[]).await;
    assert_eq!(
        (answer.status, answer.outcome()),
        (StatusCode::ACCEPTED, "ignored")
    );
    let pushed = edited("gitlab/merge_request.json", |v| {
        v["object_attributes"]["action"] = json!("update");
        v["object_attributes"]["oldrev"] = json!("95790bf891e76fee5e1747ab589903a6a1f80f22");
    });
    let h = gitlab_headers("Merge Request Hook", &new_id(), GITLAB_TOKEN);
    env.expect_runs("/hooks/gitlab", &h, pushed, &["gl-mr"])
        .await;

    // Refusals.
    let h = gitlab_headers("Push Hook", &new_id(), "wrong-token");
    let answer = env
        .expect_runs("/hooks/gitlab", &h, push.clone(), &[])
        .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    let h: Vec<_> = gitlab_headers("Push Hook", &new_id(), GITLAB_TOKEN)
        .into_iter()
        .filter(|(n, _)| *n != "X-Gitlab-Token")
        .collect();
    let answer = env
        .expect_runs("/hooks/gitlab", &h, push.clone(), &[])
        .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    let h: Vec<_> = gitlab_headers("Push Hook", &new_id(), GITLAB_TOKEN)
        .into_iter()
        .filter(|(n, _)| *n != "X-Gitlab-Event")
        .collect();
    let answer = env
        .expect_runs("/hooks/gitlab", &h, push.clone(), &[])
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    let h = gitlab_headers("Push Hook", &new_id(), GITLAB_TOKEN);
    let answer = env
        .expect_runs("/hooks/gitlab", &h, b"[1, 2, 3]".to_vec(), &[])
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    let h = gitlab_headers("Issue Hook", &new_id(), GITLAB_TOKEN);
    let answer = env
        .expect_runs("/hooks/gitlab", &h, push.clone(), &[])
        .await;
    assert_eq!(
        (answer.status, answer.outcome()),
        (StatusCode::ACCEPTED, "ignored")
    );

    let list = env.deliveries("?source=gitlab").await;
    assert!(list.deliveries.iter().all(|d| d.source == "gitlab"));
    assert!(
        list.deliveries
            .iter()
            .any(|d| d.outcome == "unauthorized" && d.status_code == 401)
    );
}

// ---------------------------------------------------------------------------------------------
// Azure DevOps
// ---------------------------------------------------------------------------------------------

async fn azure_devops(env: Env) {
    env.apply("ado-push", "  - azure_devops: { repository: Fabrikam-Fiber-Git, events: [git.push], branches: [master] }").await;
    env.apply(
        "ado-main",
        "  - azure_devops: { repository: Fabrikam-Fiber-Git/Fabrikam-Fiber-Git, branches: [main] }",
    )
    .await;
    env.apply("ado-pr", "  - azure_devops: { repository: Fabrikam, events: [git.pullrequest.created, git.pullrequest.updated], branches: [master] }").await;
    env.apply(
        "ado-other",
        "  - azure_devops: { repository: OtherProject/Fabrikam-Fiber-Git }",
    )
    .await;

    let push = fixture("azure-devops/git.push.json");
    let basic = ado_basic(ADO_USER, ADO_PASSWORD);
    let answer = env
        .expect_runs("/hooks/azure-devops", &basic, push.clone(), &["ado-push"])
        .await;
    let run = env.run(answer.run_ids().iter().next().unwrap()).await;
    let t = &run.trigger;
    assert_eq!(t.source.as_deref(), Some("azure_devops"));
    assert_eq!(t.event.as_deref(), Some("git.push"));
    assert_eq!(
        t.repo.as_deref(),
        Some("Fabrikam-Fiber-Git/Fabrikam-Fiber-Git")
    );
    assert_eq!(
        t.clone_url.as_deref(),
        Some("https://dev.azure.com/fabrikam-fiber-inc/DefaultCollection/_git/Fabrikam-Fiber-Git")
    );
    assert_eq!(t.git_ref.as_deref(), Some("refs/heads/master"));
    assert_eq!(
        t.sha.as_deref(),
        Some("33b55f7cb7e7e245323987634f960cf4a6e6bc74")
    );
    assert_eq!(t.actor.as_deref(), Some("Jamal Hartnett"));
    assert_eq!(t.message.as_deref(), Some("Fixed bug in web.config file"));
    assert_eq!(
        t.delivery_id.as_deref(),
        Some("03c164c2-8912-4d5e-8009-3707d5f83734")
    );

    // The notification id de-duplicates: a retry of the same notification starts nothing new.
    let answer = env
        .expect_runs("/hooks/azure-devops", &basic, push.clone(), &[])
        .await;
    assert_eq!(
        (answer.status, answer.outcome()),
        (StatusCode::OK, "redelivery")
    );

    // Another notification about a push to main, authenticated by the custom header instead.
    let main = edited("azure-devops/git.push.json", |v| {
        v["id"] = json!(new_id());
        v["resource"]["refUpdates"][0]["name"] = json!("refs/heads/main");
    });
    let custom = vec![(ADO_HEADER, ADO_HEADER_VALUE.to_string())];
    env.expect_runs("/hooks/azure-devops", &custom, main, &["ado-main"])
        .await;

    // Deleting a branch starts nothing.
    let deleted = edited("azure-devops/git.push.json", |v| {
        v["id"] = json!(new_id());
        v["resource"]["refUpdates"][0]["newObjectId"] =
            json!("0000000000000000000000000000000000000000");
    });
    let answer = env
        .expect_runs("/hooks/azure-devops", &basic, deleted, &[])
        .await;
    assert_eq!(
        (answer.status, answer.outcome()),
        (StatusCode::ACCEPTED, "ignored")
    );

    // Pull requests: created builds the source branch's head; the documented update (the pull
    // request was completed) starts nothing, an update of an active one does.
    let created = fixture("azure-devops/git.pullrequest.created.json");
    let answer = env
        .expect_runs("/hooks/azure-devops", &basic, created, &["ado-pr"])
        .await;
    let run = env.run(answer.run_ids().iter().next().unwrap()).await;
    assert_eq!(run.trigger.git_ref.as_deref(), Some("refs/heads/mytopic"));
    assert_eq!(
        run.trigger.sha.as_deref(),
        Some("53d54ac915144006c2c9e90d2c7d3880920db49c")
    );
    assert_eq!(
        run.trigger.url.as_deref(),
        Some("https://dev.azure.com/fabrikam/DefaultCollection/_git/Fabrikam/pullrequest/1")
    );
    assert_eq!(
        run.trigger.message.as_deref(),
        Some("my first pull request")
    );
    let completed = fixture("azure-devops/git.pullrequest.updated.json");
    let answer = env
        .expect_runs("/hooks/azure-devops", &basic, completed, &[])
        .await;
    assert_eq!(
        (answer.status, answer.outcome()),
        (StatusCode::ACCEPTED, "ignored")
    );
    assert!(answer.reason().contains("completed"), "{}", answer.reason());
    let active = edited("azure-devops/git.pullrequest.updated.json", |v| {
        v["id"] = json!(new_id());
        v["resource"]["status"] = json!("active");
    });
    env.expect_runs("/hooks/azure-devops", &basic, active, &["ado-pr"])
        .await;

    // Refusals.
    for headers in [
        ado_basic(ADO_USER, "wrong"),
        ado_basic("someone-else", ADO_PASSWORD),
        vec![(ADO_HEADER, "wrong".to_string())],
        vec![("Authorization", "Bearer abc".to_string())],
    ] {
        let fresh = edited("azure-devops/git.push.json", |v| v["id"] = json!(new_id()));
        let answer = env
            .expect_runs("/hooks/azure-devops", &headers, fresh, &[])
            .await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{headers:?}");
        assert_eq!(answer.error_code(), "invalid_signature");
    }
    let fresh = edited("azure-devops/git.push.json", |v| v["id"] = json!(new_id()));
    let answer = env
        .expect_runs("/hooks/azure-devops", &[], fresh, &[])
        .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.error_code(), "missing_signature");
    let no_type = edited("azure-devops/git.push.json", |v| {
        v.as_object_mut().unwrap().remove("eventType");
    });
    let answer = env
        .expect_runs("/hooks/azure-devops", &basic, no_type, &[])
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    let answer = env
        .expect_runs("/hooks/azure-devops", &basic, b"not json".to_vec(), &[])
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
}

// ---------------------------------------------------------------------------------------------
// Generic, and sources without a secret
// ---------------------------------------------------------------------------------------------

async fn generic(env: Env) {
    env.apply("hook", "  - generic: {}").await;
    env.apply("hook-plain", "  - github: { repo: acme/web }")
        .await;
    env.apply("unsigned", "  - generic: {}").await;

    let body = json!({
        "ref": "refs/heads/main",
        "sha": "0123456789abcdef0123456789abcdef01234567",
        "variables": {"IMAGE_TAG": "1.2.3", "REPLICAS": 3},
        "actor": "release-bot",
        "anything": ["else", "is", "ignored"]
    })
    .to_string()
    .into_bytes();
    let delivery = new_id();
    let headers = vec![
        ("X-Outpost-Signature", hmac_sha256(GENERIC_SECRET, &body)),
        ("X-Outpost-Delivery", delivery.clone()),
    ];
    let answer = env
        .expect_runs("/hooks/generic/hook", &headers, body.clone(), &["hook"])
        .await;
    let run = env.run(answer.run_ids().iter().next().unwrap()).await;
    assert_eq!(run.trigger.source.as_deref(), Some("generic"));
    assert_eq!(run.trigger.git_ref.as_deref(), Some("refs/heads/main"));
    assert_eq!(run.trigger.actor.as_deref(), Some("release-bot"));
    assert_eq!(run.trigger.delivery_id.as_deref(), Some(delivery.as_str()));
    assert_eq!(
        run.variables.get("IMAGE_TAG").map(String::as_str),
        Some("1.2.3")
    );
    assert_eq!(run.variables.get("REPLICAS").map(String::as_str), Some("3"));

    // Redelivery by X-Outpost-Delivery; without it there is nothing to de-duplicate by.
    let answer = env
        .expect_runs("/hooks/generic/hook", &headers, body.clone(), &[])
        .await;
    assert_eq!(
        (answer.status, answer.outcome()),
        (StatusCode::OK, "redelivery")
    );
    let no_id = vec![("X-Outpost-Signature", hmac_sha256(GENERIC_SECRET, &body))];
    env.expect_runs("/hooks/generic/hook", &no_id, body.clone(), &["hook"])
        .await;
    env.expect_runs("/hooks/generic/hook", &no_id, body.clone(), &["hook"])
        .await;
    // An empty body is an empty object.
    let empty = vec![("X-Outpost-Signature", hmac_sha256(GENERIC_SECRET, b""))];
    env.expect_runs("/hooks/generic/hook", &empty, Vec::new(), &["hook"])
        .await;

    // A secret for another pipeline does not open this one; a pipeline with no secret refuses.
    let other = vec![("X-Outpost-Signature", hmac_sha256("guess", &body))];
    let answer = env
        .expect_runs("/hooks/generic/hook", &other, body.clone(), &[])
        .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    let answer = env
        .expect_runs("/hooks/generic/unsigned", &no_id, body.clone(), &[])
        .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.error_code(), "webhook_not_configured");
    assert!(
        answer
            .reason()
            .contains("OUTPOST__WEBHOOKS__GENERIC__UNSIGNED__SECRET")
    );
    let answer = env
        .expect_runs("/hooks/generic/hook", &[], body.clone(), &[])
        .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.error_code(), "missing_signature");

    // `hook_plain` in the settings serves the pipeline `hook-plain`, which has no generic trigger.
    let answer = env
        .expect_runs("/hooks/generic/hook-plain", &no_id, body.clone(), &[])
        .await;
    assert_eq!(
        (answer.status, answer.outcome()),
        (StatusCode::ACCEPTED, "no_match")
    );
    assert!(
        answer.reason().contains("no `generic` trigger"),
        "{}",
        answer.reason()
    );
    let answer = env
        .expect_runs("/hooks/generic/nowhere", &no_id, body.clone(), &[])
        .await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);

    // Malformed: not an object, a bad variable name.
    for bad in [
        b"[]".to_vec(),
        br#"{"variables": {"1BAD": "x"}}"#.to_vec(),
        br#"{"ref": 5}"#.to_vec(),
    ] {
        let h = vec![("X-Outpost-Signature", hmac_sha256(GENERIC_SECRET, &bad))];
        let answer = env.expect_runs("/hooks/generic/hook", &h, bad, &[]).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{answer:?}");
    }

    // A server with no webhook secrets configured refuses every source, signed or not.
    let mut bare = (*env.state.settings).clone();
    bare.webhooks = Default::default();
    let bare = AppState {
        settings: Arc::new(bare),
        ..env.state.clone()
    };
    let before = env.all_runs().await;
    let push = fixture("github/push.json");
    let answer = send_to(
        bare.clone(),
        "/hooks/github",
        &github_headers("push", &new_id(), &push, GITHUB_SECRET),
        push,
    )
    .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.error_code(), "webhook_not_configured");
    assert!(
        answer
            .reason()
            .contains("OUTPOST__WEBHOOKS__GITHUB__SECRET")
    );
    let answer = send_to(
        bare.clone(),
        "/hooks/gitlab",
        &gitlab_headers("Push Hook", &new_id(), ""),
        fixture("gitlab/push.json"),
    )
    .await;
    assert_eq!(answer.error_code(), "webhook_not_configured");
    let answer = send_to(
        bare.clone(),
        "/hooks/azure-devops",
        &ado_basic("", ""),
        fixture("azure-devops/git.push.json"),
    )
    .await;
    assert_eq!(answer.error_code(), "webhook_not_configured");
    let answer = send_to(bare, "/hooks/generic/hook", &headers, body).await;
    assert_eq!(answer.error_code(), "webhook_not_configured");
    assert_eq!(env.all_runs().await, before, "nothing started");

    let list = env.deliveries("?source=generic").await;
    assert!(
        list.deliveries
            .iter()
            .any(|d| d.pipeline.as_deref() == Some("hook") && d.outcome == "triggered")
    );
    assert!(
        list.deliveries
            .iter()
            .any(|d| d.outcome == "not_found" && d.status_code == 404)
    );
}

// ---------------------------------------------------------------------------------------------
// Runs that cannot start, and retries
// ---------------------------------------------------------------------------------------------

/// A pipeline whose secret is missing cannot start; the delivery answers 422 and may be
/// redelivered once the secret is set, while the pipeline that did start is not started again.
async fn retry(env: Env) {
    let repo = "Codertocat/Hello-World";
    env.apply("plain", &format!("  - github: {{ repo: {repo} }}"))
        .await;
    let yaml = format!(
        "triggers:\n  - github: {{ repo: {repo} }}\nsecrets: [TOKEN]\njobs:\n  deploy:\n    steps:\n      - run: echo hi\n"
    );
    let (status, body) = env
        .api("PUT", "/api/v1/pipelines/needs-secret", &env.admin, &yaml)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    let push = fixture("github/push.json");
    let headers = github_headers("push", &new_id(), &push, GITHUB_SECRET);
    let before = env.all_runs().await;
    let answer = env.send("/hooks/github", &headers, push.clone()).await;
    assert_eq!(
        (answer.status, answer.outcome()),
        (StatusCode::OK, "partial"),
        "{answer:?}"
    );
    assert_eq!(answer.pipelines(), ["plain".to_string()].into());
    assert!(
        answer.json["errors"].to_string().contains("TOKEN"),
        "{answer:?}"
    );
    assert_eq!(env.all_runs().await.len(), before.len() + 1);

    // The secret is set and GitHub redelivers: only the missing run starts.
    let (status, body) = env
        .api("PUT", "/api/v1/secrets/TOKEN", &env.admin, "s3cr3t")
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let answer = env.send("/hooks/github", &headers, push.clone()).await;
    assert_eq!(
        (answer.status, answer.outcome()),
        (StatusCode::OK, "triggered"),
        "{answer:?}"
    );
    assert_eq!(answer.pipelines(), ["needs-secret".to_string()].into());
    assert_eq!(env.all_runs().await.len(), before.len() + 2);
    // From now on it is an ordinary redelivery.
    let answer = env
        .expect_runs("/hooks/github", &headers, push.clone(), &[])
        .await;
    assert_eq!(answer.outcome(), "redelivery");
    assert_eq!(answer.json["previous_run_ids"].as_array().unwrap().len(), 2);

    // When no run at all can start, the answer is 422.
    let (status, _) = env
        .api("DELETE", "/api/v1/secrets/TOKEN", &env.admin, "")
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = env
        .api("DELETE", "/api/v1/pipelines/plain", &env.admin, "")
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let h = github_headers("push", &new_id(), &push, GITHUB_SECRET);
    let answer = env
        .expect_runs("/hooks/github", &h, push.clone(), &[])
        .await;
    assert_eq!(
        answer.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{answer:?}"
    );
    assert!(answer.reason().contains("TOKEN"), "{}", answer.reason());
}

/// The record that claimed GitHub delivery `delivery` (not its redeliveries), if there is one.
async fn claimed_record(
    env: &Env,
    delivery: &str,
) -> Option<outpost_server::store::WebhookDelivery> {
    let list = env.deliveries("?source=github&limit=200").await;
    list.deliveries
        .into_iter()
        .find(|d| d.delivery_id.as_deref() == Some(delivery) && d.outcome != "redelivery")
}

/// An attempt that stopped between starting runs and recording them (the server was killed)
/// leaves its delivery `processing`. A redelivery is turned away while that is recent, and takes
/// it over once it is stale: the runs the stopped attempt started are found by their trigger and
/// not started again, the rest are.
async fn interrupted(env: Env) {
    let repo = "Codertocat/Hello-World";
    env.apply("first", &format!("  - github: {{ repo: {repo} }}"))
        .await;
    env.apply("second", &format!("  - github: {{ repo: {repo} }}"))
        .await;
    let push = fixture("github/push.json");
    let delivery = new_id();
    let headers = github_headers("push", &delivery, &push, GITHUB_SECRET);
    let answer = env
        .expect_runs(
            "/hooks/github",
            &headers,
            push.clone(),
            &["first", "second"],
        )
        .await;
    let runs = answer.json["runs"].as_array().unwrap().clone();
    let run_of = |pipeline: &str| {
        runs.iter().find(|r| r["pipeline"] == pipeline).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (first, second) = (run_of("first"), run_of("second"));

    // What the stopped attempt left: the run of `first` started, `second` not yet, no outcome.
    let second_id: Uuid = second.parse().unwrap();
    execute!(
        env.state.store,
        sqlx::query("DELETE FROM runs WHERE id = $1").bind(second_id)
    );
    let unfinished = "UPDATE webhook_deliveries SET outcome = 'processing', status_code = 0, \
                      run_ids = '[]', updated_at = $2 WHERE delivery_id = $1 AND dedupe_key IS NOT NULL";
    execute!(
        env.state.store,
        sqlx::query(unfinished)
            .bind(&delivery)
            .bind(chrono::Utc::now())
    );
    let answer = env
        .expect_runs("/hooks/github", &headers, push.clone(), &[])
        .await;
    assert_eq!(answer.outcome(), "redelivery", "{answer:?}");
    assert!(
        answer.reason().contains("being handled right now"),
        "{}",
        answer.reason()
    );
    assert_eq!(
        claimed_record(&env, &delivery).await.unwrap().outcome,
        "processing"
    );

    // Eleven minutes later it is stale.
    execute!(
        env.state.store,
        sqlx::query(unfinished)
            .bind(&delivery)
            .bind(chrono::Utc::now() - chrono::Duration::minutes(11))
    );
    let answer = env
        .expect_runs("/hooks/github", &headers, push.clone(), &["second"])
        .await;
    assert_eq!(
        answer.json["previous_run_ids"],
        json!([first]),
        "the stopped attempt's run is found by its trigger: {answer:?}"
    );
    let record = claimed_record(&env, &delivery).await.unwrap();
    assert_eq!(record.outcome, "triggered");
    let recorded: BTreeSet<String> = record.run_ids.iter().map(Uuid::to_string).collect();
    let new_second = answer.run_ids().into_iter().next().unwrap();
    assert_eq!(recorded, [first.clone(), new_second].into());

    // From now on it is an ordinary redelivery.
    let answer = env
        .expect_runs("/hooks/github", &headers, push.clone(), &[])
        .await;
    assert_eq!(answer.outcome(), "redelivery", "{answer:?}");
}

/// A sender that hangs up while its delivery is being handled (GitHub gives up after 10 s)
/// does not stop the handling half-way: the runs start and the outcome is recorded.
async fn sender_hangs_up(env: Env) {
    let repo = "Codertocat/Hello-World";
    env.apply("plain", &format!("  - github: {{ repo: {repo} }}"))
        .await;
    let push = fixture("github/push.json");
    let delivery = new_id();
    let headers = github_headers("push", &delivery, &push, GITHUB_SECRET);
    let before = env.all_runs().await;

    // Another connection holds the database so the handling has to wait for it.
    let url = env._db.url();
    let holder: Box<dyn std::any::Any> = match env._db.backend() {
        Backend::Sqlite => {
            use sqlx::Connection;
            let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
            sqlx::query("BEGIN IMMEDIATE")
                .execute(&mut conn)
                .await
                .unwrap();
            Box::new(conn)
        }
        Backend::Postgres => {
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
            sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
            sqlx::query("LOCK TABLE runs IN SHARE MODE")
                .execute(&mut conn)
                .await
                .unwrap();
            Box::new(conn)
        }
    };
    let sent = tokio::time::timeout(
        std::time::Duration::from_millis(500),
        env.send("/hooks/github", &headers, push.clone()),
    )
    .await;
    assert!(sent.is_err(), "the delivery had to wait: {sent:?}");
    // The sender is gone; the database is released (dropping the connection rolls back).
    drop(holder);

    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    let record = loop {
        match claimed_record(&env, &delivery).await {
            Some(d) if d.outcome != "processing" => break d,
            _ if tokio::time::Instant::now() > deadline => {
                panic!("the delivery was never handled to the end")
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    };
    assert_eq!(record.outcome, "triggered", "{record:?}");
    let new: BTreeSet<String> = env.all_runs().await.difference(&before).cloned().collect();
    let recorded: BTreeSet<String> = record.run_ids.iter().map(Uuid::to_string).collect();
    assert_eq!(new.len(), 1, "{new:?}");
    assert_eq!(recorded, new);
}

backend_tests!(github with env, gitlab with env, azure_devops with env, generic with env, retry with env, interrupted with env, sender_hangs_up with env);
