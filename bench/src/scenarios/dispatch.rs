//! Dispatch latency: idle runners long-poll; runs are enqueued one at a time; the figure is the
//! time from the start of the trigger request to the moment a runner's acquire answers with the
//! job.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use outpost_protocol::TriggerRunRequest;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::{Sizes, finish_noop, verify_runs};
use crate::harness::{Backend, Db, Env, Server, pipeline_yaml};
use crate::report::{Metrics, ms};

enum Seen {
    Received { run: Uuid, job: Uuid, at: Instant },
    Done,
    Failed(String),
}

/// Runs the scenario once.
pub async fn run(env: &Env, backend: Backend, sizes: &Sizes) -> anyhow::Result<Metrics> {
    let db = Db::create(env, backend).await?;
    let server = Server::start(
        env,
        &db,
        &[("OUTPOST__QUEUE__ACQUIRE_WAIT_SECS", "30".into())],
    )
    .await?;
    let result = measure(&server, sizes).await;
    server.stop().await?;
    result
}

async fn measure(server: &Server, sizes: &Sizes) -> anyhow::Result<Metrics> {
    let admin = &server.admin;
    admin
        .apply_pipeline("dispatch", &pipeline_yaml(1))
        .await
        .context("applying the pipeline")?;
    let runners = server.register_runners(sizes.dispatch_runners, 8).await?;
    let (tx, mut rx) = mpsc::channel::<Seen>(1024);
    let mut tasks = Vec::new();
    for client in runners {
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                match client.acquire(Duration::from_secs(30)).await {
                    Ok(Some(acquired)) => {
                        let at = Instant::now();
                        let job = acquired.job.id;
                        let _ = tx
                            .send(Seen::Received {
                                run: acquired.job.run_id,
                                job,
                                at,
                            })
                            .await;
                        let done = match finish_noop(&client, &acquired).await {
                            Ok(()) => Seen::Done,
                            Err(e) => Seen::Failed(format!("{e:#}")),
                        };
                        let _ = tx.send(done).await;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        let _ = tx.send(Seen::Failed(format!("acquire: {e}"))).await;
                        return;
                    }
                }
            }
        }));
    }
    drop(tx);
    // Let every runner's first long poll arrive and settle.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut latencies = Vec::with_capacity(sizes.dispatch_samples);
    let mut trigger_ms = Vec::with_capacity(sizes.dispatch_samples);
    let mut runs = Vec::with_capacity(sizes.dispatch_samples);
    let mut jobs_seen = HashSet::new();
    let outcome: anyhow::Result<()> = async {
        for i in 0..sizes.dispatch_samples {
            tokio::time::sleep(Duration::from_millis(sizes.dispatch_gap_ms)).await;
            let t0 = Instant::now();
            let run = admin
                .trigger_run("dispatch", &TriggerRunRequest::default())
                .await
                .with_context(|| format!("trigger {i}"))?;
            trigger_ms.push(ms(t0.elapsed()));
            runs.push(run.id);
            let mut received = None;
            let mut done = false;
            while received.is_none() || !done {
                let seen = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                    .await
                    .map_err(|_| anyhow::anyhow!("no runner got run {} within 30 s", run.id))?
                    .context("every runner stopped")?;
                match seen {
                    Seen::Received { run: r, job, at } => {
                        ensure!(
                            r == run.id,
                            "a runner got a job of run {r}, expected {}",
                            run.id
                        );
                        ensure!(jobs_seen.insert(job), "job {job} was handed out twice");
                        received = Some(at);
                    }
                    Seen::Done => done = true,
                    Seen::Failed(e) => bail!("a simulated runner failed: {e}"),
                }
            }
            let at = received.expect("set above");
            latencies.push(ms(at.saturating_duration_since(t0)));
        }
        Ok(())
    }
    .await;
    for t in &tasks {
        t.abort();
    }
    outcome?;
    verify_runs(admin, &runs, sizes.dispatch_samples).await?;

    let mut m = Metrics::default();
    m.latency("", &latencies);
    m.latency("trigger_", &trigger_ms);
    Ok(m)
}
