//! The Kubernetes API stand-in against the real clients: `kubectl` (`/usr/bin/kubectl`) and
//! `helm` (from `scripts/install-helm`), over HTTPS with the stand-in's own CA and a bearer
//! token, asserting on what the stand-in recorded and stored, not only on exit codes; and once
//! through the whole product (server, runner, pipeline steps) for SQLite and PostgreSQL.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use outpost_tests::git::GitRepo;
use outpost_tests::kube::{DEFAULT_TOKEN, KubeRequest, KubeStandIn};
use outpost_tests::outpost_protocol::{RunStatus, StepStatus, TriggerRunRequest};
use outpost_tests::{
    Backend, TestRunner, TestServer, backend_tests, helm, job, job_log, test_db, wait_for_run,
};
use serde_json::Value;
use tempfile::TempDir;

backend_tests!(a_pipeline_deploys_through_the_runner_and_rolls_back_a_stalled_release);

const KUBECTL: &str = "/usr/bin/kubectl";
/// How long one `kubectl` or `helm` call may take (debug-built stand-in, busy machine).
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// What a finished tool call gave.
struct Output {
    success: bool,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "success: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.success, self.stdout, self.stderr
        )
    }
}

/// A test's own home for the tools (kubectl's discovery cache, helm's configuration) and a
/// kubeconfig for the stand-in.
struct Tools {
    dir: TempDir,
    kubeconfig: PathBuf,
}

impl Tools {
    fn new(kube: &KubeStandIn, token: &str) -> Tools {
        let dir = tempfile::Builder::new()
            .prefix("outpost-kube-standin-")
            .tempdir()
            .expect("a temporary directory can be created");
        let kubeconfig = kube.write_kubeconfig(dir.path(), token);
        Tools { dir, kubeconfig }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, text).expect("a manifest can be written");
        path
    }

    async fn run(&self, program: &Path, args: &[&str]) -> Output {
        let home = self.path("home");
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", &home)
            .env("XDG_CACHE_HOME", home.join(".cache"))
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env("XDG_DATA_HOME", home.join(".local/share"))
            .env("KUBECONFIG", &self.kubeconfig)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(TOOL_TIMEOUT, cmd.output())
            .await
            .unwrap_or_else(|_| panic!("{} {args:?} did not finish in time", program.display()))
            .unwrap_or_else(|e| panic!("{} could not be started: {e}", program.display()));
        Output {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    async fn kubectl(&self, args: &[&str]) -> Output {
        self.run(Path::new(KUBECTL), args).await
    }

    async fn kubectl_ok(&self, args: &[&str]) -> Output {
        let out = self.kubectl(args).await;
        assert!(out.success, "kubectl {args:?} failed:\n{out}");
        out
    }

    async fn helm_ok(&self, args: &[&str]) -> Output {
        let out = self.run(&helm().await, args).await;
        assert!(out.success, "helm {args:?} failed:\n{out}");
        out
    }
}

fn writes(requests: &[KubeRequest]) -> Vec<&KubeRequest> {
    requests
        .iter()
        .filter(|r| matches!(r.method.as_str(), "POST" | "PUT" | "PATCH" | "DELETE"))
        .collect()
}

fn describe(requests: &[&KubeRequest]) -> String {
    requests
        .iter()
        .map(|r| format!("{} {}?{} -> {}", r.method, r.path, r.query, r.status))
        .collect::<Vec<_>>()
        .join("\n")
}

const SHOP: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
  namespace: shop
data:
  greeting: hello
  colour: blue
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
  labels:
    app: web
spec:
  replicas: 2
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      containers:
        - name: web
          image: registry.example/web:1.0
          ports:
            - containerPort: 8080
          env:
            - name: GREETING
              valueFrom:
                configMapKeyRef:
                  name: settings
                  key: greeting
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  selector:
    app: web
  ports:
    - port: 80
      targetPort: 8080
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_applies_gets_reapplies_and_deletes() {
    let kube = KubeStandIn::start().await;
    let tools = Tools::new(&kube, DEFAULT_TOKEN);
    let manifest = tools.write("shop.yaml", SHOP);
    let manifest = manifest.to_str().expect("a UTF-8 path");

    // First apply: everything is created, over HTTPS with the token, validated by the server.
    let out = tools.kubectl_ok(&["apply", "-f", manifest]).await;
    for line in [
        "namespace/shop created",
        "configmap/settings created",
        "deployment.apps/web created",
        "service/web created",
    ] {
        assert!(out.stdout.contains(line), "{out}");
    }
    let requests = kube.requests();
    let created = writes(&requests);
    assert_eq!(
        created
            .iter()
            .map(|r| (r.method.as_str(), r.path.as_str(), r.status))
            .collect::<Vec<_>>(),
        [
            ("POST", "/api/v1/namespaces", 201),
            ("POST", "/api/v1/namespaces/shop/configmaps", 201),
            ("POST", "/apis/apps/v1/namespaces/shop/deployments", 201),
            ("POST", "/api/v1/namespaces/shop/services", 201),
        ],
        "{}",
        describe(&created)
    );
    for r in &created {
        assert_eq!(r.token.as_deref(), Some(DEFAULT_TOKEN), "{r:?}");
        assert!(r.body_size > 0, "{r:?}");
        assert_eq!(r.content_type.as_deref(), Some("application/json"), "{r:?}");
        // The OpenAPI v3 documents told kubectl that the server validates fields.
        assert_eq!(
            r.query_param("fieldValidation").as_deref(),
            Some("Strict"),
            "{r:?}"
        );
    }
    assert!(requests.iter().all(|r| r.status != 401), "{requests:?}");

    let deployment = kube
        .object("deployments.apps", Some("shop"), "web")
        .expect("the deployment is stored");
    assert_eq!(deployment["metadata"]["generation"], 1);
    assert_eq!(deployment["status"]["readyReplicas"], 2);
    assert!(
        deployment["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
            .is_string(),
        "{deployment:#}"
    );
    let service = kube
        .object("services", Some("shop"), "web")
        .expect("the service is stored");
    assert!(
        service["spec"]["clusterIP"]
            .as_str()
            .is_some_and(|ip| ip.starts_with("10.96."))
    );

    // kubectl get reads back what was stored.
    let out = tools
        .kubectl_ok(&[
            "get",
            "-n",
            "shop",
            "configmap/settings",
            "deployment/web",
            "-o",
            "json",
        ])
        .await;
    let list: Value = serde_json::from_str(&out.stdout).expect("kubectl printed JSON");
    let items = list["items"].as_array().expect("a list");
    assert_eq!(items.len(), 2, "{list:#}");
    assert_eq!(items[0]["data"]["greeting"], "hello");
    assert_eq!(
        items[1]["spec"]["template"]["spec"]["containers"][0]["image"],
        "registry.example/web:1.0"
    );
    assert_eq!(items[1]["metadata"]["uid"], deployment["metadata"]["uid"]);
    // People see the server's Table columns, as from a real cluster.
    let out = tools
        .kubectl_ok(&["get", "deployments", "-n", "shop"])
        .await;
    let mut lines = out.stdout.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"],
        "{out}"
    );
    let row: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(row[..4], ["web", "2/2", "2", "2"], "{out}");
    let out = tools
        .kubectl_ok(&["get", "configmaps", "-A", "-l", "app!=x", "-o", "name"])
        .await;
    assert_eq!(out.stdout.trim(), "configmap/settings", "{out}");

    // Applying the same manifest again changes nothing.
    let before = kube.requests().len();
    let out = tools.kubectl_ok(&["apply", "-f", manifest]).await;
    assert!(
        out.stdout.contains("deployment.apps/web unchanged"),
        "{out}"
    );
    let again = kube.requests();
    assert!(
        writes(&again[before..]).is_empty(),
        "{}",
        describe(&writes(&again[before..]))
    );
    let same = kube
        .object("deployments.apps", Some("shop"), "web")
        .expect("still stored");
    assert_eq!(
        same["metadata"]["resourceVersion"],
        deployment["metadata"]["resourceVersion"]
    );

    // A changed manifest is applied as strategic merge patches that keep what they do not
    // mention: the container's env survives a new image.
    let changed = SHOP
        .replace("web:1.0", "web:2.0")
        .replace("colour: blue", "size: large");
    let manifest2 = tools.write("shop2.yaml", &changed);
    let before = kube.requests().len();
    let out = tools
        .kubectl_ok(&["apply", "-f", manifest2.to_str().expect("a UTF-8 path")])
        .await;
    assert!(
        out.stdout.contains("deployment.apps/web configured"),
        "{out}"
    );
    assert!(
        out.stdout.contains("configmap/settings configured"),
        "{out}"
    );
    assert!(out.stdout.contains("service/web unchanged"), "{out}");
    let requests = kube.requests();
    let patches = writes(&requests[before..]);
    assert_eq!(patches.len(), 2, "{}", describe(&patches));
    for r in &patches {
        assert_eq!(r.method, "PATCH");
        assert_eq!(r.status, 200);
        assert_eq!(
            r.content_type.as_deref(),
            Some("application/strategic-merge-patch+json")
        );
    }
    let deployment = kube
        .object("deployments.apps", Some("shop"), "web")
        .expect("stored");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], "registry.example/web:2.0");
    assert_eq!(container["env"][0]["name"], "GREETING", "{deployment:#}");
    assert_eq!(deployment["metadata"]["generation"], 2);
    assert_eq!(deployment["status"]["observedGeneration"], 2);
    let settings = kube
        .object("configmaps", Some("shop"), "settings")
        .expect("stored");
    assert_eq!(
        settings["data"],
        serde_json::json!({"greeting": "hello", "size": "large"}),
        "the key the manifest dropped is gone: {settings:#}"
    );

    // A server-side dry run goes to the server and stores nothing.
    let before = kube.requests().len();
    tools
        .kubectl_ok(&[
            "delete",
            "configmap",
            "settings",
            "-n",
            "shop",
            "--dry-run=server",
        ])
        .await;
    assert!(
        kube.object("configmaps", Some("shop"), "settings")
            .is_some()
    );
    let dry = kube.requests();
    assert!(
        dry[before..]
            .iter()
            .any(|r| r.method == "DELETE" && r.status == 200 && r.body_size > 0),
        "{:?}",
        &dry[before..]
    );

    // Deleting the manifest's objects removes them.
    let out = tools
        .kubectl_ok(&["delete", "-f", manifest2.to_str().expect("a UTF-8 path")])
        .await;
    assert!(
        out.stdout.contains("deployment.apps \"web\" deleted"),
        "{out}"
    );
    assert!(
        kube.object("deployments.apps", Some("shop"), "web")
            .is_none()
    );
    assert!(kube.object("namespaces", None, "shop").is_none());
    assert!(kube.objects("configmaps", Some("shop")).is_empty());
    let out = tools
        .kubectl(&["get", "configmap", "settings", "-n", "shop"])
        .await;
    assert!(!out.success, "{out}");
    assert!(out.stderr.contains("not found"), "{out}");
}

const ROLLOUT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: api
  namespace: default
spec:
  replicas: 3
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
          image: registry.example/api:1
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_rollout_status_follows_the_deployment_status() {
    let kube = KubeStandIn::start().await;
    let tools = Tools::new(&kube, DEFAULT_TOKEN);
    let manifest = tools.write("api.yaml", ROLLOUT);
    tools
        .kubectl_ok(&["apply", "-f", manifest.to_str().expect("a UTF-8 path")])
        .await;

    let out = tools
        .kubectl_ok(&[
            "rollout",
            "status",
            "deployment/api",
            "-n",
            "default",
            "--timeout=60s",
        ])
        .await;
    assert!(out.stdout.contains("successfully rolled out"), "{out}");
    let requests = kube.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.path == "/apis/apps/v1/namespaces/default/deployments"
                && r.query_param("fieldSelector").as_deref() == Some("metadata.name=api")),
        "rollout status lists or watches the deployment by name: {requests:#?}"
    );

    // A deployment whose status says a replica is not yet updated is not rolled out: the
    // success above came from the status the stand-in reported, not from kubectl giving up.
    tools
        .kubectl_ok(&[
            "patch",
            "deployment",
            "api",
            "-n",
            "default",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"updatedReplicas":2}}"#,
        ])
        .await;
    let stored = kube
        .object("deployments.apps", Some("default"), "api")
        .expect("stored");
    assert_eq!(stored["status"]["updatedReplicas"], 2, "{stored:#}");
    let out = tools
        .kubectl(&[
            "rollout",
            "status",
            "deployment/api",
            "-n",
            "default",
            "--timeout=5s",
        ])
        .await;
    assert!(!out.success, "{out}");
    assert!(
        out.stdout
            .contains("2 out of 3 new replicas have been updated"),
        "{out}"
    );
    let watches = kube
        .requests()
        .into_iter()
        .filter(|r| r.query_param("watch").as_deref() == Some("true"))
        .count();
    assert!(watches > 0, "kubectl waited with a watch");

    // Scaling goes through the scale subresource and is rolled out at once.
    let out = tools
        .kubectl_ok(&["scale", "deployment/api", "-n", "default", "--replicas=5"])
        .await;
    assert!(out.stdout.contains("deployment.apps/api scaled"), "{out}");
    let scaled = kube
        .object("deployments.apps", Some("default"), "api")
        .expect("stored");
    assert_eq!(scaled["spec"]["replicas"], 5);
    assert_eq!(scaled["status"]["readyReplicas"], 5);
    assert!(
        kube.requests().iter().any(|r| r.method == "PATCH"
            && r.path.ends_with("/deployments/api/scale")
            && r.status == 200),
        "{:#?}",
        kube.requests()
    );

    // A new generation (here a new image) is rolled out again by the stand-in's controller.
    let changed = ROLLOUT.replace("api:1", "api:2");
    let manifest = tools.write("api2.yaml", &changed);
    tools
        .kubectl_ok(&["apply", "-f", manifest.to_str().expect("a UTF-8 path")])
        .await;
    let out = tools
        .kubectl_ok(&[
            "rollout",
            "status",
            "deployment/api",
            "-n",
            "default",
            "--timeout=60s",
        ])
        .await;
    assert!(out.stdout.contains("successfully rolled out"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_an_accepted_token_or_the_ca_are_refused() {
    let kube = KubeStandIn::builder()
        .token("the-right-token")
        .start()
        .await;

    let wrong = Tools::new(&kube, "a-wrong-token");
    let out = wrong.kubectl(&["get", "configmaps", "-n", "default"]).await;
    assert!(!out.success, "{out}");
    assert!(
        out.stderr.contains("Unauthorized") || out.stderr.contains("must be logged in"),
        "{out}"
    );
    let requests = kube.requests();
    assert!(!requests.is_empty());
    for r in &requests {
        assert_eq!(r.status, 401, "{r:?}");
        assert_eq!(r.token.as_deref(), Some("a-wrong-token"), "{r:?}");
    }

    // The right token gets in (and may do anything); a token refused later is refused from
    // then on.
    let right = Tools::new(&kube, "the-right-token");
    right
        .kubectl_ok(&["get", "configmaps", "-n", "default"])
        .await;
    let out = right
        .kubectl_ok(&["auth", "can-i", "create", "deployments"])
        .await;
    assert_eq!(out.stdout.trim(), "yes", "{out}");
    kube.refuse_token("the-right-token");
    let out = right.kubectl(&["get", "configmaps", "-n", "default"]).await;
    assert!(!out.success, "{out}");
    assert_eq!(kube.requests().last().map(|r| r.status), Some(401));

    // A rule of the test's own lets in the tokens it likes, and only those.
    kube.accept_only(&[]);
    kube.accept_tokens_where(Some(std::sync::Arc::new(|t: &str| {
        t.starts_with("issued-")
    })));
    let issued = Tools::new(&kube, "issued-by-the-identity-stand-in");
    issued
        .kubectl_ok(&["get", "configmaps", "-n", "default"])
        .await;
    let out = right.kubectl(&["get", "configmaps", "-n", "default"]).await;
    assert!(!out.success, "{out}");
    kube.accept_tokens_where(None);
    let out = issued
        .kubectl(&["get", "configmaps", "-n", "default"])
        .await;
    assert!(!out.success, "{out}");

    // A client that trusts another CA does not get past TLS.
    kube.accept_token("the-right-token");
    let other = KubeStandIn::start().await;
    let tools = Tools::new(&kube, "the-right-token");
    let foreign = other.kubeconfig_for(&kube.url(), "the-right-token");
    std::fs::write(&tools.kubeconfig, foreign).expect("the kubeconfig can be replaced");
    let before = kube.requests().len();
    let out = tools.kubectl(&["get", "configmaps", "-n", "default"]).await;
    assert!(!out.success, "{out}");
    assert!(
        out.stderr.contains("x509") || out.stderr.contains("certificate"),
        "{out}"
    );
    assert_eq!(kube.requests().len(), before, "no request got through");
    assert!(kube.tls_handshake_failures() > 0);
}

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join("chart")
}

/// The release secrets helm stored for `release`, as `(version, status)` sorted by version.
fn releases(kube: &KubeStandIn, namespace: &str, release: &str) -> Vec<(String, String)> {
    let mut found: Vec<(String, String)> = kube
        .objects("secrets", Some(namespace))
        .into_iter()
        .filter(|s| s["type"] == "helm.sh/release.v1" && s["metadata"]["labels"]["name"] == release)
        .map(|s| {
            let labels = &s["metadata"]["labels"];
            assert_eq!(labels["owner"], "helm", "{s:#}");
            (
                labels["version"].as_str().unwrap_or_default().to_string(),
                labels["status"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    found.sort();
    found
}

fn image(kube: &KubeStandIn) -> String {
    let deployment = kube
        .object("deployments.apps", Some("shop"), "web")
        .expect("the release's deployment is stored");
    deployment["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_installs_upgrades_rolls_back_and_uninstalls() {
    let kube = KubeStandIn::builder().namespace("shop").start().await;
    let tools = Tools::new(&kube, DEFAULT_TOKEN);
    // The fixture chart, with the Kubernetes version range many real charts declare.
    let chart = tools.path("chart");
    std::fs::create_dir_all(chart.join("templates")).expect("the chart directory can be made");
    for file in [
        "Chart.yaml",
        "values.yaml",
        "templates/configmap.yaml",
        "templates/deployment.yaml",
    ] {
        std::fs::copy(self::chart().join(file), chart.join(file)).expect("the chart can be copied");
    }
    let manifest = std::fs::read_to_string(chart.join("Chart.yaml")).expect("Chart.yaml");
    std::fs::write(
        chart.join("Chart.yaml"),
        format!("{manifest}kubeVersion: \">=1.25.0\"\n"),
    )
    .expect("Chart.yaml can be written");
    let chart = chart.to_str().expect("a UTF-8 path");
    let install = |tag: &'static str| {
        let tools = &tools;
        async move {
            tools
                .helm_ok(&[
                    "upgrade",
                    "--install",
                    "web",
                    chart,
                    "-n",
                    "shop",
                    "--wait",
                    "--timeout",
                    "90s",
                    "--set",
                    &format!("image.tag={tag}"),
                ])
                .await
        }
    };

    let out = install("v1").await;
    assert!(out.stdout.contains("STATUS: deployed"), "{out}");
    assert!(out.stdout.contains("REVISION: 1"), "{out}");
    assert_eq!(
        releases(&kube, "shop", "web"),
        [("1".into(), "deployed".into())]
    );
    assert_eq!(image(&kube), "registry.example/web:v1");
    let config = kube
        .object("configmaps", Some("shop"), "web-config")
        .expect("the chart's configmap is stored");
    assert_eq!(config["data"]["greeting"], "hello");
    // The release record is what helm wrote: a gzipped, base64-encoded release in `data`.
    let secret = kube
        .object("secrets", Some("shop"), "sh.helm.release.v1.web.v1")
        .expect("helm stored release 1 as a secret");
    let release = secret["data"]["release"].as_str().expect("release data");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(release)
        .expect("data is base64");
    assert!(!decoded.is_empty());

    let out = install("v2").await;
    assert!(out.stdout.contains("REVISION: 2"), "{out}");
    assert_eq!(
        releases(&kube, "shop", "web"),
        [
            ("1".into(), "superseded".into()),
            ("2".into(), "deployed".into())
        ]
    );
    assert_eq!(image(&kube), "registry.example/web:v2");
    let deployment = kube
        .object("deployments.apps", Some("shop"), "web")
        .expect("stored");
    assert_eq!(deployment["metadata"]["generation"], 2, "{deployment:#}");

    let out = tools.helm_ok(&["history", "web", "-n", "shop"]).await;
    let rows: Vec<&str> = out.stdout.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert!(
        rows[0].contains("superseded") && rows[1].contains("deployed"),
        "{out}"
    );

    tools
        .helm_ok(&[
            "rollback",
            "web",
            "1",
            "-n",
            "shop",
            "--wait",
            "--timeout",
            "90s",
        ])
        .await;
    assert_eq!(image(&kube), "registry.example/web:v1");
    assert_eq!(
        releases(&kube, "shop", "web"),
        [
            ("1".into(), "superseded".into()),
            ("2".into(), "superseded".into()),
            ("3".into(), "deployed".into())
        ]
    );

    tools.helm_ok(&["uninstall", "web", "-n", "shop"]).await;
    assert!(
        kube.object("deployments.apps", Some("shop"), "web")
            .is_none()
    );
    assert!(
        kube.object("configmaps", Some("shop"), "web-config")
            .is_none()
    );
    assert!(releases(&kube, "shop", "web").is_empty());

    // A release into a namespace helm creates itself (the typed client sends it as protobuf).
    let out = tools
        .helm_ok(&[
            "install",
            "api",
            chart,
            "-n",
            "fresh",
            "--create-namespace",
            "--wait",
        ])
        .await;
    assert!(out.stdout.contains("STATUS: deployed"), "{out}");
    let fresh = kube
        .object("namespaces", None, "fresh")
        .expect("helm created the namespace");
    assert_eq!(fresh["status"]["phase"], "Active");
    assert_eq!(
        releases(&kube, "fresh", "api"),
        [("1".into(), "deployed".into())]
    );

    // Helm spoke the API: release secrets found by label, objects applied server-side, and
    // every request carried the token.
    let requests = kube.requests();
    assert!(
        requests
            .iter()
            .all(|r| r.token.as_deref() == Some(DEFAULT_TOKEN))
    );
    assert!(requests.iter().all(|r| r.status < 500), "{requests:#?}");
    assert!(
        requests
            .iter()
            .any(|r| r.path == "/api/v1/namespaces/shop/secrets"
                && r.query_param("labelSelector")
                    .is_some_and(|s| s.contains("owner=helm"))),
        "{requests:#?}"
    );
    let methods: std::collections::BTreeSet<(&str, Option<&str>)> = requests
        .iter()
        .filter(|r| {
            r.path
                .starts_with("/apis/apps/v1/namespaces/shop/deployments")
        })
        .map(|r| (r.method.as_str(), r.content_type.as_deref()))
        .collect();
    assert!(
        methods.iter().any(|(m, _)| *m == "DELETE"),
        "helm deleted the deployment: {methods:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_apply_and_every_patch_type_change_the_stored_object() {
    let kube = KubeStandIn::start().await;
    let tools = Tools::new(&kube, DEFAULT_TOKEN);
    let first = tools.write(
        "cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: flags\n  namespace: default\n  \
         labels:\n    tier: web\ndata:\n  a: \"1\"\n  b: \"2\"\n",
    );
    let out = tools
        .kubectl_ok(&[
            "apply",
            "--server-side",
            "-f",
            first.to_str().expect("UTF-8"),
        ])
        .await;
    assert!(
        out.stdout.contains("configmap/flags serverside-applied"),
        "{out}"
    );
    let applied = kube.requests();
    let apply = applied
        .iter()
        .find(|r| r.method == "PATCH")
        .expect("kubectl sent the apply as a PATCH");
    assert_eq!(
        apply.content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    assert_eq!(
        apply.query_param("fieldManager").as_deref(),
        Some("kubectl")
    );
    assert_eq!(apply.status, 201, "an apply of a new object creates it");

    // Applying again without `b` removes what this field manager no longer applies.
    let second = tools.write(
        "cm2.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: flags\n  namespace: default\n  \
         labels:\n    tier: web\ndata:\n  a: \"1\"\n  c: \"3\"\n",
    );
    tools
        .kubectl_ok(&[
            "apply",
            "--server-side",
            "-f",
            second.to_str().expect("UTF-8"),
        ])
        .await;
    let data = |kube: &KubeStandIn| {
        kube.object("configmaps", Some("default"), "flags")
            .expect("stored")["data"]
            .clone()
    };
    assert_eq!(data(&kube), serde_json::json!({"a": "1", "c": "3"}));

    // JSON patch, merge patch and strategic merge patch, as `kubectl patch` sends them.
    tools
        .kubectl_ok(&[
            "patch",
            "configmap",
            "flags",
            "-n",
            "default",
            "--type=json",
            "-p",
            r#"[{"op":"add","path":"/data/d","value":"4"}]"#,
        ])
        .await;
    tools
        .kubectl_ok(&[
            "patch",
            "configmap",
            "flags",
            "-n",
            "default",
            "--type=merge",
            "-p",
            r#"{"data":{"a":null}}"#,
        ])
        .await;
    tools
        .kubectl_ok(&[
            "patch",
            "configmap",
            "flags",
            "-n",
            "default",
            "-p",
            r#"{"data":{"e":"5"}}"#,
        ])
        .await;
    assert_eq!(
        data(&kube),
        serde_json::json!({"c": "3", "d": "4", "e": "5"})
    );
    let types: Vec<String> = kube
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH")
        .filter_map(|r| r.content_type.clone())
        .collect();
    assert_eq!(
        types[2..],
        [
            "application/json-patch+json",
            "application/merge-patch+json",
            "application/strategic-merge-patch+json"
        ]
    );

    // A JSON patch that cannot apply is refused and changes nothing.
    let out = tools
        .kubectl(&[
            "patch",
            "configmap",
            "flags",
            "-n",
            "default",
            "--type=json",
            "-p",
            r#"[{"op":"remove","path":"/data/missing"}]"#,
        ])
        .await;
    assert!(!out.success, "{out}");
    assert_eq!(kube.requests().last().map(|r| r.status), Some(422));
    assert_eq!(
        data(&kube),
        serde_json::json!({"c": "3", "d": "4", "e": "5"})
    );

    // Labels select, creating twice conflicts, a server-side dry run stores nothing.
    tools
        .kubectl_ok(&[
            "label",
            "configmap",
            "flags",
            "-n",
            "default",
            "release=canary",
        ])
        .await;
    let out = tools
        .kubectl_ok(&[
            "get",
            "configmaps",
            "-n",
            "default",
            "-l",
            "tier in (web),release=canary",
            "-o",
            "name",
        ])
        .await;
    assert_eq!(out.stdout.trim(), "configmap/flags", "{out}");
    let out = tools
        .kubectl_ok(&[
            "get",
            "configmaps",
            "-n",
            "default",
            "-l",
            "release!=canary",
            "-o",
            "name",
        ])
        .await;
    assert_eq!(out.stdout.trim(), "", "{out}");
    let out = tools
        .kubectl(&[
            "create",
            "configmap",
            "flags",
            "-n",
            "default",
            "--from-literal=x=y",
        ])
        .await;
    assert!(
        !out.success && out.stderr.contains("configmaps \"flags\" already exists"),
        "{out}"
    );
    assert_eq!(kube.requests().last().map(|r| r.status), Some(409));
    tools
        .kubectl_ok(&[
            "create",
            "configmap",
            "ghost",
            "-n",
            "default",
            "--from-literal=x=y",
            "--dry-run=server",
        ])
        .await;
    assert!(
        kube.object("configmaps", Some("default"), "ghost")
            .is_none()
    );
    let last = kube.requests().pop().expect("a request");
    assert_eq!((last.method.as_str(), last.status), ("POST", 201));
    assert_eq!(last.query_param("dryRun").as_deref(), Some("All"));

    // A Secret's stringData is stored base64-encoded in data, as the real server does.
    tools
        .kubectl_ok(&[
            "create",
            "secret",
            "generic",
            "db",
            "-n",
            "default",
            "--from-literal=password=hunter2",
        ])
        .await;
    let secret = kube
        .object("secrets", Some("default"), "db")
        .expect("stored");
    assert_eq!(secret["data"]["password"], "aHVudGVyMg==");
    assert_eq!(secret["type"], "Opaque");

    // Objects in a namespace that does not exist are refused.
    let out = tools
        .kubectl(&[
            "create",
            "configmap",
            "lost",
            "-n",
            "nowhere",
            "--from-literal=x=y",
        ])
        .await;
    assert!(
        !out.success && out.stderr.contains("namespaces \"nowhere\" not found"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_watch_sees_changes_as_they_happen() {
    let kube = KubeStandIn::start().await;
    let tools = Tools::new(&kube, DEFAULT_TOKEN);
    tools
        .kubectl_ok(&[
            "create",
            "configmap",
            "before",
            "-n",
            "default",
            "--from-literal=x=1",
        ])
        .await;
    let home = tools.path("home");
    let mut watch = tokio::process::Command::new(KUBECTL)
        .args([
            "get",
            "configmaps",
            "-n",
            "default",
            "--watch",
            "--output-watch-events",
            "-o",
            "jsonpath={.type} {.object.metadata.name}{\"\\n\"}",
        ])
        .env_clear()
        .env("HOME", &home)
        .env("KUBECONFIG", &tools.kubeconfig)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("kubectl starts");
    let stdout = watch.stdout.take().expect("piped");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let mut next = async || {
        tokio::time::timeout(TOOL_TIMEOUT, lines.next_line())
            .await
            .expect("kubectl printed the next event in time")
            .expect("kubectl's output can be read")
            .expect("kubectl is still watching")
    };
    assert_eq!(next().await, "ADDED before");
    tools
        .kubectl_ok(&[
            "create",
            "configmap",
            "during",
            "-n",
            "default",
            "--from-literal=x=1",
        ])
        .await;
    assert_eq!(next().await, "ADDED during");
    tools
        .kubectl_ok(&["label", "configmap", "during", "-n", "default", "seen=yes"])
        .await;
    assert_eq!(next().await, "MODIFIED during");
    tools
        .kubectl_ok(&["delete", "configmap", "before", "-n", "default"])
        .await;
    assert_eq!(next().await, "DELETED before");
    let watches: Vec<KubeRequest> = kube
        .requests()
        .into_iter()
        .filter(|r| r.query_param("watch").as_deref() == Some("true"))
        .collect();
    assert!(
        !watches.is_empty(),
        "kubectl watched: {:?}",
        kube.requests()
    );
    assert!(watches.iter().all(|r| r.status == 200));
}

/// A network namespace made by the test, deleted when dropped (also when the test fails).
struct NetNs(String);

impl NetNs {
    fn new() -> NetNs {
        let name = format!("outpost-kube-{}", std::process::id());
        let ip = |args: &[&str]| {
            let status = std::process::Command::new("ip")
                .args(args)
                .status()
                .expect("the ip command runs (iproute2 is installed)");
            assert!(status.success(), "ip {args:?} failed (the test needs root)");
        };
        ip(&["netns", "add", &name]);
        let ns = NetNs(name);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
        ns
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_names_the_dns_name_and_the_stand_in_serves_inside_a_netns() {
    const NAME: &str = "aks-prod.privatelink.westeurope.azmk8s.io";
    let netns = NetNs::new();
    let listener = outpost_tests::kube::bind_in_netns(&netns.0, "127.0.0.1:0".parse().unwrap())
        .expect("a listener can be bound inside the namespace");
    let kube = KubeStandIn::builder()
        .listener(listener)
        .dns_name(NAME)
        .start()
        .await;
    let tools = Tools::new(&kube, DEFAULT_TOKEN);
    let kubectl = |args: &[&str]| {
        let mut all = vec!["netns", "exec", &netns.0, KUBECTL];
        all.extend_from_slice(args);
        all.into_iter().map(str::to_string).collect::<Vec<String>>()
    };
    let run_inside = async |args: &[&str]| {
        let args = kubectl(args);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        tools.run(Path::new("ip"), &args).await
    };

    // Inside the namespace kubectl reaches it, by IP and by the DNS name in the certificate.
    let out = run_inside(&["get", "namespaces", "-o", "name"]).await;
    assert!(
        out.success && out.stdout.contains("namespace/default"),
        "{out}"
    );
    let by_name = kube.kubeconfig_for(&kube.url(), DEFAULT_TOKEN).replace(
        "    server:",
        &format!("    tls-server-name: {NAME}\n    server:"),
    );
    std::fs::write(&tools.kubeconfig, &by_name).expect("the kubeconfig can be replaced");
    let out = run_inside(&["get", "namespaces", "-o", "name"]).await;
    assert!(out.success, "{out}");
    let wrong_name = by_name.replace(NAME, "aks-other.privatelink.westeurope.azmk8s.io");
    std::fs::write(&tools.kubeconfig, &wrong_name).expect("the kubeconfig can be replaced");
    let out = run_inside(&["get", "namespaces", "-o", "name"]).await;
    assert!(!out.success, "{out}");
    assert!(
        out.stderr.contains("x509") || out.stderr.contains("certificate"),
        "{out}"
    );

    // From the host, the same address reaches nothing.
    std::fs::write(&tools.kubeconfig, &by_name).expect("the kubeconfig can be replaced");
    let before = kube.requests().len();
    let out = tools
        .kubectl(&["get", "namespaces", "--request-timeout=5s"])
        .await;
    assert!(!out.success, "{out}");
    assert!(out.stderr.contains("refused"), "{out}");
    assert_eq!(kube.requests().len(), before);
    assert!(kube.requests().iter().all(|r| r.status == 200));
}

const WORKLOADS: &str = r#"
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: db
  namespace: default
spec:
  replicas: 2
  serviceName: db
  selector:
    matchLabels:
      app: db
  template:
    metadata:
      labels:
        app: db
    spec:
      containers:
        - name: db
          image: registry.example/db:16
---
apiVersion: batch/v1
kind: Job
metadata:
  name: migrate
  namespace: default
spec:
  template:
    spec:
      restartPolicy: Never
      containers:
        - name: migrate
          image: registry.example/migrate:1
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: data
  namespace: default
spec:
  accessModes: [ReadWriteOnce]
  resources:
    requests:
      storage: 1Gi
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statefulsets_jobs_and_claims_reach_the_states_tools_wait_for() {
    let kube = KubeStandIn::start().await;
    let tools = Tools::new(&kube, DEFAULT_TOKEN);
    let manifest = tools.write("workloads.yaml", WORKLOADS);
    tools
        .kubectl_ok(&["apply", "-f", manifest.to_str().expect("UTF-8")])
        .await;
    let out = tools
        .kubectl_ok(&[
            "rollout",
            "status",
            "statefulset/db",
            "-n",
            "default",
            "--timeout=60s",
        ])
        .await;
    assert!(
        out.stdout.contains("roll out complete") || out.stdout.contains("rolling update complete"),
        "{out}"
    );
    let out = tools
        .kubectl_ok(&[
            "wait",
            "--for=condition=complete",
            "job/migrate",
            "-n",
            "default",
            "--timeout=60s",
        ])
        .await;
    assert!(
        out.stdout.contains("job.batch/migrate condition met"),
        "{out}"
    );
    let out = tools
        .kubectl_ok(&[
            "wait",
            "--for=jsonpath={.status.phase}=Bound",
            "pvc/data",
            "-n",
            "default",
            "--timeout=60s",
        ])
        .await;
    assert!(out.stdout.contains("condition met"), "{out}");
    let job = kube
        .object("jobs.batch", Some("default"), "migrate")
        .expect("stored");
    assert_eq!(job["status"]["succeeded"], 1, "{job:#}");
    let db = kube
        .object("statefulsets.apps", Some("default"), "db")
        .expect("stored");
    assert_eq!(db["status"]["readyReplicas"], 2, "{db:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_rollout_fails_helm_wait_and_heals_when_released() {
    let kube = KubeStandIn::builder().namespace("shop").start().await;
    let tools = Tools::new(&kube, DEFAULT_TOKEN);
    let chart = chart();
    let chart = chart.to_str().expect("a UTF-8 path");
    tools
        .helm_ok(&[
            "upgrade",
            "--install",
            "web",
            chart,
            "-n",
            "shop",
            "--wait",
            "--timeout",
            "90s",
        ])
        .await;

    // Pods that cannot start: the upgrade's rollout never completes, helm gives up.
    kube.stall_rollouts(true);
    let out = tools
        .run(
            &helm().await,
            &[
                "upgrade",
                "--install",
                "web",
                chart,
                "-n",
                "shop",
                "--wait",
                "--timeout",
                "3s",
                "--set",
                "image.tag=broken",
            ],
        )
        .await;
    assert!(!out.success, "{out}");
    assert_eq!(
        releases(&kube, "shop", "web"),
        [
            ("1".into(), "deployed".into()),
            ("2".into(), "failed".into())
        ],
        "helm keeps the last good release deployed when an upgrade fails"
    );
    let out = tools
        .kubectl(&[
            "rollout",
            "status",
            "deployment/web",
            "-n",
            "shop",
            "--timeout=5s",
        ])
        .await;
    assert!(!out.success, "{out}");
    assert!(
        out.stdout.contains("0 of 1 updated replicas are available"),
        "{out}"
    );

    // A rollout waiting when the cluster heals sees it through its watch.
    let mut waiting = tokio::process::Command::new(KUBECTL)
        .args([
            "rollout",
            "status",
            "deployment/web",
            "-n",
            "shop",
            "--timeout=90s",
        ])
        .env_clear()
        .env("HOME", tools.path("home"))
        .env("KUBECONFIG", &tools.kubeconfig)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("kubectl starts");
    let mut first = String::new();
    let mut stdout = tokio::io::BufReader::new(waiting.stdout.take().expect("piped"));
    tokio::time::timeout(
        TOOL_TIMEOUT,
        tokio::io::AsyncBufReadExt::read_line(&mut stdout, &mut first),
    )
    .await
    .expect("kubectl reports that it waits")
    .expect("kubectl's output can be read");
    assert!(first.contains("Waiting for deployment"), "{first}");
    kube.stall_rollouts(false);
    let status = tokio::time::timeout(TOOL_TIMEOUT, waiting.wait())
        .await
        .expect("kubectl sees the rollout finish")
        .expect("kubectl can be waited for");
    assert!(status.success());
    let deployment = kube
        .object("deployments.apps", Some("shop"), "web")
        .expect("stored");
    assert_eq!(
        deployment["status"]["availableReplicas"], 1,
        "{deployment:#}"
    );
}

const PIPELINE: &str = r#"
variables: { NAMESPACE: web, RELEASE: web, WAIT: 60s }
jobs:
  deploy:
    runs_on: [e2e]
    steps:
      - checkout
      - kubectl: apply -f k8s/
      - helm: upgrade --install ${RELEASE} ./chart -n ${NAMESPACE} --set image.tag=${OUTPOST_SHA} --wait --timeout ${WAIT}
      - kubectl: rollout status deployment/${RELEASE} -n ${NAMESPACE} --timeout=60s
      - name: roll back
        when: on_failure
        helm: rollback ${RELEASE} -n ${NAMESPACE}
"#;

/// The whole product path against the stand-in: the server queues a run, the runner's
/// `kubectl` and `helm` steps deploy over HTTPS with the stand-in's CA and token, and a
/// release whose rollout stalls fails and is rolled back by the `on_failure` step.
async fn a_pipeline_deploys_through_the_runner_and_rolls_back_a_stalled_release(backend: Backend) {
    let db = test_db!(backend);
    let server = TestServer::start(&db, &[]).await;
    let client = server.client();
    let kube = KubeStandIn::builder().namespace("web").start().await;
    let tools = Tools::new(&kube, DEFAULT_TOKEN);
    let helm = helm().await;
    let env = [
        ("OUTPOST_RUNNER__KUBECTL", KUBECTL.to_string()),
        ("OUTPOST_RUNNER__HELM", helm.to_string_lossy().into_owned()),
        (
            "KUBECONFIG",
            tools.kubeconfig.to_string_lossy().into_owned(),
        ),
        ("HOME", tools.path("home").to_string_lossy().into_owned()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let _runner = TestRunner::start(&server, "e2e-kube", &["e2e"], &env).await;

    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let repo = GitRepo::new();
    repo.copy_dir(&fixtures.join("chart"), "chart");
    repo.copy_dir(&fixtures.join("k8s"), "k8s");
    let first = repo.commit("chart and manifests");
    client
        .apply_pipeline("deploy", PIPELINE)
        .await
        .expect("the pipeline applies");
    let trigger = |sha: &str, wait: &str| TriggerRunRequest {
        sha: Some(sha.to_string()),
        clone_url: Some(repo.file_url()),
        variables: [("WAIT".to_string(), wait.to_string())].into(),
        ..Default::default()
    };

    // A good deployment: the manifest applied, the release installed and rolled out.
    let queued = client
        .trigger_run("deploy", &trigger(&first, "60s"))
        .await
        .expect("the run is queued");
    let run = wait_for_run(&client, queued.id, Duration::from_secs(180)).await;
    let log = String::from_utf8_lossy(&job_log(&client, job(&run, "deploy").id).await).into_owned();
    assert_eq!(run.status, RunStatus::Succeeded, "{log}");
    assert!(log.contains("configmap/web-settings created"), "{log}");
    assert!(log.contains("successfully rolled out"), "{log}");
    let settings = kube
        .object("configmaps", Some("web"), "web-settings")
        .expect("the manifest's configmap is stored");
    assert_eq!(settings["data"]["log_level"], "info");
    let image = |kube: &KubeStandIn| {
        kube.object("deployments.apps", Some("web"), "web")
            .expect("the release's deployment is stored")["spec"]["template"]["spec"]["containers"]
            [0]["image"]
            .clone()
    };
    assert_eq!(image(&kube), format!("registry.example/web:{first}"));
    assert_eq!(
        releases(&kube, "web", "web"),
        [("1".into(), "deployed".into())]
    );

    // A release whose pods never come up: helm gives up, the rollback step restores the first.
    repo.write(&[("chart/values.yaml", "replicaCount: 2\nimage:\n  repository: registry.example/web\n  tag: latest\ngreeting: hello again\n")]);
    let second = repo.commit("two replicas");
    kube.stall_rollouts(true);
    let queued = client
        .trigger_run("deploy", &trigger(&second, "3s"))
        .await
        .expect("the run is queued");
    let run = wait_for_run(&client, queued.id, Duration::from_secs(180)).await;
    let deploy = job(&run, "deploy");
    let log = String::from_utf8_lossy(&job_log(&client, deploy.id).await).into_owned();
    assert_eq!(run.status, RunStatus::Failed, "{log}");
    let statuses: Vec<StepStatus> = deploy.steps.iter().map(|s| s.status).collect();
    assert_eq!(
        statuses,
        [
            StepStatus::Succeeded,
            StepStatus::Succeeded,
            StepStatus::Failed,
            StepStatus::Skipped,
            StepStatus::Succeeded
        ],
        "{log}"
    );
    assert!(log.contains("Rollback was a success"), "{log}");
    assert_eq!(image(&kube), format!("registry.example/web:{first}"));
    let config = kube
        .object("configmaps", Some("web"), "web-config")
        .expect("stored");
    assert_eq!(
        config["data"]["greeting"], "hello",
        "the rollback restored the first values"
    );
    assert_eq!(
        releases(&kube, "web", "web"),
        [
            ("1".into(), "superseded".into()),
            ("2".into(), "failed".into()),
            ("3".into(), "deployed".into())
        ]
    );

    // Every request the runner's tools made carried the token and got through.
    let requests = kube.requests();
    assert!(
        requests
            .iter()
            .all(|r| r.token.as_deref() == Some(DEFAULT_TOKEN))
    );
    assert!(requests.iter().all(|r| r.status != 401), "{requests:#?}");
    for agent in ["kubectl/", "Helm/"] {
        assert!(
            requests.iter().any(|r| r
                .user_agent
                .as_deref()
                .is_some_and(|a| a.starts_with(agent))),
            "no request from {agent}"
        );
    }
}

const CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.com
spec:
  group: example.com
  scope: Namespaced
  names:
    plural: widgets
    singular: widget
    kind: Widget
    shortNames: [wd]
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          x-kubernetes-preserve-unknown-fields: true
"#;

const WIDGET: &str = r#"
apiVersion: example.com/v1
kind: Widget
metadata:
  name: gizmo
  namespace: default
spec:
  size: 3
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_resource_definition_serves_its_kind_until_deleted() {
    let kube = KubeStandIn::start().await;
    let tools = Tools::new(&kube, DEFAULT_TOKEN);
    let crd = tools.write("crd.yaml", CRD);
    let widget = tools.write("widget.yaml", WIDGET);
    tools
        .kubectl_ok(&["apply", "-f", crd.to_str().expect("UTF-8")])
        .await;
    let out = tools
        .kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "crd/widgets.example.com",
            "--timeout=60s",
        ])
        .await;
    assert!(out.stdout.contains("condition met"), "{out}");

    // The new kind is discovered and stored like any other.
    let out = tools
        .kubectl_ok(&["apply", "-f", widget.to_str().expect("UTF-8")])
        .await;
    assert!(
        out.stdout.contains("widget.example.com/gizmo created"),
        "{out}"
    );
    let out = tools
        .kubectl_ok(&[
            "get",
            "wd",
            "gizmo",
            "-n",
            "default",
            "-o",
            "jsonpath={.spec.size}",
        ])
        .await;
    assert_eq!(out.stdout, "3", "{out}");
    let changed = WIDGET.replace("size: 3", "size: 5");
    let widget = tools.write("widget.yaml", &changed);
    let out = tools
        .kubectl_ok(&["apply", "-f", widget.to_str().expect("UTF-8")])
        .await;
    assert!(
        out.stdout.contains("widget.example.com/gizmo configured"),
        "{out}"
    );
    let stored = kube
        .object("widgets.example.com", Some("default"), "gizmo")
        .expect("the widget is stored");
    assert_eq!(stored["spec"]["size"], 5);
    assert_eq!(stored["metadata"]["generation"], 2);
    // A kind unknown to kubectl's scheme is patched with a JSON merge patch.
    let patch = kube
        .requests()
        .into_iter()
        .rfind(|r| r.method == "PATCH")
        .expect("the change was a PATCH");
    assert_eq!(
        patch.path,
        "/apis/example.com/v1/namespaces/default/widgets/gizmo"
    );
    assert_eq!(
        patch.content_type.as_deref(),
        Some("application/merge-patch+json")
    );

    // Deleting the definition takes the kind and its objects away.
    tools
        .kubectl_ok(&["delete", "crd", "widgets.example.com"])
        .await;
    let out = tools.kubectl(&["get", "widgets", "-n", "default"]).await;
    assert!(!out.success, "{out}");
    // Whether kubectl still has the kind in its discovery cache or not, the server says no.
    assert!(
        out.stderr
            .contains("the server doesn't have a resource type")
            || out
                .stderr
                .contains("the server could not find the requested resource"),
        "{out}"
    );
    let out = tools
        .kubectl(&[
            "get",
            "--raw",
            "/apis/example.com/v1/namespaces/default/widgets/gizmo",
        ])
        .await;
    assert!(!out.success, "{out}");
}
