//! The one storage abstraction with two backends: SQLite (embedded default) and PostgreSQL.
//!
//! SQL text is shared where the dialects agree (`$1` placeholders, `RETURNING`, `ON CONFLICT`);
//! only claiming and locking differ. Each query body is written once and expanded for both
//! backends by the `dispatch!` macro (reads, through the pool) and the `with_writer!` macro
//! (writes: SQLite's one writer connection, PostgreSQL's pool).

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection};
use tokio::sync::{Mutex, MutexGuard};

use crate::events::Events;

mod audit;
mod auth;
mod jobs;
mod logs;
mod pipelines;
pub mod runners;
pub(crate) mod runs;
mod secrets;
mod webhooks;

pub use audit::{AUDIT_INVOKE, NewInvoke};
pub use auth::{ApiPrincipal, KnownToken, Scope, TokenInfo};
pub use jobs::{ClaimRequest, Claimed, CompleteOutcome};
pub use logs::LogChunk;
pub use runs::NewRun;
pub use secrets::{SecretInfo, SecretList};
pub use webhooks::{
    Claim, NewDelivery, STALE_PROCESSING_SECS, WebhookDelivery, WebhookDeliveryList,
};

/// What a store call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The named object does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The request conflicts with the object's state.
    #[error("{0}")]
    Conflict(String),
    /// The lease presented is no longer the job's current lease.
    #[error("the lease on this job is no longer current")]
    LeaseLost,
    /// A log append would leave a gap; the log ends at `next_offset`.
    #[error("the log ends at byte {next_offset}; resend from there")]
    Gap {
        /// Where the stored log ends.
        next_offset: u64,
    },
    /// The input is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// The database failed.
    #[error("database error")]
    Db(#[from] sqlx::Error),
    /// Stored data could not be decoded.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

/// Result of store calls.
pub type StoreResult<T> = Result<T, StoreError>;

/// The backend pool.
#[derive(Debug, Clone)]
pub enum Db {
    /// Embedded SQLite.
    Sqlite(SqlitePool),
    /// PostgreSQL.
    Postgres(PgPool),
}

/// Runs `$body` with `$pool` bound to whichever backend pool the store has.
///
/// The body is expanded once per backend, so the same SQL text and binds serve both.
macro_rules! dispatch {
    ($store:expr, $pool:ident => $body:expr) => {
        match &$store.db {
            $crate::store::Db::Sqlite($pool) => $body,
            $crate::store::Db::Postgres($pool) => $body,
        }
    };
}
pub(crate) use dispatch;

/// What a write goes through ([`Store::writer`]): on SQLite the store's one writer connection,
/// locked for as long as this lives, which serialises writers; on PostgreSQL the pool.
pub(crate) enum Writer<'a> {
    Sqlite(MutexGuard<'a, SqliteConnection>),
    Postgres(&'a PgPool),
}

/// Expands a write's body for both backends with `$db` bound to what the [`Writer`] `$writer`
/// holds: `&mut SqliteConnection` or `&PgPool`. A body that uses `$db` once can hand it to a
/// query as is; one that needs it several times opens a transaction on it (`$db.begin_with`).
macro_rules! with_writer {
    ($writer:ident, $db:ident => $body:expr) => {
        match $writer {
            $crate::store::Writer::Sqlite(ref mut guard) => {
                #[allow(unused_imports)]
                use ::sqlx::Connection as _;
                let $db: &mut ::sqlx::SqliteConnection = &mut **guard;
                $body
            }
            $crate::store::Writer::Postgres($db) => $body,
        }
    };
}
pub(crate) use with_writer;

/// SQLite's writer connection, and how to open it again ([`Store::check_writer`]).
#[derive(Debug)]
struct SqliteWriter {
    conn: Mutex<SqliteConnection>,
    opts: SqliteConnectOptions,
}

impl SqliteWriter {
    /// Replaces the connection `conn` (this writer's, locked) with a new one.
    async fn reopen(&self, conn: &mut SqliteConnection) -> StoreResult<()> {
        let fresh = self.opts.connect().await?;
        // Closing the old connection rolls back whatever it left open.
        let stale = std::mem::replace(conn, fresh);
        if let Err(e) = stale.close_hard().await {
            tracing::debug!(error = %e, "closing the stale SQLite writer connection");
        }
        tracing::warn!(
            "reopened the SQLite writer connection, which a failed write had left unusable"
        );
        Ok(())
    }
}

/// A pooled PostgreSQL connection idle at least this long is pinged before it is used.
const PING_IDLE_AFTER: Duration = Duration::from_secs(1);

/// The store: a pool and, for SQLite, the one writer connection under its lock.
#[derive(Debug)]
pub struct Store {
    pub(crate) db: Db,
    /// SQLite allows one writer at a time: every write goes through this one connection, under
    /// its lock, which avoids `SQLITE_BUSY` on lock upgrades inside transactions. Being outside
    /// the pool, it costs no hop to its thread when a write ends (the pool pings every connection
    /// given back to it), and its page cache stays valid from one write to the next (only it
    /// writes). PostgreSQL needs none.
    sqlite_writer: Option<SqliteWriter>,
    /// Wake-ups for long polls and live logs.
    pub events: Arc<Events>,
    /// Runners authenticated recently.
    runner_cache: runners::RunnerCache,
    /// Pipelines' definitions as runs were last created from them here.
    pipeline_cache: pipelines::PipelineCache,
    /// API tokens last seen valid here, for [`Store::trigger_run_as`].
    known_tokens: auth::KnownTokens,
    /// The key secret values are encrypted with, once [`Store::init_secrets`] accepted it.
    secrets_key: std::sync::OnceLock<crate::secrets::SecretsKey>,
}

impl Store {
    /// Connects to `url` (`sqlite://…` or `postgres://…`) and applies the migrations.
    pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<Self> {
        use anyhow::Context;
        if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)
                .with_context(|| format!("invalid SQLite database url {url}"))?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .foreign_keys(true)
                .busy_timeout(Duration::from_secs(30));
            if let Some(parent) = Path::new(opts.get_filename()).parent()
                && !parent.as_os_str().is_empty()
            {
                std::fs::create_dir_all(parent).with_context(|| {
                    format!("could not create the data directory {}", parent.display())
                })?;
            }
            let writer_opts = opts.clone();
            let pool = SqlitePoolOptions::new()
                .max_connections(max_connections.max(2))
                .acquire_timeout(Duration::from_secs(30))
                // An embedded database has no connection to lose: sqlx's test before every
                // acquire would be a hop to the connection's thread and back for nothing.
                .test_before_acquire(false)
                .connect_with(opts)
                .await
                .with_context(|| format!("could not open the SQLite database at {url}"))?;
            sqlx::migrate!("../migrations/sqlite")
                .run(&pool)
                .await
                .context("could not migrate the SQLite database")?;
            let writer = writer_opts
                .connect()
                .await
                .with_context(|| format!("could not open the SQLite database at {url}"))?;
            Ok(Self {
                db: Db::Sqlite(pool),
                sqlite_writer: Some(SqliteWriter {
                    conn: Mutex::new(writer),
                    opts: writer_opts,
                }),
                events: Arc::new(Events::new(None)),
                runner_cache: Default::default(),
                pipeline_cache: Default::default(),
                known_tokens: Default::default(),
                secrets_key: Default::default(),
            })
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let opts = PgConnectOptions::from_str(url)
                .with_context(|| format!("invalid PostgreSQL database url {}", redact_url(url)))?;
            let pool = PgPoolOptions::new()
                .max_connections(max_connections)
                .acquire_timeout(Duration::from_secs(10))
                // sqlx pings a connection before every acquire by default: a round trip in front
                // of every statement, a third of a trigger's. It pings every connection when it
                // goes back to the pool as well, which finds one that a failed or abandoned
                // statement left broken; so only a connection that sat idle for a while, which
                // may have died meanwhile (a PostgreSQL restart), is pinged before use.
                .test_before_acquire(false)
                .before_acquire(|conn, meta| {
                    Box::pin(async move {
                        if meta.idle_for >= PING_IDLE_AFTER {
                            sqlx::Connection::ping(conn).await?;
                        }
                        Ok(true)
                    })
                })
                .connect_with(opts)
                .await
                .with_context(|| {
                    format!("could not connect to PostgreSQL at {}", redact_url(url))
                })?;
            sqlx::migrate!("../migrations/postgres")
                .run(&pool)
                .await
                .context("could not migrate the PostgreSQL database")?;
            Ok(Self {
                events: Arc::new(Events::new(Some(pool.clone()))),
                db: Db::Postgres(pool),
                sqlite_writer: None,
                runner_cache: Default::default(),
                pipeline_cache: Default::default(),
                known_tokens: Default::default(),
                secrets_key: Default::default(),
            })
        } else {
            anyhow::bail!(
                "unsupported database url {}: use sqlite://PATH or postgres://USER@HOST/DB",
                redact_url(url)
            )
        }
    }

    /// The backend pool, for the PostgreSQL listener.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Whether this is the PostgreSQL backend.
    pub fn is_postgres(&self) -> bool {
        matches!(self.db, Db::Postgres(_))
    }

    /// Whether every write transaction runs under the store's own writer lock (SQLite), so
    /// that transactions never interleave.
    pub(crate) fn writes_serialised(&self) -> bool {
        self.sqlite_writer.is_some()
    }

    /// How a write transaction begins. On SQLite a deferred transaction that reads before it
    /// writes must upgrade its read lock, and that upgrade fails at once with "database is locked"
    /// (busy_timeout does not apply) when anything wrote since the read — the pool's own set-up of
    /// a new connection included. `BEGIN IMMEDIATE` takes the write lock up front and waits for it
    /// instead. PostgreSQL has no such mode.
    pub(crate) fn begin_write(&self) -> &'static str {
        if self.writes_serialised() {
            "BEGIN IMMEDIATE"
        } else {
            "BEGIN"
        }
    }

    /// What writes go through: SQLite's writer connection, locked until the [`Writer`] is
    /// dropped, or PostgreSQL's pool (no lock).
    ///
    /// A writer connection still in a transaction when it is taken would run the next write
    /// inside that transaction, which nobody commits: the write would seem to succeed and be lost.
    /// Usually the transaction is one a write dropped mid-way, whose rollback is queued on the
    /// connection's thread but not yet done; a ping waits for it. If the connection is still in a
    /// transaction after that (the rollback failed), it is opened again.
    pub(crate) async fn writer(&self) -> StoreResult<Writer<'_>> {
        let writer = match (&self.db, &self.sqlite_writer) {
            (Db::Postgres(pool), _) => return Ok(Writer::Postgres(pool)),
            (Db::Sqlite(_), writer) => writer
                .as_ref()
                .expect("an SQLite store opens its writer connection when it connects"),
        };
        let mut conn = writer.conn.lock().await;
        if conn.is_in_transaction() {
            let _ = conn.ping().await;
            if conn.is_in_transaction() {
                writer.reopen(&mut conn).await?;
            }
        }
        Ok(Writer::Sqlite(conn))
    }

    /// Opens SQLite's writer connection again if it is no longer usable: its thread stopped (a
    /// write then fails with an error), or it is stuck in a transaction. A pool would drop such a
    /// connection when it came back; the writer never goes back to one, so the reaper calls this
    /// on every tick. Answers whether it reopened. No-op on PostgreSQL.
    pub async fn check_writer(&self) -> StoreResult<bool> {
        let Some(writer) = &self.sqlite_writer else {
            return Ok(false);
        };
        let mut conn = writer.conn.lock().await;
        // The ping is answered after anything queued before it, a dropped transaction's rollback
        // included, so the transaction depth read after it is settled.
        if conn.ping().await.is_ok() && !conn.is_in_transaction() {
            return Ok(false);
        }
        writer.reopen(&mut conn).await?;
        Ok(true)
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> StoreResult<()> {
        dispatch!(self, pool => {
            sqlx::query("SELECT 1").execute(pool).await?;
        });
        Ok(())
    }

    /// Closes the pool.
    pub async fn close(&self) {
        dispatch!(self, pool => pool.close().await)
    }
}

/// Hides the password in a database URL so it can be printed.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// SHA-256 of a token, hex-encoded: the only form in which tokens are stored.
pub fn hash_token(token: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A fresh random token with a recognisable prefix (`opa_` API, `opr_` registration, `opn_` runner, `opl_` lease).
pub fn new_token(prefix: &str) -> String {
    use base64::Engine;
    let bytes: [u8; 32] = rand::random();
    format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("sqlite://x.db"), "sqlite://x.db");
    }

    /// A write dropped mid-transaction whose rollback never ran leaves the writer connection in
    /// its transaction, where later writes would run and never commit. The next write finds it
    /// so, and so does the reaper's check; either opens the writer again, and writes land.
    #[tokio::test]
    async fn a_writer_stuck_in_a_transaction_is_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("outpost.db").display());
        let store = Store::connect(&url, 4).await.unwrap();
        assert!(
            !store.check_writer().await.unwrap(),
            "a fresh writer is fine"
        );
        store
            .create_api_token("before", auth::Scope::Read, None)
            .await
            .unwrap();
        {
            let mut w = store.writer().await.unwrap();
            let Writer::Sqlite(ref mut conn) = w else {
                panic!("an SQLite store writes through its writer connection");
            };
            let tx = (**conn).begin_with("BEGIN IMMEDIATE").await.unwrap();
            // Neither committed nor rolled back, as when a rollback fails.
            std::mem::forget(tx);
        }
        // The next write finds it so, and gets a connection opened afresh.
        store
            .create_api_token("after", auth::Scope::Read, None)
            .await
            .unwrap();
        assert!(!store.check_writer().await.unwrap(), "then it is fine");
        {
            let mut w = store.writer().await.unwrap();
            let Writer::Sqlite(ref mut conn) = w else {
                panic!("an SQLite store writes through its writer connection");
            };
            std::mem::forget((**conn).begin_with("BEGIN IMMEDIATE").await.unwrap());
        }
        // So does the reaper's check.
        assert!(store.check_writer().await.unwrap(), "the check reopens it");
        store
            .create_api_token("last", auth::Scope::Read, None)
            .await
            .unwrap();
        let names: Vec<String> = store
            .list_api_tokens()
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert_eq!(names, ["before", "after", "last"]);
    }

    #[test]
    fn tokens_are_random_and_prefixed() {
        let a = new_token("opa_");
        let b = new_token("opa_");
        assert!(a.starts_with("opa_"));
        assert_ne!(a, b);
        assert_eq!(hash_token(&a).len(), 64);
        assert_ne!(hash_token(&a), hash_token(&b));
    }
}
