//! Idle scale: N registered runners each hold one acquire long poll; the figures are the server's
//! RSS while they wait, and the acquire latency (trigger start → a poll answers with the job)
//! when jobs then arrive one at a time.
//!
//! Every poll must still be open at the end except those that got a job, and every job must be
//! handed out exactly once.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use outpost_protocol::TriggerRunRequest;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::{Sizes, finish_noop, verify_runs};
use crate::harness::{Backend, Db, Env, RssSampler, Server, pipeline_yaml};
use crate::report::{Metrics, ms};

/// How long the server may hold a poll in this scenario (longer than the scenario takes).
const HOLD_SECS: u64 = 900;

enum Answer {
    Job { run: Uuid, job: Uuid, at: Instant },
    Ended(String),
}

/// The machine's `TcpExt: ListenOverflows` counter: connections dropped because a listen
/// backlog was full (for every socket on the machine, so only a hint).
fn listen_overflows() -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "ListenOverflows")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// Runs the scenario once.
pub async fn run(env: &Env, backend: Backend, sizes: &Sizes) -> anyhow::Result<Metrics> {
    let db = Db::create(env, backend).await?;
    let server = Server::start(
        env,
        &db,
        &[("OUTPOST__QUEUE__ACQUIRE_WAIT_SECS", HOLD_SECS.to_string())],
    )
    .await?;
    let result = measure(&server, sizes).await;
    server.stop().await?;
    result
}

async fn measure(server: &Server, sizes: &Sizes) -> anyhow::Result<Metrics> {
    let admin = &server.admin;
    admin
        .apply_pipeline("idle", &pipeline_yaml(1))
        .await
        .context("applying the pipeline")?;
    let reg_started = Instant::now();
    let clients = server.register_runners(sizes.polls, 32).await?;
    let register_took = reg_started.elapsed();
    let baseline = server.mem()?;

    let overflows_before = listen_overflows();
    let mark = chrono::Utc::now();
    let polls_started = Instant::now();
    let (tx, mut rx) = mpsc::unbounded_channel::<Answer>();
    let mut tasks = Vec::with_capacity(clients.len());
    for (i, client) in clients.into_iter().enumerate() {
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let answer = match client.acquire(Duration::from_secs(HOLD_SECS)).await {
                Ok(Some(a)) => {
                    let at = Instant::now();
                    let _ = tx.send(Answer::Job {
                        run: a.job.run_id,
                        job: a.job.id,
                        at,
                    });
                    match finish_noop(&client, &a).await {
                        Ok(()) => return,
                        Err(e) => Answer::Ended(format!("poll {i}: {e:#}")),
                    }
                }
                Ok(None) => Answer::Ended(format!("poll {i} answered 204 before its wait ended")),
                Err(e) => Answer::Ended(format!("poll {i}: {:#}", anyhow::Error::from(e))),
            };
            let _ = tx.send(answer);
        }));
        // Open the connections in waves: the server listens with a backlog of 128, and a burst
        // faster than this lost connections to a full accept queue (see BENCHMARKS.md).
        if i % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    drop(tx);

    let outcome: anyhow::Result<Metrics> = async {
        // Each poll's arrival updates its runner's last_seen_at: wait until all have arrived.
        let n = sizes.polls;
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if let Ok(Answer::Ended(e)) = rx.try_recv() {
                bail!("{e}");
            }
            let list = admin.list_runners().await.context("GET runners")?;
            let arrived = list
                .runners
                .iter()
                .filter(|r| r.last_seen_at.is_some_and(|t| t >= mark))
                .count();
            if arrived >= n {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "only {arrived} of {n} long polls reached the server within 300 s"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let established = polls_started.elapsed();
        let overflows = listen_overflows().saturating_sub(overflows_before);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let held = server.mem()?;

        let sampler = RssSampler::start(server.pid, Duration::from_millis(20));
        let mut latencies = Vec::new();
        let mut runs = Vec::new();
        let mut jobs = HashSet::new();
        for i in 0..sizes.idle_jobs {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let t0 = Instant::now();
            let run = admin
                .trigger_run("idle", &TriggerRunRequest::default())
                .await
                .with_context(|| format!("trigger {i}"))?;
            runs.push(run.id);
            let answer = tokio::time::timeout(Duration::from_secs(120), rx.recv())
                .await
                .map_err(|_| anyhow::anyhow!("no poll got run {} within 120 s", run.id))?
                .context("every poll ended")?;
            match answer {
                Answer::Job { run: r, job, at } => {
                    ensure!(r == run.id, "a poll got run {r}, expected {}", run.id);
                    ensure!(jobs.insert(job), "job {job} was handed out twice");
                    latencies.push(ms(at.saturating_duration_since(t0)));
                }
                Answer::Ended(e) => bail!("{e}"),
            }
        }
        // Let the last completions land, then check nothing else ended.
        let expected_open = sizes.polls - sizes.idle_jobs;
        let deadline = Instant::now() + Duration::from_secs(120);
        while tasks.iter().filter(|t| !t.is_finished()).count() > expected_open
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Ok(a) = rx.try_recv() {
            match a {
                Answer::Ended(e) => bail!("{e}"),
                Answer::Job { job, .. } => bail!("job {job} was handed out with nothing queued"),
            }
        }
        let still_open = tasks.iter().filter(|t| !t.is_finished()).count();
        ensure!(
            still_open == expected_open,
            "{still_open} polls are still open, {expected_open} expected"
        );
        verify_runs(admin, &runs, sizes.idle_jobs).await?;

        let mut m = Metrics::default();
        m.push("polls", "count", n as f64);
        m.push("server_rss_mib", "MiB", held.rss_mib());
        m.push("server_rss_baseline_mib", "MiB", baseline.rss_mib());
        m.push(
            "server_rss_per_poll_kib",
            "KiB",
            (held.rss_kib.saturating_sub(baseline.rss_kib)) as f64 / n.max(1) as f64,
        );
        m.push(
            "server_peak_rss_jobs_mib",
            "MiB",
            sampler.peak_mib().max(server.mem()?.rss_mib()),
        );
        m.latency("acquire_", &latencies);
        m.push(
            "register_per_s",
            "runners/s",
            n as f64 / register_took.as_secs_f64(),
        );
        m.push("polls_established_s", "s", established.as_secs_f64());
        m.push("listen_overflows", "count", overflows as f64);
        Ok(m)
    }
    .await;
    for t in &tasks {
        t.abort();
    }
    outcome
}
