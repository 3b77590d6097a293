//! The job log as the executor writes it: secrets masked everywhere (output, command lines, split
//! writes, base64, multi-line values), step headers and footers, and the on-disk spool while the
//! server is unreachable. Real processes; a fake server behind the `JobApi` seam.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use outpost_protocol::{
    AssignedJob, ClientError, CompleteRequest, HeartbeatResponse, JobStatus, Lease,
    LogAppendResponse, StepAction, StepSpec, StepStatus, StepUpdate, TriggerInfo, When,
};
use outpost_runner::job::{self, ExecConfig, JobApi, JobOutcome};
use outpost_runner::logs::LogConfig;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

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

#[derive(Default)]
struct FakeState {
    log: Vec<u8>,
    steps: Vec<(u32, StepUpdate)>,
    complete: Option<CompleteRequest>,
    log_appends: usize,
}

/// A server that stores the log like the protocol says and can refuse log uploads for a while.
#[derive(Clone, Default)]
struct FakeServer {
    state: Arc<Mutex<FakeState>>,
    log_unreachable: Arc<AtomicBool>,
}

impl FakeServer {
    fn log(&self) -> String {
        String::from_utf8_lossy(&self.state.lock().unwrap().log).into_owned()
    }

    fn updates(&self, index: u32) -> Vec<StepUpdate> {
        let s = self.state.lock().unwrap();
        s.steps
            .iter()
            .filter(|(i, _)| *i == index)
            .map(|(_, u)| u.clone())
            .collect()
    }
}

fn unavailable() -> ClientError {
    ClientError::Api {
        status: reqwest::StatusCode::SERVICE_UNAVAILABLE,
        code: "unavailable".into(),
        message: "unavailable".into(),
        next_offset: None,
    }
}

impl JobApi for FakeServer {
    async fn heartbeat(&self) -> Result<HeartbeatResponse, ClientError> {
        Ok(HeartbeatResponse {
            expires_at: chrono::Utc::now() + chrono::Duration::seconds(60),
            cancel_requested: false,
        })
    }

    async fn append_log(&self, offset: u64, data: Bytes) -> Result<LogAppendResponse, ClientError> {
        if self.log_unreachable.load(Ordering::SeqCst) {
            return Err(unavailable());
        }
        let mut s = self.state.lock().unwrap();
        s.log_appends += 1;
        let len = s.log.len() as u64;
        if offset > len {
            return Err(ClientError::Api {
                status: reqwest::StatusCode::RANGE_NOT_SATISFIABLE,
                code: "gap".into(),
                message: "gap".into(),
                next_offset: Some(len),
            });
        }
        let skip = (len - offset) as usize;
        if skip < data.len() {
            s.log.extend_from_slice(&data[skip..]);
        }
        Ok(LogAppendResponse {
            next_offset: s.log.len() as u64,
        })
    }

    async fn update_step(&self, index: u32, update: StepUpdate) -> Result<(), ClientError> {
        self.state.lock().unwrap().steps.push((index, update));
        Ok(())
    }

    async fn complete(&self, req: CompleteRequest) -> Result<(), ClientError> {
        self.state.lock().unwrap().complete = Some(req);
        Ok(())
    }
}

fn config(work_dir: &Path) -> ExecConfig {
    ExecConfig {
        runner_name: "test-runner".into(),
        work_dir: work_dir.to_path_buf(),
        shell: "bash -eo pipefail {0}".into(),
        kubectl: "printf".into(),
        helm: "/nonexistent/helm".into(),
        git: "git".into(),
        keep_workspaces: false,
        kill_grace: Duration::from_secs(3),
        cleanup_budget: Duration::from_secs(30),
        flush_budget: Duration::from_secs(120),
        // The real batch interval: it is also how long masking may hold back the beginning of a
        // secret that a step writes in two pieces.
        log: LogConfig::default(),
        clusters: Default::default(),
    }
}

fn step(index: u32, action: StepAction) -> StepSpec {
    StepSpec {
        index,
        name: format!("step {}", index + 1),
        action,
        when: When::OnSuccess,
        timeout_secs: None,
    }
}

fn run(index: u32, script: &str) -> StepSpec {
    step(
        index,
        StepAction::Run {
            script: script.into(),
            shell: None,
        },
    )
}

fn kubectl(index: u32, args: &[&str]) -> StepSpec {
    step(
        index,
        StepAction::Kubectl {
            args: args.iter().map(|a| a.to_string()).collect(),
        },
    )
}

fn job(steps: Vec<StepSpec>, variables: &[(&str, &str)], secrets: &[(&str, &str)]) -> AssignedJob {
    let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    AssignedJob {
        id: Uuid::now_v7(),
        run_id: Uuid::now_v7(),
        run_number: 1,
        pipeline: "web".into(),
        name: "deploy".into(),
        steps,
        variables: map(variables),
        secrets: map(secrets),
        timeout_secs: 600,
        cluster: None,
        environment: None,
        trigger: TriggerInfo::default(),
    }
}

fn lease() -> Lease {
    Lease {
        token: "lease".into(),
        expires_at: chrono::Utc::now() + chrono::Duration::seconds(60),
        duration_secs: 60,
    }
}

const TOKEN: &str = "s3cr3t-T0ken-value";
const CERT: &str = "-----BEGIN-----\nMIIBline2data\n-----END-----";

#[tokio::test]
async fn secrets_never_reach_the_log_and_steps_have_clear_headers() {
    let tmp = tempfile::tempdir().unwrap();
    let server = FakeServer::default();
    let j = job(
        vec![
            kubectl(
                0,
                &["<%s>\\n", "${TOKEN}", "${URL}", &format!("literal-{TOKEN}")],
            ),
            run(
                1,
                &[
                    // One secret in two writes, 50 ms apart: well inside the batch interval.
                    "printf 'split: s3cr3t-T0'; sleep 0.05; printf 'ken-value\\n'",
                    "printf '%s' \"$TOKEN\" | base64",
                    "printf '%s' \"$TOKEN\" | base64 | tr '+/' '-_' | tr -d '='",
                    "echo \"$CERT\"",
                    "echo 'cert line: MIIBline2data'",
                    "echo \"short: $SHORT\"",
                    "exit 0",
                ]
                .join("\n"),
            ),
            kubectl(2, &["get", "${NOPE}", TOKEN]),
        ],
        &[("URL", &format!("https://user:{TOKEN}@example.com"))],
        &[("TOKEN", TOKEN), ("CERT", CERT), ("SHORT", "ab")],
    );
    let outcome = job::execute(
        server.clone(),
        j,
        lease(),
        &config(&tmp.path().join("work")),
        CancellationToken::new(),
    )
    .await;
    assert!(
        matches!(
            outcome,
            JobOutcome::Completed {
                status: JobStatus::Failed,
                ..
            }
        ),
        "{outcome:?}"
    );
    let log = server.log();
    for leaked in [
        TOKEN,
        "s3cr3t-T0ken",
        "czNjcjN0LVQwa2VuLXZhbHVl",
        "MIIBline2data",
    ] {
        assert!(!log.contains(leaked), "`{leaked}` is in the log:\n{log}");
    }
    // The command line: a secret reference stays a reference, a secret inside a variable's value
    // or a literal argument is masked; the output is masked too.
    assert!(
        log.contains("$ kubectl '<%s>\\n' '${TOKEN}' https://user:***@example.com literal-***\n"),
        "{log}"
    );
    assert!(
        log.contains("<***>\n<https://user:***@example.com>\n<literal-***>\n"),
        "{log}"
    );
    // Standard and URL-safe base64, the whole multi-line value, one of its lines.
    assert!(
        log.contains("\nsplit: ***\n***\n***\n***\ncert line: ***\n"),
        "{log}"
    );
    // Too short to mask: shown, and the job log does not talk about it.
    assert!(log.contains("\nshort: ab\n"), "{log}");
    assert!(!log.contains("shorter than"), "{log}");
    // The command line of a step that could not start is masked as well.
    assert!(log.contains("$ kubectl get '${NOPE}' ***\n"), "{log}");

    // Headers: start, duration and exit code.
    let started = regex_like(&log, "▶ Step 1/3: step 1 (started ", " UTC)\n");
    assert_eq!(started.len(), "12:34:56".len(), "{log}");
    assert!(log.contains("✔ Step 1/3 succeeded in "), "{log}");
    assert!(log.contains("✔ Step 2/3 succeeded in "), "{log}");
    assert!(
        log.lines()
            .any(|l| l.starts_with("✔ Step 2/3 succeeded in ") && l.ends_with(" (exit code 0)")),
        "{log}"
    );
    assert!(log.contains("✘ Step 3/3 failed in "), "{log}");

    // Step offsets count bytes after masking: each step's range holds its header and footer.
    let bytes = server.state.lock().unwrap().log.clone();
    for (index, footer) in [(0u32, "✔ Step 1/3"), (1, "✔ Step 2/3"), (2, "✘ Step 3/3")] {
        let updates = server.updates(index);
        assert_eq!(updates[0].status, StepStatus::Running);
        let (start, end) = (
            updates[0].log_offset as usize,
            updates.last().unwrap().log_offset as usize,
        );
        let part = String::from_utf8_lossy(&bytes[start..end]);
        assert!(
            part.trim_start()
                .starts_with(&format!("▶ Step {}/3: step {}", index + 1, index + 1)),
            "{part}"
        );
        assert!(
            part.trim_end().lines().last().unwrap().starts_with(footer),
            "{part}"
        );
    }
}

/// The text between `before` and the next `after` in `text`.
fn regex_like<'a>(text: &'a str, before: &str, after: &str) -> &'a str {
    let start = text.find(before).expect("no such header") + before.len();
    let len = text[start..].find(after).expect("no end of header");
    &text[start..start + len]
}

#[tokio::test]
async fn a_job_spools_its_log_while_the_server_is_unreachable() {
    use sha2::Digest as _;
    let tmp = tempfile::tempdir().unwrap();
    let work_dir = tmp.path().join("work");
    let copy = tmp.path().join("output.txt");
    let server = FakeServer::default();
    server.log_unreachable.store(true, Ordering::SeqCst);
    // About 20 MB of output between two markers, also copied to a file to compare with.
    let script = format!(
        "echo \"BE\"\"GIN\"\nhead -c 15000000 /dev/urandom | base64 | tee {}\necho \"E\"\"ND\"",
        copy.display()
    );
    let j = job(vec![run(0, &script)], &[], &[("TOKEN", TOKEN)]);
    let spool = work_dir.join(".spool").join(format!("{}.spool", j.id));

    let watcher = {
        let (server, spool) = (server.clone(), spool.clone());
        tokio::spawn(async move {
            // The output waits on disk, not in memory, while the server is away.
            let spooled = eventually(Duration::from_secs(60), || {
                std::fs::metadata(&spool).is_ok_and(|m| m.len() > 10_000_000)
            })
            .await;
            server.log_unreachable.store(false, Ordering::SeqCst);
            spooled
        })
    };
    let outcome = job::execute(
        server.clone(),
        j,
        lease(),
        &config(&work_dir),
        CancellationToken::new(),
    )
    .await;
    assert!(watcher.await.unwrap(), "the log was never spooled to disk");
    assert_eq!(
        outcome,
        JobOutcome::Completed {
            status: JobStatus::Succeeded,
            exit_code: Some(0)
        }
    );
    assert!(!spool.exists(), "the spool outlived its job");

    let log = server.state.lock().unwrap().log.clone();
    let find = |needle: &[u8], from: usize| {
        log[from..]
            .windows(needle.len())
            .position(|w| w == needle)
            .map(|p| p + from)
            .unwrap()
    };
    let begin = find(b"\nBEGIN\n", 0) + b"\nBEGIN\n".len();
    let end = find(b"\nEND\n", begin) + 1;
    let written = std::fs::read(&copy).unwrap();
    assert!(written.len() > 19_000_000);
    assert_eq!(
        hex::encode(sha2::Sha256::digest(&log[begin..end])),
        hex::encode(sha2::Sha256::digest(&written))
    );
}
