//! Outpost side by side with graphile-worker 0.17.3 (`bench/peers/graphile/`): the same no-op
//! throughput workload and the same dispatch-latency measurement, on the same PostgreSQL, in
//! the same invocation, and the ratios.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, ensure};
use tokio::process::Command;
use uuid::Uuid;

use crate::harness::{Backend, Env, create_pg_database, drop_pg_database};
use crate::report::Metrics;
use crate::scenarios::{Sizes, dispatch, throughput};

/// The peer script's directory in the source tree.
pub fn default_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/graphile")
}

/// Installs the pinned graphile-worker with `npm ci` unless `node_modules` is there.
async fn ensure_installed(dir: &Path) -> anyhow::Result<()> {
    if dir
        .join("node_modules/graphile-worker/package.json")
        .is_file()
    {
        return Ok(());
    }
    eprintln!("installing graphile-worker in {} (npm ci)", dir.display());
    let status = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(dir)
        .stdout(Stdio::null())
        .status()
        .await
        .context("could not run npm (is Node.js installed?)")?;
    ensure!(status.success(), "npm ci failed in {}", dir.display());
    Ok(())
}

/// Runs the peer script against a fresh database; returns its JSON.
async fn run_graphile(env: &Env, dir: &Path, sizes: &Sizes) -> anyhow::Result<serde_json::Value> {
    ensure_installed(dir).await?;
    let name = format!("outpost_bench_peer_{}", Uuid::now_v7().simple());
    let url = create_pg_database(&env.pg_admin_url, &name).await?;
    let out = tokio::time::timeout(
        Duration::from_secs(1800),
        Command::new("node")
            .arg("bench.js")
            .current_dir(dir)
            .env("PEER_DATABASE_URL", &url)
            .env("PEER_JOBS", sizes.jobs.to_string())
            .env("PEER_CONCURRENCY", sizes.runners.to_string())
            .env("PEER_BATCH", sizes.jobs_per_run.to_string())
            .env("PEER_ENQUEUERS", sizes.enqueue_concurrency.to_string())
            .env("PEER_SAMPLES", sizes.dispatch_samples.to_string())
            .env("PEER_LAT_WORKERS", sizes.dispatch_runners.to_string())
            .env("PEER_GAP_MS", sizes.dispatch_gap_ms.to_string())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await;
    drop_pg_database(&env.pg_admin_url, &name);
    let out = out
        .map_err(|_| anyhow::anyhow!("the graphile-worker benchmark took over 30 minutes"))?
        .context("could not run node")?;
    ensure!(
        out.status.success(),
        "the graphile-worker benchmark failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("the graphile-worker benchmark printed no JSON")?;
    serde_json::from_str(line).context("the graphile-worker benchmark printed bad JSON")
}

/// Runs Outpost's throughput and dispatch scenarios on PostgreSQL, then graphile-worker's.
pub async fn run(env: &Env, sizes: &Sizes, dir: Option<PathBuf>) -> anyhow::Result<Metrics> {
    let dir = dir.unwrap_or_else(default_dir);
    let tp = throughput::run(env, Backend::Postgres, sizes).await?;
    let lat = dispatch::run(env, Backend::Postgres, sizes).await?;
    let peer = run_graphile(env, &dir, sizes).await?;
    let get = |m: &Metrics, n: &str| {
        m.values
            .iter()
            .find(|(k, _, _)| k == n)
            .map(|(_, _, v)| *v)
            .unwrap_or(f64::NAN)
    };
    let pf = |n: &str| peer.get(n).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);

    let mut m = Metrics::default();
    for (name, o, g) in [
        (
            "enqueue",
            get(&tp, "enqueue_jobs_per_s"),
            pf("enqueue_jobs_per_s"),
        ),
        (
            "drain",
            get(&tp, "drain_jobs_per_s"),
            pf("drain_jobs_per_s"),
        ),
        ("e2e", get(&tp, "e2e_jobs_per_s"), pf("e2e_jobs_per_s")),
    ] {
        m.push(format!("outpost_{name}_jobs_per_s"), "jobs/s", o);
        m.push(format!("graphile_{name}_jobs_per_s"), "jobs/s", g);
        m.push(format!("ratio_{name}_rate"), "x", o / g);
    }
    for p in ["p50", "p99"] {
        let o = get(&lat, &format!("{p}_ms"));
        let g = pf(&format!("dispatch_{p}_ms"));
        m.push(format!("outpost_dispatch_{p}_ms"), "ms", o);
        m.push(format!("graphile_dispatch_{p}_ms"), "ms", g);
        // Above 1 means Outpost is faster.
        m.push(format!("ratio_dispatch_{p}"), "x", g / o);
    }
    Ok(m)
}
