//! `outpost-server dev`: everything on one laptop in one command.
//!
//! The server on SQLite under the data dir, an embedded runner labelled `local`, an admin token,
//! and the example pipeline, so a new user can trigger a run with one `curl`.

use std::path::Path;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::store::{Scope, Store};
use crate::{Settings, pipeline};

/// The example pipeline applied on start, as `hello`.
pub const EXAMPLE_PIPELINE: &str = include_str!("../../examples/hello.yaml");

/// Reuses the admin token saved in the data dir if it still works, else creates and saves one.
async fn admin_token(store: &Store, data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join("dev-admin-token");
    if let Ok(saved) = std::fs::read_to_string(&path) {
        let saved = saved.trim().to_string();
        if store.authenticate_api(&saved).await?.is_some() {
            return Ok(saved);
        }
    }
    let (_, token) = store
        .create_api_token("dev-admin", Scope::Admin, None)
        .await?;
    write_private(&path, &token)?;
    Ok(token)
}

/// Writes a file only its owner can read.
fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("could not write {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    Ok(())
}

/// The embedded runner's credentials: reused while the server still knows them, else registered anew.
async fn runner_credentials(
    store: &Store,
    url: &str,
    config_dir: &Path,
) -> anyhow::Result<outpost_runner::Credentials> {
    if let Ok(creds) = outpost_runner::Credentials::load(config_dir)
        && store
            .authenticate_runner(&creds.runner_token)
            .await?
            .is_some()
    {
        return Ok(outpost_runner::Credentials {
            server_url: url.to_string(),
            ..creds
        });
    }
    let (reg_id, reg) = store.create_registration_token("local", None).await?;
    let creds = outpost_runner::register(url, &reg, "local", vec!["local".to_string()]).await?;
    creds.save(config_dir)?;
    // The token served its one purpose; leaving it valid would only widen the attack surface.
    store.revoke_registration_token(&reg_id.to_string()).await?;
    Ok(creds)
}

/// Runs the server with an embedded runner until Ctrl-C.
pub async fn run(mut settings: Settings) -> anyhow::Result<()> {
    std::fs::create_dir_all(&settings.data_dir).with_context(|| {
        format!(
            "could not create the data directory {}",
            settings.data_dir.display()
        )
    })?;
    // Absolute, so the runner's workspaces and the printed paths do not depend on the cwd.
    settings.data_dir = std::fs::canonicalize(&settings.data_dir)?;
    let listener = crate::bind(&settings.server.listen)
        .await
        .with_context(|| {
            format!(
                "could not listen on {} (is another Outpost running? set OUTPOST__SERVER__LISTEN)",
                settings.server.listen
            )
        })?;
    let addr = listener.local_addr()?;
    let url = format!("http://{addr}");
    settings.server.public_url.get_or_insert(url.clone());

    let store = crate::open_store(&settings).await?;
    let token = admin_token(&store, &settings.data_dir).await?;
    let def = pipeline::parse(EXAMPLE_PIPELINE)
        .map_err(|e| anyhow::anyhow!("the bundled example pipeline is invalid: {e}"))?;
    store.put_pipeline("hello", EXAMPLE_PIPELINE, &def).await?;

    let shutdown = CancellationToken::new();
    let server = tokio::spawn(crate::run(
        settings.clone(),
        store.clone(),
        listener,
        shutdown.clone(),
    ));

    let runner_dir = settings.data_dir.join("runner");
    let creds = runner_credentials(&store, &url, &runner_dir).await?;
    let runner_settings = outpost_runner::Settings::defaults_for(&runner_dir);
    let runner_shutdown = CancellationToken::new();
    let runner_abort = CancellationToken::new();
    let mut runner = tokio::spawn(outpost_runner::run_with_abort(
        creds,
        runner_settings,
        outpost_runner::RunOptions { once: false },
        runner_shutdown.clone(),
        runner_abort.clone(),
    ));

    println!(
        "Outpost is running at {url} (data in {})",
        settings.data_dir.display()
    );
    println!("An embedded runner with the label `local` is waiting for jobs.");
    println!("Web UI: open {url}/ and sign in with the token below.");
    println!();
    println!("  export OUTPOST_TOKEN={token}");
    println!(
        "  curl -s -X POST -H \"Authorization: Bearer $OUTPOST_TOKEN\" {url}/api/v1/pipelines/hello/runs"
    );
    println!();
    println!("Press Ctrl-C to stop.");

    wait_for_signal().await;
    eprintln!("stopping: letting the running job finish (Ctrl-C again to stop at once)");
    runner_shutdown.cancel();
    tokio::select! {
        _ = &mut runner => {}
        _ = wait_for_signal() => {
            // A second signal: cancel the running job, let the runner report it, then stop.
            runner_abort.cancel();
            let _ = runner.await;
        }
    }
    shutdown.cancel();
    server.await.context("the server task failed")??;
    Ok(())
}

/// Waits for Ctrl-C or SIGTERM.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("could not install a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
