//! A pipeline runs end to end on a real runner: ordering by `needs`, logs, step results, and
//! what happens after a step fails.

use std::time::Duration;

use outpost_tests::outpost_protocol::{JobStatus, RunStatus, StepStatus};
use outpost_tests::{
    Backend, TestRunner, TestServer, apply_and_trigger, backend_tests, job, scratch_dir, test_db,
    wait_for_run,
};

backend_tests!(two_job_pipeline, failing_step_skips_dependants);

const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// The outputs are computed by the shell (`$((…))`) so that a runner that prints a step's script
/// before running it cannot make a step look as if it ran.
const TWO_JOBS: &str = r#"
description: build then deploy
jobs:
  build:
    runs_on: [e2e]
    steps:
      - name: compile
        run: echo "compiled-$((20 + 1)) for $OUTPOST_JOB_ID"
      - name: package
        run: |
          echo "packaged-$((40 + 2))"
          echo "package-second-line-$((1 + 1))"
  deploy:
    needs: [build]
    runs_on: [e2e]
    steps:
      - name: roll out
        run: echo "deployed-$((3 * 3))"
"#;

async fn two_job_pipeline(backend: Backend) {
    let db = test_db!(backend);
    let server = TestServer::start(&db, &[]).await;
    let runner = TestRunner::start(&server, "e2e-runner", &["e2e"], &[]).await;
    let client = server.client();

    let queued = apply_and_trigger(&client, "two-jobs", TWO_JOBS, &[]).await;
    assert_eq!(queued.pipeline, "two-jobs");
    assert_eq!(queued.number, 1, "the first run of a pipeline is number 1");
    let run = wait_for_run(&client, queued.id, RUN_TIMEOUT).await;

    assert_eq!(run.status, RunStatus::Succeeded, "{run:#?}");
    assert_eq!(run.jobs.len(), 2, "{run:#?}");
    let build = job(&run, "build");
    let deploy = job(&run, "deploy");
    assert_eq!(build.status, JobStatus::Succeeded, "{build:#?}");
    assert_eq!(deploy.status, JobStatus::Succeeded, "{deploy:#?}");
    assert_eq!(deploy.needs, vec!["build".to_string()]);
    let runner_id = runner.id().await;
    assert_eq!(build.runner_id, Some(runner_id));
    assert_eq!(deploy.runner_id, Some(runner_id));

    // `deploy` needs `build`, so it was claimed only after `build` ended.
    let build_finished = build.finished_at.expect("a finished job has finished_at");
    let deploy_started = deploy.started_at.expect("a job that ran has started_at");
    assert!(
        deploy_started >= build_finished,
        "deploy started at {deploy_started} before build finished at {build_finished}"
    );
    assert!(
        run.started_at.is_some() && run.finished_at.is_some(),
        "{run:#?}"
    );

    // Step statuses and exit codes are part of the run.
    let names: Vec<&str> = build.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["compile", "package"]);
    assert_eq!(deploy.steps.len(), 1);
    for step in build.steps.iter().chain(&deploy.steps) {
        assert_eq!(step.status, StepStatus::Succeeded, "{step:#?}");
        assert_eq!(step.exit_code, Some(0), "{step:#?}");
        assert_eq!(step.kind, "run", "{step:#?}");
    }

    // Each job's log holds its own steps' output and nothing of the other job's.
    let build_log = get_log_text(&server, build.id).await;
    let deploy_log = get_log_text(&server, deploy.id).await;
    assert!(
        build_log.contains(&format!("compiled-21 for {}", build.id)),
        "build log:\n{build_log}"
    );
    assert!(build_log.contains("packaged-42"), "build log:\n{build_log}");
    assert!(
        build_log.contains("package-second-line-2"),
        "build log:\n{build_log}"
    );
    assert!(!build_log.contains("deployed-9"), "build log:\n{build_log}");
    assert!(
        deploy_log.contains("deployed-9"),
        "deploy log:\n{deploy_log}"
    );
    assert!(
        !deploy_log.contains("packaged-42"),
        "deploy log:\n{deploy_log}"
    );

    // The job knows its log size, and each step's offsets frame its own output.
    let build_job = client
        .get_job(build.id)
        .await
        .expect("GET /api/v1/jobs/{id}");
    assert_eq!(build_job.log_size, build_log.len() as u64);
    for (step, marker) in build.steps.iter().zip(["compiled-21", "packaged-42"]) {
        let start = step.log_start.expect("a step that ran has log_start") as usize;
        let end = step.log_end.expect("a step that ran has log_end") as usize;
        assert!(
            start <= end && end <= build_log.len(),
            "step {} offsets {start}..{end} in a log of {} bytes",
            step.name,
            build_log.len()
        );
        let slice = &build_log.as_bytes()[start..end];
        assert!(
            String::from_utf8_lossy(slice).contains(marker),
            "step {} log[{start}..{end}] does not hold {marker}: {:?}",
            step.name,
            String::from_utf8_lossy(slice)
        );
    }

    // `Range: bytes=N-` answers the tail.
    let full = build_log.as_bytes();
    let from = full.len() / 2;
    assert!(from > 0, "the build log is too short to test a range");
    let resp = server
        .http()
        .get(server.api(&format!("/api/v1/jobs/{}/log", build.id)))
        .bearer_auth(server.admin_token())
        .header(reqwest::header::RANGE, format!("bytes={from}-"))
        .send()
        .await
        .expect("GET log with a range");
    assert_eq!(
        resp.status(),
        reqwest::StatusCode::PARTIAL_CONTENT,
        "a satisfiable Range answers 206"
    );
    let content_range = resp
        .headers()
        .get(reqwest::header::CONTENT_RANGE)
        .map(|v| v.to_str().unwrap_or_default().to_string());
    assert_eq!(
        content_range.as_deref(),
        Some(format!("bytes {from}-{}/{}", full.len() - 1, full.len()).as_str()),
        "Content-Range of the tail"
    );
    let tail = resp.bytes().await.expect("the tail's body");
    assert_eq!(&tail[..], &full[from..], "the tail from byte {from}");

    // The typed client's ranged read agrees.
    let tail = client
        .get_log(build.id, from as u64)
        .await
        .expect("ranged log");
    assert_eq!(&tail[..], &full[from..]);
}

/// Reads a job's whole log over plain HTTP and checks it is served as text.
async fn get_log_text(server: &TestServer, job: uuid::Uuid) -> String {
    let resp = server
        .http()
        .get(server.api(&format!("/api/v1/jobs/{job}/log")))
        .bearer_auth(server.admin_token())
        .send()
        .await
        .expect("GET /api/v1/jobs/{id}/log");
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
    let content_type = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        content_type.starts_with("text/plain"),
        "the log is served as text/plain, not {content_type:?}"
    );
    resp.text().await.expect("the log is text")
}

const FAILING: &str = r#"
description: a step fails
jobs:
  build:
    runs_on: [e2e]
    steps:
      - name: fine
        run: |
          echo "fine-$((5 + 5))"
          touch "$MARKS/fine"
      - name: boom
        run: |
          echo "about-to-fail-$((6 + 6))"
          exit 3
      - name: after boom
        run: |
          echo "on-success-ran-$((7 + 7))"
          touch "$MARKS/on_success"
      - name: clean up
        when: on_failure
        run: |
          echo "on-failure-ran-$((8 + 8))"
          touch "$MARKS/on_failure"
      - name: always
        when: always
        run: |
          echo "always-ran-$((9 + 9))"
          touch "$MARKS/always"
  deploy:
    needs: [build]
    runs_on: [e2e]
    steps:
      - run: |
          echo "deploy-ran-$((1 + 2))"
          touch "$MARKS/deploy"
"#;

async fn failing_step_skips_dependants(backend: Backend) {
    let db = test_db!(backend);
    let server = TestServer::start(&db, &[]).await;
    let _runner = TestRunner::start(&server, "e2e-runner", &["e2e"], &[]).await;
    let client = server.client();
    let marks = scratch_dir();
    let marks_path = marks.path().display().to_string();

    let queued = apply_and_trigger(&client, "fails", FAILING, &[("MARKS", &marks_path)]).await;
    let run = wait_for_run(&client, queued.id, RUN_TIMEOUT).await;

    assert_eq!(run.status, RunStatus::Failed, "{run:#?}");
    let build = job(&run, "build");
    let deploy = job(&run, "deploy");
    assert_eq!(build.status, JobStatus::Failed, "{build:#?}");
    assert_eq!(
        build.exit_code,
        Some(3),
        "the job carries the failing step's exit code"
    );
    assert_eq!(deploy.status, JobStatus::Skipped, "{deploy:#?}");
    assert_eq!(deploy.runner_id, None, "a skipped job was never claimed");
    assert_eq!(deploy.started_at, None, "a skipped job never started");

    // What ran, counted by what the steps did rather than by what was reported.
    let ran = |name: &str| marks.path().join(name).exists();
    assert!(ran("fine"), "the first step ran");
    assert!(
        !ran("on_success"),
        "an on_success step after a failure must not run"
    );
    assert!(
        ran("on_failure"),
        "an on_failure step after a failure must run"
    );
    assert!(ran("always"), "an always step must run");
    assert!(!ran("deploy"), "a job whose need failed must not run");

    let statuses: Vec<(StepStatus, Option<i32>)> = build
        .steps
        .iter()
        .map(|s| (s.status, s.exit_code))
        .collect();
    assert_eq!(
        statuses,
        [
            (StepStatus::Succeeded, Some(0)),
            (StepStatus::Failed, Some(3)),
            (StepStatus::Skipped, None),
            (StepStatus::Succeeded, Some(0)),
            (StepStatus::Succeeded, Some(0)),
        ],
        "step statuses and exit codes: {:#?}",
        build.steps
    );

    let log = String::from_utf8_lossy(&client.get_log(build.id, 0).await.expect("log")).to_string();
    for expected in [
        "fine-10",
        "about-to-fail-12",
        "on-failure-ran-16",
        "always-ran-18",
    ] {
        assert!(log.contains(expected), "the log lacks {expected}:\n{log}");
    }
    assert!(!log.contains("on-success-ran-14"), "log:\n{log}");
    let deploy_log = client
        .get_log(deploy.id, 0)
        .await
        .expect("log of a skipped job");
    assert!(
        deploy_log.is_empty(),
        "a skipped job has no log: {deploy_log:?}"
    );
}
