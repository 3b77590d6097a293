//! The runner's main loop: long-poll for jobs while fewer than `concurrency` run, run each in its
//! own task and workspace; drain on shutdown.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use outpost_protocol::{Client, ClientError, RegisterRequest};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::backoff::{Backoff, error_chain, human};
use crate::entra::EntraOptions;
use crate::job::{self, ExecConfig, JobOutcome, LeasedJob};
use crate::settings::{Credentials, Settings};
use crate::spool;

/// How `run` behaves.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Acquire one job, run it, and return (for ephemeral VMs).
    pub once: bool,
}

/// What registration sends besides name and labels.
#[derive(Debug, Clone, Default)]
pub struct RegisterOptions {
    /// The configured cluster names, which the server turns into `cluster:NAME` labels.
    pub clusters: Vec<String>,
    /// Accept a plain `http://` server URL that is not on loopback.
    pub allow_insecure_http: bool,
}

/// Registers a runner with `registration_token` and returns its credentials (not yet saved).
pub async fn register(
    server_url: &str,
    registration_token: &str,
    name: &str,
    labels: Vec<String>,
) -> anyhow::Result<Credentials> {
    register_with(
        server_url,
        registration_token,
        name,
        labels,
        RegisterOptions::default(),
    )
    .await
}

/// Like [`register`], also advertising the runner's clusters.
pub async fn register_with(
    server_url: &str,
    registration_token: &str,
    name: &str,
    labels: Vec<String>,
    opts: RegisterOptions,
) -> anyhow::Result<Credentials> {
    let server_url = server_url.trim().trim_end_matches('/').to_string();
    check_server_url(&server_url, opts.allow_insecure_http)?;
    register_with_bearer(
        server_url,
        registration_token,
        "the registration token",
        "check that it is right and has not expired or been revoked",
        name,
        labels,
        &opts,
    )
    .await
}

/// Registers a runner with an Entra ID access token from this machine's managed identity, for
/// the audience `entra.audience` names or, when it names none, the one the server announces.
pub async fn register_with_entra(
    server_url: &str,
    entra: &EntraOptions,
    name: &str,
    labels: Vec<String>,
    opts: RegisterOptions,
) -> anyhow::Result<Credentials> {
    let server_url = server_url.trim().trim_end_matches('/').to_string();
    check_server_url(&server_url, opts.allow_insecure_http)?;
    let scope = match &entra.audience {
        Some(audience) => crate::entra::scope_for(audience),
        None => {
            let client =
                Client::new(&server_url, None).context("could not set up the HTTP client")?;
            let info = client.registration_info().await.map_err(|e| {
                anyhow::anyhow!(
                    "could not ask {server_url} how to register: {}; check the URL, or pass --audience",
                    error_chain(&e)
                )
            })?;
            let entra = info.entra.with_context(|| {
                format!("the server at {server_url} does not accept Entra ID registration (it has no [entra] configuration): register with --token")
            })?;
            entra.scope
        }
    };
    let token = crate::entra::managed_identity_token(&scope, entra.client_id.as_deref()).await?;
    register_with_bearer(
        server_url,
        &token,
        "the Entra ID token",
        "the server's admin must list this identity's object id in [[entra.principals]], and the server's entra.audience must match the scope asked for",
        name,
        labels,
        &opts,
    )
    .await
}

/// Registers with `bearer` (a registration token or an Entra ID access token); `what` and `hint`
/// name the credential and its fix in the error a refusal gives.
async fn register_with_bearer(
    server_url: String,
    bearer: &str,
    what: &str,
    hint: &str,
    name: &str,
    labels: Vec<String>,
    opts: &RegisterOptions,
) -> anyhow::Result<Credentials> {
    let name = name.trim();
    anyhow::ensure!(!name.is_empty(), "the runner needs a name: pass --name");
    let mut clean: Vec<String> = Vec::new();
    for label in labels.iter().map(|l| l.trim()).filter(|l| !l.is_empty()) {
        if !clean.iter().any(|l| l == label) {
            clean.push(label.to_string());
        }
    }
    let client = Client::new(&server_url, Some(bearer.to_string()))
        .context("could not set up the HTTP client")?;
    let req = RegisterRequest {
        name: name.to_string(),
        labels: clean.clone(),
        version: outpost_protocol::VERSION.to_string(),
        os: std::env::consts::OS.to_string(),
        arch: std::env::consts::ARCH.to_string(),
        clusters: opts.clusters.clone(),
    };
    let resp = client.register(&req).await.map_err(|e| match e.status() {
        Some(s) if s.as_u16() == 401 || s.as_u16() == 403 => anyhow::anyhow!(
            "the server at {server_url} refused {what} ({}): {hint}",
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
    // The server gives the runner a `cluster:NAME` label per cluster; keep what it now has, so
    // `run` can tell when runner.toml names clusters the server does not know of.
    for cluster in &opts.clusters {
        let label = crate::clusters::label(cluster);
        if !clean.contains(&label) {
            clean.push(label);
        }
    }
    Ok(Credentials {
        server_url,
        runner_id: resp.runner_id,
        runner_token: resp.runner_token,
        name: name.to_string(),
        labels: clean,
    })
}

/// Refuses a server URL that would send the runner's tokens unencrypted across a network: plain
/// `http://` is accepted on loopback, elsewhere only with `allow_insecure_http`.
pub fn check_server_url(url: &str, allow_insecure_http: bool) -> anyhow::Result<()> {
    let Some((scheme, rest)) = url.split_once("://") else {
        anyhow::bail!("the server URL `{url}` needs a scheme, e.g. https://outpost.example.com");
    };
    match scheme {
        "https" => Ok(()),
        "http" => {
            let _ = rest;
            // A parsed host, so that `127.evil.example` is not taken for loopback.
            let parsed = reqwest::Url::parse(url)
                .with_context(|| format!("the server URL `{url}` is not a valid URL"))?;
            let host = parsed.host_str().unwrap_or_default();
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let loopback = host.eq_ignore_ascii_case("localhost")
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if !loopback {
                anyhow::ensure!(
                    allow_insecure_http,
                    "the server URL {url} is plain HTTP: the runner's tokens would cross the network unencrypted; use https, or if this network is trusted set `allow_insecure_http = true` in runner.toml (or OUTPOST_RUNNER__ALLOW_INSECURE_HTTP=true)"
                );
                tracing::warn!(
                    "{url} is plain HTTP (allowed by allow_insecure_http): the runner's tokens cross the network unencrypted"
                );
            }
            Ok(())
        }
        other => anyhow::bail!(
            "the server URL `{url}` has scheme `{other}`: use https (or http on loopback)"
        ),
    }
}

/// Jobs are routed by the `cluster:NAME` labels the runner registered with; a cluster added to
/// runner.toml later gets no jobs until the runner registers again, which deserves a warning.
fn warn_about_unregistered_clusters(creds: &Credentials, settings: &Settings) {
    for name in settings.clusters.keys() {
        if !creds.labels.contains(&crate::clusters::label(name)) {
            tracing::warn!(
                "cluster `{name}` is in runner.toml but this runner did not register with it, so the server sends it no jobs for that cluster: run `outpost-runner register` again"
            );
        }
    }
    for label in &creds.labels {
        if let Some(name) = label.strip_prefix("cluster:")
            && !settings.clusters.contains_key(name)
        {
            tracing::warn!(
                "this runner registered with cluster `{name}`, which runner.toml no longer has: its jobs will fail here; add it back or register again"
            );
        }
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

/// Pulls jobs and runs up to `concurrency` (a setting) of them at once, each in its own workspace.
///
/// When `shutdown` is cancelled the runner drains: it stops acquiring, lets the running jobs finish
/// for up to `drain_grace_secs` (then cancels them), reports them, and returns `Ok`.
/// When `abort` is cancelled the running jobs are cancelled at once (their steps are stopped, later
/// steps are skipped), reported `cancelled`, and the runner returns.
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
    check_server_url(&creds.server_url, settings.allow_insecure_http)?;
    warn_about_unregistered_clusters(&creds, &settings);
    let client = Client::new(&creds.server_url, Some(creds.runner_token.clone()))
        .context("could not set up the HTTP client")?;
    let exec = Arc::new(ExecConfig::from_settings(&settings, &creds.name));
    let wait = Duration::from_secs(settings.poll_wait_secs.max(1));
    let drain_grace = Duration::from_secs(settings.drain_grace_secs);
    let concurrency = if opts.once {
        1
    } else {
        settings.concurrency.max(1)
    };
    // Spools left behind by a runner that did not stop cleanly belong to jobs that are over.
    let spool_dir = settings.log_spool_dir();
    let _ = tokio::task::spawn_blocking(move || spool::remove_stale(&spool_dir)).await;

    // Cancelled by `abort`, or by the end of a drain's grace: every running job is cancelled.
    let stop_jobs = abort.child_token();
    let mut jobs: JoinSet<()> = JoinSet::new();
    let mut backoff = Backoff::new();
    let mut fatal = None;
    tracing::info!(
        server = %creds.server_url,
        labels = ?creds.labels,
        concurrency,
        "runner started; waiting for jobs"
    );
    loop {
        if shutdown.is_cancelled() || abort.is_cancelled() {
            break;
        }
        while let Some(done) = jobs.try_join_next() {
            report_join(done);
        }
        // Acquire only while fewer than `concurrency` jobs run.
        if jobs.len() >= concurrency {
            tokio::select! {
                Some(done) = jobs.join_next() => report_join(done),
                _ = shutdown.cancelled() => {}
                _ = abort.cancelled() => {}
            }
            continue;
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
                fatal = Some(anyhow::anyhow!(
                    "the server rejected this runner's token (401): the runner was removed or its credentials are stale; register it again with `outpost-runner register`"
                ));
                break;
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
        let (client, exec, job_abort) = (client.clone(), exec.clone(), stop_jobs.child_token());
        let running = jobs.len() + 1;
        jobs.spawn(
            async move {
                tracing::info!(
                    pipeline = %job.pipeline,
                    job = %job.name,
                    run = job.run_number,
                    steps = job.steps.len(),
                    running,
                    "acquired a job"
                );
                let api = LeasedJob::new(&client, job.id, &lease.token);
                let outcome = job::execute(api, job, lease, &exec, job_abort).await;
                report_outcome(&outcome);
            }
            .instrument(span),
        );
        if opts.once {
            break;
        }
    }

    // Wait for the running jobs: to their end, unless the drain grace runs out or the runner is
    // aborted, which cancels them (they are still reported).
    if jobs.is_empty() && fatal.is_none() {
        tracing::info!("stopping: no job is running");
    }
    let mut grace_over: Option<Instant> = None;
    while !jobs.is_empty() {
        if grace_over.is_none() && shutdown.is_cancelled() && !stop_jobs.is_cancelled() {
            grace_over = Some(Instant::now() + drain_grace);
            tracing::info!(
                "draining: no new jobs; {} running job(s) may finish within {} (signal again to cancel them)",
                jobs.len(),
                human(drain_grace)
            );
        }
        tokio::select! {
            Some(done) = jobs.join_next() => report_join(done),
            _ = shutdown.cancelled(), if grace_over.is_none() => {}
            _ = stop_jobs.cancelled() => {
                // Every job's token is a child of `stop_jobs`: they are being cancelled now.
                if abort.is_cancelled() {
                    tracing::warn!("cancelling {} running job(s)", jobs.len());
                }
                while let Some(done) = jobs.join_next().await {
                    report_join(done);
                }
            }
            _ = sleep_until_some(grace_over), if !stop_jobs.is_cancelled() => {
                tracing::warn!(
                    "the drain grace of {} is over; cancelling {} running job(s)",
                    human(drain_grace),
                    jobs.len()
                );
                stop_jobs.cancel();
            }
        }
    }
    if opts.once && fatal.is_none() && !shutdown.is_cancelled() && !abort.is_cancelled() {
        tracing::info!("ran one job (--once); stopping");
    }
    match fatal {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn report_join(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        tracing::error!(error = %e, "a job's task ended unexpectedly");
    }
}

fn report_outcome(outcome: &JobOutcome) {
    match outcome {
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
        assert!(check_server_url("https://outpost.example.com", false).is_ok());
        assert!(check_server_url("http://127.0.0.1:8080", false).is_ok());
        assert!(check_server_url("http://[::1]:8080", false).is_ok());
        assert!(check_server_url("outpost.example.com", false).is_err());
        assert!(check_server_url("ftp://x", false).is_err());
        let err = check_server_url("http://outpost.internal:8080", false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("allow_insecure_http = true"), "{err}");
        assert!(check_server_url("http://outpost.internal:8080", true).is_ok());
        assert!(check_server_url("http://127.evil.example/", false).is_err());
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
