//! `outpost-runner`: register with an Outpost server, then pull and run its jobs.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use outpost_runner::{Credentials, RunOptions, Settings};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Outpost runner: pulls deployment jobs from an Outpost server over outbound HTTPS and runs their
/// kubectl, helm and script steps.
#[derive(Debug, Parser)]
#[command(name = "outpost-runner", version)]
struct Cli {
    /// What to do.
    #[command(subcommand)]
    command: Command,
}

/// The runner's commands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Register this runner with a server and save its credentials in the config dir.
    Register(RegisterArgs),
    /// Pull jobs from the server and run them until stopped (SIGTERM or Ctrl-C drains; a second
    /// signal cancels the running jobs).
    Run(RunArgs),
    /// Print a Kubernetes exec credential with an Entra ID token for a cluster (the per-job
    /// kubeconfig runs this; tokens are cached until shortly before they expire).
    KubeToken(KubeTokenArgs),
    /// Check, step by step, that this runner can reach its server and each of its clusters, and
    /// say what to fix when it cannot.
    Doctor(DoctorArgs),
}

/// Arguments of `kube-token`.
#[derive(Debug, Args)]
struct KubeTokenArgs {
    /// The cluster, as named by `[clusters.NAME]` in runner.toml.
    #[arg(long, value_name = "NAME")]
    cluster: String,
    /// Where runner.toml is.
    #[command(flatten)]
    config: ConfigDir,
}

/// Arguments of `doctor`.
#[derive(Debug, Args)]
struct DoctorArgs {
    /// Where the credentials and runner.toml are.
    #[command(flatten)]
    config: ConfigDir,
    /// Check only this cluster (and the server).
    #[arg(long, value_name = "NAME")]
    cluster: Option<String>,
    /// Check only the server (reachable, accepts this runner's credentials), no cluster: quick
    /// enough for a container health check.
    #[arg(long, conflicts_with = "cluster")]
    server_only: bool,
}

/// Where the runner keeps its credentials and settings.
#[derive(Debug, Args)]
struct ConfigDir {
    /// Config directory [default: $OUTPOST_RUNNER_CONFIG_DIR, else $XDG_CONFIG_HOME/outpost-runner,
    /// else ~/.config/outpost-runner].
    #[arg(long, value_name = "DIR")]
    config_dir: Option<PathBuf>,
}

impl ConfigDir {
    fn resolve(&self) -> anyhow::Result<PathBuf> {
        match &self.config_dir {
            Some(dir) => Ok(dir.clone()),
            None => outpost_runner::default_config_dir(),
        }
    }
}

/// Arguments of `register`.
#[derive(Debug, Args)]
struct RegisterArgs {
    /// The server's base URL, e.g. https://outpost.example.com.
    #[arg(long, value_name = "URL", env = "OUTPOST_SERVER")]
    server: String,
    /// A registration token from the server's admin (or use --entra, which ignores it).
    #[arg(
        long,
        value_name = "REGTOKEN",
        env = "OUTPOST_REGISTRATION_TOKEN",
        hide_env_values = true,
        required_unless_present = "entra"
    )]
    token: Option<String>,
    /// Register with an Entra ID token from this machine's managed identity instead of a
    /// registration token (the server must list the identity's object id in [[entra.principals]]).
    #[arg(long)]
    entra: bool,
    /// With --entra: the client id of a user-assigned managed identity [default: the
    /// system-assigned identity].
    #[arg(long, value_name = "ID", requires = "entra")]
    client_id: Option<String>,
    /// With --entra: the audience to ask a token for (`<AUDIENCE>/.default`), or a whole scope
    /// [default: the audience the server announces at /api/v1/runner/registration-info].
    #[arg(
        long,
        visible_alias = "scope",
        value_name = "AUDIENCE",
        requires = "entra"
    )]
    audience: Option<String>,
    /// A name people recognise [default: this machine's host name].
    #[arg(long)]
    name: Option<String>,
    /// Labels jobs select runners by (`runs_on`), comma-separated, e.g. aks-prod,linux.
    #[arg(long, value_delimiter = ',', value_name = "LABELS")]
    labels: Vec<String>,
    /// Where to save the credentials.
    #[command(flatten)]
    config: ConfigDir,
}

/// Arguments of `run`.
#[derive(Debug, Args)]
struct RunArgs {
    /// Where the credentials and runner.toml are.
    #[command(flatten)]
    config: ConfigDir,
    /// Run one job, then exit (for ephemeral machines).
    #[arg(long)]
    once: bool,
    /// Run up to N jobs at once, each in its own workspace [default: the `concurrency` setting,
    /// else 1].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    concurrency: Option<u16>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // The Azure SDK logs every failed attempt at info; its final error says enough,
                // and `kube-token`'s stderr is shown to whoever runs kubectl.
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new(
                        "info,typespec_client_core=warn,azure_core=warn,azure_identity=warn",
                    )
                }),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = match cli.command {
        Command::Register(args) => register(args).await,
        Command::Run(args) => run(args).await,
        Command::KubeToken(args) => kube_token(args).await,
        Command::Doctor(args) => doctor(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn register(args: RegisterArgs) -> anyhow::Result<()> {
    let dir = args.config.resolve()?;
    let name = match args.name {
        Some(n) => n,
        None => nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .filter(|h| !h.is_empty())
            .context("could not read this machine's host name: pass --name")?,
    };
    if let Ok(old) = Credentials::load(&dir) {
        tracing::warn!(
            "replacing the credentials of runner {} ({}) in {}",
            old.name,
            old.runner_id,
            dir.display()
        );
    }
    // The clusters in runner.toml are advertised, so jobs naming them are routed here.
    let settings = Settings::load(&dir)?;
    let opts = outpost_runner::RegisterOptions {
        clusters: settings.clusters.keys().cloned().collect(),
        allow_insecure_http: settings.allow_insecure_http,
    };
    let creds = match &args.token {
        Some(token) if !args.entra => {
            outpost_runner::register_with(&args.server, token, &name, args.labels, opts).await?
        }
        _ => {
            if args.token.is_some() {
                tracing::warn!(
                    "--entra: ignoring the registration token (--token or OUTPOST_REGISTRATION_TOKEN)"
                );
            }
            let entra = outpost_runner::entra::EntraOptions {
                client_id: args.client_id.clone(),
                audience: args.audience.clone(),
            };
            outpost_runner::register_with_entra(&args.server, &entra, &name, args.labels, opts)
                .await?
        }
    };
    creds.save(&dir)?;
    eprintln!(
        "registered runner {} ({}) with {}; credentials saved in {}",
        creds.name,
        creds.runner_id,
        creds.server_url,
        dir.join(outpost_runner::settings::CREDENTIALS_FILE)
            .display()
    );
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let dir = args.config.resolve()?;
    let creds = Credentials::load(&dir)?;
    let mut settings = Settings::load(&dir)?;
    if let Some(n) = args.concurrency {
        settings.concurrency = n.into();
    }
    let shutdown = CancellationToken::new();
    let abort = CancellationToken::new();
    let mut sigterm = signal(SignalKind::terminate()).context("could not listen for SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("could not listen for SIGINT")?;
    let (drain, stop) = (shutdown.clone(), abort.clone());
    let drain_grace = settings.drain_grace_secs;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = sigterm.recv() => "SIGTERM",
            _ = sigint.recv() => "SIGINT",
        };
        tracing::info!(
            "received {name}: stopping; running jobs may finish first (up to {}), send the signal again to cancel them",
            outpost_runner::backoff::human(std::time::Duration::from_secs(drain_grace))
        );
        drain.cancel();
        let name = tokio::select! {
            _ = sigterm.recv() => "SIGTERM",
            _ = sigint.recv() => "SIGINT",
        };
        tracing::warn!("received {name} again: cancelling the running jobs");
        stop.cancel();
        loop {
            tokio::select! {
                _ = sigterm.recv() => {}
                _ = sigint.recv() => {}
            }
            tracing::warn!("already stopping: the jobs are being cancelled and reported");
        }
    });
    outpost_runner::run_with_abort(
        creds,
        settings,
        RunOptions { once: args.once },
        shutdown,
        abort,
    )
    .await
}

async fn kube_token(args: KubeTokenArgs) -> anyhow::Result<()> {
    let dir = args.config.resolve()?;
    let cluster = outpost_runner::kube_token::entra_cluster(&dir, &args.cluster)?;
    let token = outpost_runner::kube_token::token(&dir, &args.cluster, &cluster).await?;
    let json = outpost_runner::kube_token::exec_credential(&token);
    println!("{json}");
    Ok(())
}

async fn doctor(args: DoctorArgs) -> anyhow::Result<()> {
    let dir = args.config.resolve()?;
    let failures = if args.server_only {
        outpost_runner::doctor::run_server_only(&dir).await?
    } else {
        outpost_runner::doctor::run(&dir, args.cluster.as_deref()).await?
    };
    anyhow::ensure!(
        failures == 0,
        "{failures} check{} failed",
        if failures == 1 { "" } else { "s" }
    );
    Ok(())
}
