//! Deployment steps run the real tools: `checkout` with the real `git`, `helm` from
//! `scripts/install-helm`, `kubectl` at `/usr/bin/kubectl` against the Kubernetes API stand-in in
//! `outpost_tests::kube`; a private repository's token never shows; a variable full of shell
//! syntax reaches `kubectl` as one literal argument.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use outpost_tests::git::{GitRepo, PrivateForge};
use outpost_tests::kube::{DEFAULT_TOKEN, KubeStandIn};
use outpost_tests::outpost_protocol::{
    Client, JobStatus, Run, RunStatus, StepStatus, TriggerRunRequest,
};
use outpost_tests::{
    Backend, SECRETS_KEY_ENV, TestRunner, TestServer, backend_tests, helm, job, job_log,
    scratch_dir, test_db, wait_for_run,
};
use uuid::Uuid;

backend_tests!(
    helm_and_kubectl_steps_run_the_real_tools,
    checkout_takes_the_triggering_commit,
    private_checkout_keeps_the_token_out_of_sight,
    shell_syntax_in_a_variable_stays_one_argument,
);

const RUN_TIMEOUT: Duration = Duration::from_secs(90);
const KUBECTL: &str = "/usr/bin/kubectl";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Runner settings for the real tools, a kubeconfig for the Kubernetes API stand-in, and a home of the
/// test's own, where kubectl keeps its discovery cache and helm its configuration.
async fn tool_env(scratch: &Path, kubeconfig: &Path) -> Vec<(String, String)> {
    let home = scratch.join("home");
    std::fs::create_dir_all(&home).expect("the home directory can be created");
    vec![
        ("OUTPOST_RUNNER__KUBECTL".into(), KUBECTL.into()),
        (
            "OUTPOST_RUNNER__HELM".into(),
            helm().await.to_string_lossy().into_owned(),
        ),
        (
            "KUBECONFIG".into(),
            kubeconfig.to_string_lossy().into_owned(),
        ),
        ("HOME".into(), home.to_string_lossy().into_owned()),
    ]
}

fn pairs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

async fn trigger(client: &Client, pipeline: &str, req: TriggerRunRequest) -> Run {
    client
        .trigger_run(pipeline, &req)
        .await
        .unwrap_or_else(|e| panic!("POST /api/v1/pipelines/{pipeline}/runs failed: {e}"))
}

fn text(log: &[u8]) -> String {
    String::from_utf8_lossy(log).into_owned()
}

const DEPLOY: &str = r#"
variables: { NAMESPACE: web, RELEASE: web }
jobs:
  deploy:
    runs_on: [e2e]
    steps:
      - checkout
      - name: lint the chart
        helm: lint ./chart
      - name: render the chart
        helm: template ${RELEASE} ./chart -n ${NAMESPACE} --set image.tag=${OUTPOST_SHA} --set replicaCount=3
      - kubectl: version --client
      - name: dry-run the repository's manifest
        kubectl: apply --dry-run=client -f k8s/configmap.yaml --validate=false
      - name: write a manifest
        run: |
          cat > generated.yaml <<EOF
          apiVersion: v1
          kind: ConfigMap
          metadata:
            name: generated-$((6 * 7))
            namespace: ${NAMESPACE}
          data:
            sha: "${OUTPOST_SHA}"
          EOF
      - name: dry-run the written manifest
        kubectl: apply --dry-run=client -f generated.yaml --validate=false
      - kubectl: config view
"#;

async fn helm_and_kubectl_steps_run_the_real_tools(backend: Backend) {
    let db = test_db!(backend);
    let server = TestServer::start(&db, &[]).await;
    let client = server.client();
    let scratch = scratch_dir();
    let kube = KubeStandIn::start().await;
    let kubeconfig = kube.write_kubeconfig(scratch.path(), DEFAULT_TOKEN);
    let env = tool_env(scratch.path(), &kubeconfig).await;
    let _runner = TestRunner::start(&server, "e2e-deploy", &["e2e"], &pairs(&env)).await;

    let repo = GitRepo::new();
    repo.copy_dir(&fixtures().join("chart"), "chart");
    repo.copy_dir(&fixtures().join("k8s"), "k8s");
    let sha = repo.commit("chart and manifests");

    client
        .apply_pipeline("deploy", DEPLOY)
        .await
        .expect("the pipeline applies");
    let queued = trigger(
        &client,
        "deploy",
        TriggerRunRequest {
            sha: Some(sha.clone()),
            git_ref: Some("refs/heads/main".into()),
            repo: Some("acme/web".into()),
            clone_url: Some(repo.file_url()),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(queued.trigger.clone_url.as_deref(), Some(&*repo.file_url()));
    assert_eq!(queued.trigger.repo.as_deref(), Some("acme/web"));
    let run = wait_for_run(&client, queued.id, RUN_TIMEOUT).await;
    let deploy = job(&run, "deploy");
    let log = text(&job_log(&client, deploy.id).await);
    assert_eq!(run.status, RunStatus::Succeeded, "{run:#?}\n{log}");

    let kinds: Vec<&str> = deploy.steps.iter().map(|s| s.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "checkout", "helm", "helm", "kubectl", "kubectl", "run", "kubectl", "kubectl"
        ]
    );
    for step in &deploy.steps {
        assert_eq!(step.status, StepStatus::Succeeded, "{step:#?}\n{log}");
        assert_eq!(step.exit_code, Some(0), "{step:#?}");
    }

    // Each step is framed by clear header lines: its start, the command as run, its end.
    for needle in [
        "▶ Step 2/8: lint the chart",
        "$ helm lint ./chart",
        "✔ Step 2/8 succeeded in",
        "✔ Step 8/8 succeeded in",
    ] {
        assert!(log.contains(needle), "the log lacks {needle:?}:\n{log}");
    }
    // The command lines show the arguments after expansion (quoted where a shell would need it).
    let command = |prefix: &str| {
        log.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starts with {prefix:?}:\n{log}"))
            .to_string()
    };
    let template = command("$ helm template web ./chart -n web --set ");
    assert!(
        template.contains(&format!("image.tag={sha}")) && template.contains("replicaCount=3"),
        "{template}"
    );
    let apply = command("$ kubectl apply ");
    assert!(
        apply.contains("--dry-run=client") && apply.contains("-f k8s/configmap.yaml"),
        "{apply}"
    );
    // What the tools printed.
    for needle in [
        "1 chart(s) linted, 0 chart(s) failed",
        "# Source: web/templates/deployment.yaml",
        "replicas: 3",
        &format!("image: \"registry.example/web:{sha}\""),
        "Client Version: v1.",
        "configmap/web-settings created (dry run)",
        "configmap/generated-42 created (dry run)",
        &format!("server: {}", kube.url()),
        "current-context: outpost-e2e",
    ] {
        assert!(log.contains(needle), "the log lacks {needle:?}:\n{log}");
    }
    // `kubectl config view` redacts the user's token, as it does for people.
    assert!(!log.contains(DEFAULT_TOKEN), "{log}");

    // The dry runs asked the API server about the objects, and changed nothing.
    let requests = kube.requests();
    for path in [
        "/api/v1/namespaces/web/configmaps/web-settings",
        "/api/v1/namespaces/web/configmaps/generated-42",
    ] {
        assert!(
            requests.iter().any(|r| r.method == "GET" && r.path == path),
            "kubectl never asked for {path}: {requests:?}"
        );
    }
    assert!(
        requests.iter().all(|r| r.method == "GET"),
        "a client-side dry run must not write: {requests:?}"
    );
}

const SHOW: &str = r#"
jobs:
  show:
    runs_on: [e2e]
    steps:
      - checkout: { path: src, depth: 1 }
      - run: |
          echo "content: $(cat src/app.txt)"
          echo "head: $(git -C src rev-parse HEAD)"
          echo "commits: $(git -C src rev-list --count HEAD)"
          echo "repo: ${OUTPOST_REPO:-none} sha: ${OUTPOST_SHA}"
"#;

async fn checkout_takes_the_triggering_commit(backend: Backend) {
    let db = test_db!(backend);
    let server = TestServer::start(&db, &[]).await;
    let client = server.client();
    let _runner = TestRunner::start(&server, "e2e-checkout", &["e2e"], &[]).await;

    let repo = GitRepo::new();
    repo.write(&[("app.txt", "version one")]);
    let first = repo.commit("first");
    repo.write(&[("app.txt", "version two")]);
    let second = repo.commit("second");
    assert_ne!(first, second);

    // The pipeline names its repository; the trigger names only the commit, the first one.
    let yaml = format!("repository: {}\n{SHOW}", repo.file_url());
    client
        .apply_pipeline("show", &yaml)
        .await
        .expect("the pipeline applies");
    let queued = trigger(
        &client,
        "show",
        TriggerRunRequest {
            sha: Some(first.clone()),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        queued.trigger.clone_url.as_deref(),
        Some(&*repo.file_url()),
        "the pipeline's repository is the run's clone URL"
    );
    let run = wait_for_run(&client, queued.id, RUN_TIMEOUT).await;
    let log = text(&job_log(&client, job(&run, "show").id).await);
    assert_eq!(run.status, RunStatus::Succeeded, "{run:#?}\n{log}");
    assert!(log.contains("content: version one"), "{log}");
    assert!(
        !log.contains("content: version two"),
        "the checkout took the branch's tip, not the commit asked for:\n{log}"
    );
    assert!(log.contains(&format!("head: {first}")), "{log}");
    assert!(
        log.contains("commits: 1"),
        "depth 1 is a shallow clone:\n{log}"
    );
    assert!(log.contains(&format!("repo: none sha: {first}")), "{log}");
    assert!(
        log.contains(&format!(
            "$ git fetch --no-tags --depth 1 {}",
            repo.file_url()
        )),
        "{log}"
    );

    // A clone URL in the trigger wins over the pipeline's repository.
    let other = GitRepo::new();
    other.write(&[("app.txt", "from the other repository")]);
    let other_sha = other.commit("other");
    let queued = trigger(
        &client,
        "show",
        TriggerRunRequest {
            sha: Some(other_sha.clone()),
            repo: Some("acme/other".into()),
            clone_url: Some(other.file_url()),
            ..Default::default()
        },
    )
    .await;
    let run = wait_for_run(&client, queued.id, RUN_TIMEOUT).await;
    let log = text(&job_log(&client, job(&run, "show").id).await);
    assert_eq!(run.status, RunStatus::Succeeded, "{run:#?}\n{log}");
    assert!(log.contains("content: from the other repository"), "{log}");
    assert!(log.contains(&format!("head: {other_sha}")), "{log}");
    assert!(
        log.contains(&format!("repo: acme/other sha: {other_sha}")),
        "{log}"
    );
}

const PRIVATE: &str = r#"
secrets: [GIT_TOKEN]
jobs:
  fetch:
    runs_on: [e2e]
    steps:
      - checkout: { token: GIT_TOKEN }
      - run: |
          echo "content: $(cat app.txt)"
          echo "head: $(git rev-parse HEAD)"
"#;

const PRIVATE_WITHOUT_TOKEN: &str = r#"
jobs:
  fetch:
    runs_on: [e2e]
    steps:
      - checkout
"#;

/// Finds `needle` in any file under `dir`, for the report.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_containing(&path, needle));
        } else if let Ok(bytes) = std::fs::read(&path)
            && bytes.windows(needle.len()).any(|w| w == needle)
        {
            found.push(path);
        }
    }
    found
}

async fn private_checkout_keeps_the_token_out_of_sight(backend: Backend) {
    let db = test_db!(backend);
    let server = TestServer::start(&db, &[SECRETS_KEY_ENV]).await;
    let client = server.client();
    let scratch = scratch_dir();

    let token = format!("ghp_{}", Uuid::now_v7().simple());
    server.set_secret("GIT_TOKEN", &token).await;

    let repo = GitRepo::new();
    repo.write(&[("app.txt", "private version one")]);
    let sha = repo.commit("private");
    let forge = PrivateForge::start(&repo, &token).await;

    // git is the real git behind a wrapper that records the arguments and which git settings came
    // through the environment, so the test can see what any user of the machine could see.
    let argv_log = scratch.path().join("git-argv.log");
    let wrapper = scratch.path().join("git");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/bash\n\
             {{ printf 'argv:'; printf ' [%s]' \"$@\"; printf '\\n';\n\
             \x20 env | grep '^GIT_CONFIG_KEY_' | sed 's/^/env: /'; }} >> '{}'\n\
             exec git \"$@\"\n",
            argv_log.display()
        ),
    )
    .expect("the git wrapper can be written");
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("the git wrapper can be made executable");
    let wrapper_path = wrapper.to_string_lossy().into_owned();
    let runner = TestRunner::start(
        &server,
        "e2e-private",
        &["e2e"],
        &[
            ("OUTPOST_RUNNER__GIT", &wrapper_path),
            ("OUTPOST_RUNNER__KEEP_WORKSPACES", "true"),
        ],
    )
    .await;

    // Without the token the forge turns git away, and the step fails rather than waiting for a
    // password: the repository really is private.
    client
        .apply_pipeline("public-attempt", PRIVATE_WITHOUT_TOKEN)
        .await
        .expect("the pipeline applies");
    let request = TriggerRunRequest {
        sha: Some(sha.clone()),
        clone_url: Some(forge.url()),
        ..Default::default()
    };
    let queued = trigger(&client, "public-attempt", request.clone()).await;
    let run = wait_for_run(&client, queued.id, RUN_TIMEOUT).await;
    let refused = job(&run, "fetch");
    let log = text(&job_log(&client, refused.id).await);
    assert_eq!(refused.status, JobStatus::Failed, "{run:#?}\n{log}");
    assert!(
        forge.requests().iter().any(|r| r.status == 401),
        "{:?}",
        forge.requests()
    );
    let before = forge.requests().len();

    client
        .apply_pipeline("private", PRIVATE)
        .await
        .expect("the pipeline applies");
    let queued = trigger(&client, "private", request).await;
    let run = wait_for_run(&client, queued.id, RUN_TIMEOUT).await;
    let fetch = job(&run, "fetch");
    let log_bytes = job_log(&client, fetch.id).await;
    let log = text(&log_bytes);
    assert_eq!(run.status, RunStatus::Succeeded, "{run:#?}\n{log}");
    assert!(log.contains("content: private version one"), "{log}");
    assert!(log.contains(&format!("head: {sha}")), "{log}");
    assert!(log.contains("secret `GIT_TOKEN`"), "{log}");

    // The token reached the forge, as basic auth, on every request of this run.
    let requests = forge.requests()[before..].to_vec();
    assert!(!requests.is_empty(), "git never asked the forge");
    let b64 = base64::engine::general_purpose::STANDARD;
    let expected = format!("Basic {}", b64.encode(format!("x-access-token:{token}")));
    for r in &requests {
        assert_eq!(r.authorization.as_deref(), Some(&*expected), "{r:?}");
        assert_ne!(r.status, 401, "{r:?}");
    }

    // The forms the token could leak in: as is, and base64 with and without the user name.
    let forms = [
        token.clone(),
        b64.encode(&token),
        b64.encode(format!("x-access-token:{token}")),
    ];
    let argv = std::fs::read_to_string(&argv_log).expect("the wrapper recorded git's arguments");
    assert!(argv.contains("argv: [fetch]"), "{argv}");
    assert!(argv.contains(&forge.url()), "{argv}");
    assert!(
        argv.contains("extraHeader"),
        "the header came through the environment:\n{argv}"
    );
    let workspace = runner.work_dir().join(fetch.id.to_string());
    let git_config =
        std::fs::read_to_string(workspace.join(".git/config")).expect("the workspace was kept");
    for form in &forms {
        assert!(
            !log.contains(form.as_str()),
            "the log shows the token:\n{log}"
        );
        assert!(
            !argv.contains(form.as_str()),
            "git's argv has the token:\n{argv}"
        );
        assert!(
            !git_config.contains(form.as_str()),
            ".git/config has the token:\n{git_config}"
        );
        assert_eq!(
            files_containing(&workspace, form.as_bytes()),
            Vec::<PathBuf>::new(),
            "the workspace holds the token"
        );
        assert!(
            !runner.output().contains(form.as_str()),
            "the runner printed the token"
        );
    }
}

const EVIL: &str = r#"
jobs:
  evil:
    runs_on: [e2e]
    steps:
      - name: use the variable
        kubectl: config use-context ${EVIL}
      - name: afterwards
        when: always
        run: echo "afterwards-$((40 + 2))"
"#;

async fn shell_syntax_in_a_variable_stays_one_argument(backend: Backend) {
    let db = test_db!(backend);
    let server = TestServer::start(&db, &[]).await;
    let client = server.client();
    let scratch = scratch_dir();
    let kube = KubeStandIn::start().await;
    let kubeconfig = kube.write_kubeconfig(scratch.path(), DEFAULT_TOKEN);
    let env = tool_env(scratch.path(), &kubeconfig).await;
    let _runner = TestRunner::start(&server, "e2e-evil", &["e2e"], &pairs(&env)).await;

    let marker = |n: u32| scratch.path().join(format!("outpost-evil-{n}"));
    let evil = format!(
        "x; touch {} && echo pwned-$((1 + 1)) $(touch {}) `touch {}` | tee {}",
        marker(1).display(),
        marker(2).display(),
        marker(3).display(),
        marker(4).display()
    );
    client
        .apply_pipeline("evil", EVIL)
        .await
        .expect("the pipeline applies");
    let queued = trigger(
        &client,
        "evil",
        TriggerRunRequest {
            variables: [("EVIL".to_string(), evil.clone())].into(),
            ..Default::default()
        },
    )
    .await;
    let run = wait_for_run(&client, queued.id, RUN_TIMEOUT).await;
    let evil_job = job(&run, "evil");
    let log = text(&job_log(&client, evil_job.id).await);

    // kubectl got the whole value as the one context name and said there is no such context.
    assert!(
        log.contains(&format!(
            "error: no context exists with the name: \"{evil}\""
        )),
        "{log}"
    );
    assert_eq!(evil_job.status, JobStatus::Failed, "{run:#?}\n{log}");
    assert_eq!(evil_job.steps[0].status, StepStatus::Failed);
    assert_eq!(evil_job.steps[0].exit_code, Some(1));
    assert_eq!(evil_job.steps[1].status, StepStatus::Succeeded);
    assert!(log.contains("afterwards-42"), "{log}");
    // Nothing of it ran.
    assert!(!log.contains("pwned-2"), "{log}");
    for n in 1..=4 {
        assert!(
            !marker(n).exists(),
            "{} exists: part of the variable ran as a command",
            marker(n).display()
        );
    }
    // The kubeconfig is as it was: no context was switched.
    assert!(
        std::fs::read_to_string(&kubeconfig)
            .expect("the kubeconfig is there")
            .contains("current-context: outpost-e2e")
    );
}
