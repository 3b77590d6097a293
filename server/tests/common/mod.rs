//! Set-up shared by the server's integration tests: a database of its own per test, on SQLite or
//! PostgreSQL, and [`backend_tests!`], which runs each scenario once on each.
//!
//! Every test file compiles this module as its own and uses only part of it.

#![allow(dead_code, unused_macros)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use outpost_server::store::ClaimRequest;
use outpost_server::{Settings, Store};
use tempfile::TempDir;

const PG_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Which database a test's store uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file in the test's data directory.
    Sqlite,
    /// A fresh, uniquely named PostgreSQL database.
    Postgres,
}

/// A test's own database and data directory, both removed when it is dropped.
pub struct TestDb {
    dir: TempDir,
    pg: Option<PgDb>,
}

impl TestDb {
    /// A new empty database on `backend`, or `None` when the test should be skipped because
    /// PostgreSQL is unreachable outside CI (with `CI=true` that fails instead).
    pub async fn new(backend: Backend) -> Option<TestDb> {
        let dir = tempfile::tempdir().unwrap();
        let pg = match backend {
            Backend::Sqlite => None,
            // The test binary's name in the database's name says which file left it behind.
            Backend::Postgres => {
                Some(PgDb::new(concat!("outpost_", env!("CARGO_CRATE_NAME"))).await?)
            }
        };
        Some(TestDb { dir, pg })
    }

    /// The database's backend.
    pub fn backend(&self) -> Backend {
        match self.pg {
            Some(_) => Backend::Postgres,
            None => Backend::Sqlite,
        }
    }

    /// The data directory (it holds the SQLite file).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Server settings for this database: its data directory and URL, and a pool of 4.
    pub fn settings(&self) -> Settings {
        let mut settings = Settings {
            data_dir: self.dir.path().to_path_buf(),
            ..Default::default()
        };
        settings.database.url = self.pg.as_ref().map(|p| p.url.clone());
        settings.database.max_connections = 4;
        settings
    }

    /// The database's URL, as the server derives it from [`TestDb::settings`].
    pub fn url(&self) -> String {
        self.settings().database_url()
    }

    /// The store the server opens with [`TestDb::settings`].
    pub async fn open(&self) -> Arc<Store> {
        outpost_server::open_store(&self.settings())
            .await
            .expect("the store opens")
    }
}

/// `let Some(db) = TestDb::new(backend).await else { return };` as one line.
macro_rules! test_db {
    ($backend:expr) => {
        match $crate::common::TestDb::new($backend).await {
            Some(db) => db,
            None => return,
        }
    };
}

/// Runs one statement, built by `$query` (a `sqlx::query(…)` with its binds), against `$store`'s
/// database behind the store's back: `execute!(store, sqlx::query("…").bind(id));`.
#[allow(unused_macros)]
macro_rules! execute {
    ($store:expr, $query:expr) => {
        match $store.db() {
            outpost_server::store::Db::Sqlite(pool) => {
                $query.execute(pool).await.unwrap();
            }
            outpost_server::store::Db::Postgres(pool) => {
                $query.execute(pool).await.unwrap();
            }
        }
    };
}

/// Runs each scenario once on SQLite and once on PostgreSQL, as `sqlite::NAME` and
/// `postgres::NAME`.
///
/// A scenario is an `async fn(Backend)`, or, written `NAME with SETUP`, an `async fn(T)` whose
/// argument comes from `async fn SETUP(Backend) -> Option<T>` (`None` skips the test).
/// `multi_thread:` before the list runs the tests on tokio's multi-threaded runtime with two
/// workers, for scenarios that serve and call a server at once.
///
/// ```ignore
/// backend_tests!(multi_thread: many_viewers, delivers_secrets with env);
/// ```
macro_rules! backend_tests {
    (multi_thread: $($list:tt)+) => {
        backend_tests!(@mods [::tokio::test(flavor = "multi_thread", worker_threads = 2)] $($list)+);
    };
    // `$test` is the bracketed test attribute, one token tree so that it can go with each scenario.
    (@mods $test:tt $($scenario:ident $(with $setup:ident)?),+ $(,)?) => {
        mod sqlite {
            $(backend_tests!(@test $test Sqlite $scenario $($setup)?);)+
        }
        mod postgres {
            $(backend_tests!(@test $test Postgres $scenario $($setup)?);)+
        }
    };
    (@test [$($test:tt)+] $backend:ident $scenario:ident $($setup:ident)?) => {
        #[$($test)+]
        async fn $scenario() {
            let arg = $crate::common::Backend::$backend;
            $(let Some(arg) = super::$setup(arg).await else { return };)?
            super::$scenario(arg).await;
        }
    };
    // A list starts with a scenario's name, so a list that `@mods` refuses is reported, not
    // matched here again.
    ($first:ident $($rest:tt)*) => {
        backend_tests!(@mods [::tokio::test] $first $($rest)*);
    };
}

/// A uniquely named PostgreSQL database, dropped with the guard.
pub struct PgDb {
    /// The database's URL.
    pub url: String,
    name: String,
}

impl PgDb {
    /// `None` (with a message) when PostgreSQL is unreachable, unless `CI=true`, where that fails.
    pub async fn new(prefix: &str) -> Option<PgDb> {
        use sqlx::Connection;
        let admin = std::env::var("OUTPOST_TEST_PG_URL").unwrap_or_else(|_| PG_ADMIN_URL.into());
        let conn =
            tokio::time::timeout(Duration::from_secs(10), sqlx::PgConnection::connect(&admin))
                .await;
        let mut conn = match conn {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return skip(&admin, &e.to_string()),
            Err(_) => return skip(&admin, "timed out after 10 s"),
        };
        let name = format!("{prefix}_{}", uuid::Uuid::now_v7().simple());
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut conn)
            .await
            .expect("the test database can be created");
        let _ = conn.close().await;
        let (base, _) = admin.rsplit_once('/').expect("a database URL has a path");
        Some(PgDb {
            url: format!("{base}/{name}"),
            name,
        })
    }
}

fn skip<T>(url: &str, why: &str) -> Option<T> {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("PostgreSQL is not reachable at {url} (and CI=true, so this fails): {why}");
    }
    println!("skipping the PostgreSQL part: PostgreSQL is not reachable at {url}: {why}");
    None
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let admin = std::env::var("OUTPOST_TEST_PG_URL").unwrap_or_else(|_| PG_ADMIN_URL.into());
        let name = self.name.clone();
        // The test's runtime cannot be blocked on, so a thread with its own runtime drops it.
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async move {
                    use sqlx::Connection;
                    let mut conn = sqlx::PgConnection::connect(&admin).await?;
                    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                    )))
                    .execute(&mut conn)
                    .await?;
                    conn.close().await
                })
        })
        .join();
    }
}

/// Registers a runner with one label, as the claims of the store-level tests ask for jobs.
pub async fn runner(store: &Store, name: &str, label: &str) -> ClaimRequest {
    // Built from JSON so that fields added to the request later take their defaults.
    let req: outpost_protocol::RegisterRequest =
        serde_json::from_value(serde_json::json!({ "name": name, "labels": [label] })).unwrap();
    let resp = store.register_runner("default", &req).await.unwrap();
    ClaimRequest {
        runner_id: resp.runner_id,
        labels: vec![label.to_string()],
    }
}

/// Queues one run of pipeline `name` from `def`, as a test's trigger would.
pub async fn start_run(
    store: &Store,
    name: &str,
    def: &outpost_server::pipeline::PipelineDef,
) -> outpost_protocol::Run {
    store
        .create_run(
            outpost_server::store::NewRun {
                pipeline: name.into(),
                trigger: Default::default(),
                variables: Default::default(),
            },
            def,
        )
        .await
        .unwrap()
}

/// Stores `yaml` as pipeline `name` and queues one run of it, as a test's trigger would.
pub async fn queued_run(store: &Store, name: &str, yaml: &str) -> outpost_protocol::Run {
    let def = outpost_server::pipeline::parse(yaml).expect("the test pipeline parses");
    store.put_pipeline(name, yaml, &def).await.unwrap();
    start_run(store, name, &def).await
}
