//! The runner's credentials (`credentials.json`) and settings (`runner.toml` and the environment).

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::clusters::{Cluster, ClusterSettings};

/// File name of the credentials in the config dir.
pub const CREDENTIALS_FILE: &str = "credentials.json";
/// File name of the settings in the config dir.
pub const SETTINGS_FILE: &str = "runner.toml";
/// Prefix of the environment variables that override settings: `OUTPOST_RUNNER__POLL_WAIT_SECS=5`.
pub const ENV_PREFIX: &str = "OUTPOST_RUNNER";

/// What `register` obtained from the server, saved as `credentials.json` (mode 0600) in the
/// config dir. `Debug` does not show the token.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Credentials {
    /// The server's base URL, e.g. `https://outpost.example.com`.
    pub server_url: String,
    /// The runner's id on the server.
    pub runner_id: uuid::Uuid,
    /// The runner's own credential (the server keeps only its hash).
    pub runner_token: String,
    /// The name it registered with.
    pub name: String,
    /// The labels it registered with.
    pub labels: Vec<String>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("server_url", &self.server_url)
            .field("runner_id", &self.runner_id)
            .field("runner_token", &"<redacted>")
            .field("name", &self.name)
            .field("labels", &self.labels)
            .finish()
    }
}

impl Credentials {
    /// Reads `credentials.json` from `config_dir`.
    pub fn load(config_dir: &Path) -> anyhow::Result<Self> {
        let path = config_dir.join(CREDENTIALS_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
                "no credentials in {}: run `outpost-runner register` first",
                config_dir.display()
            ),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("could not read the credentials in {}", path.display())
                });
            }
        };
        if let Ok(meta) = std::fs::metadata(&path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                "{} can be read by other users; run `chmod 600 {}`",
                path.display(),
                path.display()
            );
        }
        serde_json::from_str(&text).with_context(|| {
            format!(
                "the credentials in {} are damaged: run `outpost-runner register` again",
                path.display()
            )
        })
    }

    /// Writes `credentials.json` into `config_dir` with mode 0600, creating the dir with mode 0700.
    ///
    /// The file is written beside its final name and renamed into place, so a crash never leaves
    /// half a file behind.
    pub fn save(&self, config_dir: &Path) -> anyhow::Result<()> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(config_dir)
            .with_context(|| {
                format!(
                    "could not create the config directory {}",
                    config_dir.display()
                )
            })?;
        let path = config_dir.join(CREDENTIALS_FILE);
        let tmp = config_dir.join(format!(".{CREDENTIALS_FILE}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        let json = serde_json::to_vec_pretty(self).context("could not encode the credentials")?;
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&json)?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().with_context(|| format!("could not write the credentials to {}", path.display()))
    }
}

/// Runner settings: the defaults below, then `<config_dir>/runner.toml` if it exists, then
/// environment variables `OUTPOST_RUNNER__<FIELD>` (e.g. `OUTPOST_RUNNER__POLL_WAIT_SECS=5`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Where per-job workspaces are created (`<work_dir>/<job id>`); a relative path is taken
    /// relative to the config dir. Default: `<config_dir>/work`.
    pub work_dir: PathBuf,
    /// Command line that runs a `run:` step's script, split like a shell would; `{0}` stands for
    /// the script file. Default: `bash -eo pipefail {0}`.
    pub shell: String,
    /// The `kubectl` binary: a path, or a name looked up on `PATH`. Default: `kubectl`.
    pub kubectl: PathBuf,
    /// The `helm` binary: a path, or a name looked up on `PATH`. Default: `helm`.
    pub helm: PathBuf,
    /// The `git` binary used by `checkout`: a path, or a name looked up on `PATH`. Default: `git`.
    pub git: PathBuf,
    /// Keep each job's workspace after the job instead of removing it (for debugging).
    /// Default: `false`.
    pub keep_workspaces: bool,
    /// How long one acquire long poll may wait for a job, in seconds (the server may cap it).
    /// Default: 30.
    pub poll_wait_secs: u64,
    /// Seconds between asking a step to stop (`SIGINT`, then `SIGTERM`) and killing it
    /// (`SIGKILL`). Default: 10.
    pub kill_grace_secs: u64,
    /// After `SIGTERM`, how long the running job may take to finish before it is cancelled, in
    /// seconds. Default: 3600.
    pub drain_grace_secs: u64,
    /// How many jobs may run at once, each in its own workspace (`--concurrency` overrides it).
    /// Default: 1.
    pub concurrency: usize,
    /// Most bytes of a job's log that wait on disk while the server does not acknowledge them;
    /// beyond that new output is dropped, and the log says how much. Default: 256 MiB.
    pub log_spool_max_bytes: u64,
    /// Where the per-job log spools go; a relative path is taken relative to the config dir.
    /// Default: `<work_dir>/.spool`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_spool_dir: Option<PathBuf>,
    /// Allow a plain `http://` server URL that is not on loopback (the runner's tokens then cross
    /// the network unencrypted). Default: `false`; `OUTPOST_RUNNER__ALLOW_INSECURE_HTTP=true` sets it.
    #[serde(default)]
    pub allow_insecure_http: bool,
    /// The clusters jobs may name (`cluster: NAME`): `[clusters.NAME]` tables, see
    /// [`crate::clusters::ClusterSettings`]. Relative paths in them are made absolute on load.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub clusters: BTreeMap<String, ClusterSettings>,
    /// The config dir the settings were loaded from (not a setting itself).
    #[serde(skip)]
    pub config_dir: PathBuf,
}

impl Settings {
    /// The defaults, for a runner whose config dir is `config_dir`.
    pub fn defaults_for(config_dir: &Path) -> Self {
        Self {
            work_dir: config_dir.join("work"),
            shell: "bash -eo pipefail {0}".into(),
            kubectl: "kubectl".into(),
            helm: "helm".into(),
            git: "git".into(),
            keep_workspaces: false,
            poll_wait_secs: 30,
            kill_grace_secs: 10,
            drain_grace_secs: 3600,
            concurrency: 1,
            log_spool_max_bytes: 256 * 1024 * 1024,
            log_spool_dir: None,
            allow_insecure_http: false,
            clusters: BTreeMap::new(),
            config_dir: config_dir.to_path_buf(),
        }
    }

    /// The checked clusters (their paths are absolute after [`Settings::load`]); the `AZURE_*`
    /// defaults of workload identity come from the process environment.
    pub fn resolved_clusters(&self) -> anyhow::Result<BTreeMap<String, Cluster>> {
        crate::clusters::resolve_all(&self.clusters, Path::new("/"), &|k| std::env::var(k).ok())
    }

    /// The directory of the per-job log spools.
    pub fn log_spool_dir(&self) -> PathBuf {
        self.log_spool_dir
            .clone()
            .unwrap_or_else(|| self.work_dir.join(".spool"))
    }

    /// Defaults, then `<config_dir>/runner.toml` if present, then `OUTPOST_RUNNER__*` variables.
    pub fn load(config_dir: &Path) -> anyhow::Result<Self> {
        Self::load_from(config_dir, None)
    }

    /// Like [`Settings::load`], with the environment given as a map instead of read from the
    /// process (for tests).
    pub fn load_from(
        config_dir: &Path,
        env: Option<BTreeMap<String, String>>,
    ) -> anyhow::Result<Self> {
        use config::{Config, Environment, File, FileFormat};
        let file = config_dir.join(SETTINGS_FILE);
        let defaults = Config::try_from(&Self::defaults_for(config_dir))
            .context("could not build the default settings")?;
        let mut env_source = Environment::with_prefix(ENV_PREFIX)
            .separator("__")
            .try_parsing(true);
        if let Some(vars) = env {
            env_source = env_source.source(Some(vars.into_iter().collect()));
        }
        let built = Config::builder()
            .add_source(defaults)
            .add_source(File::new(&file.to_string_lossy(), FileFormat::Toml).required(false))
            .add_source(env_source)
            .build()
            .with_context(|| format!("could not read the runner settings in {}", file.display()))?;
        let mut settings: Settings = built.try_deserialize().with_context(|| {
            format!(
                "the runner settings are not valid (from {} and {ENV_PREFIX}__* variables)",
                file.display()
            )
        })?;
        settings.config_dir = config_dir.to_path_buf();
        if settings.work_dir.is_relative() {
            settings.work_dir = config_dir.join(&settings.work_dir);
        }
        if let Some(dir) = &settings.log_spool_dir
            && dir.is_relative()
        {
            settings.log_spool_dir = Some(config_dir.join(dir));
        }
        for cluster in settings.clusters.values_mut() {
            for path in [
                &mut cluster.kubeconfig,
                &mut cluster.ca_file,
                &mut cluster.token_file,
                &mut cluster.secret_file,
                &mut cluster.authority_ca_file,
            ]
            .into_iter()
            .flatten()
            {
                if path.is_relative() {
                    *path = config_dir.join(&*path);
                }
            }
        }
        settings
            .resolved_clusters()
            .with_context(|| format!("in {}", file.display()))?;
        anyhow::ensure!(
            settings.concurrency >= 1,
            "`concurrency` in the runner settings must be at least 1 (from {} and {ENV_PREFIX}__* variables)",
            file.display()
        );
        anyhow::ensure!(
            settings.log_spool_max_bytes >= 64 * 1024,
            "`log_spool_max_bytes` in the runner settings must be at least 65536 (64 KiB) (from {} and {ENV_PREFIX}__* variables)",
            file.display()
        );
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_does_not_show_the_token() {
        let c = Credentials {
            server_url: "http://127.0.0.1:1".into(),
            runner_id: uuid::Uuid::nil(),
            runner_token: "s3cr3t-token".into(),
            name: "r".into(),
            labels: vec!["a".into()],
        };
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cr3t-token"), "{shown}");
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn credentials_round_trip_with_private_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("nested/config");
        let c = Credentials {
            server_url: "http://127.0.0.1:1".into(),
            runner_id: uuid::Uuid::now_v7(),
            runner_token: "t".into(),
            name: "r".into(),
            labels: vec!["a".into(), "b".into()],
        };
        c.save(&dir).unwrap();
        assert_eq!(Credentials::load(&dir).unwrap(), c);
        let file_mode = std::fs::metadata(dir.join(CREDENTIALS_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(file_mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        // Saving again replaces the file.
        c.save(&dir).unwrap();
    }

    #[test]
    fn missing_credentials_say_what_to_do() {
        let tmp = tempfile::tempdir().unwrap();
        let err = Credentials::load(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("run `outpost-runner register` first"), "{err}");
    }

    #[test]
    fn defaults_then_file_then_environment() {
        let tmp = tempfile::tempdir().unwrap();
        let none = Some(BTreeMap::new());
        let s = Settings::load_from(tmp.path(), none.clone()).unwrap();
        assert_eq!(s, Settings::defaults_for(tmp.path()));

        std::fs::write(
            tmp.path().join(SETTINGS_FILE),
            "work_dir = \"jobs\"\npoll_wait_secs = 5\nshell = \"sh -e {0}\"\n",
        )
        .unwrap();
        let s = Settings::load_from(tmp.path(), none).unwrap();
        assert_eq!(s.work_dir, tmp.path().join("jobs"));
        assert_eq!(s.poll_wait_secs, 5);
        assert_eq!(s.shell, "sh -e {0}");
        assert_eq!(s.kill_grace_secs, 10);

        let env: BTreeMap<String, String> = [
            ("OUTPOST_RUNNER__POLL_WAIT_SECS", "7"),
            ("OUTPOST_RUNNER__KEEP_WORKSPACES", "true"),
            ("OUTPOST_RUNNER__KUBECTL", "/opt/bin/kubectl"),
            ("OUTPOST_RUNNER_CONFIG_DIR", "/ignored"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let s = Settings::load_from(tmp.path(), Some(env)).unwrap();
        assert_eq!(s.poll_wait_secs, 7);
        assert!(s.keep_workspaces);
        assert_eq!(s.kubectl, PathBuf::from("/opt/bin/kubectl"));
    }

    #[test]
    fn concurrency_and_the_log_spool() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Settings::load_from(tmp.path(), Some(BTreeMap::new())).unwrap();
        assert_eq!(s.concurrency, 1);
        assert_eq!(s.log_spool_max_bytes, 256 * 1024 * 1024);
        assert_eq!(s.log_spool_dir(), tmp.path().join("work/.spool"));

        // The spool follows the work dir unless it is set itself.
        std::fs::write(
            tmp.path().join(SETTINGS_FILE),
            "work_dir = \"/srv/jobs\"\nconcurrency = 4\nlog_spool_max_bytes = 1048576\n",
        )
        .unwrap();
        let s = Settings::load_from(tmp.path(), Some(BTreeMap::new())).unwrap();
        assert_eq!(s.concurrency, 4);
        assert_eq!(s.log_spool_max_bytes, 1024 * 1024);
        assert_eq!(s.log_spool_dir(), PathBuf::from("/srv/jobs/.spool"));

        let env: BTreeMap<String, String> = [
            ("OUTPOST_RUNNER__LOG_SPOOL_DIR", "spool"),
            ("OUTPOST_RUNNER__CONCURRENCY", "2"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let s = Settings::load_from(tmp.path(), Some(env)).unwrap();
        assert_eq!(s.concurrency, 2);
        assert_eq!(s.log_spool_dir(), tmp.path().join("spool"));

        let env: BTreeMap<String, String> =
            [("OUTPOST_RUNNER__CONCURRENCY".to_string(), "0".to_string())].into();
        let err = format!(
            "{:#}",
            Settings::load_from(tmp.path(), Some(env)).unwrap_err()
        );
        assert!(err.contains("at least 1"), "{err}");
    }

    #[test]
    fn clusters_are_read_and_checked_on_load() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("ca.pem"), "pem").unwrap();
        std::fs::write(
            tmp.path().join(SETTINGS_FILE),
            "[clusters.aks-prod]\nserver = \"https://aks.example.io\"\nca_file = \"ca.pem\"\nauth = \"managed_identity\"\n",
        )
        .unwrap();
        let s = Settings::load_from(tmp.path(), Some(BTreeMap::new())).unwrap();
        assert_eq!(
            s.clusters["aks-prod"].ca_file.as_deref(),
            Some(tmp.path().join("ca.pem").as_path())
        );
        assert!(matches!(
            s.resolved_clusters().unwrap()["aks-prod"],
            Cluster::Entra(_)
        ));

        std::fs::write(
            tmp.path().join(SETTINGS_FILE),
            "[clusters.aks-prod]\nserver = \"https://aks.example.io\"\nca_file = \"ca.pem\"\nauth = \"magic\"\n",
        )
        .unwrap();
        let err = format!(
            "{:#}",
            Settings::load_from(tmp.path(), Some(BTreeMap::new())).unwrap_err()
        );
        assert!(err.contains("cluster `aks-prod`"), "{err}");
        assert!(err.contains("unknown `auth = \"magic\"`"), "{err}");
    }

    #[test]
    fn a_misspelt_setting_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join(SETTINGS_FILE), "pol_wait_secs = 5\n").unwrap();
        let err = format!(
            "{:#}",
            Settings::load_from(tmp.path(), Some(BTreeMap::new())).unwrap_err()
        );
        assert!(err.contains("pol_wait_secs"), "{err}");
    }
}
