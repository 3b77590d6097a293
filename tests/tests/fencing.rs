//! A lease that ran out fences its holder off: the job ends `lost` and every later call made
//! with the old lease answers 409 and changes nothing.

use std::time::Duration;

use bytes::Bytes;
use outpost_tests::outpost_protocol::{
    CompleteRequest, JobStatus, RunStatus, StepStatus, StepUpdate,
};
use outpost_tests::{
    Backend, TestServer, apply_and_trigger, backend_tests, test_db, wait_for_job_status,
    wait_for_run,
};
use reqwest::StatusCode;

backend_tests!(expired_lease_is_fenced_off);

const ONE_JOB: &str = r#"
jobs:
  deploy:
    runs_on: [e2e]
    steps:
      - run: echo "never run by a real runner"
"#;

async fn expired_lease_is_fenced_off(backend: Backend) {
    let db = test_db!(backend);
    let server = TestServer::start(&db, &[("OUTPOST__QUEUE__LEASE_SECS", "2")]).await;
    let client = server.client();
    let fake = server.fake_runner("fake-runner", &["e2e"]).await;

    let run = apply_and_trigger(&client, "fenced", ONE_JOB, &[]).await;
    let acquired = fake
        .client
        .acquire(Duration::from_secs(10))
        .await
        .expect("acquire")
        .expect("the queued job is handed out");
    let job_id = acquired.job.id;
    let lease = acquired.lease.token.clone();
    assert_eq!(acquired.job.run_id, run.id);
    assert_eq!(acquired.job.name, "deploy");
    assert_eq!(
        acquired.lease.duration_secs, 2,
        "the configured lease length"
    );

    // One heartbeat, one step start and one log append while the lease is good.
    let beat = fake
        .client
        .heartbeat(job_id, &lease)
        .await
        .expect("first heartbeat");
    assert!(!beat.cancel_requested);
    assert!(
        beat.expires_at >= acquired.lease.expires_at,
        "a heartbeat renews the lease: {} then {}",
        acquired.lease.expires_at,
        beat.expires_at
    );
    fake.client
        .update_step(
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
        .expect("step 0 running");
    let appended = fake
        .client
        .append_log(
            job_id,
            &lease,
            0,
            Bytes::from_static(b"before the lease ran out\n"),
        )
        .await
        .expect("log append under a good lease");
    assert_eq!(appended.next_offset, 25);
    let running = client.get_job(job_id).await.expect("GET job");
    assert_eq!(running.status, JobStatus::Running);
    assert_eq!(running.runner_id, Some(fake.id));

    // No more heartbeats: the lease runs out and the job is lost.
    let lost = wait_for_job_status(&client, job_id, JobStatus::Lost, Duration::from_secs(30)).await;
    let log_before = client.get_log(job_id, 0).await.expect("log");
    assert_eq!(&log_before[..], b"before the lease ran out\n");

    // Every call with the old lease is fenced off.
    let status = fake
        .client
        .append_log(
            job_id,
            &lease,
            25,
            Bytes::from_static(b"after the lease ran out\n"),
        )
        .await
        .expect_err("a log append with a stale lease must fail")
        .status();
    assert_eq!(
        status,
        Some(StatusCode::CONFLICT),
        "log append with a stale lease"
    );
    let status = fake
        .client
        .heartbeat(job_id, &lease)
        .await
        .expect_err("a heartbeat with a stale lease must fail")
        .status();
    assert_eq!(
        status,
        Some(StatusCode::CONFLICT),
        "heartbeat with a stale lease"
    );
    let status = fake
        .client
        .update_step(
            job_id,
            &lease,
            0,
            &StepUpdate {
                status: StepStatus::Succeeded,
                exit_code: Some(0),
                log_offset: 25,
            },
        )
        .await
        .expect_err("a step update with a stale lease must fail")
        .status();
    assert_eq!(
        status,
        Some(StatusCode::CONFLICT),
        "step update with a stale lease"
    );
    let status = fake
        .client
        .complete(
            job_id,
            &lease,
            &CompleteRequest {
                status: JobStatus::Succeeded,
                exit_code: Some(0),
            },
        )
        .await
        .expect_err("a completion with a stale lease must fail")
        .status();
    assert_eq!(
        status,
        Some(StatusCode::CONFLICT),
        "completion with a stale lease"
    );

    // Nothing changed.
    let after = client.get_job(job_id).await.expect("GET job");
    assert_eq!(after.status, JobStatus::Lost, "{after:#?}");
    assert_eq!(after.exit_code, lost.exit_code);
    assert_eq!(after.finished_at, lost.finished_at);
    assert_eq!(after.log_size, 25);
    assert_eq!(after.steps, lost.steps, "the step did not change");
    let log_after = client.get_log(job_id, 0).await.expect("log");
    assert_eq!(log_after, log_before);

    // A lost job is not handed out again, and its run ends failed.
    let again = fake
        .client
        .acquire(Duration::from_secs(1))
        .await
        .expect("acquire");
    assert!(
        again.is_none(),
        "a lost job must not be handed out again: {again:?}"
    );
    let run = wait_for_run(&client, run.id, Duration::from_secs(10)).await;
    assert_eq!(run.status, RunStatus::Failed, "a lost job fails its run");
}
