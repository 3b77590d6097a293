//! The object store: JSON objects keyed by group, resource, namespace and name, one global
//! resource version counter (as etcd's revision), the history of changes that watches replay,
//! and the little the real control plane would do on its own (defaults, a ready Deployment).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use base64::Engine as _;
use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use super::resources::ResourceType;

/// Where an object lives; `namespace` is empty for cluster-scoped objects.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    /// The API group, `""` for the core group.
    pub group: String,
    /// The plural resource name.
    pub plural: String,
    /// The namespace, or `""`.
    pub namespace: String,
    /// The object's name.
    pub name: String,
}

impl Key {
    /// The key of `name` of resource type `rt` in `namespace`.
    pub fn new(rt: &ResourceType, namespace: &str, name: &str) -> Key {
        Key {
            group: rt.group.to_string(),
            plural: rt.plural.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

/// What happened to an object, as watch events name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Created.
    Added,
    /// Changed.
    Modified,
    /// Deleted.
    Deleted,
}

impl Change {
    /// The `type` of a watch event.
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Added => "ADDED",
            Change::Modified => "MODIFIED",
            Change::Deleted => "DELETED",
        }
    }
}

/// One change, kept in the history and sent to open watches.
#[derive(Debug, Clone)]
pub struct Event {
    /// The resource version the change made.
    pub resource_version: u64,
    /// The object's key.
    pub key: Key,
    /// What happened.
    pub change: Change,
    /// The object after the change (for a deletion, its last state).
    pub object: Value,
    /// The object before a modification, so that a watch with a selector can tell an object
    /// that stopped matching (sent as `DELETED`) from one that started to (sent as `ADDED`).
    pub previous: Option<Value>,
}

/// The objects and their history.
pub struct Store {
    /// The served types: the table the stand-in started with, and the custom resources of
    /// the CustomResourceDefinitions created since.
    resources: Vec<ResourceType>,
    resource_version: u64,
    objects: BTreeMap<Key, Value>,
    /// The configuration each field manager last applied to each object (server-side apply).
    applied: HashMap<(Key, String), Value>,
    history: Vec<Arc<Event>>,
    events: broadcast::Sender<Arc<Event>>,
    next_cluster_ip: u32,
    /// Whether Deployments stay unavailable, as when their Pods cannot start.
    pub rollouts_stalled: bool,
}

impl Store {
    /// An empty store serving `resources`.
    pub fn new(resources: Vec<ResourceType>) -> Store {
        Store {
            resources,
            resource_version: 1,
            objects: BTreeMap::new(),
            applied: HashMap::new(),
            history: Vec::new(),
            events: broadcast::channel(4096).0,
            next_cluster_ip: 10,
            rollouts_stalled: false,
        }
    }

    /// The served types.
    pub fn resources(&self) -> &[ResourceType] {
        &self.resources
    }

    /// Serves `rt` from now on, in place of a type with the same group and plural.
    pub fn register(&mut self, rt: ResourceType) {
        match self
            .resources
            .iter_mut()
            .find(|r| r.group == rt.group && r.plural == rt.plural)
        {
            Some(existing) => *existing = rt,
            None => self.resources.push(rt),
        }
    }

    /// Stops serving the type `group`/`plural` and deletes its objects, as the real server
    /// does when a CustomResourceDefinition is deleted.
    pub fn unregister(&mut self, group: &str, plural: &str) {
        let keys: Vec<Key> = self
            .objects
            .keys()
            .filter(|k| k.group == group && k.plural == plural)
            .cloned()
            .collect();
        for key in keys {
            self.remove(&key);
        }
        self.resources
            .retain(|r| !(r.group == group && r.plural == plural));
    }

    /// The newest resource version.
    pub fn resource_version(&self) -> u64 {
        self.resource_version
    }

    /// The object at `key`.
    pub fn get(&self, key: &Key) -> Option<&Value> {
        self.objects.get(key)
    }

    /// The objects of one resource type, in one namespace or in all (`None`), ordered by
    /// namespace and name.
    pub fn list(&self, group: &str, plural: &str, namespace: Option<&str>) -> Vec<&Value> {
        self.objects
            .iter()
            .filter(|(k, _)| {
                k.group == group
                    && k.plural == plural
                    && namespace.is_none_or(|ns| k.namespace == ns)
            })
            .map(|(_, v)| v)
            .collect()
    }

    /// Every object in `namespace`, of any type.
    pub fn keys_in_namespace(&self, namespace: &str) -> Vec<Key> {
        self.objects
            .keys()
            .filter(|k| k.namespace == namespace)
            .cloned()
            .collect()
    }

    /// The configuration `manager` last applied to `key`.
    pub fn applied(&self, key: &Key, manager: &str) -> Option<&Value> {
        self.applied.get(&(key.clone(), manager.to_string()))
    }

    /// Remembers what `manager` applied to `key`.
    pub fn set_applied(&mut self, key: &Key, manager: &str, configuration: Value) {
        self.applied
            .insert((key.clone(), manager.to_string()), configuration);
    }

    /// Takes the next resource version.
    pub fn next_resource_version(&mut self) -> u64 {
        self.resource_version += 1;
        self.resource_version
    }

    /// Stores `object` at `key` (its `metadata.resourceVersion` already set to
    /// `resource_version`) and tells the watches.
    pub fn put(&mut self, key: Key, object: Value, resource_version: u64) {
        let previous = self.objects.insert(key.clone(), object.clone());
        let change = if previous.is_some() {
            Change::Modified
        } else {
            Change::Added
        };
        self.record(key, change, object, previous, resource_version);
    }

    /// Removes the object at `key`, giving it a last resource version, and tells the watches.
    pub fn remove(&mut self, key: &Key) -> Option<Value> {
        let mut object = self.objects.remove(key)?;
        self.applied.retain(|(k, _), _| k != key);
        let resource_version = self.next_resource_version();
        object["metadata"]["resourceVersion"] = json!(resource_version.to_string());
        self.record(
            key.clone(),
            Change::Deleted,
            object.clone(),
            None,
            resource_version,
        );
        Some(object)
    }

    fn record(
        &mut self,
        key: Key,
        change: Change,
        object: Value,
        previous: Option<Value>,
        resource_version: u64,
    ) {
        let event = Arc::new(Event {
            resource_version,
            key,
            change,
            object,
            previous,
        });
        self.history.push(event.clone());
        // No receiver means no open watch, which is fine.
        let _ = self.events.send(event);
    }

    /// The changes after `resource_version`, and a receiver for the ones to come; taken under
    /// one lock so that nothing falls between the two.
    pub fn changes_since(
        &self,
        resource_version: u64,
    ) -> (Vec<Arc<Event>>, broadcast::Receiver<Arc<Event>>) {
        let start = self
            .history
            .partition_point(|e| e.resource_version <= resource_version);
        (self.history[start..].to_vec(), self.events.subscribe())
    }

    /// A free cluster IP from `10.96.0.0/12`, for a Service that asks for none.
    fn allocate_cluster_ip(&mut self) -> String {
        let n = self.next_cluster_ip;
        self.next_cluster_ip += 1;
        format!("10.96.{}.{}", n / 256, n % 256)
    }
}

/// Sets each `(field, value)` that `spec` lacks.
fn defaults(spec: &mut Value, fields: &[(&str, Value)]) {
    for (field, value) in fields {
        if spec[*field].is_null() {
            spec[*field] = value.clone();
        }
    }
}

/// The current time as the API server writes timestamps.
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// What the API server's defaulting and admission would add to an object about to be stored:
/// `stringData` folded into a Secret's `data`, a Service's cluster IP and port defaults, a
/// Namespace's phase, the replica counts, history limits and update strategies of the
/// workloads.
pub fn apply_defaults(
    rt: &ResourceType,
    old: Option<&Value>,
    object: &mut Value,
    store: &mut Store,
) {
    match (rt.group, rt.kind) {
        ("", "Secret") => {
            if let Some(Value::Object(string_data)) =
                object.as_object_mut().and_then(|o| o.remove("stringData"))
            {
                let data = object["data"].as_object().cloned().unwrap_or_default();
                let mut data: Map<String, Value> = data;
                for (k, v) in string_data {
                    let text = v.as_str().unwrap_or_default().to_string();
                    data.insert(
                        k,
                        json!(base64::engine::general_purpose::STANDARD.encode(text)),
                    );
                }
                object["data"] = Value::Object(data);
            }
            // The real defaulting treats an empty type as no type.
            if object["type"].as_str().is_none_or(str::is_empty) {
                object["type"] = json!("Opaque");
            }
        }
        ("", "Namespace") => {
            let name = object["metadata"]["name"].clone();
            object["metadata"]["labels"]["kubernetes.io/metadata.name"] = name;
            if object["spec"]["finalizers"].is_null() {
                object["spec"]["finalizers"] = json!(["kubernetes"]);
            }
            object["status"] = json!({"phase": "Active"});
        }
        ("", "Service") => {
            let spec = &mut object["spec"];
            if spec["type"].as_str().is_none_or(str::is_empty) {
                spec["type"] = json!("ClusterIP");
            }
            if spec["type"] != "ExternalName" && spec["clusterIP"].is_null() {
                let ip = match old.map(|o| &o["spec"]["clusterIP"]) {
                    Some(Value::String(ip)) => ip.clone(),
                    _ => store.allocate_cluster_ip(),
                };
                spec["clusterIP"] = json!(ip);
                spec["clusterIPs"] = json!([ip]);
            }
            if let Some(ports) = spec["ports"].as_array_mut() {
                for port in ports {
                    if port["protocol"].is_null() {
                        port["protocol"] = json!("TCP");
                    }
                    if port["targetPort"].is_null() {
                        port["targetPort"] = port["port"].clone();
                    }
                }
            }
        }
        ("apps", "Deployment") => defaults(
            &mut object["spec"],
            &[
                ("replicas", json!(1)),
                ("revisionHistoryLimit", json!(10)),
                ("progressDeadlineSeconds", json!(600)),
                (
                    "strategy",
                    json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}}),
                ),
            ],
        ),
        ("apps", "StatefulSet") => defaults(
            &mut object["spec"],
            &[
                ("replicas", json!(1)),
                ("revisionHistoryLimit", json!(10)),
                ("podManagementPolicy", json!("OrderedReady")),
                (
                    "updateStrategy",
                    json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 0}}),
                ),
            ],
        ),
        ("apps", "DaemonSet") => defaults(
            &mut object["spec"],
            &[
                ("revisionHistoryLimit", json!(10)),
                (
                    "updateStrategy",
                    json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}),
                ),
            ],
        ),
        _ => {}
    }
}

/// What the controllers would report once they caught up, for the kinds deployment tools wait
/// on (`kubectl rollout status`, `kubectl wait`, helm's readiness checks and hooks): a
/// Deployment, ReplicaSet, StatefulSet or DaemonSet with every replica updated, ready and
/// available, a Job complete, a Pod running and ready, a PersistentVolumeClaim bound, a
/// LoadBalancer Service with an address.
///
/// With `stalled`, a Deployment is seen but never becomes available (no replica available,
/// `Available` false), as when its Pods cannot start.
///
/// No ReplicaSets or Pods are made for the workloads; other kinds keep the status they were
/// given.
pub fn reconcile_status(rt: &ResourceType, old: Option<&Value>, object: &mut Value, stalled: bool) {
    let generation = object["metadata"]["generation"].clone();
    let replicas = object["spec"]["replicas"].as_i64().unwrap_or(1);
    let old_status = old.map(|o| &o["status"]).filter(|s| s.is_object());
    // A status that already describes this generation stays as it is, so that a write that
    // changes nothing does not change the timestamps either.
    let current = |old: &Value| {
        old["observedGeneration"] == generation
            && (old["replicas"].is_null() || old["replicas"] == json!(replicas))
    };
    let time = now();
    let name = object["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let status = match (rt.group, rt.kind) {
        ("apps", "Deployment" | "ReplicaSet" | "StatefulSet" | "DaemonSet")
            if old_status.is_some_and(current) =>
        {
            old_status.cloned().unwrap_or_default()
        }
        ("apps", "Deployment") if stalled => json!({
            "observedGeneration": generation,
            "replicas": replicas,
            "updatedReplicas": replicas,
            "unavailableReplicas": replicas,
            "conditions": [
                {
                    "type": "Available",
                    "status": "False",
                    "reason": "MinimumReplicasUnavailable",
                    "message": "Deployment does not have minimum availability.",
                    "lastUpdateTime": time,
                    "lastTransitionTime": time
                },
                {
                    "type": "Progressing",
                    "status": "True",
                    "reason": "ReplicaSetUpdated",
                    "message": format!("ReplicaSet \"{name}\" is progressing."),
                    "lastUpdateTime": time,
                    "lastTransitionTime": time
                }
            ]
        }),
        ("apps", "Deployment") => {
            let mut status = json!({
                "observedGeneration": generation,
                "replicas": replicas,
                "updatedReplicas": replicas,
                "conditions": [
                    {
                        "type": "Available",
                        "status": "True",
                        "reason": "MinimumReplicasAvailable",
                        "message": "Deployment has minimum availability.",
                        "lastUpdateTime": time,
                        "lastTransitionTime": time
                    },
                    {
                        "type": "Progressing",
                        "status": "True",
                        "reason": "NewReplicaSetAvailable",
                        "message": format!("ReplicaSet \"{name}\" has successfully progressed."),
                        "lastUpdateTime": time,
                        "lastTransitionTime": time
                    }
                ]
            });
            // The real controller omits counts that are zero.
            if replicas > 0 {
                status["readyReplicas"] = json!(replicas);
                status["availableReplicas"] = json!(replicas);
            }
            status
        }
        ("apps", "ReplicaSet") => json!({
            "observedGeneration": generation,
            "replicas": replicas,
            "fullyLabeledReplicas": replicas,
            "readyReplicas": replicas,
            "availableReplicas": replicas
        }),
        ("apps", "StatefulSet") => {
            let revision = format!("{name}-{}", generation);
            json!({
                "observedGeneration": generation,
                "replicas": replicas,
                "readyReplicas": replicas,
                "currentReplicas": replicas,
                "updatedReplicas": replicas,
                "availableReplicas": replicas,
                "currentRevision": revision,
                "updateRevision": revision
            })
        }
        // As on a one-node cluster.
        ("apps", "DaemonSet") => json!({
            "observedGeneration": generation,
            "desiredNumberScheduled": 1,
            "currentNumberScheduled": 1,
            "updatedNumberScheduled": 1,
            "numberAvailable": 1,
            "numberReady": 1,
            "numberMisscheduled": 0
        }),
        (_, "Job" | "Pod" | "PersistentVolumeClaim") if old_status.is_some() => {
            old_status.cloned().unwrap_or_default()
        }
        ("batch", "Job") => {
            let condition = |kind: &str| {
                json!({
                    "type": kind,
                    "status": "True",
                    "lastProbeTime": time,
                    "lastTransitionTime": time
                })
            };
            json!({
                "startTime": time,
                "completionTime": time,
                "succeeded": object["spec"]["completions"].as_i64().unwrap_or(1),
                "ready": 0,
                "terminating": 0,
                "conditions": [condition("SuccessCriteriaMet"), condition("Complete")]
            })
        }
        ("", "Pod") => {
            let condition =
                |kind: &str| json!({"type": kind, "status": "True", "lastTransitionTime": time});
            let containers: Vec<Value> = object["spec"]["containers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    json!({
                        "name": c["name"],
                        "image": c["image"],
                        "ready": true,
                        "started": true,
                        "restartCount": 0,
                        "state": {"running": {"startedAt": time}}
                    })
                })
                .collect();
            json!({
                "phase": "Running",
                "startTime": time,
                "conditions": [
                    condition("PodScheduled"),
                    condition("Initialized"),
                    condition("ContainersReady"),
                    condition("Ready")
                ],
                "containerStatuses": containers
            })
        }
        ("", "PersistentVolumeClaim") => json!({
            "phase": "Bound",
            "accessModes": object["spec"]["accessModes"],
            "capacity": object["spec"]["resources"]["requests"]
        }),
        ("", "Service") if object["spec"]["type"] == "LoadBalancer" => {
            match old_status.filter(|s| !s["loadBalancer"]["ingress"].is_null()) {
                Some(status) => status.clone(),
                // An address from the documentation range: nothing can reach it, on purpose.
                None => {
                    json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.10", "ipMode": "VIP"}]}})
                }
            }
        }
        ("apiextensions.k8s.io", "CustomResourceDefinition") => {
            let names = object["spec"]["names"].clone();
            if let Some(old) = old_status.filter(|s| s["acceptedNames"] == names) {
                old.clone()
            } else {
                let condition = |kind: &str, reason: &str| {
                    json!({
                        "type": kind,
                        "status": "True",
                        "reason": reason,
                        "message": "",
                        "lastTransitionTime": time
                    })
                };
                let stored: Vec<Value> = object["spec"]["versions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|v| v["storage"] == true)
                    .map(|v| v["name"].clone())
                    .collect();
                json!({
                    "acceptedNames": names,
                    "conditions": [
                        condition("NamesAccepted", "NoConflicts"),
                        condition("Established", "InitialNamesAccepted")
                    ],
                    "storedVersions": stored
                })
            }
        }
        _ => return,
    };
    object["status"] = status;
}
