//! The harness's own promises that other suites lean on: a restarted server keeps its port and
//! its database, and a runner stopped with SIGTERM exits cleanly.

use std::time::Duration;

use outpost_tests::outpost_protocol::RunStatus;
use outpost_tests::{
    Backend, TestRunner, TestServer, apply_and_trigger, backend_tests, describe_run, test_db,
    wait_for_run,
};

backend_tests!(restart_keeps_state_and_runner_stops_cleanly);

const PIPELINE: &str = r#"
jobs:
  hello:
    runs_on: [e2e]
    steps:
      - run: echo "hello-$((6 * 7))"
"#;

async fn restart_keeps_state_and_runner_stops_cleanly(backend: Backend) {
    let db = test_db!(backend);
    let mut server = TestServer::start(&db, &[]).await;
    let client = server.client();
    let queued = apply_and_trigger(&client, "hello", PIPELINE, &[]).await;
    let (url, pid) = (server.url().to_string(), server.pid());

    let status = server.stop().await;
    assert!(
        status.success(),
        "the server exits cleanly on SIGTERM: {status}"
    );
    server.restart().await;
    assert_eq!(server.url(), url, "a restarted server keeps its address");
    assert_ne!(server.pid(), pid, "a new process");

    // The same client and token still work, and the queued run is still there.
    let pipeline = client
        .get_pipeline("hello")
        .await
        .expect("the pipeline survived");
    assert_eq!(pipeline.jobs, vec!["hello".to_string()]);
    let mut runner = TestRunner::start(&server, "after-restart", &["e2e"], &[]).await;
    let run = wait_for_run(&client, queued.id, Duration::from_secs(60)).await;
    assert_eq!(run.status, RunStatus::Succeeded, "{}", describe_run(&run));

    let status = runner.stop().await;
    assert!(
        status.success(),
        "an idle runner exits cleanly on SIGTERM: {status}"
    );
}
