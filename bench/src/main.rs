//! `outpost-bench`: starts a real `outpost-server` (SQLite or PostgreSQL) and drives it through
//! the public API and the runner protocol with simulated runners, then prints a table and JSON.
//!
//! See BENCHMARKS.md at the repository root for the method and the latest figures.

#![forbid(unsafe_code)]

mod ceiling;
mod harness;
mod peer;
mod report;
mod scenarios;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use harness::{Backend, Env};
use report::{Metrics, ScenarioResult};
use scenarios::Sizes;

/// Benchmarks Outpost through its public protocol: dispatch latency, throughput, log ingestion,
/// live-log latency, idle long polls and the runner's footprint.
#[derive(Debug, Parser)]
#[command(name = "outpost-bench", version)]
struct Cli {
    /// What to measure.
    #[arg(value_enum, default_value = "all")]
    scenario: Scenario,
    /// Which database the server uses [default: sqlite; with --smoke: both].
    #[arg(long, value_enum)]
    backend: Option<BackendArg>,
    /// Tiny sizes, every scenario: checks that the harness and the server still work, not speed.
    #[arg(long)]
    smoke: bool,
    /// Runs of each scenario; figures are medians over them.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Where outpost-server and outpost-runner are [default: the directory of this binary].
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    /// A PostgreSQL URL of an existing database, used to create and drop fresh ones.
    #[arg(
        long,
        env = "OUTPOST_BENCH_PG_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pg_url: String,
    /// Extra environment for every server, e.g. --server-env OUTPOST__DATABASE__MAX_CONNECTIONS=32.
    #[arg(long, value_name = "KEY=VALUE")]
    server_env: Vec<String>,
    /// An experiment: SQL run on each PostgreSQL database after the server migrated it, e.g.
    /// "ALTER TABLE log_chunks ALTER COLUMN data SET STORAGE EXTERNAL".
    #[arg(long, value_name = "SQL")]
    pg_init_sql: Option<String>,
    /// Dispatch: samples.
    #[arg(long)]
    dispatch_samples: Option<usize>,
    /// Dispatch: idle runners.
    #[arg(long)]
    dispatch_runners: Option<usize>,
    /// Throughput (and peer): jobs per phase.
    #[arg(long)]
    jobs: Option<usize>,
    /// Throughput (and peer): concurrent runners / worker concurrency.
    #[arg(long)]
    runners: Option<usize>,
    /// Throughput: jobs per run.
    #[arg(long)]
    jobs_per_run: Option<usize>,
    /// Logs: jobs streaming at once.
    #[arg(long)]
    log_jobs: Option<usize>,
    /// Logs: MiB per job.
    #[arg(long)]
    log_mib: Option<usize>,
    /// Logs: MiB of the single big log (0 skips it).
    #[arg(long)]
    big_log_mib: Option<usize>,
    /// Logs: KiB per append.
    #[arg(long)]
    chunk_kib: Option<usize>,
    /// Live log: appends.
    #[arg(long)]
    live_appends: Option<usize>,
    /// Idle: long polls held.
    #[arg(long)]
    polls: Option<usize>,
    /// Idle: jobs enqueued once the polls are held.
    #[arg(long)]
    idle_jobs: Option<usize>,
    /// Runner: process starts measured.
    #[arg(long)]
    runner_samples: Option<usize>,
    /// Peer: where the graphile-worker script is [default: bench/peers/graphile in the source tree].
    #[arg(long, value_name = "DIR")]
    peer_dir: Option<PathBuf>,
    /// Ceiling: pgbench clients.
    #[arg(long, default_value_t = 8)]
    pgbench_clients: usize,
    /// Ceiling: claims per pgbench client.
    #[arg(long, default_value_t = 2000)]
    pgbench_claims: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Enqueue-to-runner latency with idle long-polling runners.
    Dispatch,
    /// No-op jobs per second (enqueue, drain, end to end).
    Throughput,
    /// Log ingestion MB/s and server RSS, including one 1 GiB log.
    Logs,
    /// Append-to-subscriber latency on the SSE log stream.
    LiveLog,
    /// Many long polls held: server RSS and acquire latency.
    Idle,
    /// outpost-runner idle RSS and start-to-first-acquire.
    Runner,
    /// The six scenarios above.
    All,
    /// Outpost against graphile-worker 0.17.3 on the same PostgreSQL (throughput and latency).
    Peer,
    /// The machine's limits: pg_test_fsync and pgbench running Outpost's claim statement.
    Ceiling,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BackendArg {
    Sqlite,
    Postgres,
    Both,
}

const SIX: [Scenario; 6] = [
    Scenario::Dispatch,
    Scenario::Throughput,
    Scenario::Logs,
    Scenario::LiveLog,
    Scenario::Idle,
    Scenario::Runner,
];

fn scenario_name(s: Scenario) -> &'static str {
    match s {
        Scenario::Dispatch => "dispatch",
        Scenario::Throughput => "throughput",
        Scenario::Logs => "logs",
        Scenario::LiveLog => "live-log",
        Scenario::Idle => "idle",
        Scenario::Runner => "runner",
        Scenario::All => "all",
        Scenario::Peer => "peer",
        Scenario::Ceiling => "ceiling",
    }
}

/// The sizes that matter to one scenario, for the JSON.
fn params_of(s: Scenario, sizes: &Sizes) -> BTreeMap<String, serde_json::Value> {
    let all = serde_json::to_value(sizes).expect("sizes serialise");
    let keys: &[&str] = match s {
        Scenario::Dispatch => &["dispatch_samples", "dispatch_runners", "dispatch_gap_ms"],
        Scenario::Throughput | Scenario::Peer => &[
            "jobs",
            "runners",
            "jobs_per_run",
            "enqueue_concurrency",
            "dispatch_samples",
        ],
        Scenario::Logs => &["log_jobs", "log_mib", "big_log_mib", "chunk_kib"],
        Scenario::LiveLog => &["live_appends", "live_interval_ms"],
        Scenario::Idle => &["polls", "idle_jobs"],
        Scenario::Runner => &["runner_samples", "runner_settle_ms"],
        Scenario::Ceiling => &["log_jobs", "log_mib", "big_log_mib", "chunk_kib"],
        Scenario::All => &[],
    };
    keys.iter()
        .filter_map(|k| all.get(*k).map(|v| (k.to_string(), v.clone())))
        .collect()
}

async fn run_once(
    s: Scenario,
    env: &Env,
    backend: Backend,
    sizes: &Sizes,
    cli: &Cli,
) -> anyhow::Result<Metrics> {
    match s {
        Scenario::Dispatch => scenarios::dispatch::run(env, backend, sizes).await,
        Scenario::Throughput => scenarios::throughput::run(env, backend, sizes).await,
        Scenario::Logs => scenarios::logs::run(env, backend, sizes).await,
        Scenario::LiveLog => scenarios::live_log::run(env, backend, sizes).await,
        Scenario::Idle => scenarios::idle::run(env, backend, sizes).await,
        Scenario::Runner => scenarios::runner::run(env, backend, sizes).await,
        Scenario::Peer => {
            anyhow::ensure!(
                backend == Backend::Postgres,
                "the peer comparison runs on PostgreSQL only: pass --backend postgres"
            );
            peer::run(env, sizes, cli.peer_dir.clone()).await
        }
        Scenario::Ceiling => {
            anyhow::ensure!(
                backend == Backend::Postgres,
                "the ceiling is measured on PostgreSQL only: pass --backend postgres"
            );
            ceiling::run(env, sizes, cli.pgbench_clients, cli.pgbench_claims).await
        }
        Scenario::All => unreachable!("expanded before"),
    }
}

fn sizes_from(cli: &Cli) -> Sizes {
    let mut s = if cli.smoke {
        Sizes::smoke()
    } else {
        Sizes::full()
    };
    macro_rules! take {
        ($($f:ident),*) => { $( if let Some(v) = cli.$f { s.$f = v; } )* };
    }
    take!(
        dispatch_samples,
        dispatch_runners,
        jobs,
        runners,
        jobs_per_run,
        log_jobs,
        log_mib,
        big_log_mib,
        chunk_kib,
        live_appends,
        polls,
        idle_jobs,
        runner_samples
    );
    s
}

/// What the JSON says about the machine and the build.
fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    serde_json::json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory_gib": (mem_kib as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        "cpu": model,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "bench_build": if cfg!(debug_assertions) { "debug" } else { "release" },
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime can be built");
    runtime.block_on(real_main(cli))
}

async fn real_main(cli: Cli) -> ExitCode {
    let fd_limit = match harness::raise_fd_limit() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("warning: could not raise the open-file limit: {e:#}");
            0
        }
    };
    let server_env = cli
        .server_env
        .iter()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    let env = Env {
        bin_dir: cli.bin_dir.clone().unwrap_or_else(harness::default_bin_dir),
        pg_admin_url: cli.pg_url.clone(),
        server_env,
        pg_init_sql: cli.pg_init_sql.clone(),
    };
    let sizes = sizes_from(&cli);
    let backends: Vec<Backend> = match (cli.backend, cli.smoke) {
        (Some(BackendArg::Sqlite), _) => vec![Backend::Sqlite],
        (Some(BackendArg::Postgres), _) => vec![Backend::Postgres],
        (Some(BackendArg::Both), _) | (None, true) => vec![Backend::Sqlite, Backend::Postgres],
        (None, false) => match cli.scenario {
            Scenario::Peer | Scenario::Ceiling => vec![Backend::Postgres],
            _ => vec![Backend::Sqlite],
        },
    };
    let scenario_list: Vec<Scenario> = if cli.smoke || cli.scenario == Scenario::All {
        SIX.to_vec()
    } else {
        vec![cli.scenario]
    };
    let server_build = env
        .bin_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    eprintln!(
        "outpost-bench: servers from {} ({}), open-file limit {fd_limit}",
        env.bin_dir.display(),
        server_build
    );
    if !cli.smoke && server_build != "release" {
        eprintln!("warning: the binaries are not a release build; the figures mean little");
    }

    let mut results = Vec::new();
    for &backend in &backends {
        for &s in &scenario_list {
            let name = scenario_name(s);
            let mut runs = Vec::new();
            let mut error = None;
            for i in 0..cli.repeat.max(1) {
                eprintln!(
                    "running {name} on {} ({}/{})",
                    backend.as_str(),
                    i + 1,
                    cli.repeat.max(1)
                );
                let started = std::time::Instant::now();
                match run_once(s, &env, backend, &sizes, &cli).await {
                    Ok(m) => {
                        eprintln!("  done in {:.1} s", started.elapsed().as_secs_f64());
                        runs.push(m);
                    }
                    Err(e) => {
                        eprintln!("  FAILED: {e:#}");
                        error = Some(format!("{e:#}"));
                        break;
                    }
                }
            }
            let r =
                ScenarioResult::fold(name, backend.as_str(), params_of(s, &sizes), &runs, error);
            results.push(r);
        }
    }

    print!("{}", report::table(&results));
    let checks = report::check_targets(&results);
    let failed = results.iter().filter(|r| !r.ok).count();
    let json = serde_json::json!({
        "machine": machine(),
        "server_build": server_build,
        "smoke": cli.smoke,
        "repeat": cli.repeat.max(1),
        "started_at": chrono::Utc::now().to_rfc3339(),
        "results": results,
        "targets": checks,
    });
    if let Some(path) = &cli.json
        && let Err(e) = std::fs::write(
            path,
            serde_json::to_string_pretty(&json).expect("json serialises"),
        )
    {
        eprintln!("error: could not write {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    if failed > 0 {
        eprintln!("{failed} scenario(s) failed");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
