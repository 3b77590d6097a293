//! Request guards that sit in front of every route: the body size backstop and the throttling of
//! repeated failed authentication per client address.
//!
//! Both are middleware rather than handler code, so a route added later is covered without
//! anyone remembering to.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::{AUTHORIZATION, CONNECTION, CONTENT_LENGTH, COOKIE, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::error::ApiError;
use crate::settings::ServerSettings;

/// Answers `413` at once when the declared `Content-Length` is above `limit`, before any handler
/// or extractor runs. Bodies without a length are cut off by the `RequestBodyLimitLayer` under
/// this middleware.
pub async fn declared_body_limit(State(limit): State<usize>, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let mut resp = if declared.is_some_and(|n| n > limit as u64) {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "the request body is larger than the server accepts (server.max_body_bytes)",
        )
        .into_response()
    } else {
        next.run(req).await
    };
    if resp.status() == StatusCode::PAYLOAD_TOO_LARGE {
        // The rest of the body was never read, so the connection cannot carry another request:
        // say so, or a client that pools it sends its next request into a closing connection
        // (and gets "connection closed before message completed" instead of an answer).
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

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

/// The middleware applying [`AuthThrottle`].
pub async fn throttle_failed_auth(
    State(throttle): State<Arc<AuthThrottle>>,
    req: Request,
    next: Next,
) -> Response {
    // Without the peer address (handler tests with `oneshot`) there is nothing to key on.
    let Some(ip) = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .filter(|ip| throttle.applies_to(*ip))
    else {
        return next.run(req).await;
    };
    let credential = credential(req.headers());
    if let Some(wait) = throttle.blocked(ip, credential.as_ref(), Instant::now()) {
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
    let resp = next.run(req).await;
    let status = resp.status();
    if status == StatusCode::UNAUTHORIZED {
        throttle.record_failure(ip, Instant::now());
    } else if let Some(c) = credential
        && (status.is_success() || status == StatusCode::FORBIDDEN)
    {
        // The credential authenticated (a 403 is a valid token lacking a scope).
        throttle.record_success(ip, c, Instant::now());
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
}
