//! The table of served resource types and the discovery documents built from it: `/api`,
//! `/apis`, `/api/v1`, `/apis/{group}/{version}` and the OpenAPI v3 documents `kubectl` and
//! `helm` read to learn that the server validates fields itself.

use serde_json::{Value, json};

/// One kind of object the stand-in stores, as a row of the discovery documents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceType {
    /// The API group, `""` for the core group.
    pub group: &'static str,
    /// The one version served, e.g. `v1`.
    pub version: &'static str,
    /// The plural name used in paths, e.g. `deployments`.
    pub plural: &'static str,
    /// The singular name, e.g. `deployment`.
    pub singular: &'static str,
    /// The kind, e.g. `Deployment`.
    pub kind: &'static str,
    /// Whether objects live in a namespace.
    pub namespaced: bool,
    /// Short names `kubectl` accepts, e.g. `deploy`.
    pub short_names: &'static [&'static str],
    /// Whether the type has a `status` subresource: writes to the main resource then leave
    /// `.status` alone, as the real API server does.
    pub status_subresource: bool,
}

impl ResourceType {
    /// `v1` or `apps/v1`, as in `apiVersion`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The categories `kubectl get CATEGORY` expands, as the real server files its types.
    pub fn categories(&self) -> &'static [&'static str] {
        const WORKLOADS: [&str; 9] = [
            "Pod",
            "Service",
            "Deployment",
            "ReplicaSet",
            "StatefulSet",
            "DaemonSet",
            "Job",
            "CronJob",
            "HorizontalPodAutoscaler",
        ];
        if WORKLOADS.contains(&self.kind) {
            &["all"]
        } else {
            &[]
        }
    }

    /// Whether objects of the type are questions answered at once and never stored
    /// (`kubectl auth can-i`).
    pub fn is_review(&self) -> bool {
        (self.group, self.kind) == ("authorization.k8s.io", "SelfSubjectAccessReview")
    }

    /// Whether the type has a `scale` subresource (the replicated workloads).
    pub fn has_scale(&self) -> bool {
        self.group == "apps" && matches!(self.kind, "Deployment" | "StatefulSet" | "ReplicaSet")
    }

    /// The path prefix of the group-version, `/api/v1` or `/apis/apps/v1`.
    pub fn group_version_path(&self) -> String {
        if self.group.is_empty() {
            format!("/api/{}", self.version)
        } else {
            format!("/apis/{}/{}", self.group, self.version)
        }
    }
}

// One row of the table per call reads best with every column as an argument.
#[allow(clippy::too_many_arguments)]
const fn rt(
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    singular: &'static str,
    kind: &'static str,
    namespaced: bool,
    short_names: &'static [&'static str],
    status_subresource: bool,
) -> ResourceType {
    ResourceType {
        group,
        version,
        plural,
        singular,
        kind,
        namespaced,
        short_names,
        status_subresource,
    }
}

/// The resource types served unless a test adds more.
#[rustfmt::skip]
pub fn default_resources() -> Vec<ResourceType> {
    vec![
        rt("", "v1", "namespaces", "namespace", "Namespace", false, &["ns"], true),
        rt("", "v1", "configmaps", "configmap", "ConfigMap", true, &["cm"], false),
        rt("", "v1", "secrets", "secret", "Secret", true, &[], false),
        rt("", "v1", "services", "service", "Service", true, &["svc"], true),
        rt("", "v1", "serviceaccounts", "serviceaccount", "ServiceAccount", true, &["sa"], false),
        rt("", "v1", "pods", "pod", "Pod", true, &["po"], true),
        rt("", "v1", "events", "event", "Event", true, &["ev"], false),
        rt("", "v1", "endpoints", "endpoints", "Endpoints", true, &["ep"], false),
        rt("", "v1", "persistentvolumeclaims", "persistentvolumeclaim", "PersistentVolumeClaim", true, &["pvc"], true),
        rt("apps", "v1", "deployments", "deployment", "Deployment", true, &["deploy"], true),
        rt("apps", "v1", "replicasets", "replicaset", "ReplicaSet", true, &["rs"], true),
        rt("apps", "v1", "statefulsets", "statefulset", "StatefulSet", true, &["sts"], true),
        rt("apps", "v1", "daemonsets", "daemonset", "DaemonSet", true, &["ds"], true),
        rt("batch", "v1", "jobs", "job", "Job", true, &[], true),
        rt("batch", "v1", "cronjobs", "cronjob", "CronJob", true, &["cj"], true),
        rt("networking.k8s.io", "v1", "ingresses", "ingress", "Ingress", true, &["ing"], true),
        rt("networking.k8s.io", "v1", "networkpolicies", "networkpolicy", "NetworkPolicy", true, &["netpol"], false),
        rt("rbac.authorization.k8s.io", "v1", "roles", "role", "Role", true, &[], false),
        rt("rbac.authorization.k8s.io", "v1", "rolebindings", "rolebinding", "RoleBinding", true, &[], false),
        rt("rbac.authorization.k8s.io", "v1", "clusterroles", "clusterrole", "ClusterRole", false, &[], false),
        rt("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "clusterrolebinding", "ClusterRoleBinding", false, &[], false),
        rt("policy", "v1", "poddisruptionbudgets", "poddisruptionbudget", "PodDisruptionBudget", true, &["pdb"], true),
        rt("autoscaling", "v2", "horizontalpodautoscalers", "horizontalpodautoscaler", "HorizontalPodAutoscaler", true, &["hpa"], true),
        rt("authorization.k8s.io", "v1", "selfsubjectaccessreviews", "selfsubjectaccessreview", "SelfSubjectAccessReview", false, &[], false),
        rt("apiextensions.k8s.io", "v1", "customresourcedefinitions", "customresourcedefinition", "CustomResourceDefinition", false, &["crd", "crds"], true),
    ]
}

/// A name for the table, which lives as long as the test process: the names of a custom
/// resource are leaked once per definition (a few bytes), so that every row stays `&'static`
/// like the built-in ones.
fn leak(text: &str) -> &'static str {
    Box::leak(text.to_string().into_boxed_str())
}

/// The type a CustomResourceDefinition defines, served in its storage version; `None` when
/// the definition lacks a group, names or a served version.
pub fn from_crd(crd: &Value) -> Option<ResourceType> {
    let spec = &crd["spec"];
    let names = &spec["names"];
    let versions = spec["versions"].as_array()?;
    let served = |v: &&Value| v["served"] != false;
    let version = versions
        .iter()
        .filter(served)
        .find(|v| v["storage"] == true)
        .or_else(|| versions.iter().find(served))?;
    let kind = names["kind"].as_str()?;
    let singular = names["singular"]
        .as_str()
        .map_or_else(|| kind.to_lowercase(), str::to_string);
    let short_names: Vec<&'static str> = names["shortNames"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(leak)
        .collect();
    Some(ResourceType {
        group: leak(spec["group"].as_str()?),
        version: leak(version["name"].as_str()?),
        plural: leak(names["plural"].as_str()?),
        singular: leak(&singular),
        kind: leak(kind),
        namespaced: spec["scope"] != "Cluster",
        short_names: Box::leak(short_names.into_boxed_slice()),
        status_subresource: !version["subresources"]["status"].is_null(),
    })
}

/// The server's version, as `/version` answers it.
///
/// A plain version as AKS reports it: a pre-release suffix such as `-outpost` would make helm
/// refuse every chart whose `kubeVersion` is a plain range like `>=1.25.0`.
pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "35",
        "gitVersion": "v1.35.0",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.25.0",
        "compiler": "gc",
        "platform": "linux/amd64"
    })
}

/// `/api`: the legacy core group's versions.
pub fn core_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}]
    })
}

/// The named groups with the versions each serves, in table order.
fn groups(resources: &[ResourceType]) -> Vec<(&'static str, Vec<&'static str>)> {
    let mut groups: Vec<(&'static str, Vec<&'static str>)> = Vec::new();
    for r in resources.iter().filter(|r| !r.group.is_empty()) {
        match groups.iter_mut().find(|(g, _)| *g == r.group) {
            Some((_, versions)) if !versions.contains(&r.version) => versions.push(r.version),
            Some(_) => {}
            None => groups.push((r.group, vec![r.version])),
        }
    }
    groups
}

/// `/apis`: every named group (legacy discovery, which clients accept when the server offers
/// no aggregated discovery).
pub fn group_list(resources: &[ResourceType]) -> Value {
    let groups: Vec<Value> = groups(resources)
        .into_iter()
        .map(|(group, versions)| {
            let versions: Vec<Value> = versions
                .iter()
                .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
                .collect();
            json!({
                "name": group,
                "versions": versions,
                "preferredVersion": versions[0].clone()
            })
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/apis/{group}`: one group, or `None` when it is not served.
pub fn group(resources: &[ResourceType], name: &str) -> Option<Value> {
    let list = group_list(resources);
    let group = list["groups"]
        .as_array()?
        .iter()
        .find(|g| g["name"] == name)?
        .clone();
    let mut group = group;
    group["kind"] = json!("APIGroup");
    group["apiVersion"] = json!("v1");
    Some(group)
}

/// `/api/v1` or `/apis/{group}/{version}`: the resources of one group-version, or `None`
/// when it is not served.
pub fn resource_list(resources: &[ResourceType], group: &str, version: &str) -> Option<Value> {
    let served: Vec<&ResourceType> = resources
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .collect();
    if served.is_empty() {
        return None;
    }
    let mut entries = Vec::new();
    for r in served {
        entries.push(json!({
            "name": r.plural,
            "singularName": r.singular,
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": if r.is_review() {
                json!(["create"])
            } else {
                json!(["create", "delete", "get", "list", "patch", "update", "watch"])
            },
            "shortNames": r.short_names,
            "categories": r.categories(),
        }));
        if r.status_subresource {
            entries.push(json!({
                "name": format!("{}/status", r.plural),
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        if r.has_scale() {
            entries.push(json!({
                "name": format!("{}/scale", r.plural),
                "singularName": "",
                "namespaced": r.namespaced,
                "group": "autoscaling",
                "version": "v1",
                "kind": "Scale",
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": entries
    }))
}

/// The key of a group-version in the OpenAPI v3 index, `api/v1` or `apis/apps/v1`.
fn openapi_key(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// `/openapi/v3`: the index of per-group-version documents.
pub fn openapi_index(resources: &[ResourceType]) -> Value {
    let mut paths = serde_json::Map::new();
    for r in resources {
        let key = openapi_key(r.group, r.version);
        let url = format!("/openapi/v3/{key}?hash=outpost-standin");
        paths.insert(key, json!({"serverRelativeURL": url}));
    }
    json!({"paths": paths})
}

/// `/openapi/v3/{api/v1|apis/group/version}`: a document that describes, for each resource
/// of the group-version, the PATCH operation with its `fieldValidation` parameter.
///
/// That is what clients look for to learn that the server validates fields itself: with it,
/// `kubectl apply` and `helm` send `fieldValidation=Strict` and skip the client-side schema
/// validation that would otherwise need the full OpenAPI v2 schema.
/// The PATCH request bodies list JSON patch, merge patch and apply patch, but not strategic
/// merge patch: clients then compute strategic merge patches from the types compiled into
/// them instead of from schemas this document does not carry.
pub fn openapi_document(resources: &[ResourceType], key: &str) -> Option<Value> {
    let served: Vec<&ResourceType> = resources
        .iter()
        .filter(|r| openapi_key(r.group, r.version) == key)
        .collect();
    if served.is_empty() {
        return None;
    }
    let mut paths = serde_json::Map::new();
    for r in served {
        let gvk = json!({"group": r.group, "version": r.version, "kind": r.kind});
        let item = if r.namespaced {
            format!(
                "{}/namespaces/{{namespace}}/{}/{{name}}",
                r.group_version_path(),
                r.plural
            )
        } else {
            format!("{}/{}/{{name}}", r.group_version_path(), r.plural)
        };
        let query = |name: &str| json!({"name": name, "in": "query", "schema": {"type": "string"}});
        let body_types = [
            "application/json-patch+json",
            "application/merge-patch+json",
            "application/apply-patch+yaml",
        ];
        let content: serde_json::Map<String, Value> = body_types
            .iter()
            .map(|t| (t.to_string(), json!({"schema": {"type": "object"}})))
            .collect();
        paths.insert(
            item,
            json!({
                "patch": {
                    "operationId": format!("patch{}", r.kind),
                    "x-kubernetes-action": "patch",
                    "x-kubernetes-group-version-kind": gvk,
                    "parameters": [
                        query("dryRun"),
                        query("fieldManager"),
                        query("fieldValidation"),
                        query("force"),
                    ],
                    "requestBody": {"content": content, "required": true},
                    "responses": {"200": {"description": "OK"}}
                }
            }),
        );
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.35.0-outpost-standin"},
        "paths": paths,
        "components": {"schemas": {}}
    }))
}
