//! The CLI's config file: the server and token `outpost login` saved.
//!
//! Precedence, highest first: `--server`/`--token`, `OUTPOST_SERVER`/`OUTPOST_TOKEN`, the config
//! file, then the default server `http://127.0.0.1:8080`.
//! The file holds a credential, so it is written with mode 0600 (and its directory 0700), and
//! replaced atomically so that a crash never leaves half a token behind.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

/// The server used when nothing names one.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8080";

/// What `outpost login` saves.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileConfig {
    /// The server's base URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// The API token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// Where the config file lives: `$OUTPOST_CONFIG`, else `$XDG_CONFIG_HOME/outpost/config.toml`,
/// else `$HOME/.config/outpost/config.toml`.
pub fn path() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(p) = var("OUTPOST_CONFIG") {
        return Some(PathBuf::from(p));
    }
    if let Some(xdg) = var("XDG_CONFIG_HOME") {
        return Some(PathBuf::from(xdg).join("outpost").join("config.toml"));
    }
    var("HOME").map(|home| {
        PathBuf::from(home)
            .join(".config")
            .join("outpost")
            .join("config.toml")
    })
}

/// Reads the config file; a missing file is an empty config.
pub fn load(path: &Path) -> anyhow::Result<FileConfig> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(FileConfig::default()),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("could not read the config file {}", path.display()));
        }
    };
    toml::from_str(&text).with_context(|| {
        format!(
            "the config file {} is not valid: fix it, or write it again with `outpost login`",
            path.display()
        )
    })
}

/// Writes the config file with mode 0600, replacing any old one atomically.
pub fn save(path: &Path, config: &FileConfig) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("could not create the directory {}", dir.display()))?;
    let text = toml::to_string(config).context("could not encode the config")?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("config"),
        std::process::id()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e)
            .with_context(|| format!("could not write the config file {}", path.display()));
    }
    Ok(())
}

/// The server and token in effect, and where each came from (for `outpost login --show`).
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The server's base URL.
    pub server: String,
    /// The token, if any.
    pub token: Option<String>,
}

/// Combines the command line (which clap already merged with the environment) with the file.
pub fn resolve(
    server: Option<&str>,
    token: Option<&str>,
    file: &FileConfig,
) -> anyhow::Result<Resolved> {
    let pick = |a: Option<&str>, b: Option<&String>| {
        a.map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .or_else(|| b.map(|s| s.trim().to_string()).filter(|s| !s.is_empty()))
    };
    let server = pick(server, file.server.as_ref()).unwrap_or_else(|| DEFAULT_SERVER.to_string());
    let token = pick(token, file.token.as_ref());
    if server.contains(char::is_whitespace) {
        bail!("the server URL {server:?} contains spaces");
    }
    Ok(Resolved { server, token })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_is_private_and_round_trips() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("config.toml");
        let config = FileConfig {
            server: Some("https://outpost.example.com".into()),
            token: Some("opa_secret".into()),
        };
        save(&path, &config).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load(&path).unwrap(), config);
        // Saving again replaces the file and keeps it private.
        save(&path, &FileConfig::default()).unwrap();
        assert_eq!(load(&path).unwrap(), FileConfig::default());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn flags_and_environment_beat_the_file() {
        let file = FileConfig {
            server: Some("https://from-file".into()),
            token: Some("file-token".into()),
        };
        let r = resolve(None, None, &file).unwrap();
        assert_eq!(r.server, "https://from-file");
        assert_eq!(r.token.as_deref(), Some("file-token"));
        let r = resolve(Some("http://flag:1"), Some("flag-token"), &file).unwrap();
        assert_eq!(r.server, "http://flag:1");
        assert_eq!(r.token.as_deref(), Some("flag-token"));
        let r = resolve(None, None, &FileConfig::default()).unwrap();
        assert_eq!(r.server, DEFAULT_SERVER);
        assert_eq!(r.token, None);
    }

    #[test]
    fn a_missing_file_is_empty_and_a_broken_one_says_so() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            load(&dir.path().join("none.toml")).unwrap(),
            FileConfig::default()
        );
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "server = [").unwrap();
        assert!(
            format!("{:#}", load(&bad).unwrap_err()).contains("outpost login"),
            "no hint"
        );
    }
}
