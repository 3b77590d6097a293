//! The stand-in for Entra ID as a token issuer, which cannot run on a test machine: an OpenID
//! Connect issuer with its JWKS, and a minter of signed tokens.
//!
//! It listens on `127.0.0.1`, plain HTTP (the server allows `http` key URLs on loopback only),
//! and speaks the real wire formats:
//! - `GET /<tenant>/v2.0/.well-known/openid-configuration`: the discovery document, whose
//!   `issuer` is [`EntraStandIn::issuer`] and whose `jwks_uri` is [`EntraStandIn::jwks_url`];
//! - `GET /<tenant>/discovery/v2.0/keys`: the published RSA keys (`kty`, `use`, `kid`, `n`, `e`,
//!   no `alg`, as Entra publishes them).
//!
//! The managed identity endpoint a runner gets its token from is `identity.rs`'s
//! [`IdentityStandIn`](crate::identity::IdentityStandIn); [`EntraStandIn::managed_identity_minter`]
//! plugs in here through its `set_minter`, so that endpoint hands out tokens this issuer signed.
//!
//! Tokens are minted with `jsonwebtoken` (RS256) from [`Claims`] the test chooses, so every
//! check the server makes can be made to fail on purpose: [`EntraStandIn::mint_forged`] signs
//! with a key that is not published, and [`EntraStandIn::rotate_keys`] publishes a new key (new
//! `kid`) and signs with it from then on.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use axum::Json;
use axum::extract::State;
use axum::routing::get;
use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;
use serde_json::json;
use uuid::Uuid;

use crate::identity::{Minter, TokenRequest};

/// How many RSA keys a test process generates: the first signing key, the ones rotations bring
/// in, and the forger's.
const KEY_POOL: usize = 4;

/// RSA private keys (PKCS#1 DER), generated once per test process: key generation is slow in a
/// debug build, and a key is only key material here; each stand-in gives the keys fresh `kid`s.
fn key_pool() -> &'static [Vec<u8>] {
    static KEYS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    KEYS.get_or_init(|| {
        let threads: Vec<_> = (0..KEY_POOL)
            .map(|_| {
                std::thread::spawn(|| {
                    use rsa::Generate as _;
                    use rsa::pkcs1::EncodeRsaPrivateKey as _;
                    let key = rsa::PrivateKey::generate();
                    key.to_pkcs1_der()
                        .expect("a fresh RSA key encodes as PKCS#1")
                        .as_bytes()
                        .to_vec()
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("RSA key generation does not panic"))
            .collect()
    })
}

/// The last pool key is the forger's: never published by any stand-in.
fn forger_key() -> EncodingKey {
    EncodingKey::from_rsa_der(&key_pool()[KEY_POOL - 1])
}

/// The claims of a minted token; `None` leaves a claim out.
#[derive(Debug, Clone, Serialize)]
pub struct Claims {
    /// Issuer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Audience.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    /// Tenant id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tid: Option<String>,
    /// The principal's object id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oid: Option<String>,
    /// Subject (for an app-only token, the object id again).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// Client (application) id, v1 tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub appid: Option<String>,
    /// Client (application) id, v2 tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub azp: Option<String>,
    /// Issued at, seconds since the epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    /// Not before, seconds since the epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    /// Expiry, seconds since the epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
    /// Token version, as Entra writes it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ver: Option<String>,
}

/// Seconds since the epoch, now.
pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

struct SigningKey {
    kid: String,
    key: EncodingKey,
    jwk: Jwk,
}

struct Inner {
    tenant_id: String,
    issuer: String,
    /// Published keys; the last one signs.
    keys: Mutex<Vec<SigningKey>>,
    /// Pool keys used so far (index of the next one).
    next_pool_key: AtomicUsize,
    jwks_fetches: AtomicUsize,
    discovery_fetches: AtomicUsize,
    system_object_id: String,
    /// User-assigned identities: client id to object id.
    user_assigned: Mutex<HashMap<String, String>>,
}

/// A running Entra ID stand-in for one test.
pub struct EntraStandIn {
    addr: SocketAddr,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl EntraStandIn {
    /// Starts it on a free port with a fresh tenant, one published signing key, and a
    /// system-assigned managed identity with a fresh object id.
    pub async fn start() -> EntraStandIn {
        let pool = tokio::task::spawn_blocking(key_pool)
            .await
            .expect("RSA key generation does not panic");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port on 127.0.0.1 can be bound");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let tenant_id = Uuid::now_v7().to_string();
        let issuer = format!("http://{addr}/{tenant_id}/v2.0");
        let inner = Arc::new(Inner {
            tenant_id: tenant_id.clone(),
            issuer,
            keys: Mutex::new(vec![signing_key(&pool[0])]),
            next_pool_key: AtomicUsize::new(1),
            jwks_fetches: AtomicUsize::new(0),
            discovery_fetches: AtomicUsize::new(0),
            system_object_id: Uuid::now_v7().to_string(),
            user_assigned: Mutex::new(HashMap::new()),
        });
        let app = axum::Router::new()
            .route(
                &format!("/{tenant_id}/v2.0/.well-known/openid-configuration"),
                get(discovery),
            )
            .route(&format!("/{tenant_id}/discovery/v2.0/keys"), get(jwks))
            .with_state(inner.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        EntraStandIn { addr, inner, task }
    }

    /// The tenant (directory) id.
    pub fn tenant_id(&self) -> &str {
        &self.inner.tenant_id
    }

    /// The issuer, `http://127.0.0.1:PORT/<tenant>/v2.0`; discovery is below it.
    pub fn issuer(&self) -> &str {
        &self.inner.issuer
    }

    /// The JWKS URL the discovery document names.
    pub fn jwks_url(&self) -> String {
        format!(
            "http://{}/{}/discovery/v2.0/keys",
            self.addr,
            self.tenant_id()
        )
    }

    /// How many times the key set was fetched.
    pub fn jwks_fetches(&self) -> usize {
        self.inner.jwks_fetches.load(Ordering::SeqCst)
    }

    /// How many times the discovery document was fetched.
    pub fn discovery_fetches(&self) -> usize {
        self.inner.discovery_fetches.load(Ordering::SeqCst)
    }

    /// The `kid` tokens are signed with now.
    pub fn current_kid(&self) -> String {
        let keys = self.inner.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.last().expect("a key is always published").kid.clone()
    }

    /// Publishes a new key with a new `kid` and signs with it from now on; the old keys stay
    /// published, as Entra keeps them during a rotation. Returns the new `kid`.
    pub fn rotate_keys(&self) -> String {
        let index = self.inner.next_pool_key.fetch_add(1, Ordering::SeqCst);
        assert!(
            index < KEY_POOL - 1,
            "the stand-in has keys for {} rotations",
            KEY_POOL - 2
        );
        let key = signing_key(&key_pool()[index]);
        let kid = key.kid.clone();
        self.inner
            .keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(key);
        kid
    }

    /// Claims that pass every check of a server configured for this stand-in with `audience`,
    /// for the principal `object_id`: valid from a minute ago for an hour.
    pub fn claims(&self, audience: &str, object_id: &str) -> Claims {
        let now = now();
        Claims {
            iss: Some(self.issuer().to_string()),
            aud: Some(audience.to_string()),
            tid: Some(self.tenant_id().to_string()),
            oid: Some(object_id.to_string()),
            sub: Some(object_id.to_string()),
            appid: Some(Uuid::now_v7().to_string()),
            azp: None,
            iat: Some(now - 60),
            nbf: Some(now - 60),
            exp: Some(now + 3600),
            ver: Some("2.0".into()),
        }
    }

    /// A token with `claims`, signed RS256 with the current published key.
    pub fn mint(&self, claims: &Claims) -> String {
        let keys = self.inner.keys.lock().unwrap_or_else(|e| e.into_inner());
        let key = keys.last().expect("a key is always published");
        sign(claims, &key.kid, &key.key)
    }

    /// A token with `claims` whose header names the current `kid` but whose signature is made
    /// with a key the stand-in never published: a forgery.
    pub fn mint_forged(&self, claims: &Claims) -> String {
        sign(claims, &self.current_kid(), &forger_key())
    }

    /// A token with `claims` signed by a key that is not published, under a `kid` nobody
    /// published either.
    pub fn mint_with_unknown_kid(&self, claims: &Claims) -> String {
        sign(
            claims,
            &format!("unknown-{}", Uuid::now_v7().simple()),
            &forger_key(),
        )
    }

    /// The object id of the system-assigned managed identity.
    pub fn system_assigned_object_id(&self) -> &str {
        &self.inner.system_object_id
    }

    /// Adds a user-assigned managed identity; returns its `(client_id, object_id)`.
    pub fn add_user_assigned_identity(&self) -> (String, String) {
        let client_id = Uuid::now_v7().to_string();
        let object_id = Uuid::now_v7().to_string();
        self.inner
            .user_assigned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(client_id.clone(), object_id.clone());
        (client_id, object_id)
    }

    /// A minter for [`IdentityStandIn::set_minter`](crate::identity::IdentityStandIn::set_minter)
    /// that makes its managed identity endpoint hand out tokens signed here: a v1 token for the
    /// resource asked for, whose object id is the system-assigned identity's, or with a
    /// `client_id` the user-assigned identity's (a client id never added gets an object id of its
    /// own, which no server lists).
    pub fn managed_identity_minter(&self) -> Minter {
        let inner = self.inner.clone();
        Arc::new(move |req: &TokenRequest| managed_identity_token(&inner, req))
    }
}

impl Drop for EntraStandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn signing_key(der: &[u8]) -> SigningKey {
    let key = EncodingKey::from_rsa_der(der);
    let kid = format!("k-{}", Uuid::now_v7().simple());
    let mut jwk =
        Jwk::from_encoding_key(&key, Algorithm::RS256).expect("an RSA key has a public JWK");
    jwk.common.key_id = Some(kid.clone());
    jwk.common.public_key_use = Some(PublicKeyUse::Signature);
    // Entra's published keys carry no `alg`.
    jwk.common.key_algorithm = None;
    SigningKey { kid, key, jwk }
}

fn sign(claims: &Claims, kid: &str, key: &EncodingKey) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.to_string());
    jsonwebtoken::encode(&header, claims, key).expect("RS256 signing works")
}

async fn discovery(State(inner): State<Arc<Inner>>) -> Json<serde_json::Value> {
    inner.discovery_fetches.fetch_add(1, Ordering::SeqCst);
    let base = inner
        .issuer
        .strip_suffix("/v2.0")
        .expect("the issuer ends in /v2.0");
    Json(json!({
        "issuer": inner.issuer,
        "jwks_uri": format!("{base}/discovery/v2.0/keys"),
        "authorization_endpoint": format!("{base}/oauth2/v2.0/authorize"),
        "token_endpoint": format!("{base}/oauth2/v2.0/token"),
        "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
        "subject_types_supported": ["pairwise"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "tenant_region_scope": "EU",
    }))
}

async fn jwks(State(inner): State<Arc<Inner>>) -> Json<JwkSet> {
    inner.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    let keys = inner.keys.lock().unwrap_or_else(|e| e.into_inner());
    Json(JwkSet {
        keys: keys.iter().map(|k| k.jwk.clone()).collect(),
    })
}

/// The token a managed identity gets for `req`.
fn managed_identity_token(inner: &Inner, req: &TokenRequest) -> String {
    let object_id = match &req.client_id {
        None => inner.system_object_id.clone(),
        Some(id) => inner
            .user_assigned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .unwrap_or_else(|| Uuid::now_v7().to_string()),
    };
    let now = now();
    let app_id = req
        .client_id
        .clone()
        .unwrap_or_else(|| format!("sys-{}", &object_id[..8]));
    // A managed identity's token is a v1 token whose audience is the resource as asked.
    let claims = Claims {
        iss: Some(inner.issuer.clone()),
        aud: Some(req.audience.clone()),
        tid: Some(inner.tenant_id.clone()),
        oid: Some(object_id.clone()),
        sub: Some(object_id),
        appid: Some(app_id),
        azp: None,
        iat: Some(now - 5),
        nbf: Some(now - 5),
        exp: Some(now + 3600),
        ver: Some("1.0".into()),
    };
    let keys = inner.keys.lock().unwrap_or_else(|e| e.into_inner());
    let key = keys.last().expect("a key is always published");
    sign(&claims, &key.kid, &key.key)
}
