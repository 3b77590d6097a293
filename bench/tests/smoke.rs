//! The benchmark harness must never rot: a tiny run of every scenario, checking correctness (no
//! job lost or run twice, no log byte missing), never speed.

use std::process::Command;
use std::time::Duration;

fn smoke(backend: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_outpost-bench"))
        .args(["--smoke", "--backend", backend])
        .output()
        .expect("outpost-bench can be started");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "outpost-bench --smoke --backend {backend} failed with {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    for scenario in [
        "dispatch",
        "throughput",
        "logs",
        "live-log",
        "idle",
        "runner",
    ] {
        assert!(
            stdout.lines().any(|l| l.starts_with(scenario)),
            "the smoke run printed no figures for {scenario}:\n{stdout}"
        );
    }
}

/// Whether PostgreSQL answers on 127.0.0.1:5432 (or where OUTPOST_BENCH_PG_URL points).
fn postgres_reachable() -> bool {
    let addr = std::env::var("OUTPOST_BENCH_PG_URL")
        .ok()
        .and_then(|u| {
            let rest = u.split("://").nth(1)?.to_string();
            let host_port = rest.rsplit('@').next()?.split('/').next()?.to_string();
            Some(if host_port.contains(':') {
                host_port
            } else {
                format!("{host_port}:5432")
            })
        })
        .unwrap_or_else(|| "127.0.0.1:5432".to_string());
    let Ok(mut addrs) = std::net::ToSocketAddrs::to_socket_addrs(&addr) else {
        return false;
    };
    addrs.any(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(3)).is_ok())
}

#[test]
fn smoke_sqlite() {
    smoke("sqlite");
}

#[test]
fn smoke_postgres() {
    if !postgres_reachable() {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "PostgreSQL is not reachable and CI=true, so the PostgreSQL smoke run cannot be skipped"
        );
        println!("skipping: PostgreSQL is not reachable");
        return;
    }
    smoke("postgres");
}
