//! The processes and databases a scenario runs against: a fresh database, a real
//! `outpost-server serve` on port 0, simulated runners registered through the API, and memory
//! readings from `/proc`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use outpost_protocol::{Client, RegisterRequest};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use uuid::Uuid;

/// How long a server may take from spawn to its listening line.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a CLI call may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// Which database the server under test uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Backend {
    /// A temporary SQLite file.
    Sqlite,
    /// A fresh, uniquely named PostgreSQL database.
    Postgres,
}

impl Backend {
    /// The spelling used on the command line, in tables and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

/// What every scenario needs to know about its surroundings.
#[derive(Debug, Clone)]
pub struct Env {
    /// Where `outpost-server` and `outpost-runner` are.
    pub bin_dir: PathBuf,
    /// The PostgreSQL admin URL (a database that exists, used to create and drop others).
    pub pg_admin_url: String,
    /// Extra `KEY=VALUE` pairs for every server, e.g. to try a setting.
    pub server_env: Vec<(String, String)>,
    /// SQL run on a PostgreSQL database once the server has migrated it, before the scenario:
    /// an experiment knob (e.g. a different storage for `log_chunks`), never used by default.
    pub pg_init_sql: Option<String>,
}

impl Env {
    /// The path of one Outpost binary, or an error that says how to build it.
    pub fn binary(&self, name: &str) -> anyhow::Result<PathBuf> {
        let path = self.bin_dir.join(name);
        ensure!(
            path.is_file(),
            "{} does not exist: build it with `cargo build --release -p outpost-server -p outpost-runner -p outpost-bench` \
             (or point --bin-dir at the directory that holds it)",
            path.display()
        );
        Ok(path)
    }

    /// A command for an Outpost binary with no `OUTPOST*` variables inherited from the caller.
    pub fn command(&self, name: &str) -> anyhow::Result<Command> {
        let mut cmd = Command::new(self.binary(name)?);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("OUTPOST") {
                cmd.env_remove(key);
            }
        }
        cmd.stdin(Stdio::null()).kill_on_drop(true);
        Ok(cmd)
    }
}

/// A database of its own for one server; the PostgreSQL database is dropped with it.
pub struct Db {
    url: String,
    _dir: Option<TempDir>,
    pg_drop: Option<(String, String)>,
}

impl Db {
    /// A new empty database.
    pub async fn create(env: &Env, backend: Backend) -> anyhow::Result<Db> {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::Builder::new()
                    .prefix("outpost-bench-db-")
                    .tempdir()
                    .context("could not create a temporary directory")?;
                let url = format!("sqlite://{}/outpost.db", dir.path().display());
                Ok(Db {
                    url,
                    _dir: Some(dir),
                    pg_drop: None,
                })
            }
            Backend::Postgres => {
                let name = format!("outpost_bench_{}", Uuid::now_v7().simple());
                let url = create_pg_database(&env.pg_admin_url, &name).await?;
                Ok(Db {
                    url,
                    _dir: None,
                    pg_drop: Some((env.pg_admin_url.clone(), name)),
                })
            }
        }
    }

    /// The URL the server is given.
    pub fn url(&self) -> &str {
        &self.url
    }
}

/// Creates database `name` and returns its URL.
pub async fn create_pg_database(admin_url: &str, name: &str) -> anyhow::Result<String> {
    use sqlx::Connection;
    let mut conn = tokio::time::timeout(
        Duration::from_secs(10),
        sqlx::PgConnection::connect(admin_url),
    )
    .await
    .map_err(|_| anyhow::anyhow!("timed out connecting to PostgreSQL at {admin_url}"))?
    .with_context(|| format!("could not connect to PostgreSQL at {admin_url}"))?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&mut conn)
        .await
        .with_context(|| format!("could not create the database {name}"))?;
    let _ = conn.close().await;
    let mut url = reqwest::Url::parse(admin_url)
        .with_context(|| format!("the PostgreSQL URL {admin_url} is not a URL"))?;
    url.set_path(&format!("/{name}"));
    Ok(url.to_string())
}

/// Drops database `name` (blocking the calling thread on a runtime of its own).
pub fn drop_pg_database(admin_url: &str, name: &str) {
    let admin_url = admin_url.to_string();
    let name = name.to_string();
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
        eprintln!("warning: could not drop the benchmark database: {e}");
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        if let Some((admin, name)) = self.pg_drop.take() {
            drop_pg_database(&admin, &name);
        }
    }
}

/// Memory of a process, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mem {
    /// Resident set size now, in KiB.
    pub rss_kib: u64,
    /// Peak resident set size, in KiB.
    pub hwm_kib: u64,
}

impl Mem {
    /// RSS in MiB.
    pub fn rss_mib(self) -> f64 {
        self.rss_kib as f64 / 1024.0
    }

    /// Peak RSS in MiB.
    pub fn hwm_mib(self) -> f64 {
        self.hwm_kib as f64 / 1024.0
    }
}

/// Reads `VmRSS` and `VmHWM` of `pid`.
pub fn read_mem(pid: u32) -> anyhow::Result<Mem> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("could not read /proc/{pid}/status"))?;
    let mut mem = Mem::default();
    for line in text.lines() {
        let field = |l: &str| -> u64 {
            l.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        if line.starts_with("VmRSS:") {
            mem.rss_kib = field(line);
        } else if line.starts_with("VmHWM:") {
            mem.hwm_kib = field(line);
        }
    }
    Ok(mem)
}

/// Samples a process's RSS every `every` until dropped; [`RssSampler::peak_mib`] is the highest
/// reading seen.
pub struct RssSampler {
    peak: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    /// Starts sampling `pid`.
    pub fn start(pid: u32, every: Duration) -> Self {
        let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let p = peak.clone();
        let task = tokio::spawn(async move {
            loop {
                if let Ok(m) = read_mem(pid) {
                    p.fetch_max(m.rss_kib, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(every).await;
            }
        });
        Self { peak, task }
    }

    /// The highest RSS seen so far, in MiB.
    pub fn peak_mib(&self) -> f64 {
        self.peak.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1024.0
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An HTTP client for many simulated runners: one connection pool, no idle limit.
pub fn http_client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(20))
        .pool_max_idle_per_host(usize::MAX)
        .tcp_nodelay(true)
        .build()
        .context("could not build the HTTP client")
}

/// A running `outpost-server serve` with its own data dir and database.
pub struct Server {
    child: Option<Child>,
    /// The base URL, e.g. `http://127.0.0.1:40123`.
    pub url: String,
    /// The server's process id.
    pub pid: u32,
    /// A client with an admin token.
    pub admin: Client,
    /// The shared HTTP client.
    pub http: reqwest::Client,
    admin_token: String,
    data_dir: TempDir,
    env: Vec<(String, String)>,
    env_ctx: Env,
    db_url: String,
}

impl Server {
    /// Creates an admin token with the CLI, then starts the server on `127.0.0.1:0`.
    pub async fn start(env: &Env, db: &Db, extra_env: &[(&str, String)]) -> anyhow::Result<Server> {
        let data_dir = tempfile::Builder::new()
            .prefix("outpost-bench-server-")
            .tempdir()
            .context("could not create a temporary directory")?;
        let mut vars: Vec<(String, String)> = extra_env
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        vars.extend(env.server_env.iter().cloned());
        let http = http_client()?;
        let mut server = Server {
            child: None,
            url: String::new(),
            pid: 0,
            admin: Client::with_http(http.clone(), "http://127.0.0.1:1", None),
            http,
            admin_token: String::new(),
            data_dir,
            env: vars,
            env_ctx: env.clone(),
            db_url: db.url().to_string(),
        };
        server.admin_token = server
            .cli(&[
                "token",
                "create",
                "--name",
                "bench-admin",
                "--scope",
                "admin",
            ])
            .await?;
        server.spawn().await?;
        if let (Some(sql), true) = (&env.pg_init_sql, db.url().starts_with("postgres")) {
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect(db.url())
                .await
                .context("connecting for --pg-init-sql")?;
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
                .execute(&mut conn)
                .await
                .context("running --pg-init-sql")?;
            let _ = conn.close().await;
        }
        server.admin = Client::with_http(
            server.http.clone(),
            &server.url,
            Some(server.admin_token.clone()),
        );
        Ok(server)
    }

    fn command(&self) -> anyhow::Result<Command> {
        let mut cmd = self.env_ctx.command("outpost-server")?;
        cmd.env("OUTPOST__DATA_DIR", self.data_dir.path())
            .env("OUTPOST__DATABASE__URL", &self.db_url)
            .env("OUTPOST__SERVER__LISTEN", "127.0.0.1:0");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        Ok(cmd)
    }

    /// Runs `outpost-server ARGS` with the server's environment; returns its trimmed stdout.
    pub async fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = self.command()?;
        cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        let what = format!("outpost-server {}", args.join(" "));
        let out = tokio::time::timeout(CLI_TIMEOUT, cmd.output())
            .await
            .map_err(|_| anyhow::anyhow!("`{what}` did not finish within {CLI_TIMEOUT:?}"))?
            .with_context(|| format!("could not run `{what}`"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
        ensure!(
            out.status.success(),
            "`{what}` failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(stdout)
    }

    /// The admin token the server was started with.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// The server's own log (stderr), kept in its data dir.
    pub fn log_path(&self) -> PathBuf {
        self.data_dir.path().join("server.log")
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.log_path()).context("could not create the log")?;
        let mut cmd = self.command()?;
        cmd.arg("serve").stdout(Stdio::piped()).stderr(log);
        let mut child = cmd.spawn().context("could not start outpost-server")?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(START_TIMEOUT, lines.next_line()).await;
        let line = match first {
            Ok(Ok(Some(line))) => line,
            other => {
                let _ = child.start_kill();
                let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
                bail!(
                    "outpost-server did not print its listening line ({other:?}); its log:\n{}",
                    tail(&log, 40)
                );
            }
        };
        let url = line
            .strip_prefix("outpost-server listening on ")
            .with_context(|| format!("unexpected first line from outpost-server: {line:?}"))?
            .trim()
            .to_string();
        // Keep draining stdout so the server never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.pid = child.id().context("the server has no pid")?;
        self.url = url;
        self.child = Some(child);
        Ok(())
    }

    /// Memory of the server process now.
    pub fn mem(&self) -> anyhow::Result<Mem> {
        read_mem(self.pid)
    }

    /// A new registration token for pool `bench`.
    pub async fn registration_token(&self) -> anyhow::Result<String> {
        self.cli(&["registration-token", "create", "--pool", "bench"])
            .await
    }

    /// Registers `n` runners labelled `bench` through the API, `concurrency` at a time; returns
    /// a client per runner that sends its runner token.
    pub async fn register_runners(
        &self,
        n: usize,
        concurrency: usize,
    ) -> anyhow::Result<Vec<Client>> {
        use futures::StreamExt;
        let registration = self.registration_token().await?;
        let reg = Client::with_http(self.http.clone(), &self.url, Some(registration));
        let clients: Vec<anyhow::Result<Client>> = futures::stream::iter(0..n)
            .map(|i| {
                let reg = reg.clone();
                async move {
                    let answer = reg
                        .register(&RegisterRequest {
                            name: format!("bench-{i:05}"),
                            labels: vec!["bench".into()],
                            version: outpost_protocol::VERSION.into(),
                            os: std::env::consts::OS.into(),
                            arch: std::env::consts::ARCH.into(),
                            clusters: Vec::new(),
                        })
                        .await
                        .with_context(|| format!("registering runner {i}"))?;
                    Ok(reg.with_token(answer.runner_token))
                }
            })
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await;
        clients.into_iter().collect()
    }

    /// Stops the server with SIGTERM and waits for it (SIGKILL after 15 s).
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            signal(&child, nix::sys::signal::Signal::SIGTERM);
            if tokio::time::timeout(Duration::from_secs(15), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
                bail!("outpost-server did not exit within 15 s of SIGTERM and was killed");
            }
        }
        Ok(())
    }
}

/// Sends `sig` to a child process (ignoring a process that already exited).
pub fn signal(child: &Child, sig: nix::sys::signal::Signal) {
    if let Some(pid) = child.id()
        && let Ok(pid) = i32::try_from(pid)
    {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A pipeline with `jobs` independent jobs `j0000…`, each running `true` on a `bench` runner.
pub fn pipeline_yaml(jobs: usize) -> String {
    let mut y = String::from("jobs:\n");
    for i in 0..jobs {
        y.push_str(&format!(
            "  j{i:04}:\n    runs_on: [bench]\n    steps:\n      - run: \"true\"\n"
        ));
    }
    y
}

/// Raises this process's soft `RLIMIT_NOFILE` to the hard limit; children inherit it.
/// Returns the new soft limit.
pub fn raise_fd_limit() -> anyhow::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit")?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("setrlimit")?;
    }
    Ok(hard)
}

/// Waits until `check` answers `Ok(true)`, polling every `every`, for at most `timeout`.
pub async fn wait_until<F, Fut>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut check: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(every).await;
    }
}

/// The directory holding the running binary (where `outpost-server` is looked for).
pub fn default_bin_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .map(|mut d| {
            if d.file_name().is_some_and(|n| n == "deps") {
                d.pop();
            }
            d
        })
        .unwrap_or_else(|| PathBuf::from("."))
}
