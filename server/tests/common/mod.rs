//! Set-up shared by the server's integration tests: a fresh PostgreSQL database per test.

use std::time::Duration;

const PG_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

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
