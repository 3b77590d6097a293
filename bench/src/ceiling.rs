//! The hardware's limits on this machine, so the report can say what fraction of them Outpost
//! reaches: `pg_test_fsync` (single-writer durable commit rate), pgbench with a one-row update at
//! the same concurrency (group commit), and pgbench running Outpost's own claim statement
//! against a database that Outpost's migrations created and its API filled with queued jobs;
//! and the rate at which PostgreSQL itself stores log chunks, inserted straight into a table shaped
//! like `log_chunks`, with no server in between.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use futures::StreamExt;
use outpost_protocol::TriggerRunRequest;
use tokio::process::Command;

use crate::Sizes;
use crate::harness::{Backend, Db, Env, Server, pipeline_yaml};
use crate::report::Metrics;

/// A copy of `CLAIM_POSTGRES` from `server/src/store/jobs.rs`, used only when the source tree is
/// not there to read the current one from.
const CLAIM_POSTGRES_COPY: &str = "UPDATE jobs SET status = 'running', runner_id = $1, lease_token_hash = $2, \
     lease_expires_at = $3, heartbeat_seen = FALSE, attempt = attempt + 1, started_at = $4, cancel_requested = FALSE \
     WHERE status = 'queued' AND id = (SELECT p.id FROM outpost_pick_queued($5, 1) p) \
     RETURNING id, run_id, spec";

/// Extracts the text of `const NAME: &str = "…";` from Rust source, joining `\`-continued lines.
fn rust_str_const(source: &str, name: &str) -> Option<String> {
    let start = source.find(&format!("const {name}: &str = \""))?;
    let rest = &source[start..];
    let open = rest.find('"')? + 1;
    let mut out = String::new();
    let mut chars = rest[open..].chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                '\n' => {
                    while chars.peek().is_some_and(|c| c.is_whitespace()) {
                        chars.next();
                    }
                }
                '"' => out.push('"'),
                '\\' => out.push('\\'),
                'n' => out.push('\n'),
                other => {
                    out.push('\\');
                    out.push(other);
                }
            },
            c => out.push(c),
        }
    }
    None
}

/// Outpost's claim statement, read from the server's source when it is there.
fn claim_sql() -> (String, &'static str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../server/src/store/jobs.rs");
    if let Ok(src) = std::fs::read_to_string(&path)
        && let Some(sql) = rust_str_const(&src, "CLAIM_POSTGRES")
    {
        return (sql, "server/src/store/jobs.rs");
    }
    (CLAIM_POSTGRES_COPY.to_string(), "bench's copy")
}

/// The claim statement with its parameters written out as pgbench can run it.
fn claim_for_pgbench(sql: &str, runner: uuid::Uuid) -> anyhow::Result<String> {
    let mut s = sql.to_string();
    for (p, v) in [
        ("$1", format!("'{runner}'::uuid")),
        ("$2", "md5(random()::text)".to_string()),
        ("$3", "now() + interval '60 seconds'".to_string()),
        ("$4", "now()".to_string()),
        ("$5", "'[\"bench\"]'::jsonb".to_string()),
    ] {
        ensure!(s.contains(p), "the claim statement has no {p}: {sql}");
        s = s.replace(p, &v);
    }
    ensure!(
        !s.contains('$'),
        "the claim statement has more parameters than bench knows: {sql}"
    );
    Ok(s.split_whitespace().collect::<Vec<_>>().join(" "))
}

fn find_pg_tool(name: &str) -> anyhow::Result<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin").join(name))
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    if let Some(p) = found.pop() {
        return Ok(p);
    }
    which(name).with_context(|| format!("{name} is not installed (apt-get install postgresql)"))
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// Ops/s of each sync method for "one 8kB write", from pg_test_fsync's output.
fn parse_fsync(out: &str) -> Vec<(String, f64)> {
    let mut in_section = false;
    let mut rates = Vec::new();
    for line in out.lines() {
        if line.contains("using one 8kB write") {
            in_section = true;
            continue;
        }
        if in_section && line.starts_with("Compare") {
            break;
        }
        if in_section {
            let words: Vec<&str> = line.split_whitespace().collect();
            if words.len() >= 3
                && words[2] == "ops/sec"
                && let Ok(v) = words[1].parse::<f64>()
            {
                rates.push((words[0].to_string(), v));
            }
        }
    }
    rates
}

/// MB/s (10^6 bytes) of `mib` sequential 1 MiB writes, each followed by `fdatasync`.
fn sync_write_rate(path: &Path, mib: usize) -> anyhow::Result<f64> {
    use std::io::Write;
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let block: Vec<u8> = (0..1024 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut f = std::fs::File::create(path).context("creating the disk probe file")?;
    let started = std::time::Instant::now();
    for _ in 0..mib {
        f.write_all(&block)?;
        f.sync_data()?;
    }
    let took = started.elapsed();
    drop(f);
    let _ = std::fs::remove_file(path);
    Ok((mib * block.len()) as f64 / 1e6 / took.as_secs_f64())
}

/// Runs pgbench with `script`; returns transactions per second.
async fn pgbench(
    db_url: &str,
    script: &str,
    clients: usize,
    limit: &[&str],
) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("script.sql");
    std::fs::write(&file, script)?;
    let mut cmd = Command::new(find_pg_tool("pgbench")?);
    cmd.args([
        "-n",
        "-M",
        "prepared",
        "-c",
        &clients.to_string(),
        "-j",
        "2",
    ])
    .args(limit)
    .arg("-f")
    .arg(&file)
    .arg(db_url)
    .stdin(Stdio::null())
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(600), cmd.output())
        .await
        .map_err(|_| anyhow::anyhow!("pgbench took over 10 minutes"))?
        .context("could not run pgbench")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "pgbench failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("pgbench printed no tps: {stdout}"))
}

async fn psql_scalar(db_url: &str, sql: &str) -> anyhow::Result<String> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(db_url).await?;
    let v: (String,) = sqlx::query_as(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(&mut conn)
        .await?;
    let _ = conn.close().await;
    Ok(v.0)
}

async fn psql_exec(db_url: &str, sql: &str) -> anyhow::Result<()> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(db_url).await?;
    // One statement at a time: several in one string run as one transaction, where VACUUM cannot.
    for statement in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement.to_string()))
            .execute(&mut conn)
            .await
            .with_context(|| format!("running {statement}"))?;
    }
    let _ = conn.close().await;
    Ok(())
}

/// What PostgreSQL itself accepts as durable log appends: `writers` connections at once each
/// insert `bytes_per_writer` in rows of `chunk` bytes, one autocommit statement per row, into a
/// fresh table with the key and storage of `log_chunks` (`STORAGE EXTERNAL`), connected the way
/// the server connects (the same URL, so the same TLS). Answers MB/s (10^6 bytes per second).
async fn log_insert_rate(
    url: &str,
    writers: usize,
    bytes_per_writer: u64,
    chunk: usize,
) -> anyhow::Result<f64> {
    use sqlx::postgres::PgPoolOptions;
    let pool = PgPoolOptions::new()
        .max_connections(writers as u32)
        .connect(url)
        .await
        .context("could not connect to the ceiling database")?;
    sqlx::raw_sql(
        "DROP TABLE IF EXISTS bench_log_chunks; \
         CREATE TABLE bench_log_chunks (job_id UUID NOT NULL, start_offset BIGINT NOT NULL, \
           end_offset BIGINT NOT NULL, data BYTEA NOT NULL, PRIMARY KEY (job_id, start_offset)); \
         ALTER TABLE bench_log_chunks ALTER COLUMN data SET STORAGE EXTERNAL;",
    )
    .execute(&pool)
    .await?;
    // The logs scenario's text (not compressed anyway: `STORAGE EXTERNAL`).
    let text = crate::scenarios::logs::LogText::new(chunk).chunk(0, 0, chunk);
    let started = std::time::Instant::now();
    let inserted: Vec<anyhow::Result<u64>> = futures::future::join_all((0..writers).map(|_| {
        let pool = pool.clone();
        let text = &text;
        async move {
            let job = uuid::Uuid::now_v7();
            let mut offset = 0u64;
            while offset < bytes_per_writer {
                let len = chunk.min((bytes_per_writer - offset) as usize);
                sqlx::query(
                    "INSERT INTO bench_log_chunks (job_id, start_offset, end_offset, data) \
                     VALUES ($1, $2, $3, $4)",
                )
                .bind(job)
                .bind(offset as i64)
                .bind((offset + len as u64) as i64)
                .bind(&text[..len])
                .execute(&pool)
                .await?;
                offset += len as u64;
            }
            Ok(offset)
        }
    }))
    .await;
    let secs = started.elapsed().as_secs_f64();
    let mut total = 0u64;
    for r in inserted {
        total += r?;
    }
    let stored: (i64,) =
        sqlx::query_as("SELECT COALESCE(SUM(length(data)), 0)::BIGINT FROM bench_log_chunks")
            .fetch_one(&pool)
            .await?;
    ensure!(
        stored.0 as u64 == total,
        "the ceiling table holds {} bytes, {total} were inserted",
        stored.0
    );
    sqlx::raw_sql("DROP TABLE bench_log_chunks")
        .execute(&pool)
        .await?;
    pool.close().await;
    Ok(total as f64 / 1e6 / secs)
}

/// Runs the ceiling measurements once.
pub async fn run(
    env: &Env,
    sizes: &Sizes,
    clients: usize,
    claims_per_client: usize,
) -> anyhow::Result<Metrics> {
    let mut m = Metrics::default();

    // pg_test_fsync on the file system that holds the PostgreSQL data directory.
    let data_dir = psql_scalar(&env.pg_admin_url, "SHOW data_directory").await?;
    let method = psql_scalar(&env.pg_admin_url, "SHOW wal_sync_method").await?;
    let probe_dir = tempfile::Builder::new()
        .prefix("outpost-bench-fsync-")
        .tempdir()?;
    {
        use std::os::unix::fs::MetadataExt;
        let same = std::fs::metadata(&data_dir)
            .and_then(|a| std::fs::metadata(probe_dir.path()).map(|b| a.dev() == b.dev()))
            .unwrap_or(false);
        if !same {
            eprintln!(
                "note: {} is not on the file system of the PostgreSQL data directory {data_dir}",
                probe_dir.path().display()
            );
        }
    }
    let out = Command::new(find_pg_tool("pg_test_fsync")?)
        .args(["-s", "3", "-f"])
        .arg(probe_dir.path().join("probe"))
        .stdin(Stdio::null())
        .output()
        .await
        .context("could not run pg_test_fsync")?;
    ensure!(
        out.status.success(),
        "pg_test_fsync failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rates = parse_fsync(&String::from_utf8_lossy(&out.stdout));
    ensure!(!rates.is_empty(), "could not read pg_test_fsync's output");
    for (name, v) in &rates {
        m.push(format!("fsync_{name}_ops_per_s"), "ops/s", *v);
    }
    if let Some((_, v)) = rates.iter().find(|(n, _)| *n == method) {
        m.push("durable_commits_per_s_single", "commits/s", *v);
    }

    // The disk's rate for what a durable 1 MiB log append needs at least: write 1 MiB, sync it.
    let probe = probe_dir.path().join("append-probe");
    let mb_per_s = tokio::task::spawn_blocking(move || sync_write_rate(&probe, 256))
        .await
        .context("the disk probe panicked")??;
    m.push("disk_1mib_sync_writes_mb_per_s", "MB/s", mb_per_s);

    // Log chunks stored by PostgreSQL alone, in the logs scenario's sizes (several logs at once,
    // then one big log), each case on a fresh database as the logs scenario has.
    let chunk = sizes.chunk_kib * 1024;
    let cases = [
        ("multi", sizes.log_jobs, sizes.log_mib as u64 * 1024 * 1024),
        ("big", 1, sizes.big_log_mib as u64 * 1024 * 1024),
    ];
    for (label, writers, bytes) in cases {
        if writers == 0 || bytes == 0 {
            continue;
        }
        let db = Db::create(env, Backend::Postgres).await?;
        let rate = log_insert_rate(db.url(), writers, bytes, chunk).await?;
        m.push(format!("log_insert_{label}_mb_per_s"), "MB/s", rate);
    }

    // A database Outpost migrated and filled with queued jobs through its API.
    let db = Db::create(env, Backend::Postgres).await?;
    let jobs_needed = clients * claims_per_client;
    let per_run = 100;
    let runs = jobs_needed.div_ceil(per_run);
    let server = Server::start(env, &db, &[]).await?;
    let filled: anyhow::Result<uuid::Uuid> = async {
        server
            .admin
            .apply_pipeline("claim", &pipeline_yaml(per_run))
            .await?;
        let results: Vec<_> = futures::stream::iter(0..runs)
            .map(|_| async {
                server
                    .admin
                    .trigger_run("claim", &TriggerRunRequest::default())
                    .await
            })
            .buffer_unordered(8)
            .collect()
            .await;
        for r in results {
            r.context("trigger")?;
        }
        let runner = server.register_runners(1, 1).await?;
        let list = server.admin.list_runners().await?;
        drop(runner);
        Ok(list.runners[0].id)
    }
    .await;
    server.stop().await?;
    let runner_id = filled?;
    let url = db.url().to_string();

    let (sql, source) = claim_sql();
    let claim = claim_for_pgbench(&sql, runner_id)?;
    eprintln!("claim statement (from {source}):\n  {claim}");
    let per = claims_per_client.to_string();
    let reset = "UPDATE jobs SET status = 'queued', runner_id = NULL, lease_token_hash = NULL, \
                 lease_expires_at = NULL, attempt = 0, started_at = NULL; \
                 UPDATE runs SET status = 'queued', started_at = NULL; VACUUM ANALYZE jobs; VACUUM ANALYZE runs;";
    psql_exec(&url, "VACUUM ANALYZE jobs; VACUUM ANALYZE runs;").await?;

    let count_running = || async {
        psql_scalar(
            &url,
            "SELECT count(*)::text FROM jobs WHERE status = 'running'",
        )
        .await
    };
    // The claim statement on its own (autocommit).
    let tps = pgbench(&url, &format!("{claim};\n"), clients, &["-t", &per]).await?;
    let claimed: usize = count_running().await?.parse()?;
    if claimed != jobs_needed {
        bail!("pgbench claimed {claimed} jobs, {jobs_needed} expected");
    }
    m.push("claim_stmt_per_s", "claims/s", tps);

    // The claim transaction as Outpost runs it: the claim, then the run's status, one commit.
    psql_exec(&url, reset).await?;
    let txn = format!(
        "BEGIN;\n{claim} \\gset\nUPDATE runs SET status = 'running', started_at = COALESCE(started_at, now()) \
         WHERE id = :run_id AND status = 'queued';\nEND;\n"
    );
    let tps = pgbench(&url, &txn, clients, &["-t", &per]).await?;
    let claimed: usize = count_running().await?.parse()?;
    if claimed != jobs_needed {
        bail!("pgbench claimed {claimed} jobs in transactions, {jobs_needed} expected");
    }
    m.push("claim_txn_per_s", "claims/s", tps);

    // Group-commit rate at the same concurrency: a one-row update per transaction.
    psql_exec(
        &url,
        "CREATE TABLE bench_commit (id INT PRIMARY KEY, n BIGINT NOT NULL DEFAULT 0); \
         INSERT INTO bench_commit (id) SELECT generate_series(1, 64);",
    )
    .await?;
    let tps = pgbench(
        &url,
        "\\set id random(1, 64)\nUPDATE bench_commit SET n = n + 1 WHERE id = :id;\n",
        clients,
        &["-T", "5"],
    )
    .await?;
    m.push("durable_commits_per_s_group", "commits/s", tps);
    m.push("pgbench_clients", "count", clients as f64);
    drop(db);
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_claim_statement_from_rust_source() {
        let src = "const X: &str = \"a \\\n     b\";\nconst CLAIM_POSTGRES: &str = \"UPDATE jobs SET x = $1, \\\n     y = $2 \\\n     RETURNING id\";\n";
        assert_eq!(
            rust_str_const(src, "CLAIM_POSTGRES").as_deref(),
            Some("UPDATE jobs SET x = $1, y = $2 RETURNING id")
        );
        let (sql, _) = claim_sql();
        let ready = claim_for_pgbench(&sql, uuid::Uuid::nil()).unwrap();
        // The claim picks through `outpost_pick_queued` (migration 0007), with every parameter
        // written out.
        assert!(ready.contains("outpost_pick_queued("), "{ready}");
        assert!(!ready.contains('$'), "{ready}");
    }

    #[test]
    fn parses_pg_test_fsync() {
        let out = "Compare file sync methods using one 8kB write:\n\
                   (in wal_sync_method preference order, except fdatasync is Linux's default)\n\
                   \x20       open_datasync                      1000.1 ops/sec     999 usecs/op\n\
                   \x20       fdatasync                          2000.5 ops/sec     499 usecs/op\n\
                   \x20       fsync_writethrough                              n/a\n\
                   \nCompare file sync methods using two 8kB writes:\n\
                   \x20       fdatasync                          5.0 ops/sec\n";
        assert_eq!(
            parse_fsync(out),
            vec![
                ("open_datasync".to_string(), 1000.1),
                ("fdatasync".to_string(), 2000.5)
            ]
        );
    }
}
