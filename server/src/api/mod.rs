//! The HTTP API: thin handlers that parse, authorise, call the store and map the result.

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::handler::Handler;
use axum::http::{Method, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{MethodFilter, MethodRouter, on};
use tokio_util::sync::CancellationToken;
use tower_http::limit::RequestBodyLimitLayer;

use crate::settings::Settings;
use crate::store::Store;

pub mod error;
pub mod extract;
pub mod guard;
mod hooks;
pub(crate) mod invoke;
mod logs;
pub mod openapi;
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
    /// Checks Entra ID tokens at runner registration; `None` when `[entra]` is not configured.
    pub entra: Option<Arc<crate::entra::EntraVerifier>>,
}

/// One route of the HTTP surface: its method, its full path and what answers it.
#[derive(Debug)]
pub struct Route {
    /// The HTTP method.
    pub method: Method,
    /// The full path in axum's syntax, which is also OpenAPI's (`/api/v1/runs/{id}`).
    pub path: &'static str,
    pub(crate) handler: MethodRouter<AppState>,
}

/// A [`Route`] answered by `handler`; the web UI's table (`web::route_table`) uses it too.
pub(crate) fn route<H, T>(method: Method, path: &'static str, handler: H) -> Route
where
    H: Handler<T, AppState>,
    T: 'static,
{
    // Every method used below has a filter, so this cannot fail at run time.
    let filter = MethodFilter::try_from(method.clone()).expect("a standard HTTP method");
    Route {
        method,
        path,
        handler: on(filter, handler),
    }
}

/// Every route outside the web UI, as one list: the router is built from it and the
/// authorisation matrix test walks it, so a route cannot exist without being tested.
pub fn route_table() -> Vec<Route> {
    use Method as M;
    vec![
        route(M::GET, "/healthz", healthz),
        route(M::GET, "/readyz", readyz),
        route(M::GET, "/api/v1/openapi.json", openapi::serve),
        route(M::GET, "/api/v1/pipelines", pipelines::list),
        route(M::PUT, "/api/v1/pipelines/{name}", pipelines::apply),
        route(M::GET, "/api/v1/pipelines/{name}", pipelines::get),
        route(M::DELETE, "/api/v1/pipelines/{name}", pipelines::delete),
        route(M::POST, "/api/v1/pipelines/{name}/runs", runs::trigger),
        route(M::GET, "/api/v1/runs", runs::list),
        route(M::GET, "/api/v1/runs/{id}", runs::get),
        route(M::POST, "/api/v1/runs/{id}/cancel", runs::cancel),
        route(M::GET, "/api/v1/jobs/{id}", runs::get_job),
        route(M::POST, "/api/v1/jobs/{id}/cancel", runs::cancel_job),
        route(M::GET, "/api/v1/jobs/{id}/log", logs::get_log),
        route(M::GET, "/api/v1/jobs/{id}/log/stream", logs::stream_log),
        route(M::POST, "/api/v1/invoke", invoke::invoke),
        route(M::GET, "/api/v1/audit", invoke::list_audit),
        route(M::GET, "/api/v1/webhook-deliveries", hooks::list_deliveries),
        route(M::GET, "/api/v1/secrets", secrets::list),
        route(M::PUT, "/api/v1/secrets/{name}", secrets::put),
        route(M::DELETE, "/api/v1/secrets/{name}", secrets::delete),
        route(M::GET, "/api/v1/runners", runner::list),
        route(M::POST, "/api/v1/runner/register", runner::register),
        route(M::GET, "/api/v1/runner/me", runner::me),
        route(
            M::GET,
            "/api/v1/runner/registration-info",
            runner::registration_info,
        ),
        route(M::POST, "/api/v1/runner/acquire", runner::acquire),
        route(
            M::POST,
            "/api/v1/runner/jobs/{id}/heartbeat",
            runner::heartbeat,
        ),
        route(M::PUT, "/api/v1/runner/jobs/{id}/log", runner::append_log),
        route(
            M::POST,
            "/api/v1/runner/jobs/{id}/steps/{index}",
            runner::update_step,
        ),
        route(
            M::POST,
            "/api/v1/runner/jobs/{id}/complete",
            runner::complete,
        ),
        route(M::POST, "/hooks/github", hooks::github),
        route(M::POST, "/hooks/gitlab", hooks::gitlab),
        route(M::POST, "/hooks/azure-devops", hooks::azure_devops),
        route(M::POST, "/hooks/generic/{pipeline}", hooks::generic),
    ]
}

/// The whole HTTP surface: every route behind the checks every request passes ([`guard::Edge`])
/// and the body limits, with a request span for tracing.
///
/// Add a route to [`route_table`], never here: only there does the authorisation matrix see it.
///
/// The layers wrap the router as a whole instead of going through `Router::layer`, which wraps
/// every route again for each layer and boxes one more future per layer and request: a waiting
/// runner's acquire holds its request, and those futures, for minutes.
pub fn router(
    state: AppState,
) -> impl tower::Service<
    axum::extract::Request,
    Response = axum::response::Response,
    Error = std::convert::Infallible,
    Future: Send + 'static,
> + Clone
+ Send
+ Sync
+ 'static {
    let max_body = state.settings.server.max_body_bytes;
    let hook_max_body = state.settings.webhooks.max_body_bytes;
    let any_body = max_body.max(hook_max_body);
    let throttle = Arc::new(guard::AuthThrottle::new(&state.settings.server));
    let mut app = Router::new();
    for r in route_table() {
        // Webhooks have their own body limit: forges send larger bodies than the API ever gets.
        let handler = if r.path.starts_with("/hooks/") {
            r.handler.layer(DefaultBodyLimit::max(hook_max_body))
        } else {
            r.handler
        };
        // Routes on one path merge into one method router.
        app = app.route(r.path, handler);
    }
    let routes = app
        .merge(crate::web::router())
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not accept that method",
            )
        })
        .with_state(state);
    let limited = tower::ServiceBuilder::new()
        .map_response(|r: axum::http::Response<_>| r.map(axum::body::Body::new))
        // A backstop for every route, whatever reads its body: no request body is ever larger
        // than the largest limit above.
        .layer(RequestBodyLimitLayer::new(any_body))
        .layer(DefaultBodyLimit::max(max_body))
        .service(routes);
    tower::ServiceBuilder::new()
        .map_response(|r: axum::http::Response<_>| r.map(axum::body::Body::new))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .service(guard::Edge::new(limited, throttle, any_body))
}

/// How long the readiness check waits for the database. Without a bound, a database that is down
/// makes `/readyz` hang for the pool's acquire timeout (30 s) instead of answering not-ready, and a
/// probe with a shorter timeout learns nothing but a timeout.
const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "health", operation_id = "healthz",
    responses((status = 200, description = "The process is alive", body = String, content_type = "text/plain")))]
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready when the database answers within [`READY_TIMEOUT`].
#[utoipa::path(get, path = "/readyz", tag = "health", operation_id = "readyz",
    responses(
        (status = 200, description = "The database answers", body = String, content_type = "text/plain"),
        (status = 503, description = "The database does not answer within 2 s", body = String, content_type = "text/plain"),
    ))]
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    match tokio::time::timeout(READY_TIMEOUT, state.store.ping()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n"),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness check failed");
            (StatusCode::SERVICE_UNAVAILABLE, "database unreachable\n")
        }
        Err(_) => {
            tracing::warn!(timeout = ?READY_TIMEOUT, "readiness check timed out");
            (StatusCode::SERVICE_UNAVAILABLE, "database unreachable\n")
        }
    }
}
