//! Runner registration with Entra ID: checks an access token a runner got from its managed
//! identity and maps its principal to a pool.
//!
//! The token is a JWT signed by the configured issuer. It is accepted only when all of these hold:
//! the algorithm is RS256; the signature verifies against a key the issuer publishes (its JWKS,
//! fetched with reqwest and cached); `iss` is exactly the configured issuer; `aud` is the configured
//! audience; `exp` and `nbf` hold within a small leeway; `tid` is the configured tenant; and the
//! principal (`oid`, else `sub`) is one of the configured principals.
//! The JWT work itself is `jsonwebtoken`'s; this module only decides which key and which claims.
//!
//! Keys are cached: fetched again when older than `jwks_max_age_secs`, and when a token names a
//! key id the cache does not hold (the issuer rotated its keys), at most once every
//! `jwks_min_refresh_secs`, so tokens with made-up key ids cannot make the server hammer the issuer.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokio::sync::Mutex;

use crate::settings::EntraSettings;

/// How long one fetch of the discovery document or the key set may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest discovery document or key set read (Entra's is a few KiB).
const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

/// Why a token was refused (or could not be checked).
#[derive(Debug, thiserror::Error)]
pub enum EntraError {
    /// Not a JWT at all.
    #[error("the token is not a well-formed JWT")]
    Malformed,
    /// Signed with something other than RS256.
    #[error("the token is signed with {0:?}; only RS256 tokens from the issuer are accepted")]
    Algorithm(Algorithm),
    /// No `kid` in the header.
    #[error("the token's header names no signing key (`kid`)")]
    NoKeyId,
    /// A key id the issuer does not publish.
    #[error("the token is signed with a key the issuer does not publish (kid {0:?})")]
    UnknownKey(String),
    /// The signature does not verify.
    #[error("the token's signature does not verify against the issuer's published key")]
    Signature,
    /// `exp` has passed.
    #[error("the token has expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("the token is not valid yet (its `nbf` is in the future)")]
    NotYetValid,
    /// `iss` is not the configured issuer.
    #[error("the token's issuer (`iss`) is not the one this server trusts")]
    Issuer,
    /// `aud` is not the configured audience.
    #[error(
        "the token's audience (`aud`) is not this server's: ask for a token for the audience `GET /api/v1/runner/registration-info` names"
    )]
    Audience,
    /// `tid` is missing or another tenant.
    #[error("the token comes from another tenant (`tid`) than the one this server trusts")]
    Tenant,
    /// A required claim is missing.
    #[error("the token has no `{0}` claim")]
    MissingClaim(String),
    /// A claim has the wrong type.
    #[error("the token's `{0}` claim is malformed")]
    BadClaim(String),
    /// The principal is not configured.
    #[error(
        "the principal {0} is not allowed to register runners: the server's admin must add it to [[entra.principals]]"
    )]
    PrincipalNotAllowed(String),
    /// The keys could not be fetched, so the token could not be checked.
    #[error("could not fetch the issuer's signing keys: {0}")]
    KeysUnavailable(String),
}

impl EntraError {
    /// Whether the fault is the server's (the issuer could not be reached), not the token's.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, EntraError::KeysUnavailable(_))
    }
}

/// The claims read from a token; everything else is left alone.
#[derive(Debug, Deserialize)]
struct Claims {
    tid: Option<String>,
    oid: Option<String>,
    sub: Option<String>,
    appid: Option<String>,
    azp: Option<String>,
}

/// A token that passed every check.
#[derive(Debug, Clone)]
pub struct EntraPrincipal {
    /// The principal's object id (`oid`, else `sub`).
    pub object_id: String,
    /// The client (application) id the token was issued to (`appid` or `azp`), for the logs.
    pub client_id: Option<String>,
    /// The pool it registers into.
    pub pool: String,
}

#[derive(Default)]
struct KeyCache {
    keys: HashMap<String, DecodingKey>,
    /// When the cached keys were fetched.
    fetched_at: Option<Instant>,
    /// When a fetch was last tried, whether or not it worked.
    tried_at: Option<Instant>,
}

/// The discovery document fields used here.
#[derive(Debug, Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

/// Checks Entra ID tokens for runner registration against the `[entra]` settings.
pub struct EntraVerifier {
    settings: EntraSettings,
    /// Object id (lower case) to pool.
    principals: HashMap<String, String>,
    http: reqwest::Client,
    /// Held across a fetch, so concurrent registrations cause one fetch, not many.
    cache: Mutex<KeyCache>,
}

impl std::fmt::Debug for EntraVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EntraVerifier")
            .field("issuer", &self.settings.issuer)
            .field("audience", &self.settings.audience)
            .finish_non_exhaustive()
    }
}

/// Whether `token` has the shape of a JWT (a header that decodes), as opposed to an Outpost
/// registration token, which never does.
pub fn looks_like_jwt(token: &str) -> bool {
    token.split('.').count() == 3 && jsonwebtoken::decode_header(token).is_ok()
}

impl EntraVerifier {
    /// A verifier for validated settings; fetches nothing until the first token.
    pub fn new(settings: EntraSettings) -> anyhow::Result<Self> {
        let principals = settings
            .principals
            .iter()
            .map(|p| {
                (
                    p.object_id.trim().to_ascii_lowercase(),
                    p.pool.trim().to_string(),
                )
            })
            .collect();
        let http = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            // The key URLs are configured, not taken from tokens; redirects are not expected and
            // would only widen where keys may come from.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| anyhow::anyhow!("could not set up the HTTP client for Entra ID: {e}"))?;
        Ok(Self {
            settings,
            principals,
            http,
            cache: Mutex::new(KeyCache::default()),
        })
    }

    /// The audience runners must ask tokens for.
    pub fn audience(&self) -> &str {
        &self.settings.audience
    }

    /// The tenant tokens must come from.
    pub fn tenant_id(&self) -> &str {
        &self.settings.tenant_id
    }

    /// Checks `token` and returns its principal and pool.
    pub async fn verify(&self, token: &str) -> Result<EntraPrincipal, EntraError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| EntraError::Malformed)?;
        if header.alg != Algorithm::RS256 {
            return Err(EntraError::Algorithm(header.alg));
        }
        let kid = header.kid.ok_or(EntraError::NoKeyId)?;
        let key = self.key(&kid).await?;

        let mut validation = Validation::new(Algorithm::RS256);
        validation.leeway = self.settings.leeway_secs;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_issuer(&[self.settings.issuer.trim()]);
        validation.set_audience(&[self.settings.audience.trim()]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data =
            jsonwebtoken::decode::<Claims>(token, &key, &validation).map_err(map_jwt_error)?;
        let claims = data.claims;

        let tenant = claims.tid.ok_or(EntraError::Tenant)?;
        if !tenant.eq_ignore_ascii_case(self.settings.tenant_id.trim()) {
            return Err(EntraError::Tenant);
        }
        let object_id = claims
            .oid
            .or(claims.sub)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| EntraError::MissingClaim("oid".into()))?;
        let pool = self
            .principals
            .get(&object_id.to_ascii_lowercase())
            .cloned()
            .ok_or_else(|| EntraError::PrincipalNotAllowed(object_id.clone()))?;
        Ok(EntraPrincipal {
            object_id,
            client_id: claims.appid.or(claims.azp),
            pool,
        })
    }

    /// The decoding key for `kid`, fetching the key set when it is stale or lacks `kid`.
    async fn key(&self, kid: &str) -> Result<DecodingKey, EntraError> {
        let mut cache = self.cache.lock().await;
        let max_age = Duration::from_secs(self.settings.jwks_max_age_secs);
        let min_refresh = Duration::from_secs(self.settings.jwks_min_refresh_secs);
        let stale = cache.fetched_at.is_none_or(|at| at.elapsed() >= max_age);
        let unknown = !cache.keys.contains_key(kid);
        let may_fetch = cache.tried_at.is_none_or(|at| at.elapsed() >= min_refresh);
        if (stale || unknown) && may_fetch {
            cache.tried_at = Some(Instant::now());
            match self.fetch_keys().await {
                Ok(keys) => {
                    tracing::info!(
                        keys = keys.len(),
                        kids = ?keys.keys().collect::<Vec<_>>(),
                        "fetched the Entra ID signing keys"
                    );
                    cache.keys = keys;
                    cache.fetched_at = Some(Instant::now());
                }
                // Stale keys still verify tokens signed before the outage; only an empty cache
                // makes this the caller's error.
                Err(e) if cache.keys.is_empty() => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "could not refresh the Entra ID signing keys; using the cached ones");
                }
            }
        } else if cache.keys.is_empty() {
            return Err(EntraError::KeysUnavailable(
                "the last attempt failed; the server tries again shortly".into(),
            ));
        }
        cache
            .keys
            .get(kid)
            .cloned()
            .ok_or_else(|| EntraError::UnknownKey(kid.to_string()))
    }

    /// The RS256-capable RSA keys of the issuer, by key id.
    async fn fetch_keys(&self) -> Result<HashMap<String, DecodingKey>, EntraError> {
        let jwks_url = match &self.settings.jwks_url {
            Some(url) => url.trim().to_string(),
            None => self.discover().await?,
        };
        let set: JwkSet = self.get_json(&jwks_url).await?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = jwk.common.key_id.clone() else {
                continue;
            };
            // Entra's keys carry no `alg`; one that names another algorithm is not for RS256.
            if !matches!(jwk.algorithm, AlgorithmParameters::RSA(_))
                || jwk
                    .common
                    .key_algorithm
                    .is_some_and(|a| a != KeyAlgorithm::RS256)
            {
                continue;
            }
            match DecodingKey::from_jwk(jwk) {
                Ok(key) => {
                    keys.insert(kid, key);
                }
                Err(e) => {
                    tracing::warn!(kid, error = %e, "skipping a signing key that does not parse")
                }
            }
        }
        if keys.is_empty() {
            return Err(EntraError::KeysUnavailable(format!(
                "{jwks_url} lists no RSA signing keys"
            )));
        }
        Ok(keys)
    }

    /// The `jwks_uri` of the issuer's OpenID Connect discovery document.
    async fn discover(&self) -> Result<String, EntraError> {
        let issuer = self.settings.issuer.trim();
        let url = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        );
        let doc: Discovery = self.get_json(&url).await?;
        if doc.issuer != issuer {
            return Err(EntraError::KeysUnavailable(format!(
                "{url} names the issuer {:?}, not the configured {issuer:?}: set entra.issuer to the issuer the tokens carry, or entra.jwks_url",
                doc.issuer
            )));
        }
        Ok(doc.jwks_uri)
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, EntraError> {
        let unavailable = |why: String| EntraError::KeysUnavailable(format!("{url}: {why}"));
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| unavailable(error_chain(&e)))?;
        if !resp.status().is_success() {
            return Err(unavailable(format!("answered {}", resp.status())));
        }
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_DOCUMENT_BYTES as u64)
        {
            return Err(unavailable("the document is too large".into()));
        }
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| unavailable(error_chain(&e)))?;
        if bytes.len() > MAX_DOCUMENT_BYTES {
            return Err(unavailable("the document is too large".into()));
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| unavailable(format!("not the expected JSON: {e}")))
    }
}

fn map_jwt_error(e: jsonwebtoken::errors::Error) -> EntraError {
    use jsonwebtoken::errors::ErrorKind;
    match e.into_kind() {
        ErrorKind::InvalidSignature => EntraError::Signature,
        ErrorKind::ExpiredSignature => EntraError::Expired,
        ErrorKind::ImmatureSignature => EntraError::NotYetValid,
        ErrorKind::InvalidIssuer => EntraError::Issuer,
        ErrorKind::InvalidAudience => EntraError::Audience,
        ErrorKind::InvalidAlgorithm => EntraError::Signature,
        ErrorKind::MissingRequiredClaim(c) => EntraError::MissingClaim(c),
        ErrorKind::InvalidClaimFormat(c) => EntraError::BadClaim(c),
        _ => EntraError::Malformed,
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_tokens_are_not_taken_for_jwts() {
        let token = crate::store::new_token("opr_");
        assert!(!looks_like_jwt(&token));
        assert!(!looks_like_jwt("a.b.c"));
        // A real JWT header ({"alg":"RS256","kid":"k1","typ":"JWT"}) with any payload and signature.
        assert!(looks_like_jwt(
            "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIiwidHlwIjoiSldUIn0.e30.c2ln"
        ));
    }
}
