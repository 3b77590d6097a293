//! Request guards that sit in front of every route ([`Edge`]): the body size backstop, the
//! throttling of repeated failed authentication per client address, and the log line of a 5xx.
//!
//! They wrap the router rather than live in handler code, so a route added later is covered
//! without anyone remembering to.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request};
use axum::http::header::{AUTHORIZATION, CONNECTION, CONTENT_LENGTH, COOKIE, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use tower::ServiceExt;

use super::error::{ApiError, InternalCause};
use crate::settings::ServerSettings;

/// How many client addresses are tracked at most; the map never grows past this.
const MAX_ADDRESSES: usize = 65_536;
/// How many credentials that authenticated are remembered per address.
const MAX_GOOD: usize = 64;

/// The failed-authentication record of one client address.
#[derive(Debug)]
struct Entry {
    window_start: Instant,
    failures: u32,
    blocked_until: Option<Instant>,
    /// Fingerprints (SHA-256) of credentials that authenticated from this address: a runner
    /// behind the same NAT as a misbehaving client keeps working while the address is blocked.
    good: Vec<[u8; 32]>,
    last_seen: Instant,
}

impl Entry {
    fn new(now: Instant) -> Self {
        Self {
            window_start: now,
            failures: 0,
            blocked_until: None,
            good: Vec::new(),
            last_seen: now,
        }
    }
}

/// Counts failed authentications (`401` answers) per client address; after
/// `server.auth_failures_max` of them within `server.auth_failure_window_secs`, the address gets
/// `429` with `Retry-After` for `server.auth_block_secs`, except for credentials that already
/// authenticated from it.
///
/// Successful requests never count, so many runners behind one address are not throttled by
/// their own valid traffic. The state is per server process.
#[derive(Debug)]
pub struct AuthThrottle {
    max_failures: u32,
    window: Duration,
    block: Duration,
    loopback: bool,
    entries: Mutex<HashMap<IpAddr, Entry>>,
}

impl AuthThrottle {
    /// A throttle with the limits in `settings`.
    pub fn new(settings: &ServerSettings) -> Self {
        Self {
            max_failures: settings.auth_failures_max,
            window: Duration::from_secs(settings.auth_failure_window_secs.max(1)),
            block: Duration::from_secs(settings.auth_block_secs.max(1)),
            loopback: settings.auth_throttle_loopback,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn applies_to(&self, ip: IpAddr) -> bool {
        self.max_failures > 0 && (self.loopback || !ip.is_loopback())
    }

    /// How long `ip` must still wait, if it is blocked and `credential` is not one it used
    /// successfully.
    fn blocked(&self, ip: IpAddr, credential: Option<&[u8; 32]>, now: Instant) -> Option<Duration> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let entry = entries.get(&ip)?;
        let until = entry.blocked_until.filter(|u| *u > now)?;
        if credential.is_some_and(|c| entry.good.contains(c)) {
            return None;
        }
        Some(until - now)
    }

    fn record_failure(&self, ip: IpAddr, now: Instant) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let Some(entry) = self.entry(&mut entries, ip, now) else {
            return;
        };
        if now.duration_since(entry.window_start) > self.window {
            entry.window_start = now;
            entry.failures = 0;
        }
        entry.failures += 1;
        if entry.failures >= self.max_failures {
            entry.blocked_until = Some(now + self.block);
            entry.window_start = now;
            entry.failures = 0;
            tracing::warn!(client = %ip, block_secs = self.block.as_secs(),
                "too many failed authentications; the address is throttled");
        }
    }

    fn record_success(&self, ip: IpAddr, credential: [u8; 32], now: Instant) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let Some(entry) = self.entry(&mut entries, ip, now) else {
            return;
        };
        if !entry.good.contains(&credential) {
            if entry.good.len() >= MAX_GOOD {
                entry.good.remove(0);
            }
            entry.good.push(credential);
        }
    }

    /// The entry of `ip`, made room for if needed; `None` when the map is full of live entries
    /// (then the address is not tracked: failing open is better than unbounded memory).
    fn entry<'a>(
        &self,
        entries: &'a mut HashMap<IpAddr, Entry>,
        ip: IpAddr,
        now: Instant,
    ) -> Option<&'a mut Entry> {
        if !entries.contains_key(&ip) && entries.len() >= MAX_ADDRESSES {
            let horizon = self.window.max(self.block);
            entries.retain(|_, e| {
                e.blocked_until.is_some_and(|u| u > now)
                    || now.duration_since(e.last_seen) <= horizon
            });
            if entries.len() >= MAX_ADDRESSES {
                return None;
            }
        }
        let entry = entries.entry(ip).or_insert_with(|| Entry::new(now));
        entry.last_seen = now;
        Some(entry)
    }
}

/// The fingerprint of the credential a request carries (bearer token or session cookie), if any.
fn credential(headers: &HeaderMap) -> Option<[u8; 32]> {
    let value = headers.get(AUTHORIZATION).or_else(|| headers.get(COOKIE))?;
    Some(Sha256::digest(value.as_bytes()).into())
}

/// The checks every request passes on its way to a route, as one service around the router:
/// the throttling of failed authentication ([`AuthThrottle`]), the `413` for a declared
/// `Content-Length` above the largest body limit, and the one log line for a 5xx (its cause
/// travels in [`InternalCause`]).
///
/// One service with one boxed future instead of three `from_fn` layers on the router: each such
/// layer boxed two futures per request for every route, and a runner's acquire long poll holds
/// its request for minutes, so with 10,000 runners waiting that was about 35 MiB.
#[derive(Debug, Clone)]
pub struct Edge<S> {
    inner: S,
    throttle: Arc<AuthThrottle>,
    body_limit: usize,
}

impl<S> Edge<S> {
    /// Puts the checks in front of `inner`; bodies declared larger than `body_limit` get `413`.
    pub fn new(inner: S, throttle: Arc<AuthThrottle>, body_limit: usize) -> Self {
        Edge {
            inner,
            throttle,
            body_limit,
        }
    }
}

impl<S> tower::Service<Request> for Edge<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // `oneshot` below waits for the inner service's readiness.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let inner = self.inner.clone();
        let throttle = self.throttle.clone();
        let body_limit = self.body_limit;
        Box::pin(async move { Ok(edge(req, inner, &throttle, body_limit).await) })
    }
}

async fn edge<S>(req: Request, inner: S, throttle: &AuthThrottle, body_limit: usize) -> Response
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
{
    // Without the peer address (handler tests with `oneshot`) there is nothing to key on.
    let ip = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .filter(|ip| throttle.applies_to(*ip));
    let credential = ip.and_then(|_| credential(req.headers()));
    if let Some(ip) = ip
        && let Some(wait) = throttle.blocked(ip, credential.as_ref(), Instant::now())
    {
        // Whole seconds, rounded up, so a client that waits exactly this long is let in.
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let mut resp = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_failed_authentications",
            format!(
                "too many failed authentications from your address; retry in {secs} s with a \
                 valid credential"
            ),
        )
        .into_response();
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
        return resp;
    }
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let mut resp = if declared.is_some_and(|n| n > body_limit as u64) {
        // Before any handler or extractor runs. Bodies without a length are cut off by the
        // `RequestBodyLimitLayer` inside.
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "the request body is larger than the server accepts (server.max_body_bytes)",
        )
        .into_response()
    } else {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let Ok(resp) = inner.oneshot(req).await;
        if let Some(cause) = resp.extensions().get::<InternalCause>() {
            tracing::error!(%method, %path, status = resp.status().as_u16(), cause = %cause.0, "request failed");
        }
        resp
    };
    let status = resp.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        // The rest of the body was never read, so the connection cannot carry another request:
        // say so, or a client that pools it sends its next request into a closing connection
        // (and gets "connection closed before message completed" instead of an answer).
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    if let Some(ip) = ip {
        if status == StatusCode::UNAUTHORIZED {
            throttle.record_failure(ip, Instant::now());
        } else if let Some(c) = credential
            && (status.is_success() || status == StatusCode::FORBIDDEN)
        {
            // The credential authenticated (a 403 is a valid token lacking a scope).
            throttle.record_success(ip, c, Instant::now());
        }
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle(max: u32) -> AuthThrottle {
        AuthThrottle::new(&ServerSettings {
            auth_failures_max: max,
            auth_failure_window_secs: 60,
            auth_block_secs: 30,
            auth_throttle_loopback: false,
            ..ServerSettings::default()
        })
    }

    #[test]
    fn blocks_after_the_limit_and_lets_known_credentials_through() {
        let t = throttle(3);
        let ip: IpAddr = "203.0.113.7".parse().unwrap();
        let now = Instant::now();
        t.record_success(ip, [1; 32], now);
        for _ in 0..2 {
            t.record_failure(ip, now);
        }
        assert_eq!(t.blocked(ip, None, now), None);
        t.record_failure(ip, now);
        assert!(t.blocked(ip, None, now).is_some());
        assert!(t.blocked(ip, Some(&[2; 32]), now).is_some());
        assert_eq!(t.blocked(ip, Some(&[1; 32]), now), None);
        assert_eq!(t.blocked(ip, None, now + Duration::from_secs(31)), None);
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let t = throttle(2);
        let ip: IpAddr = "2001:db8::1".parse().unwrap();
        let now = Instant::now();
        t.record_failure(ip, now);
        t.record_failure(ip, now + Duration::from_secs(61));
        assert_eq!(t.blocked(ip, None, now + Duration::from_secs(61)), None);
    }

    #[test]
    fn loopback_is_exempt_unless_configured() {
        assert!(!throttle(3).applies_to(IpAddr::from([127, 0, 0, 1])));
        assert!(throttle(3).applies_to(IpAddr::from([10, 0, 0, 1])));
        assert!(!throttle(0).applies_to(IpAddr::from([10, 0, 0, 1])));
    }

    /// Log lines written while a test runs, for the 5xx check.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// An edge whose inner service answers with `answer` and counts its calls; requests come
    /// from a throttled address.
    fn edge_over(
        answer: fn() -> Response,
        calls: Arc<std::sync::atomic::AtomicUsize>,
        max_failures: u32,
    ) -> Edge<
        impl tower::Service<Request, Response = Response, Error = Infallible, Future: Send + 'static>
        + Clone
        + Send
        + 'static,
    > {
        let inner = tower::service_fn(move |_req: Request| {
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::future::ready(Ok::<_, Infallible>(answer()))
        });
        Edge::new(inner, Arc::new(throttle(max_failures)), 1024)
    }

    fn request(content_length: Option<u64>) -> Request {
        let mut req = axum::http::Request::builder()
            .uri("/api/v1/anything")
            .header(AUTHORIZATION, "Bearer bad");
        if let Some(n) = content_length {
            req = req.header(CONTENT_LENGTH, n);
        }
        let mut req = req.body(axum::body::Body::empty()).unwrap();
        req.extensions_mut()
            .insert(ConnectInfo(SocketAddr::from(([203, 0, 113, 9], 4000))));
        req
    }

    #[tokio::test]
    async fn the_edge_refuses_declared_oversized_bodies_and_closes_the_connection() {
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let ok = || StatusCode::OK.into_response();
        let edge = edge_over(ok, calls.clone(), 3);
        let resp = edge.clone().oneshot(request(Some(1025))).await.unwrap();
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(resp.headers()[CONNECTION], "close");
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 0);
        let resp = edge.clone().oneshot(request(Some(1024))).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.headers().get(CONNECTION).is_none());
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        // A 413 from inside (a body without a length, cut off while read) closes it too.
        let too_large = || StatusCode::PAYLOAD_TOO_LARGE.into_response();
        let resp = edge_over(too_large, calls, 3)
            .oneshot(request(None))
            .await
            .unwrap();
        assert_eq!(resp.headers()[CONNECTION], "close");
    }

    #[tokio::test]
    async fn the_edge_throttles_an_address_after_repeated_401s() {
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let unauthorized = || StatusCode::UNAUTHORIZED.into_response();
        let edge = edge_over(unauthorized, calls.clone(), 2);
        for _ in 0..2 {
            let resp = edge.clone().oneshot(request(None)).await.unwrap();
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        }
        let resp = edge.clone().oneshot(request(None)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(resp.headers().contains_key(RETRY_AFTER));
        // The blocked request never reached the route.
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[test]
    fn the_edge_logs_a_5xx_cause_once_and_never_shows_it() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let failing = || ApiError::internal("disk on fire").into_response();
        let edge = edge_over(failing, calls, 3);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let resp = tracing::subscriber::with_default(subscriber, || {
            runtime.block_on(edge.oneshot(request(None))).unwrap()
        });
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = runtime
            .block_on(axum::body::to_bytes(resp.into_body(), 4096))
            .unwrap();
        assert!(!String::from_utf8_lossy(&body).contains("disk on fire"));
        let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert_eq!(log.matches("request failed").count(), 1, "{log}");
        assert!(log.contains("disk on fire"), "{log}");
        assert!(log.contains("/api/v1/anything"), "{log}");
    }
}
