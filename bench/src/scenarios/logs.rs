//! Log ingestion: K jobs each stream L MiB through `PUT /runner/jobs/{id}/log?offset=N` at once,
//! then (on a fresh server) one job streams one big log (1 GiB by default).
//!
//! Figures: MB/s stored (10^6 bytes, from the first append to the last acknowledgement) and the
//! server's peak RSS, sampled every 20 ms while the bytes stream. Every log is read back through
//! `GET /jobs/{id}/log` and its SHA-256 compared with what was sent.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use bytes::Bytes;
use futures::StreamExt;
use outpost_protocol::{AcquireResponse, Client, CompleteRequest, JobStatus, TriggerRunRequest};
use sha2::{Digest, Sha256};

use super::Sizes;
use crate::harness::{Backend, Db, Env, RssSampler, Server, pipeline_yaml};
use crate::report::Metrics;

/// Deterministic log text: each append starts with a line naming its job and offset, followed by
/// pseudo-random lowercase text from a pool, so a reordered, lost or repeated chunk changes the hash.
pub(crate) struct LogText {
    pool: Vec<u8>,
}

impl LogText {
    pub(crate) fn new(chunk: usize) -> Self {
        let len = chunk * 2 + 65_536;
        let mut pool = Vec::with_capacity(len);
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for i in 0..len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            pool.push(if i % 81 == 80 {
                b'\n'
            } else {
                b'a' + (x % 26) as u8
            });
        }
        LogText { pool }
    }

    pub(crate) fn chunk(&self, job: usize, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = format!("job {job} offset {offset:012}\n").into_bytes();
        buf.truncate(len);
        let start = ((offset / 4096) as usize * 4099) % (self.pool.len() - len);
        let rest = len - buf.len();
        buf.extend_from_slice(&self.pool[start..start + rest]);
        buf
    }

    fn sha256(&self, job: usize, total: u64, chunk: usize) -> String {
        let mut h = Sha256::new();
        let mut offset = 0;
        while offset < total {
            let len = chunk.min((total - offset) as usize);
            h.update(self.chunk(job, offset, len));
            offset += len as u64;
        }
        hex::encode(h.finalize())
    }
}

/// Runs the scenario once.
pub async fn run(env: &Env, backend: Backend, sizes: &Sizes) -> anyhow::Result<Metrics> {
    let chunk = sizes.chunk_kib * 1024;
    let text = LogText::new(chunk);
    let mut m = Metrics::default();
    let per_job = sizes.log_mib as u64 * 1024 * 1024;
    case(
        env,
        backend,
        sizes,
        &text,
        "multi",
        sizes.log_jobs,
        per_job,
        &mut m,
    )
    .await?;
    if sizes.big_log_mib > 0 {
        let big = sizes.big_log_mib as u64 * 1024 * 1024;
        case(env, backend, sizes, &text, "big", 1, big, &mut m).await?;
    }
    Ok(m)
}

#[allow(clippy::too_many_arguments)]
async fn case(
    env: &Env,
    backend: Backend,
    sizes: &Sizes,
    text: &LogText,
    label: &str,
    jobs: usize,
    bytes_per_job: u64,
    m: &mut Metrics,
) -> anyhow::Result<()> {
    let chunk = sizes.chunk_kib * 1024;
    let db = Db::create(env, backend).await?;
    let max_body = (chunk * 2).max(10 * 1024 * 1024);
    let server = Server::start(
        env,
        &db,
        &[
            ("OUTPOST__SERVER__MAX_BODY_BYTES", max_body.to_string()),
            ("OUTPOST__QUEUE__LEASE_SECS", "120".into()),
        ],
    )
    .await?;
    let result = measure(&server, text, label, jobs, bytes_per_job, chunk, m).await;
    server.stop().await?;
    result
}

async fn upload(
    client: &Client,
    acquired: &AcquireResponse,
    text: &LogText,
    job_index: usize,
    total: u64,
    chunk: usize,
) -> anyhow::Result<()> {
    let job = acquired.job.id;
    let lease = &acquired.lease.token;
    let mut offset = 0u64;
    while offset < total {
        let len = chunk.min((total - offset) as usize);
        let data = Bytes::from(text.chunk(job_index, offset, len));
        let answer = client
            .append_log(job, lease, offset, data)
            .await
            .with_context(|| format!("append at {offset} to job {job}"))?;
        ensure!(
            answer.next_offset == offset + len as u64,
            "appending {len} bytes at {offset} answered next_offset {}",
            answer.next_offset
        );
        offset += len as u64;
    }
    Ok(())
}

async fn measure(
    server: &Server,
    text: &LogText,
    label: &str,
    jobs: usize,
    bytes_per_job: u64,
    chunk: usize,
    m: &mut Metrics,
) -> anyhow::Result<()> {
    let admin = &server.admin;
    admin
        .apply_pipeline("logs", &pipeline_yaml(jobs))
        .await
        .context("applying the pipeline")?;
    let runners = server.register_runners(jobs, 8).await?;
    admin
        .trigger_run("logs", &TriggerRunRequest::default())
        .await
        .context("trigger")?;
    let mut held = Vec::new();
    for r in &runners {
        let a = r
            .acquire(Duration::from_secs(10))
            .await
            .context("acquire")?
            .context("no job was handed out")?;
        r.heartbeat(a.job.id, &a.lease.token)
            .await
            .context("first heartbeat")?;
        held.push(a);
    }
    // Heartbeats keep the leases while a slow backend takes its time.
    let beats: Vec<_> = runners
        .iter()
        .zip(&held)
        .map(|(r, a)| {
            let (r, id, lease) = (r.clone(), a.job.id, a.lease.token.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    let _ = r.heartbeat(id, &lease).await;
                }
            })
        })
        .collect();

    let sampler = RssSampler::start(server.pid, Duration::from_millis(20));
    let before = server.mem()?;
    let started = Instant::now();
    let uploads = futures::future::join_all(
        runners
            .iter()
            .zip(&held)
            .enumerate()
            .map(|(i, (r, a))| upload(r, a, text, i, bytes_per_job, chunk)),
    )
    .await;
    let took = started.elapsed();
    let peak = sampler.peak_mib().max(server.mem()?.rss_mib());
    drop(sampler);
    for b in &beats {
        b.abort();
    }
    for u in uploads {
        u?;
    }
    let total = bytes_per_job * jobs as u64;
    m.push(
        format!("{label}_mb_per_s"),
        "MB/s",
        total as f64 / 1e6 / took.as_secs_f64(),
    );
    m.push(format!("{label}_server_peak_rss_mib"), "MiB", peak);
    m.push(
        format!("{label}_server_rss_before_mib"),
        "MiB",
        before.rss_mib(),
    );

    for (r, a) in runners.iter().zip(&held) {
        r.complete(
            a.job.id,
            &a.lease.token,
            &CompleteRequest {
                status: JobStatus::Succeeded,
                exit_code: Some(0),
            },
        )
        .await
        .context("complete")?;
    }

    // Read every log back and compare.
    let read_started = Instant::now();
    let read_sampler = RssSampler::start(server.pid, Duration::from_millis(20));
    for (i, a) in held.iter().enumerate() {
        let job = admin.get_job(a.job.id).await.context("GET job")?;
        ensure!(
            job.log_size == bytes_per_job,
            "job {} stored {} bytes of log, {bytes_per_job} were sent",
            job.id,
            job.log_size
        );
        let got = read_log_sha(server, a.job.id).await?;
        let want = text.sha256(i, bytes_per_job, chunk);
        ensure!(
            got.1 == bytes_per_job && got.0 == want,
            "the stored log of job {} ({} bytes, sha256 {}) is not what was sent ({bytes_per_job} bytes, sha256 {want})",
            a.job.id,
            got.1,
            got.0
        );
    }
    m.push(
        format!("{label}_readback_mb_per_s"),
        "MB/s",
        total as f64 / 1e6 / read_started.elapsed().as_secs_f64(),
    );
    m.push(
        format!("{label}_readback_server_peak_rss_mib"),
        "MiB",
        read_sampler.peak_mib(),
    );
    Ok(())
}

/// The SHA-256 and length of a job's stored log, streamed from `GET /jobs/{id}/log`.
async fn read_log_sha(server: &Server, job: uuid::Uuid) -> anyhow::Result<(String, u64)> {
    let resp = server
        .http
        .get(format!("{}/api/v1/jobs/{job}/log", server.url))
        .bearer_auth(admin_token(server))
        .send()
        .await
        .context("GET log")?;
    ensure!(
        resp.status().is_success(),
        "GET log answered {}",
        resp.status()
    );
    let mut h = Sha256::new();
    let mut n = 0u64;
    let mut body = resp.bytes_stream();
    while let Some(part) = body.next().await {
        let part = part.context("reading the log")?;
        n += part.len() as u64;
        h.update(&part);
    }
    Ok((hex::encode(h.finalize()), n))
}

fn admin_token(server: &Server) -> String {
    server.admin_token().to_string()
}
