//! The web UI: server-rendered pages (maud), one CSS file and one script, all embedded.
//!
//! Pages sign in with a session cookie (see [`session`]); the page script reads the JSON API with
//! the same cookie, and state-changing forms carry a CSRF token.
//! Every response here has a strict Content-Security-Policy: no inline script, nothing from
//! another origin.

use std::sync::OnceLock;

use axum::Router;
use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use sha2::{Digest, Sha256};

use crate::api::{ApiError, AppState, Route, route};
use crate::store::ApiPrincipal;

mod invoke;
mod pages;
pub mod session;

const APP_CSS: &str = include_str!("app.css");
const APP_JS: &str = include_str!("app.js");

/// The Content-Security-Policy of every page.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// A short hash of the embedded assets, put in their URLs so a long cache never serves a stale one.
pub fn asset_version() -> &'static str {
    static V: OnceLock<String> = OnceLock::new();
    V.get_or_init(|| {
        let mut h = Sha256::new();
        h.update(APP_CSS);
        h.update(APP_JS);
        hex::encode(&h.finalize()[..6])
    })
}

/// Every route of the web UI, as one list: [`router`] is built from it and the web authorisation
/// matrix (`tests/tests/web_authz_matrix.rs`) walks it, so a page or form cannot exist without
/// deciding who may open or post it.
pub fn route_table() -> Vec<Route> {
    use Method as M;
    vec![
        route(M::GET, "/", pages::runs),
        route(M::GET, "/login", pages::login_form),
        route(M::POST, "/login", pages::login),
        route(M::POST, "/logout", pages::logout),
        route(M::GET, "/runs/{id}", pages::run),
        route(M::POST, "/runs/{id}/cancel", pages::cancel_run),
        route(M::POST, "/runs/{id}/rerun", pages::rerun),
        route(M::GET, "/jobs/{id}", pages::job),
        route(M::POST, "/jobs/{id}/cancel", pages::cancel_job),
        route(M::GET, "/runners", pages::runners),
        route(M::POST, "/runners/invoke", invoke::run_command),
        route(M::GET, "/pipelines", pages::pipelines),
        route(M::GET, "/pipelines/{name}", pages::pipeline),
        route(M::POST, "/pipelines/{name}/run", pages::trigger),
        route(M::GET, "/webhooks", pages::webhooks),
        route(M::GET, "/static/app.css", css),
        route(M::GET, "/static/app.js", js),
    ]
}

/// The web routes, merged into the API router.
///
/// Add a route to [`route_table`], never here: only there does the web matrix see it.
pub fn router() -> Router<AppState> {
    let mut app = Router::new();
    for r in route_table() {
        // Routes on one path merge into one method router.
        app = app.route(r.path, r.handler);
    }
    app.layer(axum::middleware::from_fn(security_headers))
}

async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    resp
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
        ],
        body,
    )
        .into_response()
}

async fn css() -> Response {
    asset(APP_CSS, "text/css; charset=utf-8")
}

async fn js() -> Response {
    asset(APP_JS, "text/javascript; charset=utf-8")
}

/// The session of a request: the cookie value, the token inside it, and the key.
struct RawSession {
    cookie: String,
    token: String,
    key: [u8; 32],
}

fn raw_session(parts: &Parts, state: &AppState) -> Option<RawSession> {
    let value = session::cookie(&parts.headers, session::COOKIE)?;
    let key = session::key(&state.settings.data_dir).ok()?;
    let token = session::open(&key, value, session::now())?;
    Some(RawSession {
        cookie: value.to_string(),
        token,
        key,
    })
}

/// For the API's `Caller`: the API token in the session cookie, if there is one.
///
/// A request that changes state (anything but `GET`/`HEAD`) must also carry the session's CSRF
/// token in `X-CSRF-Token`, so another site cannot make the browser call the API.
pub fn cookie_token(parts: &Parts, state: &AppState) -> Option<Result<String, ApiError>> {
    session::cookie(&parts.headers, session::COOKIE)?;
    let Some(s) = raw_session(parts, state) else {
        return Some(Err(ApiError::unauthenticated(
            "the session has expired: sign in again",
        )));
    };
    if parts.method != Method::GET && parts.method != Method::HEAD {
        let given = parts
            .headers
            .get(session::CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !session::csrf_ok(&s.key, &s.cookie, given) {
            return Some(Err(ApiError::forbidden(
                "missing or wrong X-CSRF-Token header for this session",
            )));
        }
    }
    Some(Ok(s.token))
}

/// Whether a browser sent this request from another site: its `Origin` header, which browsers
/// send with every form `POST`, names neither the host the request was sent to (`Host`, or a
/// proxy's `X-Forwarded-Host`) nor `server.public_url`.
///
/// The CSRF token already guards the forms of a session; this guards the sign-in form too, which
/// has no session yet, so another site (a sibling subdomain included, which `SameSite` does not
/// stop) cannot sign a browser in with the attacker's token.
/// A request without `Origin` (curl, scripts) is not cross-site: only a browser sends one.
fn cross_site(headers: &HeaderMap, state: &AppState) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return false;
    };
    let Some(origin) = origin.to_str().ok().and_then(authority) else {
        // `null` (a sandboxed frame, a privacy-minded redirect) or garbage: no site of ours.
        return true;
    };
    let host = |name: header::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .map(|v| v.trim().to_ascii_lowercase())
    };
    let ours = [
        host(header::HOST),
        host(header::HeaderName::from_static("x-forwarded-host")),
        state
            .settings
            .server
            .public_url
            .as_deref()
            .and_then(authority),
    ];
    !ours.iter().flatten().any(|o| *o == origin)
}

/// The `host[:port]` of an absolute URL, lowercase, without the scheme's default port.
fn authority(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let auth = rest.split(['/', '?', '#']).next()?.to_ascii_lowercase();
    let default = match scheme.to_ascii_lowercase().as_str() {
        "http" => ":80",
        "https" => ":443",
        _ => return None,
    };
    let auth = auth.strip_suffix(default).unwrap_or(&auth).to_string();
    (!auth.is_empty()).then_some(auth)
}

/// A signed-in person; pages that need one redirect to `/login` without it.
pub struct WebUser {
    /// Who, with which scope.
    pub principal: ApiPrincipal,
    /// The CSRF token forms must carry.
    pub csrf: String,
    key: [u8; 32],
    cookie: String,
}

impl WebUser {
    /// Fails with `403` unless `given` is this session's CSRF token.
    fn check_csrf(&self, given: &str) -> Result<(), Refusal> {
        if session::csrf_ok(&self.key, &self.cookie, given) {
            Ok(())
        } else {
            Err(Refusal(
                "the form is out of date or was not sent by this site: reload the page and try again",
            ))
        }
    }
}

/// Why a form sent from another site is refused.
const CROSS_SITE: &str =
    "this form was sent from another site: open Outpost at its own address and use its form";

/// A state change refused with `403` and a sentence saying why.
#[derive(Debug)]
pub struct Refusal(pub &'static str);

impl From<Refusal> for Response {
    fn from(r: Refusal) -> Response {
        (StatusCode::FORBIDDEN, r.0).into_response()
    }
}

impl FromRequestParts<AppState> for WebUser {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let to_login = || {
            let next = parts
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/");
            let next: String = form_urlencoded::byte_serialize(next.as_bytes()).collect();
            Redirect::to(&format!("/login?next={next}")).into_response()
        };
        if parts.method != Method::GET
            && parts.method != Method::HEAD
            && cross_site(&parts.headers, state)
        {
            return Err(Refusal(CROSS_SITE).into());
        }
        let Some(s) = raw_session(parts, state) else {
            return Err(to_login());
        };
        match state.store.authenticate_api(&s.token).await {
            Ok(Some(principal)) => Ok(WebUser {
                principal,
                csrf: session::csrf(&s.key, &s.cookie),
                key: s.key,
                cookie: s.cookie,
            }),
            Ok(None) => Err(to_login()),
            Err(e) => Err(ApiError::from(e).into_response()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::authority;

    #[test]
    fn authority_drops_the_scheme_path_and_default_port() {
        assert_eq!(
            authority("https://CI.example.com").as_deref(),
            Some("ci.example.com")
        );
        assert_eq!(
            authority("https://ci.example.com:443/x").as_deref(),
            Some("ci.example.com")
        );
        assert_eq!(
            authority("http://127.0.0.1:8080").as_deref(),
            Some("127.0.0.1:8080")
        );
        assert_eq!(authority("null"), None);
        assert_eq!(authority("ftp://x"), None);
    }
}
