//! Live-log latency: a subscriber follows `GET /jobs/{id}/log/stream` while a simulated runner
//! appends one line every `live_interval_ms`; the figure is the time from the start of each append
//! request to the subscriber receiving the event that holds its last byte.
//!
//! The subscriber must see exactly the bytes appended, in order, and then the `end` event.

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use futures::StreamExt;
use outpost_protocol::sse::LogEvent;
use outpost_protocol::{CompleteRequest, JobStatus, TriggerRunRequest};
use tokio::sync::mpsc;

use super::Sizes;
use crate::harness::{Backend, Db, Env, Server, pipeline_yaml};
use crate::report::{Metrics, ms};

struct Received {
    offset: u64,
    next_offset: u64,
    text: String,
    at: Instant,
}

/// Runs the scenario once.
pub async fn run(env: &Env, backend: Backend, sizes: &Sizes) -> anyhow::Result<Metrics> {
    let db = Db::create(env, backend).await?;
    let server = Server::start(env, &db, &[]).await?;
    let result = measure(&server, sizes).await;
    server.stop().await?;
    result
}

async fn measure(server: &Server, sizes: &Sizes) -> anyhow::Result<Metrics> {
    let admin = &server.admin;
    admin
        .apply_pipeline("live", &pipeline_yaml(1))
        .await
        .context("applying the pipeline")?;
    let runner = server
        .register_runners(1, 1)
        .await?
        .pop()
        .expect("one runner");
    admin
        .trigger_run("live", &TriggerRunRequest::default())
        .await
        .context("trigger")?;
    let acquired = runner
        .acquire(Duration::from_secs(10))
        .await
        .context("acquire")?
        .context("no job was handed out")?;
    let job = acquired.job.id;
    let lease = acquired.lease.token.clone();
    runner
        .heartbeat(job, &lease)
        .await
        .context("first heartbeat")?;

    let (tx, mut rx) = mpsc::unbounded_channel::<Received>();
    let subscriber = admin.clone();
    let follow = tokio::spawn(async move {
        let mut stream = subscriber.stream_log(job, 0);
        while let Some(ev) = stream.next().await {
            let at = Instant::now();
            match ev.context("the log stream failed")? {
                LogEvent::Text {
                    offset,
                    next_offset,
                    text,
                } => {
                    let _ = tx.send(Received {
                        offset,
                        next_offset,
                        text,
                        at,
                    });
                }
                LogEvent::End {
                    status, log_size, ..
                } => return Ok::<_, anyhow::Error>(Some((status, log_size))),
            }
        }
        Ok(None)
    });

    // A first line proves the subscriber is connected before the clock starts.
    let hello = b"live-log benchmark starts\n";
    runner
        .append_log(job, &lease, 0, Bytes::from_static(hello))
        .await
        .context("first append")?;
    let mut events = Vec::new();
    let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .map_err(|_| anyhow::anyhow!("the subscriber saw nothing within 10 s"))?
        .context("the subscriber stopped")?;
    events.push(first);

    let mut sent = hello.to_vec();
    let mut appends: Vec<(u64, Instant)> = Vec::with_capacity(sizes.live_appends);
    for i in 0..sizes.live_appends {
        let line = format!(
            "{i:06} the quick brown fox jumps over the lazy dog, step output line {i} of the job\n"
        );
        let offset = sent.len() as u64;
        let at = Instant::now();
        let answer = runner
            .append_log(job, &lease, offset, Bytes::from(line.clone().into_bytes()))
            .await
            .with_context(|| format!("append {i}"))?;
        sent.extend_from_slice(line.as_bytes());
        ensure!(
            answer.next_offset == sent.len() as u64,
            "append {i} answered next_offset {}, expected {}",
            answer.next_offset,
            sent.len()
        );
        appends.push((sent.len() as u64, at));
        tokio::time::sleep(Duration::from_millis(sizes.live_interval_ms)).await;
    }
    runner
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
    let end = tokio::time::timeout(Duration::from_secs(30), follow)
        .await
        .map_err(|_| anyhow::anyhow!("the log stream did not end within 30 s of completion"))?
        .context("the subscriber task")??;
    while let Ok(ev) = rx.try_recv() {
        events.push(ev);
    }
    match end {
        Some((JobStatus::Succeeded, size)) if size == sent.len() as u64 => {}
        other => bail!(
            "the stream ended with {other:?}, expected succeeded with {} bytes",
            sent.len()
        ),
    }

    // The events must tile the log exactly, in order.
    let mut expect = 0u64;
    let mut text = String::new();
    for e in &events {
        ensure!(
            e.offset == expect,
            "an event starts at {} but the previous ended at {expect}",
            e.offset
        );
        expect = e.next_offset;
        text.push_str(&e.text);
    }
    ensure!(
        text.as_bytes() == sent.as_slice(),
        "the subscriber received {} bytes that differ from the {} appended",
        text.len(),
        sent.len()
    );

    let mut latencies = Vec::with_capacity(appends.len());
    for (end_offset, at) in &appends {
        let ev = events
            .iter()
            .find(|e| e.next_offset >= *end_offset)
            .context("no event covers an append")?;
        latencies.push(ms(ev.at.saturating_duration_since(*at)));
    }
    let mut m = Metrics::default();
    m.latency("", &latencies);
    m.push("events", "count", events.len() as f64);
    Ok(m)
}
