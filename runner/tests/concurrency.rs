//! Several jobs at once: `run()` and the binary over real HTTP against a loopback stand-in for the
//! job server that hands out many jobs, each under its own lease.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_protocol::{
    AcquireResponse, AssignedJob, CompleteRequest, JobStatus, Lease, StepAction, StepSpec,
    TriggerInfo, When,
};
use outpost_runner::{Credentials, RunOptions, Settings};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const RUNNER_TOKEN: &str = "runner-token";

#[derive(Default)]
struct JobState {
    lease: String,
    log: Vec<u8>,
    complete: Option<CompleteRequest>,
}

#[derive(Default)]
struct State {
    /// Jobs handed out by the next acquires, in order.
    queue: Vec<AcquireResponse>,
    jobs: HashMap<Uuid, JobState>,
    acquires: usize,
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
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(self.clone().handle(stream));
            }
        });
        url
    }

    fn push(&self, script: &str) -> Uuid {
        let a = assignment(script);
        let id = a.job.id;
        let mut s = self.state.lock().unwrap();
        s.jobs.insert(
            id,
            JobState {
                lease: a.lease.token.clone(),
                ..JobState::default()
            },
        );
        s.queue.push(a);
        id
    }

    fn log(&self, id: Uuid) -> String {
        String::from_utf8_lossy(&self.state.lock().unwrap().jobs[&id].log).into_owned()
    }

    fn status(&self, id: Uuid) -> Option<JobStatus> {
        self.state.lock().unwrap().jobs[&id]
            .complete
            .as_ref()
            .map(|c| c.status)
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
            let (mut length, mut auth) = (0usize, String::new());
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

    async fn route(&self, _method: &str, path: &str, auth: &str, body: &[u8]) -> (u16, String) {
        let error = |code: &str| format!(r#"{{"error":{{"code":"{code}","message":"{code}"}}}}"#);
        if path == "/api/v1/runner/acquire" {
            if auth != format!("Bearer {RUNNER_TOKEN}") {
                return (401, error("unauthorized"));
            }
            let next = {
                let mut s = self.state.lock().unwrap();
                s.acquires += 1;
                (!s.queue.is_empty()).then(|| s.queue.remove(0))
            };
            return match next {
                Some(job) => (200, serde_json::to_string(&job).unwrap()),
                None => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    (204, String::new())
                }
            };
        }
        let Some(rest) = path.strip_prefix("/api/v1/runner/jobs/") else {
            return (404, error("not_found"));
        };
        let id: Uuid = rest.split(['/', '?']).next().unwrap().parse().unwrap();
        let mut s = self.state.lock().unwrap();
        let Some(job) = s.jobs.get_mut(&id) else {
            return (404, error("not_found"));
        };
        if auth != format!("Bearer {}", job.lease) {
            return (409, error("lease_lost"));
        }
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
        if let Some((_, offset)) = path.split_once("/log?offset=") {
            let offset: usize = offset.parse().unwrap();
            if offset > job.log.len() {
                let len = job.log.len();
                return (
                    416,
                    format!(r#"{{"error":{{"code":"gap","message":"gap"}},"next_offset":{len}}}"#),
                );
            }
            let skip = job.log.len() - offset;
            if skip < body.len() {
                job.log.extend_from_slice(&body[skip..]);
            }
            return (200, format!(r#"{{"next_offset":{}}}"#, job.log.len()));
        }
        if path.contains("/steps/") {
            return (200, "{}".into());
        }
        if path.ends_with("/complete") {
            job.complete = Some(serde_json::from_slice(body).unwrap());
            return (200, "{}".into());
        }
        (404, error("not_found"))
    }
}

fn assignment(script: &str) -> AcquireResponse {
    let id = Uuid::now_v7();
    AcquireResponse {
        job: AssignedJob {
            id,
            run_id: Uuid::now_v7(),
            run_number: 1,
            pipeline: "web".into(),
            name: "deploy".into(),
            steps: vec![StepSpec {
                index: 0,
                name: "work".into(),
                action: StepAction::Run {
                    script: script.into(),
                    shell: None,
                },
                when: When::OnSuccess,
                timeout_secs: None,
            }],
            variables: BTreeMap::new(),
            secrets: BTreeMap::new(),
            timeout_secs: 600,
            cluster: None,
            environment: None,
            trigger: TriggerInfo::default(),
        },
        lease: Lease {
            token: format!("lease-{id}"),
            expires_at: chrono::Utc::now() + chrono::Duration::seconds(4),
            duration_secs: 4,
        },
    }
}

fn runner(url: &str, dir: &Path, concurrency: usize) -> (Credentials, Settings) {
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
    settings.concurrency = concurrency;
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

/// A script that marks itself running and where it runs, then waits for the `release` file (so
/// the test decides when jobs end, without sleeping).
fn waiting_script(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "mkdir {d}/running.$OUTPOST_JOB_ID\n\
         pwd > {d}/pwd.$OUTPOST_JOB_ID\n\
         echo started\n\
         while [ ! -e {d}/release ]; do sleep 0.05; done\n\
         rmdir {d}/running.$OUTPOST_JOB_ID\n\
         echo finished"
    )
}

fn running(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("running.")
        })
        .count()
}

fn read_trimmed(path: PathBuf) -> String {
    std::fs::read_to_string(path).unwrap().trim().to_string()
}

#[tokio::test]
async fn up_to_n_jobs_run_at_once_each_in_its_own_workspace() {
    let tmp = tempfile::tempdir().unwrap();
    let marks = tmp.path().join("marks");
    std::fs::create_dir(&marks).unwrap();
    let fake = Fake::default();
    let ids: Vec<Uuid> = (0..3).map(|_| fake.push(&waiting_script(&marks))).collect();
    let url = fake.clone().start().await;
    let (creds, settings) = runner(&url, &tmp.path().join("config"), 2);
    let work_dir = settings.work_dir.clone();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(outpost_runner::run(
        creds,
        settings,
        RunOptions::default(),
        shutdown.clone(),
    ));

    // Two start; the third is not even acquired while they run.
    assert!(
        eventually(Duration::from_secs(30), || ids[..2]
            .iter()
            .all(|id| fake.log(*id).contains("started\n")))
        .await
    );
    let acquires = fake.state.lock().unwrap().acquires;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fake.state.lock().unwrap().acquires, acquires);
    assert_eq!(fake.state.lock().unwrap().queue.len(), 1);
    assert_eq!(running(&marks), 2);
    for id in &ids[..2] {
        // Each job in its own workspace.
        assert_eq!(
            PathBuf::from(read_trimmed(marks.join(format!("pwd.{id}")))),
            work_dir.join(id.to_string())
        );
    }

    // Letting them end frees the slots: the third job runs, alone.
    std::fs::write(marks.join("release"), "").unwrap();
    assert!(
        eventually(Duration::from_secs(30), || ids
            .iter()
            .all(|id| fake.status(*id) == Some(JobStatus::Succeeded)))
        .await
    );
    assert_eq!(running(&marks), 0);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the runner did not stop")
        .unwrap()
        .unwrap();
    // Workspaces are removed; nothing but the (empty) work dir is left.
    let left: Vec<_> = std::fs::read_dir(&work_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test]
async fn a_drain_waits_for_every_running_job_and_keeps_workspaces_when_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let marks = tmp.path().join("marks");
    std::fs::create_dir(&marks).unwrap();
    let fake = Fake::default();
    let ids: Vec<Uuid> = (0..2).map(|_| fake.push(&waiting_script(&marks))).collect();
    let url = fake.clone().start().await;
    let (creds, mut settings) = runner(&url, &tmp.path().join("config"), 3);
    settings.keep_workspaces = true;
    let work_dir = settings.work_dir.clone();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(outpost_runner::run(
        creds,
        settings,
        RunOptions::default(),
        shutdown.clone(),
    ));
    assert!(
        eventually(Duration::from_secs(30), || ids
            .iter()
            .all(|id| fake.log(*id).contains("started\n")))
        .await
    );
    shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!task.is_finished(), "the runner did not wait for its jobs");
    assert!(ids.iter().all(|id| fake.status(*id).is_none()));
    std::fs::write(marks.join("release"), "").unwrap();
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the runner did not stop after its jobs")
        .unwrap()
        .unwrap();
    for id in &ids {
        assert_eq!(fake.status(*id), Some(JobStatus::Succeeded));
        assert!(fake.log(*id).contains("finished\n"));
        assert!(work_dir.join(id.to_string()).is_dir(), "workspace not kept");
    }
}

/// The binary with `--concurrency 2`: the first SIGTERM drains both running jobs, the second
/// cancels both; both are reported `cancelled` and the runner exits 0.
#[tokio::test]
async fn the_binary_cancels_every_running_job_on_a_second_signal() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    let tmp = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    let ids: Vec<Uuid> = (0..2)
        .map(|_| fake.push("echo started; sleep 300"))
        .collect();
    let url = fake.clone().start().await;
    let (creds, _) = runner(&url, tmp.path(), 1);
    creds.save(tmp.path()).unwrap();
    std::fs::write(
        tmp.path().join("runner.toml"),
        "poll_wait_secs = 1\nkill_grace_secs = 2\n",
    )
    .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_outpost-runner"))
        .args(["run", "--concurrency", "2", "--config-dir"])
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
            let mut s = collected.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
    let pid = Pid::from_raw(child.id().unwrap() as i32);

    assert!(
        eventually(Duration::from_secs(30), || ids
            .iter()
            .all(|id| fake.log(*id).contains("started\n")))
        .await,
        "{}",
        stderr.lock().unwrap()
    );
    kill(pid, Signal::SIGTERM).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || stderr
            .lock()
            .unwrap()
            .contains("draining: no new jobs; 2 running job(s)"))
        .await,
        "{}",
        stderr.lock().unwrap()
    );
    assert!(child.try_wait().unwrap().is_none());
    kill(pid, Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the runner did not exit after the second SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}\n{}", stderr.lock().unwrap());
    for id in &ids {
        assert_eq!(fake.status(*id), Some(JobStatus::Cancelled));
        assert!(
            fake.log(*id)
                .contains("The runner is shutting down: stopping the step")
        );
    }
}
