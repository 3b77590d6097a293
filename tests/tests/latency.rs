//! A runner that is long-polling gets a new job at once, not at its next poll.

use std::time::{Duration, Instant};

use outpost_tests::outpost_protocol::TriggerRunRequest;
use outpost_tests::{Backend, TestServer, backend_tests, test_db};

backend_tests!(long_poll_wakes_on_trigger);

const PIPELINE: &str = r#"
jobs:
  deploy:
    runs_on: [e2e]
    steps:
      - run: echo hi
"#;

async fn long_poll_wakes_on_trigger(backend: Backend) {
    let db = test_db!(backend);
    let server = TestServer::start(&db, &[("OUTPOST__QUEUE__ACQUIRE_WAIT_SECS", "20")]).await;
    let client = server.client();
    client
        .apply_pipeline("fast", PIPELINE)
        .await
        .expect("apply");
    let fake = server.fake_runner("waiting-runner", &["e2e"]).await;

    // An empty queue answers 204 when the wait is over.
    let empty = fake
        .client
        .acquire(Duration::from_secs(1))
        .await
        .expect("acquire on an empty queue");
    assert!(empty.is_none(), "nothing is queued yet: {empty:?}");
    let seen_before = last_seen(&client, fake.id).await;

    let poller = fake.client.clone();
    let started = Instant::now();
    let acquire = tokio::spawn(async move {
        let answer = poller.acquire(Duration::from_secs(20)).await;
        (Instant::now(), answer)
    });

    // The scenario is "a runner that has been waiting, then a trigger": the job must reach the
    // poll through its wake-up, not through the claim it makes on arrival. So the trigger goes
    // out once the server has seen the poll arrive (it updates the runner's last_seen_at) and the
    // poll has been open for half a second, far longer than handling its arrival takes.
    // If the server does not record last_seen_at, the trigger goes out after two seconds.
    const HELD: Duration = Duration::from_millis(500);
    let deadline = started + Duration::from_secs(2);
    let mut arrived = false;
    while Instant::now() < deadline && !acquire.is_finished() {
        if !arrived && last_seen(&client, fake.id).await > seen_before {
            arrived = true;
        }
        if arrived && started.elapsed() >= HELD {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !acquire.is_finished(),
        "the acquire returned before any job was queued"
    );

    let triggered_at = Instant::now();
    let run = client
        .trigger_run("fast", &TriggerRunRequest::default())
        .await
        .expect("trigger");
    let (returned_at, answer) = acquire.await.expect("the acquire task");
    let acquired = answer
        .expect("acquire")
        .expect("the long poll hands out the new job");
    assert_eq!(acquired.job.run_id, run.id);

    let latency = returned_at.saturating_duration_since(triggered_at);
    println!(
        "dispatch latency ({backend:?}): {} ms from the trigger request to the acquire answer \
         (the long poll had waited {} ms; its arrival was {})",
        latency.as_millis(),
        triggered_at.duration_since(started).as_millis(),
        if arrived {
            "confirmed"
        } else {
            "not confirmed"
        }
    );
    assert!(
        returned_at >= triggered_at,
        "the acquire answered before the trigger"
    );
    assert!(
        latency < Duration::from_secs(1),
        "a waiting runner got the job {} ms after the trigger; a long poll should wake at once",
        latency.as_millis()
    );
}

async fn last_seen(
    client: &outpost_tests::outpost_protocol::Client,
    runner: uuid::Uuid,
) -> Option<chrono::DateTime<chrono::Utc>> {
    client
        .list_runners()
        .await
        .expect("GET runners")
        .runners
        .into_iter()
        .find(|r| r.id == runner)
        .expect("the fake runner is listed")
        .last_seen_at
}
