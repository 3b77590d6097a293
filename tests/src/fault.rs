//! Fault injection for the fault suite: a private PostgreSQL instance the test may stop and start,
//! a network namespace whose link the test may cut, and a tiny tmpfs that fills up.
//!
//! Every fixture undoes itself in `Drop`, also when the test panics, so that no server, namespace,
//! interface or mount outlives its test.
//! They need root (namespaces, mounts) and the PostgreSQL server binaries; when those are missing
//! the constructors return `None` with the reason printed, and in CI (`CI=true`) they panic.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use tempfile::TempDir;
use uuid::Uuid;

/// Runs a command to completion and returns its output; panics if it cannot be started.
fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"))
}

/// Runs a command and panics with its output if it fails.
fn run_ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn unavailable<T>(why: &str) -> Option<T> {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("a fault fixture is unavailable (and CI=true, so this fails): {why}");
    }
    println!("skipping: {why}");
    None
}

fn is_root() -> bool {
    // The effective uid is the second field of `Uid:` in /proc/self/status.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port can be found")
}

// ---------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------

/// A PostgreSQL instance of the test's own (initdb into a temporary directory, its own port, its
/// unix socket in that directory), so that the test can stop and restart it without touching the
/// machine's shared cluster.
pub struct PrivatePostgres {
    bin: PathBuf,
    dir: TempDir,
    port: u16,
    running: bool,
}

impl PrivatePostgres {
    /// Creates and starts the instance, or `None` (skip) when the server binaries are missing or
    /// the test does not run as root (the instance runs as the `postgres` user).
    pub fn start() -> Option<PrivatePostgres> {
        let Some(bin) = postgres_bin_dir() else {
            return unavailable("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin");
        };
        if !is_root() {
            return unavailable("a private PostgreSQL instance needs root (to run as `postgres`)");
        }
        let dir = tempfile::Builder::new()
            .prefix("outpost-e2e-pg-")
            .tempdir()
            .expect("a temporary directory can be created");
        if !run(Command::new("chown").arg("postgres:").arg(dir.path()))
            .status
            .success()
        {
            return unavailable("there is no `postgres` user to own the instance");
        }
        let pg = PrivatePostgres {
            bin,
            port: free_port(),
            dir,
            running: false,
        };
        run_ok(
            pg.as_postgres("initdb")
                .args([
                    "--auth=trust",
                    "--username=postgres",
                    "--encoding=UTF8",
                    "--no-sync",
                    "-D",
                ])
                .arg(pg.data_dir()),
        );
        let mut pg = pg;
        pg.start_server();
        Some(pg)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `runuser -u postgres -- BIN/TOOL`: PostgreSQL refuses to run as root.
    fn as_postgres(&self, tool: &str) -> Command {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"])
            .arg(self.bin.join(tool))
            // The test's own working directory may be closed to `postgres`.
            .current_dir(self.dir.path());
        cmd
    }

    fn pg_ctl(&self, action: &str) -> Command {
        let mut cmd = self.as_postgres("pg_ctl");
        cmd.arg(action).arg("-D").arg(self.data_dir());
        cmd
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start_server(&mut self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        run_ok(
            self.pg_ctl("start")
                .args(["-w", "-t", "60", "-o", &options, "-l"])
                .arg(self.dir.path().join("postgres.log")),
        );
        self.running = true;
    }

    /// Stops the server with `pg_ctl stop -m fast`: open connections are cut at once.
    pub fn stop_server(&mut self) {
        run_ok(self.pg_ctl("stop").args(["-w", "-m", "fast"]));
        self.running = false;
    }

    /// The admin URL of the instance's `postgres` database.
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Creates database `name` and returns its URL.
    pub fn create_database(&self, name: &str) -> String {
        run_ok(
            self.as_postgres("psql")
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-c"])
                .arg(format!("CREATE DATABASE \"{name}\"")),
        );
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// The instance's own log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if self.running {
            let _ = run(self.pg_ctl("stop").args(["-w", "-m", "immediate"]));
        }
    }
}

fn postgres_bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("pg_ctl").is_file() && p.join("initdb").is_file())
        .collect();
    dirs.sort();
    dirs.pop()
}

// ---------------------------------------------------------------------------
// Network namespace
// ---------------------------------------------------------------------------

/// A network namespace joined to the host by a veth pair on a private /30: the host end has
/// [`NetNs::host_ip`], the namespace end [`NetNs::ns_ip`]. [`NetNs::cut`] and [`NetNs::restore`]
/// take the host end down and up, which is a partition in both directions.
pub struct NetNs {
    name: String,
    host_if: String,
    host_ip: String,
    ns_ip: String,
}

impl NetNs {
    /// Creates the namespace, or `None` (skip) without root or `ip`.
    pub fn create() -> Option<NetNs> {
        if !is_root() {
            return unavailable("a network namespace needs root");
        }
        if !Path::new("/usr/sbin/ip").is_file() && !Path::new("/sbin/ip").is_file() {
            return unavailable("`ip` (iproute2) is not installed");
        }
        let id = Uuid::now_v7().simple().to_string();
        let tag = &id[id.len() - 8..];
        // A /30 out of 10.213.0.0/16 chosen from the id, so that tests running at once differ.
        let n = u16::from_str_radix(&tag[4..], 16).expect("hex") % 16384;
        let (third, fourth) = (n / 64, (n % 64) * 4);
        let ns = NetNs {
            name: format!("opns-{tag}"),
            host_if: format!("oph{tag}"),
            host_ip: format!("10.213.{third}.{}", fourth + 1),
            ns_ip: format!("10.213.{third}.{}", fourth + 2),
        };
        let peer = format!("opn{tag}");
        run_ok(Command::new("ip").args(["netns", "add", &ns.name]));
        run_ok(Command::new("ip").args([
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
        ]));
        run_ok(Command::new("ip").args(["link", "set", &peer, "netns", &ns.name]));
        run_ok(Command::new("ip").args([
            "addr",
            "add",
            &format!("{}/30", ns.host_ip),
            "dev",
            &ns.host_if,
        ]));
        run_ok(Command::new("ip").args(["link", "set", &ns.host_if, "up"]));
        for args in [
            vec!["addr", "add", &format!("{}/30", ns.ns_ip), "dev", &peer],
            vec!["link", "set", &peer, "up"],
            vec!["link", "set", "lo", "up"],
        ] {
            run_ok(
                Command::new("ip")
                    .args(["netns", "exec", &ns.name, "ip"])
                    .args(args),
            );
        }
        Some(ns)
    }

    /// The namespace's name, for `ip netns exec NAME …`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host's address on the link, where a server inside the host listens for the namespace.
    pub fn host_ip(&self) -> &str {
        &self.host_ip
    }

    /// The namespace's address on the link.
    pub fn ns_ip(&self) -> &str {
        &self.ns_ip
    }

    /// Cuts the link.
    pub fn cut(&self) {
        run_ok(Command::new("ip").args(["link", "set", &self.host_if, "down"]));
    }

    /// Restores the link.
    pub fn restore(&self) {
        run_ok(Command::new("ip").args(["link", "set", &self.host_if, "up"]));
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the host end removes its peer; deleting the namespace removes the rest.
        let _ = run(Command::new("ip").args(["link", "del", &self.host_if]));
        let _ = run(Command::new("ip").args(["netns", "del", &self.name]));
    }
}

// ---------------------------------------------------------------------------
// Tiny filesystem
// ---------------------------------------------------------------------------

/// A tmpfs of a fixed size mounted on a temporary directory, unmounted in `Drop`.
pub struct TinyFs {
    dir: Option<TempDir>,
}

impl TinyFs {
    /// Mounts a tmpfs of `bytes` bytes, or `None` (skip) without root.
    pub fn mount(bytes: u64) -> Option<TinyFs> {
        if !is_root() {
            return unavailable("mounting a tmpfs needs root");
        }
        let dir = tempfile::Builder::new()
            .prefix("outpost-e2e-tinyfs-")
            .tempdir()
            .expect("a temporary directory can be created");
        let out = run(Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={bytes},mode=0700"))
            .arg("tmpfs")
            .arg(dir.path()));
        if !out.status.success() {
            return unavailable(&format!(
                "could not mount a tmpfs: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Some(TinyFs { dir: Some(dir) })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("mounted").path()
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            let _ = run(Command::new("umount").arg("-l").arg(dir.path()));
            drop(dir);
        }
    }
}
