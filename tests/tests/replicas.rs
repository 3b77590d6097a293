//! Several server replicas on one PostgreSQL database: two `outpost-server` processes wake each
//! other through `LISTEN/NOTIFY`, so it does not matter which one a runner, a viewer or a caller
//! talks to. Run with `--nocapture` to see the measured latencies.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use outpost_tests::outpost_protocol::sse::LogEvent;
use outpost_tests::outpost_protocol::{
    Client, CompleteRequest, JobStatus, RegisterRequest, RunStatus, StepStatus, StepUpdate,
};
use outpost_tests::{
    Backend, TestRunner, TestServer, apply_and_trigger, describe_run, eventually, scratch_dir,
    test_db, trigger, wait_for_job_status, wait_for_run,
};

const ONE_JOB: &str = r#"
jobs:
  deploy:
    runs_on: [e2e]
    steps:
      - run: echo "run by a fake runner"
"#;

/// Two replicas, A and B, on one fresh PostgreSQL database, with `env` for both.
async fn two_replicas(
    db: &outpost_tests::TestDb,
    env: &[(&str, &str)],
) -> (TestServer, TestServer) {
    let a = TestServer::start(db, env).await;
    let b = TestServer::start(db, env).await;
    (a, b)
}

/// Registers a runner (through `a`) and returns a client for it on each replica.
async fn runner_on_both(a: &TestServer, b: &TestServer, name: &str) -> (Client, Client) {
    let registration = a.registration_token().await;
    let answer = a
        .client_with(Some(registration))
        .register(&RegisterRequest {
            name: name.to_string(),
            labels: vec!["e2e".to_string()],
            version: outpost_tests::outpost_protocol::VERSION.to_string(),
            os: std::env::consts::OS.to_string(),
            arch: std::env::consts::ARCH.to_string(),
            clusters: Vec::new(),
        })
        .await
        .expect("register the fake runner");
    (
        a.client_with(Some(answer.runner_token.clone())),
        b.client_with(Some(answer.runner_token)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_enqueued_on_b_reaches_runner_polling_a_at_once() {
    let db = test_db!(Backend::Postgres);
    let (a, b) = two_replicas(&db, &[]).await;
    let (on_a, _) = runner_on_both(&a, &b, "poller").await;
    b.client()
        .apply_pipeline("cross", ONE_JOB)
        .await
        .expect("apply through B");

    let mut latencies = Vec::new();
    for round in 0..5 {
        // The runner is long-polling A before the job exists.
        let poll = tokio::spawn({
            let on_a = on_a.clone();
            async move {
                let got = on_a.acquire(Duration::from_secs(30)).await;
                (got, Instant::now())
            }
        });
        // Give the long poll time to arrive, so that the job is not simply waiting for it; a
        // poll that has not arrived yet would still get the job, only the latency would shrink.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let enqueued = Instant::now();
        let run = trigger(&b.client(), "cross", &[]).await;
        let (got, arrived) = poll.await.expect("the poll task");
        let acquired = got
            .expect("acquire on A")
            .expect("the job enqueued through B reaches A's long poll");
        let latency = arrived - enqueued;
        assert_eq!(acquired.job.run_id, run.id);
        // Finish it through A, so that the next round starts from an empty queue.
        on_a.complete(
            acquired.job.id,
            &acquired.lease.token,
            &CompleteRequest {
                status: JobStatus::Succeeded,
                exit_code: Some(0),
            },
        )
        .await
        .expect("complete through A");
        println!("replicas=enqueue-on-B-acquire-on-A round={round} latency={latency:?}");
        latencies.push(latency);
    }
    let worst = *latencies.iter().max().expect("rounds ran");
    println!("replicas=enqueue-on-B-acquire-on-A worst_latency={worst:?} all={latencies:?}");
    assert!(
        worst < Duration::from_secs(2),
        "a job enqueued through B reaches a runner polling A at once (not after the poll ends): {latencies:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_appended_through_b_shows_in_a_stream_on_a() {
    let db = test_db!(Backend::Postgres);
    let (a, b) = two_replicas(&db, &[]).await;
    let (_, on_b) = runner_on_both(&a, &b, "appender").await;
    let run = apply_and_trigger(&b.client(), "stream", ONE_JOB, &[]).await;
    let acquired = on_b
        .acquire(Duration::from_secs(10))
        .await
        .expect("acquire on B")
        .expect("a job");
    let (job_id, lease) = (acquired.job.id, acquired.lease.token.clone());
    assert_eq!(acquired.job.run_id, run.id);
    on_b.update_step(
        job_id,
        &lease,
        0,
        &StepUpdate {
            status: StepStatus::Running,
            exit_code: None,
            log_offset: 0,
        },
    )
    .await
    .expect("step running");

    // A viewer on A, connected before any byte exists.
    let mut stream = a.client().stream_log(job_id, 0);
    let mut offset = 0u64;
    let mut latencies = Vec::new();
    for i in 0..5 {
        let chunk = format!("line {i} appended through B\n");
        let sent = Instant::now();
        let answer = on_b
            .append_log(job_id, &lease, offset, Bytes::from(chunk.clone()))
            .await
            .expect("append through B");
        offset = answer.next_offset;
        let mut seen = String::new();
        while seen.len() < chunk.len() {
            let event = tokio::time::timeout(Duration::from_secs(10), stream.next())
                .await
                .expect("A's stream shows B's append within 10 s")
                .expect("the stream goes on")
                .expect("a log event");
            match event {
                LogEvent::Text { text, .. } => seen.push_str(&text),
                other => panic!("unexpected event {other:?}"),
            }
        }
        let latency = sent.elapsed();
        assert_eq!(seen, chunk);
        println!("replicas=append-on-B-stream-on-A chunk={i} latency={latency:?}");
        latencies.push(latency);
    }
    let sent = Instant::now();
    on_b.complete(
        job_id,
        &lease,
        &CompleteRequest {
            status: JobStatus::Succeeded,
            exit_code: Some(0),
        },
    )
    .await
    .expect("complete through B");
    let end = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("the end event arrives on A")
        .expect("the stream goes on")
        .expect("an event");
    assert!(
        matches!(end, LogEvent::End { status: JobStatus::Succeeded, log_size, .. } if log_size == offset),
        "{end:?}"
    );
    // The completion's own notification wakes A's stream; without it A would only notice on its
    // next periodic re-check, seconds later.
    let end_latency = sent.elapsed();
    println!("replicas=complete-on-B-end-on-A latency={end_latency:?}");
    latencies.push(end_latency);
    println!(
        "replicas=append-on-B-stream-on-A worst_latency={:?}",
        latencies.iter().max()
    );
    assert!(
        latencies.iter().all(|l| *l < Duration::from_secs(2)),
        "{latencies:?}"
    );
}

const HANG: &str = r#"
jobs:
  hang:
    runs_on: [e2e]
    steps:
      - run: |
          trap 'echo trapped >> "$FILE"; exit 130' INT TERM
          echo started >> "$FILE"
          sleep 120 &
          wait
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_on_a_reaches_runner_connected_to_b() {
    let db = test_db!(Backend::Postgres);
    // A short lease: the runner heartbeats every 0.5 s and learns of the cancel from the answer.
    let (a, b) = two_replicas(&db, &[("OUTPOST__QUEUE__LEASE_SECS", "2")]).await;
    let scratch = scratch_dir();
    let file = scratch.path().join("trace.txt");
    let file_str = file.display().to_string();
    let _runner = TestRunner::start(&b, "on-b", &["e2e"], &[]).await;
    let run = apply_and_trigger(&b.client(), "hang", HANG, &[("FILE", &file_str)]).await;
    eventually("the step to start", Duration::from_secs(60), || async {
        match std::fs::read_to_string(&file) {
            Ok(t) if t.contains("started") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let job_id = outpost_tests::job(&run, "hang").id;
    let cancelled_at = Instant::now();
    a.client()
        .cancel_job(job_id)
        .await
        .expect("cancel through A");
    let reached = eventually(
        "the step on B's runner to be signalled",
        Duration::from_secs(30),
        || async {
            match std::fs::read_to_string(&file) {
                Ok(t) if t.contains("trapped") => Ok(cancelled_at.elapsed()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    let job = wait_for_job_status(
        &a.client(),
        job_id,
        JobStatus::Cancelled,
        Duration::from_secs(30),
    )
    .await;
    let ended = cancelled_at.elapsed();
    println!(
        "replicas=cancel-on-A-runner-on-B step_signalled_after={reached:?} job_cancelled_after={ended:?}"
    );
    assert_eq!(job.attempt, 1);
    let done = wait_for_run(&a.client(), run.id, Duration::from_secs(30)).await;
    assert_eq!(done.status, RunStatus::Cancelled, "{}", describe_run(&done));
    assert!(reached < Duration::from_secs(10), "{reached:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reaper_on_both_replicas_marks_each_lost_job_once() {
    const JOBS: usize = 6;
    let db = test_db!(Backend::Postgres);
    // Both reapers run every 100 ms over the same rows: any double action would show.
    let env = [
        ("OUTPOST__QUEUE__LEASE_SECS", "2"),
        ("OUTPOST__QUEUE__REAPER_INTERVAL_MS", "100"),
    ];
    let (a, b) = two_replicas(&db, &env).await;
    let (on_a, on_b) = runner_on_both(&a, &b, "vanisher").await;
    a.client()
        .apply_pipeline("doomed", ONE_JOB)
        .await
        .expect("apply");
    let mut runs = Vec::new();
    for _ in 0..JOBS {
        runs.push(trigger(&a.client(), "doomed", &[]).await.id);
    }
    // Claim every job, alternating replicas, and confirm each with one heartbeat, then vanish.
    let mut jobs = Vec::new();
    for i in 0..JOBS {
        let runner = if i % 2 == 0 { &on_a } else { &on_b };
        let acquired = runner
            .acquire(Duration::from_secs(10))
            .await
            .expect("acquire")
            .expect("a job");
        runner
            .heartbeat(acquired.job.id, &acquired.lease.token)
            .await
            .expect("heartbeat");
        jobs.push(acquired.job.id);
    }
    let vanished = Instant::now();
    for id in &jobs {
        wait_for_job_status(&a.client(), *id, JobStatus::Lost, Duration::from_secs(30)).await;
    }
    let all_lost = vanished.elapsed();
    // Let both reapers run a few more times over the lost rows.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let outputs = [a.output(), b.output()];
    let mut marks = Vec::new();
    for id in &jobs {
        let job = a.client().get_job(*id).await.expect("GET job");
        assert_eq!(job.status, JobStatus::Lost, "{job:#?}");
        assert_eq!(job.attempt, 1, "never handed out again: {job:#?}");
        let per_replica: Vec<usize> = outputs
            .iter()
            .map(|out| {
                out.lines()
                    .filter(|l| {
                        l.contains("lease expired: job lost") && l.contains(&id.to_string())
                    })
                    .count()
            })
            .collect();
        marks.push(per_replica.clone());
        assert_eq!(
            per_replica.iter().sum::<usize>(),
            1,
            "job {id} was marked lost exactly once across the replicas (A, B): {per_replica:?}"
        );
    }
    for id in &runs {
        let run = wait_for_run(&a.client(), *id, Duration::from_secs(10)).await;
        assert_eq!(run.status, RunStatus::Failed, "{}", describe_run(&run));
    }
    let by_a: usize = marks.iter().map(|m| m[0]).sum();
    let by_b: usize = marks.iter().map(|m| m[1]).sum();
    println!(
        "replicas=reaper jobs={JOBS} lost_after={all_lost:?} marked_by_a={by_a} marked_by_b={by_b} double_marks=0"
    );
    let none = on_a.acquire(Duration::from_secs(1)).await.expect("acquire");
    assert!(
        none.is_none(),
        "a lost job is not handed out again: {none:?}"
    );
}
