//! API tokens and registration tokens: stored only as SHA-256 hashes.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::{Store, StoreError, StoreResult, dispatch, hash_token, new_token, with_writer};

/// What an API token may do; each scope includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// See pipelines, runs, logs and runners.
    Read,
    /// Read, plus start and cancel runs.
    Trigger,
    /// Trigger, plus run ad-hoc commands on runners (`outpost invoke`).
    Invoke,
    /// Everything.
    Admin,
}

impl Scope {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Trigger => "trigger",
            Scope::Invoke => "invoke",
            Scope::Admin => "admin",
        }
    }

    /// Parses the stored spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "read" => Some(Scope::Read),
            "trigger" => Some(Scope::Trigger),
            "invoke" => Some(Scope::Invoke),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }
}

/// The caller behind a valid API token.
#[derive(Debug, Clone)]
pub struct ApiPrincipal {
    /// The token's id.
    pub id: Uuid,
    /// The token's name, recorded as the actor.
    pub name: String,
    /// What it may do.
    pub scope: Scope,
}

/// An API token this replica has seen valid, with what never changes about it (its id, name and
/// scope). Whether it is still valid is not known from memory: only a statement that checks it
/// again may act on it ([`Store::trigger_run_as`]).
#[derive(Debug, Clone)]
pub struct KnownToken {
    /// Who it was.
    pub principal: ApiPrincipal,
    /// The token's hash, to check it by.
    pub(crate) hash: String,
}

/// API tokens seen valid here, by hash ([`KnownToken`]).
#[derive(Debug, Default)]
pub struct KnownTokens {
    entries: std::sync::Mutex<std::collections::HashMap<String, ApiPrincipal>>,
}

impl KnownTokens {
    /// More live tokens than this and the map starts again from empty.
    const MAX: usize = 1024;

    fn get(&self, hash: &str) -> Option<ApiPrincipal> {
        let map = self.entries.lock().expect("token map poisoned");
        map.get(hash).cloned()
    }

    fn record(&self, hash: String, principal: Option<&ApiPrincipal>) {
        let mut map = self.entries.lock().expect("token map poisoned");
        match principal {
            Some(p) => {
                if map.len() >= Self::MAX && !map.contains_key(&hash) {
                    map.clear();
                }
                map.insert(hash, p.clone());
            }
            None => {
                map.remove(&hash);
            }
        }
    }
}

/// A token as listed by the admin commands (never the token itself).
#[derive(Debug, Clone, Serialize)]
pub struct TokenInfo {
    /// Its id.
    pub id: Uuid,
    /// Name (API tokens) or pool (registration tokens).
    pub name: String,
    /// Scope (API tokens) or `register` (registration tokens).
    pub scope: String,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// When it stops working, if ever.
    pub expires_at: Option<DateTime<Utc>>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct TokenRow {
    id: Uuid,
    name: String,
    scope: String,
    created_at: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
}

impl From<TokenRow> for TokenInfo {
    fn from(r: TokenRow) -> Self {
        TokenInfo {
            id: r.id,
            name: r.name,
            scope: r.scope,
            created_at: r.created_at,
            expires_at: r.expires_at,
            revoked_at: r.revoked_at,
        }
    }
}

impl Store {
    /// Creates an API token and returns it; only its hash is stored.
    pub async fn create_api_token(
        &self,
        name: &str,
        scope: Scope,
        expires_at: Option<DateTime<Utc>>,
    ) -> StoreResult<(Uuid, String)> {
        if name.trim().is_empty() {
            return Err(StoreError::Invalid("a token needs a name".into()));
        }
        let token = new_token("opa_");
        let id = Uuid::now_v7();
        let mut w = self.writer().await?;
        with_writer!(w, db => {
            sqlx::query(
                "INSERT INTO api_tokens (id, name, scope, token_hash, created_at, expires_at) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(id)
            .bind(name)
            .bind(scope.as_str())
            .bind(hash_token(&token))
            .bind(Utc::now())
            .bind(expires_at)
            .execute(db)
            .await?;
        });
        Ok((id, token))
    }

    /// Lists API tokens.
    pub async fn list_api_tokens(&self) -> StoreResult<Vec<TokenInfo>> {
        let rows: Vec<TokenRow> = dispatch!(self, pool => {
            sqlx::query_as(
                "SELECT id, name, scope, created_at, expires_at, revoked_at FROM api_tokens ORDER BY created_at",
            )
            .fetch_all(pool)
            .await?
        });
        Ok(rows.into_iter().map(Into::into).collect())
    }

    /// Revokes the API tokens with this name (or this id); returns how many.
    pub async fn revoke_api_token(&self, name_or_id: &str) -> StoreResult<u64> {
        let id = Uuid::parse_str(name_or_id).ok();
        let mut w = self.writer().await?;
        let n = with_writer!(w, db => {
            sqlx::query(
                "UPDATE api_tokens SET revoked_at = $1 WHERE revoked_at IS NULL AND (name = $2 OR id = $3)",
            )
            .bind(Utc::now())
            .bind(name_or_id)
            .bind(id)
            .execute(db)
            .await?
            .rows_affected()
        });
        Ok(n)
    }

    /// The principal behind a bearer token, if it is a valid, unrevoked, unexpired API token.
    pub async fn authenticate_api(&self, token: &str) -> StoreResult<Option<ApiPrincipal>> {
        let hash = hash_token(token);
        let row: Option<(Uuid, String, String)> = dispatch!(self, pool => {
            sqlx::query_as(
                "SELECT id, name, scope FROM api_tokens \
                 WHERE token_hash = $1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $2)",
            )
            .bind(&hash)
            .bind(Utc::now())
            .fetch_optional(pool)
            .await?
        });
        let principal = row.and_then(|(id, name, scope)| {
            Scope::parse(&scope).map(|scope| ApiPrincipal { id, name, scope })
        });
        self.known_tokens.record(hash, principal.as_ref());
        Ok(principal)
    }

    /// An API token [`Store::authenticate_api`] last found valid here, read from memory: it may
    /// have been revoked or have expired since. Nothing may be done on its strength alone.
    pub fn known_api_token(&self, token: &str) -> Option<KnownToken> {
        let hash = hash_token(token);
        let principal = self.known_tokens.get(&hash)?;
        Some(KnownToken { principal, hash })
    }

    /// Creates a registration token for a runner pool.
    pub async fn create_registration_token(
        &self,
        pool_name: &str,
        expires_at: Option<DateTime<Utc>>,
    ) -> StoreResult<(Uuid, String)> {
        if pool_name.trim().is_empty() {
            return Err(StoreError::Invalid(
                "a registration token needs a pool name".into(),
            ));
        }
        let token = new_token("opr_");
        let id = Uuid::now_v7();
        let mut w = self.writer().await?;
        with_writer!(w, db => {
            sqlx::query(
                "INSERT INTO registration_tokens (id, pool, token_hash, created_at, expires_at) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(id)
            .bind(pool_name)
            .bind(hash_token(&token))
            .bind(Utc::now())
            .bind(expires_at)
            .execute(db)
            .await?;
        });
        Ok((id, token))
    }

    /// Lists registration tokens.
    pub async fn list_registration_tokens(&self) -> StoreResult<Vec<TokenInfo>> {
        let rows: Vec<TokenRow> = dispatch!(self, pool => {
            sqlx::query_as(
                "SELECT id, pool AS name, 'register' AS scope, created_at, expires_at, revoked_at \
                 FROM registration_tokens ORDER BY created_at",
            )
            .fetch_all(pool)
            .await?
        });
        Ok(rows.into_iter().map(Into::into).collect())
    }

    /// Revokes registration tokens by id, or every token of a pool; returns how many.
    pub async fn revoke_registration_token(&self, pool_or_id: &str) -> StoreResult<u64> {
        let id = Uuid::parse_str(pool_or_id).ok();
        let mut w = self.writer().await?;
        let n = with_writer!(w, db => {
            sqlx::query(
                "UPDATE registration_tokens SET revoked_at = $1 WHERE revoked_at IS NULL AND (pool = $2 OR id = $3)",
            )
            .bind(Utc::now())
            .bind(pool_or_id)
            .bind(id)
            .execute(db)
            .await?
            .rows_affected()
        });
        Ok(n)
    }

    /// The pool of a valid registration token.
    pub async fn authenticate_registration(&self, token: &str) -> StoreResult<Option<String>> {
        let row: Option<(String,)> = dispatch!(self, pool => {
            sqlx::query_as(
                "SELECT pool FROM registration_tokens \
                 WHERE token_hash = $1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $2)",
            )
            .bind(hash_token(token))
            .bind(Utc::now())
            .fetch_optional(pool)
            .await?
        });
        Ok(row.map(|r| r.0))
    }
}
