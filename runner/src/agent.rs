//! The runner's main loop: long-poll for a job, run it, repeat; drain on shutdown.

use std::time::Duration;

use anyhow::Context as _;
use outpost_protocol::{Client, ClientError, RegisterRequest};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::backoff::{Backoff, error_chain, human};
use crate::job::{self, ExecConfig, JobOutcome, LeasedJob};
use crate::settings::{Credentials, Settings};

/// How `run` behaves.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Acquire one job, run it, and return (for ephemeral VMs).
    pub once: bool,
}

/// Registers a runner with `registration_token` and returns its credentials (not yet saved).
pub async fn register(
    server_url: &str,
    registration_token: &str,
    name: &str,
    labels: Vec<String>,
) -> anyhow::Result<Credentials> {
    let server_url = server_url.trim().trim_end_matches('/').to_string();
    check_server_url(&server_url)?;
    let name = name.trim();
    anyhow::ensure!(!name.is_empty(), "the runner needs a name: pass --name");
    let mut clean: Vec<String> = Vec::new();
    for label in labels.iter().map(|l| l.trim()).filter(|l| !l.is_empty()) {
        if !clean.iter().any(|l| l == label) {
            clean.push(label.to_string());
        }
    }
    let client = Client::new(&server_url, Some(registration_token.to_string()))
        .context("could not set up the HTTP client")?;
    let req = RegisterRequest {
        name: name.to_string(),
        labels: clean.clone(),
        version: outpost_protocol::VERSION.to_string(),
        os: std::env::consts::OS.to_string(),
        arch: std::env::consts::ARCH.to_string(),
    };
    let resp = client.register(&req).await.map_err(|e| match e.status() {
        Some(s) if s.as_u16() == 401 || s.as_u16() == 403 => anyhow::anyhow!(
            "the server at {server_url} refused the registration token ({}): check that it is right and has not expired or been revoked",
            error_chain(&e)
        ),
        Some(_) => anyhow::anyhow!(
            "the server at {server_url} refused the registration: {}",
            error_chain(&e)
        ),
        None => anyhow::anyhow!(
            "could not register with {server_url}: {}; check the URL and that the server is reachable from here",
            error_chain(&e)
        ),
    })?;
    Ok(Credentials {
        server_url,
        runner_id: resp.runner_id,
        runner_token: resp.runner_token,
        name: name.to_string(),
        labels: clean,
    })
}

fn check_server_url(url: &str) -> anyhow::Result<()> {
    let Some((scheme, rest)) = url.split_once("://") else {
        anyhow::bail!("the server URL `{url}` needs a scheme, e.g. https://outpost.example.com");
    };
    match scheme {
        "https" => Ok(()),
        "http" => {
            let host = rest.split(['/', ':']).next().unwrap_or_default();
            let host_with_brackets = rest.split('/').next().unwrap_or_default();
            let loopback = host == "localhost"
                || host.starts_with("127.")
                || host_with_brackets.starts_with("[::1]");
            if !loopback {
                tracing::warn!(
                    "{url} is plain HTTP: the runner's tokens cross the network unencrypted; use https outside development"
                );
            }
            Ok(())
        }
        other => anyhow::bail!(
            "the server URL `{url}` has scheme `{other}`: use https (or http on loopback)"
        ),
    }
}

/// Runs until `shutdown` is cancelled, or after one job with `once`; see [`run_with_abort`].
pub async fn run(
    creds: Credentials,
    settings: Settings,
    opts: RunOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_with_abort(creds, settings, opts, shutdown, CancellationToken::new()).await
}

/// Pulls jobs and runs them, one at a time.
///
/// When `shutdown` is cancelled the runner drains: it stops acquiring, lets the running job finish
/// for up to `drain_grace_secs` (then cancels it), reports it, and returns `Ok`.
/// When `abort` is cancelled the running job is cancelled at once (its step is stopped, later steps
/// are skipped), reported `cancelled`, and the runner returns.
pub async fn run_with_abort(
    creds: Credentials,
    settings: Settings,
    opts: RunOptions,
    shutdown: CancellationToken,
    abort: CancellationToken,
) -> anyhow::Result<()> {
    let span =
        tracing::info_span!("runner", runner.id = %creds.runner_id, runner.name = %creds.name);
    run_loop(creds, settings, opts, shutdown, abort)
        .instrument(span)
        .await
}

async fn run_loop(
    creds: Credentials,
    settings: Settings,
    opts: RunOptions,
    shutdown: CancellationToken,
    abort: CancellationToken,
) -> anyhow::Result<()> {
    let client = Client::new(&creds.server_url, Some(creds.runner_token.clone()))
        .context("could not set up the HTTP client")?;
    let exec = ExecConfig::from_settings(&settings, &creds.name);
    let wait = Duration::from_secs(settings.poll_wait_secs.max(1));
    let drain_grace = Duration::from_secs(settings.drain_grace_secs);
    let mut backoff = Backoff::new();
    tracing::info!(
        server = %creds.server_url,
        labels = ?creds.labels,
        "runner started; waiting for jobs"
    );
    loop {
        if shutdown.is_cancelled() || abort.is_cancelled() {
            tracing::info!("stopping: no job is running");
            return Ok(());
        }
        let acquired = tokio::select! {
            r = client.acquire(wait) => r,
            // A job the server handed out while this poll was dropped never gets its first
            // heartbeat, so the server may give it to another runner.
            _ = shutdown.cancelled() => continue,
            _ = abort.cancelled() => continue,
        };
        let assignment = match acquired {
            Ok(Some(a)) => {
                backoff.reset();
                a
            }
            Ok(None) => {
                backoff.reset();
                continue;
            }
            Err(e) if matches!(e.status().map(|s| s.as_u16()), Some(401)) => {
                anyhow::bail!(
                    "the server rejected this runner's token (401): the runner was removed or its credentials are stale; register it again with `outpost-runner register`"
                );
            }
            Err(e) => {
                let delay = backoff.next_delay();
                report_acquire_error(&e, delay);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => {}
                    _ = abort.cancelled() => {}
                }
                continue;
            }
        };

        let job = assignment.job;
        let lease = assignment.lease;
        let span = tracing::info_span!("job", job.id = %job.id, run.id = %job.run_id);
        let api = LeasedJob::new(&client, job.id, &lease.token);
        let job_abort = abort.child_token();
        async {
            tracing::info!(
                pipeline = %job.pipeline,
                job = %job.name,
                run = job.run_number,
                steps = job.steps.len(),
                "acquired a job"
            );
            let mut running = std::pin::pin!(job::execute(api, job, lease, &exec, job_abort.clone()));
            let outcome = tokio::select! {
                o = &mut running => o,
                _ = shutdown.cancelled() => {
                    tracing::info!(
                        "draining: no new jobs; the running job may finish within {} (signal again to cancel it)",
                        human(drain_grace)
                    );
                    tokio::select! {
                        o = &mut running => o,
                        _ = tokio::time::sleep(drain_grace) => {
                            tracing::warn!("the drain grace of {} is over; cancelling the job", human(drain_grace));
                            job_abort.cancel();
                            running.await
                        }
                    }
                }
            };
            match &outcome {
                JobOutcome::Completed { .. } => {}
                JobOutcome::NotReported { status, reason } => tracing::error!(
                    status = status.as_str(),
                    "the job ended but its result could not be reported: {reason}"
                ),
                JobOutcome::LeaseLost => {
                    tracing::warn!("the job was given up because its lease was lost")
                }
                JobOutcome::NotStarted { reason } => {
                    tracing::warn!("the job was not started: {reason}")
                }
            }
        }
        .instrument(span)
        .await;

        if opts.once {
            tracing::info!("ran one job (--once); stopping");
            return Ok(());
        }
    }
}

fn report_acquire_error(e: &ClientError, delay: Duration) {
    let reason = error_chain(e);
    let delay = human(delay);
    if e.is_transient() {
        tracing::warn!("server unreachable ({reason}); retrying in {delay}");
    } else {
        tracing::error!("the server refused to hand out jobs ({reason}); retrying in {delay}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls_need_a_scheme() {
        assert!(check_server_url("https://outpost.example.com").is_ok());
        assert!(check_server_url("http://127.0.0.1:8080").is_ok());
        assert!(check_server_url("http://[::1]:8080").is_ok());
        assert!(check_server_url("outpost.example.com").is_err());
        assert!(check_server_url("ftp://x").is_err());
    }

    #[tokio::test]
    async fn registering_with_an_unreachable_server_says_so() {
        // Port 1 on loopback refuses connections.
        let err = register("http://127.0.0.1:1", "token", "r", vec![])
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("could not register with http://127.0.0.1:1"),
            "{err}"
        );
    }
}
