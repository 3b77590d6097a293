//! The HTTP API: thin handlers that parse, authorise, call the store and map the result.

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post, put};
use tokio_util::sync::CancellationToken;
use tower_http::limit::RequestBodyLimitLayer;

use crate::settings::Settings;
use crate::store::Store;

pub mod error;
pub mod extract;
pub mod guard;
mod hooks;
mod logs;
mod pipelines;
mod runner;
pub(crate) mod runs;
mod secrets;

pub use error::{ApiError, ApiResult};
#[doc(hidden)]
pub use logs::take_text;

/// What every handler can reach.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The store.
    pub store: Arc<Store>,
    /// The settings the server started with.
    pub settings: Arc<Settings>,
    /// Cancelled when the server shuts down, so long polls and streams end promptly.
    pub shutdown: CancellationToken,
}

/// The whole HTTP surface.
pub fn router(state: AppState) -> Router {
    let max_body = state.settings.server.max_body_bytes;
    let any_body = max_body.max(state.settings.webhooks.max_body_bytes);
    let throttle = Arc::new(guard::AuthThrottle::new(&state.settings.server));
    let api = Router::new()
        .route("/pipelines", get(pipelines::list))
        .route(
            "/pipelines/{name}",
            put(pipelines::apply)
                .get(pipelines::get)
                .delete(pipelines::delete),
        )
        .route("/pipelines/{name}/runs", post(runs::trigger))
        .route("/runs", get(runs::list))
        .route("/runs/{id}", get(runs::get))
        .route("/runs/{id}/cancel", post(runs::cancel))
        .route("/jobs/{id}", get(runs::get_job))
        .route("/jobs/{id}/cancel", post(runs::cancel_job))
        .route("/jobs/{id}/log", get(logs::get_log))
        .route("/jobs/{id}/log/stream", get(logs::stream_log))
        .route("/webhook-deliveries", get(hooks::list_deliveries))
        .route("/secrets", get(secrets::list))
        .route("/secrets/{name}", put(secrets::put).delete(secrets::delete))
        .route("/runners", get(runner::list))
        .route("/runner/register", post(runner::register))
        .route("/runner/acquire", post(runner::acquire))
        .route("/runner/jobs/{id}/heartbeat", post(runner::heartbeat))
        .route("/runner/jobs/{id}/log", put(runner::append_log))
        .route("/runner/jobs/{id}/steps/{index}", post(runner::update_step))
        .route("/runner/jobs/{id}/complete", post(runner::complete));
    // Webhooks have their own body limit: forges send larger bodies than the API ever gets.
    let hook_routes = Router::new()
        .route("/github", post(hooks::github))
        .route("/gitlab", post(hooks::gitlab))
        .route("/azure-devops", post(hooks::azure_devops))
        .route("/generic/{pipeline}", post(hooks::generic))
        .layer(DefaultBodyLimit::max(
            state.settings.webhooks.max_body_bytes,
        ));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .nest("/api/v1", api)
        .nest("/hooks", hook_routes)
        .merge(crate::web::router())
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not accept that method",
            )
        })
        .layer(axum::middleware::from_fn(error::log_server_errors))
        .layer(DefaultBodyLimit::max(max_body))
        // A backstop for every route, whatever reads its body: no request body is ever larger
        // than the largest limit above.
        .layer(RequestBodyLimitLayer::new(any_body))
        .layer(axum::middleware::from_fn_with_state(
            any_body,
            guard::declared_body_limit,
        ))
        .layer(axum::middleware::from_fn_with_state(
            throttle,
            guard::throttle_failed_auth,
        ))
        .with_state(state)
}

/// Ready when the database answers.
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    match state.store.ping().await {
        Ok(()) => (StatusCode::OK, "ready\n"),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            (StatusCode::SERVICE_UNAVAILABLE, "database unreachable\n")
        }
    }
}
