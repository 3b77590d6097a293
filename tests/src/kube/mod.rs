//! The stand-in for a Kubernetes API server, the one part of a deployment that cannot run on a
//! test machine: an HTTPS server with a CA of its own that checks bearer tokens and implements
//! enough of the real API, in the real wire format, for the real `kubectl` and `helm`.
//!
//! Start one with [`KubeStandIn::start`] (on `127.0.0.1:0`), [`KubeStandIn::start_on`] (an
//! address and a DNS name for the certificate, e.g. `10.77.0.2:6443` and
//! `aks-prod.privatelink.westeurope.azmk8s.io`) or [`KubeStandIn::builder`] (tokens, namespaces,
//! extra resource types, or a listener bound inside a network namespace with
//! [`bind_in_netns`]; `start` and `start_on` bind in the test process's own namespace).
//! A fresh CA and server certificate are made at every start; [`KubeStandIn::write_kubeconfig`]
//! writes a kubeconfig that carries the CA and a bearer token.
//! Tokens are let in by list ([`KubeStandIn::accept_token`], [`KubeStandIn::accept_only`]) or
//! by a rule of the test's own ([`KubeStandIn::accept_tokens_where`]), e.g. every token an
//! identity stand-in issued.
//!
//! What it serves:
//! - Discovery: `/version` (a plain `v1.35.0`, as AKS reports), `/api`, `/apis`, `/api/v1`, `/apis/{group}/{version}` (legacy JSON
//!   discovery, which clients use when the server offers no aggregated discovery), and OpenAPI
//!   v3 documents that tell clients the server validates fields itself, so that `kubectl apply`
//!   and `helm` send `fieldValidation=Strict` instead of validating against a schema (no
//!   `/openapi/v2`: with the v3 documents no client asks for it).
//! - Generic CRUD over a table of resource types ([`ResourceType`], [`default_resources`]:
//!   namespaces, configmaps, secrets, services, serviceaccounts, pods, events, deployments,
//!   replicasets and more; tests may add their own): get, list with `labelSelector` and
//!   `fieldSelector`, create (`409 AlreadyExists`), replace (`409 Conflict` on a stale
//!   `resourceVersion`), delete (with `DeleteOptions`: dry run, preconditions) and
//!   delete-collection, `?dryRun=All`, the `status` subresource, and the `scale` subresource of
//!   Deployments, StatefulSets and ReplicaSets.
//!   Objects get `uid`, `resourceVersion` (one global counter), `generation` (bumped when
//!   anything outside `metadata` and `status` changes) and `creationTimestamp`; a write that
//!   changes nothing keeps the resource version.
//!   Namespaced objects need their Namespace to exist (`default`, `kube-system`, `kube-public`
//!   and `kube-node-lease` always do); a deleted Namespace turns `Terminating`, refuses new
//!   objects, and half a second later disappears with everything in it.
//! - Bodies in JSON or YAML, and in protobuf for the kinds typed client-go clientsets send
//!   (Secret, ConfigMap, Namespace, DeleteOptions, SelfSubjectAccessReview: helm's release
//!   storage and `--create-namespace`, `kubectl auth can-i`); answers are always JSON.
//! - PATCH: JSON patch and JSON merge patch (exact, via the `json-patch` crate), strategic
//!   merge patch (maps merged, `null` deletes, lists of the built-in types' keyed fields such
//!   as `containers`, `env`, `ports`, `volumes` merged by their key with the `$patch`,
//!   `$setElementOrder` and `$deleteFromPrimitiveList` directives, other lists replaced) and
//!   server-side apply (the applied configuration merged into the object, fields the same field
//!   manager stopped applying removed, lists replaced, no conflicts between managers).
//! - WATCH (`?watch=true`): initial events, replay from a resource version, streaming lists
//!   (`sendInitialEvents=true` ending with the `k8s.io/initial-events-end` bookmark, as helm's
//!   `--wait` asks for), live events, selectors (an object that stops matching is sent as
//!   `DELETED`), `timeoutSeconds`.
//! - CustomResourceDefinitions: creating one serves its type (discovery, CRUD, watch) and marks
//!   it `Established`; deleting it deletes its objects; a test may also add types up front
//!   with [`KubeStandInBuilder::resource`].
//! - Tables for `kubectl get` (`Accept: …;as=Table`): Name and Age for every kind, and the
//!   real server's main columns for Deployments, Services, ConfigMaps, Secrets, Namespaces,
//!   Pods, StatefulSets and ReplicaSets.
//! - A control plane reduced to what deployment tools wait for, reported as soon as an object
//!   is written: a Deployment rolled out (all replicas updated, ready and available,
//!   `Available` and `Progressing` with reason `NewReplicaSetAvailable`, `observedGeneration`
//!   current), likewise ReplicaSets, StatefulSets and DaemonSets (as on one node), a Job
//!   complete, a Pod running and ready, a PersistentVolumeClaim bound, a LoadBalancer Service
//!   with an address; the workloads' defaults (replicas, update strategies, history limits);
//!   Services get a cluster IP; Secrets' `stringData` moves into `data`.
//!   A test can make rollouts stall ([`KubeStandIn::stall_rollouts`]) and heal, or write the
//!   `status` subresource itself.
//!
//! Limits, on purpose: no ReplicaSets or Pods are made for a Deployment (so no `rollout
//! history`, no `kubectl logs`), other kinds get no status of their own, no garbage
//! collection through owner references, no admission webhooks, no RBAC (every accepted token
//! may do everything, and `kubectl auth can-i` always says yes), no schema validation
//! (unknown fields are kept, not refused), a custom resource is served in its storage version
//! only, no `managedFields`, lists are never
//! paginated, the field selector accepts any dotted path, and the whole change history is kept,
//! so a watch never gets `410 Gone`.
//!
//! Every request is recorded ([`KubeRequest`]): method, path, query, content type, user agent,
//! bearer token, body size and the status answered; a request without an accepted token gets
//! `401` with a `Status` object, as from the real server.
//! Failed TLS handshakes (a client that does not trust the CA, for one) are counted.

mod api;
mod patch;
mod protobuf;
mod resources;
mod selectors;
mod store;
mod table;
mod tls;

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use serde_json::{Value, json};

pub use resources::{ResourceType, default_resources};
pub use selectors::{FieldSelector, LabelSelector};

pub use api::TokenRule;

use api::{Shared, lock};
use store::{Key, Store};

/// The bearer token a stand-in accepts when the test names none.
pub const DEFAULT_TOKEN: &str = "outpost-test-kube-token";

/// The namespaces every cluster has.
const BUILT_IN_NAMESPACES: [&str; 4] = ["default", "kube-system", "kube-public", "kube-node-lease"];

/// One request the stand-in answered.
#[derive(Debug, Clone)]
pub struct KubeRequest {
    /// `GET`, `POST`, …
    pub method: String,
    /// The path, percent-encoded as sent.
    pub path: String,
    /// The query string as sent, without `?` (empty when there is none).
    pub query: String,
    /// The `Content-Type` header.
    pub content_type: Option<String>,
    /// The `User-Agent` header (`kubectl/v1.32…`, `Helm/4…`).
    pub user_agent: Option<String>,
    /// The bearer token of the `Authorization` header, accepted or not.
    pub token: Option<String>,
    /// The size of the request body in bytes.
    pub body_size: usize,
    /// The HTTP status answered.
    pub status: u16,
}

impl KubeRequest {
    /// The value of query parameter `name`, decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        form_urlencoded::parse(self.query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }
}

/// Where the stand-in listens.
enum Listen {
    Address(SocketAddr),
    Listener(std::net::TcpListener),
}

/// Settings for a stand-in; [`KubeStandIn::builder`] makes one.
pub struct KubeStandInBuilder {
    listen: Listen,
    dns_names: Vec<String>,
    tokens: Vec<String>,
    namespaces: Vec<String>,
    resources: Vec<ResourceType>,
}

impl KubeStandInBuilder {
    /// Listens on `addr` (default `127.0.0.1:0`); the certificate names its IP.
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = Listen::Address(addr);
        self
    }

    /// Serves on a listener bound elsewhere, e.g. by [`bind_in_netns`] inside a network
    /// namespace; the certificate names its IP.
    pub fn listener(mut self, listener: std::net::TcpListener) -> Self {
        self.listen = Listen::Listener(listener);
        self
    }

    /// Adds a DNS name to the certificate, e.g. `aks-prod.privatelink.westeurope.azmk8s.io`.
    pub fn dns_name(mut self, name: &str) -> Self {
        self.dns_names.push(name.to_string());
        self
    }

    /// Accepts `token`; without any, the stand-in accepts [`DEFAULT_TOKEN`].
    pub fn token(mut self, token: &str) -> Self {
        self.tokens.push(token.to_string());
        self
    }

    /// Creates namespace `name` before the first request.
    pub fn namespace(mut self, name: &str) -> Self {
        self.namespaces.push(name.to_string());
        self
    }

    /// Serves one more resource type (a custom resource, say).
    pub fn resource(mut self, resource: ResourceType) -> Self {
        self.resources.push(resource);
        self
    }

    /// Generates the certificates and starts serving; panics when the address cannot be bound,
    /// with the address in the message.
    pub async fn start(self) -> KubeStandIn {
        let listener = match self.listen {
            Listen::Address(addr) => tokio::net::TcpListener::bind(addr)
                .await
                .unwrap_or_else(|e| panic!("the kube stand-in cannot listen on {addr}: {e}")),
            Listen::Listener(listener) => {
                listener
                    .set_nonblocking(true)
                    .expect("a listener can be made non-blocking");
                tokio::net::TcpListener::from_std(listener)
                    .expect("a bound std listener can be served by tokio")
            }
        };
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let ip = if addr.ip().is_unspecified() {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            addr.ip()
        };
        let tls = tls::make_server_tls(&[ip], &self.dns_names);
        let tokens: HashSet<String> = if self.tokens.is_empty() {
            HashSet::from([DEFAULT_TOKEN.to_string()])
        } else {
            self.tokens.into_iter().collect()
        };
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new(self.resources)),
            tokens: Mutex::new(tokens),
            token_rule: Mutex::new(None),
            requests: Mutex::new(Vec::new()),
            server_address: SocketAddr::new(ip, addr.port()).to_string(),
        });
        let mut stand_in = KubeStandIn {
            addr: SocketAddr::new(ip, addr.port()),
            dns_names: self.dns_names,
            ca_pem: tls.ca_pem,
            shared: shared.clone(),
            handshake_failures: Arc::new(AtomicUsize::new(0)),
            task: None,
        };
        for namespace in BUILT_IN_NAMESPACES
            .iter()
            .map(|n| n.to_string())
            .chain(self.namespaces)
        {
            stand_in.create_namespace(&namespace);
        }
        let app = axum::Router::new().fallback(api::handle).with_state(shared);
        let task = tokio::spawn(tls::serve(
            listener,
            tls.config,
            app,
            stand_in.handshake_failures.clone(),
        ));
        stand_in.task = Some(task);
        stand_in
    }
}

/// A running Kubernetes API stand-in; it stops when dropped.
pub struct KubeStandIn {
    addr: SocketAddr,
    dns_names: Vec<String>,
    ca_pem: String,
    shared: Arc<Shared>,
    handshake_failures: Arc<AtomicUsize>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl KubeStandIn {
    /// Settings to start one with: `127.0.0.1:0`, token [`DEFAULT_TOKEN`], the default types.
    pub fn builder() -> KubeStandInBuilder {
        KubeStandInBuilder {
            listen: Listen::Address(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))),
            dns_names: Vec::new(),
            tokens: Vec::new(),
            namespaces: Vec::new(),
            resources: default_resources(),
        }
    }

    /// Starts one on a free port of `127.0.0.1` that accepts [`DEFAULT_TOKEN`].
    pub async fn start() -> KubeStandIn {
        KubeStandIn::builder().start().await
    }

    /// Starts one on `addr` whose certificate also names `dns_name`, accepting
    /// [`DEFAULT_TOKEN`].
    pub async fn start_on(addr: SocketAddr, dns_name: &str) -> KubeStandIn {
        KubeStandIn::builder()
            .listen(addr)
            .dns_name(dns_name)
            .start()
            .await
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://IP:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// `https://DNS-NAME:PORT` with the first DNS name given, else [`url`](Self::url).
    pub fn dns_url(&self) -> String {
        match self.dns_names.first() {
            Some(name) => format!("https://{name}:{}", self.addr.port()),
            None => self.url(),
        }
    }

    /// The PEM of the CA that signed its certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Writes the CA certificate to `dir/ca.crt` and returns the path.
    pub fn write_ca(&self, dir: &Path) -> PathBuf {
        let path = dir.join("ca.crt");
        std::fs::write(&path, &self.ca_pem)
            .unwrap_or_else(|e| panic!("could not write {}: {e}", path.display()));
        path
    }

    /// A kubeconfig for `server` (one of the URLs above) with the CA embedded and `token` as
    /// the user's bearer token; context `outpost-e2e`, no default namespace.
    pub fn kubeconfig_for(&self, server: &str, token: &str) -> String {
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: outpost-e2e\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\n\
             users:\n\
             - name: outpost-e2e\n  user:\n    token: {token}\n\
             contexts:\n\
             - name: outpost-e2e\n  context:\n    cluster: outpost-e2e\n    user: outpost-e2e\n\
             current-context: outpost-e2e\n"
        )
    }

    /// Writes [`kubeconfig_for`](Self::kubeconfig_for) with [`url`](Self::url) and `token` to
    /// `dir/kubeconfig` (mode 0600, as kubectl would) and returns the path.
    pub fn write_kubeconfig(&self, dir: &Path, token: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let path = dir.join("kubeconfig");
        std::fs::write(&path, self.kubeconfig_for(&self.url(), token))
            .unwrap_or_else(|e| panic!("could not write {}: {e}", path.display()));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .expect("the kubeconfig's mode can be set");
        path
    }

    /// Accepts `token` from now on.
    pub fn accept_token(&self, token: &str) {
        lock(&self.shared.tokens).insert(token.to_string());
    }

    /// Accepts exactly `tokens` from now on, and no others (a rule set with
    /// [`accept_tokens_where`](Self::accept_tokens_where) still applies).
    pub fn accept_only(&self, tokens: &[&str]) {
        *lock(&self.shared.tokens) = tokens.iter().map(|t| t.to_string()).collect();
    }

    /// Also accepts every token for which `rule` says yes, e.g. any token an identity stand-in
    /// issued for the AKS audience; `None` removes the rule.
    pub fn accept_tokens_where(&self, rule: Option<TokenRule>) {
        *lock(&self.shared.token_rule) = rule;
    }

    /// Refuses `token` from now on.
    pub fn refuse_token(&self, token: &str) {
        lock(&self.shared.tokens).remove(token);
    }

    /// The requests answered so far, in order.
    pub fn requests(&self) -> Vec<KubeRequest> {
        lock(&self.shared.requests).clone()
    }

    /// How many TLS handshakes failed: a client that distrusts the CA, speaks plain HTTP, or
    /// hangs up before finishing the handshake (a bare TCP probe).
    pub fn tls_handshake_failures(&self) -> usize {
        self.handshake_failures.load(Ordering::SeqCst)
    }

    fn resource_type(&self, resource: &str) -> ResourceType {
        let (plural, group) = resource.split_once('.').unwrap_or((resource, ""));
        lock(&self.shared.store)
            .resources()
            .iter()
            .find(|r| r.plural == plural && r.group == group)
            .cloned()
            .unwrap_or_else(|| panic!("the kube stand-in serves no resource {resource:?}"))
    }

    /// The stored object `name` of `resource` (`configmaps`, `deployments.apps`: the plural,
    /// then the group for the named groups) in `namespace` (`None` for cluster-scoped types).
    pub fn object(&self, resource: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let rt = self.resource_type(resource);
        let key = Key::new(&rt, namespace.unwrap_or_default(), name);
        lock(&self.shared.store).get(&key).cloned()
    }

    /// The stored objects of `resource` in `namespace`, or in all namespaces (`None`).
    pub fn objects(&self, resource: &str, namespace: Option<&str>) -> Vec<Value> {
        let rt = self.resource_type(resource);
        lock(&self.shared.store)
            .list(rt.group, rt.plural, namespace)
            .into_iter()
            .cloned()
            .collect()
    }

    /// With `true`, Deployments written from now on never become available (as when their
    /// Pods cannot start), so `kubectl rollout status` and `helm --wait` time out; with
    /// `false`, every stored Deployment is rolled out at once, and watchers see it.
    pub fn stall_rollouts(&self, stalled: bool) {
        let rt = self.resource_type("deployments.apps");
        let mut store = lock(&self.shared.store);
        store.rollouts_stalled = stalled;
        if stalled {
            return;
        }
        let deployments: Vec<Value> = store
            .list(rt.group, rt.plural, None)
            .into_iter()
            .cloned()
            .collect();
        for mut deployment in deployments {
            let before = deployment["status"].clone();
            store::reconcile_status(&rt, None, &mut deployment, false);
            if deployment["status"]["availableReplicas"] == before["availableReplicas"] {
                continue;
            }
            let key = Key::new(
                &rt,
                deployment["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or_default(),
                deployment["metadata"]["name"].as_str().unwrap_or_default(),
            );
            let resource_version = store.next_resource_version();
            deployment["metadata"]["resourceVersion"] = json!(resource_version.to_string());
            store.put(key, deployment, resource_version);
        }
    }

    /// Creates namespace `name` directly in the store (no request is recorded).
    pub fn create_namespace(&self, name: &str) {
        let rt = self.resource_type("namespaces");
        let mut store = lock(&self.shared.store);
        let key = Key::new(&rt, "", name);
        if store.get(&key).is_some() {
            return;
        }
        let mut object = json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": name,
                "uid": uuid::Uuid::now_v7().to_string(),
                "creationTimestamp": store::now(),
                "generation": 1
            },
            "spec": {}
        });
        store::apply_defaults(&rt, None, &mut object, &mut store);
        let resource_version = store.next_resource_version();
        object["metadata"]["resourceVersion"] = json!(resource_version.to_string());
        store.put(key, object, resource_version);
    }
}

impl Drop for KubeStandIn {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Binds a TCP listener on `addr` inside network namespace `netns` (as made by `ip netns add`,
/// so `/run/netns/NAME`), for [`KubeStandInBuilder::listener`].
///
/// The namespace switch happens on a thread of its own that ends right after binding: a socket
/// stays in the namespace it was made in, and no thread of the test changes namespace.
pub fn bind_in_netns(netns: &str, addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let path = PathBuf::from("/run/netns").join(netns);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path)?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)?;
        std::net::TcpListener::bind(addr)
    })
    .join()
    .expect("the binding thread does not panic")
}
