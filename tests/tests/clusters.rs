//! Private clusters on the runner side: `kube-token` against the identity stand-in (shape, cache,
//! expiry, concurrency, workload identity, client secret, refusals), a pipeline job whose
//! `kubectl` and `helm` reach the HTTPS Kubernetes API stand-in through the exec plugin, routing
//! by cluster, `doctor`, and the refusal of plain-HTTP server URLs.
//!
//! Every process that could build a managed identity credential gets the stand-in's
//! `IDENTITY_ENDPOINT`/`IDENTITY_HEADER`, and the tests assert that the stand-in saw the requests:
//! nothing here may reach the instance metadata address.

use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use outpost_tests::identity::{Endpoint, IdentityStandIn, Refusal, TestCa};
use outpost_tests::kube::KubeStandIn;
use outpost_tests::outpost_protocol::{JobStatus, RegisterRequest, RunStatus};
use outpost_tests::{
    Backend, TestDb, TestRunner, TestServer, apply_and_trigger, backend_tests, binary,
    describe_run, helm, job, test_db, wait_for_run,
};

const AKS_RESOURCE: &str = "6dae42f8-4368-4678-94ff-3960e28e3630";
const AKS_SCOPE: &str = "6dae42f8-4368-4678-94ff-3960e28e3630/.default";

/// `outpost-runner ARGS` with none of the test process's Outpost, Azure or identity variables,
/// plus `env`.
fn runner_command(
    args: &[&str],
    config_dir: &Path,
    env: &[(String, String)],
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(binary("outpost-runner"));
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if ["OUTPOST", "AZURE_", "IDENTITY_", "MSI_", "IMDS_"]
            .iter()
            .any(|p| k.starts_with(p))
        {
            cmd.env_remove(&key);
        }
    }
    cmd.args(args)
        .arg("--config-dir")
        .arg(config_dir)
        .env("NO_COLOR", "1")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    cmd
}

async fn run_runner(args: &[&str], config_dir: &Path, env: &[(String, String)]) -> Output {
    tokio::time::timeout(
        Duration::from_secs(120),
        runner_command(args, config_dir, env).output(),
    )
    .await
    .unwrap_or_else(|_| panic!("outpost-runner {args:?} did not finish within 120 s"))
    .unwrap_or_else(|e| panic!("could not start outpost-runner: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "exit: {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

async fn kube_token(
    config_dir: &Path,
    cluster: &str,
    env: &[(String, String)],
) -> serde_json::Value {
    let out = run_runner(&["kube-token", "--cluster", cluster], config_dir, env).await;
    assert!(out.status.success(), "kube-token failed: {}", text(&out));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("kube-token printed no JSON ({e}): {}", text(&out)))
}

fn token_of(credential: &serde_json::Value) -> String {
    credential["status"]["token"]
        .as_str()
        .unwrap_or_else(|| panic!("no status.token in {credential}"))
        .to_string()
}

/// A config dir with a CA file and `runner.toml` holding `cluster_toml` under `[clusters.aks-prod]`.
fn config_with_cluster(cluster_toml: &str, ca_pem: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("outpost-clusters-")
        .tempdir()
        .expect("a temporary directory can be created");
    std::fs::write(dir.path().join("cluster-ca.pem"), ca_pem).expect("the CA can be written");
    std::fs::write(
        dir.path().join("runner.toml"),
        format!("[clusters.aks-prod]\n{cluster_toml}\n"),
    )
    .expect("runner.toml can be written");
    dir
}

const MANAGED_IDENTITY: &str = "server = \"https://aks-prod.example.invalid\"\nca_file = \"cluster-ca.pem\"\nauth = \"managed_identity\"\nclient_id = \"11111111-2222-3333-4444-555555555555\"";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_token_prints_an_exec_credential_from_the_managed_identity() {
    let identity = IdentityStandIn::start().await;
    let config = config_with_cluster(MANAGED_IDENTITY, &TestCa::new("c").pem());
    let credential = kube_token(config.path(), "aks-prod", &identity.env()).await;

    assert_eq!(credential["apiVersion"], "client.authentication.k8s.io/v1");
    assert_eq!(credential["kind"], "ExecCredential");
    let expires = credential["status"]["expirationTimestamp"]
        .as_str()
        .expect("an expirationTimestamp");
    let expires = chrono::DateTime::parse_from_rfc3339(expires).expect("RFC 3339");
    let lifetime = expires.timestamp() - chrono::Utc::now().timestamp();
    assert!((3500..=3600).contains(&lifetime), "expires in {lifetime} s");

    let requests = identity.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    let r = &requests[0];
    assert_eq!(r.endpoint, Endpoint::ManagedIdentity);
    assert_eq!(r.audience, AKS_RESOURCE);
    assert_eq!(
        r.client_id.as_deref(),
        Some("11111111-2222-3333-4444-555555555555")
    );
    assert_eq!(r.token.as_deref(), Some(token_of(&credential).as_str()));

    // The cache is private to the runner's user.
    use std::os::unix::fs::PermissionsExt as _;
    let cache = config.path().join("tokens/aks-prod.json");
    let mode = std::fs::metadata(&cache)
        .expect("the token is cached")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let dir_mode = std::fs::metadata(config.path().join("tokens"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o777, 0o700);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_calls_cost_one_token_request() {
    let identity = IdentityStandIn::start().await;
    let config = config_with_cluster(MANAGED_IDENTITY, &TestCa::new("c").pem());
    let first = token_of(&kube_token(config.path(), "aks-prod", &identity.env()).await);
    for _ in 0..99 {
        let again = token_of(&kube_token(config.path(), "aks-prod", &identity.env()).await);
        assert_eq!(again, first, "the cached token is reused");
    }
    assert_eq!(identity.count(), 1, "{:?}", identity.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_close_to_expiry_are_refreshed() {
    let identity = IdentityStandIn::start().await;
    let config = config_with_cluster(MANAGED_IDENTITY, &TestCa::new("c").pem());
    // A token with less than five minutes to live is not handed to kubectl again.
    identity.set_lifetime(Duration::from_secs(4 * 60));
    let mut seen = Vec::new();
    for n in 1..=3 {
        seen.push(token_of(
            &kube_token(config.path(), "aks-prod", &identity.env()).await,
        ));
        assert_eq!(identity.count(), n, "every call needs a fresh token");
    }
    seen.dedup();
    assert_eq!(seen.len(), 3, "three different tokens: {seen:?}");

    identity.set_lifetime(Duration::from_secs(3600));
    let long = token_of(&kube_token(config.path(), "aks-prod", &identity.env()).await);
    assert_eq!(identity.count(), 4);
    let again = token_of(&kube_token(config.path(), "aks-prod", &identity.env()).await);
    assert_eq!(again, long);
    assert_eq!(identity.count(), 4, "a long-lived token is reused");

    // A token that is about to expire in the cache is replaced.
    let cache = config.path().join("tokens/aks-prod.json");
    let mut cached: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cache).unwrap()).unwrap();
    cached["expires_at"] =
        serde_json::json!((chrono::Utc::now() + chrono::Duration::seconds(60)).to_rfc3339());
    std::fs::write(&cache, serde_json::to_vec(&cached).unwrap()).unwrap();
    let renewed = token_of(&kube_token(config.path(), "aks-prod", &identity.env()).await);
    assert_ne!(renewed, long);
    assert_eq!(identity.count(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_wait_for_one_request() {
    let identity = IdentityStandIn::start().await;
    let config = config_with_cluster(MANAGED_IDENTITY, &TestCa::new("c").pem());
    let env = identity.env();
    let calls = (0..16).map(|_| kube_token(config.path(), "aks-prod", &env));
    let tokens: Vec<String> = futures::future::join_all(calls)
        .await
        .iter()
        .map(token_of)
        .collect();
    assert_eq!(identity.count(), 1, "{:?}", identity.requests());
    assert!(tokens.iter().all(|t| *t == tokens[0]), "{tokens:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_identity_exchanges_the_federated_token_over_https() {
    let identity = IdentityStandIn::start().await;
    let config = config_with_cluster(
        "server = \"https://aks-prod.example.invalid\"\nca_file = \"cluster-ca.pem\"\nauth = \"workload_identity\"",
        &TestCa::new("c").pem(),
    );
    let token_file = config.path().join("federated-token");
    std::fs::write(&token_file, "eyJhbGciOiJSUzI1NiJ9.federated.signature").unwrap();
    // The variables AKS workload identity injects into a pod; the runner takes them as defaults.
    let env = vec![
        ("AZURE_TENANT_ID".to_string(), "contoso-tenant".to_string()),
        ("AZURE_CLIENT_ID".to_string(), "wi-client".to_string()),
        (
            "AZURE_FEDERATED_TOKEN_FILE".to_string(),
            token_file.to_string_lossy().into_owned(),
        ),
        (
            "AZURE_AUTHORITY_HOST".to_string(),
            identity.authority_host(),
        ),
    ];
    // Without trusting the stand-in's CA, TLS to the token endpoint fails.
    let out = run_runner(
        &["kube-token", "--cluster", "aks-prod"],
        config.path(),
        &env,
    )
    .await;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .to_lowercase()
            .contains("certificate"),
        "the error says why: {}",
        text(&out)
    );
    assert_eq!(identity.count(), 0, "no request got through TLS");

    std::fs::write(
        config.path().join("runner.toml"),
        format!(
            "[clusters.aks-prod]\nserver = \"https://aks-prod.example.invalid\"\nca_file = \"cluster-ca.pem\"\nauth = \"workload_identity\"\nauthority_ca_file = \"{}\"\n",
            identity.ca_file().display()
        ),
    )
    .unwrap();
    let credential = kube_token(config.path(), "aks-prod", &env).await;
    let requests = identity.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    let r = &requests[0];
    assert_eq!(r.endpoint, Endpoint::Token);
    assert_eq!(r.tenant.as_deref(), Some("contoso-tenant"));
    assert_eq!(r.client_id.as_deref(), Some("wi-client"));
    assert_eq!(r.audience, AKS_SCOPE);
    assert_eq!(
        r.client_assertion.as_deref(),
        Some("eyJhbGciOiJSUzI1NiJ9.federated.signature")
    );
    assert_eq!(r.token.as_deref(), Some(token_of(&credential).as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_secret_is_read_from_its_file_and_a_wrong_one_is_explained() {
    let identity = IdentityStandIn::start().await;
    identity.set_client_secret(Some("right-secret"));
    let config = config_with_cluster(
        &format!(
            "server = \"https://aks-prod.example.invalid\"\nca_file = \"cluster-ca.pem\"\nauth = \"client_secret\"\ntenant_id = \"contoso\"\nclient_id = \"app-1\"\nsecret_file = \"secret\"\nauthority_host = \"{}\"\nauthority_ca_file = \"{}\"",
            identity.authority_host(),
            identity.ca_file().display()
        ),
        &TestCa::new("c").pem(),
    );
    std::fs::write(config.path().join("secret"), "wrong-secret\n").unwrap();
    let out = run_runner(&["kube-token", "--cluster", "aks-prod"], config.path(), &[]).await;
    assert!(!out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("AADSTS7000215"), "{}", text(&out));
    assert!(
        stderr.contains("secret_file"),
        "the hint names what to check: {}",
        text(&out)
    );
    assert!(
        out.stdout.is_empty(),
        "nothing on stdout for kubectl to misread"
    );

    std::fs::write(config.path().join("secret"), "right-secret\n").unwrap();
    let credential = kube_token(config.path(), "aks-prod", &[]).await;
    let last = identity.requests().pop().expect("a request");
    assert_eq!(last.client_secret.as_deref(), Some("right-secret"));
    assert_eq!(last.tenant.as_deref(), Some("contoso"));
    assert_eq!(last.token.as_deref(), Some(token_of(&credential).as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_identity_endpoint_fails_clearly_and_caches_nothing() {
    let identity = IdentityStandIn::start().await;
    identity.refuse(Some(Refusal::default()));
    let config = config_with_cluster(MANAGED_IDENTITY, &TestCa::new("c").pem());
    let out = run_runner(
        &["kube-token", "--cluster", "aks-prod"],
        config.path(),
        &identity.env(),
    )
    .await;
    assert!(!out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("could not get an Entra ID token with auth = \"managed_identity\""),
        "{}",
        text(&out)
    );
    assert!(stderr.contains("user-assigned identity"), "{}", text(&out));
    assert_eq!(identity.count(), 1, "the stand-in was asked");
    assert!(!config.path().join("tokens/aks-prod.json").exists());

    identity.refuse(None);
    kube_token(config.path(), "aks-prod", &identity.env()).await;
    assert_eq!(identity.count(), 2);

    // A cluster the runner does not have is named in the error.
    let out = run_runner(
        &["kube-token", "--cluster", "nope"],
        config.path(),
        &identity.env(),
    )
    .await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no cluster `nope`"),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_cli_auth_without_the_cli_says_what_to_install() {
    let config = config_with_cluster(
        "server = \"https://aks-prod.example.invalid\"\nca_file = \"cluster-ca.pem\"\nauth = \"azure_cli\"",
        &TestCa::new("c").pem(),
    );
    let empty = tempfile::tempdir().unwrap();
    let env = vec![(
        "PATH".to_string(),
        empty.path().to_string_lossy().into_owned(),
    )];
    let out = run_runner(
        &["kube-token", "--cluster", "aks-prod"],
        config.path(),
        &env,
    )
    .await;
    assert!(!out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("az not found on PATH"), "{}", text(&out));
    assert!(
        stderr.contains("install the Azure CLI and run `az login`"),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_naming_a_cluster_reaches_its_api_through_the_exec_plugin() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    let server = TestServer::start(&db, &[]).await;
    let client = server.client();
    let identity = IdentityStandIn::start().await;
    identity.set_minter(Arc::new(|_| "aks-token-for-outpost".to_string()));
    let kube = KubeStandIn::start().await;
    kube.accept_only(&["aks-token-for-outpost"]);

    let ca_dir = tempfile::tempdir().unwrap();
    let ca_file = ca_dir.path().join("cluster-ca.pem");
    std::fs::write(&ca_file, kube.ca_pem()).unwrap();
    let runner_toml = format!(
        "[clusters.aks-prod]\nserver = \"{}\"\nca_file = \"{}\"\nauth = \"managed_identity\"\nclient_id = \"mi-client\"\n",
        kube.url(),
        ca_file.display()
    );
    // helm keeps its configuration under HOME: one of the test's own.
    let home = tempfile::tempdir().unwrap();
    let mut env: Vec<(String, String)> = identity.env();
    env.push((
        "OUTPOST_RUNNER__HELM".into(),
        helm().await.to_string_lossy().into_owned(),
    ));
    env.push(("HOME".into(), home.path().to_string_lossy().into_owned()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let runner =
        TestRunner::start_with_settings(&server, "vnet-runner", &[], &env, &[], Some(&runner_toml))
            .await;

    let yaml = r#"
jobs:
  deploy:
    cluster: aks-prod
    steps:
      - kubectl: version --output=json
      - kubectl: version --output=json
      - helm: list -n default
      - name: the kubeconfig is private and uses the plugin
        run: |
          test "$(stat -c %a "$KUBECONFIG")" = 600
          kubectl config view -o jsonpath='exec={.users[0].user.exec.command} {.users[0].user.exec.args}{"\n"}'
"#;
    let run = apply_and_trigger(&client, "deploy-aks", yaml, &[]).await;
    let run = wait_for_run(&client, run.id, Duration::from_secs(120)).await;
    let log = String::from_utf8_lossy(
        &client
            .get_log(job(&run, "deploy").id, 0)
            .await
            .expect("the log"),
    )
    .into_owned();
    assert_eq!(
        run.status,
        RunStatus::Succeeded,
        "{}\n{log}\nrunner:\n{}",
        describe_run(&run),
        runner.output()
    );
    assert_eq!(job(&run, "deploy").runner_id, Some(runner.id().await));
    assert!(log.contains("Cluster: aks-prod"), "{log}");
    assert!(
        log.contains("\"serverVersion\""),
        "kubectl reached the API server: {log}"
    );
    assert!(
        log.contains(&format!(
            "exec={} [\"kube-token\",\"--cluster\",\"aks-prod\",\"--config-dir\",\"{}\"]",
            binary("outpost-runner").display(),
            runner.config_dir().display()
        )),
        "{log}"
    );

    // Both kubectl calls carried the managed identity's token; it was requested once.
    let seen = kube.requests();
    let versions: Vec<_> = seen
        .iter()
        .filter(|r| r.path.starts_with("/version"))
        .collect();
    assert!(versions.len() >= 2, "{seen:?}");
    assert!(
        versions
            .iter()
            .all(|r| r.token.as_deref() == Some("aks-token-for-outpost")),
        "{seen:?}"
    );
    // helm went through the same exec plugin (and its token cache) to list its releases.
    assert!(
        seen.iter()
            .any(|r| r.path == "/api/v1/namespaces/default/secrets"
                && r.user_agent
                    .as_deref()
                    .is_some_and(|a| a.starts_with("Helm"))
                && r.token.as_deref() == Some("aks-token-for-outpost")
                && r.status == 200),
        "{seen:?}"
    );
    let requests = identity.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0].audience, AKS_RESOURCE);
    assert_eq!(requests[0].client_id.as_deref(), Some("mi-client"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubeconfig_cluster_gets_a_private_copy_of_its_context() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    let server = TestServer::start(&db, &[]).await;
    let client = server.client();
    let kube = KubeStandIn::start().await;
    kube.accept_only(&["prod-token"]);

    // An operator's kubeconfig with two contexts, the CA beside it by a relative path.
    let files = tempfile::tempdir().unwrap();
    std::fs::write(files.path().join("kube-ca.pem"), kube.ca_pem()).unwrap();
    let kubeconfig = files.path().join("config");
    let original = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: {}\n    certificate-authority: kube-ca.pem\nusers:\n- name: prod-user\n  user:\n    token: prod-token\n- name: dev-user\n  user:\n    token: dev-token\ncontexts:\n- name: dev\n  context:\n    cluster: stand-in\n    user: dev-user\n- name: prod\n  context:\n    cluster: stand-in\n    user: prod-user\ncurrent-context: dev\n",
        kube.url()
    );
    std::fs::write(&kubeconfig, &original).unwrap();
    let runner_toml = format!(
        "[clusters.onprem]\nkubeconfig = \"{}\"\ncontext = \"prod\"\n",
        kubeconfig.display()
    );
    let runner = TestRunner::start_with_settings(
        &server,
        "onprem-runner",
        &[],
        &[],
        &[],
        Some(&runner_toml),
    )
    .await;

    let yaml = r#"
jobs:
  deploy:
    cluster: onprem
    steps:
      - kubectl: version --output=json
      - run: |
          echo "context=$(kubectl config current-context)"
          test "$(stat -c %a "$KUBECONFIG")" = 600
          kubectl config set-context --current --namespace=changed-by-the-job
          kubectl config get-contexts -o name
"#;
    let run = apply_and_trigger(&client, "deploy-onprem", yaml, &[]).await;
    let run = wait_for_run(&client, run.id, Duration::from_secs(120)).await;
    let log = String::from_utf8_lossy(
        &client
            .get_log(job(&run, "deploy").id, 0)
            .await
            .expect("the log"),
    )
    .into_owned();
    assert_eq!(
        run.status,
        RunStatus::Succeeded,
        "{}\n{log}\nrunner:\n{}",
        describe_run(&run),
        runner.output()
    );
    assert!(log.contains("context=prod"), "{log}");
    assert!(
        !log.contains("\ndev\n"),
        "the copy holds only the configured context: {log}"
    );
    assert!(
        log.contains("\"serverVersion\""),
        "kubectl reached the API server: {log}"
    );
    let seen = kube.requests();
    assert!(
        seen.iter()
            .any(|r| r.path.starts_with("/version") && r.token.as_deref() == Some("prod-token")),
        "{seen:?}"
    );
    assert!(
        seen.iter().all(|r| r.token.as_deref() != Some("dev-token")),
        "only the configured context was used: {seen:?}"
    );
    // What the job did to its copy did not touch the operator's file.
    assert_eq!(std::fs::read_to_string(&kubeconfig).unwrap(), original);
}

backend_tests!(jobs_naming_a_cluster_go_only_to_runners_that_have_it);

async fn jobs_naming_a_cluster_go_only_to_runners_that_have_it(backend: Backend) {
    let db = test_db!(backend);
    let server = TestServer::start(&db, &[]).await;
    let client = server.client();
    let register = |name: &'static str, clusters: Vec<String>| {
        let server = &server;
        async move {
            let reg = server.client_with(Some(server.registration_token().await));
            let answer = reg
                .register(&RegisterRequest {
                    name: name.into(),
                    labels: vec!["linux".into()],
                    version: String::new(),
                    os: String::new(),
                    arch: String::new(),
                    clusters,
                })
                .await
                .unwrap_or_else(|e| panic!("registering {name}: {e}"));
            server.client_with(Some(answer.runner_token))
        }
    };
    let without = register("no-cluster", vec![]).await;
    let staging = register("staging-only", vec!["aks-staging".into()]).await;
    let prod = register("prod", vec!["aks-prod".into()]).await;

    let me = prod.runner_me().await.expect("GET /runner/me");
    assert_eq!(me.name, "prod");
    assert_eq!(
        me.labels,
        vec!["linux".to_string(), "cluster:aks-prod".to_string()]
    );

    let yaml = "jobs:\n  deploy:\n    runs_on: [linux]\n    cluster: aks-prod\n    steps:\n      - run: echo hi\n";
    let run = apply_and_trigger(&client, "to-prod", yaml, &[]).await;
    let queued = job(&run, "deploy");
    assert_eq!(
        queued.runs_on,
        vec!["linux".to_string(), "cluster:aks-prod".to_string()]
    );
    for (name, other) in [("no-cluster", &without), ("staging-only", &staging)] {
        let got = other
            .acquire(Duration::from_secs(1))
            .await
            .unwrap_or_else(|e| panic!("acquire as {name}: {e}"));
        assert!(
            got.is_none(),
            "{name} must not get the aks-prod job: {got:?}"
        );
    }
    let got = prod
        .acquire(Duration::from_secs(10))
        .await
        .expect("acquire as prod")
        .expect("the runner with aks-prod gets the job");
    assert_eq!(got.job.id, queued.id);
    assert_eq!(got.job.cluster.as_deref(), Some("aks-prod"));
    let now = client.get_job(queued.id).await.expect("GET job");
    assert_eq!(now.status, JobStatus::Running);

    // A malformed cluster name is refused at registration.
    let reg = server.client_with(Some(server.registration_token().await));
    let err = reg
        .register(&RegisterRequest {
            name: "bad".into(),
            labels: vec![],
            version: String::new(),
            os: String::new(),
            arch: String::new(),
            clusters: vec!["aks prod".into()],
        })
        .await
        .expect_err("a cluster name with a space is refused");
    assert_eq!(err.status().map(|s| s.as_u16()), Some(400), "{err}");
}

/// A config dir registered with `server` as runner `doctor`, with `runner.toml` = `runner_toml`.
async fn registered_config(server: &TestServer, runner_toml: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("outpost-doctor-")
        .tempdir()
        .unwrap();
    std::fs::write(dir.path().join("runner.toml"), runner_toml).unwrap();
    let token = server.registration_token().await;
    let out = run_runner(
        &[
            "register",
            "--server",
            server.url(),
            "--token",
            &token,
            "--name",
            "doctor",
        ],
        dir.path(),
        &[],
    )
    .await;
    assert!(out.status.success(), "register: {}", text(&out));
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_explains_dns_tls_and_token_failures() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    let server = TestServer::start(&db, &[]).await;
    let identity = IdentityStandIn::start().await;
    let kube = KubeStandIn::start().await;
    // The identity stand-in's default minter issues `idt_…` tokens; the API server takes them.
    kube.accept_tokens_where(Some(Arc::new(|token: &str| token.starts_with("idt_"))));
    let other_ca = TestCa::new("some other CA");
    let files = tempfile::tempdir().unwrap();
    let right_ca = files.path().join("right-ca.pem");
    std::fs::write(&right_ca, kube.ca_pem()).unwrap();
    let wrong_ca = other_ca.write_pem(&files.path().join("wrong-ca.pem"));
    let cluster = |server_url: &str, ca: &Path| {
        format!(
            "[clusters.aks-prod]\nserver = \"{server_url}\"\nca_file = \"{}\"\nauth = \"managed_identity\"\n",
            ca.display()
        )
    };
    let env = identity.env();

    // All well: every step passes and doctor exits 0.
    let healthy = registered_config(&server, &cluster(&kube.url(), &right_ca)).await;
    let out = run_runner(&["doctor"], healthy.path(), &env).await;
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    for step in [
        "✔ Credentials: the server accepts this runner's token: runner doctor",
        "cluster:aks-prod",
        "✔ TLS: the API server's certificate is signed by the CA",
        "✔ Token: got an Entra ID token",
        "✔ API: GET /version with the token answered: Kubernetes v1.35.0",
        "All checks passed.",
    ] {
        assert!(all.contains(step), "missing {step:?} in\n{all}");
    }
    assert_eq!(identity.count(), 1, "doctor asked the stand-in for a token");

    // The API server's name does not resolve: the private DNS zone is the likely cause.
    let dns = registered_config(
        &server,
        &cluster(
            "https://aks-prod-1a2b.privatelink.westeurope.azmk8s.invalid",
            &right_ca,
        ),
    )
    .await;
    let out = run_runner(&["doctor"], dns.path(), &env).await;
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(
        all.contains("✘ DNS: aks-prod-1a2b.privatelink.westeurope.azmk8s.invalid does not resolve"),
        "{all}"
    );
    assert!(
        all.contains(
            "private DNS zone privatelink.westeurope.azmk8s.invalid not linked to this vNet"
        ),
        "{all}"
    );
    assert!(all.contains("- TCP: skipped"), "{all}");

    // The configured CA is not the one that signed the API server's certificate.
    let tls = registered_config(&server, &cluster(&kube.url(), &wrong_ca)).await;
    let out = run_runner(&["doctor"], tls.path(), &env).await;
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(all.contains("✔ TCP: connected to 127.0.0.1"), "{all}");
    assert!(all.contains("✘ TLS:"), "{all}");
    assert!(
        all.contains(&format!(
            "ca_file {} does not match the API server's certificate",
            wrong_ca.display()
        )),
        "{all}"
    );
    assert!(all.contains("- API: skipped"), "{all}");

    // The identity endpoint refuses: the error and what to check.
    identity.refuse(Some(Refusal::default()));
    let before = identity.count();
    let out = run_runner(&["doctor"], healthy.path(), &env).await;
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(all.contains("✘ Token: Entra ID gave no token"), "{all}");
    assert!(all.contains("system-assigned managed identity"), "{all}");
    assert!(all.contains("1 check failed"), "{all}");
    assert_eq!(
        identity.count(),
        before + 1,
        "the refusal came from the stand-in"
    );

    // The container health check asks only the server: it passes although the cluster's token
    // cannot be had, and asks the identity endpoint nothing.
    let before = identity.count();
    let out = run_runner(&["doctor", "--server-only"], healthy.path(), &env).await;
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(
        all.contains("✔ Credentials: the server accepts this runner's token"),
        "{all}"
    );
    assert!(!all.contains("Token:"), "{all}");
    assert_eq!(identity.count(), before, "no token was asked for");
    // With the server gone it fails.
    drop(server);
    let out = run_runner(&["doctor", "--server-only"], healthy.path(), &env).await;
    assert!(!out.status.success(), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_off_loopback_needs_an_explicit_opt_in() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "register",
        "--server",
        "http://0.0.0.0:1",
        "--token",
        "t",
        "--name",
        "r",
    ];
    let out = run_runner(&args, dir.path(), &[]).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is plain HTTP"), "{}", text(&out));
    assert!(
        stderr.contains("allow_insecure_http = true"),
        "{}",
        text(&out)
    );

    // With the opt-in the URL is accepted and the runner goes on to dial it (nothing listens).
    let opt_in = vec![(
        "OUTPOST_RUNNER__ALLOW_INSECURE_HTTP".to_string(),
        "true".to_string(),
    )];
    let out = run_runner(&args, dir.path(), &opt_in).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("could not register with http://0.0.0.0:1"),
        "{}",
        text(&out)
    );
}
