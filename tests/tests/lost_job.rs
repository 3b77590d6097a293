//! A runner that dies mid-job leaves the job `lost`, and the job is not run again.

use std::path::Path;
use std::time::{Duration, Instant};

use outpost_tests::outpost_protocol::{JobStatus, RunStatus};
use outpost_tests::{
    Backend, TestRunner, TestServer, apply_and_trigger, backend_tests, describe_run, eventually,
    job, scratch_dir, test_db, wait_for_job_status, wait_for_run,
};

backend_tests!(killed_runner_leaves_job_lost);

const SLOW: &str = r#"
jobs:
  deploy:
    runs_on: [e2e]
    steps:
      - run: |
          echo $$ > "$PIDFILE"
          echo "$OUTPOST_JOB_ID" >> "$FILE"
          sleep 30
"#;

const QUICK: &str = r#"
jobs:
  ping:
    runs_on: [e2e]
    steps:
      - run: echo pong
"#;

/// Kills what is left of the step whose shell wrote `pidfile`: the runner's SIGKILL does not
/// reach its children, and a `sleep 30` should not outlive the test.
struct StepReaper<'a>(&'a Path);

impl Drop for StepReaper<'_> {
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, kill, killpg};
        use nix::unistd::Pid;
        let Ok(text) = std::fs::read_to_string(self.0) else {
            return;
        };
        if let Ok(pid) = text.trim().parse::<i32>() {
            // Steps run in their own process group, led by the step's shell.
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// Short, so that a dead runner's lease runs out within the test.
const LEASE_SECS: u64 = 2;

async fn killed_runner_leaves_job_lost(backend: Backend) {
    let db = test_db!(backend);
    let server = TestServer::start(
        &db,
        &[("OUTPOST__QUEUE__LEASE_SECS", &LEASE_SECS.to_string())],
    )
    .await;
    let client = server.client();
    let scratch = scratch_dir();
    let file = scratch.path().join("executions.txt");
    let pidfile = scratch.path().join("step.pid");
    let _reaper = StepReaper(&pidfile);
    let (file_str, pid_str) = (file.display().to_string(), pidfile.display().to_string());

    let mut doomed = TestRunner::start(&server, "doomed", &["e2e"], &[]).await;
    let run = apply_and_trigger(
        &client,
        "slow",
        SLOW,
        &[("FILE", &file_str), ("PIDFILE", &pid_str)],
    )
    .await;

    // Wait until the step is really executing, then kill the runner without warning.
    eventually("the step to start", Duration::from_secs(60), || async {
        match std::fs::read_to_string(&file) {
            Ok(text) if !text.trim().is_empty() => Ok(()),
            _ => Err("no execution recorded yet".to_string()),
        }
    })
    .await;
    let doomed_id = doomed.id().await;
    let running = client.get_run(run.id).await.expect("GET run");
    let job_id = job(&running, "deploy").id;

    // While its runner lives, the job outlives several lease lengths: the heartbeats renew it.
    // This is an observation over a window, not a wait for something to happen.
    let alive_until = Instant::now() + Duration::from_secs(2 * LEASE_SECS + 1);
    while Instant::now() < alive_until {
        let seen = client.get_job(job_id).await.expect("GET job");
        assert_eq!(
            seen.status,
            JobStatus::Running,
            "a heartbeating runner keeps its job: {seen:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    doomed.kill().await;

    let lost = wait_for_job_status(&client, job_id, JobStatus::Lost, Duration::from_secs(30)).await;
    assert_eq!(lost.runner_id, Some(doomed_id), "{lost:#?}");
    assert!(
        lost.finished_at.is_some(),
        "a lost job has ended: {lost:#?}"
    );
    let run_after = wait_for_run(&client, run.id, Duration::from_secs(10)).await;
    assert_eq!(
        run_after.status,
        RunStatus::Failed,
        "{}",
        describe_run(&run_after)
    );

    // A healthy runner comes along and works through the queue: it must not pick the lost job up.
    let healthy = TestRunner::start(&server, "healthy", &["e2e"], &[]).await;
    let ping = apply_and_trigger(&client, "ping", QUICK, &[]).await;
    let ping = wait_for_run(&client, ping.id, Duration::from_secs(60)).await;
    assert_eq!(ping.status, RunStatus::Succeeded, "{}", describe_run(&ping));
    assert_eq!(job(&ping, "ping").runner_id, Some(healthy.id().await));

    let still = client.get_job(job_id).await.expect("GET job");
    assert_eq!(still.status, JobStatus::Lost, "{still:#?}");
    assert_eq!(still.runner_id, Some(doomed_id), "{still:#?}");
    assert_eq!(still.attempt, 1, "the job was claimed once: {still:#?}");
    let executions = std::fs::read_to_string(&file).expect("the executions file");
    assert_eq!(
        executions.lines().collect::<Vec<_>>(),
        vec![job_id.to_string().as_str()],
        "the job was executed exactly once"
    );
}
