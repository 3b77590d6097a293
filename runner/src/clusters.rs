//! Clusters this runner deploys to (`[clusters.NAME]` in `runner.toml`) and the per-job
//! kubeconfig that points `kubectl` and `helm` at one of them.
//!
//! A cluster is either a kubeconfig file the operator already has (optionally one context of it),
//! or an AKS API server URL with its CA and an Entra ID identity.
//! For the latter the per-job kubeconfig's user is the exec credential plugin
//! `outpost-runner kube-token --cluster NAME`, so no token is ever written into a job's files.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// The Entra ID scope of the AKS API server application, the same in every tenant.
pub const AKS_SCOPE: &str = "6dae42f8-4368-4678-94ff-3960e28e3630/.default";

/// The public cloud's authority host, used when neither the config nor `AZURE_AUTHORITY_HOST` names
/// one.
pub const PUBLIC_AUTHORITY_HOST: &str = "https://login.microsoftonline.com/";

/// The auth methods `auth = "…"` accepts.
pub const AUTH_METHODS: &str =
    "\"managed_identity\", \"workload_identity\", \"client_secret\" or \"azure_cli\"";

/// One `[clusters.NAME]` table of `runner.toml` as written; [`Cluster::resolve`] checks it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClusterSettings {
    /// A kubeconfig file to use as it is (relative paths are taken from the config dir).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<PathBuf>,
    /// The context of `kubeconfig` to use; default: its current context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// The API server URL, e.g. `https://aks-prod-1a2b3c.privatelink.westeurope.azmk8s.io:443`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// PEM file of the CA that signed the API server's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// How to get an Entra ID token: one of [`AUTH_METHODS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<String>,
    /// Client id of a user-assigned managed identity, or of the app registration for workload
    /// identity and client secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// The Entra ID tenant (workload identity, client secret, optionally Azure CLI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    /// The federated token file of workload identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// A file holding the client secret (never the secret itself in `runner.toml`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// The Entra ID authority host for workload identity and client secret, e.g. for a sovereign
    /// cloud; default: `AZURE_AUTHORITY_HOST`, else the public cloud.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority_host: Option<String>,
    /// An extra CA (PEM) to trust for the authority host, e.g. of a TLS-inspecting proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority_ca_file: Option<PathBuf>,
}

/// A checked cluster configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cluster {
    /// Use an existing kubeconfig.
    Kubeconfig {
        /// The file (absolute).
        path: PathBuf,
        /// The context to use, else the file's current context.
        context: Option<String>,
    },
    /// An API server reached with an Entra ID token.
    Entra(EntraCluster),
}

/// An API server reached with an Entra ID token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntraCluster {
    /// The API server URL (https).
    pub server: String,
    /// The CA of the API server's certificate (absolute path).
    pub ca_file: PathBuf,
    /// Where the token comes from.
    pub auth: Auth,
}

/// Where an Entra ID cluster's token comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// The machine's managed identity (IMDS, or `IDENTITY_ENDPOINT` + `IDENTITY_HEADER`).
    ManagedIdentity {
        /// A user-assigned identity's client id; `None` is the system-assigned identity.
        client_id: Option<String>,
    },
    /// Workload identity: a federated token file exchanged for an Entra ID token.
    WorkloadIdentity {
        /// The tenant.
        tenant_id: String,
        /// The app registration or user-assigned identity.
        client_id: String,
        /// The federated token file (absolute).
        token_file: PathBuf,
        /// The authority host (https).
        authority_host: String,
        /// An extra CA to trust for the authority host.
        authority_ca_file: Option<PathBuf>,
    },
    /// An app registration's client secret, read from a file.
    ClientSecret {
        /// The tenant.
        tenant_id: String,
        /// The app registration.
        client_id: String,
        /// The file holding the secret (absolute).
        secret_file: PathBuf,
        /// The authority host (https).
        authority_host: String,
        /// An extra CA to trust for the authority host.
        authority_ca_file: Option<PathBuf>,
    },
    /// Whoever is logged in with `az login` on this machine.
    AzureCli {
        /// The tenant to ask for, else the CLI's default.
        tenant_id: Option<String>,
    },
}

impl Auth {
    /// The name used in `runner.toml`.
    pub fn name(&self) -> &'static str {
        match self {
            Auth::ManagedIdentity { .. } => "managed_identity",
            Auth::WorkloadIdentity { .. } => "workload_identity",
            Auth::ClientSecret { .. } => "client_secret",
            Auth::AzureCli { .. } => "azure_cli",
        }
    }
}

/// Whether `name` may name a cluster: it becomes the runner label `cluster:NAME`.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The label a runner with cluster `name` carries, and a job naming it requires.
pub fn label(name: &str) -> String {
    format!("cluster:{name}")
}

impl Cluster {
    /// Checks one `[clusters.NAME]` table; relative paths are taken from `config_dir`, and `env`
    /// supplies the `AZURE_*` defaults that AKS workload identity injects.
    pub fn resolve(
        name: &str,
        raw: &ClusterSettings,
        config_dir: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Cluster> {
        let at = |p: &Path| config_dir.join(p);
        let env = |k: &str| env(k).filter(|v| !v.trim().is_empty());
        anyhow::ensure!(
            is_valid_name(name),
            "`{name}` is not a valid cluster name: use 1 to 63 letters, digits, `-`, `_` or `.`"
        );
        let entra_fields = [
            ("ca_file", raw.ca_file.is_some()),
            ("auth", raw.auth.is_some()),
            ("client_id", raw.client_id.is_some()),
            ("tenant_id", raw.tenant_id.is_some()),
            ("token_file", raw.token_file.is_some()),
            ("secret_file", raw.secret_file.is_some()),
            ("authority_host", raw.authority_host.is_some()),
            ("authority_ca_file", raw.authority_ca_file.is_some()),
        ];
        match (&raw.kubeconfig, &raw.server) {
            (Some(_), Some(_)) => anyhow::bail!("set either `kubeconfig` or `server`, not both"),
            (None, None) => anyhow::bail!(
                "set either `kubeconfig = \"PATH\"` (and optionally `context`), or `server = \"https://…\"` with `ca_file` and `auth` ({AUTH_METHODS})"
            ),
            (Some(path), None) => {
                if let Some((field, _)) = entra_fields.iter().find(|(_, set)| *set) {
                    anyhow::bail!(
                        "`{field}` applies only to clusters given by `server`, not to a `kubeconfig` cluster"
                    );
                }
                let path = at(path);
                anyhow::ensure!(
                    path.is_file(),
                    "the kubeconfig {} does not exist or is not a file",
                    path.display()
                );
                Ok(Cluster::Kubeconfig {
                    path,
                    context: raw.context.clone().filter(|c| !c.is_empty()),
                })
            }
            (None, Some(server)) => {
                anyhow::ensure!(
                    raw.context.is_none(),
                    "`context` applies only to a `kubeconfig` cluster"
                );
                let server = server.trim().trim_end_matches('/').to_string();
                let Some(host) = server.strip_prefix("https://") else {
                    anyhow::bail!(
                        "`server = \"{server}\"` must be an https:// URL: the API server is only ever reached over TLS"
                    );
                };
                anyhow::ensure!(
                    !host.is_empty() && !host.starts_with('/'),
                    "`server = \"{server}\"` has no host name"
                );
                let Some(ca_file) = &raw.ca_file else {
                    anyhow::bail!(
                        "`ca_file` is missing: name the PEM file of the CA that signed the API server's certificate (for AKS: `az aks get-credentials` writes it into the kubeconfig as certificate-authority-data, base64)"
                    );
                };
                let ca_file = at(ca_file);
                anyhow::ensure!(
                    ca_file.is_file(),
                    "`ca_file` {} does not exist or is not a file",
                    ca_file.display()
                );
                let Some(auth) = raw.auth.as_deref() else {
                    anyhow::bail!("`auth` is missing: use {AUTH_METHODS}");
                };
                let allowed: &[&str] = match auth {
                    "managed_identity" => &["client_id"],
                    "workload_identity" => &[
                        "client_id",
                        "tenant_id",
                        "token_file",
                        "authority_host",
                        "authority_ca_file",
                    ],
                    "client_secret" => &[
                        "client_id",
                        "tenant_id",
                        "secret_file",
                        "authority_host",
                        "authority_ca_file",
                    ],
                    "azure_cli" => &["tenant_id"],
                    other => anyhow::bail!("unknown `auth = \"{other}\"`: use {AUTH_METHODS}"),
                };
                if let Some((field, _)) = entra_fields
                    .iter()
                    .skip(2)
                    .find(|(f, set)| *set && !allowed.contains(f))
                {
                    anyhow::bail!("`{field}` does not apply to `auth = \"{auth}\"`");
                }
                let authority = || -> anyhow::Result<String> {
                    let host = raw
                        .authority_host
                        .clone()
                        .or_else(|| env("AZURE_AUTHORITY_HOST"))
                        .unwrap_or_else(|| PUBLIC_AUTHORITY_HOST.to_string());
                    anyhow::ensure!(
                        host.starts_with("https://"),
                        "the authority host `{host}` must be an https:// URL"
                    );
                    Ok(host)
                };
                let required = |value: Option<String>, field: &str, var: &str| {
                    value.or_else(|| env(var)).with_context(|| {
                        format!(
                            "`{field}` is missing for `auth = \"{auth}\"` (and {var} is not set)"
                        )
                    })
                };
                let auth = match auth {
                    "managed_identity" => Auth::ManagedIdentity {
                        client_id: raw.client_id.clone().filter(|c| !c.is_empty()),
                    },
                    "workload_identity" => Auth::WorkloadIdentity {
                        tenant_id: required(raw.tenant_id.clone(), "tenant_id", "AZURE_TENANT_ID")?,
                        client_id: required(raw.client_id.clone(), "client_id", "AZURE_CLIENT_ID")?,
                        token_file: at(&PathBuf::from(required(
                            raw.token_file
                                .as_ref()
                                .map(|p| p.to_string_lossy().into_owned()),
                            "token_file",
                            "AZURE_FEDERATED_TOKEN_FILE",
                        )?)),
                        authority_host: authority()?,
                        authority_ca_file: raw.authority_ca_file.as_deref().map(at),
                    },
                    "client_secret" => Auth::ClientSecret {
                        tenant_id: required(raw.tenant_id.clone(), "tenant_id", "AZURE_TENANT_ID")?,
                        client_id: required(raw.client_id.clone(), "client_id", "AZURE_CLIENT_ID")?,
                        secret_file: at(raw.secret_file.as_deref().with_context(|| {
                            "`secret_file` is missing for `auth = \"client_secret\"`: name a file (mode 0600) that holds the secret"
                        })?),
                        authority_host: authority()?,
                        authority_ca_file: raw.authority_ca_file.as_deref().map(at),
                    },
                    _ => Auth::AzureCli {
                        tenant_id: raw.tenant_id.clone(),
                    },
                };
                Ok(Cluster::Entra(EntraCluster {
                    server,
                    ca_file,
                    auth,
                }))
            }
        }
    }
}

/// Checks every `[clusters.NAME]` table.
pub fn resolve_all(
    raw: &BTreeMap<String, ClusterSettings>,
    config_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<BTreeMap<String, Cluster>> {
    raw.iter()
        .map(|(name, settings)| {
            Cluster::resolve(name, settings, config_dir, env)
                .with_context(|| format!("cluster `{name}` in the runner settings is not valid"))
                .map(|c| (name.clone(), c))
        })
        .collect()
}

/// What a job needs to set up a cluster's kubeconfig.
#[derive(Debug, Clone, Default)]
pub struct JobClusters {
    /// The configured clusters.
    pub clusters: BTreeMap<String, Cluster>,
    /// The runner's config dir, passed to `kube-token`.
    pub config_dir: PathBuf,
    /// The `outpost-runner` executable that serves `kube-token` (absolute).
    pub exe: PathBuf,
}

/// The kubeconfig (as JSON, which `kubectl` and `helm` read like YAML) for an Entra ID cluster:
/// its server and CA, and a user whose token comes from `exe kube-token --cluster NAME`.
pub fn entra_kubeconfig(
    name: &str,
    cluster: &EntraCluster,
    ca_pem: &[u8],
    exe: &Path,
    config_dir: &Path,
) -> serde_json::Value {
    let user = format!("outpost-{name}");
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": name,
            "cluster": {
                "server": cluster.server,
                "certificate-authority-data": base64::engine::general_purpose::STANDARD.encode(ca_pem),
            },
        }],
        "users": [{
            "name": user,
            "user": {
                "exec": {
                    "apiVersion": "client.authentication.k8s.io/v1",
                    "command": exe.to_string_lossy(),
                    "args": [
                        "kube-token",
                        "--cluster",
                        name,
                        "--config-dir",
                        config_dir.to_string_lossy(),
                    ],
                    "interactiveMode": "Never",
                    "provideClusterInfo": false,
                },
            },
        }],
        "contexts": [{
            "name": name,
            "context": { "cluster": name, "user": user },
        }],
        "current-context": name,
    })
}

/// Writes the kubeconfig for cluster `name` as `dir/kubeconfig` (mode 0600) and returns its path.
///
/// A kubeconfig cluster is copied with `kubectl config view --raw --flatten` (only the chosen
/// context with `--minify`), so a step that changes its kubeconfig never changes the runner's.
pub async fn write_job_kubeconfig(
    setup: &JobClusters,
    name: &str,
    dir: &Path,
    kubectl: &Path,
) -> anyhow::Result<PathBuf> {
    let Some(cluster) = setup.clusters.get(name) else {
        let known: Vec<&str> = setup.clusters.keys().map(String::as_str).collect();
        anyhow::bail!(
            "the job names cluster `{name}`, but this runner has no `[clusters.{name}]` in its runner.toml (it has: {})",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        );
    };
    let text = match cluster {
        Cluster::Kubeconfig { path, context } => {
            let mut cmd = tokio::process::Command::new(kubectl);
            cmd.args(["config", "view", "--raw", "--flatten"])
                .env("KUBECONFIG", path)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true);
            if let Some(context) = context {
                cmd.args(["--minify", "--context", context]);
            }
            let out = tokio::time::timeout(std::time::Duration::from_secs(60), cmd.output())
                .await
                .context("`kubectl config view` did not finish within 60 s")?
                .with_context(|| format!("could not run `{}`", kubectl.display()))?;
            anyhow::ensure!(
                out.status.success(),
                "`kubectl config view` could not read the kubeconfig {}{}: {}",
                path.display(),
                context
                    .as_deref()
                    .map(|c| format!(" (context `{c}`)"))
                    .unwrap_or_default(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            out.stdout
        }
        Cluster::Entra(entra) => {
            let ca = std::fs::read(&entra.ca_file).with_context(|| {
                format!("could not read the ca_file {}", entra.ca_file.display())
            })?;
            let config = entra_kubeconfig(name, entra, &ca, &setup.exe, &setup.config_dir);
            serde_json::to_vec_pretty(&config).context("could not encode the kubeconfig")?
        }
    };
    let path = dir.join("kubeconfig");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        f.write_all(&text)?;
        f.sync_all()
    };
    write().with_context(|| format!("could not write the kubeconfig {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn parse(toml_text: &str) -> ClusterSettings {
        toml::from_str(toml_text).expect("the test TOML parses")
    }

    fn err(dir: &Path, toml_text: &str, env: &dyn Fn(&str) -> Option<String>) -> String {
        format!(
            "{:#}",
            Cluster::resolve("aks-prod", &parse(toml_text), dir, env).unwrap_err()
        )
    }

    #[test]
    fn entra_clusters_are_checked_with_clear_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::write(dir.join("ca.pem"), "pem").unwrap();
        let ok = Cluster::resolve(
            "aks-prod",
            &parse("server = \"https://aks.example.io:443/\"\nca_file = \"ca.pem\"\nauth = \"managed_identity\"\nclient_id = \"c1\""),
            dir,
            &no_env,
        )
        .unwrap();
        assert_eq!(
            ok,
            Cluster::Entra(EntraCluster {
                server: "https://aks.example.io:443".into(),
                ca_file: dir.join("ca.pem"),
                auth: Auth::ManagedIdentity {
                    client_id: Some("c1".into())
                },
            })
        );

        let e = err(
            dir,
            "server = \"http://aks.example.io\"\nca_file = \"ca.pem\"\nauth = \"managed_identity\"",
            &no_env,
        );
        assert!(e.contains("must be an https:// URL"), "{e}");
        let e = err(
            dir,
            "server = \"https://aks.example.io\"\nauth = \"managed_identity\"",
            &no_env,
        );
        assert!(e.contains("`ca_file` is missing"), "{e}");
        let e = err(
            dir,
            "server = \"https://aks.example.io\"\nca_file = \"nope.pem\"\nauth = \"managed_identity\"",
            &no_env,
        );
        assert!(e.contains("does not exist"), "{e}");
        let e = err(
            dir,
            "server = \"https://aks.example.io\"\nca_file = \"ca.pem\"\nauth = \"password\"",
            &no_env,
        );
        assert!(e.contains("unknown `auth = \"password\"`"), "{e}");
        assert!(e.contains("managed_identity"), "{e}");
        let e = err(
            dir,
            "server = \"https://aks.example.io\"\nca_file = \"ca.pem\"\nauth = \"managed_identity\"\nsecret_file = \"s\"",
            &no_env,
        );
        assert!(e.contains("`secret_file` does not apply"), "{e}");
        let e = err(dir, "context = \"x\"", &no_env);
        assert!(e.contains("either `kubeconfig"), "{e}");
        let e = err(
            dir,
            "kubeconfig = \"ca.pem\"\nauth = \"azure_cli\"",
            &no_env,
        );
        assert!(e.contains("`auth` applies only"), "{e}");
        let e = err(
            dir,
            "server = \"https://aks.example.io\"\nca_file = \"ca.pem\"\nauth = \"client_secret\"\ntenant_id = \"t\"\nclient_id = \"c\"",
            &no_env,
        );
        assert!(e.contains("`secret_file` is missing"), "{e}");
        assert!(
            toml::from_str::<ClusterSettings>("sever = \"https://x\"").is_err(),
            "a misspelt field is an error"
        );
    }

    #[test]
    fn workload_identity_takes_the_variables_aks_injects() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::write(dir.join("ca.pem"), "pem").unwrap();
        let text = "server = \"https://aks.example.io\"\nca_file = \"ca.pem\"\nauth = \"workload_identity\"";
        let e = err(dir, text, &no_env);
        assert!(e.contains("`tenant_id` is missing"), "{e}");
        assert!(e.contains("AZURE_TENANT_ID"), "{e}");
        let env = |k: &str| match k {
            "AZURE_TENANT_ID" => Some("tenant".to_string()),
            "AZURE_CLIENT_ID" => Some("client".to_string()),
            "AZURE_FEDERATED_TOKEN_FILE" => Some("/var/run/token".to_string()),
            "AZURE_AUTHORITY_HOST" => Some("https://login.example/".to_string()),
            _ => None,
        };
        let c = Cluster::resolve("aks", &parse(text), dir, &env).unwrap();
        let Cluster::Entra(EntraCluster { auth, .. }) = c else {
            panic!("an Entra cluster")
        };
        assert_eq!(
            auth,
            Auth::WorkloadIdentity {
                tenant_id: "tenant".into(),
                client_id: "client".into(),
                token_file: "/var/run/token".into(),
                authority_host: "https://login.example/".into(),
                authority_ca_file: None,
            }
        );
        let env_http = |k: &str| (k == "AZURE_AUTHORITY_HOST").then(|| "http://x".to_string());
        let e = err(
            dir,
            &format!("{text}\ntenant_id = \"t\"\nclient_id = \"c\"\ntoken_file = \"f\""),
            &env_http,
        );
        assert!(e.contains("must be an https:// URL"), "{e}");
    }

    #[test]
    fn the_entra_kubeconfig_uses_the_exec_plugin() {
        let cluster = EntraCluster {
            server: "https://aks.example.io".into(),
            ca_file: "/ca.pem".into(),
            auth: Auth::AzureCli { tenant_id: None },
        };
        let v = entra_kubeconfig(
            "prod",
            &cluster,
            b"PEM",
            Path::new("/usr/bin/outpost-runner"),
            Path::new("/etc/outpost-runner"),
        );
        let exec = &v["users"][0]["user"]["exec"];
        assert_eq!(exec["apiVersion"], "client.authentication.k8s.io/v1");
        assert_eq!(exec["command"], "/usr/bin/outpost-runner");
        assert_eq!(
            exec["args"],
            serde_json::json!([
                "kube-token",
                "--cluster",
                "prod",
                "--config-dir",
                "/etc/outpost-runner"
            ])
        );
        assert_eq!(exec["interactiveMode"], "Never");
        assert_eq!(v["current-context"], "prod");
        assert_eq!(
            v["clusters"][0]["cluster"]["certificate-authority-data"],
            "UEVN"
        );
    }

    #[tokio::test]
    async fn a_cluster_the_runner_lacks_is_named_in_the_error() {
        let tmp = tempfile::tempdir().unwrap();
        let setup = JobClusters {
            clusters: BTreeMap::from([(
                "staging".to_string(),
                Cluster::Entra(EntraCluster {
                    server: "https://aks.example.io".into(),
                    ca_file: tmp.path().join("ca.pem"),
                    auth: Auth::AzureCli { tenant_id: None },
                }),
            )]),
            config_dir: tmp.path().to_path_buf(),
            exe: "/usr/bin/outpost-runner".into(),
        };
        let err = write_job_kubeconfig(&setup, "aks-prod", tmp.path(), Path::new("kubectl"))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("no `[clusters.aks-prod]`"), "{err}");
        assert!(err.contains("it has: staging"), "{err}");

        std::fs::write(tmp.path().join("ca.pem"), "PEM").unwrap();
        let path = write_job_kubeconfig(&setup, "staging", tmp.path(), Path::new("kubectl"))
            .await
            .unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(
            v["clusters"][0]["cluster"]["server"],
            "https://aks.example.io"
        );
    }

    #[test]
    fn cluster_names_become_labels() {
        assert!(is_valid_name("aks-prod"));
        assert!(!is_valid_name("aks prod"));
        assert!(!is_valid_name(""));
        assert_eq!(label("aks-prod"), "cluster:aks-prod");
    }
}
