//! `outpost-runner kube-token --cluster NAME`: the exec credential plugin of the per-job
//! kubeconfig of an Entra ID cluster.
//!
//! `kubectl` and `helm` run it before talking to the API server, and again whenever the token they
//! hold has expired, so a job with a hundred `kubectl` steps runs it a hundred times.
//! The token is therefore cached per cluster in a file (mode 0600) and reused until
//! [`REFRESH_MARGIN`] before it expires; a lock file serialises concurrent invocations, so that
//! parallel steps or parallel jobs cost one token request, not one each.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use azure_core::credentials::{Secret, TokenCredential};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::clusters::{AKS_SCOPE, Auth, Cluster, EntraCluster};
use crate::settings::Settings;

/// A cached token is used only while it has at least this long to live, so that a `kubectl` call
/// never starts with a token that expires under it.
pub const REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);

/// The most one token request may take before `kube-token` gives up.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A token and when it expires.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedToken {
    /// What the token was obtained for (the cluster's auth settings); a change invalidates it.
    pub key: String,
    /// The bearer token.
    pub token: String,
    /// When Entra ID says it expires.
    pub expires_at: DateTime<Utc>,
}

impl std::fmt::Debug for CachedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedToken")
            .field("key", &self.key)
            .field("token", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// The directory of the token cache: `<config_dir>/tokens`.
pub fn cache_dir(config_dir: &Path) -> PathBuf {
    config_dir.join("tokens")
}

/// The `client.authentication.k8s.io/v1` `ExecCredential` that `kubectl` reads from the plugin.
pub fn exec_credential(token: &CachedToken) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "client.authentication.k8s.io/v1",
        "kind": "ExecCredential",
        "spec": { "interactive": false },
        "status": {
            "token": token.token,
            "expirationTimestamp": token.expires_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        },
    })
}

/// The cluster `name` of the runner in `config_dir`, which must be an Entra ID cluster.
pub fn entra_cluster(config_dir: &Path, name: &str) -> anyhow::Result<EntraCluster> {
    let settings = Settings::load(config_dir)?;
    let mut clusters = settings.resolved_clusters()?;
    match clusters.remove(name) {
        Some(Cluster::Entra(c)) => Ok(c),
        Some(Cluster::Kubeconfig { .. }) => anyhow::bail!(
            "cluster `{name}` uses a kubeconfig file; kube-token serves only clusters with `server` and `auth`"
        ),
        None => anyhow::bail!(
            "this runner has no cluster `{name}`: add `[clusters.{name}]` to {}",
            config_dir.join(crate::settings::SETTINGS_FILE).display()
        ),
    }
}

/// A token for `cluster` from the cache in `config_dir`, or from Entra ID when the cache holds
/// none that lives long enough.
pub async fn token(
    config_dir: &Path,
    name: &str,
    cluster: &EntraCluster,
) -> anyhow::Result<CachedToken> {
    let dir = cache_dir(config_dir);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("could not create the token cache {}", dir.display()))?;
    let lock_path = dir.join(format!("{name}.lock"));
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .with_context(|| format!("could not open the lock file {}", lock_path.display()))?;
    // The lock is held while a token is requested, so concurrent invocations wait for it and then
    // find it in the cache. It goes with the process, so a crashed plugin never blocks the next.
    let lock = tokio::task::spawn_blocking(move || lock.lock().map(|()| lock))
        .await
        .context("the lock task failed")?
        .with_context(|| format!("could not lock {}", lock_path.display()))?;
    let result = locked_token(&dir, name, cluster).await;
    drop(lock);
    result
}

async fn locked_token(
    dir: &Path,
    name: &str,
    cluster: &EntraCluster,
) -> anyhow::Result<CachedToken> {
    let path = dir.join(format!("{name}.json"));
    let key = format!("{:?}", cluster.auth);
    if let Ok(text) = std::fs::read(&path)
        && let Ok(cached) = serde_json::from_slice::<CachedToken>(&text)
        && cached.key == key
        && cached.expires_at > Utc::now() + REFRESH_MARGIN
    {
        return Ok(cached);
    }
    let credential = credential(&cluster.auth)?;
    let access = tokio::time::timeout(REQUEST_TIMEOUT, credential.get_token(&[AKS_SCOPE], None))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "no answer from the identity endpoint within {} s ({})",
                REQUEST_TIMEOUT.as_secs(),
                hint(&cluster.auth)
            )
        })?
        .map_err(|e| {
            anyhow::anyhow!(
                "could not get an Entra ID token with auth = \"{}\": {}\nHint: {}",
                cluster.auth.name(),
                crate::backoff::error_chain(&e),
                hint(&cluster.auth)
            )
        })?;
    let expires_at = DateTime::<Utc>::from_timestamp(access.expires_on.unix_timestamp(), 0)
        .context("the token's expiry is out of range")?;
    let token = CachedToken {
        key,
        token: access.token.secret().to_string(),
        expires_at,
    };
    // Written beside its final name and renamed, so a reader never sees half a file.
    let tmp = dir.join(format!(".{name}.json.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&serde_json::to_vec(&token).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    if let Err(e) = write() {
        // The token is still good for this call; only the next one pays for another request.
        eprintln!(
            "warning: could not cache the token in {}: {e}",
            path.display()
        );
    }
    Ok(token)
}

/// What to check when a token cannot be had, by auth method.
pub fn hint(auth: &Auth) -> &'static str {
    match auth {
        Auth::ManagedIdentity { client_id: None } => {
            "check that the VM or VMSS has a system-assigned managed identity and that it has a role on the cluster (e.g. Azure Kubernetes Service RBAC Writer)"
        }
        Auth::ManagedIdentity { client_id: Some(_) } => {
            "check that the user-assigned identity with this client_id is assigned to the VM or VMSS and has a role on the cluster"
        }
        Auth::WorkloadIdentity { .. } => {
            "check tenant_id, client_id, that the federated credential of the app trusts this token file's issuer and subject, and that the token file is fresh"
        }
        Auth::ClientSecret { .. } => {
            "check tenant_id, client_id and that the secret in secret_file is current (secrets expire)"
        }
        Auth::AzureCli { .. } => {
            "install the Azure CLI and run `az login` as the user the runner runs as, or use another auth method"
        }
    }
}

/// The `azure_identity` credential for `auth`.
pub fn credential(auth: &Auth) -> anyhow::Result<Arc<dyn TokenCredential>> {
    use azure_identity::*;
    let credential: Arc<dyn TokenCredential> = match auth {
        Auth::ManagedIdentity { client_id } => {
            ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
                user_assigned_id: client_id.clone().map(UserAssignedId::ClientId),
                client_options: base_client_options(),
            }))
            .context("could not set up the managed identity credential")?
        }
        Auth::WorkloadIdentity {
            tenant_id,
            client_id,
            token_file,
            authority_host,
            authority_ca_file,
        } => WorkloadIdentityCredential::new(Some(WorkloadIdentityCredentialOptions {
            credential_options: ClientAssertionCredentialOptions {
                client_options: client_options(authority_host, authority_ca_file.as_deref())?,
            },
            client_id: Some(client_id.clone()),
            tenant_id: Some(tenant_id.clone()),
            token_file_path: Some(token_file.clone()),
        }))
        .context("could not set up the workload identity credential")?,
        Auth::ClientSecret {
            tenant_id,
            client_id,
            secret_file,
            authority_host,
            authority_ca_file,
        } => {
            let secret = std::fs::read_to_string(secret_file).with_context(|| {
                format!(
                    "could not read the client secret from {}",
                    secret_file.display()
                )
            })?;
            ClientSecretCredential::new(
                tenant_id,
                client_id.clone(),
                Secret::new(secret.trim().to_string()),
                Some(ClientSecretCredentialOptions {
                    client_options: client_options(authority_host, authority_ca_file.as_deref())?,
                }),
            )
            .context("could not set up the client secret credential")?
        }
        Auth::AzureCli { tenant_id } => AzureCliCredential::new(Some(AzureCliCredentialOptions {
            tenant_id: tenant_id.clone(),
            ..Default::default()
        }))
        .context("could not set up the Azure CLI credential")?,
    };
    Ok(credential)
}

/// Client options with retries bounded to a few seconds: `kubectl` waits for the plugin, and an
/// error it can show beats a minute of silence (the SDK's default retries for up to a minute).
fn base_client_options() -> azure_core::http::ClientOptions {
    azure_core::http::ClientOptions {
        retry: azure_core::http::RetryOptions::exponential(
            azure_core::http::ExponentialRetryOptions {
                initial_delay: azure_core::time::Duration::milliseconds(200),
                max_retries: 3,
                max_total_elapsed: azure_core::time::Duration::seconds(15),
                max_delay: azure_core::time::Duration::seconds(5),
            },
        ),
        ..Default::default()
    }
}

/// Client options that send token requests to `authority_host`, trusting `ca_file` besides the
/// usual roots.
fn client_options(
    authority_host: &str,
    ca_file: Option<&Path>,
) -> anyhow::Result<azure_core::http::ClientOptions> {
    let mut custom = azure_core::cloud::CustomConfiguration::default();
    custom.authority_host = authority_host.to_string();
    let mut options = azure_core::http::ClientOptions {
        cloud: Some(Arc::new(custom.into())),
        ..base_client_options()
    };
    if let Some(ca_file) = ca_file {
        let pem = std::fs::read(ca_file).with_context(|| {
            format!("could not read the authority_ca_file {}", ca_file.display())
        })?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("the authority_ca_file {} is not PEM", ca_file.display()))?;
        // The same settings azure_core uses for its own client, with the extra roots.
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(20))
            .read_timeout(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::none())
            .tls_certs_merge(certs)
            .build()
            .context("could not set up the HTTP client for the authority host")?;
        options.transport = Some(azure_core::http::Transport::new(Arc::new(client)));
    }
    Ok(options)
}

/// Reads the cached token of cluster `name`, if any (for `doctor` and tests).
pub fn read_cached(config_dir: &Path, name: &str) -> Option<CachedToken> {
    let text = std::fs::read(cache_dir(config_dir).join(format!("{name}.json"))).ok()?;
    serde_json::from_slice(&text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exec_credential_has_the_v1_shape() {
        let t = CachedToken {
            key: "k".into(),
            token: "tok".into(),
            expires_at: DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
        };
        let v = exec_credential(&t);
        assert_eq!(v["apiVersion"], "client.authentication.k8s.io/v1");
        assert_eq!(v["kind"], "ExecCredential");
        assert_eq!(v["status"]["token"], "tok");
        assert_eq!(v["status"]["expirationTimestamp"], "2027-01-15T08:00:00Z");
        assert!(!format!("{t:?}").contains("tok\""));
    }
}
