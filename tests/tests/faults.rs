//! The fault suite: each test injects one fault real deployments see, asserts the outcome
//! (no job lost or run twice, no log byte lost, the system recovers by itself) and prints its
//! figures (what was injected, lost bytes, duplicate executions, recovery time).
//! Run with `--nocapture` to see the figures.
//!
//! The runner killed with `kill -9` mid-job is covered by `lost_job.rs` (the job ends `lost` within
//! the shortened lease, is never run again, its side effect happened once), and late calls with an
//! expired lease token answering `409` by `fencing.rs` (through the protocol client); they are not
//! repeated here. What is added here is the real runner making those late calls itself: it is
//! frozen (SIGSTOP) past its lease and thawed, as a VM paused and resumed would be.
//!
//! The fixtures that need root (a private PostgreSQL instance, a network namespace, a tmpfs) live
//! in `outpost_tests::fault`; without root these tests skip (and fail with `CI=true`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use outpost_tests::fault::{NetNs, PrivatePostgres, TinyFs};
use outpost_tests::outpost_protocol::{JobStatus, RunStatus};
use outpost_tests::{
    Backend, TestDb, TestRunner, TestServer, apply_and_trigger, backend_tests, describe_run,
    eventually, job_log, scratch_dir, test_db, trigger, wait_for_run,
};
use sha2::{Digest, Sha256};

backend_tests!(
    server_killed_mid_run_loses_no_log_byte,
    frozen_runner_is_fenced_off_when_it_wakes
);

/// The text a job's step prints: `lines` numbered lines tagged with the job's name.
fn expected_output(job: &str, lines: u32) -> String {
    (1..=lines)
        .map(|i| format!("{job} line {i:05} of a deterministic log that the test can hash\n"))
        .collect()
}

/// A step that prints [`expected_output`] line by line, `pause` seconds apart, after recording
/// its execution in `$FILE`.
fn printing_step(job: &str, lines: u32, pause: &str) -> String {
    format!(
        "      - run: |\n          echo {job} >> \"$FILE\"\n          for i in $(seq 1 {lines}); do printf '{job} line %05d of a deterministic log that the test can hash\\n' \"$i\"; sleep {pause}; done\n"
    )
}

/// The step's own output in a stored log of job `job`: the lines the step printed, without the
/// runner's header and `$ command` lines. A lost, torn or repeated byte of the step's output shows
/// as a line missing, cut or repeated here.
fn step_output(job: &str, log: &[u8]) -> String {
    let tag = format!("{job} line ");
    String::from_utf8_lossy(log)
        .split_inclusive('\n')
        .filter(|line| line.starts_with(&tag))
        .collect()
}

/// The whole stored log of a job, read page by page up to its `log_size`.
async fn full_log(client: &outpost_tests::outpost_protocol::Client, job: uuid::Uuid) -> Vec<u8> {
    let size = client.get_job(job).await.expect("GET job").log_size;
    let mut log = Vec::new();
    while (log.len() as u64) < size {
        let page = client
            .get_log(job, log.len() as u64)
            .await
            .expect("GET log");
        assert!(
            !page.is_empty(),
            "the log ends at {} of {size} bytes",
            log.len()
        );
        log.extend_from_slice(&page);
    }
    log
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Lines of `file` counted by their text.
fn count_lines(file: &std::path::Path) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for line in std::fs::read_to_string(file).unwrap_or_default().lines() {
        *counts.entry(line.to_string()).or_insert(0) += 1;
    }
    counts
}

// ---------------------------------------------------------------------------
// A runner frozen past its lease
// ---------------------------------------------------------------------------

const FROZEN: &str = r#"
jobs:
  frozen:
    runs_on: [e2e]
    steps:
      - run: |
          echo "$OUTPOST_JOB_ID" >> "$FILE"
          for i in $(seq 1 300); do echo "tick $i"; sleep 0.1; done
"#;

const PING: &str = r#"
jobs:
  ping:
    runs_on: [e2e]
    steps:
      - run: echo pong
"#;

const FROZEN_LEASE_SECS: u64 = 2;

async fn frozen_runner_is_fenced_off_when_it_wakes(backend: Backend) {
    use nix::sys::signal::Signal;
    let db = test_db!(backend);
    let server = TestServer::start(
        &db,
        &[("OUTPOST__QUEUE__LEASE_SECS", &FROZEN_LEASE_SECS.to_string())],
    )
    .await;
    let client = server.client();
    let scratch = scratch_dir();
    let file = scratch.path().join("executions.txt");
    let file_str = file.display().to_string();
    let runner = TestRunner::start(&server, "sleeper", &["e2e"], &[]).await;
    let run = apply_and_trigger(&client, "frozen", FROZEN, &[("FILE", &file_str)]).await;
    let job_id = outpost_tests::job(&run, "frozen").id;
    eventually("the step to print", Duration::from_secs(60), || async {
        let log = job_log(&client, job_id).await;
        if String::from_utf8_lossy(&log).contains("tick 3\n") {
            Ok(())
        } else {
            Err(format!("{} bytes", log.len()))
        }
    })
    .await;

    runner.signal(Signal::SIGSTOP);
    let frozen_at = Instant::now();
    let lost = outpost_tests::wait_for_job_status(
        &client,
        job_id,
        JobStatus::Lost,
        Duration::from_secs(30),
    )
    .await;
    let lost_after = frozen_at.elapsed();
    runner.signal(Signal::SIGCONT);
    let thawed = Instant::now();
    // Its next heartbeat, log append or step report answers 409 and it gives the job up.
    let gave_up_after = eventually(
        "the thawed runner to give the job up",
        Duration::from_secs(30),
        || async {
            if runner
                .output()
                .contains("the job was given up because its lease was lost")
            {
                Ok(thawed.elapsed())
            } else {
                Err("not yet".to_string())
            }
        },
    )
    .await;

    // It is healthy afterwards: it takes the next job and runs it.
    let ping = apply_and_trigger(&client, "ping", PING, &[]).await;
    let ping = wait_for_run(&client, ping.id, Duration::from_secs(60)).await;
    assert_eq!(ping.status, RunStatus::Succeeded, "{}", describe_run(&ping));

    let after = client.get_job(job_id).await.expect("GET job");
    let executions = count_lines(&file);
    println!(
        "fault=runner-frozen-past-lease backend={backend:?} lease={FROZEN_LEASE_SECS}s \
         lost_after_freeze={lost_after:?} gave_up_after_thaw={gave_up_after:?} \
         log_bytes_at_lost={} log_bytes_after={} attempt={} executions={}",
        lost.log_size,
        after.log_size,
        after.attempt,
        executions.get(&job_id.to_string()).copied().unwrap_or(0),
    );
    assert!(
        lost_after < Duration::from_secs(3 * FROZEN_LEASE_SECS + 2),
        "lost within the lease (and the reaper's interval): {lost_after:?}"
    );
    assert_eq!(after.status, JobStatus::Lost, "{after:#?}");
    assert_eq!(after.attempt, 1, "never handed out again: {after:#?}");
    assert_eq!(
        after.log_size, lost.log_size,
        "the thawed runner's late log appends were refused"
    );
    assert_eq!(after.finished_at, lost.finished_at);
    assert_eq!(after.steps, lost.steps, "its late step report was refused");
    assert_eq!(
        executions.get(&job_id.to_string()),
        Some(&1),
        "executed once: {executions:?}"
    );
}

// ---------------------------------------------------------------------------
// kill -9 of the server
// ---------------------------------------------------------------------------

const KILL_JOBS: [&str; 3] = ["alpha", "beta", "gamma"];
const KILL_LINES: u32 = 250;

async fn server_killed_mid_run_loses_no_log_byte(backend: Backend) {
    let db = test_db!(backend);
    // Long enough that the leases outlive the server's absence.
    let mut server = TestServer::start(&db, &[("OUTPOST__QUEUE__LEASE_SECS", "20")]).await;
    let client = server.client();
    let scratch = scratch_dir();
    let file = scratch.path().join("executions.txt");
    let file_str = file.display().to_string();
    let _runner =
        TestRunner::start_with_args(&server, "survivor", &["e2e"], &[], &["--concurrency", "3"])
            .await;

    let mut yaml = String::from("jobs:\n");
    for name in KILL_JOBS {
        yaml.push_str(&format!(
            "  {name}:\n    runs_on: [e2e]\n    steps:\n{}",
            printing_step(name, KILL_LINES, "0.02")
        ));
    }
    let run = apply_and_trigger(&client, "kill-server", &yaml, &[("FILE", &file_str)]).await;

    // Every job is running and has stored some output, none has finished.
    eventually(
        "every job to have stored output",
        Duration::from_secs(60),
        || async {
            let run = client.get_run(run.id).await.map_err(|e| e.to_string())?;
            let all = run
                .jobs
                .iter()
                .all(|j| j.status == JobStatus::Running && j.log_size > 0);
            if all { Ok(()) } else { Err(describe_run(&run)) }
        },
    )
    .await;

    let killed_at = Instant::now();
    server.kill().await;
    // The server stays away for a while, as a crashed pod being rescheduled would.
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.restart().await;
    let down_for = killed_at.elapsed();
    let back = Instant::now();

    let done = wait_for_run(&client, run.id, Duration::from_secs(120)).await;
    let caught_up = back.elapsed();
    assert_eq!(done.status, RunStatus::Succeeded, "{}", describe_run(&done));

    let executions = count_lines(&file);
    for name in KILL_JOBS {
        let job = outpost_tests::job(&done, name);
        assert_eq!(job.attempt, 1, "{name} was claimed once: {job:#?}");
        let expected = expected_output(name, KILL_LINES);
        let log = full_log(&client, job.id).await;
        let got = step_output(name, &log);
        let lost = expected.len() as i64 - got.len() as i64;
        println!(
            "fault=server-kill-9 backend={backend:?} job={name} down_for={down_for:?} \
             run_done_after_restart={caught_up:?} expected_bytes={} stored_step_bytes={} \
             lost_bytes={lost} executions={} sha256_expected={} sha256_stored={}",
            expected.len(),
            got.len(),
            executions.get(name).copied().unwrap_or(0),
            sha256_hex(expected.as_bytes()),
            sha256_hex(got.as_bytes()),
        );
        assert_eq!(
            sha256_hex(got.as_bytes()),
            sha256_hex(expected.as_bytes()),
            "job {name}'s stored log differs from what its step printed; stored:\n{got}"
        );
        assert_eq!(
            job.log_size,
            log.len() as u64,
            "log_size matches the stored log"
        );
        assert_eq!(
            executions.get(name),
            Some(&1),
            "{name} ran once: {executions:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// PostgreSQL restarted while jobs flow
// ---------------------------------------------------------------------------

const FLOW_JOBS: usize = 200;

const FLOW: &str = r#"
jobs:
  tick:
    runs_on: [e2e]
    steps:
      - run: |
          echo "$OUTPOST_JOB_ID" >> "$FILE"
          echo "tick $OUTPOST_JOB_ID"
"#;

async fn readyz(server: &TestServer) -> Option<u16> {
    server
        .http()
        .get(server.api("/readyz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_while_200_jobs_flow() {
    let Some(mut pg) = tokio::task::spawn_blocking(PrivatePostgres::start)
        .await
        .expect("starting postgres does not panic")
    else {
        return;
    };
    let url = pg.create_database("outpost_faults");
    let db = TestDb::existing(Backend::Postgres, &url);
    let server = TestServer::start(&db, &[("OUTPOST__QUEUE__LEASE_SECS", "30")]).await;
    let client = server.client();
    let scratch = scratch_dir();
    let file = scratch.path().join("executions.txt");
    let file_str = file.display().to_string();

    client
        .apply_pipeline("flow", FLOW)
        .await
        .expect("apply the pipeline");
    let mut runs = Vec::with_capacity(FLOW_JOBS);
    for _ in 0..FLOW_JOBS {
        runs.push(trigger(&client, "flow", &[("FILE", &file_str)]).await.id);
    }
    let _runners = [
        TestRunner::start_with_args(&server, "flow-a", &["e2e"], &[], &["--concurrency", "4"])
            .await,
        TestRunner::start_with_args(&server, "flow-b", &["e2e"], &[], &["--concurrency", "4"])
            .await,
    ];

    // Cut the database once a quarter of the jobs has run.
    eventually("50 executions", Duration::from_secs(120), || async {
        let n = count_lines(&file).len();
        if n >= FLOW_JOBS / 4 {
            Ok(())
        } else {
            Err(format!("{n} executions"))
        }
    })
    .await;
    let before = count_lines(&file).len();
    let stopped_at = Instant::now();
    pg = tokio::task::spawn_blocking(move || {
        pg.stop_server();
        pg
    })
    .await
    .expect("stopping postgres does not panic");
    let not_ready_after = eventually(
        "/readyz to report the outage",
        Duration::from_secs(30),
        || async {
            match readyz(&server).await {
                Some(503) => Ok(stopped_at.elapsed()),
                other => Err(format!("/readyz answered {other:?}")),
            }
        },
    )
    .await;
    // The outage itself: the database stays away for 5 s.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        readyz(&server).await,
        Some(503),
        "/readyz stays not-ready during the outage"
    );
    let outage = stopped_at.elapsed();
    let started_at = Instant::now();
    pg = tokio::task::spawn_blocking(move || {
        pg.start_server();
        pg
    })
    .await
    .expect("starting postgres does not panic");
    let pg_start = started_at.elapsed();
    let ready_after = eventually(
        "/readyz to report ready again",
        Duration::from_secs(60),
        || async {
            match readyz(&server).await {
                Some(200) => Ok(started_at.elapsed()),
                other => Err(format!("/readyz answered {other:?}")),
            }
        },
    )
    .await;

    let mut failed = Vec::new();
    let mut reattempted = Vec::new();
    for id in &runs {
        let run = wait_for_run(&client, *id, Duration::from_secs(180)).await;
        let job = outpost_tests::job(&run, "tick");
        if run.status != RunStatus::Succeeded {
            failed.push(describe_run(&run));
        }
        if job.attempt != 1 {
            reattempted.push(describe_run(&run));
        }
    }
    let all_done = started_at.elapsed();
    let executions = count_lines(&file);
    let twice: Vec<_> = executions.iter().filter(|(_, n)| **n > 1).collect();
    println!(
        "fault=postgres-restart jobs={FLOW_JOBS} executed_before_outage={before} \
         outage={outage:?} readyz_503_after={not_ready_after:?} pg_start={pg_start:?} \
         readyz_200_after_pg_start={ready_after:?} all_jobs_done_after_pg_start={all_done:?} \
         executions={} duplicate_executions={} failed_runs={} reattempted_jobs={}",
        executions.len(),
        twice.len(),
        failed.len(),
        reattempted.len()
    );
    assert!(
        failed.is_empty(),
        "every run succeeds: {failed:#?}\npostgres log:\n{}",
        pg.log()
    );
    assert!(
        reattempted.is_empty(),
        "no job claimed twice: {reattempted:#?}"
    );
    assert!(twice.is_empty(), "no job executed twice: {twice:?}");
    assert_eq!(
        executions.len(),
        FLOW_JOBS,
        "every job executed once: {executions:?}"
    );
}

// ---------------------------------------------------------------------------
// Network partition
// ---------------------------------------------------------------------------

const PARTITION: Duration = Duration::from_secs(20);
const PARTITION_LINES: u32 = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_runner_finishes_with_a_complete_log() {
    let Some(ns) = NetNs::create() else { return };
    let db = test_db!(Backend::Sqlite);
    // The server listens on the host end of the link, where the namespace can reach it; the
    // default lease (60 s) outlives the partition.
    let listen = format!("{}:0", ns.host_ip());
    let server = TestServer::start(&db, &[("OUTPOST__SERVER__LISTEN", &listen)]).await;
    let client = server.client();
    let scratch = scratch_dir();
    let file = scratch.path().join("executions.txt");
    let file_str = file.display().to_string();
    let wrapper = ["ip", "netns", "exec", ns.name()];
    // Plain HTTP to a non-loopback address is refused unless the operator opts in.
    let mut runner = TestRunner::start_wrapped(
        &server,
        "islander",
        &["e2e"],
        &[("OUTPOST_RUNNER__ALLOW_INSECURE_HTTP", "true")],
        &[],
        &wrapper,
    )
    .await;

    let yaml = format!(
        "jobs:\n  chatty:\n    runs_on: [e2e]\n    steps:\n{}",
        printing_step("chatty", PARTITION_LINES, "0.1")
    );
    let run = apply_and_trigger(&client, "partition", &yaml, &[("FILE", &file_str)]).await;
    eventually(
        "the job to have stored output",
        Duration::from_secs(60),
        || async {
            let run = client.get_run(run.id).await.map_err(|e| e.to_string())?;
            let j = outpost_tests::job(&run, "chatty");
            if j.status == JobStatus::Running && j.log_size > 0 {
                Ok(())
            } else {
                Err(describe_run(&run))
            }
        },
    )
    .await;

    ns.cut();
    let cut_at = Instant::now();
    let size_at_cut =
        outpost_tests::job(&client.get_run(run.id).await.expect("run"), "chatty").log_size;
    // The partition: the link stays down for 20 s.
    tokio::time::sleep(PARTITION).await;
    let size_before_restore =
        outpost_tests::job(&client.get_run(run.id).await.expect("run"), "chatty").log_size;
    ns.restore();
    let restored = Instant::now();
    let done = wait_for_run(&client, run.id, Duration::from_secs(120)).await;
    let caught_up = restored.elapsed();
    assert_eq!(done.status, RunStatus::Succeeded, "{}", describe_run(&done));
    let job = outpost_tests::job(&done, "chatty");
    let expected = expected_output("chatty", PARTITION_LINES);
    let got = step_output("chatty", &full_log(&client, job.id).await);
    println!(
        "fault=network-partition cut_for={:?} ns={} log_bytes_at_cut={size_at_cut} \
         log_bytes_before_restore={size_before_restore} run_done_after_restore={caught_up:?} \
         expected_bytes={} stored_step_bytes={} lost_bytes={} attempt={} executions={} \
         sha256_expected={} sha256_stored={}",
        restored - cut_at,
        ns.name(),
        expected.len(),
        got.len(),
        expected.len() as i64 - got.len() as i64,
        job.attempt,
        count_lines(&file).get("chatty").copied().unwrap_or(0),
        sha256_hex(expected.as_bytes()),
        sha256_hex(got.as_bytes()),
    );
    assert_eq!(
        size_before_restore, size_at_cut,
        "nothing reached the server while the link was down"
    );
    assert_eq!(
        sha256_hex(got.as_bytes()),
        sha256_hex(expected.as_bytes()),
        "the log is complete after the partition; stored:\n{got}"
    );
    assert_eq!(job.attempt, 1, "{job:#?}");
    assert_eq!(count_lines(&file).get("chatty"), Some(&1));
    runner.stop().await;
}

// ---------------------------------------------------------------------------
// The runner's spool on a filesystem that fills up
// ---------------------------------------------------------------------------

/// The spool's filesystem: far smaller than what the step prints while the server is away.
const TINY_FS_BYTES: u64 = 1024 * 1024;
/// What the step prints in one go while the server is paused: whole lines of 50 bytes, more than
/// the tiny spool and the runner's in-memory fallback (16 MiB) hold together.
const FLOOD_BYTES: u64 = 24_000_000;

const FLOOD: &str = r#"
jobs:
  flood:
    runs_on: [e2e]
    steps:
      - run: |
          echo flood >> "$FILE"
          echo "first line"
          while [ ! -e "$GO" ]; do sleep 0.05; done
          { yes 'flooding the spool with a line of 50 bytes ......' || true; } | head -c FLOOD_BYTES
          echo "flood done"
          while [ ! -e "$GO2" ]; do sleep 0.05; done
          echo "last line"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_spool_filesystem_drops_output_and_says_so() {
    let Some(tiny) = TinyFs::mount(TINY_FS_BYTES) else {
        return;
    };
    let db = test_db!(Backend::Sqlite);
    let server = TestServer::start(&db, &[]).await;
    let client = server.client();
    let scratch = scratch_dir();
    let file = scratch.path().join("executions.txt");
    let go = scratch.path().join("go");
    let go2 = scratch.path().join("go2");
    let (file_str, go_str, go2_str) = (
        file.display().to_string(),
        go.display().to_string(),
        go2.display().to_string(),
    );
    let spool_dir = tiny.path().display().to_string();
    let runner = TestRunner::start(
        &server,
        "flooded",
        &["e2e"],
        &[("OUTPOST_RUNNER__LOG_SPOOL_DIR", &spool_dir)],
    )
    .await;
    let yaml = FLOOD.replace("FLOOD_BYTES", &FLOOD_BYTES.to_string());
    let run = apply_and_trigger(
        &client,
        "flood",
        &yaml,
        &[("FILE", &file_str), ("GO", &go_str), ("GO2", &go2_str)],
    )
    .await;
    // The step has started (its first line is stored) before the server goes away.
    let job_id = eventually("the first line", Duration::from_secs(60), || async {
        let run = client.get_run(run.id).await.map_err(|e| e.to_string())?;
        let j = outpost_tests::job(&run, "flood");
        let log = job_log(&client, j.id).await;
        if String::from_utf8_lossy(&log).contains("first line\n") {
            Ok(j.id)
        } else {
            Err(describe_run(&run))
        }
    })
    .await;

    // The server stops answering (SIGSTOP): the runner must keep the output somewhere.
    let pid = nix::unistd::Pid::from_raw(server.pid().expect("running") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP the server");
    let paused = Instant::now();
    std::fs::write(&go, b"").expect("start the flood");
    eventually(
        "the runner to say that its spool is full",
        Duration::from_secs(60),
        || async {
            let out = runner.output();
            if out.contains("could not write the job's log spool")
                && out.contains("dropping new output")
            {
                Ok(())
            } else {
                Err("no message yet".to_string())
            }
        },
    )
    .await;
    let spool_full_after = paused.elapsed();
    // The server stays away a little longer: the fault is an outage, not a hiccup.
    tokio::time::sleep(Duration::from_secs(2)).await;
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).expect("SIGCONT the server");
    let paused_for = paused.elapsed();
    // Once what the runner kept has reached the server, the step prints its last line.
    let drained_after = eventually(
        "the kept output to reach the server",
        Duration::from_secs(120),
        || async {
            let j = client.get_job(job_id).await.map_err(|e| e.to_string())?;
            if j.log_size >= 16 * 1024 * 1024 {
                Ok(paused.elapsed() - paused_for)
            } else {
                Err(format!("{} bytes stored", j.log_size))
            }
        },
    )
    .await;
    std::fs::write(&go2, b"").expect("let the step end");

    let done = wait_for_run(&client, run.id, Duration::from_secs(120)).await;
    assert_eq!(done.status, RunStatus::Succeeded, "{}", describe_run(&done));
    let log = String::from_utf8_lossy(&full_log(&client, job_id).await).into_owned();
    let notes: Vec<&str> = log.lines().filter(|l| l.starts_with("[outpost]")).collect();
    let dropped: u64 = notes
        .iter()
        .filter_map(|l| {
            l.strip_prefix("[outpost] ")?
                .split_once(" bytes of output were dropped")
                .and_then(|(n, _)| n.parse::<u64>().ok())
        })
        .sum();
    let kept = log
        .lines()
        .filter(|l| l.starts_with("flooding the spool"))
        .map(|l| l.len() as u64 + 1)
        .sum::<u64>();
    let runner_messages: Vec<String> = runner
        .output()
        .lines()
        .filter(|l| l.contains("spool") || l.contains("dropping"))
        .map(str::to_owned)
        .collect();
    println!(
        "fault=spool-filesystem-full fs_bytes={TINY_FS_BYTES} printed_while_paused={FLOOD_BYTES} \
         server_paused_for={paused_for:?} message_after={spool_full_after:?} \
         drained_after_resume={drained_after:?} \
         flood_bytes_stored~={kept} dropped_bytes_reported={dropped} notes={notes:?} \
         runner_messages={runner_messages:?}"
    );
    assert!(
        log.contains("first line\n"),
        "the log starts as the step did:\n{}",
        log.chars().take(2000).collect::<String>()
    );
    // "flood done" was printed while the buffer was full, so it is among the dropped bytes; the
    // last line comes after the buffer drained, right after the note that says what was dropped.
    let tail: String = {
        let mut chars: Vec<char> = log.chars().rev().take(2000).collect();
        chars.reverse();
        chars.into_iter().collect()
    };
    let note_at = log.rfind("bytes of output were dropped");
    let last_at = log.rfind("\nlast line\n");
    assert!(
        matches!((note_at, last_at), (Some(n), Some(l)) if n < l),
        "the job went on after the spool filled up, and the log says what was dropped before its last line; log tail:\n{tail}"
    );
    assert!(
        dropped > 0,
        "the log says how many bytes were dropped: {notes:?}"
    );
    // Each note may split a line; the count of the line's bytes is then off by its newline.
    let accounted = kept + dropped;
    assert!(
        accounted.abs_diff(FLOOD_BYTES) <= 2 * 50 * notes.len() as u64,
        "the stored and the dropped bytes add up to what was printed: {kept} + {dropped} vs {FLOOD_BYTES}; log tail:\n{tail}"
    );
    assert_eq!(count_lines(&file).get("flood"), Some(&1));
    assert!(runner.pid().is_some(), "the runner did not crash");
    let exited = std::fs::read_to_string(format!("/proc/{}/stat", runner.pid().unwrap()));
    assert!(exited.is_ok(), "the runner process still exists");
}
