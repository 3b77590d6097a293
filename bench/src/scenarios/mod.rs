//! The scenarios of issue #3. Each starts its own server on a fresh database, drives it only
//! through the HTTP API and the runner protocol, verifies its own outcome, and returns figures.

pub mod dispatch;
pub mod idle;
pub mod live_log;
pub mod logs;
pub mod runner;
pub mod throughput;

use anyhow::{Context, ensure};
use bytes::Bytes;
use outpost_protocol::{AcquireResponse, Client, CompleteRequest, JobStatus, RunStatus};
use uuid::Uuid;

/// Sizes of every scenario; `--smoke` shrinks them to a correctness check.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sizes {
    /// Dispatch: samples (runs enqueued one at a time).
    pub dispatch_samples: usize,
    /// Dispatch: idle runners long-polling.
    pub dispatch_runners: usize,
    /// Dispatch: pause between samples, so every runner is back in its long poll, in ms.
    pub dispatch_gap_ms: u64,
    /// Throughput: jobs per phase.
    pub jobs: usize,
    /// Throughput: simulated runners.
    pub runners: usize,
    /// Throughput: jobs per run (a pipeline of that many independent jobs).
    pub jobs_per_run: usize,
    /// Throughput: concurrent trigger requests while enqueuing.
    pub enqueue_concurrency: usize,
    /// Logs: jobs streaming at once.
    pub log_jobs: usize,
    /// Logs: MiB per job.
    pub log_mib: usize,
    /// Logs: MiB of the single big log (0 skips it).
    pub big_log_mib: usize,
    /// Logs: bytes per append, in KiB.
    pub chunk_kib: usize,
    /// Live log: timed appends.
    pub live_appends: usize,
    /// Live log: pause between appends, in ms.
    pub live_interval_ms: u64,
    /// Idle: concurrent long polls held.
    pub polls: usize,
    /// Idle: jobs enqueued one at a time once the polls are held.
    pub idle_jobs: usize,
    /// Runner: process starts measured.
    pub runner_samples: usize,
    /// Runner: how long the runner idles before its RSS is read, in ms.
    pub runner_settle_ms: u64,
}

impl Sizes {
    /// The full-size benchmark.
    pub fn full() -> Self {
        Sizes {
            dispatch_samples: 200,
            dispatch_runners: 4,
            dispatch_gap_ms: 25,
            jobs: 5000,
            runners: 16,
            jobs_per_run: 50,
            enqueue_concurrency: 8,
            log_jobs: 4,
            log_mib: 64,
            big_log_mib: 1024,
            chunk_kib: 1024,
            live_appends: 200,
            live_interval_ms: 20,
            polls: 10_000,
            idle_jobs: 20,
            runner_samples: 5,
            runner_settle_ms: 3000,
        }
    }

    /// Tiny sizes: checks that every scenario still works, not how fast.
    pub fn smoke() -> Self {
        Sizes {
            dispatch_samples: 5,
            dispatch_runners: 2,
            dispatch_gap_ms: 10,
            jobs: 40,
            runners: 4,
            jobs_per_run: 10,
            enqueue_concurrency: 4,
            log_jobs: 2,
            log_mib: 1,
            big_log_mib: 4,
            chunk_kib: 256,
            live_appends: 10,
            live_interval_ms: 10,
            polls: 50,
            idle_jobs: 3,
            runner_samples: 1,
            runner_settle_ms: 300,
        }
    }
}

/// What a simulated runner does with a no-op job: an empty log append, then `succeeded`.
pub async fn finish_noop(client: &Client, acquired: &AcquireResponse) -> anyhow::Result<()> {
    let job = acquired.job.id;
    let lease = &acquired.lease.token;
    client
        .append_log(job, lease, 0, Bytes::new())
        .await
        .with_context(|| format!("empty log append for job {job}"))?;
    client
        .complete(
            job,
            lease,
            &CompleteRequest {
                status: JobStatus::Succeeded,
                exit_code: Some(0),
            },
        )
        .await
        .with_context(|| format!("completing job {job}"))?;
    Ok(())
}

/// `name status (attempt N)` for each job, counting repeats, for failure messages.
fn describe_jobs(jobs: &[outpost_protocol::Job]) -> String {
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    for j in jobs {
        *counts
            .entry(format!(
                "{} after {} claim(s)",
                j.status.as_str(),
                j.attempt
            ))
            .or_default() += 1;
    }
    counts
        .iter()
        .map(|(k, n)| format!("{n} {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks through the API that every run ended `succeeded` with every job claimed exactly once.
pub async fn verify_runs(
    admin: &Client,
    runs: &[Uuid],
    expected_jobs: usize,
) -> anyhow::Result<()> {
    use futures::StreamExt;
    let checked: Vec<anyhow::Result<usize>> = futures::stream::iter(runs.iter().copied())
        .map(|id| async move {
            let run = admin
                .get_run(id)
                .await
                .with_context(|| format!("GET run {id}"))?;
            ensure!(
                run.status == RunStatus::Succeeded,
                "run {id} is {}, not succeeded, after all its jobs were completed; its jobs: {}",
                run.status.as_str(),
                describe_jobs(&run.jobs)
            );
            for job in &run.jobs {
                ensure!(
                    job.status == JobStatus::Succeeded && job.attempt == 1,
                    "job {} of run {id} is {} after {} claims (expected succeeded after 1)",
                    job.id,
                    job.status.as_str(),
                    job.attempt
                );
            }
            Ok(run.jobs.len())
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let mut total = 0;
    for c in checked {
        total += c?;
    }
    ensure!(
        total == expected_jobs,
        "the runs hold {total} jobs, {expected_jobs} were expected"
    );
    Ok(())
}
