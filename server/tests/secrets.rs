//! The secret store, end to end: the real router over a real SQLite file or PostgreSQL database
//! (driven with `oneshot`), and the real `outpost-server` binary for the CLI and the start-up checks.
//!
//! Every answer but a runner's acquire is checked not to contain a secret value, and the SQLite
//! files on disk are read byte by byte to check that no value is stored in the clear.

#[macro_use]
mod common;

use common::{Backend, TestDb};

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use outpost_protocol::{AcquireResponse, ErrorBody, RegisterResponse, Run};
use outpost_server::api::{AppState, router};
use outpost_server::secrets::{self, SecretsKey};
use outpost_server::store::{Db, Scope, SecretList};
use outpost_server::{Settings, Store};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Values distinctive enough that finding one anywhere is a leak, not a coincidence.
const GLOBAL_VALUE: &str = "glob4l-Pa55word-7c1e";
const WEB_VALUE: &str = "w3b-0nly-Pa55word-93ad";
const OTHER_VALUE: &str = "0ther-Never-Listed-5b2f";
const VALUES: [&str; 3] = [GLOBAL_VALUE, WEB_VALUE, OTHER_VALUE];

fn pipeline(secrets: &[&str]) -> String {
    format!(
        "secrets: [{}]\njobs:\n  deploy:\n    runs_on: [x]\n    steps:\n      - run: echo \"$REGISTRY_PASSWORD\"\n",
        secrets.join(", ")
    )
}

struct Env {
    db: TestDb,
    state: AppState,
    admin: String,
    read: String,
    runner: String,
    /// Every answer given, except the runner's acquires, which are the one place values belong.
    answers: Mutex<Vec<(String, String)>>,
}

/// Settings for the test's database with `key` configured.
fn settings_for(db: &TestDb, key: Option<&str>) -> Settings {
    let mut settings = db.settings();
    settings.secrets.key = key.map(|k| secrets::Redacted(k.to_string()));
    settings
}

async fn env(backend: Backend) -> Option<Env> {
    let db = TestDb::new(backend).await?;
    let key = secrets::generate_key();
    let settings = settings_for(&db, Some(&key));
    let store = outpost_server::open_store(&settings)
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
    let (_, reg) = store.create_registration_token("p", None).await.unwrap();
    let state = AppState {
        store,
        settings: Arc::new(settings),
        shutdown: CancellationToken::new(),
        entra: None,
    };
    let mut env = Env {
        db,
        state,
        admin,
        read,
        runner: String::new(),
        answers: Mutex::new(Vec::new()),
    };
    let register =
        json!({"name": "r1", "labels": ["x"], "version": "t", "os": "linux", "arch": "x86_64"});
    let (status, body) = env
        .call(
            "POST",
            "/api/v1/runner/register",
            Some(&reg),
            register.to_string(),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    env.runner = serde_json::from_str::<RegisterResponse>(&body)
        .unwrap()
        .runner_token;
    Some(env)
}

impl Env {
    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: impl Into<Body>,
    ) -> (StatusCode, String) {
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
        let text = String::from_utf8_lossy(&bytes).into_owned();
        if path != "/api/v1/runner/acquire" {
            self.answers
                .lock()
                .unwrap()
                .push((format!("{method} {path}"), text.clone()));
        }
        (status, text)
    }

    async fn admin(&self, method: &str, path: &str, body: &str) -> (StatusCode, String) {
        self.call(method, path, Some(&self.admin), body.to_string())
            .await
    }

    /// Triggers a run of `pipeline` and acquires its job.
    async fn trigger_and_acquire(&self, pipeline: &str) -> AcquireResponse {
        let (status, body) = self
            .admin("POST", &format!("/api/v1/pipelines/{pipeline}/runs"), "")
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let run: Run = serde_json::from_str(&body).unwrap();
        let (status, body) = self
            .call(
                "POST",
                "/api/v1/runner/acquire",
                Some(&self.runner),
                "{\"wait_secs\": 1}",
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let acquired: AcquireResponse = serde_json::from_str(&body).unwrap();
        assert_eq!(acquired.job.run_id, run.id);
        // Look at the run and job as people see them, so those answers are checked too.
        self.call(
            "GET",
            &format!("/api/v1/runs/{}", run.id),
            Some(&self.read),
            "",
        )
        .await;
        self.call(
            "GET",
            &format!("/api/v1/jobs/{}", acquired.job.id),
            Some(&self.read),
            "",
        )
        .await;
        acquired
    }

    /// No answer given so far contains a value, nor does any file in the data dir.
    fn assert_no_value_leaked(&self) {
        for (call, body) in self.answers.lock().unwrap().iter() {
            for value in VALUES {
                assert!(
                    !body.contains(value),
                    "the answer to {call} contains a secret value: {body}"
                );
            }
        }
        let files = assert_files_hold_no_value(self.db.dir());
        if self.db.backend() == Backend::Sqlite {
            assert!(files >= 2, "the SQLite database and its WAL were read");
        }
    }
}

/// Reads every file under `dir` (the SQLite database, its WAL and shared memory) byte by byte;
/// returns how many files it read.
fn assert_files_hold_no_value(dir: &Path) -> usize {
    let mut files = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if !path.is_file() {
            continue;
        }
        files += 1;
        let bytes = std::fs::read(&path).unwrap();
        for value in VALUES {
            assert!(
                !bytes.windows(value.len()).any(|w| w == value.as_bytes()),
                "{} holds a secret value in the clear",
                path.display()
            );
        }
    }
    files
}

fn error_message(body: &str) -> String {
    serde_json::from_str::<ErrorBody>(body)
        .unwrap_or_else(|e| panic!("not an error body ({e}): {body}"))
        .error
        .message
}

/// What the SQLite and PostgreSQL tests both go through.
async fn delivers_listed_secrets_only_and_never_answers_a_value(env: Env) {
    for (name, yaml) in [
        ("web", pipeline(&["REGISTRY_PASSWORD"])),
        ("shared", pipeline(&["REGISTRY_PASSWORD"])),
        ("plain", pipeline(&[])),
    ] {
        let (status, body) = env
            .admin("PUT", &format!("/api/v1/pipelines/{name}"), &yaml)
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }

    // A listed secret that is not set stops the trigger, naming it and how to set it.
    let (status, body) = env.admin("POST", "/api/v1/pipelines/web/runs", "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let message = error_message(&body);
    assert!(
        message.contains("REGISTRY_PASSWORD")
            && message.contains("outpost-server secret set REGISTRY_PASSWORD --pipeline web"),
        "{message}"
    );
    // A pipeline that lists no secrets is not held up.
    let plain = env.trigger_and_acquire("plain").await;
    assert!(plain.job.secrets.is_empty());

    // Only admins see or change secrets.
    let (status, _) = env
        .call(
            "PUT",
            "/api/v1/secrets/REGISTRY_PASSWORD",
            Some(&env.read),
            GLOBAL_VALUE,
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = env
        .call("GET", "/api/v1/secrets", Some(&env.read), "")
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let (status, body) = env
        .admin("PUT", "/api/v1/secrets/REGISTRY_PASSWORD", "first value")
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = env
        .admin("PUT", "/api/v1/secrets/REGISTRY_PASSWORD", GLOBAL_VALUE)
        .await;
    assert_eq!(status, StatusCode::OK, "replacing answers 200: {body}");
    let (status, body) = env
        .admin(
            "PUT",
            "/api/v1/secrets/REGISTRY_PASSWORD?pipeline=web",
            WEB_VALUE,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, _) = env
        .admin("PUT", "/api/v1/secrets/OTHER_SECRET", OTHER_VALUE)
        .await;
    assert_eq!(status, StatusCode::CREATED);

    // Bad input is refused with a sentence that does not repeat the value.
    for (path, value, expect) in [
        (
            "/api/v1/secrets/1BAD",
            OTHER_VALUE,
            "not a valid secret name",
        ),
        ("/api/v1/secrets/EMPTY", "", "cannot be empty"),
        (
            "/api/v1/secrets/X?pipeline=Not%20A%20Name",
            OTHER_VALUE,
            "not valid",
        ),
        ("/api/v1/secrets/X?scope=web", OTHER_VALUE, "invalid query"),
    ] {
        let (status, body) = env.admin("PUT", path, value).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert!(error_message(&body).contains(expect), "{path}: {body}");
    }

    let (status, body) = env.admin("GET", "/api/v1/secrets", "").await;
    assert_eq!(status, StatusCode::OK);
    let list: SecretList = serde_json::from_str(&body).unwrap();
    let listed: Vec<(&str, Option<&str>, &str)> = list
        .secrets
        .iter()
        .map(|s| (s.name.as_str(), s.pipeline.as_deref(), s.scope.as_str()))
        .collect();
    assert_eq!(
        listed,
        vec![
            ("OTHER_SECRET", None, "global"),
            ("REGISTRY_PASSWORD", None, "global"),
            ("REGISTRY_PASSWORD", Some("web"), "pipeline"),
        ]
    );

    // A job gets exactly what its pipeline lists, the pipeline's own value first.
    let web = env.trigger_and_acquire("web").await;
    assert_eq!(
        web.job.secrets,
        [("REGISTRY_PASSWORD".to_string(), WEB_VALUE.to_string())].into()
    );
    let shared = env.trigger_and_acquire("shared").await;
    assert_eq!(
        shared.job.secrets,
        [("REGISTRY_PASSWORD".to_string(), GLOBAL_VALUE.to_string())].into()
    );
    let plain = env.trigger_and_acquire("plain").await;
    assert!(
        plain.job.secrets.is_empty(),
        "a pipeline that lists no secrets gets none: {:?}",
        plain.job.secrets.keys()
    );

    // A secret deleted between trigger and claim: the job goes out without it.
    let (status, body) = env.admin("POST", "/api/v1/pipelines/shared/runs", "").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, _) = env
        .admin("DELETE", "/api/v1/secrets/REGISTRY_PASSWORD", "")
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = env
        .call(
            "POST",
            "/api/v1/runner/acquire",
            Some(&env.runner),
            "{\"wait_secs\": 1}",
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let vanished: AcquireResponse = serde_json::from_str(&body).unwrap();
    assert_eq!(vanished.job.pipeline, "shared");
    assert!(vanished.job.secrets.is_empty());
    // …but `web` still has its own.
    assert_eq!(
        env.trigger_and_acquire("web").await.job.secrets["REGISTRY_PASSWORD"],
        WEB_VALUE
    );
    let (status, body) = env
        .admin("DELETE", "/api/v1/secrets/REGISTRY_PASSWORD", "")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = env.admin("POST", "/api/v1/pipelines/shared/runs", "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    // Who set and deleted what is in the audit log, without any value.
    let audit: Vec<(String, String, String, String)> = match env.state.store.db() {
        Db::Sqlite(pool) => sqlx::query_as(
            "SELECT actor, action, object, CAST(detail AS TEXT) FROM audit_events ORDER BY id",
        )
        .fetch_all(pool)
        .await
        .unwrap(),
        Db::Postgres(pool) => sqlx::query_as(
            "SELECT actor, action, object, detail::text FROM audit_events ORDER BY id",
        )
        .fetch_all(pool)
        .await
        .unwrap(),
    };
    let actions: Vec<(&str, &str, &str)> = audit
        .iter()
        .map(|(a, b, c, _)| (a.as_str(), b.as_str(), c.as_str()))
        .collect();
    assert_eq!(
        actions,
        vec![
            (
                "admin",
                "secret.create",
                "secret REGISTRY_PASSWORD (global)"
            ),
            (
                "admin",
                "secret.update",
                "secret REGISTRY_PASSWORD (global)"
            ),
            (
                "admin",
                "secret.create",
                "secret REGISTRY_PASSWORD (for pipeline web)"
            ),
            ("admin", "secret.create", "secret OTHER_SECRET (global)"),
            (
                "admin",
                "secret.delete",
                "secret REGISTRY_PASSWORD (global)"
            ),
        ]
    );
    for (_, _, _, detail) in &audit {
        assert!(VALUES.iter().all(|v| !detail.contains(v)), "{detail}");
    }

    env.assert_no_value_leaked();
}

/// Start-up with secrets stored: no key, a wrong key, the right key, and the key from a file.
async fn start_refuses_a_missing_or_wrong_key(backend: Backend) {
    let db = test_db!(backend);
    let key = secrets::generate_key();
    let open = |key: Option<&str>| {
        let settings = settings_for(&db, key);
        async move { outpost_server::open_store(&settings).await }
    };

    // Nothing stored: no key is needed, but nothing can be stored without one.
    let store = open(None).await.expect("no secrets, no key: fine");
    assert!(!store.has_secrets_key());
    let err = store
        .put_secret("A", None, OTHER_VALUE, "t")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("generate-key"), "{err}");
    store.close().await;
    // A key with nothing stored yet is accepted, and another one still is: nothing is bound yet.
    open(Some(&secrets::generate_key()))
        .await
        .unwrap()
        .close()
        .await;

    let store = open(Some(&key)).await.unwrap();
    store
        .put_secret("A", Some("web"), OTHER_VALUE, "t")
        .await
        .unwrap();
    store.close().await;

    let err = open(None).await.unwrap_err().to_string();
    assert!(err.starts_with(secrets::MISSING_KEY), "{err}");
    let err = open(Some(&secrets::generate_key()))
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(err, secrets::WRONG_KEY);
    let err = open(Some("not-a-key")).await.unwrap_err().to_string();
    assert!(err.contains("OUTPOST__SECRETS__KEY"), "{err}");

    // With every secret deleted the key check stays: the key is still required, and still checked.
    let store = open(Some(&key)).await.unwrap();
    store.delete_secret("A", Some("web"), "t").await.unwrap();
    store.close().await;
    assert!(open(None).await.is_err());
    assert!(open(Some(&secrets::generate_key())).await.is_err());

    let file = db.dir().join("key");
    std::fs::write(&file, format!("{key}\n")).unwrap();
    let mut settings = settings_for(&db, None);
    settings.secrets.key_file = Some(file);
    let store = outpost_server::open_store(&settings).await.unwrap();
    assert!(store.has_secrets_key());
    store.close().await;
}

backend_tests!(
    delivers_listed_secrets_only_and_never_answers_a_value with env,
    start_refuses_a_missing_or_wrong_key,
);

#[tokio::test]
async fn a_ciphertext_moved_to_another_name_is_not_delivered() {
    let env = env(Backend::Sqlite).await.unwrap();
    env.admin(
        "PUT",
        "/api/v1/pipelines/web",
        &pipeline(&["REGISTRY_PASSWORD"]),
    )
    .await;
    env.admin("PUT", "/api/v1/secrets/OTHER_SECRET", OTHER_VALUE)
        .await;
    env.admin("PUT", "/api/v1/secrets/REGISTRY_PASSWORD", GLOBAL_VALUE)
        .await;
    let Db::Sqlite(pool) = env.state.store.db() else {
        unreachable!()
    };
    // Someone with write access to the database copies another secret's ciphertext over this one.
    sqlx::query(
        "UPDATE secrets SET (nonce, ciphertext) = (SELECT nonce, ciphertext FROM secrets WHERE name = 'OTHER_SECRET') \
         WHERE name = 'REGISTRY_PASSWORD'",
    )
    .execute(pool)
    .await
    .unwrap();
    let job = env.trigger_and_acquire("web").await.job;
    assert!(
        job.secrets.is_empty(),
        "a moved ciphertext must not decrypt: {:?}",
        job.secrets
    );
}

// ---------------------------------------------------------------------------
// The binary
// ---------------------------------------------------------------------------

/// `outpost-server` with a fresh SQLite data dir and only the environment given here.
fn server_cmd(data_dir: &Path, key: Option<&str>) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_outpost-server"));
    for (name, _) in std::env::vars() {
        if name.starts_with("OUTPOST") {
            cmd.env_remove(name);
        }
    }
    cmd.env("OUTPOST__DATA_DIR", data_dir)
        .env("OUTPOST__SERVER__LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(key) = key {
        cmd.env("OUTPOST__SECRETS__KEY", key);
    }
    cmd
}

struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

async fn run(mut cmd: tokio::process::Command, stdin: Option<&str>) -> Output {
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("outpost-server starts");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input.as_bytes()).await.unwrap();
        drop(pipe);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("outpost-server finishes within a minute")
        .unwrap();
    Output {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn secret(dir: &Path, key: Option<&str>, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = server_cmd(dir, key);
    cmd.arg("secret").args(args);
    run(cmd, stdin).await
}

#[tokio::test]
async fn the_cli_sets_secrets_from_stdin_and_the_server_checks_its_key_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();

    let out = secret(data, None, &["generate-key"], None).await;
    assert!(out.ok, "{}", out.stderr);
    let key = out.stdout.trim().to_string();
    assert_eq!(key.len(), 44, "{key}");
    SecretsKey::from_base64(&key).expect("generate-key prints a usable key");
    assert_ne!(
        secret(data, None, &["generate-key"], None)
            .await
            .stdout
            .trim(),
        key
    );

    // Without a key, `set` says how to make one and stores nothing.
    let out = secret(
        data,
        None,
        &["set", "REGISTRY_PASSWORD"],
        Some(GLOBAL_VALUE),
    )
    .await;
    assert!(!out.ok);
    assert!(
        out.stderr.contains("outpost-server secret generate-key")
            && out.stderr.contains("OUTPOST__SECRETS__KEY"),
        "{}",
        out.stderr
    );

    let out = secret(
        data,
        Some(&key),
        &["set", "REGISTRY_PASSWORD"],
        Some(&format!("{GLOBAL_VALUE}\n")),
    )
    .await;
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stderr.contains("set secret REGISTRY_PASSWORD (global)"),
        "{}",
        out.stderr
    );
    let out = secret(
        data,
        Some(&key),
        &["set", "REGISTRY_PASSWORD", "--pipeline", "web"],
        Some(WEB_VALUE),
    )
    .await;
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("set secret REGISTRY_PASSWORD for pipeline web"),
        "{}",
        out.stderr
    );
    let out = secret(data, Some(&key), &["set", "EMPTY"], Some("\n")).await;
    assert!(!out.ok);
    assert!(out.stderr.contains("empty"), "{}", out.stderr);

    let out = secret(data, Some(&key), &["list"], None).await;
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stdout.contains("REGISTRY_PASSWORD") && out.stdout.contains("pipeline web"),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("EMPTY"), "{}", out.stdout);
    for value in VALUES {
        assert!(!out.stdout.contains(value) && !out.stderr.contains(value));
    }
    assert!(assert_files_hold_no_value(data) >= 1);

    // The value is stored exactly, without the trailing newline the CLI dropped.
    let store = Store::connect(&format!("sqlite://{}/outpost.db", data.display()), 2)
        .await
        .unwrap();
    store
        .init_secrets(Some(SecretsKey::from_base64(&key).unwrap()))
        .await
        .unwrap();
    let row: (Vec<u8>, Vec<u8>) = match store.db() {
        Db::Sqlite(pool) => sqlx::query_as(
            "SELECT nonce, ciphertext FROM secrets WHERE name = 'REGISTRY_PASSWORD' AND pipeline = ''",
        )
        .fetch_one(pool)
        .await
        .unwrap(),
        Db::Postgres(_) => unreachable!(),
    };
    assert_eq!(
        SecretsKey::from_base64(&key)
            .unwrap()
            .decrypt("REGISTRY_PASSWORD", "", &row.0, &row.1)
            .unwrap(),
        GLOBAL_VALUE
    );
    store.close().await;

    // Start without the key, then with another: a clear error, no server.
    let out = run(
        {
            let mut c = server_cmd(data, None);
            c.arg("serve");
            c
        },
        None,
    )
    .await;
    assert!(!out.ok);
    assert!(out.stderr.contains(secrets::MISSING_KEY), "{}", out.stderr);
    assert!(!out.stdout.contains("listening"), "{}", out.stdout);
    let out = run(
        {
            let mut c = server_cmd(data, Some(&secrets::generate_key()));
            c.arg("serve");
            c
        },
        None,
    )
    .await;
    assert!(!out.ok);
    assert!(out.stderr.contains(secrets::WRONG_KEY), "{}", out.stderr);

    // With the right key it serves.
    let mut cmd = server_cmd(data, Some(&key));
    cmd.arg("serve")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("the server starts within a minute")
        .unwrap()
        .unwrap_or_default();
    assert!(line.contains("listening on http://127.0.0.1:"), "{line}");
    child.kill().await.unwrap();
}
