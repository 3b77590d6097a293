//! Hand-off, on SQLite and PostgreSQL: a run created while runners long-poll this replica inserts
//! each new job they can run already claimed for the longest-waiting of them, in the statement
//! that creates the run, and answers their polls once it committed. Jobs nobody waiting can run
//! stay queued, a poll that went away is not handed anything, and a handed job's lease is a lease
//! like any other.

#[macro_use]
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Backend, runner};
use outpost_protocol::{CompleteRequest, JobStatus, RunStatus};
use outpost_server::api::AppState;
use outpost_server::store::runners::RunnerPrincipal;
use outpost_server::store::{Claimed, NewRun};
use outpost_server::{Store, queue};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const PIPELINE: &str = "\
jobs:
  a: { runs_on: [x], steps: [{ run: 'true' }] }
  b: { runs_on: [y], steps: [{ run: 'true' }] }
  c: { runs_on: [x], needs: [a], steps: [{ run: 'true' }] }
";

const ONE_JOB: &str = "\
jobs:
  only: { runs_on: [x], steps: [{ run: 'true' }] }
";

async fn principal(store: &Store, name: &str, label: &str) -> RunnerPrincipal {
    let r = runner(store, name, label).await;
    RunnerPrincipal {
        id: r.runner_id,
        name: name.into(),
        labels: r.labels,
    }
}

type Poll = JoinHandle<outpost_server::store::StoreResult<Option<Claimed>>>;

/// Waits (up to 2 s) until `n` long polls wait in the hand-off registry; panics with `what`.
async fn until_waiting(state: &AppState, n: usize, what: &str) {
    for _ in 0..400 {
        if state.store.events.waiters.len() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!(
        "{what}: {} polls wait, not {n}",
        state.store.events.waiters.len()
    );
}

/// Starts a long poll and returns once it waits in the hand-off registry.
async fn waiting(state: &AppState, who: &RunnerPrincipal) -> Poll {
    let before = state.store.events.waiters.len();
    let (state2, who2) = (state.clone(), who.clone());
    let poll =
        tokio::spawn(async move { queue::acquire(&state2, &who2, Duration::from_secs(30)).await });
    until_waiting(state, before + 1, &format!("the long poll of {}", who.name)).await;
    poll
}

/// The job a long poll answers with, within 10 s; panics with `what` if it answers nothing.
async fn answered(poll: Poll, what: &str) -> Claimed {
    tokio::time::timeout(Duration::from_secs(10), poll)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer in 10 s"))
        .unwrap()
        .unwrap()
        .unwrap_or_else(|| panic!("{what}: answered without a job"))
}

async fn create(store: &Store, pipeline: &str) -> outpost_protocol::Run {
    let (_, def) = store.get_pipeline(pipeline).await.unwrap();
    common::start_run(store, pipeline, &def).await
}

async fn hands_new_jobs_to_waiting_runners(backend: Backend) {
    let db = test_db!(backend);
    let store = db.open().await;
    let state = AppState {
        store: store.clone(),
        settings: Arc::new(db.settings()),
        shutdown: CancellationToken::new(),
        entra: None,
    };
    for (name, yaml) in [("graph", PIPELINE), ("one", ONE_JOB)] {
        let def = outpost_server::pipeline::parse(yaml).unwrap();
        store.put_pipeline(name, yaml, &def).await.unwrap();
    }
    let x1 = principal(&store, "x1", "x").await;
    let x2 = principal(&store, "x2", "x").await;
    let y1 = principal(&store, "y1", "y").await;

    // Two x runners wait; x1 first. The run's `a` goes to x1, in the statement that creates it.
    let poll1 = waiting(&state, &x1).await;
    let poll2 = waiting(&state, &x2).await;
    let run = create(&store, "graph").await;
    assert_eq!(
        run.status,
        RunStatus::Running,
        "a handed job starts its run"
    );
    assert!(run.started_at.is_some());
    let a = run.jobs.iter().find(|j| j.name == "a").unwrap();
    assert_eq!(
        (a.status, a.runner_id, a.attempt),
        (JobStatus::Running, Some(x1.id), 1)
    );
    let b = run.jobs.iter().find(|j| j.name == "b").unwrap();
    assert_eq!(b.status, JobStatus::Queued, "nobody waiting can run b");
    let handed = answered(poll1, "x1 was handed a").await;
    assert_eq!(handed.job.id, a.id);
    assert_eq!(handed.job.run_number, run.number, "the spec has the number");
    assert!(!poll2.is_finished(), "x2 still waits: nothing else for x");

    // The database agrees, and the handed lease is the job's current lease.
    let stored = store.get_run(run.id).await.unwrap();
    assert_eq!(stored.status, RunStatus::Running);
    let a_stored = stored.jobs.iter().find(|j| j.name == "a").unwrap();
    assert_eq!(
        (a_stored.status, a_stored.runner_id, a_stored.attempt),
        (JobStatus::Running, Some(x1.id), 1)
    );
    store
        .heartbeat(a.id, &handed.lease.token, 60)
        .await
        .expect("the handed lease renews");
    assert!(
        store
            .heartbeat(a.id, "opl_not-the-lease", 60)
            .await
            .is_err(),
        "another token is fenced off"
    );

    // b was left queued for a y runner's ordinary claim.
    let got_b = queue::acquire(&state, &y1, Duration::from_secs(5))
        .await
        .unwrap()
        .expect("y1 claims b");
    assert_eq!(got_b.job.id, b.id);

    // Completing a with the handed lease queues c, which waiting x2 claims after the wake-up.
    store
        .complete_job(
            a.id,
            &handed.lease.token,
            &CompleteRequest {
                status: JobStatus::Succeeded,
                exit_code: Some(0),
            },
        )
        .await
        .unwrap();
    let got_c = answered(poll2, "x2 is woken for c and claims it").await;
    assert_eq!(got_c.job.name, "c");
    assert_eq!(got_c.job.run_id, run.id);

    // A poll that went away is not handed anything: the job stays queued for the next claim.
    let gone = waiting(&state, &x1).await;
    gone.abort();
    let _ = gone.await;
    assert_eq!(
        state.store.events.waiters.len(),
        0,
        "the poll left its place"
    );
    let lonely = create(&store, "one").await;
    assert_eq!(lonely.status, RunStatus::Queued);
    assert_eq!(lonely.jobs[0].status, JobStatus::Queued);
    assert_eq!(lonely.jobs[0].attempt, 0);
    let claimed = queue::acquire(&state, &x2, Duration::from_secs(5))
        .await
        .unwrap()
        .expect("x2 claims the job nobody was handed");
    assert_eq!(claimed.job.id, lonely.jobs[0].id);
    assert_eq!(
        claimed.job.run_number, lonely.number,
        "a claimed spec has the number too"
    );

    // A run that is not created hands nothing and answers the poll it took: it claims as usual.
    let poll3 = waiting(&state, &x1).await;
    let (_, def) = store.get_pipeline("one").await.unwrap();
    store.delete_pipeline("one").await.unwrap();
    let missing = store
        .create_run(
            NewRun {
                pipeline: "one".into(),
                trigger: Default::default(),
                variables: Default::default(),
            },
            &def,
        )
        .await;
    assert!(missing.is_err(), "no such pipeline");
    until_waiting(&state, 1, "the poll goes back to waiting").await;
    assert!(!poll3.is_finished());
    let run2 = create(&store, "graph").await;
    let got = answered(poll3, "x1 gets the next run's a").await;
    assert_eq!(got.job.run_id, run2.id);
    assert_eq!(got.job.name, "a");
}

backend_tests!(multi_thread: hands_new_jobs_to_waiting_runners);
