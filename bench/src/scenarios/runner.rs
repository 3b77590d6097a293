//! Runner footprint: the real `outpost-runner run` process: time from spawn to its first acquire
//! request reaching the server, and its RSS once it idles in the long poll.
//!
//! The runner is registered with the URL of a small TCP relay in this process, which forwards to
//! the server and notes when the first `POST /api/v1/runner/acquire` passes through.
//! Each sample then runs one job through the runner, so a figure is never reported for a runner
//! that does not work.

use std::process::Stdio;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use outpost_protocol::{RunStatus, TriggerRunRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::Sizes;
use crate::harness::{Backend, Db, Env, Server, pipeline_yaml, read_mem, signal, tail, wait_until};
use crate::report::{Metrics, ms};

const ACQUIRE: &[u8] = b"POST /api/v1/runner/acquire";

/// Forwards connections from `listener` to `upstream`, noting when the first acquire passes.
async fn relay(listener: TcpListener, upstream: String, first: Arc<OnceLock<Instant>>) {
    while let Ok((inbound, _)) = listener.accept().await {
        let upstream = upstream.clone();
        let first = first.clone();
        tokio::spawn(async move {
            let Ok(outbound) = TcpStream::connect(&upstream).await else {
                return;
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let (mut ri, mut wi) = inbound.into_split();
            let (mut ro, mut wo) = outbound.into_split();
            let up = async move {
                let mut buf = vec![0u8; 16 * 1024];
                let mut carry: Vec<u8> = Vec::new();
                loop {
                    let n = match ri.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if first.get().is_none() {
                        carry.extend_from_slice(&buf[..n]);
                        if carry.windows(ACQUIRE.len()).any(|w| w == ACQUIRE) {
                            let _ = first.set(Instant::now());
                        }
                        let keep = carry.len().saturating_sub(ACQUIRE.len());
                        carry.drain(..keep);
                    }
                    if wo.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = wo.shutdown().await;
            };
            let down = async move {
                let _ = tokio::io::copy(&mut ro, &mut wi).await;
                let _ = wi.shutdown().await;
            };
            tokio::join!(up, down);
        });
    }
}

/// Runs the scenario once.
pub async fn run(env: &Env, backend: Backend, sizes: &Sizes) -> anyhow::Result<Metrics> {
    let db = Db::create(env, backend).await?;
    let server = Server::start(env, &db, &[]).await?;
    let result = measure(env, &server, sizes).await;
    server.stop().await?;
    result
}

async fn measure(env: &Env, server: &Server, sizes: &Sizes) -> anyhow::Result<Metrics> {
    let admin = &server.admin;
    admin
        .apply_pipeline("runner", &pipeline_yaml(1))
        .await
        .context("applying the pipeline")?;
    let upstream = server
        .url
        .strip_prefix("http://")
        .context("the server URL is not http://")?
        .to_string();
    let mut start_ms = Vec::new();
    let mut rss = Vec::new();
    let mut hwm = Vec::new();
    for i in 0..sizes.runner_samples {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let proxy_url = format!("http://{}", listener.local_addr()?);
        let first = Arc::new(OnceLock::new());
        let relay_task = tokio::spawn(relay(listener, upstream.clone(), first.clone()));
        let dir = tempfile::Builder::new()
            .prefix("outpost-bench-runner-")
            .tempdir()?;
        let config = dir.path().join("config");
        let work = dir.path().join("work");
        let registration = server.registration_token().await?;
        let mut register = env.command("outpost-runner")?;
        register
            .args(["register", "--server", &proxy_url, "--token", &registration])
            .args(["--name", &format!("footprint-{i}"), "--labels", "bench"])
            .arg("--config-dir")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let out = register.output().await.context("outpost-runner register")?;
        ensure!(
            out.status.success(),
            "outpost-runner register failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );

        let log_path = dir.path().join("runner.log");
        let log = std::fs::File::create(&log_path)?;
        let mut cmd = env.command("outpost-runner")?;
        cmd.arg("run")
            .arg("--config-dir")
            .arg(&config)
            .env("OUTPOST_RUNNER__WORK_DIR", &work)
            .stdout(Stdio::null())
            .stderr(log);
        let spawned = Instant::now();
        let mut child = cmd.spawn().context("could not start outpost-runner")?;
        let pid = child.id().context("the runner has no pid")?;
        let sample: anyhow::Result<()> = async {
            wait_until(
                "the runner's first acquire",
                Duration::from_secs(30),
                Duration::from_millis(1),
                || async { Ok(first.get().is_some()) },
            )
            .await?;
            let at = *first.get().expect("set");
            start_ms.push(ms(at.duration_since(spawned)));
            tokio::time::sleep(Duration::from_millis(sizes.runner_settle_ms)).await;
            if let Ok(Some(status)) = child.try_wait() {
                bail!("outpost-runner exited with {status} while idle");
            }
            let mem = read_mem(pid)?;
            rss.push(mem.rss_mib());
            hwm.push(mem.hwm_mib());

            // The runner must work: it runs a job through the relay.
            let run = admin
                .trigger_run("runner", &TriggerRunRequest::default())
                .await
                .context("trigger")?;
            wait_until(
                "the runner to run the job",
                Duration::from_secs(60),
                Duration::from_millis(50),
                || async {
                    let r = admin.get_run(run.id).await?;
                    if r.status.is_final() && r.status != RunStatus::Succeeded {
                        bail!("the job ended {}", r.status.as_str());
                    }
                    Ok(r.status == RunStatus::Succeeded)
                },
            )
            .await?;
            signal(&child, nix::sys::signal::Signal::SIGTERM);
            let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
                .await
                .map_err(|_| anyhow::anyhow!("the runner did not exit within 20 s of SIGTERM"))??;
            ensure!(
                status.success(),
                "the runner exited with {status} after SIGTERM"
            );
            Ok(())
        }
        .await;
        relay_task.abort();
        if let Err(e) = sample {
            let _ = child.kill().await;
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(e.context(format!("runner log:\n{}", tail(&log, 20))));
        }
    }
    let mut m = Metrics::default();
    m.push(
        "start_to_first_acquire_ms",
        "ms",
        crate::report::median(&start_ms),
    );
    m.push("idle_rss_mib", "MiB", crate::report::median(&rss));
    m.push("idle_peak_rss_mib", "MiB", crate::report::median(&hwm));
    Ok(m)
}
