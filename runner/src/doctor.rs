//! `outpost-runner doctor`: checks, step by step, that the runner can reach its server and each
//! of its clusters, and says in plain words what to fix when a step fails.
//!
//! Each target is checked in the order a connection is made (DNS, TCP, TLS, credentials, an
//! authenticated call), and a step is skipped when one it depends on failed, so the first failure
//! shown is the one to fix.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;

use crate::backoff::error_chain;
use crate::clusters::{AKS_SCOPE, Cluster, EntraCluster};
use crate::settings::{Credentials, Settings};

const DNS_TIMEOUT: Duration = Duration::from_secs(10);
const TCP_TIMEOUT: Duration = Duration::from_secs(5);
const HTTP_TIMEOUT: Duration = Duration::from_secs(15);

/// Prints the results as they come and counts the failures.
#[derive(Debug, Default)]
struct Report {
    failures: usize,
}

impl Report {
    fn section(&self, title: &str) {
        println!("\n{title}");
    }

    fn ok(&self, step: &str, what: &str) {
        println!("  ✔ {step}: {what}");
    }

    fn fail(&mut self, step: &str, what: &str, fix: &str) {
        self.failures += 1;
        println!("  ✘ {step}: {what}");
        println!("    Fix: {fix}");
    }

    fn skip(&self, step: &str, why: &str) {
        println!("  - {step}: skipped ({why})");
    }
}

/// Runs every check (only cluster `only`, if given, besides the server) and prints the results;
/// returns how many failed.
pub async fn run(config_dir: &Path, only: Option<&str>) -> anyhow::Result<usize> {
    run_checks(config_dir, only, true).await
}

/// Checks only the way to the server and that it accepts this runner's credentials: no cluster
/// and no identity endpoint is asked anything, so it is quick and cheap enough for a container
/// health check. Returns how many checks failed.
pub async fn run_server_only(config_dir: &Path) -> anyhow::Result<usize> {
    run_checks(config_dir, None, false).await
}

async fn run_checks(
    config_dir: &Path,
    only: Option<&str>,
    with_clusters: bool,
) -> anyhow::Result<usize> {
    let settings = Settings::load(config_dir)?;
    let clusters = settings.resolved_clusters()?;
    if let Some(name) = only {
        anyhow::ensure!(
            clusters.contains_key(name),
            "this runner has no cluster `{name}` in {}",
            config_dir.join(crate::settings::SETTINGS_FILE).display()
        );
    }
    let mut report = Report::default();
    println!(
        "outpost-runner {} doctor, config dir {}",
        outpost_protocol::VERSION,
        config_dir.display()
    );
    check_server(&mut report, config_dir, &settings).await;
    for (name, cluster) in &clusters {
        if !with_clusters || only.is_some_and(|o| o != name) {
            continue;
        }
        match cluster {
            Cluster::Entra(c) => check_entra_cluster(&mut report, name, c).await,
            Cluster::Kubeconfig { path, context } => {
                check_kubeconfig_cluster(&mut report, &settings, name, path, context.as_deref())
                    .await
            }
        }
    }
    if with_clusters && clusters.is_empty() {
        println!(
            "\nNo clusters are configured: add `[clusters.NAME]` to {} for jobs that name a cluster.",
            config_dir.join(crate::settings::SETTINGS_FILE).display()
        );
    }
    println!();
    if report.failures == 0 {
        println!("All checks passed.");
    } else {
        println!(
            "{} check{} failed: fix the first one shown first; the later ones often follow from it.",
            report.failures,
            if report.failures == 1 { "" } else { "s" }
        );
    }
    Ok(report.failures)
}

async fn check_server(report: &mut Report, config_dir: &Path, settings: &Settings) {
    let creds = match Credentials::load(config_dir) {
        Ok(c) => c,
        Err(e) => {
            report.section("Server");
            report.fail(
                "Credentials",
                &format!("{e:#}"),
                "register the runner with `outpost-runner register --server URL --token REGTOKEN`",
            );
            return;
        }
    };
    report.section(&format!("Server {}", creds.server_url));
    if let Err(e) = crate::agent::check_server_url(&creds.server_url, settings.allow_insecure_http)
    {
        report.fail(
            "URL",
            &format!("{e:#}"),
            "register again with an https:// server URL",
        );
        return;
    }
    if dns_and_tcp(report, &creds.server_url, false)
        .await
        .is_none()
    {
        return;
    }
    let http = match reqwest::Client::builder().timeout(HTTP_TIMEOUT).build() {
        Ok(h) => h,
        Err(e) => {
            report.fail("TLS", &error_chain(&e), "this is a bug: report it");
            return;
        }
    };
    let https = creds.server_url.starts_with("https://");
    match http
        .get(format!("{}/healthz", creds.server_url))
        .send()
        .await
    {
        Ok(resp) => report.ok(
            if https { "TLS" } else { "HTTP" },
            &if https {
                format!(
                    "the server's certificate is trusted (GET /healthz answered {})",
                    resp.status()
                )
            } else {
                format!(
                    "plain HTTP, no TLS (GET /healthz answered {})",
                    resp.status()
                )
            },
        ),
        Err(e) => {
            let chain = error_chain(&e);
            let fix = if is_certificate_error(&chain) {
                "the server's certificate is not trusted here: install the CA that signed it into this machine's trust store, or check whether a proxy intercepts TLS"
            } else {
                "the server accepted the connection but did not answer HTTP(S): check that the URL's scheme and port are the Outpost server's"
            };
            report.fail(if https { "TLS" } else { "HTTP" }, &chain, fix);
            return;
        }
    }
    let client =
        match outpost_protocol::Client::new(&creds.server_url, Some(creds.runner_token.clone())) {
            Ok(c) => c,
            Err(e) => {
                report.fail("Credentials", &error_chain(&e), "this is a bug: report it");
                return;
            }
        };
    match client.runner_me().await {
        Ok(me) => {
            report.ok(
                "Credentials",
                &format!(
                    "the server accepts this runner's token: runner {} ({}), labels {}",
                    me.name,
                    me.runner_id,
                    if me.labels.is_empty() {
                        "none".to_string()
                    } else {
                        me.labels.join(", ")
                    }
                ),
            );
            let missing: Vec<&String> = settings
                .clusters
                .keys()
                .filter(|n| !me.labels.contains(&crate::clusters::label(n)))
                .collect();
            if !missing.is_empty() {
                report.fail(
                    "Routing",
                    &format!(
                        "the server does not know that this runner has cluster {}, so it sends it no jobs for {}",
                        missing
                            .iter()
                            .map(|n| format!("`{n}`"))
                            .collect::<Vec<_>>()
                            .join(", "),
                        if missing.len() == 1 { "it" } else { "them" }
                    ),
                    "run `outpost-runner register` again: registration advertises the clusters in runner.toml",
                );
            }
        }
        Err(e) if matches!(e.status().map(|s| s.as_u16()), Some(401 | 403)) => report.fail(
            "Credentials",
            &format!("the server refused this runner's token: {}", error_chain(&e)),
            "the runner was removed on the server, or its database was replaced: register again with `outpost-runner register`",
        ),
        Err(e) => report.fail(
            "Credentials",
            &error_chain(&e),
            "the server could not check the runner's token; look at the server's log",
        ),
    }
}

/// Resolves the URL's host and connects to it; reports both steps and returns the addresses
/// when both worked; `private_dns_hint` adds the AKS private DNS zone advice.
async fn dns_and_tcp(
    report: &mut Report,
    url: &str,
    private_dns_hint: bool,
) -> Option<Vec<SocketAddr>> {
    let parsed = match reqwest::Url::parse(url) {
        Ok(u) => u,
        Err(e) => {
            report.fail(
                "URL",
                &format!("`{url}` is not a valid URL: {e}"),
                "correct it",
            );
            return None;
        }
    };
    let host = parsed
        .host_str()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = parsed.port_or_known_default().unwrap_or(443);
    let addrs: Vec<SocketAddr> = if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        report.ok(
            "DNS",
            &format!("{host} is an IP address, nothing to resolve"),
        );
        vec![SocketAddr::new(ip, port)]
    } else {
        match tokio::time::timeout(DNS_TIMEOUT, tokio::net::lookup_host((host.as_str(), port)))
            .await
        {
            Ok(Ok(found)) => {
                let found: Vec<SocketAddr> = found.collect();
                let shown: Vec<String> = found.iter().map(|a| a.ip().to_string()).collect();
                report.ok("DNS", &format!("{host} resolves to {}", shown.join(", ")));
                found
            }
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {} s", DNS_TIMEOUT.as_secs()),
                };
                let fix = if private_dns_hint {
                    private_dns_fix(&host)
                } else {
                    "check the host name, and that this machine's DNS servers (/etc/resolv.conf) can resolve it".to_string()
                };
                report.fail("DNS", &format!("{host} does not resolve: {why}"), &fix);
                report.skip("TCP", "the name did not resolve");
                return None;
            }
        }
    };
    let mut last = String::new();
    for addr in &addrs {
        match tokio::time::timeout(TCP_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(_)) => {
                report.ok("TCP", &format!("connected to {addr}"));
                return Some(addrs);
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                last = format!("{addr} refused the connection");
            }
            Ok(Err(e)) => last = format!("could not connect to {addr}: {e}"),
            Err(_) => last = format!("no answer from {addr} within {} s", TCP_TIMEOUT.as_secs()),
        }
    }
    let fix = if last.contains("refused") {
        format!("nothing listens on port {port} there: check the port, and that the service is up")
    } else {
        format!(
            "a firewall, network security group, route or missing vNet peering drops the traffic: this machine needs outbound TCP to port {port} of that address"
        )
    };
    report.fail("TCP", &last, &fix);
    None
}

/// The advice for an API server name that does not resolve: for a private AKS cluster this is
/// nearly always the private DNS zone not being linked to the runner's vNet.
fn private_dns_fix(host: &str) -> String {
    let zone = host
        .split_once(".privatelink.")
        .map(|(_, rest)| format!("privatelink.{rest}"))
        .unwrap_or_else(|| "privatelink.<region>.azmk8s.io".to_string());
    format!(
        "is the private DNS zone {zone} not linked to this vNet? A private AKS API server's name resolves only in networks linked to its zone: add a virtual network link from the zone to the runner's vNet (or a conditional forwarder to 168.63.129.16 if you run your own DNS), and check that `server` is the cluster's private FQDN (`az aks show --query privateFqdn`)"
    )
}

fn is_certificate_error(chain: &str) -> bool {
    let c = chain.to_ascii_lowercase();
    c.contains("certificate") || c.contains("unknownissuer") || c.contains("tls handshake")
}

async fn check_entra_cluster(report: &mut Report, name: &str, cluster: &EntraCluster) {
    report.section(&format!(
        "Cluster {name} ({}, auth = \"{}\")",
        cluster.server,
        cluster.auth.name()
    ));
    let reachable = dns_and_tcp(report, &cluster.server, true).await.is_some();
    let http = match cluster_http(cluster) {
        Ok(h) => Some(h),
        Err(e) => {
            report.fail(
                "TLS",
                &format!("{e:#}"),
                "`ca_file` must hold the PEM certificate of the cluster's CA (the base64-decoded certificate-authority-data of its kubeconfig)",
            );
            None
        }
    };
    let mut tls_ok = false;
    if let (true, Some(http)) = (reachable, &http) {
        match http.get(format!("{}/version", cluster.server)).send().await {
            Ok(_) => {
                tls_ok = true;
                report.ok(
                    "TLS",
                    &format!(
                        "the API server's certificate is signed by the CA in {}",
                        cluster.ca_file.display()
                    ),
                );
            }
            Err(e) => {
                let chain = error_chain(&e);
                let fix = if chain.to_ascii_lowercase().contains("notvalidforname")
                    || chain.contains("not valid for")
                {
                    "the certificate is not issued for this host name: use the cluster's own FQDN in `server` (`az aks show --query privateFqdn`), not an IP address or alias".to_string()
                } else if is_certificate_error(&chain) {
                    format!(
                        "ca_file {} does not match the API server's certificate: put the cluster's CA there (base64-decode certificate-authority-data from `az aks get-credentials`)",
                        cluster.ca_file.display()
                    )
                } else {
                    "the API server accepted the connection but the TLS handshake failed: check that `server` points at the API server's port".to_string()
                };
                report.fail("TLS", &chain, &fix);
            }
        }
    } else if http.is_some() {
        report.skip("TLS", "the API server could not be reached");
    }

    let token = match crate::kube_token::credential(&cluster.auth) {
        Err(e) => {
            report.fail(
                "Token",
                &format!("{e:#}"),
                crate::kube_token::hint(&cluster.auth),
            );
            None
        }
        Ok(credential) => {
            match tokio::time::timeout(
                crate::kube_token::REQUEST_TIMEOUT,
                credential.get_token(&[AKS_SCOPE], None),
            )
            .await
            {
                Ok(Ok(t)) => {
                    report.ok(
                        "Token",
                        &format!(
                            "got an Entra ID token for the AKS API ({}), valid for {} more minutes",
                            cluster.auth.name(),
                            (t.expires_on.unix_timestamp() - chrono::Utc::now().timestamp()) / 60
                        ),
                    );
                    Some(t.token.secret().to_string())
                }
                Ok(Err(e)) => {
                    report.fail(
                        "Token",
                        &format!(
                            "Entra ID gave no token: {}",
                            error_chain(&e).replace('\n', " ")
                        ),
                        crate::kube_token::hint(&cluster.auth),
                    );
                    None
                }
                Err(_) => {
                    report.fail(
                        "Token",
                        &format!(
                            "no answer from the identity endpoint within {} s",
                            crate::kube_token::REQUEST_TIMEOUT.as_secs()
                        ),
                        "check that this machine can reach the identity endpoint (169.254.169.254 for a VM's managed identity, the authority host otherwise)",
                    );
                    None
                }
            }
        }
    };

    match (tls_ok, token, &http) {
        (true, Some(token), Some(http)) => {
            match http
                .get(format!("{}/version", cluster.server))
                .bearer_auth(token)
                .send()
                .await
            {
                Ok(resp) if resp.status().is_success() => {
                    let version = resp
                        .json::<serde_json::Value>()
                        .await
                        .ok()
                        .and_then(|v| v["gitVersion"].as_str().map(str::to_string))
                        .unwrap_or_else(|| "an unknown version".into());
                    report.ok(
                        "API",
                        &format!("GET /version with the token answered: Kubernetes {version}"),
                    );
                }
                Ok(resp) if matches!(resp.status().as_u16(), 401 | 403) => report.fail(
                    "API",
                    &format!("the API server refused the token ({})", resp.status()),
                    "the identity got a token but has no access to the cluster: give it a role on the cluster (e.g. Azure Kubernetes Service RBAC Writer), and check that the cluster uses Entra ID integration",
                ),
                Ok(resp) => report.fail(
                    "API",
                    &format!("GET /version answered {}", resp.status()),
                    "check that `server` is the Kubernetes API server",
                ),
                Err(e) => report.fail(
                    "API",
                    &error_chain(&e),
                    "the API server stopped answering: run doctor again, and check its health in the Azure portal",
                ),
            }
        }
        _ => report.skip("API", "an earlier step failed"),
    }
}

/// An HTTP client that trusts only the cluster's CA, as `kubectl` will.
fn cluster_http(cluster: &EntraCluster) -> anyhow::Result<reqwest::Client> {
    let pem = std::fs::read(&cluster.ca_file)
        .with_context(|| format!("could not read ca_file {}", cluster.ca_file.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .with_context(|| format!("ca_file {} is not PEM", cluster.ca_file.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "ca_file {} holds no certificate",
        cluster.ca_file.display()
    );
    reqwest::Client::builder()
        .timeout(HTTP_TIMEOUT)
        .tls_certs_only(certs)
        .build()
        .context("could not set up an HTTP client with ca_file")
}

async fn check_kubeconfig_cluster(
    report: &mut Report,
    settings: &Settings,
    name: &str,
    path: &Path,
    context: Option<&str>,
) {
    report.section(&format!(
        "Cluster {name} (kubeconfig {}{})",
        path.display(),
        context
            .map(|c| format!(", context {c}"))
            .unwrap_or_default()
    ));
    let mut cmd = tokio::process::Command::new(&settings.kubectl);
    cmd.args(["version", "--output=json", "--request-timeout=15s"])
        .env("KUBECONFIG", path)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    if let Some(c) = context {
        cmd.args(["--context", c]);
    }
    match tokio::time::timeout(Duration::from_secs(60), cmd.output()).await {
        Ok(Ok(out)) if out.status.success() => report.ok(
            "API",
            "`kubectl version` reached the API server with this kubeconfig",
        ),
        Ok(Ok(out)) => report.fail(
            "API",
            &format!(
                "`kubectl version` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            "run `KUBECONFIG=<file> kubectl version` on this machine as the runner's user to see the details",
        ),
        Ok(Err(e)) => report.fail(
            "API",
            &format!("could not run `{}`: {e}", settings.kubectl.display()),
            "install kubectl, or set `kubectl` in runner.toml to its path",
        ),
        Err(_) => report.fail(
            "API",
            "`kubectl version` did not finish within 60 s",
            "check that the API server is reachable from this machine",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_private_dns_advice_names_the_zone() {
        let fix = private_dns_fix("aks-1a2b.privatelink.westeurope.azmk8s.io");
        assert!(fix.contains("privatelink.westeurope.azmk8s.io"), "{fix}");
        let fix = private_dns_fix("api.aks.invalid");
        assert!(fix.contains("privatelink.<region>.azmk8s.io"), "{fix}");
        assert!(fix.contains("not linked to this vNet"), "{fix}");
    }
}
