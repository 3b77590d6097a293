//! The stand-in's own certificate authority and server certificate, made fresh at every start,
//! and the accept loop that serves the API over TLS (HTTP/2 or HTTP/1.1, as ALPN settles).

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// A CA and a server certificate it signed, ready for rustls.
pub struct ServerTls {
    /// The CA certificate in PEM, what a kubeconfig's `certificate-authority-data` carries.
    pub ca_pem: String,
    /// The server configuration with the certificate and ALPN `h2`, `http/1.1`.
    pub config: Arc<rustls::ServerConfig>,
}

/// Makes a CA and a server certificate whose subject alternative names are `ips` and
/// `dns_names`; panics only if the certificate library refuses a name (a test bug).
pub fn make_server_tls(ips: &[IpAddr], dns_names: &[String]) -> ServerTls {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())
        .expect("no subject alternative names cannot be invalid");
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "outpost kube-apiserver stand-in CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
    ];
    let ca_key = KeyPair::generate().expect("a key pair can be generated");
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .expect("the CA certificate can be signed");
    let issuer = Issuer::new(ca_params, ca_key);

    let mut params = CertificateParams::new(Vec::<String>::new())
        .expect("no subject alternative names cannot be invalid");
    params
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    params.subject_alt_names = ips.iter().map(|ip| SanType::IpAddress(*ip)).collect();
    for name in dns_names {
        let name = name
            .clone()
            .try_into()
            .unwrap_or_else(|e| panic!("{name:?} cannot be a DNS name in a certificate: {e}"));
        params.subject_alt_names.push(SanType::DnsName(name));
    }
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().expect("a key pair can be generated");
    let cert = params
        .signed_by(&key, &issuer)
        .expect("the server certificate can be signed");

    // Both rustls crypto providers are compiled into the workspace, so rustls cannot pick one
    // on its own: name it.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default protocol versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .expect("rustls accepts the generated certificate and key");
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    ServerTls {
        ca_pem: ca_cert.pem(),
        config: Arc::new(config),
    }
}

/// Accepts connections for ever, serving `app` over TLS on each; counts failed handshakes
/// (a client that distrusts the CA, or speaks plain HTTP) in `handshake_failures`.
///
/// Connections are tasks of a `JoinSet` owned by this future, so aborting the task that runs
/// it closes every connection, streaming watches included.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
    app: axum::Router,
    handshake_failures: Arc<AtomicUsize>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((tcp, _peer)) = accepted else { continue };
                let acceptor = acceptor.clone();
                let app = app.clone();
                let failures = handshake_failures.clone();
                connections.spawn(async move {
                    let tls = match acceptor.accept(tcp).await {
                        Ok(tls) => tls,
                        Err(_) => {
                            failures.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                    };
                    let service = TowerToHyperService::new(app);
                    // A client that hangs up mid-request is no failure of the stand-in.
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(tls), service)
                        .await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}
