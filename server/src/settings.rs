//! Server settings: defaults, then the config file, then `OUTPOST__SECTION__KEY` environment variables.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// Everything the server can be told.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Where the server keeps its files (the SQLite database by default). Default `./outpost-data`.
    pub data_dir: PathBuf,
    /// The database.
    pub database: DatabaseSettings,
    /// The HTTP listener.
    pub server: ServerSettings,
    /// Job queue and leases.
    pub queue: QueueSettings,
    /// The secret store's encryption key.
    pub secrets: SecretsSettings,
    /// Webhook endpoints (`/hooks/*`): their secrets and body limit.
    pub webhooks: WebhookSettings,
    /// Runner registration with Entra ID tokens (`[entra]`); absent means registration tokens only.
    pub entra: Option<EntraSettings>,
}

/// Runner registration with Entra ID: a runner presents an access token from its managed
/// identity instead of a registration token, and the server checks it against the issuer's keys.
///
/// ```toml
/// [entra]
/// tenant_id = "00000000-0000-0000-0000-000000000000"
/// issuer = "https://login.microsoftonline.com/00000000-0000-0000-0000-000000000000/v2.0"
/// audience = "api://outpost"
///
/// [[entra.principals]]
/// object_id = "11111111-1111-1111-1111-111111111111"
/// pool = "aks-prod"
/// ```
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct EntraSettings {
    /// The directory (tenant) id tokens must carry in their `tid` claim.
    pub tenant_id: String,
    /// The exact `iss` claim tokens must carry, e.g.
    /// `https://login.microsoftonline.com/<tenant>/v2.0` (v2 tokens) or
    /// `https://sts.windows.net/<tenant>/` (v1 tokens, what managed identities get by default).
    pub issuer: String,
    /// Where the issuer publishes its signing keys; default: the `jwks_uri` of
    /// `<issuer>/.well-known/openid-configuration`.
    pub jwks_url: Option<String>,
    /// The `aud` claim tokens must carry: the application ID URI (or client id) of the app
    /// registration that stands for this server. Runners ask for `<audience>/.default`.
    pub audience: String,
    /// Clock skew allowed on `exp` and `nbf`, in seconds. Default 60.
    pub leeway_secs: u64,
    /// The signing keys are fetched again when they are older than this, in seconds. Default 3600.
    pub jwks_max_age_secs: u64,
    /// A token signed with a key id the server does not know makes it fetch the keys again, at
    /// most this often, in seconds, so forged key ids cannot turn it against the issuer. Default 60.
    pub jwks_min_refresh_secs: u64,
    /// The principals (object ids) allowed to register runners, each into one pool.
    pub principals: Vec<EntraPrincipal>,
}

/// One principal allowed to register runners with an Entra ID token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EntraPrincipal {
    /// Its object (principal) id, the token's `oid` claim (or `sub` when there is no `oid`);
    /// for a managed identity, the "Object (principal) ID" the portal shows.
    pub object_id: String,
    /// The pool its runners join, as a registration token's pool would.
    pub pool: String,
    /// What it is, for people reading the configuration and the logs.
    #[serde(default)]
    pub description: Option<String>,
}

impl Default for EntraSettings {
    fn default() -> Self {
        Self {
            tenant_id: String::new(),
            issuer: String::new(),
            jwks_url: None,
            audience: String::new(),
            leeway_secs: 60,
            jwks_max_age_secs: 3600,
            jwks_min_refresh_secs: 60,
            principals: Vec::new(),
        }
    }
}

impl EntraSettings {
    /// Checks that the section is complete and consistent; each error names the key to fix.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.tenant_id.trim().is_empty(),
            "entra.tenant_id is required: the directory (tenant) id runners' tokens come from"
        );
        anyhow::ensure!(
            !self.issuer.trim().is_empty(),
            "entra.issuer is required, e.g. https://login.microsoftonline.com/{}/v2.0 or https://sts.windows.net/{}/",
            self.tenant_id,
            self.tenant_id
        );
        check_key_url("entra.issuer", &self.issuer)?;
        if let Some(url) = &self.jwks_url {
            check_key_url("entra.jwks_url", url)?;
        }
        anyhow::ensure!(
            !self.audience.trim().is_empty(),
            "entra.audience is required: the application ID URI or client id of the app registration that stands for this server (its tokens' `aud`)"
        );
        anyhow::ensure!(
            self.jwks_max_age_secs >= 1,
            "entra.jwks_max_age_secs must be at least 1"
        );
        anyhow::ensure!(
            !self.principals.is_empty(),
            "entra.principals is empty, so no runner could register with Entra ID: add [[entra.principals]] entries with object_id and pool, or remove the [entra] section"
        );
        let mut seen = std::collections::HashSet::new();
        for (i, p) in self.principals.iter().enumerate() {
            anyhow::ensure!(
                !p.object_id.trim().is_empty(),
                "entra.principals[{i}] has no object_id"
            );
            anyhow::ensure!(
                !p.pool.trim().is_empty(),
                "entra.principals[{i}] ({}) has no pool",
                p.object_id
            );
            anyhow::ensure!(
                seen.insert(p.object_id.trim().to_ascii_lowercase()),
                "entra.principals lists {} twice: a principal registers into exactly one pool",
                p.object_id
            );
        }
        Ok(())
    }
}

/// Signing keys decide who may register, so they come over HTTPS; plain HTTP only on loopback
/// (a local stand-in, or a proxy on the same machine).
fn check_key_url(key: &str, value: &str) -> anyhow::Result<()> {
    let url = reqwest::Url::parse(value.trim())
        .map_err(|e| anyhow::anyhow!("{key} is not a URL ({value}): {e}"))?;
    match url.scheme() {
        "https" => Ok(()),
        "http" => {
            let host = url.host_str().unwrap_or_default();
            let loopback = host == "localhost"
                || host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            anyhow::ensure!(
                loopback,
                "{key} must be an https URL ({value}): plain http is allowed only on loopback"
            );
            Ok(())
        }
        other => anyhow::bail!("{key} must be an https URL, not {other}: ({value})"),
    }
}

/// Database settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct DatabaseSettings {
    /// `sqlite://PATH` or `postgres://USER@HOST/DB`; default `sqlite://<data_dir>/outpost.db`.
    pub url: Option<String>,
    /// Connections in the pool.
    pub max_connections: u32,
}

/// HTTP listener settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ServerSettings {
    /// Address to listen on. Default `127.0.0.1:8080`.
    pub listen: String,
    /// The URL people and runners use to reach this server (for links and messages).
    pub public_url: Option<String>,
    /// Largest request body accepted, in bytes; larger ones answer `413`. Default 10 MiB.
    pub max_body_bytes: usize,
    /// How long shutdown waits for open requests, in seconds; then their connections are closed.
    /// Default 10.
    pub shutdown_grace_secs: u64,
    /// The most a connection's read buffer grows to, in bytes (at least 8192). Request heads must
    /// fit in it, and larger bodies are read in pieces of this size. Default 8192: every idle
    /// long-polling runner holds one, so a larger buffer costs memory per runner (16 KiB each at
    /// hyper's default) for slightly faster large log appends.
    pub read_buffer_max_bytes: usize,
    /// Failed authentications (`401` answers) from one client address within
    /// `auth_failure_window_secs` after which the address gets `429`; `0` turns throttling off.
    /// Default 20.
    pub auth_failures_max: u32,
    /// The window failed authentications are counted in, in seconds. Default 60.
    pub auth_failure_window_secs: u64,
    /// How long a throttled address gets `429` (with `Retry-After`), in seconds; credentials that
    /// already authenticated from it keep working. Default 60.
    pub auth_block_secs: u64,
    /// Whether loopback clients are throttled too. Default false: on loopback the peer is a
    /// local reverse proxy or the operator, and throttling it would throttle everyone behind it.
    pub auth_throttle_loopback: bool,
}

/// Job queue settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct QueueSettings {
    /// Length of a job lease in seconds; a runner heartbeats well inside it. Default 60.
    pub lease_secs: u64,
    /// Longest time an acquire long poll is held, in seconds. Default 30.
    pub acquire_wait_secs: u64,
    /// How often expired leases are looked for, in milliseconds. Default 1000.
    pub reaper_interval_ms: u64,
}

/// Secret store settings: the key values are encrypted with. At most one of the two may be set.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SecretsSettings {
    /// The 32-byte key, base64 (`outpost-server secret generate-key` makes one). Never printed.
    pub key: Option<crate::secrets::Redacted>,
    /// A file holding the base64 key (mode 0600), instead of `key`.
    pub key_file: Option<PathBuf>,
}

/// Webhook settings. A source whose secret is not set refuses every delivery (`401`); nothing is
/// ever accepted unsigned.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct WebhookSettings {
    /// Largest webhook body accepted, in bytes; larger ones answer `413` and are recorded.
    /// Default 25 MiB, the most GitHub itself sends.
    pub max_body_bytes: usize,
    /// `POST /hooks/github`.
    pub github: GithubHookSettings,
    /// `POST /hooks/gitlab`.
    pub gitlab: GitlabHookSettings,
    /// `POST /hooks/azure-devops`.
    pub azure_devops: AzureDevopsHookSettings,
    /// `POST /hooks/generic/<pipeline>`: one entry per pipeline, keyed by its name (`-` may be
    /// written `_`, so `OUTPOST__WEBHOOKS__GENERIC__DEPLOY_WEB__SECRET` serves `deploy-web`).
    pub generic: std::collections::BTreeMap<String, GenericHookSettings>,
}

/// GitHub webhook settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct GithubHookSettings {
    /// The webhook's secret: deliveries must carry a valid `X-Hub-Signature-256`.
    pub secret: Option<crate::secrets::Redacted>,
}

/// GitLab webhook settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct GitlabHookSettings {
    /// The webhook's secret token: deliveries must carry it in `X-Gitlab-Token`.
    pub token: Option<crate::secrets::Redacted>,
}

/// Azure DevOps service hook settings: basic authentication, a custom header, or both (a
/// delivery that passes either is accepted).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct AzureDevopsHookSettings {
    /// The basic authentication user name; when unset, any user name is accepted with the password.
    pub username: Option<String>,
    /// The basic authentication password.
    pub password: Option<crate::secrets::Redacted>,
    /// The name of a custom header that carries `header_value`, e.g. `X-Outpost-Token`.
    pub header_name: Option<String>,
    /// The value that header must have.
    pub header_value: Option<crate::secrets::Redacted>,
}

/// A generic webhook's settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct GenericHookSettings {
    /// The HMAC-SHA256 key: deliveries must carry `X-Outpost-Signature: sha256=<hex>`.
    pub secret: Option<crate::secrets::Redacted>,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            max_body_bytes: 25 * 1024 * 1024,
            github: GithubHookSettings::default(),
            gitlab: GitlabHookSettings::default(),
            azure_devops: AzureDevopsHookSettings::default(),
            generic: Default::default(),
        }
    }
}

impl WebhookSettings {
    /// The secret of `pipeline`'s generic webhook, if one is configured.
    pub fn generic_secret(&self, pipeline: &str) -> Option<&str> {
        let entry = self
            .generic
            .get(pipeline)
            .or_else(|| self.generic.get(&pipeline.replace('-', "_")))?;
        entry.secret.as_ref().map(|s| s.0.as_str())
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./outpost-data"),
            database: DatabaseSettings::default(),
            server: ServerSettings::default(),
            queue: QueueSettings::default(),
            secrets: SecretsSettings::default(),
            webhooks: WebhookSettings::default(),
            entra: None,
        }
    }
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: None,
            max_connections: 16,
        }
    }
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            public_url: None,
            max_body_bytes: 10 * 1024 * 1024,
            shutdown_grace_secs: 10,
            read_buffer_max_bytes: crate::READ_BUFFER_MIN,
            auth_failures_max: 20,
            auth_failure_window_secs: 60,
            auth_block_secs: 60,
            auth_throttle_loopback: false,
        }
    }
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            lease_secs: 60,
            acquire_wait_secs: 30,
            reaper_interval_ms: 1000,
        }
    }
}

/// `OUTPOST__SECTION__KEY` variables; `OUTPOST__DATA_DIR` sets `data_dir`.
fn environment() -> config::Environment {
    config::Environment::with_prefix("OUTPOST")
        .prefix_separator("__")
        .separator("__")
        .try_parsing(true)
}

/// The webhook secrets among `vars`, read as text exactly as written.
///
/// [`environment`] parses values that look like numbers, which would turn a secret such as
/// `007` into `7`; this source comes after it, so those keys keep their text.
fn webhook_secrets_environment(
    vars: impl IntoIterator<Item = (String, String)>,
) -> config::Environment {
    let secrets: std::collections::HashMap<String, String> = vars
        .into_iter()
        .filter(|(k, _)| {
            let k = k.to_ascii_uppercase();
            k.starts_with("OUTPOST__WEBHOOKS__")
                && [
                    "__SECRET",
                    "__TOKEN",
                    "__PASSWORD",
                    "__HEADER_VALUE",
                    "__USERNAME",
                ]
                .iter()
                .any(|suffix| k.ends_with(suffix))
        })
        .collect();
    config::Environment::with_prefix("OUTPOST")
        .prefix_separator("__")
        .separator("__")
        .source(Some(secrets))
}

impl Settings {
    /// Loads defaults, then `file` (if given), then the environment.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let mut builder =
            config::Config::builder().add_source(config::Config::try_from(&Settings::default())?);
        if let Some(file) = file {
            anyhow::ensure!(
                file.exists(),
                "the config file {} does not exist",
                file.display()
            );
            builder = builder.add_source(config::File::from(file));
        }
        builder = builder
            .add_source(environment())
            .add_source(webhook_secrets_environment(std::env::vars()));
        let settings: Settings = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .context("invalid configuration")?;
        anyhow::ensure!(
            settings.queue.lease_secs >= 1,
            "queue.lease_secs must be at least 1"
        );
        anyhow::ensure!(
            settings.queue.acquire_wait_secs >= 1,
            "queue.acquire_wait_secs must be at least 1"
        );
        anyhow::ensure!(
            settings.webhooks.max_body_bytes >= 1024,
            "webhooks.max_body_bytes must be at least 1024"
        );
        if let Some(entra) = &settings.entra {
            entra.validate()?;
        }
        Ok(settings)
    }

    /// The database URL, defaulting to SQLite under the data dir.
    pub fn database_url(&self) -> String {
        match &self.database.url {
            Some(url) if !url.is_empty() => url.clone(),
            _ => format!("sqlite://{}", self.data_dir.join("outpost.db").display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_overrides_defaults() {
        // A custom source map instead of the process environment, so tests do not race on it.
        let env: std::collections::HashMap<String, String> = [
            ("OUTPOST__SERVER__LISTEN", "127.0.0.1:9000"),
            ("OUTPOST__QUEUE__LEASE_SECS", "5"),
            ("OUTPOST__DATABASE__URL", "postgres://postgres@127.0.0.1/x"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let settings: Settings = config::Config::builder()
            .add_source(config::Config::try_from(&Settings::default()).unwrap())
            .add_source(environment().source(Some(env)))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap();
        assert_eq!(settings.server.listen, "127.0.0.1:9000");
        assert_eq!(settings.queue.lease_secs, 5);
        assert_eq!(settings.database_url(), "postgres://postgres@127.0.0.1/x");
        assert_eq!(
            Settings::default().database_url(),
            "sqlite://./outpost-data/outpost.db"
        );
    }

    #[test]
    fn webhook_secrets_come_from_the_environment_and_never_print() {
        let env: std::collections::HashMap<String, String> = [
            ("OUTPOST__WEBHOOKS__GITHUB__SECRET", "gh-s3cret"),
            ("OUTPOST__WEBHOOKS__GITLAB__TOKEN", "0070"),
            ("OUTPOST__WEBHOOKS__AZURE_DEVOPS__USERNAME", "outpost"),
            ("OUTPOST__WEBHOOKS__AZURE_DEVOPS__PASSWORD", "ad0-pa55"),
            ("OUTPOST__WEBHOOKS__GENERIC__DEPLOY_WEB__SECRET", "g3neric"),
            ("OUTPOST__WEBHOOKS__MAX_BODY_BYTES", "1048576"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let settings: Settings = config::Config::builder()
            .add_source(config::Config::try_from(&Settings::default()).unwrap())
            .add_source(environment().source(Some(env.clone())))
            .add_source(webhook_secrets_environment(env))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap();
        let hooks = &settings.webhooks;
        assert_eq!(hooks.github.secret.as_ref().unwrap().0, "gh-s3cret");
        // A secret that looks like a number keeps its text.
        assert_eq!(hooks.gitlab.token.as_ref().unwrap().0, "0070");
        assert_eq!(hooks.azure_devops.username.as_deref(), Some("outpost"));
        assert_eq!(hooks.azure_devops.password.as_ref().unwrap().0, "ad0-pa55");
        assert_eq!(hooks.max_body_bytes, 1024 * 1024);
        // `_` in the variable stands for `-` in the pipeline's name.
        assert_eq!(hooks.generic_secret("deploy-web"), Some("g3neric"));
        assert_eq!(hooks.generic_secret("deploy_web"), Some("g3neric"));
        assert_eq!(hooks.generic_secret("other"), None);
        let printed = format!("{settings:?}");
        for secret in ["gh-s3cret", "0070", "ad0-pa55", "g3neric"] {
            assert!(!printed.contains(secret), "{secret} printed");
        }
        assert_eq!(
            Settings::default().webhooks.max_body_bytes,
            25 * 1024 * 1024
        );
    }

    #[test]
    fn secrets_key_settings_come_from_the_environment_and_never_print() {
        let env: std::collections::HashMap<String, String> = [
            ("OUTPOST__SECRETS__KEY", "c2VjcmV0LWtleS1tYXRlcmlhbA=="),
            ("OUTPOST__SECRETS__KEY_FILE", "/etc/outpost/secrets.key"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let settings: Settings = config::Config::builder()
            .add_source(config::Config::try_from(&Settings::default()).unwrap())
            .add_source(environment().source(Some(env)))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap();
        let key = settings.secrets.key.as_ref().unwrap();
        assert_eq!(key.0, "c2VjcmV0LWtleS1tYXRlcmlhbA==");
        assert_eq!(
            settings.secrets.key_file.as_deref(),
            Some(Path::new("/etc/outpost/secrets.key"))
        );
        assert!(!format!("{settings:?}").contains("c2VjcmV0"));
    }

    fn load_entra(toml: &str) -> anyhow::Result<Settings> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outpost.toml");
        std::fs::write(&path, toml).unwrap();
        Settings::load(Some(&path))
    }

    const ENTRA_OK: &str = r#"
[entra]
tenant_id = "72f988bf-86f1-41af-91ab-2d7cd011db47"
issuer = "https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47/v2.0"
audience = "api://outpost"

[[entra.principals]]
object_id = "11111111-1111-1111-1111-111111111111"
pool = "aks-prod"
description = "vmss-prod system identity"
"#;

    #[test]
    fn entra_settings_load_from_a_file() {
        let settings = load_entra(ENTRA_OK).unwrap();
        let entra = settings.entra.expect("the [entra] section is read");
        assert_eq!(entra.audience, "api://outpost");
        assert_eq!(entra.leeway_secs, 60);
        assert_eq!(entra.jwks_min_refresh_secs, 60);
        assert_eq!(entra.jwks_url, None);
        assert_eq!(entra.principals.len(), 1);
        assert_eq!(entra.principals[0].pool, "aks-prod");
        assert!(Settings::default().entra.is_none());
    }

    #[test]
    fn incomplete_entra_settings_say_what_to_fix() {
        let cases = [
            (
                ENTRA_OK.replace("audience = \"api://outpost\"", ""),
                "entra.audience is required",
            ),
            (
                ENTRA_OK.replace("tenant_id = \"72f988bf-86f1-41af-91ab-2d7cd011db47\"", ""),
                "entra.tenant_id is required",
            ),
            (
                ENTRA_OK.replace("https://login", "http://login"),
                "plain http is allowed only on loopback",
            ),
            (
                ENTRA_OK.replace("pool = \"aks-prod\"", "pool = \"\""),
                "has no pool",
            ),
            (
                ENTRA_OK
                    .split("[[entra.principals]]")
                    .next()
                    .unwrap()
                    .to_string(),
                "entra.principals is empty",
            ),
            (
                format!(
                    "{ENTRA_OK}\n[[entra.principals]]\nobject_id = \"11111111-1111-1111-1111-111111111111\"\npool = \"other\"\n"
                ),
                "lists 11111111-1111-1111-1111-111111111111 twice",
            ),
        ];
        for (toml, expected) in &cases {
            let err = format!("{:#}", load_entra(toml).unwrap_err());
            assert!(
                err.contains(expected),
                "expected {expected:?} in {err:?} for:\n{toml}"
            );
        }
        let loopback =
            ENTRA_OK.replace("https://login.microsoftonline.com", "http://127.0.0.1:8080");
        assert!(
            load_entra(&loopback).is_ok(),
            "plain http on loopback is allowed"
        );
    }
}
