//! The secret store's cryptography and key handling.
//!
//! Secret values are encrypted with XChaCha20-Poly1305 under a 32-byte key that comes from
//! configuration (`secrets.key`, or a file named by `secrets.key_file`), never from the database.
//! Every value gets a fresh random 24-byte nonce, and the associated data binds the ciphertext to
//! the secret's name and scope, so a ciphertext copied onto another name or pipeline does not
//! decrypt. A `secret_keycheck` row (a known plaintext under the key) lets the server tell at
//! start whether the configured key is the one the stored secrets were written with.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Length of a key in bytes.
pub const KEY_LEN: usize = 32;
/// Length of a nonce in bytes.
pub const NONCE_LEN: usize = 24;
/// Longest secret value accepted, in bytes: values end up in a process environment, where one
/// string may not exceed 128 KiB on Linux.
pub const MAX_VALUE_LEN: usize = 64 * 1024;

/// The startup error when secrets are stored but no key is configured.
pub const MISSING_KEY: &str = "secrets are stored but no key is configured: set OUTPOST__SECRETS__KEY (the key they were stored with)";
/// The startup error when the configured key does not decrypt the stored secrets.
pub const WRONG_KEY: &str = "the configured secrets key does not decrypt the stored secrets: it is not the key they were stored with";
/// What to do when a secret must be stored and no key is configured.
pub const HOW_TO_MAKE_A_KEY: &str = "no secrets key is configured, so secrets cannot be stored: make one with \
     `outpost-server secret generate-key`, keep it safe, and give it to every outpost-server process as \
     OUTPOST__SECRETS__KEY (or write it to a file and set OUTPOST__SECRETS__KEY_FILE)";

/// Associated data of the key-check row; no secret name can produce it (names have no `/`).
const KEYCHECK_AAD: &[u8] = b"outpost/keycheck/v1";
/// The known plaintext of the key-check row.
const KEYCHECK_PLAINTEXT: &[u8] = b"outpost secrets key check v1";

/// Text from configuration that must not be printed: `Debug` and `Serialize` show `[redacted]`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Redacted(pub String);

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Serialize for Redacted {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("[redacted]")
    }
}

impl<'de> Deserialize<'de> for Redacted {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Redacted)
    }
}

/// Why a key could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// Nothing but whitespace.
    #[error("the key is empty")]
    Empty,
    /// Not base64 text.
    #[error("the key is not base64 text")]
    NotBase64,
    /// Base64, but not 32 bytes.
    #[error("the key is {0} bytes long, but it must be {KEY_LEN} bytes (44 base64 characters)")]
    WrongLength(usize),
}

/// A value that did not decrypt: the wrong key, or a ciphertext altered or moved to another name
/// or scope. Deliberately says nothing more.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the value does not decrypt with this key under this name and scope")]
pub struct DecryptError;

/// A value sealed under the key: what the `secrets` table stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// The random nonce.
    pub nonce: Vec<u8>,
    /// The ciphertext with its authentication tag.
    pub ciphertext: Vec<u8>,
}

/// The key secrets are encrypted with. `Debug` prints `[redacted]`.
#[derive(Clone)]
pub struct SecretsKey {
    cipher: XChaCha20Poly1305,
}

impl fmt::Debug for SecretsKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretsKey([redacted])")
    }
}

/// A fresh random key, base64-encoded (standard alphabet, padded): what `secret generate-key` prints.
pub fn generate_key() -> String {
    let bytes: [u8; KEY_LEN] = rand::random();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The associated data of a secret: its name and scope (`""` for global).
fn secret_aad(name: &str, pipeline: &str) -> Vec<u8> {
    // Neither names nor pipeline names can contain NUL, so the encoding is unambiguous.
    let mut aad = Vec::with_capacity(24 + name.len() + pipeline.len());
    aad.extend_from_slice(b"outpost/secret/v1\0");
    aad.extend_from_slice(name.as_bytes());
    aad.push(0);
    aad.extend_from_slice(pipeline.as_bytes());
    aad
}

impl SecretsKey {
    /// Parses a base64 key (standard or URL-safe alphabet, padded or not; surrounding whitespace ignored).
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        use base64::engine::general_purpose::{
            STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD,
        };
        let text = text.trim();
        if text.is_empty() {
            return Err(KeyError::Empty);
        }
        let bytes = [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
            .iter()
            .find_map(|engine| engine.decode(text).ok())
            .ok_or(KeyError::NotBase64)?;
        let bytes: [u8; KEY_LEN] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::WrongLength(bytes.len()))?;
        Ok(Self {
            cipher: XChaCha20Poly1305::new(&Key::from(bytes)),
        })
    }

    fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Sealed {
        let nonce: [u8; NONCE_LEN] = rand::random();
        let ciphertext = self
            .cipher
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            // Encryption fails only for messages far beyond any size a secret can have.
            .expect("XChaCha20-Poly1305 encrypts any message under 256 GiB");
        Sealed {
            nonce: nonce.to_vec(),
            ciphertext,
        }
    }

    fn open(&self, aad: &[u8], nonce: &[u8], ciphertext: &[u8]) -> Result<Vec<u8>, DecryptError> {
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| DecryptError)?;
        self.cipher
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: ciphertext,
                    aad,
                },
            )
            .map_err(|_| DecryptError)
    }

    /// Encrypts a secret's value, bound to its name and scope (`""` for global).
    pub fn encrypt(&self, name: &str, pipeline: &str, value: &str) -> Sealed {
        self.seal(&secret_aad(name, pipeline), value.as_bytes())
    }

    /// Decrypts a secret's value stored under `name` and scope `pipeline` (`""` for global).
    pub fn decrypt(
        &self,
        name: &str,
        pipeline: &str,
        nonce: &[u8],
        ciphertext: &[u8],
    ) -> Result<String, DecryptError> {
        let bytes = self.open(&secret_aad(name, pipeline), nonce, ciphertext)?;
        String::from_utf8(bytes).map_err(|_| DecryptError)
    }

    /// The key-check row's contents: a known plaintext under this key.
    pub fn keycheck(&self) -> Sealed {
        self.seal(KEYCHECK_AAD, KEYCHECK_PLAINTEXT)
    }

    /// Whether a key-check row was written with this key.
    pub fn verifies(&self, nonce: &[u8], ciphertext: &[u8]) -> bool {
        self.open(KEYCHECK_AAD, nonce, ciphertext)
            .is_ok_and(|p| p == KEYCHECK_PLAINTEXT)
    }
}

/// Whether `name` can name a secret: `[A-Za-z_][A-Za-z0-9_]*`, so it can be an environment variable.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 200
}

/// Checks a value before it is stored; the message never repeats the value.
pub fn check_value(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("a secret value cannot be empty".into());
    }
    if value.len() > MAX_VALUE_LEN {
        return Err(format!(
            "a secret value can be at most {MAX_VALUE_LEN} bytes; this one is {}",
            value.len()
        ));
    }
    if value.contains('\0') {
        return Err(
            "a secret value cannot contain a NUL byte: it could not be passed to a process".into(),
        );
    }
    Ok(())
}

/// Reads the configured key: `secrets.key`, or the file named by `secrets.key_file`; `None` if neither is set.
pub fn load_key(settings: &crate::settings::SecretsSettings) -> anyhow::Result<Option<SecretsKey>> {
    let key = settings.key.as_ref().filter(|k| !k.0.trim().is_empty());
    let file = settings
        .key_file
        .as_ref()
        .filter(|f| !f.as_os_str().is_empty());
    match (key, file) {
        (Some(_), Some(_)) => anyhow::bail!(
            "both secrets.key (OUTPOST__SECRETS__KEY) and secrets.key_file (OUTPOST__SECRETS__KEY_FILE) are set: set only one"
        ),
        (Some(key), None) => SecretsKey::from_base64(&key.0).map(Some).map_err(|e| {
            anyhow::anyhow!(
                "secrets.key (OUTPOST__SECRETS__KEY) is not a valid key: {e}; make one with `outpost-server secret generate-key`"
            )
        }),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).with_context(|| {
                format!("could not read the secrets key file {}", path.display())
            })?;
            warn_if_readable_by_others(path);
            SecretsKey::from_base64(&text).map(Some).map_err(|e| {
                anyhow::anyhow!(
                    "the secrets key file {} does not hold a valid key: {e}; make one with `outpost-server secret generate-key`",
                    path.display()
                )
            })
        }
        (None, None) => Ok(None),
    }
}

fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            path = %path.display(),
            "the secrets key file can be read by other users; restrict it with `chmod 600`"
        );
    }
}

/// Where `outpost-server dev` keeps the key it makes.
pub fn dev_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("secrets.key")
}

/// For `outpost-server dev`: when no key is configured, uses `<data_dir>/secrets.key`, making it
/// (mode 0600) on first use, so secrets work out of the box on a laptop.
pub fn use_dev_key(settings: &mut crate::Settings) -> anyhow::Result<()> {
    let s = &settings.secrets;
    if s.key.as_ref().is_some_and(|k| !k.0.trim().is_empty())
        || s.key_file
            .as_ref()
            .is_some_and(|f| !f.as_os_str().is_empty())
    {
        return Ok(());
    }
    std::fs::create_dir_all(&settings.data_dir).with_context(|| {
        format!(
            "could not create the data directory {}",
            settings.data_dir.display()
        )
    })?;
    let path = dev_key_path(&std::fs::canonicalize(&settings.data_dir)?);
    if !path.exists() {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        // `create_new`, so two dev servers starting at once never overwrite each other's key.
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(mut f) => {
                f.write_all(format!("{}\n", generate_key()).as_bytes())
                    .with_context(|| format!("could not write {}", path.display()))?;
                eprintln!("made a secrets key for dev mode in {}", path.display());
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(e).with_context(|| format!("could not create {}", path.display()));
            }
        }
    }
    settings.secrets.key_file = Some(path);
    Ok(())
}

/// A hint added to the missing-key error when `outpost-server dev` left a key in the data dir.
pub fn dev_key_hint(settings: &crate::Settings) -> Option<String> {
    let path = dev_key_path(&settings.data_dir);
    path.exists().then(|| {
        format!(
            "; `outpost-server dev` keeps its key in {}: set OUTPOST__SECRETS__KEY_FILE={} to use it",
            path.display(),
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SecretsKey {
        SecretsKey::from_base64(&generate_key()).unwrap()
    }

    #[test]
    fn values_round_trip_with_a_fresh_nonce_each_time() {
        let k = key();
        let a = k.encrypt("TOKEN", "", "hunter2");
        let b = k.encrypt("TOKEN", "", "hunter2");
        assert_eq!(a.nonce.len(), NONCE_LEN);
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.ciphertext, b.ciphertext);
        assert!(
            !a.ciphertext.windows(7).any(|w| w == b"hunter2"),
            "the ciphertext must not contain the plaintext"
        );
        assert_eq!(
            k.decrypt("TOKEN", "", &a.nonce, &a.ciphertext).unwrap(),
            "hunter2"
        );
        assert_eq!(
            k.decrypt("TOKEN", "", &b.nonce, &b.ciphertext).unwrap(),
            "hunter2"
        );
    }

    #[test]
    fn another_key_does_not_decrypt() {
        let sealed = key().encrypt("TOKEN", "web", "hunter2");
        assert_eq!(
            key().decrypt("TOKEN", "web", &sealed.nonce, &sealed.ciphertext),
            Err(DecryptError)
        );
    }

    #[test]
    fn a_ciphertext_moved_to_another_name_or_scope_does_not_decrypt() {
        let k = key();
        let sealed = k.encrypt("TOKEN", "web", "hunter2");
        for (name, pipeline) in [
            ("OTHER", "web"),
            ("TOKEN", ""),
            ("TOKEN", "api"),
            ("TOKE", "Nweb"),
        ] {
            assert_eq!(
                k.decrypt(name, pipeline, &sealed.nonce, &sealed.ciphertext),
                Err(DecryptError),
                "{name}/{pipeline}"
            );
        }
        let mut tampered = sealed.ciphertext.clone();
        tampered[0] ^= 1;
        assert_eq!(
            k.decrypt("TOKEN", "web", &sealed.nonce, &tampered),
            Err(DecryptError)
        );
        assert_eq!(
            k.decrypt("TOKEN", "web", &sealed.nonce[..12], &sealed.ciphertext),
            Err(DecryptError)
        );
    }

    #[test]
    fn the_keycheck_tells_keys_apart() {
        let k = key();
        let check = k.keycheck();
        assert!(k.verifies(&check.nonce, &check.ciphertext));
        assert!(!key().verifies(&check.nonce, &check.ciphertext));
        // A secret's ciphertext is not a key check, even under the same key.
        let sealed = k.encrypt("X", "", "outpost secrets key check v1");
        assert!(!k.verifies(&sealed.nonce, &sealed.ciphertext));
    }

    #[test]
    fn keys_are_parsed_strictly() {
        assert_eq!(SecretsKey::from_base64("").unwrap_err(), KeyError::Empty);
        assert_eq!(
            SecretsKey::from_base64("  \n").unwrap_err(),
            KeyError::Empty
        );
        assert_eq!(
            SecretsKey::from_base64("not base64 at all!").unwrap_err(),
            KeyError::NotBase64
        );
        assert_eq!(
            SecretsKey::from_base64("c2hvcnQ=").unwrap_err(),
            KeyError::WrongLength(5)
        );
        let long = base64::engine::general_purpose::STANDARD.encode([7u8; 33]);
        assert_eq!(
            SecretsKey::from_base64(&long).unwrap_err(),
            KeyError::WrongLength(33)
        );
        // Padded or not, standard or URL-safe, with a trailing newline from a file: all the same key.
        let bytes = [0xfbu8; KEY_LEN];
        let std = base64::engine::general_purpose::STANDARD.encode(bytes);
        let url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let sealed = SecretsKey::from_base64(&std).unwrap().encrypt("A", "", "v");
        for text in [format!("{std}\n"), url] {
            let k = SecretsKey::from_base64(&text).unwrap();
            assert_eq!(
                k.decrypt("A", "", &sealed.nonce, &sealed.ciphertext)
                    .unwrap(),
                "v"
            );
        }
    }

    #[test]
    fn keys_never_print() {
        let text = generate_key();
        let k = SecretsKey::from_base64(&text).unwrap();
        assert!(!format!("{k:?}").contains(&text));
        let r = Redacted(text.clone());
        assert_eq!(format!("{r:?}"), "[redacted]");
        assert_eq!(serde_json::to_string(&r).unwrap(), "\"[redacted]\"");
    }

    #[test]
    fn names_and_values_are_checked() {
        for ok in ["A", "_x", "REGISTRY_PASSWORD", "a1"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "1A", "A-B", "A B", "Ä", "A/B"] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert!(check_value("x").is_ok());
        assert!(check_value("").is_err());
        assert!(check_value("a\0b").is_err());
        assert!(check_value(&"x".repeat(MAX_VALUE_LEN + 1)).is_err());
    }

    #[test]
    fn key_settings_are_read_and_explained() {
        use crate::settings::SecretsSettings;
        assert!(load_key(&SecretsSettings::default()).unwrap().is_none());
        let good = generate_key();
        let s = SecretsSettings {
            key: Some(Redacted(good.clone())),
            key_file: None,
        };
        assert!(load_key(&s).unwrap().is_some());
        let s = SecretsSettings {
            key: Some(Redacted("short".into())),
            key_file: None,
        };
        let err = load_key(&s).unwrap_err().to_string();
        assert!(
            err.contains("OUTPOST__SECRETS__KEY") && err.contains("generate-key"),
            "{err}"
        );
        assert!(
            !err.contains("short"),
            "the error must not echo the key: {err}"
        );

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, format!("{good}\n")).unwrap();
        let s = SecretsSettings {
            key: None,
            key_file: Some(file.clone()),
        };
        assert!(load_key(&s).unwrap().is_some());
        let s = SecretsSettings {
            key: Some(Redacted(good)),
            key_file: Some(file),
        };
        assert!(load_key(&s).unwrap_err().to_string().contains("only one"));
        let s = SecretsSettings {
            key: None,
            key_file: Some(dir.path().join("missing")),
        };
        assert!(
            format!("{:#}", load_key(&s).unwrap_err())
                .contains("could not read the secrets key file")
        );
    }

    #[test]
    fn dev_mode_makes_a_private_key_once() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mut settings = crate::Settings {
            data_dir: dir.path().join("data"),
            ..Default::default()
        };
        use_dev_key(&mut settings).unwrap();
        let path = settings.secrets.key_file.clone().unwrap();
        let first = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(load_key(&settings.secrets).unwrap().is_some());
        let mut again = crate::Settings {
            data_dir: dir.path().join("data"),
            ..Default::default()
        };
        use_dev_key(&mut again).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), first);
        // A configured key is left alone.
        let mut configured = crate::Settings::default();
        configured.secrets.key = Some(Redacted(generate_key()));
        use_dev_key(&mut configured).unwrap();
        assert!(configured.secrets.key_file.is_none());
    }
}
