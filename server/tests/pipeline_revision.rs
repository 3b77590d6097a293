//! Runs triggered through the API are made from the replica's copy of the pipeline's definition
//! (`Store::trigger_run`), on SQLite and PostgreSQL. The copy must never go stale unnoticed: a
//! pipeline applied again or deleted through another replica (here: a second store on the same
//! database) is read again, and a deleted one starts nothing.

#[macro_use]
mod common;

use common::Backend;
use outpost_server::Store;
use outpost_server::store::{NewRun, StoreError};

fn yaml(job: &str) -> String {
    format!("jobs:\n  {job}: {{ runs_on: [x], steps: [{{ run: 'true' }}] }}\n")
}

async fn apply(store: &Store, job: &str) {
    let yaml = yaml(job);
    let def = outpost_server::pipeline::parse(&yaml).unwrap();
    store.put_pipeline("p", &yaml, &def).await.unwrap();
}

async fn trigger(store: &Store) -> Result<outpost_protocol::Run, StoreError> {
    store
        .trigger_run("p", |_| NewRun {
            pipeline: "p".into(),
            trigger: Default::default(),
            variables: Default::default(),
        })
        .await
}

fn job_names(run: &outpost_protocol::Run) -> Vec<&str> {
    run.jobs.iter().map(|j| j.name.as_str()).collect()
}

async fn a_changed_pipeline_is_read_again(backend: Backend) {
    let db = test_db!(backend);
    let here = db.open().await;
    let other = db.open().await;

    apply(&other, "first").await;
    let run = trigger(&here).await.unwrap();
    assert_eq!((job_names(&run), run.number), (vec!["first"], 1));
    let run = trigger(&here).await.unwrap();
    assert_eq!((job_names(&run), run.number), (vec!["first"], 2));

    // Applied again elsewhere: this replica's copy is stale and must not be used.
    apply(&other, "second").await;
    let run = trigger(&here).await.unwrap();
    assert_eq!((job_names(&run), run.number), (vec!["second"], 3));

    // Deleted elsewhere: nothing is started, and no number is taken.
    other.delete_pipeline("p").await.unwrap();
    let gone = trigger(&here).await;
    assert!(
        matches!(gone, Err(StoreError::NotFound(_))),
        "a deleted pipeline starts nothing: {gone:?}"
    );
    let runs = here.list_runs(Some("p"), None, 50, None).await.unwrap();
    assert_eq!(
        runs.runs.len(),
        3,
        "no run was created for the deleted pipeline"
    );

    // Applied again under the same name: the new definition, numbers going on.
    apply(&other, "third").await;
    let run = trigger(&here).await.unwrap();
    assert_eq!((job_names(&run), run.number), (vec!["third"], 4));

    // Applied again here: the copy is forgotten at once.
    apply(&here, "fourth").await;
    let run = trigger(&here).await.unwrap();
    assert_eq!((job_names(&run), run.number), (vec!["fourth"], 5));
}

backend_tests!(a_changed_pipeline_is_read_again);
