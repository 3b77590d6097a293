//! The stand-in for the Entra ID / managed identity endpoints, which cannot run on a test machine.
//!
//! It speaks the real wire format of the two endpoints `azure_identity` calls:
//! - the App Service-style managed identity endpoint (plain HTTP on loopback, as on App Service),
//!   which `ManagedIdentityCredential` uses when `IDENTITY_ENDPOINT` and `IDENTITY_HEADER` are set:
//!   `GET {IDENTITY_ENDPOINT}?api-version=2019-08-01&resource=…[&client_id=…]` with the header
//!   `X-IDENTITY-HEADER`, answering `{access_token, expires_on, resource, token_type, client_id}`;
//! - the Entra ID token endpoint over HTTPS with its own CA ([`TestCa`]):
//!   `POST /{tenant}/oauth2/v2.0/token` with a `client_assertion` (workload identity) or a
//!   `client_secret`, answering `{token_type, expires_in, ext_expires_in, access_token}`.
//!
//! Every request is recorded; a switch makes both endpoints refuse with an Entra-style error body,
//! and the token lifetime is configurable. Tokens are minted by a replaceable closure (by default
//! opaque random strings), so a JWT minter can be plugged in.
//!
//! Tests must pass [`IdentityStandIn::env`] to every process that builds a managed identity
//! credential, so nothing ever falls back to the instance metadata address, and should assert
//! that the stand-in saw the request.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Form;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokio::net::TcpListener;

/// A certificate authority for test servers, with its certificate as PEM.
pub struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    /// A new CA called `name`.
    pub fn new(name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
            .expect("empty CA parameters are valid");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().expect("a key pair can be generated");
        let issuer =
            rcgen::CertifiedIssuer::self_signed(params, key).expect("the CA can sign itself");
        TestCa { issuer }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// Writes the CA certificate to `path` and returns the path.
    pub fn write_pem(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.pem()).expect("the CA file can be written");
        path.to_path_buf()
    }

    /// A rustls server configuration with a certificate for `hosts` (names or IP addresses)
    /// signed by this CA.
    pub fn server_config(&self, hosts: &[&str]) -> Arc<rustls::ServerConfig> {
        let key = rcgen::KeyPair::generate().expect("a key pair can be generated");
        let mut params =
            rcgen::CertificateParams::new(hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>())
                .expect("the host names are valid");
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            hosts.first().copied().unwrap_or("localhost"),
        );
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("the CA can sign a server certificate");
        let chain = vec![cert.der().clone(), self.issuer.der().clone()];
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("the default protocol versions are supported")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("the certificate and key match");
        Arc::new(config)
    }
}

/// An axum listener that hands out TLS connections; handshakes run concurrently, and one that
/// fails (a client that does not trust the CA, say) is dropped without disturbing the others.
pub struct TlsListener {
    addr: SocketAddr,
    rx: tokio::sync::mpsc::Receiver<(
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        SocketAddr,
    )>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    /// Starts accepting on `listener` with `config`.
    pub fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> TlsListener {
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, peer)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let handshake =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await;
                    if let Ok(Ok(tls)) = handshake {
                        let _ = tx.send((tls, peer)).await;
                    }
                });
            }
        });
        TlsListener { addr, rx, task }
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            // The accept task never ends while the listener lives.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

/// Serves `app` over HTTPS on `127.0.0.1:0` with a certificate from `ca` for `127.0.0.1` and
/// `localhost`; returns the address and the serving task.
pub async fn serve_https(
    app: axum::Router,
    ca: &TestCa,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let tcp = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a port on 127.0.0.1 can be bound");
    let listener = TlsListener::new(tcp, ca.server_config(&["127.0.0.1", "localhost"]));
    let addr = listener.addr;
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, task)
}

/// Which endpoint a token request reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// The App Service-style managed identity endpoint.
    ManagedIdentity,
    /// `POST /{tenant}/oauth2/v2.0/token`.
    Token,
}

/// One token request the stand-in answered.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    /// Which endpoint.
    pub endpoint: Endpoint,
    /// The tenant of the token endpoint's path.
    pub tenant: Option<String>,
    /// `client_id` of the query (managed identity) or form (token endpoint).
    pub client_id: Option<String>,
    /// `resource` (managed identity) or `scope` (token endpoint).
    pub audience: String,
    /// The `client_assertion` (workload identity), if any.
    pub client_assertion: Option<String>,
    /// Whether a `client_secret` was sent.
    pub client_secret: Option<String>,
    /// The HTTP status it was answered with.
    pub status: u16,
    /// The token handed out, if any.
    pub token: Option<String>,
}

/// How the endpoints refuse while [`IdentityStandIn::refuse`] is on.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// HTTP status (Entra ID answers 400 or 401 for most refusals).
    pub status: u16,
    /// The `error` field, e.g. `unauthorized_client`.
    pub error: String,
    /// The `error_description`, e.g. `AADSTS700016: …`.
    pub description: String,
    /// The `error_codes`.
    pub codes: Vec<i32>,
}

impl Default for Refusal {
    fn default() -> Self {
        Refusal {
            status: 400,
            error: "unauthorized_client".into(),
            description: "AADSTS700016: Application with identifier 'outpost-test' was not found in the directory 'test'.".into(),
            codes: vec![700016],
        }
    }
}

/// Makes a token for a request.
pub type Minter = Arc<dyn Fn(&TokenRequest) -> String + Send + Sync>;

struct Shared {
    header_secret: String,
    requests: Mutex<Vec<TokenRequest>>,
    refusal: Mutex<Option<Refusal>>,
    lifetime_secs: AtomicU64,
    minter: Mutex<Minter>,
    client_secret: Mutex<Option<String>>,
}

/// The identity stand-in: a managed identity endpoint (HTTP) and a token endpoint (HTTPS).
pub struct IdentityStandIn {
    shared: Arc<Shared>,
    mi_addr: SocketAddr,
    token_addr: SocketAddr,
    ca: TestCa,
    dir: tempfile::TempDir,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for IdentityStandIn {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn random_hex(bytes: usize) -> String {
    use rand::RngCore as _;
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

impl IdentityStandIn {
    /// Starts both endpoints on free loopback ports; tokens live an hour until
    /// [`IdentityStandIn::set_lifetime`] says otherwise.
    pub async fn start() -> IdentityStandIn {
        let minter: Minter = Arc::new(|_: &TokenRequest| format!("idt_{}", random_hex(24)));
        let shared = Arc::new(Shared {
            header_secret: random_hex(16),
            requests: Mutex::new(Vec::new()),
            refusal: Mutex::new(None),
            lifetime_secs: AtomicU64::new(3600),
            minter: Mutex::new(minter),
            client_secret: Mutex::new(None),
        });
        let mi_app = axum::Router::new()
            .route("/msi/token", axum::routing::get(managed_identity))
            .with_state(shared.clone());
        let mi = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port on 127.0.0.1 can be bound");
        let mi_addr = mi.local_addr().expect("a bound listener has an address");
        let mi_task = tokio::spawn(async move {
            let _ = axum::serve(mi, mi_app).await;
        });
        let token_app = axum::Router::new()
            .route(
                "/{tenant}/oauth2/v2.0/token",
                axum::routing::post(token_endpoint),
            )
            .with_state(shared.clone());
        let ca = TestCa::new("Outpost test identity CA");
        let (token_addr, token_task) = serve_https(token_app, &ca).await;
        let dir = tempfile::Builder::new()
            .prefix("outpost-identity-")
            .tempdir()
            .expect("a temporary directory can be created");
        ca.write_pem(&dir.path().join("identity-ca.pem"));
        IdentityStandIn {
            shared,
            mi_addr,
            token_addr,
            ca,
            dir,
            tasks: vec![mi_task, token_task],
        }
    }

    /// What `IDENTITY_ENDPOINT` must be.
    pub fn identity_endpoint(&self) -> String {
        format!("http://{}/msi/token", self.mi_addr)
    }

    /// What `IDENTITY_HEADER` must be.
    pub fn identity_header(&self) -> String {
        self.shared.header_secret.clone()
    }

    /// The environment that points `ManagedIdentityCredential` here (and never at the instance
    /// metadata address): `IDENTITY_ENDPOINT` and `IDENTITY_HEADER`.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("IDENTITY_ENDPOINT".into(), self.identity_endpoint()),
            ("IDENTITY_HEADER".into(), self.identity_header()),
        ]
    }

    /// The authority host of the token endpoint, e.g. `https://127.0.0.1:40123/`.
    pub fn authority_host(&self) -> String {
        format!("https://{}/", self.token_addr)
    }

    /// The CA of the token endpoint's certificate, PEM.
    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// A file holding [`IdentityStandIn::ca_pem`].
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("identity-ca.pem")
    }

    /// Every token request so far, oldest first.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many token requests came so far.
    pub fn count(&self) -> usize {
        self.requests().len()
    }

    /// How long tokens minted from now on live.
    pub fn set_lifetime(&self, lifetime: Duration) {
        self.shared
            .lifetime_secs
            .store(lifetime.as_secs(), Ordering::SeqCst);
    }

    /// Makes both endpoints refuse (`Some`) or answer again (`None`).
    pub fn refuse(&self, refusal: Option<Refusal>) {
        *self
            .shared
            .refusal
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = refusal;
    }

    /// Replaces the token minter.
    pub fn set_minter(&self, minter: Minter) {
        *self.shared.minter.lock().unwrap_or_else(|e| e.into_inner()) = minter;
    }

    /// Makes the token endpoint accept only this client secret (any by default).
    pub fn set_client_secret(&self, secret: Option<&str>) {
        *self
            .shared
            .client_secret
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = secret.map(str::to_string);
    }
}

fn aad_error(status: u16, error: &str, description: &str, codes: &[i32]) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    (
        status,
        axum::Json(json!({
            "error": error,
            "error_description": description,
            "error_codes": codes,
            "timestamp": chrono::Utc::now().format("%Y-%m-%d %H:%M:%SZ").to_string(),
            "trace_id": uuid::Uuid::now_v7().to_string(),
            "correlation_id": uuid::Uuid::now_v7().to_string(),
        })),
    )
        .into_response()
}

impl Shared {
    fn record(&self, mut req: TokenRequest, status: u16, token: Option<String>) {
        req.status = status;
        req.token = token;
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(req);
    }

    fn refusal(&self) -> Option<Refusal> {
        self.refusal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn mint(&self, req: &TokenRequest) -> String {
        let minter = self
            .minter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        minter(req)
    }
}

async fn managed_identity(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let req = TokenRequest {
        endpoint: Endpoint::ManagedIdentity,
        tenant: None,
        client_id: query.get("client_id").cloned(),
        audience: query.get("resource").cloned().unwrap_or_default(),
        client_assertion: None,
        client_secret: None,
        status: 0,
        token: None,
    };
    let header = headers
        .get("x-identity-header")
        .and_then(|v| v.to_str().ok());
    if header != Some(shared.header_secret.as_str()) {
        shared.record(req, 401, None);
        return aad_error(
            401,
            "invalid_request",
            "the X-IDENTITY-HEADER header is missing or wrong",
            &[],
        );
    }
    if query.get("api-version").map(String::as_str) != Some("2019-08-01") || req.audience.is_empty()
    {
        shared.record(req, 400, None);
        return aad_error(
            400,
            "invalid_request",
            "api-version 2019-08-01 and resource are required",
            &[],
        );
    }
    if let Some(r) = shared.refusal() {
        shared.record(req, r.status, None);
        return aad_error(r.status, &r.error, &r.description, &r.codes);
    }
    let token = shared.mint(&req);
    let lifetime = shared.lifetime_secs.load(Ordering::SeqCst) as i64;
    let expires_on = chrono::Utc::now().timestamp() + lifetime;
    let body = json!({
        "access_token": token,
        "expires_on": expires_on.to_string(),
        "resource": req.audience,
        "token_type": "Bearer",
        "client_id": req.client_id.clone().unwrap_or_else(|| "system-assigned".into()),
    });
    shared.record(req, 200, Some(token));
    axum::Json(body).into_response()
}

async fn token_endpoint(
    State(shared): State<Arc<Shared>>,
    UrlPath(tenant): UrlPath<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let req = TokenRequest {
        endpoint: Endpoint::Token,
        tenant: Some(tenant),
        client_id: form.get("client_id").cloned(),
        audience: form.get("scope").cloned().unwrap_or_default(),
        client_assertion: form.get("client_assertion").cloned(),
        client_secret: form.get("client_secret").cloned(),
        status: 0,
        token: None,
    };
    if form.get("grant_type").map(String::as_str) != Some("client_credentials")
        || req.client_id.is_none()
        || req.audience.is_empty()
        || (req.client_assertion.is_none() && req.client_secret.is_none())
    {
        shared.record(req, 400, None);
        return aad_error(
            400,
            "invalid_request",
            "AADSTS900144: The request body must contain grant_type=client_credentials, client_id, scope and a client_assertion or client_secret.",
            &[900144],
        );
    }
    if req.client_assertion.is_some()
        && form.get("client_assertion_type").map(String::as_str)
            != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    {
        shared.record(req, 400, None);
        return aad_error(
            400,
            "invalid_request",
            "AADSTS50027: client_assertion_type must be urn:ietf:params:oauth:client-assertion-type:jwt-bearer.",
            &[50027],
        );
    }
    let expected_secret = shared
        .client_secret
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if let (Some(expected), Some(sent)) = (&expected_secret, &req.client_secret)
        && expected != sent
    {
        shared.record(req, 401, None);
        return aad_error(
            401,
            "invalid_client",
            "AADSTS7000215: Invalid client secret provided.",
            &[7000215],
        );
    }
    if let Some(r) = shared.refusal() {
        shared.record(req, r.status, None);
        return aad_error(r.status, &r.error, &r.description, &r.codes);
    }
    let token = shared.mint(&req);
    let lifetime = shared.lifetime_secs.load(Ordering::SeqCst);
    let body = json!({
        "token_type": "Bearer",
        "expires_in": lifetime,
        "ext_expires_in": lifetime,
        "access_token": token,
    });
    shared.record(req, 200, Some(token));
    axum::Json(body).into_response()
}
