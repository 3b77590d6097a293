//! The load scenario of issue #10: many live-log viewers and many runners streaming logs at one
//! real `outpost-server`, with the server's memory sampled throughout.
//!
//! ```text
//! cargo build -p outpost-server --bin outpost-server
//! cargo run -p outpost-tests --bin load -- --viewers 1000 --runners 100 --secs 60 \
//!     [--backend sqlite|postgres] [--line-ms 100] [--max-rss-mib 512] [--db-connections N]
//! ```
//!
//! Each simulated runner speaks the real runner protocol: it claims one job, heartbeats, and
//! appends one log line every `--line-ms` milliseconds for `--secs` seconds, then completes the job.
//! The viewers are spread evenly over the jobs, each follows its job's live log (SSE) from byte 0
//! to the `end` event.
//! It exits non-zero if any call failed, any viewer saw fewer or other bytes than were stored, or
//! the server's RSS went above `--max-rss-mib`.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use futures::StreamExt;
use outpost_tests::outpost_protocol::sse::LogEvent;
use outpost_tests::outpost_protocol::{
    Client, CompleteRequest, JobStatus, RegisterRequest, StepStatus, StepUpdate,
};
use outpost_tests::{Backend, TestDb, TestServer};

const PIPELINE: &str = r#"
jobs:
  stream:
    runs_on: [load]
    steps:
      - run: echo "streamed by a simulated runner"
"#;

struct Options {
    viewers: usize,
    runners: usize,
    secs: u64,
    line_ms: u64,
    backend: Backend,
    max_rss_mib: u64,
    /// The server's database pool size (`OUTPOST__DATABASE__MAX_CONNECTIONS`), if not its default.
    db_connections: Option<u32>,
}

fn options() -> anyhow::Result<Options> {
    let mut o = Options {
        viewers: 1000,
        runners: 100,
        secs: 60,
        line_ms: 100,
        backend: Backend::Postgres,
        max_rss_mib: 512,
        db_connections: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--viewers" => o.viewers = value.parse().context("--viewers")?,
            "--runners" => o.runners = value.parse().context("--runners")?,
            "--secs" => o.secs = value.parse().context("--secs")?,
            "--line-ms" => o.line_ms = value.parse().context("--line-ms")?,
            "--max-rss-mib" => o.max_rss_mib = value.parse().context("--max-rss-mib")?,
            "--db-connections" => {
                o.db_connections = Some(value.parse().context("--db-connections")?)
            }
            "--backend" => {
                o.backend = match value.as_str() {
                    "sqlite" => Backend::Sqlite,
                    "postgres" => Backend::Postgres,
                    other => bail!("--backend is sqlite or postgres, not {other}"),
                }
            }
            other => bail!("unknown option {other}"),
        }
    }
    ensure!(o.runners > 0, "--runners must be at least 1");
    Ok(o)
}

/// The server's resident set size in KiB, from `/proc/PID/status`.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU seconds (user + system) a process has used, from `/proc/PID/stat` (clock ticks of 1/100 s,
/// the Linux default).
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after its closing parenthesis are fixed.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

#[derive(Default)]
struct Counters {
    errors: AtomicU64,
    appended_bytes: AtomicU64,
    viewed_bytes: AtomicU64,
    viewers_done: AtomicU64,
    appends: AtomicU64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let o = options()?;
    // Each viewer is one open connection on both ends, in this process and in the server.
    let want = (o.viewers + o.runners) as u64 * 2 + 1024;
    if let Ok(limits) = std::fs::read_to_string("/proc/self/limits")
        && let Some(soft) = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|n| n.parse::<u64>().ok())
    {
        ensure!(
            soft >= want,
            "the open-files limit is {soft}, {want} are needed: run `ulimit -n {want}` first"
        );
    }

    let db = TestDb::new(o.backend)
        .await
        .context("PostgreSQL is not reachable")?;
    let pool = o.db_connections.map(|n| n.to_string());
    let mut env = Vec::new();
    if let Some(n) = &pool {
        env.push(("OUTPOST__DATABASE__MAX_CONNECTIONS", n.as_str()));
    }
    let server = TestServer::start(&db, &env).await;
    let pid = server.pid().context("the server runs")?;
    let admin = server.client();
    admin
        .apply_pipeline("load", PIPELINE)
        .await
        .context("apply the pipeline")?;
    let idle_rss = rss_kib(pid).unwrap_or(0);

    // Runners: registered with one registration token, each claims one job.
    let registration = server.registration_token().await;
    let mut claimed = Vec::with_capacity(o.runners);
    for i in 0..o.runners {
        admin
            .trigger_run("load", &Default::default())
            .await
            .context("trigger a run")?;
        let answer = server
            .client_with(Some(registration.clone()))
            .register(&RegisterRequest {
                name: format!("load-{i}"),
                labels: vec!["load".into()],
                version: outpost_tests::outpost_protocol::VERSION.into(),
                os: std::env::consts::OS.into(),
                arch: std::env::consts::ARCH.into(),
                clusters: Vec::new(),
            })
            .await
            .context("register a simulated runner")?;
        // Its own HTTP client, as a separate runner process would have: the viewers' thousand
        // streams do not share a connection pool with it.
        let client = Client::new(server.url(), Some(answer.runner_token))
            .context("a runner's HTTP client")?;
        let acquired = client
            .acquire(Duration::from_secs(10))
            .await
            .context("acquire")?
            .context("every simulated runner gets a job")?;
        client
            .update_step(
                acquired.job.id,
                &acquired.lease.token,
                0,
                &StepUpdate {
                    status: StepStatus::Running,
                    exit_code: None,
                    log_offset: 0,
                },
            )
            .await
            .context("step running")?;
        claimed.push((client, acquired.job.id, acquired.lease.token));
    }
    println!(
        "load: {} runners registered and streaming, {} viewers connecting",
        o.runners, o.viewers
    );

    let counters = Arc::new(Counters::default());
    let started = Instant::now();
    let server_cpu_start = cpu_secs(pid).unwrap_or(0.0);
    let own_cpu_start = cpu_secs(std::process::id()).unwrap_or(0.0);

    // Viewers first, so that they are all attached while the logs grow.
    let mut viewers = Vec::with_capacity(o.viewers);
    for v in 0..o.viewers {
        let job = claimed[v % claimed.len()].1;
        let client = server.client();
        let counters = counters.clone();
        viewers.push(tokio::spawn(
            async move { view(client, job, counters).await },
        ));
    }

    let mut runners = Vec::with_capacity(claimed.len());
    for (client, job, lease) in claimed {
        let counters = counters.clone();
        let (secs, line_ms) = (o.secs, o.line_ms);
        runners.push(tokio::spawn(async move {
            stream(client, job, lease, secs, line_ms, counters).await
        }));
    }

    // Sample the server's memory while the load runs.
    let mut samples = Vec::new();
    let sampler_counters = counters.clone();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let runners_done = futures::future::join_all(runners);
    tokio::pin!(runners_done);
    let runner_results = loop {
        tokio::select! {
            results = &mut runners_done => break results,
            _ = ticker.tick() => {
                if let Some(rss) = rss_kib(pid) {
                    samples.push(rss);
                }
                println!(
                    "load: t={:>3}s rss={} MiB appended={} KiB viewed={} KiB errors={}",
                    started.elapsed().as_secs(),
                    samples.last().copied().unwrap_or(0) / 1024,
                    sampler_counters.appended_bytes.load(Ordering::Relaxed) / 1024,
                    sampler_counters.viewed_bytes.load(Ordering::Relaxed) / 1024,
                    sampler_counters.errors.load(Ordering::Relaxed),
                );
            }
        }
    };
    let mut sizes = std::collections::HashMap::new();
    for r in runner_results {
        match r {
            Ok(Ok((job, size))) => {
                sizes.insert(job, size);
            }
            Ok(Err(e)) => {
                eprintln!("load: a runner failed: {e:#}");
                counters.errors.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => bail!("a runner task panicked: {e}"),
        }
    }
    let mut short_viewers = 0;
    for v in futures::future::join_all(viewers).await {
        match v {
            Ok(Ok((job, seen))) => {
                if sizes.get(&job) != Some(&seen) {
                    short_viewers += 1;
                }
            }
            Ok(Err(e)) => {
                eprintln!("load: a viewer failed: {e:#}");
                counters.errors.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => bail!("a viewer task panicked: {e}"),
        }
    }
    if let Some(rss) = rss_kib(pid) {
        samples.push(rss);
    }
    let elapsed = started.elapsed();
    let server_cpu = cpu_secs(pid).unwrap_or(0.0) - server_cpu_start;
    let own_cpu = cpu_secs(std::process::id()).unwrap_or(0.0) - own_cpu_start;
    let max_rss = samples.iter().copied().max().unwrap_or(0);
    let errors = counters.errors.load(Ordering::Relaxed);
    let appends = counters.appends.load(Ordering::Relaxed);
    println!(
        "load: figures backend={:?} viewers={} runners={} duration={elapsed:?} appends={appends} \
         appends_per_s={:.0} appended_bytes={} viewed_bytes={} viewers_complete={} \
         viewers_short={short_viewers} errors={errors} db_connections={:?} rss_idle_mib={:.1} rss_max_mib={:.1} \
         rss_end_mib={:.1} server_cpu_s={server_cpu:.1} load_tool_cpu_s={own_cpu:.1}",
        o.backend,
        o.viewers,
        o.runners,
        appends as f64 / elapsed.as_secs_f64(),
        counters.appended_bytes.load(Ordering::Relaxed),
        counters.viewed_bytes.load(Ordering::Relaxed),
        counters.viewers_done.load(Ordering::Relaxed),
        o.db_connections,
        idle_rss as f64 / 1024.0,
        max_rss as f64 / 1024.0,
        samples.last().copied().unwrap_or(0) as f64 / 1024.0,
    );
    ensure!(errors == 0, "{errors} calls failed");
    ensure!(
        short_viewers == 0,
        "{short_viewers} viewers did not see the whole log"
    );
    ensure!(
        max_rss / 1024 <= o.max_rss_mib,
        "the server's RSS reached {} MiB, above --max-rss-mib {}",
        max_rss / 1024,
        o.max_rss_mib
    );
    drop(server);
    drop(db);
    Ok(())
}

/// One simulated runner: a line every `line_ms` for `secs`, heartbeats, then completion.
/// Returns the job and its final log size.
async fn stream(
    client: Client,
    job: uuid::Uuid,
    lease: String,
    secs: u64,
    line_ms: u64,
    counters: Arc<Counters>,
) -> anyhow::Result<(uuid::Uuid, u64)> {
    let until = Instant::now() + Duration::from_secs(secs);
    let mut offset = 0u64;
    let mut last_beat = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(line_ms));
    let mut n = 0u64;
    while Instant::now() < until {
        ticker.tick().await;
        n += 1;
        let line = format!("{job} line {n:06}: the quick brown fox jumps over the lazy dog\n");
        let answer = client
            .append_log(job, &lease, offset, Bytes::from(line))
            .await
            .context("append_log")?;
        counters
            .appended_bytes
            .fetch_add(answer.next_offset - offset, Ordering::Relaxed);
        counters.appends.fetch_add(1, Ordering::Relaxed);
        offset = answer.next_offset;
        if last_beat.elapsed() > Duration::from_secs(5) {
            client.heartbeat(job, &lease).await.context("heartbeat")?;
            last_beat = Instant::now();
        }
    }
    client
        .update_step(
            job,
            &lease,
            0,
            &StepUpdate {
                status: StepStatus::Succeeded,
                exit_code: Some(0),
                log_offset: offset,
            },
        )
        .await
        .context("step succeeded")?;
    client
        .complete(
            job,
            &lease,
            &CompleteRequest {
                status: JobStatus::Succeeded,
                exit_code: Some(0),
            },
        )
        .await
        .context("complete")?;
    Ok((job, offset))
}

/// One viewer: follows the job's live log to its end; returns how many bytes it saw.
async fn view(
    client: Client,
    job: uuid::Uuid,
    counters: Arc<Counters>,
) -> anyhow::Result<(uuid::Uuid, u64)> {
    let mut stream = client.stream_log(job, 0);
    let mut seen = 0u64;
    while let Some(event) = stream.next().await {
        match event.context("log stream")? {
            LogEvent::Text {
                offset,
                next_offset,
                ..
            } => {
                ensure!(
                    offset == seen,
                    "a gap: expected offset {seen}, got {offset}"
                );
                counters
                    .viewed_bytes
                    .fetch_add(next_offset - offset, Ordering::Relaxed);
                seen = next_offset;
            }
            LogEvent::End { log_size, .. } => {
                ensure!(log_size == seen, "saw {seen} bytes of {log_size}");
                counters.viewers_done.fetch_add(1, Ordering::Relaxed);
                return Ok((job, seen));
            }
        }
    }
    bail!("the stream ended without an end event after {seen} bytes")
}
