//! Two runners compete for fifty jobs; every job is executed exactly once.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::Duration;

use outpost_tests::outpost_protocol::{CompleteRequest, JobStatus, RunStatus};
use outpost_tests::{
    Backend, TestRunner, TestServer, apply_and_trigger, backend_tests, describe_run, scratch_dir,
    test_db, wait_for_run,
};

backend_tests!(
    fifty_jobs_two_runners_each_job_runs_once,
    concurrent_completions_end_the_run
);

const JOBS: usize = 50;

fn fifty_job_pipeline() -> String {
    independent_jobs(JOBS)
}

fn independent_jobs(count: usize) -> String {
    let mut yaml = String::from("description: independent jobs\njobs:\n");
    for i in 0..count {
        // Each execution leaves one line; `>>` appends atomically for lines this short.
        write!(
            yaml,
            "  j{i:02}:\n    runs_on: [e2e]\n    steps:\n      - run: echo \"$OUTPOST_JOB_ID\" >> \"$FILE\"\n"
        )
        .expect("writing to a String");
    }
    yaml
}

async fn fifty_jobs_two_runners_each_job_runs_once(backend: Backend) {
    let db = test_db!(backend);
    let server = TestServer::start(&db, &[]).await;
    let client = server.client();
    let scratch = scratch_dir();
    let file = scratch.path().join("executions.txt");
    let file_str = file.display().to_string();

    // The jobs are queued before the runners start, so that both runners meet a full queue.
    let queued = apply_and_trigger(
        &client,
        "fifty",
        &fifty_job_pipeline(),
        &[("FILE", &file_str)],
    )
    .await;
    let runner_a = TestRunner::start(&server, "runner-a", &["e2e"], &[]).await;
    let runner_b = TestRunner::start(&server, "runner-b", &["e2e"], &[]).await;

    let run = wait_for_run(&client, queued.id, Duration::from_secs(180)).await;
    assert_eq!(run.jobs.len(), JOBS, "{}", describe_run(&run));

    // Count the executions: the file the steps appended to.
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| {
        panic!(
            "no step wrote {}: {e}; {}",
            file.display(),
            describe_run(&run)
        )
    });
    let lines: Vec<&str> = text.lines().collect();
    let mut executions: BTreeMap<&str, usize> = BTreeMap::new();
    for line in &lines {
        *executions.entry(line.trim()).or_default() += 1;
    }
    let twice: Vec<_> = executions.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "jobs executed more than once: {twice:?}");
    let job_ids: BTreeSet<String> = run.jobs.iter().map(|j| j.id.to_string()).collect();
    let executed: BTreeSet<String> = executions.keys().map(|k| k.to_string()).collect();
    let never: Vec<_> = job_ids.difference(&executed).collect();
    let unknown: Vec<_> = executed.difference(&job_ids).collect();
    assert!(never.is_empty(), "jobs never executed: {never:?}");
    assert!(
        unknown.is_empty(),
        "lines that are no job id of the run: {unknown:?}"
    );
    assert_eq!(lines.len(), JOBS, "one line per job in all");

    // And the statuses agree with the executions.
    assert_eq!(run.status, RunStatus::Succeeded, "{}", describe_run(&run));
    for job in &run.jobs {
        assert_eq!(job.status, JobStatus::Succeeded, "{job:#?}");
        assert_eq!(job.attempt, 1, "each job was claimed once: {job:#?}");
    }

    let a = runner_a.id().await;
    let b = runner_b.id().await;
    let by_a = run.jobs.iter().filter(|j| j.runner_id == Some(a)).count();
    let by_b = run.jobs.iter().filter(|j| j.runner_id == Some(b)).count();
    println!("runner-a ran {by_a} jobs, runner-b ran {by_b} jobs");
    assert_eq!(by_a + by_b, JOBS, "every job names one of the two runners");
}

/// Many jobs of one run completed at the same moment by different runners: the last completion
/// must see all the others and end the run. (Without serialising the run's advance, two
/// transactions each read the other's job as still running and the run stays `running`.)
async fn concurrent_completions_end_the_run(backend: Backend) {
    let db = test_db!(backend);
    let server = TestServer::start(&db, &[]).await;
    let client = server.client();
    let mut runners = Vec::new();
    for i in 0..8 {
        runners.push(server.fake_runner(&format!("fake-{i}"), &["e2e"]).await);
    }
    // Sixteen jobs for eight runners: every round ends with eight completions at the same moment.
    const RACE_JOBS: usize = 16;
    for round in 0..12 {
        let run = apply_and_trigger(
            &client,
            "race",
            &independent_jobs(RACE_JOBS),
            &[("FILE", "/dev/null")],
        )
        .await;
        // Every runner claims jobs, then all complete at once, until the run's jobs are done.
        let mut done = 0;
        while done < RACE_JOBS {
            let mut claimed = Vec::new();
            for r in runners.iter().take(RACE_JOBS - done) {
                if let Some(a) = r
                    .client
                    .acquire(Duration::from_secs(1))
                    .await
                    .expect("acquire")
                {
                    claimed.push((r.client.clone(), a));
                }
            }
            assert!(
                !claimed.is_empty(),
                "round {round}: no job left to claim after {done}"
            );
            let completions = claimed.iter().map(|(c, a)| {
                let c = c.clone();
                let (id, lease) = (a.job.id, a.lease.token.clone());
                async move {
                    c.heartbeat(id, &lease).await.expect("heartbeat");
                    c.complete(
                        id,
                        &lease,
                        &CompleteRequest {
                            status: JobStatus::Succeeded,
                            exit_code: Some(0),
                        },
                    )
                    .await
                    .expect("complete")
                }
            });
            done += futures::future::join_all(completions).await.len();
        }
        let run = wait_for_run(&client, run.id, Duration::from_secs(30)).await;
        assert_eq!(
            run.status,
            RunStatus::Succeeded,
            "round {round}: {}",
            describe_run(&run)
        );
    }
}
