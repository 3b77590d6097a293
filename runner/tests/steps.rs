//! Real processes through the runner's process layer and its job executor, with a fake server
//! behind the `JobApi` seam (the only stand-in: the server is not part of this crate).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use outpost_protocol::{
    AssignedJob, ClientError, CompleteRequest, HeartbeatResponse, JobStatus, Lease,
    LogAppendResponse, StepAction, StepSpec, StepStatus, StepUpdate, TriggerInfo, When,
};
use outpost_runner::job::{self, ExecConfig, JobApi, JobOutcome};
use outpost_runner::logs::LogConfig;
use outpost_runner::process::{self, CommandSpec, KillMode, KillTiming};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Polls `check` until it holds or `within` passes.
async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn bash(script: &str, cwd: &Path) -> CommandSpec {
    CommandSpec {
        program: "bash".into(),
        args: vec!["-c".into(), script.into()],
        cwd: cwd.to_path_buf(),
        env: vec![],
    }
}

fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let after = &stat[stat.rfind(')').unwrap() + 1..];
            !matches!(after.split_whitespace().next(), Some("Z") | Some("X"))
        }
        Err(_) => false,
    }
}

#[tokio::test]
async fn stopping_a_step_kills_its_grandchildren() {
    let tmp = tempfile::tempdir().unwrap();
    let pidfile = tmp.path().join("grandchild.pid");
    let script = format!(
        "sleep 300 & echo $! > {}; echo started; wait",
        pidfile.display()
    );
    let spec = bash(&script, tmp.path());
    let mut out = Vec::new();
    let pf = pidfile.clone();
    let stop = async move {
        assert!(
            eventually(Duration::from_secs(10), || pf.exists()
                && std::fs::read_to_string(&pf).unwrap().ends_with('\n'))
            .await,
            "the grandchild never started"
        );
        (KillMode::Graceful, "stop")
    };
    let (exit, why) = process::run(
        &spec,
        KillTiming::with_grace(Duration::from_secs(5)),
        &mut out,
        stop,
    )
    .await
    .unwrap();
    assert_eq!(why, Some("stop"));
    assert_ne!(exit.code, 0);
    let grandchild: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        !pid_alive(grandchild),
        "the grandchild {grandchild} survived"
    );
    assert_eq!(process::live_group_members(exit.pgid), Vec::<i32>::new());
    // No live process is left in the group: signalling it either finds nobody or only zombies
    // waiting for their reaper.
    match nix::sys::signal::killpg(nix::unistd::Pid::from_raw(exit.pgid), None) {
        Err(nix::errno::Errno::ESRCH) => {}
        other => assert!(
            process::live_group_members(exit.pgid).is_empty(),
            "killpg answered {other:?} and live members remain"
        ),
    }
    assert!(String::from_utf8_lossy(&out).starts_with("started\n"));
}

#[tokio::test]
async fn a_step_that_exits_leaves_nothing_running_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let pidfile = tmp.path().join("stray.pid");
    let script = format!("sleep 300 & echo $! > {}; echo done", pidfile.display());
    let mut out = Vec::new();
    let (exit, why) = process::run(
        &bash(&script, tmp.path()),
        KillTiming::with_grace(Duration::from_secs(5)),
        &mut out,
        std::future::pending::<(KillMode, ())>(),
    )
    .await
    .unwrap();
    assert_eq!(exit.code, 0);
    assert!(why.is_none());
    let stray: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        !pid_alive(stray),
        "the background process {stray} survived its step"
    );
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("done\n"), "{text}");
    assert!(text.contains("left processes running"), "{text}");
}

#[tokio::test]
async fn stdout_and_stderr_keep_their_order() {
    let tmp = tempfile::tempdir().unwrap();
    for _ in 0..20 {
        let mut out = Vec::new();
        let (exit, _) = process::run(
            &bash("echo a; echo b >&2; echo c", tmp.path()),
            KillTiming::with_grace(Duration::from_secs(5)),
            &mut out,
            std::future::pending::<(KillMode, ())>(),
        )
        .await
        .unwrap();
        assert_eq!(exit.code, 0);
        assert_eq!(String::from_utf8(out).unwrap(), "a\nb\nc\n");
    }
}

#[tokio::test]
async fn exit_codes_and_signals_are_reported_like_a_shell() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |script: &'static str| {
        let spec = bash(script, tmp.path());
        async move {
            let mut out = Vec::new();
            process::run(
                &spec,
                KillTiming::with_grace(Duration::from_secs(5)),
                &mut out,
                std::future::pending::<(KillMode, ())>(),
            )
            .await
            .unwrap()
            .0
        }
    };
    assert_eq!(run("exit 3").await.code, 3);
    let killed = run("kill -KILL $$").await;
    assert_eq!(killed.signal, Some(9));
    assert_eq!(killed.code, 137);
}

#[tokio::test]
async fn a_long_line_without_newline_goes_through_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let mut out = Vec::new();
    // 3 MiB of output with no newline at all.
    let (exit, _) = process::run(
        &bash("head -c 3145728 /dev/zero | tr '\\0' x", tmp.path()),
        KillTiming::with_grace(Duration::from_secs(5)),
        &mut out,
        std::future::pending::<(KillMode, ())>(),
    )
    .await
    .unwrap();
    assert_eq!(exit.code, 0);
    assert_eq!(out.len(), 3 * 1024 * 1024);
    assert!(out.iter().all(|&b| b == b'x'));
}

// ---------------------------------------------------------------------------
// The job executor against a fake server
// ---------------------------------------------------------------------------

fn api_error(status: u16) -> ClientError {
    ClientError::Api {
        status: reqwest::StatusCode::from_u16(status).unwrap(),
        code: "test".into(),
        message: "test".into(),
        next_offset: None,
    }
}

#[derive(Default)]
struct FakeState {
    calls: Vec<String>,
    log: Vec<u8>,
    steps: Vec<(u32, StepUpdate)>,
    complete: Option<CompleteRequest>,
    cancel_requested: bool,
    lease_gone: bool,
}

#[derive(Clone, Default)]
struct FakeServer {
    state: Arc<Mutex<FakeState>>,
}

impl FakeServer {
    fn log(&self) -> String {
        String::from_utf8_lossy(&self.state.lock().unwrap().log).into_owned()
    }

    fn step_statuses(&self, index: u32) -> Vec<StepUpdate> {
        self.state
            .lock()
            .unwrap()
            .steps
            .iter()
            .filter(|(i, _)| *i == index)
            .map(|(_, u)| u.clone())
            .collect()
    }

    fn final_status(&self, index: u32) -> Option<StepStatus> {
        self.step_statuses(index).last().map(|u| u.status)
    }
}

impl JobApi for FakeServer {
    async fn heartbeat(&self) -> Result<HeartbeatResponse, ClientError> {
        let mut s = self.state.lock().unwrap();
        s.calls.push("heartbeat".into());
        if s.lease_gone {
            return Err(api_error(409));
        }
        Ok(HeartbeatResponse {
            expires_at: chrono::Utc::now() + chrono::Duration::seconds(2),
            cancel_requested: s.cancel_requested,
        })
    }

    async fn append_log(&self, offset: u64, data: Bytes) -> Result<LogAppendResponse, ClientError> {
        let mut s = self.state.lock().unwrap();
        s.calls.push("log".into());
        if s.lease_gone {
            return Err(api_error(409));
        }
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
        let mut s = self.state.lock().unwrap();
        s.calls
            .push(format!("step {index} {}", update.status.as_str()));
        if s.lease_gone {
            return Err(api_error(409));
        }
        s.steps.push((index, update));
        Ok(())
    }

    async fn complete(&self, req: CompleteRequest) -> Result<(), ClientError> {
        let mut s = self.state.lock().unwrap();
        s.calls.push("complete".into());
        if s.lease_gone {
            return Err(api_error(409));
        }
        s.complete = Some(req);
        Ok(())
    }
}

struct Harness {
    _tmp: tempfile::TempDir,
    config: ExecConfig,
    server: FakeServer,
}

impl Harness {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let config = ExecConfig {
            runner_name: "test-runner".into(),
            work_dir: tmp.path().join("work"),
            shell: "bash -eo pipefail {0}".into(),
            kubectl: "printf".into(),
            helm: "/nonexistent/helm".into(),
            git: "git".into(),
            keep_workspaces: false,
            kill_grace: Duration::from_secs(3),
            cleanup_budget: Duration::from_secs(30),
            flush_budget: Duration::from_secs(20),
            log: LogConfig {
                batch_interval: Duration::from_millis(20),
                ..LogConfig::default()
            },
            clusters: Default::default(),
        };
        Self {
            _tmp: tmp,
            config,
            server: FakeServer::default(),
        }
    }

    async fn execute(&self, job: AssignedJob) -> JobOutcome {
        self.execute_with(job, CancellationToken::new()).await
    }

    async fn execute_with(&self, job: AssignedJob, abort: CancellationToken) -> JobOutcome {
        let lease = Lease {
            token: "lease".into(),
            expires_at: chrono::Utc::now() + chrono::Duration::seconds(2),
            duration_secs: 2,
        };
        job::execute(self.server.clone(), job, lease, &self.config, abort).await
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

fn with_when(mut s: StepSpec, when: When) -> StepSpec {
    s.when = when;
    s
}

fn job(steps: Vec<StepSpec>, variables: &[(&str, &str)]) -> AssignedJob {
    AssignedJob {
        id: Uuid::now_v7(),
        run_id: Uuid::now_v7(),
        run_number: 7,
        pipeline: "web".into(),
        name: "deploy".into(),
        steps,
        variables: variables
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        secrets: BTreeMap::new(),
        timeout_secs: 600,
        cluster: None,
        environment: None,
        trigger: TriggerInfo {
            repo: Some("acme/web".into()),
            sha: Some("abc123".into()),
            ..TriggerInfo::default()
        },
    }
}

#[tokio::test]
async fn a_successful_job_heartbeats_first_and_reports_everything() {
    let h = Harness::new();
    let j = job(
        vec![
            run(
                0,
                "echo \"job=$OUTPOST_JOB run=$OUTPOST_RUN_NUMBER sha=$OUTPOST_SHA ci=$CI ns=$NAMESPACE\"\necho \"pwd=$PWD ws=$OUTPOST_WORKSPACE\"",
            ),
            step(
                1,
                StepAction::Kubectl {
                    args: vec![
                        "<%s>\\n".into(),
                        "apply".into(),
                        "-n".into(),
                        "${NAMESPACE}".into(),
                        "--label=${EVIL}".into(),
                    ],
                },
            ),
        ],
        &[("NAMESPACE", "web"), ("EVIL", "x; rm -rf / && echo pwned")],
    );
    let workspace = h.config.work_dir.join(j.id.to_string());
    let outcome = h.execute(j).await;
    assert_eq!(
        outcome,
        JobOutcome::Completed {
            status: JobStatus::Succeeded,
            exit_code: Some(0)
        }
    );
    let s = h.server.state.lock().unwrap();
    assert_eq!(s.calls.first().map(String::as_str), Some("heartbeat"));
    assert_eq!(s.calls.last().map(String::as_str), Some("complete"));
    drop(s);
    let log = h.server.log();
    assert!(
        log.contains("job=deploy run=7 sha=abc123 ci=true ns=web"),
        "{log}"
    );
    assert!(log.contains("▶ Step 1/2: step 1"), "{log}");
    assert!(log.contains("✔ Step 2/2 succeeded in"), "{log}");
    // Each expanded value is one argument, never split or run by a shell.
    assert!(
        log.contains("<apply>\n<-n>\n<web>\n<--label=x; rm -rf / && echo pwned>\n"),
        "{log}"
    );
    assert!(
        log.contains(&format!("ws={}", workspace.display())),
        "{log}"
    );
    // Step reports: running at the offset before the header, then the end after the footer.
    for index in 0..2 {
        let updates = h.server.step_statuses(index);
        assert_eq!(updates.len(), 2, "{updates:?}");
        assert_eq!(updates[0].status, StepStatus::Running);
        assert_eq!(updates[1].status, StepStatus::Succeeded);
        assert_eq!(updates[1].exit_code, Some(0));
        let (start, end) = (
            updates[0].log_offset as usize,
            updates[1].log_offset as usize,
        );
        let bytes = &h.server.state.lock().unwrap().log[start..end];
        let text = String::from_utf8_lossy(bytes);
        assert!(text.contains(&format!("▶ Step {}/2", index + 1)), "{text}");
        assert!(
            text.contains(&format!("✔ Step {}/2 succeeded in", index + 1)),
            "{text}"
        );
    }
    assert!(!workspace.exists(), "the workspace was not removed");
}

#[tokio::test]
async fn a_failure_skips_later_steps_and_runs_the_failure_steps() {
    let h = Harness::new();
    let j = job(
        vec![
            run(0, "echo before; exit 3"),
            run(1, "echo never"),
            with_when(run(2, "echo rolling back"), When::OnFailure),
            with_when(run(3, "echo always here"), When::Always),
        ],
        &[],
    );
    let outcome = h.execute(j).await;
    assert_eq!(
        outcome,
        JobOutcome::Completed {
            status: JobStatus::Failed,
            exit_code: Some(3)
        }
    );
    let log = h.server.log();
    assert!(
        log.contains("✘ Step 1/4 failed with exit code 3 in"),
        "{log}"
    );
    assert!(!log.contains("\nnever"), "{log}");
    assert!(log.contains("rolling back"), "{log}");
    assert!(log.contains("always here"), "{log}");
    assert_eq!(h.server.final_status(0), Some(StepStatus::Failed));
    assert_eq!(h.server.final_status(1), Some(StepStatus::Skipped));
    assert_eq!(h.server.final_status(2), Some(StepStatus::Succeeded));
    assert_eq!(h.server.final_status(3), Some(StepStatus::Succeeded));
}

#[tokio::test]
async fn an_undefined_variable_fails_the_step_with_a_clear_line() {
    let h = Harness::new();
    let j = job(
        vec![
            step(
                0,
                StepAction::Kubectl {
                    args: vec!["get".into(), "pods".into(), "-n".into(), "${NOPE}".into()],
                },
            ),
            with_when(run(1, "echo on failure"), When::OnFailure),
            run(2, "echo skipped"),
        ],
        &[],
    );
    let outcome = h.execute(j).await;
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
    let log = h.server.log();
    assert!(
        log.contains("`${NOPE}` in argument `${NOPE}` is not defined"),
        "{log}"
    );
    assert_eq!(h.server.final_status(0), Some(StepStatus::Failed));
    assert_eq!(h.server.final_status(1), Some(StepStatus::Succeeded));
    assert_eq!(h.server.final_status(2), Some(StepStatus::Skipped));
}

#[tokio::test]
async fn a_missing_binary_fails_with_127_and_says_what_to_do() {
    let h = Harness::new();
    let j = job(
        vec![step(
            0,
            StepAction::Helm {
                args: vec!["version".into()],
            },
        )],
        &[],
    );
    let outcome = h.execute(j).await;
    assert_eq!(
        outcome,
        JobOutcome::Completed {
            status: JobStatus::Failed,
            exit_code: Some(127)
        }
    );
    let log = h.server.log();
    assert!(log.contains("could not start `/nonexistent/helm`"), "{log}");
    assert!(log.contains("runner.toml"), "{log}");
}

#[tokio::test]
async fn checkout_without_a_repository_explains_itself() {
    let h = Harness::new();
    let mut j = job(
        vec![step(
            0,
            StepAction::Checkout {
                path: None,
                depth: None,
                token_secret: None,
            },
        )],
        &[],
    );
    j.trigger.clone_url = None;
    let outcome = h.execute(j).await;
    assert!(matches!(
        outcome,
        JobOutcome::Completed {
            status: JobStatus::Failed,
            ..
        }
    ));
    assert!(h.server.log().contains(
        "checkout needs a repository and a commit: this run has none (trigger it from a webhook or pass ref/sha)"
    ));
}

#[tokio::test]
async fn checkout_fetches_the_commit_into_the_workspace() {
    let h = Harness::new();
    // A local repository with one commit stands in for the forge.
    let repo = h.config.work_dir.parent().unwrap().join("origin");
    std::fs::create_dir_all(&repo).unwrap();
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .args(args)
            .current_dir(&repo)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.com")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.com")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    git(&["init", "-q"]);
    std::fs::write(repo.join("README"), "hello from the repo\n").unwrap();
    git(&["add", "README"]);
    git(&["commit", "-q", "-m", "first"]);
    let sha = git(&["rev-parse", "HEAD"]);
    let mut j = job(
        vec![
            step(
                0,
                StepAction::Checkout {
                    path: Some("src".into()),
                    depth: None,
                    token_secret: None,
                },
            ),
            run(1, "cat src/README; git -C src rev-parse HEAD"),
        ],
        &[],
    );
    j.trigger.clone_url = Some(format!("file://{}", repo.display()));
    j.trigger.sha = Some(sha.clone());
    let outcome = h.execute(j).await;
    let log = h.server.log();
    assert_eq!(
        outcome,
        JobOutcome::Completed {
            status: JobStatus::Succeeded,
            exit_code: Some(0)
        },
        "{log}"
    );
    assert!(log.contains("hello from the repo"), "{log}");
    assert!(log.contains(&sha), "{log}");
}

#[tokio::test]
async fn a_cancel_stops_the_step_and_still_runs_always_steps() {
    let h = Harness::new();
    let j = job(
        vec![
            run(0, "echo started; sleep 300"),
            run(1, "echo not this"),
            with_when(run(2, "echo cleaning up"), When::Always),
        ],
        &[],
    );
    let server = h.server.clone();
    let canceller = tokio::spawn(async move {
        assert!(
            eventually(Duration::from_secs(20), || server
                .log()
                .contains("started\n"))
            .await
        );
        server.state.lock().unwrap().cancel_requested = true;
    });
    let outcome = h.execute(j).await;
    canceller.await.unwrap();
    assert_eq!(
        outcome,
        JobOutcome::Completed {
            status: JobStatus::Cancelled,
            exit_code: None
        }
    );
    let log = h.server.log();
    assert!(
        log.contains("The job was cancelled: stopping the step"),
        "{log}"
    );
    assert!(log.contains("cleaning up"), "{log}");
    assert_eq!(h.server.final_status(0), Some(StepStatus::Cancelled));
    assert_eq!(h.server.final_status(1), Some(StepStatus::Skipped));
    assert_eq!(h.server.final_status(2), Some(StepStatus::Succeeded));
}

#[tokio::test]
async fn timeouts_stop_steps_and_the_job() {
    let h = Harness::new();
    let mut slow = run(0, "echo slow; sleep 300");
    slow.timeout_secs = Some(1);
    let j = job(
        vec![
            slow,
            with_when(run(1, "echo after timeout"), When::OnFailure),
        ],
        &[],
    );
    let outcome = h.execute(j).await;
    assert_eq!(
        outcome,
        JobOutcome::Completed {
            status: JobStatus::TimedOut,
            exit_code: None
        }
    );
    assert_eq!(h.server.final_status(0), Some(StepStatus::TimedOut));
    assert_eq!(h.server.final_status(1), Some(StepStatus::Succeeded));
    assert!(h.server.log().contains("ran past its timeout of 1s"));

    let h = Harness::new();
    let mut j = job(
        vec![
            run(0, "sleep 300"),
            with_when(run(1, "echo cleanup after job timeout"), When::Always),
        ],
        &[],
    );
    j.timeout_secs = 1;
    let outcome = h.execute(j).await;
    assert_eq!(
        outcome,
        JobOutcome::Completed {
            status: JobStatus::TimedOut,
            exit_code: None
        }
    );
    assert_eq!(h.server.final_status(0), Some(StepStatus::TimedOut));
    assert!(h.server.log().contains("cleanup after job timeout"));
}

#[tokio::test]
async fn a_lost_lease_kills_the_step_and_reports_nothing_more() {
    let h = Harness::new();
    let tmp = tempfile::tempdir().unwrap();
    let pidfile: PathBuf = tmp.path().join("pid");
    let j = job(
        vec![
            run(
                0,
                &format!("echo $$ > {}; echo started; sleep 300", pidfile.display()),
            ),
            with_when(run(1, "echo must not run"), When::Always),
        ],
        &[],
    );
    let server = h.server.clone();
    let loser = tokio::spawn(async move {
        assert!(
            eventually(Duration::from_secs(20), || server
                .log()
                .contains("started\n"))
            .await
        );
        server.state.lock().unwrap().lease_gone = true;
    });
    let began = Instant::now();
    let outcome = h.execute(j).await;
    loser.await.unwrap();
    assert_eq!(outcome, JobOutcome::LeaseLost);
    // The step was killed at once rather than after its 300 s sleep or the kill grace.
    assert!(began.elapsed() < Duration::from_secs(60));
    let s = h.server.state.lock().unwrap();
    assert!(s.complete.is_none());
    assert!(
        !s.calls
            .iter()
            .any(|c| c == "complete" || c.starts_with("step 1")),
        "{:?}",
        s.calls
    );
    drop(s);
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(!pid_alive(pid));
}

#[tokio::test]
async fn a_lease_gone_before_the_first_heartbeat_runs_nothing() {
    let h = Harness::new();
    h.server.state.lock().unwrap().lease_gone = true;
    let tmp = tempfile::tempdir().unwrap();
    let marker = tmp.path().join("ran");
    let j = job(vec![run(0, &format!("touch {}", marker.display()))], &[]);
    assert_eq!(h.execute(j).await, JobOutcome::LeaseLost);
    assert!(!marker.exists());
    assert_eq!(h.server.state.lock().unwrap().calls, vec!["heartbeat"]);
}

#[tokio::test]
async fn aborting_cancels_the_running_step_and_skips_the_rest() {
    let h = Harness::new();
    let j = job(
        vec![
            run(0, "echo started; sleep 300"),
            with_when(run(1, "echo not when aborting"), When::Always),
        ],
        &[],
    );
    let abort = CancellationToken::new();
    let server = h.server.clone();
    let a = abort.clone();
    let aborter = tokio::spawn(async move {
        assert!(
            eventually(Duration::from_secs(20), || server
                .log()
                .contains("started\n"))
            .await
        );
        a.cancel();
    });
    let outcome = h.execute_with(j, abort).await;
    aborter.await.unwrap();
    assert_eq!(
        outcome,
        JobOutcome::Completed {
            status: JobStatus::Cancelled,
            exit_code: None
        }
    );
    assert_eq!(h.server.final_status(0), Some(StepStatus::Cancelled));
    assert_eq!(h.server.final_status(1), Some(StepStatus::Skipped));
    assert!(!h.server.log().contains("\nnot when aborting"));
}
