//! Issue #7's private-network end-to-end test: a cluster whose API only a vNet can reach, a
//! runner inside that vNet, and a server outside that never reaches in.
//!
//! Topology, made by the test with network namespaces (root):
//! - namespace `opv-<id>` plays the vNet, joined to the host by a veth pair on a /30 of
//!   `10.213.0.0/16`; a firewall inside admits from outside only traffic of connections the
//!   namespace opened, as for a VM without a public IP behind NAT;
//! - the Kubernetes API stand-in (HTTPS, its own CA, certificate for the private DNS name and the
//!   namespace's address) and the managed identity endpoint listen only inside the namespace;
//! - `outpost-server` listens on the host's veth address; the test drives it from the host;
//! - `outpost-runner` runs inside the namespace (`ip netns exec`), dials out to the server over
//!   plain HTTP (opted in with `allow_insecure_http`), and gets an Entra ID token for the cluster
//!   from the managed identity endpoint through its `kube-token` exec plugin.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_protocol::{RunStatus, TriggerRunRequest, types::StepStatus};
use outpost_tests::git::GitRepo;
use outpost_tests::identity::{Endpoint, IdentityStandIn};
use outpost_tests::kube::KubeStandIn;
use outpost_tests::netns::{self, PrivateNetwork};
use outpost_tests::{
    Backend, TestDb, TestServer, binary, describe_run, helm, job, job_log, wait_for_run,
};
use tokio::io::{AsyncBufReadExt, BufReader};

const KUBECTL: &str = "/usr/bin/kubectl";
/// The cluster's private DNS name, as AKS gives a private cluster.
const API_NAME: &str = "aks-e2e.privatelink.westeurope.azmk8s.io";
/// The application ID of the AKS server: the resource an Entra token for a cluster is for.
const AKS_RESOURCE: &str = "6dae42f8-4368-4678-94ff-3960e28e3630";
const NAMESPACE: &str = "vnet-apps";

const MANIFEST: &str = r#"apiVersion: v1
kind: Namespace
metadata:
  name: vnet-apps
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: api-settings
  namespace: vnet-apps
data:
  log_level: debug
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: api
  namespace: vnet-apps
spec:
  replicas: 2
  selector:
    matchLabels:
      app: api
  template:
    metadata:
      labels:
        app: api
    spec:
      containers:
        - name: api
          image: registry.example/api:1.0
"#;

const PIPELINE: &str = r#"
jobs:
  deploy:
    runs_on: [vnet]
    cluster: aks-e2e
    steps:
      - checkout
      - kubectl: apply -f k8s/
      - kubectl: rollout status deployment/api -n vnet-apps --timeout=60s
      - helm: upgrade --install web ./chart -n vnet-apps --set image.tag=${OUTPOST_SHA} --wait --timeout 60s
"#;

/// Whether the test can run here: if not, it says why and skips, or with `CI=true` panics.
fn can_run() -> bool {
    let Some(reason) = netns::unavailable() else {
        return true;
    };
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("the private-network test cannot run, and CI=true makes that a failure: {reason}");
    }
    eprintln!("skipping the private-network test: {reason}");
    false
}

/// A plain TCP connect from the host, bounded by `limit`: `Ok` if it connected.
async fn tcp_connect(addr: SocketAddr, limit: Duration) -> Result<(), String> {
    match tokio::time::timeout(limit, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("refused: {e}")),
        Err(_) => Err(format!("timed out after {limit:?}")),
    }
}

/// Runs `program args` with `env` to its end (at most two minutes): success, stdout, stderr.
async fn run(
    mut cmd: tokio::process::Command,
    env: &[(&str, &str)],
    what: &str,
) -> (bool, String, String) {
    cmd.envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("`{what}` did not finish within two minutes"))
        .unwrap_or_else(|e| panic!("could not run `{what}`: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `outpost-runner` inside the namespace, with only the environment the test gives it.
fn runner_command(network: &PrivateNetwork, env: &[(String, String)]) -> tokio::process::Command {
    let mut cmd = network.command(&binary("outpost-runner"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("OUTPOST") {
            cmd.env_remove(key);
        }
    }
    cmd.env("NO_COLOR", "1")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    cmd
}

/// What a child process printed, kept so that a failing assertion can show it.
#[derive(Clone, Default)]
struct Output(Arc<Mutex<Vec<String>>>);

impl Output {
    /// Copies `out`'s lines in as they come.
    fn keep(&self, out: impl tokio::io::AsyncRead + Unpin + Send + 'static) {
        let lines = self.0.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(out).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
    }

    fn text(&self) -> String {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).join("\n")
    }
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_inside_a_closed_vnet_deploys_to_its_private_cluster() {
    if !can_run() {
        return;
    }
    let started = Instant::now();
    let mark = |what: &str| eprintln!("private-network e2e: {what} at {:.1?}", started.elapsed());
    // Dropped last (declared first): kills what still runs inside, deletes the namespace.
    let network = PrivateNetwork::create();
    let ns_ip = network.ns_ip();
    let api_addr = SocketAddr::from((ns_ip, 6443));

    // The vNet's services, bound inside the namespace from this process.
    let identity = Arc::new(
        IdentityStandIn::start_with_listener(
            network
                .bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
                .expect("the managed identity endpoint can listen inside the namespace"),
        )
        .await,
    );
    let kube = KubeStandIn::builder()
        .listener(
            network
                .bind(api_addr)
                .expect("the API stand-in can listen inside the namespace"),
        )
        .dns_name(API_NAME)
        .start()
        .await;
    // The API lets in exactly the tokens the managed identity endpoint handed out.
    kube.accept_only(&[]);
    let minted = identity.clone();
    kube.accept_tokens_where(Some(Arc::new(move |token: &str| {
        minted
            .requests()
            .iter()
            .any(|r| r.token.as_deref() == Some(token))
    })));
    network.write_hosts(&[(ns_ip, API_NAME)]);
    network.admit_only_established_from_outside();
    let rules = network.input_rules();
    assert!(
        rules.contains("ESTABLISHED") && rules.contains("-j DROP"),
        "{rules}"
    );

    // The server, outside, on the host's end of the veth pair.
    let db = TestDb::new(Backend::Sqlite)
        .await
        .expect("a SQLite database can always be made");
    let listen = format!("{}:0", network.host_ip());
    let server = TestServer::start(&db, &[("OUTPOST__SERVER__LISTEN", &listen)]).await;
    assert!(
        server
            .url()
            .starts_with(&format!("http://{}:", network.host_ip())),
        "{}",
        server.url()
    );
    let client = server.client();

    mark("the topology is up");
    // (1) Nothing outside opens a connection into the vNet, not even to a listening port.
    let dropped_before = network.dropped_packets();
    let probe = tcp_connect(api_addr, Duration::from_secs(2)).await;
    assert!(
        probe.is_err(),
        "the host connected to the private API at {api_addr}"
    );
    assert!(
        network.dropped_packets() > dropped_before,
        "the firewall dropped nothing; the probe ended: {probe:?}\n{}",
        network.iptables(&["-L", "INPUT", "-v", "-n", "-x"])
    );
    assert_eq!(kube.requests().len(), 0);
    assert_eq!(
        kube.tls_handshake_failures(),
        0,
        "the probe reached the stand-in"
    );

    mark("the host's probe was dropped");
    // The runner, inside, registered with cluster aks-e2e (managed identity).
    let dir = tempfile::Builder::new()
        .prefix("outpost-e2e-vnet-")
        .tempdir()
        .expect("a temporary directory can be created");
    let config_dir = dir.path().join("config");
    let work_dir = dir.path().join("work");
    let home = dir.path().join("home");
    for d in [&config_dir, &work_dir, &home] {
        std::fs::create_dir_all(d).expect("the runner's directories can be made");
    }
    let ca_file = kube.write_ca(dir.path());
    std::fs::write(
        config_dir.join("runner.toml"),
        format!(
            "[clusters.aks-e2e]\nserver = \"https://{API_NAME}:6443\"\nca_file = \"{}\"\nauth = \"managed_identity\"\n",
            ca_file.display()
        ),
    )
    .expect("runner.toml can be written");
    let mut env: Vec<(String, String)> = vec![
        ("OUTPOST_RUNNER__ALLOW_INSECURE_HTTP".into(), "true".into()),
        (
            "OUTPOST_RUNNER__WORK_DIR".into(),
            work_dir.display().to_string(),
        ),
        ("OUTPOST_RUNNER__KUBECTL".into(), KUBECTL.into()),
        (
            "OUTPOST_RUNNER__HELM".into(),
            helm().await.display().to_string(),
        ),
        ("HOME".into(), home.display().to_string()),
    ];
    env.extend(identity.env());
    assert!(
        identity
            .identity_endpoint()
            .starts_with("http://127.0.0.1:"),
        "{}",
        identity.identity_endpoint()
    );

    let registration = server.registration_token().await;
    let mut register = runner_command(&network, &env);
    register
        .args([
            "register",
            "--server",
            server.url(),
            "--token",
            &registration,
        ])
        .args(["--name", "vnet-runner", "--labels", "vnet", "--config-dir"])
        .arg(&config_dir);
    let (ok, stdout, stderr) = run(register, &[], "outpost-runner register").await;
    assert!(
        ok,
        "registering from inside the vNet failed:\n{stdout}\n{stderr}"
    );

    let output = Output::default();
    let mut runner = runner_command(&network, &env);
    runner
        .arg("run")
        .arg("--config-dir")
        .arg(&config_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut runner = runner
        .spawn()
        .unwrap_or_else(|e| panic!("could not start the runner inside the namespace: {e}"));
    output.keep(runner.stdout.take().expect("stdout is piped"));
    output.keep(runner.stderr.take().expect("stderr is piped"));

    mark("the runner registered");
    // (2) A pipeline started through the server's API, from the host, deploys through it.
    let repo = GitRepo::new();
    repo.copy_dir(&fixtures().join("chart"), "chart");
    repo.write(&[("k8s/app.yaml", MANIFEST)]);
    let sha = repo.commit("the app's manifest and chart");
    client
        .apply_pipeline("deploy-private", PIPELINE)
        .await
        .expect("the pipeline applies");
    let queued = client
        .trigger_run(
            "deploy-private",
            &TriggerRunRequest {
                sha: Some(sha.clone()),
                clone_url: Some(repo.file_url()),
                ..Default::default()
            },
        )
        .await
        .expect("the run is queued");
    let run_done = wait_for_run(&client, queued.id, Duration::from_secs(240)).await;
    let deploy = job(&run_done, "deploy");
    let log = String::from_utf8_lossy(&job_log(&client, deploy.id).await).into_owned();
    assert_eq!(
        run_done.status,
        RunStatus::Succeeded,
        "{}\n{log}\nrunner:\n{}\nserver:\n{}",
        describe_run(&run_done),
        output.text(),
        server.output()
    );
    assert!(
        deploy
            .steps
            .iter()
            .all(|s| s.status == StepStatus::Succeeded),
        "{log}"
    );
    assert!(log.contains("Cluster: aks-e2e"), "{log}");
    assert!(log.contains("configmap/api-settings created"), "{log}");
    assert!(log.contains("deployment.apps/api created"), "{log}");
    assert!(log.contains("STATUS: deployed"), "{log}");

    mark("the run succeeded");
    // (3) The stand-ins recorded it: one managed identity token request for the AKS resource,
    // and every API request carried exactly that token.
    let token_requests = identity.requests();
    assert_eq!(token_requests.len(), 1, "{token_requests:#?}");
    let minted = &token_requests[0];
    assert_eq!(minted.endpoint, Endpoint::ManagedIdentity);
    assert_eq!(minted.audience, AKS_RESOURCE);
    assert_eq!(minted.status, 200);
    let token = minted.token.clone().expect("a token was handed out");
    let requests = kube.requests();
    assert!(requests.len() > 10, "{requests:#?}");
    assert!(
        requests.iter().all(|r| r.token.as_deref() == Some(&token)),
        "a request without the minted token: {requests:#?}"
    );
    // 404s are the tools looking before they create; no request was refused.
    assert!(
        requests.iter().all(|r| r.status != 401 && r.status != 403),
        "{requests:#?}"
    );
    for agent in ["kubectl/", "Helm/"] {
        assert!(
            requests.iter().any(|r| r
                .user_agent
                .as_deref()
                .is_some_and(|a| a.starts_with(agent))),
            "no request from {agent}: {requests:#?}"
        );
    }
    let wrote = |path: &str| {
        requests.iter().any(|r| {
            matches!(r.method.as_str(), "POST" | "PATCH" | "PUT") && r.path.starts_with(path)
        })
    };
    assert!(
        wrote("/api/v1/namespaces/vnet-apps/configmaps"),
        "{requests:#?}"
    );
    assert!(
        wrote("/apis/apps/v1/namespaces/vnet-apps/deployments"),
        "{requests:#?}"
    );
    assert!(
        wrote("/api/v1/namespaces/vnet-apps/secrets"),
        "{requests:#?}"
    );

    let settings = kube
        .object("configmaps", Some(NAMESPACE), "api-settings")
        .expect("the manifest's ConfigMap is stored");
    assert_eq!(settings["data"]["log_level"], "debug");
    let api = kube
        .object("deployments.apps", Some(NAMESPACE), "api")
        .expect("the manifest's Deployment is stored");
    assert_eq!(api["spec"]["replicas"], 2);
    let web = kube
        .object("deployments.apps", Some(NAMESPACE), "web")
        .expect("the release's Deployment is stored");
    assert_eq!(
        web["spec"]["template"]["spec"]["containers"][0]["image"],
        format!("registry.example/web:{sha}")
    );
    let releases: Vec<_> = kube
        .objects("secrets", Some(NAMESPACE))
        .into_iter()
        .filter(|s| s["type"] == "helm.sh/release.v1")
        .map(|s| {
            let labels = &s["metadata"]["labels"];
            (
                labels["name"].as_str().unwrap_or_default().to_string(),
                labels["version"].as_str().unwrap_or_default().to_string(),
                labels["status"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(
        releases,
        [("web".to_string(), "1".to_string(), "deployed".to_string())]
    );

    // (1) again, after the run and with the very token that worked: kubectl from the host
    // (the seed's "kubectl from your local terminal") cannot reach the API, while the same
    // kubeconfig works from inside the vNet.
    let seen = kube.requests().len();
    let kubeconfig = dir.path().join("host-kubeconfig");
    std::fs::write(
        &kubeconfig,
        kube.kubeconfig_for(&format!("https://{api_addr}"), &token),
    )
    .expect("the kubeconfig can be written");
    let kubeconfig = kubeconfig.display().to_string();
    let args = [
        "--kubeconfig",
        kubeconfig.as_str(),
        "--request-timeout=2s",
        "get",
        "configmap",
        "api-settings",
        "-n",
        NAMESPACE,
        "-o",
        "name",
    ];
    let dropped_before = network.dropped_packets();
    let mut from_host = tokio::process::Command::new(KUBECTL);
    from_host.args(args);
    let (ok, stdout, stderr) = run(
        from_host,
        &[("HOME", &home.display().to_string())],
        "kubectl from the host",
    )
    .await;
    assert!(
        !ok,
        "kubectl from the host reached the private API:\n{stdout}"
    );
    // It timed out: the firewall dropped its packets (a refusal would need an answer).
    assert!(stderr.contains(&api_addr.to_string()), "{stderr}");
    assert!(
        stderr.contains("deadline exceeded") || stderr.contains("timeout"),
        "{stderr}"
    );
    assert_eq!(
        kube.requests().len(),
        seen,
        "kubectl from the host reached the stand-in"
    );
    assert_eq!(
        kube.tls_handshake_failures(),
        0,
        "kubectl from the host reached the stand-in"
    );
    assert!(network.dropped_packets() > dropped_before);
    mark(&format!(
        "kubectl from the host failed ({})",
        stderr.trim().lines().last().unwrap_or_default()
    ));
    let mut from_inside = network.command(Path::new(KUBECTL));
    from_inside.args(args);
    let (ok, stdout, stderr) = run(
        from_inside,
        &[("HOME", &home.display().to_string())],
        "kubectl inside the vNet",
    )
    .await;
    assert!(
        ok,
        "the same kubeconfig fails inside the vNet too: {stderr}"
    );
    assert_eq!(stdout.trim(), "configmap/api-settings");

    mark("kubectl inside succeeded");
    // (4) The firewall stayed in force for the whole run, and still refuses.
    assert_eq!(network.input_rules(), rules);
    let dropped_before = network.dropped_packets();
    assert!(tcp_connect(api_addr, Duration::from_secs(2)).await.is_err());
    assert!(network.dropped_packets() > dropped_before);
    let server_port: u16 = server
        .url()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the server URL has a port");

    let _ = runner.kill().await;
    eprintln!(
        "private-network e2e: server on {}:{server_port}, API on {api_addr} ({API_NAME}), {} API requests, {} packets dropped, {:.1?} in all",
        network.host_ip(),
        requests.len(),
        network.dropped_packets(),
        started.elapsed()
    );
}
