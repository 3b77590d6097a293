//! Stopping and surviving: cancellation reaches a step's grandchildren, step and job timeouts end
//! the job `timed_out` with its cleanup steps run, a server that goes away mid-job loses no byte of
//! the log, and a runner drains on SIGTERM and runs one job with `--once`.

use std::path::Path;
use std::time::{Duration, Instant};

use outpost_tests::outpost_protocol::{Client, JobStatus, Run, RunStatus, StepStatus};
use outpost_tests::{
    Backend, TestRunner, TestServer, apply_and_trigger, backend_tests, eventually, job, job_log,
    processes_with_arg, scratch_dir, test_db, wait_for_run,
};
use sha2::Digest as _;
use uuid::Uuid;

backend_tests!(
    cancel_stops_the_whole_process_group_and_runs_always_steps,
    step_and_job_timeouts_end_timed_out,
    server_restart_mid_job_loses_no_log_byte,
    sigterm_drains_the_running_job_and_takes_no_new_one,
    once_runs_one_job_and_exits,
);

const RUN_TIMEOUT: Duration = Duration::from_secs(90);

/// A `sleep` duration no other process on the machine uses, so the test can find the step's
/// processes by their arguments, e.g. `300.123456`.
fn unique_sleep() -> String {
    format!("300.{:06}", Uuid::now_v7().as_u128() % 1_000_000)
}

/// Kills, when dropped, whatever still runs with the marker in its arguments, so that a failing
/// test leaves no sleeper behind.
struct Reaper(String);

impl Drop for Reaper {
    fn drop(&mut self) {
        for (pid, _) in processes_with_arg(&self.0) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

async fn log_text(client: &Client, run: &Run, name: &str) -> String {
    String::from_utf8_lossy(&job_log(client, job(run, name).id).await).into_owned()
}

fn statuses(run: &Run, name: &str) -> Vec<StepStatus> {
    job(run, name).steps.iter().map(|s| s.status).collect()
}

async fn wait_for_file(path: &Path, timeout: Duration) {
    eventually(&format!("{} to exist", path.display()), timeout, || async {
        if path.exists() {
            Ok(())
        } else {
            Err("not yet".to_string())
        }
    })
    .await
}

/// Short, so that heartbeats (a quarter of the lease) carry the cancellation within 0.5 s.
const SHORT_LEASE: (&str, &str) = ("OUTPOST__QUEUE__LEASE_SECS", "2");

async fn cancel_stops_the_whole_process_group_and_runs_always_steps(backend: Backend) {
    let db = test_db!(backend);
    let server = TestServer::start(&db, &[SHORT_LEASE]).await;
    let client = server.client();
    let _runner = TestRunner::start(
        &server,
        "e2e-cancel",
        &["e2e"],
        &[("OUTPOST_RUNNER__KILL_GRACE_SECS", "4")],
    )
    .await;
    let scratch = scratch_dir();
    let sleep = unique_sleep();
    let _reaper = Reaper(sleep.clone());

    let yaml = format!(
        r#"
jobs:
  hang:
    runs_on: [e2e]
    steps:
      - name: sleepers
        run: |
          sleep {sleep} &
          echo "started-$((20 + 1))"
          touch "$DIR/started"
          sleep {sleep}
      - name: never
        run: echo "never-$((1 + 1))"
      - name: cleanup
        when: always
        run: echo "cleanup-$((40 + 2))"
"#
    );
    let dir = scratch.path().to_string_lossy().into_owned();
    let queued = apply_and_trigger(&client, "hang", &yaml, &[("DIR", &dir)]).await;
    let hang = queued.jobs[0].id;
    wait_for_file(&scratch.path().join("started"), RUN_TIMEOUT).await;
    // The script touches the file just before it execs its foreground sleep, so wait for both.
    eventually(
        "the step's sleep and its background grandchild to run",
        RUN_TIMEOUT,
        || {
            let running = processes_with_arg(&sleep);
            async move {
                if running.len() == 2 {
                    Ok(())
                } else {
                    Err(format!("{running:?}"))
                }
            }
        },
    )
    .await;

    let asked = Instant::now();
    client
        .cancel_job(hang)
        .await
        .expect("the cancel is accepted");
    eventually(
        "every process of the step to be gone",
        Duration::from_secs(30),
        || async {
            let left = processes_with_arg(&sleep);
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("{left:?}"))
            }
        },
    )
    .await;
    let killed_after = asked.elapsed();
    println!("cancel to every process of the step gone: {killed_after:?}");

    let run = wait_for_run(&client, queued.id, RUN_TIMEOUT).await;
    let log = log_text(&client, &run, "hang").await;
    assert_eq!(job(&run, "hang").status, JobStatus::Cancelled, "{log}");
    assert_eq!(run.status, RunStatus::Cancelled);
    assert_eq!(
        statuses(&run, "hang"),
        [
            StepStatus::Cancelled,
            StepStatus::Skipped,
            StepStatus::Succeeded
        ],
        "{log}"
    );
    assert!(log.contains("started-21"), "{log}");
    assert!(log.contains("cleanup-42"), "the always step ran:\n{log}");
    assert!(!log.contains("never-2"), "{log}");
    assert!(processes_with_arg(&sleep).is_empty());
}

async fn step_and_job_timeouts_end_timed_out(backend: Backend) {
    let db = test_db!(backend);
    let server = TestServer::start(&db, &[SHORT_LEASE]).await;
    let client = server.client();
    let _runner = TestRunner::start(
        &server,
        "e2e-timeouts",
        &["e2e"],
        &[("OUTPOST_RUNNER__KILL_GRACE_SECS", "2")],
    )
    .await;
    let sleep = unique_sleep();
    let _reaper = Reaper(sleep.clone());

    let yaml = format!(
        r#"
jobs:
  step-timeout:
    runs_on: [e2e]
    steps:
      - name: slow step
        timeout: 2s
        run: sleep {sleep}
      - name: report
        when: on_failure
        run: echo "step-timeout-handled-$((1 + 1))"
  job-timeout:
    runs_on: [e2e]
    timeout: 3s
    steps:
      - name: slow job
        run: sleep {sleep}
      - name: never
        run: echo "never-$((2 + 2))"
      - name: report
        when: on_failure
        run: echo "job-timeout-handled-$((3 + 3))"
      - name: always
        when: always
        run: echo "always-$((4 + 4))"
"#
    );
    let queued = apply_and_trigger(&client, "timeouts", &yaml, &[]).await;
    let run = wait_for_run(&client, queued.id, RUN_TIMEOUT).await;

    let step_log = log_text(&client, &run, "step-timeout").await;
    assert_eq!(
        job(&run, "step-timeout").status,
        JobStatus::TimedOut,
        "{step_log}"
    );
    assert_eq!(
        statuses(&run, "step-timeout"),
        [StepStatus::TimedOut, StepStatus::Succeeded],
        "{step_log}"
    );
    assert!(
        step_log.contains("ran past its timeout of 2s"),
        "{step_log}"
    );
    assert!(step_log.contains("step-timeout-handled-2"), "{step_log}");

    let job_log = log_text(&client, &run, "job-timeout").await;
    assert_eq!(
        job(&run, "job-timeout").status,
        JobStatus::TimedOut,
        "{job_log}"
    );
    assert_eq!(
        statuses(&run, "job-timeout"),
        [
            StepStatus::TimedOut,
            StepStatus::Skipped,
            StepStatus::Succeeded,
            StepStatus::Succeeded
        ],
        "{job_log}"
    );
    assert!(
        job_log.contains("job ran past its timeout of 3s"),
        "{job_log}"
    );
    assert!(job_log.contains("job-timeout-handled-6"), "{job_log}");
    assert!(job_log.contains("always-8"), "{job_log}");
    assert!(!job_log.contains("never-4"), "{job_log}");

    assert_eq!(run.status, RunStatus::Failed, "timed out counts as failed");
    assert!(processes_with_arg(&sleep).is_empty());
}

/// Raw bytes the step writes, before base64 (which makes them a third larger in the log).
const RAW_BYTES: u64 = 24_000_000;

async fn server_restart_mid_job_loses_no_log_byte(backend: Backend) {
    let db = test_db!(backend);
    // A lease long enough to outlast the outage: the job must not be declared lost.
    let mut server = TestServer::start(&db, &[("OUTPOST__QUEUE__LEASE_SECS", "30")]).await;
    let client = server.client();
    let runner = TestRunner::start(&server, "e2e-restart", &["e2e"], &[]).await;
    let scratch = scratch_dir();
    let dir = scratch.path();

    let yaml = format!(
        r#"
jobs:
  big:
    runs_on: [e2e]
    steps:
      - name: generate
        run: |
          head -c {RAW_BYTES} /dev/urandom | base64 > "$DIR/data"
          sha256sum "$DIR/data" | cut -d' ' -f1 > "$DIR/sha256"
          touch "$DIR/generated"
      - name: write through the outage
        run: |
          until [ -e "$DIR/server-down" ]; do sleep 0.05; done
          echo "BEGIN-$((1000 + 1))"
          cat "$DIR/data"
          echo "END-$((1000 + 2))"
          touch "$DIR/written"
      - name: afterwards
        run: echo "afterwards-$((6 * 7))"
"#
    );
    let dir_var = dir.to_string_lossy().into_owned();
    let queued = apply_and_trigger(&client, "big", &yaml, &[("DIR", &dir_var)]).await;
    wait_for_file(&dir.join("generated"), RUN_TIMEOUT).await;

    // The whole output is written while the server is down, and the server stays down a few
    // seconds more: the outage itself is the scenario, not a wait for something to happen.
    let stopped = server.stop().await;
    assert!(stopped.success(), "the server stops cleanly: {stopped:?}");
    std::fs::write(dir.join("server-down"), b"").expect("the go file can be written");
    wait_for_file(&dir.join("written"), RUN_TIMEOUT).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    server.restart().await;

    let run = wait_for_run(&client, queued.id, Duration::from_secs(180)).await;
    let big = job(&run, "big");
    assert_eq!(
        run.status,
        RunStatus::Succeeded,
        "{run:#?}\nrunner:\n{}",
        runner.output()
    );
    let log = job_log(&client, big.id).await;
    assert_eq!(big.log_size, log.len() as u64);
    let step = &big.steps[1];
    let (start, end) = (
        step.log_start.expect("the step has log_start") as usize,
        step.log_end.expect("the step has log_end") as usize,
    );
    assert!(start < end && end <= log.len(), "{step:#?}");
    let segment = &log[start..end];

    let begin = b"BEGIN-1001\n";
    let finish = b"END-1002\n";
    let from = find(segment, begin).expect("the step's segment holds its BEGIN line") + begin.len();
    let to = find(segment, finish).expect("the step's segment holds its END line");
    let written = &segment[from..to];
    let expected = std::fs::read_to_string(dir.join("sha256")).expect("the step wrote its sha256");
    let size = std::fs::metadata(dir.join("data"))
        .expect("the data file")
        .len();
    assert_eq!(
        written.len() as u64,
        size,
        "the stored output has a different length"
    );
    assert_eq!(
        hex::encode(sha2::Sha256::digest(written)),
        expected.trim(),
        "the stored output differs from what the step wrote"
    );
    let tail = String::from_utf8_lossy(&log[end..]);
    assert!(tail.contains("afterwards-42"), "{tail}");
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

async fn sigterm_drains_the_running_job_and_takes_no_new_one(backend: Backend) {
    let db = test_db!(backend);
    let server = TestServer::start(&db, &[SHORT_LEASE]).await;
    let client = server.client();
    let mut runner = TestRunner::start(&server, "e2e-drain", &["e2e"], &[]).await;
    let scratch = scratch_dir();
    let dir = scratch.path().to_string_lossy().into_owned();

    let work = r#"
jobs:
  work:
    runs_on: [e2e]
    steps:
      - run: |
          touch "$DIR/started"
          until [ -e "$DIR/go" ]; do sleep 0.05; done
          echo "finished-$((2 * 21))"
"#;
    let first = apply_and_trigger(&client, "work", work, &[("DIR", &dir)]).await;
    wait_for_file(&scratch.path().join("started"), RUN_TIMEOUT).await;

    runner.signal(nix::sys::signal::Signal::SIGTERM);
    eventually(
        "the runner to say it is draining",
        Duration::from_secs(30),
        || async {
            if runner.output().contains("draining") {
                Ok(())
            } else {
                Err(runner.output())
            }
        },
    )
    .await;
    let later = r#"
jobs:
  later:
    runs_on: [e2e]
    steps:
      - run: echo "later"
"#;
    let second = apply_and_trigger(&client, "later", later, &[]).await;
    std::fs::write(scratch.path().join("go"), b"").expect("the go file can be written");

    let exit = runner.wait_exit(Duration::from_secs(60)).await;
    assert_eq!(exit.code(), Some(0), "a drained runner exits 0");
    let run = wait_for_run(&client, first.id, RUN_TIMEOUT).await;
    let log = log_text(&client, &run, "work").await;
    assert_eq!(run.status, RunStatus::Succeeded, "{run:#?}\n{log}");
    assert!(log.contains("finished-42"), "{log}");

    let second = client.get_run(second.id).await.expect("GET the second run");
    let later = job(&second, "later");
    assert_eq!(later.status, JobStatus::Queued, "{second:#?}");
    assert_eq!(later.runner_id, None, "{second:#?}");
}

async fn once_runs_one_job_and_exits(backend: Backend) {
    let db = test_db!(backend);
    let server = TestServer::start(&db, &[]).await;
    let client = server.client();
    let yaml = r#"
jobs:
  one:
    runs_on: [e2e]
    steps:
      - run: echo "ran-$((3 * 3))"
"#;
    let first = apply_and_trigger(&client, "once", yaml, &[]).await;
    let second = apply_and_trigger(&client, "once", yaml, &[]).await;
    let mut runner =
        TestRunner::start_with_args(&server, "e2e-once", &["e2e"], &[], &["--once"]).await;
    let exit = runner.wait_exit(Duration::from_secs(60)).await;
    assert_eq!(exit.code(), Some(0), "{}", runner.output());

    let first = client.get_run(first.id).await.expect("GET the first run");
    let log = log_text(&client, &first, "one").await;
    assert_eq!(first.status, RunStatus::Succeeded, "{first:#?}");
    assert!(log.contains("ran-9"), "{log}");
    let second = client.get_run(second.id).await.expect("GET the second run");
    assert_eq!(job(&second, "one").status, JobStatus::Queued, "{second:#?}");
}
