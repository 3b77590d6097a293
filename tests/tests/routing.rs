//! Jobs go only to runners that carry every label in `runs_on`.

use std::time::Duration;

use outpost_tests::outpost_protocol::{JobStatus, RunStatus, RunnerState};
use outpost_tests::{
    Backend, TestRunner, TestServer, apply_and_trigger, backend_tests, describe_run, job, test_db,
    wait_for_run,
};

backend_tests!(job_waits_for_a_runner_with_its_labels);

const GPU: &str = r#"
jobs:
  train:
    runs_on: [gpu]
    steps:
      - run: echo "trained-$((2 * 21))"
"#;

const E2E: &str = r#"
jobs:
  lint:
    runs_on: [e2e]
    steps:
      - run: echo linted
"#;

async fn job_waits_for_a_runner_with_its_labels(backend: Backend) {
    let db = test_db!(backend);
    let server = TestServer::start(&db, &[]).await;
    let client = server.client();
    let plain = TestRunner::start(&server, "plain", &["e2e"], &[]).await;

    let gpu_run = apply_and_trigger(&client, "train", GPU, &[]).await;
    // A later e2e job that the plain runner does take proves that it has been asking for work
    // since the gpu job was queued, and passed it over.
    let e2e_run = apply_and_trigger(&client, "lint", E2E, &[]).await;
    let e2e_run = wait_for_run(&client, e2e_run.id, Duration::from_secs(60)).await;
    assert_eq!(
        e2e_run.status,
        RunStatus::Succeeded,
        "{}",
        describe_run(&e2e_run)
    );
    let plain_id = plain.id().await;
    assert_eq!(job(&e2e_run, "lint").runner_id, Some(plain_id));

    let waiting = client.get_run(gpu_run.id).await.expect("GET run");
    let train = job(&waiting, "train");
    assert_eq!(
        train.status,
        JobStatus::Queued,
        "{}",
        describe_run(&waiting)
    );
    assert_eq!(train.runner_id, None, "no runner holds the gpu job");
    assert_eq!(train.runs_on, vec!["gpu".to_string()]);
    assert_eq!(waiting.status, RunStatus::Queued);

    // The plain runner is idle, not holding the gpu job.
    let runners = client.list_runners().await.expect("GET runners");
    let listed = runners
        .runners
        .iter()
        .find(|r| r.id == plain_id)
        .expect("the plain runner is listed");
    assert_eq!(listed.labels, vec!["e2e".to_string()]);
    assert_eq!(listed.current_job, None, "{listed:?}");
    assert_eq!(listed.state, RunnerState::Idle, "{listed:?}");

    // A runner with both labels takes it.
    let gpu = TestRunner::start(&server, "gpu-box", &["gpu", "e2e"], &[]).await;
    let done = wait_for_run(&client, gpu_run.id, Duration::from_secs(60)).await;
    assert_eq!(done.status, RunStatus::Succeeded, "{}", describe_run(&done));
    let train = job(&done, "train");
    assert_eq!(
        train.runner_id,
        Some(gpu.id().await),
        "the gpu job ran on the gpu runner"
    );
    assert_ne!(train.runner_id, Some(plain_id));
    let log = client.get_log(train.id, 0).await.expect("log");
    assert!(
        String::from_utf8_lossy(&log).contains("trained-42"),
        "{}",
        String::from_utf8_lossy(&log)
    );
}
