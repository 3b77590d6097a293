//! The secret store: values encrypted at rest, names and scopes in the clear.
//!
//! A secret is global (`pipeline = ''`) or for one pipeline; a job gets exactly the secrets its
//! pipeline lists, the pipeline's own value winning over the global one. Values leave the store
//! only decrypted into a claimed job ([`Store::fill_secrets`]); nothing else here returns one.
//!
//! A run records the names its pipeline lists as the keys of its jobs' stored `secrets` map, with
//! empty values: the claim decodes the spec as usual and, when that map is not empty, fills in
//! the values in one query. The stored spec thus never holds a value, and a claim of a job that
//! lists no secrets costs nothing extra.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use outpost_protocol::AssignedJob;
use serde::{Deserialize, Serialize};
use sqlx::types::Json;
use uuid::Uuid;

use super::{Store, StoreError, StoreResult, dispatch, with_writer};
use crate::secrets::{self, SecretsKey};

/// A secret as listed: never its value.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct SecretInfo {
    /// The name steps see it under.
    pub name: String,
    /// `global` or `pipeline`.
    pub scope: String,
    /// The pipeline it is for; `None` when global.
    pub pipeline: Option<String>,
    /// When it was first set.
    pub created_at: DateTime<Utc>,
    /// When its value last changed.
    pub updated_at: DateTime<Utc>,
}

/// `GET /api/v1/secrets` answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct SecretList {
    /// Every secret, by name then scope (global first).
    pub secrets: Vec<SecretInfo>,
}

/// A stored secret as read for decryption: name, scope (`""` for global), nonce, ciphertext.
type StoredSecret = (String, String, Vec<u8>, Vec<u8>);

#[derive(sqlx::FromRow)]
struct SecretRow {
    name: String,
    pipeline: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<SecretRow> for SecretInfo {
    fn from(r: SecretRow) -> Self {
        let global = r.pipeline.is_empty();
        SecretInfo {
            name: r.name,
            scope: if global { "global" } else { "pipeline" }.into(),
            pipeline: (!global).then_some(r.pipeline),
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

/// How a scope reads in messages.
fn describe(pipeline: &str) -> String {
    if pipeline.is_empty() {
        "global".into()
    } else {
        format!("for pipeline {pipeline}")
    }
}

/// Checks a name and scope, returning the stored scope (`""` for global).
fn scope_of<'a>(name: &str, pipeline: Option<&'a str>) -> StoreResult<&'a str> {
    if !secrets::valid_name(name) {
        return Err(StoreError::Invalid(format!(
            "{name:?} is not a valid secret name: use letters, digits and `_`, not starting with a digit"
        )));
    }
    match pipeline.filter(|p| !p.is_empty()) {
        None => Ok(""),
        Some(p) => crate::pipeline::validate_name(p)
            .map(|()| p)
            .map_err(StoreError::Invalid),
    }
}

/// `$2, $3, …` for `n` names after the pipeline's `$1`.
fn name_placeholders(n: usize) -> String {
    (2..n + 2)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The names a run records in a job's spec: the pipeline's secrets, with empty values.
pub(crate) fn placeholders(names: &[String]) -> BTreeMap<String, String> {
    names.iter().map(|n| (n.clone(), String::new())).collect()
}

impl Store {
    /// Checks the configured key against the stored secrets and keeps it for this process.
    ///
    /// Fails when secrets (or the key-check row) are stored and no key is given, or when the key
    /// does not decrypt them; with nothing stored, any key (or none) is fine.
    pub async fn init_secrets(&self, key: Option<SecretsKey>) -> StoreResult<()> {
        type Sealed = (Vec<u8>, Vec<u8>);
        let (check, one): (Option<Sealed>, Option<StoredSecret>) = dispatch!(self, pool => {
            let check = sqlx::query_as("SELECT nonce, ciphertext FROM secret_keycheck WHERE id = 1")
                .fetch_optional(pool)
                .await?;
            let one = sqlx::query_as("SELECT name, pipeline, nonce, ciphertext FROM secrets LIMIT 1")
                .fetch_optional(pool)
                .await?;
            (check, one)
        });
        let Some(key) = key else {
            return if check.is_some() || one.is_some() {
                Err(StoreError::Conflict(secrets::MISSING_KEY.into()))
            } else {
                Ok(())
            };
        };
        let right = match (&check, &one) {
            (Some((nonce, ciphertext)), _) => key.verifies(nonce, ciphertext),
            // Secrets without a key check (not written by this code): decrypting one tells.
            (None, Some((name, pipeline, nonce, ciphertext))) => {
                key.decrypt(name, pipeline, nonce, ciphertext).is_ok()
            }
            (None, None) => true,
        };
        if !right {
            return Err(StoreError::Conflict(secrets::WRONG_KEY.into()));
        }
        self.secrets_key
            .set(key)
            .map_err(|_| StoreError::Conflict("the secrets key is already set".into()))
    }

    /// Whether a secrets key is configured, so secrets can be stored.
    pub fn has_secrets_key(&self) -> bool {
        self.secrets_key.get().is_some()
    }

    /// Sets a secret (global when `pipeline` is `None`), recording `actor` in the audit log.
    /// Returns the secret as listed and whether it is new.
    #[tracing::instrument(skip(self, value), err(Debug))]
    pub async fn put_secret(
        &self,
        name: &str,
        pipeline: Option<&str>,
        value: &str,
        actor: &str,
    ) -> StoreResult<(SecretInfo, bool)> {
        let scope = scope_of(name, pipeline)?;
        secrets::check_value(value).map_err(StoreError::Invalid)?;
        let key = self
            .secrets_key
            .get()
            .ok_or_else(|| StoreError::Conflict(secrets::HOW_TO_MAKE_A_KEY.into()))?;
        let sealed = key.encrypt(name, scope, value);
        let check = key.keycheck();
        let now = Utc::now();
        let detail =
            serde_json::json!({ "name": name, "pipeline": pipeline.filter(|p| !p.is_empty()) });
        let mut w = self.writer().await?;
        let existing: Option<(DateTime<Utc>,)> = with_writer!(w, db => {
            let mut tx = db.begin_with(self.begin_write()).await?;
            // The first secret stored writes the key check; every later one verifies against it,
            // so two processes with different keys can never both store secrets.
            sqlx::query(
                "INSERT INTO secret_keycheck (id, nonce, ciphertext, created_at) VALUES (1, $1, $2, $3) \
                 ON CONFLICT (id) DO NOTHING",
            )
            .bind(&check.nonce)
            .bind(&check.ciphertext)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            let (nonce, ciphertext): (Vec<u8>, Vec<u8>) =
                sqlx::query_as("SELECT nonce, ciphertext FROM secret_keycheck WHERE id = 1")
                    .fetch_one(&mut *tx)
                    .await?;
            if !key.verifies(&nonce, &ciphertext) {
                return Err(StoreError::Conflict(secrets::WRONG_KEY.into()));
            }
            let existing: Option<(DateTime<Utc>,)> =
                sqlx::query_as("SELECT created_at FROM secrets WHERE name = $1 AND pipeline = $2")
                    .bind(name)
                    .bind(scope)
                    .fetch_optional(&mut *tx)
                    .await?;
            sqlx::query(
                "INSERT INTO secrets (name, pipeline, nonce, ciphertext, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $5) \
                 ON CONFLICT (name, pipeline) DO UPDATE SET nonce = excluded.nonce, \
                 ciphertext = excluded.ciphertext, updated_at = excluded.updated_at",
            )
            .bind(name)
            .bind(scope)
            .bind(&sealed.nonce)
            .bind(&sealed.ciphertext)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO audit_events (id, actor, action, object, detail, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(Uuid::now_v7())
            .bind(actor)
            .bind(if existing.is_some() { "secret.update" } else { "secret.create" })
            .bind(format!("secret {name} ({})", describe(scope)))
            .bind(Json(&detail))
            .bind(now)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            existing
        });
        tracing::info!(secret = %name, scope = %describe(scope), %actor, "secret set");
        let info = SecretInfo::from(SecretRow {
            name: name.to_string(),
            pipeline: scope.to_string(),
            created_at: existing.map_or(now, |e| e.0),
            updated_at: now,
        });
        Ok((info, existing.is_none()))
    }

    /// Deletes a secret (global when `pipeline` is `None`), recording `actor` in the audit log.
    #[tracing::instrument(skip(self), err(Debug))]
    pub async fn delete_secret(
        &self,
        name: &str,
        pipeline: Option<&str>,
        actor: &str,
    ) -> StoreResult<()> {
        let scope = scope_of(name, pipeline)?;
        let now = Utc::now();
        let detail =
            serde_json::json!({ "name": name, "pipeline": pipeline.filter(|p| !p.is_empty()) });
        let mut w = self.writer().await?;
        with_writer!(w, db => {
            let mut tx = db.begin_with(self.begin_write()).await?;
            let n = sqlx::query("DELETE FROM secrets WHERE name = $1 AND pipeline = $2")
                .bind(name)
                .bind(scope)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if n == 0 {
                return Err(StoreError::NotFound(format!("secret {name} ({})", describe(scope))));
            }
            sqlx::query(
                "INSERT INTO audit_events (id, actor, action, object, detail, created_at) \
                 VALUES ($1, $2, 'secret.delete', $3, $4, $5)",
            )
            .bind(Uuid::now_v7())
            .bind(actor)
            .bind(format!("secret {name} ({})", describe(scope)))
            .bind(Json(&detail))
            .bind(now)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
        });
        tracing::info!(secret = %name, scope = %describe(scope), %actor, "secret deleted");
        Ok(())
    }

    /// Every secret's name, scope and timestamps, by name then scope (global first).
    pub async fn list_secrets(&self) -> StoreResult<Vec<SecretInfo>> {
        let rows: Vec<SecretRow> = dispatch!(self, pool => {
            sqlx::query_as(
                "SELECT name, pipeline, created_at, updated_at FROM secrets ORDER BY name, pipeline",
            )
            .fetch_all(pool)
            .await?
        });
        Ok(rows.into_iter().map(Into::into).collect())
    }

    /// Fails with a sentence naming each secret `pipeline` lists that is set neither for it nor globally.
    pub async fn require_secrets(&self, pipeline: &str, names: &[String]) -> StoreResult<()> {
        if names.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "SELECT DISTINCT name FROM secrets WHERE pipeline IN ('', $1) AND name IN ({})",
            name_placeholders(names.len())
        );
        let present: Vec<(String,)> = dispatch!(self, pool => {
            let mut q = sqlx::query_as(sqlx::AssertSqlSafe(sql.as_str())).bind(pipeline);
            for name in names {
                q = q.bind(name);
            }
            q.fetch_all(pool).await?
        });
        let missing: Vec<&str> = names
            .iter()
            .map(String::as_str)
            .filter(|n| !present.iter().any(|(p,)| p == n))
            .collect();
        match missing.as_slice() {
            [] => Ok(()),
            [one] => Err(StoreError::Invalid(format!(
                "pipeline {pipeline} lists the secret {one}, which is not set: set it with \
                 `outpost-server secret set {one} --pipeline {pipeline}` (the value is read from stdin; \
                 leave out --pipeline to set it for every pipeline)"
            ))),
            many => Err(StoreError::Invalid(format!(
                "pipeline {pipeline} lists secrets that are not set: {}; set each with \
                 `outpost-server secret set NAME --pipeline {pipeline}` (the value is read from stdin; \
                 leave out --pipeline to set it for every pipeline)",
                many.join(", ")
            ))),
        }
    }

    /// Fills in the values of the secrets a claimed job lists (the keys of `job.secrets`).
    ///
    /// The pipeline's own value wins over the global one. A secret that is gone (deleted since
    /// the run was triggered) or does not decrypt is left out with a warning: the step that needs
    /// it fails visibly, and nothing else is held up.
    pub(crate) async fn fill_secrets(&self, job: &mut AssignedJob) -> StoreResult<()> {
        let names: Vec<String> = std::mem::take(&mut job.secrets).into_keys().collect();
        if names.is_empty() {
            return Ok(());
        }
        let Some(key) = self.secrets_key.get() else {
            tracing::warn!(job.id = %job.id, pipeline = %job.pipeline, secrets = ?names,
                "the job lists secrets but no secrets key is configured; it runs without them");
            return Ok(());
        };
        let sql = format!(
            "SELECT name, pipeline, nonce, ciphertext FROM secrets WHERE pipeline IN ('', $1) AND name IN ({})",
            name_placeholders(names.len())
        );
        let rows: Vec<StoredSecret> = dispatch!(self, pool => {
            let mut q = sqlx::query_as(sqlx::AssertSqlSafe(sql.as_str())).bind(&job.pipeline);
            for name in &names {
                q = q.bind(name);
            }
            q.fetch_all(pool).await?
        });
        let mut chosen: HashMap<&str, &StoredSecret> = HashMap::new();
        for row in &rows {
            // A pipeline's own value replaces a global one found before it, never the reverse.
            if row.1.is_empty() {
                chosen.entry(row.0.as_str()).or_insert(row);
            } else {
                chosen.insert(row.0.as_str(), row);
            }
        }
        for name in names {
            match chosen.get(name.as_str()) {
                Some((_, scope, nonce, ciphertext)) => {
                    match key.decrypt(&name, scope, nonce, ciphertext) {
                        Ok(value) => {
                            job.secrets.insert(name, value);
                        }
                        Err(_) => {
                            tracing::error!(job.id = %job.id, pipeline = %job.pipeline, secret = %name,
                            "a stored secret does not decrypt with the configured key; the job runs without it")
                        }
                    }
                }
                None => tracing::warn!(job.id = %job.id, pipeline = %job.pipeline, secret = %name,
                    "a secret the pipeline lists was deleted after the run was triggered; the job runs without it"),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_follow_the_pipeline_parameter() {
        assert_eq!(name_placeholders(1), "$2");
        assert_eq!(name_placeholders(3), "$2, $3, $4");
    }

    #[test]
    fn names_and_scopes_are_checked() {
        assert_eq!(scope_of("A", None).unwrap(), "");
        assert_eq!(scope_of("A", Some("")).unwrap(), "");
        assert_eq!(scope_of("A", Some("web")).unwrap(), "web");
        assert!(scope_of("1A", None).is_err());
        assert!(scope_of("A", Some("Bad Name")).is_err());
    }
}
