//! Browser sessions: an encrypted, authenticated cookie that carries the API token, and the CSRF
//! token derived from it.
//!
//! The cookie is `XChaCha20-Poly1305(token, expiry)` under a key kept in
//! `<data_dir>/web-session.key` (made on first use, mode 0600), so a restarted server keeps its
//! sessions and the browser never sees the token. Every request re-validates the token with
//! `authenticate_api`, so revoking the token ends its sessions at once.
//! The CSRF token is an HMAC of the cookie value under the same key: forms send it in a hidden
//! field and the page's script in the `X-CSRF-Token` header.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The session cookie's name.
pub const COOKIE: &str = "outpost_session";
/// The header the page's script sends the CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a session lasts.
pub const SESSION_SECS: i64 = 12 * 3600;

const AAD: &[u8] = b"outpost-web-session-v1";

/// Keys by data dir, so that tests with several servers in one process each get their own.
fn keys() -> &'static Mutex<HashMap<PathBuf, [u8; 32]>> {
    static KEYS: OnceLock<Mutex<HashMap<PathBuf, [u8; 32]>>> = OnceLock::new();
    KEYS.get_or_init(Default::default)
}

/// The session key for `data_dir`, read from or written to `web-session.key`.
pub fn key(data_dir: &Path) -> std::io::Result<[u8; 32]> {
    let mut map = keys().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(k) = map.get(data_dir) {
        return Ok(*k);
    }
    let path = data_dir.join("web-session.key");
    let key = match std::fs::read(&path) {
        Ok(b) if b.len() == 32 => b.try_into().expect("32 bytes"),
        _ => {
            std::fs::create_dir_all(data_dir)?;
            let k: [u8; 32] = rand::random();
            write_private(&path, &k)?;
            k
        }
    };
    map.insert(data_dir.to_path_buf(), key);
    Ok(key)
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

/// Seals `token` into a cookie value that expires at `expires` (Unix seconds).
pub fn seal(key: &[u8; 32], token: &str, expires: i64) -> String {
    let cipher = XChaCha20Poly1305::new(&Key::from(*key));
    let nonce: [u8; 24] = rand::random();
    let mut msg = expires.to_be_bytes().to_vec();
    msg.extend_from_slice(token.as_bytes());
    let ct = cipher
        .encrypt(
            &XNonce::from(nonce),
            Payload {
                msg: &msg,
                aad: AAD,
            },
        )
        .expect("XChaCha20-Poly1305 encrypts any short message");
    let mut out = nonce.to_vec();
    out.extend_from_slice(&ct);
    URL_SAFE_NO_PAD.encode(out)
}

/// Opens a cookie value: the token, if the value is authentic and not expired at `now`.
pub fn open(key: &[u8; 32], value: &str, now: i64) -> Option<String> {
    let raw = URL_SAFE_NO_PAD.decode(value).ok()?;
    if raw.len() < 24 + 8 + 16 {
        return None;
    }
    let (nonce, ct) = raw.split_at(24);
    let nonce: [u8; 24] = nonce.try_into().ok()?;
    let cipher = XChaCha20Poly1305::new(&Key::from(*key));
    let msg = cipher
        .decrypt(&XNonce::from(nonce), Payload { msg: ct, aad: AAD })
        .ok()?;
    let (exp, token) = msg.split_at(8);
    let exp = i64::from_be_bytes(exp.try_into().ok()?);
    if exp <= now {
        return None;
    }
    String::from_utf8(token.to_vec()).ok()
}

/// The CSRF token for a session cookie value.
pub fn csrf(key: &[u8; 32], cookie_value: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
    mac.update(b"csrf:");
    mac.update(cookie_value.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Whether `given` is the CSRF token for `cookie_value`, compared in constant time.
pub fn csrf_ok(key: &[u8; 32], cookie_value: &str, given: &str) -> bool {
    let Ok(given) = hex::decode(given.trim()) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
    mac.update(b"csrf:");
    mac.update(cookie_value.as_bytes());
    mac.verify_slice(&given).is_ok()
}

/// The value of cookie `name` in a `Cookie` header map.
pub fn cookie<'a>(headers: &'a axum::http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// The current time in Unix seconds.
pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_and_opens_and_expires() {
        let k: [u8; 32] = rand::random();
        let v = seal(&k, "op_abc", 100);
        assert_eq!(open(&k, &v, 99).as_deref(), Some("op_abc"));
        assert_eq!(open(&k, &v, 100), None);
        let other: [u8; 32] = rand::random();
        assert_eq!(open(&other, &v, 1), None);
        let c = csrf(&k, &v);
        assert!(csrf_ok(&k, &v, &c));
        assert!(!csrf_ok(&k, "other", &c));
        assert!(!csrf_ok(&k, &v, "zz"));
    }
}
