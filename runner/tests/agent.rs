//! `run()` over real HTTP, through the protocol client, against a minimal loopback stand-in for
//! the job server that speaks the runner protocol's wire format (the real server is tested
//! end to end under `tests/`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_protocol::{
    AcquireResponse, AssignedJob, CompleteRequest, JobStatus, Lease, StepAction, StepSpec,
    StepUpdate, TriggerInfo, When,
};
use outpost_runner::{Credentials, RunOptions, Settings};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const RUNNER_TOKEN: &str = "runner-token";
const LEASE_TOKEN: &str = "lease-token";

#[derive(Default)]
struct State {
    /// Jobs handed out by the next acquires, in order.
    jobs: Vec<AcquireResponse>,
    /// Status every acquire answers instead, if set.
    acquire_status: Option<u16>,
    /// `METHOD path auth` for every request.
    calls: Vec<String>,
    log: Vec<u8>,
    steps: Vec<(String, StepUpdate)>,
    complete: Option<CompleteRequest>,
}

#[derive(Clone, Default)]
struct Fake {
    state: Arc<Mutex<State>>,
}

impl Fake {
    async fn start(self) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let me = self.clone();
                tokio::spawn(async move { me.handle(stream).await });
            }
        });
        url
    }

    fn log(&self) -> String {
        String::from_utf8_lossy(&self.state.lock().unwrap().log).into_owned()
    }

    async fn handle(self, stream: TcpStream) {
        let mut reader = BufReader::new(stream);
        loop {
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).await.unwrap_or(0) == 0 {
                return;
            }
            let mut parts = request_line.split_whitespace();
            let method = parts.next().unwrap_or_default().to_string();
            let path = parts.next().unwrap_or_default().to_string();
            let mut length = 0usize;
            let mut auth = String::new();
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).await.unwrap_or(0) == 0 {
                    return;
                }
                let header = header.trim_end();
                if header.is_empty() {
                    break;
                }
                let (name, value) = header.split_once(':').unwrap();
                match name.to_ascii_lowercase().as_str() {
                    "content-length" => length = value.trim().parse().unwrap(),
                    "authorization" => auth = value.trim().to_string(),
                    _ => {}
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).await.unwrap();
            let (status, reply) = self.route(&method, &path, &auth, &body).await;
            let response = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{reply}",
                reply.len()
            );
            if reader
                .get_mut()
                .write_all(response.as_bytes())
                .await
                .is_err()
            {
                return;
            }
        }
    }

    async fn route(&self, method: &str, path: &str, auth: &str, body: &[u8]) -> (u16, String) {
        let error = |code: &str| format!(r#"{{"error":{{"code":"{code}","message":"{code}"}}}}"#);
        self.state
            .lock()
            .unwrap()
            .calls
            .push(format!("{method} {path} {auth}"));
        if path == "/api/v1/runner/acquire" {
            if auth != format!("Bearer {RUNNER_TOKEN}") {
                return (401, error("unauthorized"));
            }
            let next = {
                let mut s = self.state.lock().unwrap();
                if let Some(status) = s.acquire_status {
                    return (status, error("refused"));
                }
                (!s.jobs.is_empty()).then(|| s.jobs.remove(0))
            };
            return match next {
                Some(job) => (200, serde_json::to_string(&job).unwrap()),
                None => {
                    // A short long poll.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    (204, String::new())
                }
            };
        }
        if auth != format!("Bearer {LEASE_TOKEN}") {
            return (409, error("lease_lost"));
        }
        let mut s = self.state.lock().unwrap();
        if path.ends_with("/heartbeat") {
            let expires = chrono::Utc::now() + chrono::Duration::seconds(4);
            return (
                200,
                format!(
                    r#"{{"expires_at":"{}","cancel_requested":false}}"#,
                    expires.to_rfc3339()
                ),
            );
        }
        if let Some(q) = path.split_once("/log?offset=") {
            let offset: usize = q.1.parse().unwrap();
            if offset > s.log.len() {
                let len = s.log.len();
                return (
                    416,
                    format!(r#"{{"error":{{"code":"gap","message":"gap"}},"next_offset":{len}}}"#),
                );
            }
            let skip = s.log.len() - offset;
            if skip < body.len() {
                s.log.extend_from_slice(&body[skip..]);
            }
            return (200, format!(r#"{{"next_offset":{}}}"#, s.log.len()));
        }
        if path.contains("/steps/") {
            let index = path.rsplit('/').next().unwrap().to_string();
            s.steps.push((index, serde_json::from_slice(body).unwrap()));
            return (200, "{}".into());
        }
        if path.ends_with("/complete") {
            s.complete = Some(serde_json::from_slice(body).unwrap());
            return (200, "{}".into());
        }
        (404, error("not_found"))
    }
}

fn assignment(script: &str) -> AcquireResponse {
    AcquireResponse {
        job: AssignedJob {
            id: Uuid::now_v7(),
            run_id: Uuid::now_v7(),
            run_number: 1,
            pipeline: "web".into(),
            name: "deploy".into(),
            steps: vec![StepSpec {
                index: 0,
                name: "say hello".into(),
                action: StepAction::Run {
                    script: script.into(),
                    shell: None,
                },
                when: When::OnSuccess,
                timeout_secs: None,
            }],
            variables: BTreeMap::from([("GREETING".to_string(), "hello".to_string())]),
            secrets: BTreeMap::new(),
            timeout_secs: 600,
            cluster: None,
            environment: None,
            trigger: TriggerInfo::default(),
        },
        lease: Lease {
            token: LEASE_TOKEN.into(),
            expires_at: chrono::Utc::now() + chrono::Duration::seconds(4),
            duration_secs: 4,
        },
    }
}

fn runner(url: &str, dir: &std::path::Path) -> (Credentials, Settings) {
    let creds = Credentials {
        server_url: url.into(),
        runner_id: Uuid::now_v7(),
        runner_token: RUNNER_TOKEN.into(),
        name: "test-runner".into(),
        labels: vec![],
    };
    let mut settings = Settings::defaults_for(dir);
    settings.poll_wait_secs = 1;
    settings.kill_grace_secs = 2;
    (creds, settings)
}

async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while !check() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

#[tokio::test]
async fn run_once_runs_a_job_through_the_protocol_client() {
    let fake = Fake::default();
    fake.state
        .lock()
        .unwrap()
        .jobs
        .push(assignment("echo \"$GREETING from the job\""));
    let url = fake.clone().start().await;
    let tmp = tempfile::tempdir().unwrap();
    let (creds, settings) = runner(&url, tmp.path());
    let work_dir = settings.work_dir.clone();
    tokio::time::timeout(
        Duration::from_secs(60),
        outpost_runner::run(
            creds,
            settings,
            RunOptions { once: true },
            CancellationToken::new(),
        ),
    )
    .await
    .expect("run --once did not return")
    .unwrap();

    let s = fake.state.lock().unwrap();
    assert_eq!(
        s.complete,
        Some(CompleteRequest {
            status: JobStatus::Succeeded,
            exit_code: Some(0)
        })
    );
    let per_job: Vec<&String> = s.calls.iter().filter(|c| c.contains("/jobs/")).collect();
    assert!(per_job[0].contains("/heartbeat"), "{per_job:?}");
    assert!(
        per_job
            .iter()
            .all(|c| c.ends_with(&format!("Bearer {LEASE_TOKEN}")))
    );
    assert!(per_job.last().unwrap().contains("/complete"));
    assert_eq!(s.steps.len(), 2);
    assert_eq!(s.steps[0].0, "0");
    drop(s);
    assert!(
        fake.log().contains("hello from the job\n"),
        "{}",
        fake.log()
    );
    // The workspace is gone, only the work dir remains.
    assert_eq!(std::fs::read_dir(&work_dir).unwrap().count(), 0);
}

#[tokio::test]
async fn a_rejected_runner_token_stops_with_a_clear_error() {
    let fake = Fake::default();
    fake.state.lock().unwrap().acquire_status = Some(401);
    let url = fake.start().await;
    let tmp = tempfile::tempdir().unwrap();
    let (creds, settings) = runner(&url, tmp.path());
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        outpost_runner::run(
            creds,
            settings,
            RunOptions::default(),
            CancellationToken::new(),
        ),
    )
    .await
    .unwrap()
    .unwrap_err()
    .to_string();
    assert!(err.contains("outpost-runner register"), "{err}");
}

#[tokio::test]
async fn shutdown_while_idle_or_unreachable_returns_promptly() {
    // Idle: the server has no job for it.
    let fake = Fake::default();
    let url = fake.clone().start().await;
    let tmp = tempfile::tempdir().unwrap();
    let (creds, settings) = runner(&url, tmp.path());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(outpost_runner::run(
        creds,
        settings,
        RunOptions::default(),
        shutdown.clone(),
    ));
    assert!(
        eventually(Duration::from_secs(20), || fake
            .state
            .lock()
            .unwrap()
            .calls
            .len()
            >= 2)
        .await
    );
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the runner did not stop")
        .unwrap()
        .unwrap();

    // Unreachable: nothing listens on the port, so it backs off and retries until stopped.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let (creds, settings) = runner(&url, tmp.path());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(outpost_runner::run(
        creds,
        settings,
        RunOptions::default(),
        shutdown.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(200)).await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the runner did not stop")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_drain_lets_the_running_job_finish_and_report() {
    let fake = Fake::default();
    fake.state
        .lock()
        .unwrap()
        .jobs
        .push(assignment("echo started; sleep 1; echo finished"));
    let url = fake.clone().start().await;
    let tmp = tempfile::tempdir().unwrap();
    let (creds, settings) = runner(&url, tmp.path());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(outpost_runner::run(
        creds,
        settings,
        RunOptions::default(),
        shutdown.clone(),
    ));
    assert!(eventually(Duration::from_secs(20), || fake.log().contains("started\n")).await);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the runner did not stop after its job")
        .unwrap()
        .unwrap();
    let s = fake.state.lock().unwrap();
    assert_eq!(
        s.complete.as_ref().map(|c| c.status),
        Some(JobStatus::Succeeded)
    );
    drop(s);
    assert!(fake.log().contains("finished\n"), "{}", fake.log());
}

/// The real binary: the first SIGTERM drains (the job keeps running), the second cancels the job,
/// which is reported `cancelled`, and the runner exits 0.
#[tokio::test]
async fn the_binary_drains_on_sigterm_and_cancels_on_a_second_one() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    let fake = Fake::default();
    fake.state
        .lock()
        .unwrap()
        .jobs
        .push(assignment("echo started; sleep 300"));
    let url = fake.clone().start().await;
    let tmp = tempfile::tempdir().unwrap();
    let (creds, _) = runner(&url, tmp.path());
    creds.save(tmp.path()).unwrap();
    std::fs::write(
        tmp.path().join("runner.toml"),
        "poll_wait_secs = 1\nkill_grace_secs = 2\n",
    )
    .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_outpost-runner"))
        .args(["run", "--config-dir"])
        .arg(tmp.path())
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stderr = Arc::new(Mutex::new(String::new()));
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let collected = stderr.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            collected.lock().unwrap().push_str(&line);
            collected.lock().unwrap().push('\n');
        }
    });
    let pid = Pid::from_raw(child.id().unwrap() as i32);

    assert!(eventually(Duration::from_secs(30), || fake.log().contains("started\n")).await);
    kill(pid, Signal::SIGTERM).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || stderr
            .lock()
            .unwrap()
            .contains("draining"))
        .await,
        "{}",
        stderr.lock().unwrap()
    );
    // Draining: the job is still running, so nothing was completed.
    assert!(fake.state.lock().unwrap().complete.is_none());
    assert!(child.try_wait().unwrap().is_none());

    kill(pid, Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the runner did not exit after the second SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}\n{}", stderr.lock().unwrap());
    let s = fake.state.lock().unwrap();
    assert_eq!(
        s.complete.as_ref().map(|c| c.status),
        Some(JobStatus::Cancelled)
    );
    assert_eq!(
        s.steps.last().map(|(_, u)| u.status),
        Some(outpost_protocol::StepStatus::Cancelled)
    );
    drop(s);
    assert!(
        fake.log()
            .contains("The runner is shutting down: stopping the step")
    );
}
