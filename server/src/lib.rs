//! Outpost job server: HTTP API, job queue and leases, log store.
//!
//! Startup is [`run`], which binds nothing itself: `main` binds the configured address, tests
//! bind `127.0.0.1:0`. [`api::router`] builds the whole HTTP surface for handler tests.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

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

/// The smallest read buffer hyper accepts, and the default `server.read_buffer_max_bytes`.
///
/// hyper's own default (about 400 KiB) lets the read buffer of every connection double to 16 KiB
/// after its first request, and a long-polling runner holds its connection for minutes: with
/// 10,000 runners that alone was 160 MiB.
pub const READ_BUFFER_MIN: usize = 8 * 1024;

/// How long a client may take to send a request's head; slower connections are closed.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `app` on `listener` until `shutdown` is cancelled, then waits for open requests to end.
///
/// Like `axum::serve`, but with hyper's connection settings chosen for thousands of idle long polls
/// (`server.read_buffer_max_bytes`, [`HEADER_READ_TIMEOUT`]), open requests given at most
/// `server.shutdown_grace_secs` to end, and the peer address as axum's `ConnectInfo` (it keys the
/// throttling of failed authentication).
pub async fn serve<S>(
    listener: TcpListener,
    app: S,
    server: &settings::ServerSettings,
    shutdown: CancellationToken,
) where
    S: tower::Service<
            axum::extract::Request,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    use axum::extract::ConnectInfo;
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;
    use tower::ServiceExt;

    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(server.read_buffer_max_bytes.max(READ_BUFFER_MIN));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "could not accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let service =
            app.clone()
                .map_request(move |req: axum::http::Request<hyper::body::Incoming>| {
                    let mut req = req.map(axum::body::Body::new);
                    req.extensions_mut().insert(ConnectInfo(peer));
                    req
                });
        // Owned: the connection task keeps its own copy of the settings.
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(service))
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::trace!(error = %e, %peer, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let grace = Duration::from_secs(server.shutdown_grace_secs);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "requests still open after the shutdown grace period; closing them"
        );
    }
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
    let app = api::router(state);
    serve(listener, app, &settings.server, shutdown.clone()).await;
    shutdown.cancel();
    let _ = tokio::join!(listen, reaper);
    store.close().await;
    Ok(())
}
