//! Claims, on SQLite and PostgreSQL. Batched (`Store::claim_jobs`): each runner of a batch gets
//! its own job in queue order, only jobs whose labels it carries, a lease of its own, and runners
//! left over when the queue runs dry get nothing. Alone (`Store::claim_job`): the claim starts
//! its run.

#[macro_use]
mod common;

use std::collections::HashSet;

use common::{Backend, runner};
use outpost_protocol::{JobStatus, RunStatus};
use outpost_server::store::ClaimRequest;
use uuid::Uuid;

const PIPELINE: &str = "\
jobs:
  a0: { runs_on: [x], steps: [{ run: 'true' }] }
  a1: { runs_on: [x], steps: [{ run: 'true' }] }
  a2: { runs_on: [x], steps: [{ run: 'true' }] }
  a3: { runs_on: [x], steps: [{ run: 'true' }] }
  a4: { runs_on: [x], steps: [{ run: 'true' }] }
  b0: { runs_on: [y], steps: [{ run: 'true' }] }
  b1: { runs_on: [y], steps: [{ run: 'true' }] }
";

async fn batch_claims_each_runner_its_own_job(backend: Backend) {
    let db = test_db!(backend);
    let store = &db.open().await;
    let run = common::queued_run(store, "batch", PIPELINE).await;

    let mut xs = Vec::new();
    for i in 0..6 {
        xs.push(runner(store, &format!("x{i}"), "x").await);
    }
    let y0 = runner(store, "y0", "y").await;
    let y1 = runner(store, "y1", "y").await;

    // One batch mixing label sets: x runners get a0..a3 in queue order, y runners b0, b1.
    let first = vec![
        xs[0].clone(),
        y0.clone(),
        xs[1].clone(),
        xs[2].clone(),
        y1.clone(),
        xs[3].clone(),
    ];
    let got = store.claim_jobs(&first, 60).await.unwrap();
    let names: Vec<Option<String>> = got
        .iter()
        .map(|c| c.as_ref().map(|c| c.job.name.clone()))
        .collect();
    let expected = ["a0", "b0", "a1", "a2", "b1", "a3"].map(|n| Some(n.to_string()));
    assert_eq!(names, expected);
    let tokens: HashSet<&str> = got
        .iter()
        .flatten()
        .map(|c| c.lease.token.as_str())
        .collect();
    assert_eq!(tokens.len(), 6, "every claim has a lease of its own");

    // A second batch finds one x job left: the first x runner gets it, the other nothing, and a
    // y runner finds the y jobs gone.
    let second = vec![xs[4].clone(), xs[5].clone(), y0.clone()];
    let got2 = store.claim_jobs(&second, 60).await.unwrap();
    assert_eq!(
        got2.iter()
            .map(|c| c.as_ref().map(|c| c.job.name.clone()))
            .collect::<Vec<_>>(),
        vec![Some("a4".to_string()), None, None]
    );

    // The database agrees: each job is running under the runner it was handed to, claimed once,
    // and each lease works for its own job only.
    let stored = store.get_run(run.id).await.unwrap();
    assert_eq!(stored.status, RunStatus::Running);
    let handed: Vec<(Uuid, &ClaimRequest, &outpost_server::store::Claimed)> = first
        .iter()
        .zip(&got)
        .chain(second.iter().zip(&got2))
        .filter_map(|(r, c)| c.as_ref().map(|c| (c.job.id, r, c)))
        .collect();
    assert_eq!(handed.len(), 7);
    for (job_id, req, claimed) in handed {
        let job = stored.jobs.iter().find(|j| j.id == job_id).unwrap();
        assert_eq!(job.status, JobStatus::Running);
        assert_eq!(job.runner_id, Some(req.runner_id));
        assert_eq!(job.attempt, 1);
        store
            .heartbeat(job_id, &claimed.lease.token, 60)
            .await
            .expect("the lease handed out is the job's current lease");
    }
    let other = &got[1].as_ref().unwrap().lease.token;
    assert!(
        store
            .heartbeat(got[0].as_ref().unwrap().job.id, other, 60)
            .await
            .is_err(),
        "a lease from the same batch is not valid for another job"
    );
    store.close().await;
}

/// A lone claim (`Store::claim_job`) starts its run in the same statement (on SQLite through the
/// trigger of migration 0008), with the job's start as the run's; a later claim leaves it alone.
async fn a_lone_claim_starts_its_run_once(backend: Backend) {
    let db = test_db!(backend);
    let store = &db.open().await;
    let run = common::queued_run(store, "lone", PIPELINE).await;
    assert_eq!(
        store.get_run(run.id).await.unwrap().status,
        RunStatus::Queued
    );
    let x0 = runner(store, "x0", "x").await;
    let first = store
        .claim_job(x0.runner_id, &x0.labels, 60)
        .await
        .unwrap()
        .expect("a queued job for x");
    let stored = store.get_run(run.id).await.unwrap();
    assert_eq!(stored.status, RunStatus::Running);
    let started = stored.started_at.expect("the claim started the run");
    let job = stored.jobs.iter().find(|j| j.id == first.job.id).unwrap();
    assert_eq!(job.status, JobStatus::Running);
    assert_eq!(job.started_at, Some(started));

    let x1 = runner(store, "x1", "x").await;
    let second = store
        .claim_job(x1.runner_id, &x1.labels, 60)
        .await
        .unwrap()
        .expect("a second queued job for x");
    assert_ne!(second.job.id, first.job.id);
    let again = store.get_run(run.id).await.unwrap();
    assert_eq!(again.status, RunStatus::Running);
    // The second job started later (a registration lies between the claims), so a claim that
    // overwrote the run's start would show here.
    let later = again.jobs.iter().find(|j| j.id == second.job.id).unwrap();
    assert_ne!(later.started_at, Some(started), "the claims started apart");
    assert_eq!(
        again.started_at,
        Some(started),
        "a later claim keeps the start"
    );
    store.close().await;
}

backend_tests!(
    batch_claims_each_runner_its_own_job,
    a_lone_claim_starts_its_run_once
);
