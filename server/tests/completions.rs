//! Completions and run creation at the store, on SQLite and PostgreSQL.
//!
//! PostgreSQL creates a run in one statement (`CREATE_RUN_POSTGRES`) and ends a job in one
//! statement when no job of its run waits on `needs` (`COMPLETE_ONE_POSTGRES`), the run too when
//! the job was its last open one; every other completion takes the transaction. These tests hold
//! both backends to the same outcomes: run numbers and the number a runner gets in its spec, the
//! job graph moving on at once when a job others need ends while siblings still run, leftover
//! steps, the lease fence, identical retries, the run's outcome from its jobs' outcomes, and two
//! last jobs of a run completing at the same moment.

#[macro_use]
mod common;

use std::sync::Arc;

use common::Backend;
use outpost_protocol::{CompleteRequest, JobStatus, RunStatus, StepStatus};
use outpost_server::pipeline;
use outpost_server::store::{ClaimRequest, Claimed, NewRun, Store, StoreError};
use uuid::Uuid;

const GRAPH: &str = "\
jobs:
  a: { runs_on: [x], steps: [{ run: 'true' }, { run: 'true' }] }
  c: { runs_on: [x], steps: [{ run: 'true' }] }
  b: { runs_on: [x], needs: [a], steps: [{ run: 'true' }] }
";

const PAIR: &str = "\
jobs:
  one: { runs_on: [x], steps: [{ run: 'true' }] }
  two: { runs_on: [x], steps: [{ run: 'true' }] }
";

async fn claim(store: &Store, runner: &ClaimRequest) -> Claimed {
    store
        .claim_jobs(std::slice::from_ref(runner), 60)
        .await
        .unwrap()
        .remove(0)
        .expect("a job is queued")
}

fn done(status: JobStatus) -> CompleteRequest {
    CompleteRequest {
        status,
        exit_code: Some(0),
    }
}

async fn job_status(store: &Store, run: Uuid, name: &str) -> JobStatus {
    let run = store.get_run(run).await.unwrap();
    run.jobs.iter().find(|j| j.name == name).unwrap().status
}

async fn the_graph_moves_on_and_the_fence_holds(backend: Backend) {
    let db = test_db!(backend);
    let store = &db.open().await;
    let def = pipeline::parse(GRAPH).expect("the test pipeline parses");
    store.put_pipeline("graph", GRAPH, &def).await.unwrap();
    let first = common::start_run(store, "graph", &def).await;
    let missing = store
        .create_run(
            NewRun {
                pipeline: "missing".into(),
                trigger: Default::default(),
                variables: Default::default(),
            },
            &def,
        )
        .await;
    assert!(
        matches!(missing, Err(StoreError::NotFound(_))),
        "a run of a pipeline that does not exist: {missing:?}"
    );

    let runner = common::runner(store, "r", "x").await;
    // The first run, to its end, with the number its runners get.
    for _ in 0..2 {
        let c = claim(store, &runner).await;
        assert_eq!(c.job.run_number, 1, "the spec carries the run's number");
        store
            .complete_job(c.job.id, &c.lease.token, &done(JobStatus::Succeeded))
            .await
            .unwrap();
    }
    let b_first = claim(store, &runner).await;
    assert_eq!(
        (b_first.job.name.as_str(), b_first.job.run_number),
        ("b", 1)
    );
    store
        .complete_job(
            b_first.job.id,
            &b_first.lease.token,
            &done(JobStatus::Succeeded),
        )
        .await
        .unwrap();
    assert_eq!(
        store.get_run(first.id).await.unwrap().status,
        RunStatus::Succeeded
    );

    let run = common::start_run(store, "graph", &def).await;
    assert_eq!((first.number, run.number), (1, 2));
    let a = claim(store, &runner).await;
    let c = claim(store, &runner).await;
    assert_eq!((a.job.name.as_str(), c.job.name.as_str()), ("a", "c"));
    assert_eq!((a.job.run_id, a.job.run_number), (run.id, 2));
    assert_eq!(
        store.get_run(run.id).await.unwrap().status,
        RunStatus::Running
    );

    // Another lease cannot end the job, and nothing changes.
    let fenced = store
        .complete_job(a.job.id, &c.lease.token, &done(JobStatus::Succeeded))
        .await;
    assert!(
        matches!(fenced, Err(StoreError::LeaseLost)),
        "a foreign lease is fenced out: {fenced:?}"
    );
    assert_eq!(job_status(store, run.id, "a").await, JobStatus::Running);

    // `a` ends while `c` still runs: `b`, which needs `a`, is queued at once.
    store
        .complete_job(a.job.id, &a.lease.token, &done(JobStatus::Succeeded))
        .await
        .unwrap();
    assert_eq!(job_status(store, run.id, "a").await, JobStatus::Succeeded);
    assert_eq!(job_status(store, run.id, "b").await, JobStatus::Queued);
    let steps = &store.get_job(a.job.id).await.unwrap().steps;
    assert!(
        steps.iter().all(|s| s.status == StepStatus::Skipped),
        "steps never reported are skipped: {steps:?}"
    );
    // The same completion again is acknowledged and changes nothing.
    store
        .complete_job(a.job.id, &a.lease.token, &done(JobStatus::Succeeded))
        .await
        .unwrap();

    // `c` ends while `b` runs: nothing else changes (on PostgreSQL, the one-statement path).
    let b = claim(store, &runner).await;
    assert_eq!(b.job.name, "b");
    store
        .complete_job(c.job.id, &c.lease.token, &done(JobStatus::Failed))
        .await
        .unwrap();
    assert_eq!(job_status(store, run.id, "c").await, JobStatus::Failed);
    assert_eq!(job_status(store, run.id, "b").await, JobStatus::Running);
    assert_eq!(
        store.get_run(run.id).await.unwrap().status,
        RunStatus::Running
    );
    let c_steps = &store.get_job(c.job.id).await.unwrap().steps;
    assert_eq!(c_steps[0].status, StepStatus::Skipped);
    // A late retry with another status is fenced out, on either path.
    let late = store
        .complete_job(c.job.id, &c.lease.token, &done(JobStatus::Succeeded))
        .await;
    assert!(matches!(late, Err(StoreError::LeaseLost)), "{late:?}");

    // The last open job ends the run, failed because `c` failed.
    store
        .complete_job(b.job.id, &b.lease.token, &done(JobStatus::Succeeded))
        .await
        .unwrap();
    let ended = store.get_run(run.id).await.unwrap();
    assert_eq!(ended.status, RunStatus::Failed);
    assert!(ended.finished_at.is_some());
    store.close().await;
}

const TRIO: &str = "\
jobs:
  a: { runs_on: [x], steps: [{ run: 'true' }] }
  b: { runs_on: [x], steps: [{ run: 'true' }] }
  c: { runs_on: [x], steps: [{ run: 'true' }, { run: 'true' }] }
";

/// The last open job ends its run with the worst outcome of all its jobs, whether it is the
/// worst one itself or an earlier one was: failed (also timed out) beats cancelled beats
/// succeeded. On PostgreSQL the last completion ends the run in its own statement.
async fn the_last_job_ends_its_run_with_the_worst_outcome(backend: Backend) {
    use JobStatus::{Cancelled, Failed, Succeeded, TimedOut};
    let db = test_db!(backend);
    let store = &db.open().await;
    let def = pipeline::parse(TRIO).expect("the test pipeline parses");
    store.put_pipeline("trio", TRIO, &def).await.unwrap();
    let runner = common::runner(store, "r", "x").await;
    let cases = [
        ([Succeeded, Succeeded, Succeeded], RunStatus::Succeeded),
        ([Succeeded, Succeeded, Failed], RunStatus::Failed),
        ([Succeeded, Succeeded, TimedOut], RunStatus::Failed),
        ([Succeeded, Succeeded, Cancelled], RunStatus::Cancelled),
        ([Cancelled, Succeeded, Succeeded], RunStatus::Cancelled),
        ([Failed, Succeeded, Succeeded], RunStatus::Failed),
        ([TimedOut, Succeeded, Succeeded], RunStatus::Failed),
        ([Failed, Cancelled, Succeeded], RunStatus::Failed),
        ([Cancelled, Succeeded, Failed], RunStatus::Failed),
        ([Cancelled, Cancelled, Succeeded], RunStatus::Cancelled),
    ];
    for (outcomes, expected) in cases {
        let run = common::start_run(store, "trio", &def).await;
        let mut claimed = Vec::new();
        for _ in 0..3 {
            claimed.push(claim(store, &runner).await);
        }
        let names: Vec<&str> = claimed.iter().map(|c| c.job.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"], "jobs are claimed in queue order");
        for (c, status) in claimed.iter().zip(outcomes) {
            assert_eq!(
                store.get_run(run.id).await.unwrap().status,
                RunStatus::Running,
                "{outcomes:?}: the run runs until its last job ends"
            );
            store
                .complete_job(c.job.id, &c.lease.token, &done(status))
                .await
                .unwrap();
        }
        let ended = store.get_run(run.id).await.unwrap();
        assert_eq!(ended.status, expected, "{outcomes:?}");
        assert!(ended.finished_at.is_some(), "{outcomes:?}: finished_at");
        let last = ended.jobs.iter().find(|j| j.name == "c").unwrap();
        assert_eq!(last.status, outcomes[2]);
        assert!(
            last.steps.iter().all(|s| s.status == StepStatus::Skipped),
            "{outcomes:?}: steps never reported are skipped: {:?}",
            last.steps
        );
        // The same last completion again is acknowledged; another is fenced out.
        let (c, status) = (&claimed[2], outcomes[2]);
        store
            .complete_job(c.job.id, &c.lease.token, &done(status))
            .await
            .unwrap();
        let other = if status == Succeeded {
            Failed
        } else {
            Succeeded
        };
        let late = store
            .complete_job(c.job.id, &c.lease.token, &done(other))
            .await;
        assert!(matches!(late, Err(StoreError::LeaseLost)), "{late:?}");
        assert_eq!(store.get_run(run.id).await.unwrap().status, expected);
    }
    // A run of one job.
    let one = "jobs:\n  solo: { runs_on: [x], steps: [{ run: 'true' }] }\n";
    let one_def = pipeline::parse(one).expect("the one-job pipeline parses");
    store.put_pipeline("solo", one, &one_def).await.unwrap();
    for (status, expected) in [
        (Succeeded, RunStatus::Succeeded),
        (Failed, RunStatus::Failed),
        (Cancelled, RunStatus::Cancelled),
    ] {
        let run = common::start_run(store, "solo", &one_def).await;
        let c = claim(store, &runner).await;
        assert_eq!(c.job.run_id, run.id);
        store
            .complete_job(c.job.id, &c.lease.token, &done(status))
            .await
            .unwrap();
        let ended = store.get_run(run.id).await.unwrap();
        assert_eq!((ended.status, ended.jobs[0].status), (expected, status));
        assert!(ended.finished_at.is_some());
    }
    store.close().await;
}

/// Two last jobs of a run completing at the same moment: each may see the other still running,
/// and whichever commits last must end the run.
async fn two_last_jobs_end_their_run(backend: Backend) {
    let db = test_db!(backend);
    let store: Arc<Store> = db.open().await;
    let def = pipeline::parse(PAIR).expect("the test pipeline parses");
    store.put_pipeline("pair", PAIR, &def).await.unwrap();
    let runner = common::runner(&store, "r", "x").await;
    for round in 0..25 {
        let run = common::start_run(&store, "pair", &def).await;
        let one = claim(&store, &runner).await;
        let two = claim(&store, &runner).await;
        let (s1, s2) = (store.clone(), store.clone());
        let (r1, r2) = tokio::join!(
            tokio::spawn(async move {
                s1.complete_job(one.job.id, &one.lease.token, &done(JobStatus::Succeeded))
                    .await
            }),
            tokio::spawn(async move {
                s2.complete_job(two.job.id, &two.lease.token, &done(JobStatus::Succeeded))
                    .await
            }),
        );
        r1.unwrap().unwrap();
        r2.unwrap().unwrap();
        let ended = store.get_run(run.id).await.unwrap();
        assert_eq!(
            ended.status,
            RunStatus::Succeeded,
            "round {round}: the run ends when both of its jobs did"
        );
    }
    store.close().await;
}

backend_tests!(multi_thread: the_graph_moves_on_and_the_fence_holds, the_last_job_ends_its_run_with_the_worst_outcome, two_last_jobs_end_their_run);
