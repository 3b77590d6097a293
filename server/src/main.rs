//! `outpost-server`: the job server and its admin commands.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use outpost_server::store::{Scope, TokenInfo};
use outpost_server::{Settings, dev, open_store};
use tokio_util::sync::CancellationToken;

/// jemalloc rather than glibc's malloc: with 10,000 runners holding long polls, glibc's heap held
/// 4–8 KiB more per waiting runner (BENCHMARKS.md, sixth round). The dependency's
/// `unprefixed_malloc_on_supported_platforms` feature makes it the C `malloc` of the whole process
/// too, so SQLite's copies of each log chunk no longer grow and trim glibc's heap per append
/// (SQLite log ingestion +12–23 %, seventh round).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Outpost job server: queues deployment jobs for runners inside private networks.
///
/// Settings come from defaults, then the config file, then environment variables named
/// OUTPOST__SECTION__KEY (for example OUTPOST__SERVER__LISTEN=127.0.0.1:9000 or
/// OUTPOST__DATABASE__URL=postgres://postgres@127.0.0.1/outpost).
#[derive(Debug, Parser)]
#[command(name = "outpost-server", version, propagate_version = true)]
struct Cli {
    /// A TOML config file.
    #[arg(long, global = true, env = "OUTPOST_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the HTTP API.
    Serve,
    /// Run everything on this machine: SQLite under ./outpost-data, an embedded runner labelled
    /// `local`, an admin token and the example pipeline `hello`.
    Dev,
    /// Manage API tokens (the secret is printed once, on stdout).
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// Manage registration tokens that runners register with.
    RegistrationToken {
        #[command(subcommand)]
        action: RegistrationAction,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// Manage secrets that pipelines list (values are encrypted at rest and never shown).
    Secret {
        #[command(subcommand)]
        action: SecretAction,
    },
}

#[derive(Debug, Subcommand)]
enum SecretAction {
    /// Set a secret; its value is read from stdin (one trailing newline is dropped).
    Set {
        /// The name steps see it under: letters, digits and `_`, not starting with a digit.
        name: String,
        /// Only for this pipeline (it wins over a global secret of the same name).
        #[arg(long)]
        pipeline: Option<String>,
    },
    /// List secrets: names, scopes and when they changed, never values.
    List,
    /// Delete a secret.
    Delete {
        /// The secret's name.
        name: String,
        /// The pipeline it is for; the global secret if not given.
        #[arg(long)]
        pipeline: Option<String>,
    },
    /// Print a fresh random key for `secrets.key` (OUTPOST__SECRETS__KEY).
    GenerateKey,
}

#[derive(Debug, Subcommand)]
enum TokenAction {
    /// Create a token and print it.
    Create {
        /// A name to recognise it by (recorded as the actor of what it does).
        #[arg(long)]
        name: String,
        /// What it may do: read, trigger (read + start/cancel runs), invoke (trigger + run
        /// ad-hoc commands on runners with `outpost invoke`) or admin (everything).
        #[arg(long, value_parser = ["read", "trigger", "invoke", "admin"])]
        scope: String,
        /// Days until it expires; never, if not given.
        #[arg(long)]
        expires_in_days: Option<u32>,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke the tokens with this name or id.
    Revoke {
        /// The token's name or id.
        name_or_id: String,
    },
}

#[derive(Debug, Subcommand)]
enum RegistrationAction {
    /// Create a registration token for a pool of runners and print it.
    Create {
        /// The pool the runners that use it join.
        #[arg(long)]
        pool: String,
        /// Days until it expires; never, if not given.
        #[arg(long)]
        expires_in_days: Option<u32>,
    },
    /// List registration tokens (never their secrets).
    List,
    /// Revoke a registration token by id, or all tokens of a pool.
    Revoke {
        /// The pool's name or the token's id.
        pool_or_id: String,
    },
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tower_http=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn expiry(days: Option<u32>) -> Option<chrono::DateTime<chrono::Utc>> {
    days.map(|d| chrono::Utc::now() + chrono::Duration::days(i64::from(d)))
}

fn print_tokens(tokens: &[TokenInfo]) {
    println!(
        "{:<36}  {:<20}  {:<8}  {:<25}  STATE",
        "ID", "NAME", "SCOPE", "CREATED"
    );
    for t in tokens {
        let state = match (t.revoked_at, t.expires_at) {
            (Some(_), _) => "revoked",
            (None, Some(e)) if e <= chrono::Utc::now() => "expired",
            _ => "active",
        };
        println!(
            "{:<36}  {:<20}  {:<8}  {:<25}  {state}",
            t.id,
            t.name,
            t.scope,
            t.created_at.format("%Y-%m-%d %H:%M:%S UTC")
        );
    }
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let listener = outpost_server::bind(&settings.server.listen)
        .await
        .with_context(|| format!("could not listen on {}", settings.server.listen))?;
    let store = open_store(&settings).await?;
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            dev::wait_for_signal().await;
            tracing::info!("shutting down");
            shutdown.cancel();
        });
    }
    tracing::info!(%addr, database = %outpost_server::store::redact_url(&settings.database_url()), "outpost-server started");
    // Exactly one line on stdout, so scripts and tests learn the bound address.
    println!("outpost-server listening on http://{addr}");
    outpost_server::run(settings, store, listener, shutdown).await
}

/// Reads a secret's value from stdin: at most the largest value plus one newline, which is dropped.
fn read_secret_value(name: &str) -> anyhow::Result<String> {
    use std::io::{IsTerminal, Read};
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("enter the value of {name}, then press Enter and Ctrl-D:");
    }
    let limit = outpost_server::secrets::MAX_VALUE_LEN + 2;
    let mut bytes = Vec::new();
    stdin
        .lock()
        .take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .context("could not read the secret's value from stdin")?;
    let mut value = String::from_utf8(bytes)
        .map_err(|_| anyhow::anyhow!("the secret's value must be UTF-8 text"))?;
    if value.ends_with('\n') {
        value.pop();
        if value.ends_with('\r') {
            value.pop();
        }
    }
    anyhow::ensure!(
        !value.is_empty(),
        "the secret's value is empty: pipe it in, e.g. `printf %s \"$VALUE\" | outpost-server secret set {name}`"
    );
    Ok(value)
}

/// Who the admin CLI records as the actor in the audit log.
fn cli_actor() -> String {
    match std::env::var("USER") {
        Ok(user) if !user.is_empty() => format!("cli:{user}"),
        _ => "cli".into(),
    }
}

async fn secret_command(settings: &Settings, action: SecretAction) -> anyhow::Result<()> {
    match action {
        SecretAction::GenerateKey => unreachable!("handled before the settings are loaded"),
        SecretAction::Set { name, pipeline } => {
            let store = open_store(settings).await?;
            anyhow::ensure!(
                store.has_secrets_key(),
                "{}",
                outpost_server::secrets::HOW_TO_MAKE_A_KEY
            );
            let value = {
                let name = name.clone();
                tokio::task::spawn_blocking(move || read_secret_value(&name)).await??
            };
            let (info, _) = store
                .put_secret(&name, pipeline.as_deref(), &value, &cli_actor())
                .await?;
            match info.pipeline {
                Some(p) => eprintln!("set secret {} for pipeline {p}", info.name),
                None => eprintln!("set secret {} (global)", info.name),
            }
        }
        SecretAction::List => {
            let store = open_store(settings).await?;
            println!("{:<32}  {:<24}  UPDATED", "NAME", "SCOPE");
            for s in store.list_secrets().await? {
                let scope = s
                    .pipeline
                    .map_or_else(|| "global".to_string(), |p| format!("pipeline {p}"));
                println!(
                    "{:<32}  {:<24}  {}",
                    s.name,
                    scope,
                    s.updated_at.format("%Y-%m-%d %H:%M:%S UTC")
                );
            }
        }
        SecretAction::Delete { name, pipeline } => {
            let store = open_store(settings).await?;
            store
                .delete_secret(&name, pipeline.as_deref(), &cli_actor())
                .await?;
            match pipeline.filter(|p| !p.is_empty()) {
                Some(p) => eprintln!("deleted secret {name} for pipeline {p}"),
                None => eprintln!("deleted secret {name} (global)"),
            }
        }
    }
    Ok(())
}

async fn real_main(cli: Cli) -> anyhow::Result<()> {
    // A fresh key needs no configuration, so a broken config cannot stand in the way of making one.
    if let Command::Secret {
        action: SecretAction::GenerateKey,
    } = cli.command
    {
        println!("{}", outpost_server::secrets::generate_key());
        return Ok(());
    }
    let mut settings = Settings::load(cli.config.as_deref())?;
    match cli.command {
        Command::Serve => serve(settings).await,
        Command::Dev => {
            outpost_server::secrets::use_dev_key(&mut settings)?;
            dev::run(settings).await
        }
        Command::Migrate => {
            // Migrating needs no secrets key, so it can run where the key is not given out.
            outpost_server::Store::connect(
                &settings.database_url(),
                settings.database.max_connections,
            )
            .await?
            .close()
            .await;
            eprintln!("the database is up to date");
            Ok(())
        }
        Command::Secret { action } => secret_command(&settings, action).await,
        Command::Token { action } => {
            let store = open_store(&settings).await?;
            match action {
                TokenAction::Create {
                    name,
                    scope,
                    expires_in_days,
                } => {
                    let scope = Scope::parse(&scope).context("unknown scope")?;
                    let (_, token) = store
                        .create_api_token(&name, scope, expiry(expires_in_days))
                        .await?;
                    println!("{token}");
                }
                TokenAction::List => print_tokens(&store.list_api_tokens().await?),
                TokenAction::Revoke { name_or_id } => {
                    let n = store.revoke_api_token(&name_or_id).await?;
                    anyhow::ensure!(
                        n > 0,
                        "no active token is named {name_or_id} or has that id"
                    );
                    eprintln!("revoked {n} token(s)");
                }
            }
            Ok(())
        }
        Command::RegistrationToken { action } => {
            let store = open_store(&settings).await?;
            match action {
                RegistrationAction::Create {
                    pool,
                    expires_in_days,
                } => {
                    let (_, token) = store
                        .create_registration_token(&pool, expiry(expires_in_days))
                        .await?;
                    println!("{token}");
                }
                RegistrationAction::List => print_tokens(&store.list_registration_tokens().await?),
                RegistrationAction::Revoke { pool_or_id } => {
                    let n = store.revoke_registration_token(&pool_or_id).await?;
                    anyhow::ensure!(
                        n > 0,
                        "no active registration token has the pool or id {pool_or_id}"
                    );
                    eprintln!("revoked {n} registration token(s)");
                }
            }
            Ok(())
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match real_main(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
