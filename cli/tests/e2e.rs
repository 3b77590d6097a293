//! End to end: a real `outpost-server serve`, a real `outpost-runner`, driven through the
//! `outpost` binary the way a person or a CI script would drive it.
//!
//! The server and runner binaries are taken from the `target/<profile>` directory that holds
//! this test (build them first with `cargo build --workspace --bins`; `cargo test --workspace`
//! does).
//! Every test starts its own server on `127.0.0.1:0` with its own SQLite file, and every process
//! it starts is killed when the test ends, however it ends.
//! Set `TEST_LOG` to see what the server and runner print.

#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long the server may take to print its listening line (debug build, migrations).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one `outpost` or admin command may take, following a run included.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// How often waits look again.
const POLL: Duration = Duration::from_millis(20);

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

/// `target/<profile>`: this test lives in `target/<profile>/deps/`.
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows where it is");
    exe.parent()
        .and_then(Path::parent)
        .expect("the test binary lives in target/<profile>/deps")
        .to_path_buf()
}

/// A workspace binary next to this test; panics with what to do when it was not built.
fn workspace_binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} does not exist: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// A command with no `OUTPOST*` variables from the caller's environment, so that a developer's
/// own token or server never leaks into a test.
fn clean_command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("OUTPOST") {
            cmd.env_remove(key);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

fn test_log() -> bool {
    std::env::var_os("TEST_LOG").is_some()
}

/// Bytes a child printed, collected by a thread as they come.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn collect(self, mut from: impl Read + Send + 'static, label: String) -> Self {
        let sink = self.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if test_log() {
                            eprint!("[{label}] {}", String::from_utf8_lossy(&buf[..n]));
                        }
                        sink.0.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                }
            }
        });
        self
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// A long-running child, killed when dropped.
struct Daemon {
    child: Child,
    name: &'static str,
    output: Captured,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() && !test_log() {
            eprintln!("---- {} output ----\n{}", self.name, self.output.text());
        }
    }
}

/// What a finished command printed.
#[derive(Debug)]
struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Output {
    fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }
}

/// A running command whose output is collected while it runs; killed when dropped.
struct Running {
    child: Child,
    what: String,
    stdout: Captured,
    stderr: Captured,
}

impl Running {
    fn spawn(mut cmd: Command, what: String) -> Running {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("could not start `{what}`: {e}"));
        let stdout =
            Captured::default().collect(child.stdout.take().unwrap(), format!("{what} stdout"));
        let stderr =
            Captured::default().collect(child.stderr.take().unwrap(), format!("{what} stderr"));
        Running {
            child,
            what,
            stdout,
            stderr,
        }
    }

    /// Waits until stdout contains `needle`, or panics at the deadline.
    fn wait_for_stdout(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.stdout.text().contains(needle) {
            if let Ok(Some(status)) = self.child.try_wait() {
                // It may have printed the needle just before exiting.
                thread::sleep(POLL);
                assert!(
                    self.stdout.text().contains(needle),
                    "`{}` exited with {status} before printing {needle:?}\nstdout:\n{}\nstderr:\n{}",
                    self.what,
                    self.stdout.text(),
                    self.stderr.text()
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "`{}` did not print {needle:?} within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                self.what,
                self.stdout.text(),
                self.stderr.text()
            );
            thread::sleep(POLL);
        }
    }

    /// Waits for the exit (and for the output to be read to its end), or panics at the deadline.
    fn finish(mut self, timeout: Duration) -> Output {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("waiting for a child works") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "`{}` did not finish within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                    self.what,
                    self.stdout.text(),
                    self.stderr.text()
                );
            }
            thread::sleep(POLL);
        };
        // The reader threads see end-of-file once the pipes close, right after the exit.
        let settle = Instant::now() + Duration::from_secs(10);
        let mut last = (usize::MAX, usize::MAX);
        loop {
            let now = (self.stdout.text().len(), self.stderr.text().len());
            if now == last || Instant::now() >= settle {
                break;
            }
            last = now;
            thread::sleep(Duration::from_millis(50));
        }
        let out = Output {
            status,
            stdout: self.stdout.text(),
            stderr: self.stderr.text(),
        };
        if test_log() {
            eprintln!(
                "[{}] exit {}\n{}{}",
                self.what, status, out.stdout, out.stderr
            );
        }
        out
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a command to its end and insists that it succeeds; returns its trimmed stdout.
fn run_ok(cmd: Command, what: &str) -> String {
    let out = Running::spawn(cmd, what.to_string()).finish(COMMAND_TIMEOUT);
    assert!(
        out.status.success(),
        "`{what}` failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    out.stdout.trim().to_string()
}

// ---------------------------------------------------------------------------
// The world: a server, maybe a runner, and the `outpost` binary pointed at them
// ---------------------------------------------------------------------------

struct World {
    url: String,
    token: String,
    // Dropped in this order: the runner before the server it talks to, and both before their
    // directory is removed.
    _runner: Option<Daemon>,
    _server: Daemon,
    dir: TempDir,
}

impl World {
    /// A server (and, with `runner`, a runner labelled `local`) with an admin token.
    fn start(runner: bool) -> World {
        let dir = tempfile::Builder::new()
            .prefix("outpost-cli-e2e-")
            .tempdir()
            .expect("a temporary directory can be created");
        let server_bin = workspace_binary("outpost-server");
        let server_cmd = |args: &[&str]| {
            let mut cmd = clean_command(&server_bin);
            cmd.env("OUTPOST__DATA_DIR", dir.path().join("data"))
                .env(
                    "OUTPOST__DATABASE__URL",
                    format!("sqlite://{}/o.db", dir.path().display()),
                )
                .env("OUTPOST__SERVER__LISTEN", "127.0.0.1:0")
                .args(args);
            cmd
        };

        let token = run_ok(
            server_cmd(&["token", "create", "--name", "x", "--scope", "admin"]),
            "outpost-server token create",
        );
        assert!(
            !token.is_empty() && !token.contains(char::is_whitespace),
            "`token create` should print only a token, not {token:?}"
        );

        let mut child = server_cmd(&["serve"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("outpost-server can be started");
        let output = Captured::default().collect(child.stderr.take().unwrap(), "server".into());
        let stdout = child.stdout.take().unwrap();
        let server = Daemon {
            child,
            name: "outpost-server",
            output,
        };
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
            while let Some(Ok(line)) = lines.next() {
                if let Some(url) = line.strip_prefix("outpost-server listening on ") {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        let url = rx.recv_timeout(START_TIMEOUT).unwrap_or_else(|_| {
            panic!(
                "outpost-server did not print its listening line within {START_TIMEOUT:?}:\n{}",
                server.output.text()
            )
        });

        let runner = runner.then(|| {
            let registration = run_ok(
                server_cmd(&["registration-token", "create", "--pool", "p"]),
                "outpost-server registration-token create",
            );
            let runner_bin = workspace_binary("outpost-runner");
            let config_dir = dir.path().join("runner");
            let mut register = clean_command(&runner_bin);
            register
                .args(["register", "--server", &url, "--token", &registration])
                .args(["--name", "r", "--labels", "local", "--config-dir"])
                .arg(&config_dir);
            run_ok(register, "outpost-runner register");
            let mut run = clean_command(&runner_bin);
            run.args(["run", "--config-dir"])
                .arg(&config_dir)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = run.spawn().expect("outpost-runner can be started");
            let output = Captured::default();
            output
                .clone()
                .collect(child.stdout.take().unwrap(), "runner".into());
            output
                .clone()
                .collect(child.stderr.take().unwrap(), "runner".into());
            Daemon {
                child,
                name: "outpost-runner",
                output,
            }
        });

        World {
            dir,
            url,
            token,
            _runner: runner,
            _server: server,
        }
    }

    /// `outpost ARGS` against `server` with the admin token (in `OUTPOST_TOKEN`, as people do).
    fn outpost_at(&self, server: &str, args: &[&str]) -> Command {
        let mut cmd = clean_command(Path::new(env!("CARGO_BIN_EXE_outpost")));
        cmd.env("OUTPOST_SERVER", server)
            .env("OUTPOST_TOKEN", &self.token)
            .args(args);
        cmd
    }

    /// Runs `outpost ARGS` to its end.
    fn outpost(&self, args: &[&str]) -> Output {
        let cmd = self.outpost_at(&self.url, args);
        Running::spawn(cmd, format!("outpost {}", args.join(" "))).finish(COMMAND_TIMEOUT)
    }

    /// Writes a pipeline file into the test's directory.
    fn file(&self, name: &str, yaml: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, yaml).expect("the pipeline file can be written");
        path
    }

    /// Applies a pipeline from a file named after it.
    fn apply(&self, name: &str, yaml: &str) {
        let path = self.file(&format!("{name}.yaml"), yaml);
        let out = self.outpost(&["pipeline", "apply", path.to_str().unwrap()]);
        assert_eq!(out.code(), 0, "pipeline apply failed: {out:?}");
        assert!(
            out.stdout.contains(&format!("pipeline {name} created")),
            "{out:?}"
        );
    }
}

/// The run id from the first line `run` prints: `Run NAME #N started: ID`.
fn run_id(stdout: &str) -> String {
    let first = stdout.lines().next().unwrap_or_default();
    first
        .split_once("started: ")
        .map(|(_, id)| id.trim().to_string())
        .unwrap_or_else(|| panic!("`run` should start with `Run … started: ID`, not {first:?}"))
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

// The step output is computed by the shell (`$((…))`), so it appears in the log only when the
// step really ran, never merely because the runner echoes the script.
const TWO_JOBS: &str = "\
description: Two jobs, one after the other
jobs:
  build:
    runs_on: [local]
    steps:
      - run: echo \"build-output-$((40 + 2))\"
  deploy:
    needs: [build]
    runs_on: [local]
    steps:
      - name: Deploy
        run: echo \"deploy-output-$((50 + 8))\"
";

const FAILING: &str = "\
jobs:
  check:
    runs_on: [local]
    steps:
      - run: |
          echo \"check-output-$((1 + 1))\"
          exit 3
  after:
    needs: [check]
    runs_on: [local]
    steps:
      - run: echo never
";

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn run_follow_streams_every_job_and_exits_zero() {
    let world = World::start(true);
    world.apply("two", TWO_JOBS);

    let out = world.outpost(&["run", "two", "--var", "X=1", "--follow"]);
    assert_eq!(out.code(), 0, "{out:?}");
    let build = out
        .stdout
        .find("build-output-42\n")
        .unwrap_or_else(|| panic!("no build output in {}", out.stdout));
    let deploy = out
        .stdout
        .find("deploy-output-58\n")
        .unwrap_or_else(|| panic!("no deploy output in {}", out.stdout));
    assert!(build < deploy, "jobs out of order:\n{}", out.stdout);
    assert!(out.stdout.contains("==> job build\n"), "{}", out.stdout);
    assert!(
        out.stdout.contains("==> job deploy succeeded\n"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.trim_end().ends_with("succeeded"),
        "{}",
        out.stdout
    );

    // The stored log of the whole run, after the fact.
    let id = run_id(&out.stdout);
    let logs = world.outpost(&["logs", &id]);
    assert_eq!(logs.code(), 0, "{logs:?}");
    assert!(logs.stdout.contains("build-output-42\n"), "{logs:?}");
    assert!(logs.stdout.contains("deploy-output-58\n"), "{logs:?}");

    // The run is listed, in a table and as JSON.
    let runs = world.outpost(&["runs", "--pipeline", "two"]);
    assert_eq!(runs.code(), 0, "{runs:?}");
    let row = runs
        .stdout
        .lines()
        .find(|l| l.contains(&id))
        .unwrap_or_else(|| panic!("run {id} not listed:\n{}", runs.stdout));
    assert!(row.starts_with("#1 ") && row.contains("succeeded"), "{row}");
    let runs = world.outpost(&["runs", "--output", "json", "--status", "succeeded"]);
    assert_eq!(json(&runs.stdout)["runs"][0]["id"], id.as_str());

    let runners = world.outpost(&["runners"]);
    assert_eq!(runners.code(), 0, "{runners:?}");
    assert!(
        runners
            .stdout
            .lines()
            .any(|l| l.starts_with("r ") && l.contains("local")),
        "{}",
        runners.stdout
    );

    // Applying the same file again replaces the pipeline.
    let path = world.file("two.yaml", TWO_JOBS);
    let again = world.outpost(&["pipeline", "apply", path.to_str().unwrap()]);
    assert!(again.stdout.contains("pipeline two updated"), "{again:?}");
    let list = world.outpost(&["pipeline", "list"]);
    assert!(list.stdout.contains("build,deploy"), "{list:?}");
}

#[test]
fn a_failing_step_fails_the_run_with_exit_one() {
    let world = World::start(true);
    world.apply("failing", FAILING);

    let out = world.outpost(&["run", "failing", "--follow"]);
    assert_eq!(out.code(), 1, "{out:?}");
    assert!(out.stdout.contains("check-output-2\n"), "{out:?}");
    assert!(
        out.stdout.contains("==> job check failed (exit code 3)"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("==> job after skipped"),
        "{}",
        out.stdout
    );

    // `logs` of the failed run shows the log and fails the same way.
    let id = run_id(&out.stdout);
    let logs = world.outpost(&["logs", &id]);
    assert_eq!(logs.code(), 1, "{logs:?}");
    assert!(logs.stdout.contains("check-output-2\n"), "{logs:?}");

    // JSON lines while following: one object per line, the last one the run's end.
    let out = world.outpost(&["run", "failing", "-f", "-o", "json"]);
    assert_eq!(out.code(), 1, "{out:?}");
    let events: Vec<serde_json::Value> = out.stdout.lines().map(json).collect();
    assert_eq!(events[0]["event"], "run");
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "log" && e["text"].as_str().unwrap().contains("check-output-2"))
    );
    let last = events.last().unwrap();
    assert_eq!(last["event"], "run_end");
    assert_eq!(last["run"]["status"], "failed");
}

#[test]
fn mistakes_exit_two_and_say_what_to_do() {
    let world = World::start(false);

    let mut cmd = world.outpost_at(&world.url, &["runs"]);
    cmd.env("OUTPOST_TOKEN", "opa_not-a-real-token");
    let out = Running::spawn(cmd, "outpost runs (bad token)".into()).finish(COMMAND_TIMEOUT);
    assert_eq!(out.code(), 2, "{out:?}");
    assert!(
        out.stderr.contains("the token is not valid") && out.stderr.contains("OUTPOST_TOKEN"),
        "{out:?}"
    );

    let mut cmd = world.outpost_at(&world.url, &["runs"]);
    cmd.env_remove("OUTPOST_TOKEN");
    let out = Running::spawn(cmd, "outpost runs (no token)".into()).finish(COMMAND_TIMEOUT);
    assert_eq!(out.code(), 2, "{out:?}");
    assert!(
        out.stderr.contains("set OUTPOST_TOKEN or pass --token"),
        "{out:?}"
    );

    // Nothing listens on a port that was just freed.
    let free = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let nowhere = format!("http://{free}");
    let cmd = world.outpost_at(&nowhere, &["runners"]);
    let out = Running::spawn(cmd, "outpost runners (no server)".into()).finish(COMMAND_TIMEOUT);
    assert_eq!(out.code(), 2, "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "could not reach the Outpost server at {nowhere}: "
        )),
        "{out:?}"
    );

    // A malformed pipeline names the file, the line and the column; the good file still lands.
    let bad = world.file(
        "bad.yaml",
        "jobs:\n  x:\n    runs_on: [local]\n    steps:\n      - frobnicate: yes\n",
    );
    let good = world.file("good.yaml", TWO_JOBS);
    let out = world.outpost(&[
        "pipeline",
        "apply",
        bad.to_str().unwrap(),
        good.to_str().unwrap(),
    ]);
    assert_eq!(out.code(), 2, "{out:?}");
    assert!(
        out.stderr
            .contains(&format!("{}: line 5, column ", bad.display())),
        "{out:?}"
    );
    assert!(out.stdout.contains("pipeline good created"), "{out:?}");

    // Ids that are neither a run nor a job.
    let out = world.outpost(&["logs", "01a2229e-c5b6-7010-bcc1-79f5dcd43682"]);
    assert_eq!(out.code(), 2, "{out:?}");
    assert!(out.stderr.contains("no run or job has the id"), "{out:?}");
    let out = world.outpost(&["run", "no-such-pipeline"]);
    assert_eq!(out.code(), 2, "{out:?}");
    assert!(out.stderr.contains("not found"), "{out:?}");
}

/// A TCP proxy whose connections the test can cut, to drop a live log stream.
struct CuttingProxy {
    addr: SocketAddr,
    open: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl CuttingProxy {
    fn start(upstream: SocketAddr) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (open2, stop2) = (open.clone(), stop.clone());
        thread::spawn(move || {
            for client in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                open2.lock().unwrap().push(client.try_clone().unwrap());
                pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
                pipe(server, client);
            }
        });
        CuttingProxy { addr, open, stop }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drops every connection open now, mid-response or not.
    fn cut(&self) {
        for conn in self.open.lock().unwrap().drain(..) {
            let _ = conn.shutdown(Shutdown::Both);
        }
    }
}

/// Copies `from` into `to` on a thread until either side closes.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect(self.addr);
        self.cut();
    }
}

#[test]
fn logs_follow_resumes_after_dropped_connections_without_loss_or_repeats() {
    let world = World::start(true);
    world.apply(
        "ticker",
        "jobs:\n  tick:\n    runs_on: [local]\n    steps:\n      - run: |\n          \
         for i in $(seq 1 40); do echo \"tick-$i\"; sleep 0.1; done\n",
    );
    let started = world.outpost(&["run", "ticker", "-o", "json"]);
    assert_eq!(started.code(), 0, "{started:?}");
    let job = json(&started.stdout)["jobs"][0]["id"]
        .as_str()
        .expect("the new run lists its jobs")
        .to_string();

    let upstream: SocketAddr = world
        .url
        .trim_start_matches("http://")
        .parse()
        .expect("the server URL is http://IP:PORT");
    let proxy = CuttingProxy::start(upstream);
    let mut follow = Running::spawn(
        world.outpost_at(&proxy.url(), &["logs", &job, "-f"]),
        "outpost logs -f (through the proxy)".into(),
    );
    follow.wait_for_stdout("tick-5\n", COMMAND_TIMEOUT);
    proxy.cut();
    follow.wait_for_stdout("tick-20\n", COMMAND_TIMEOUT);
    proxy.cut();
    let followed = follow.finish(COMMAND_TIMEOUT);
    assert_eq!(followed.code(), 0, "{followed:?}");
    assert!(
        followed.stderr.contains("reconnecting"),
        "the connection was cut, yet no reconnection was reported: {followed:?}"
    );

    // What was followed across the cuts is the stored log, byte for byte.
    let stored = world.outpost(&["logs", &job]);
    assert_eq!(stored.code(), 0, "{stored:?}");
    assert!(stored.stdout.contains("tick-40\n"), "{stored:?}");
    assert_eq!(followed.stdout, stored.stdout);
}
