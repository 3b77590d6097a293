//! `Store::repair_runs`, on SQLite and PostgreSQL: a run whose jobs ended without the run being
//! advanced (a replica that stopped between a completion's commit and its run's advance, see
//! `Store::settle_run`) is moved on by the reaper's repair, and a run that still has open jobs is
//! left alone.

#[macro_use]
mod common;

use common::Backend;
use outpost_protocol::{JobStatus, RunStatus};
use outpost_server::store::Store;
use uuid::Uuid;

const PIPELINE: &str = "\
jobs:
  build: { runs_on: [x], steps: [{ run: 'true' }] }
  deploy: { runs_on: [x], needs: [build], steps: [{ run: 'true' }] }
";

/// Ends a job the way a completion's own transaction does, without advancing its run: what the
/// database holds when the replica stopped right after that commit.
async fn end_without_advance(store: &Store, job_id: Uuid) {
    let sql = "UPDATE jobs SET status = 'succeeded', exit_code = 0, lease_expires_at = NULL WHERE id = $1";
    execute!(store, sqlx::query(sql).bind(job_id));
}

async fn stalled_runs_are_moved_on(backend: Backend) {
    let db = test_db!(backend);
    let store = &db.open().await;
    let run = common::queued_run(store, "repair", PIPELINE).await;
    let claim = common::runner(store, "r", "x").await;
    let build = store
        .claim_jobs(std::slice::from_ref(&claim), 60)
        .await
        .unwrap()[0]
        .clone()
        .expect("build is queued");
    assert_eq!(build.job.name, "build");

    // A running job will advance the run itself: nothing to repair.
    assert_eq!(store.repair_runs().await.unwrap(), 0);

    end_without_advance(store, build.job.id).await;
    let stalled = store.get_run(run.id).await.unwrap();
    let deploy = stalled.jobs.iter().find(|j| j.name == "deploy").unwrap();
    assert_eq!(
        deploy.status,
        JobStatus::Pending,
        "nothing advanced the run yet"
    );

    // The repair queues the job that waited on the ended one.
    assert_eq!(store.repair_runs().await.unwrap(), 1);
    let moved = store.get_run(run.id).await.unwrap();
    let deploy = moved.jobs.iter().find(|j| j.name == "deploy").unwrap();
    assert_eq!(deploy.status, JobStatus::Queued);
    assert_eq!(moved.status, RunStatus::Running);

    // And once the last job ended unadvanced too, the repair ends the run.
    let deploy = store.claim_jobs(&[claim], 60).await.unwrap()[0]
        .clone()
        .expect("deploy is queued");
    end_without_advance(store, deploy.job.id).await;
    assert_eq!(
        store.get_run(run.id).await.unwrap().status,
        RunStatus::Running
    );
    assert_eq!(store.repair_runs().await.unwrap(), 1);
    let done = store.get_run(run.id).await.unwrap();
    assert_eq!(done.status, RunStatus::Succeeded);
    assert!(done.finished_at.is_some());
    assert_eq!(
        store.repair_runs().await.unwrap(),
        0,
        "a final run is left alone"
    );
    store.close().await;
}

backend_tests!(stalled_runs_are_moved_on);
