//! Outpost job server: HTTP API, job queue and leases, log store.
//!
//! Startup is [`run`], which binds nothing itself: `main` binds the configured address, tests
//! bind `127.0.0.1:0`. [`api::router`] builds the whole HTTP surface for handler tests.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub mod ansi;
pub mod api;
pub mod dev;
pub mod entra;
pub mod events;
pub mod hooks;
pub mod pipeline;
pub mod queue;
pub mod secrets;
pub mod settings;
pub mod store;
pub mod web;

pub use settings::Settings;
pub use store::Store;

/// The listen backlog: how many connections the kernel queues before the server accepts them.
///
/// std's default (128) dropped connections when thousands of runners (re)connected at once, for
/// example after a server restart; the kernel caps it at `net.core.somaxconn` (4096 by default).
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds `addr` (`HOST:PORT`, names resolved) with [`LISTEN_BACKLOG`], trying each address the
/// name resolves to in turn.
pub async fn bind(addr: &str) -> std::io::Result<TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // As std does: a restarted server can bind while old connections linger in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        match socket.bind(a).and_then(|()| socket.listen(LISTEN_BACKLOG)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{addr} resolves to no address"),
        )
    }))
}

/// Connects to the configured database, applies migrations, and checks the secrets key against
/// the stored secrets (a missing or wrong key is an error here, never a plaintext fallback).
pub async fn open_store(settings: &Settings) -> anyhow::Result<Arc<Store>> {
    let key = secrets::load_key(&settings.secrets)?;
    let store = Store::connect(&settings.database_url(), settings.database.max_connections).await?;
    if let Err(e) = store.init_secrets(key).await {
        store.close().await;
        let hint = match &e {
            store::StoreError::Conflict(m) if m == secrets::MISSING_KEY => {
                secrets::dev_key_hint(settings).unwrap_or_default()
            }
            _ => String::new(),
        };
        anyhow::bail!("{e}{hint}");
    }
    Ok(Arc::new(store))
}

/// Serves the API on `listener` until `shutdown` is cancelled.
pub async fn run(
    settings: Settings,
    store: Arc<Store>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let entra = match &settings.entra {
        Some(entra) => Some(Arc::new(entra::EntraVerifier::new(entra.clone())?)),
        None => None,
    };
    let settings = Arc::new(settings);
    let state = api::AppState {
        store: store.clone(),
        settings: settings.clone(),
        shutdown: shutdown.clone(),
        entra,
    };
    let listen = tokio::spawn(store.events.clone().listen(shutdown.clone()));
    let reaper = tokio::spawn(queue::reaper(
        store.clone(),
        Duration::from_millis(settings.queue.reaper_interval_ms.max(10)),
        shutdown.clone(),
    ));
    let app = api::router(state).layer(tower_http::trace::TraceLayer::new_for_http());
    // The peer address keys the throttling of failed authentication.
    let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await
        .context("the HTTP server failed")?;
    shutdown.cancel();
    let _ = tokio::join!(listen, reaper);
    store.close().await;
    Ok(())
}
