//! Request bodies in Kubernetes' protobuf encoding (`application/vnd.kubernetes.protobuf`),
//! turned into the JSON the store keeps.
//!
//! Typed client-go clientsets send built-in objects as protobuf; helm's release storage
//! (Secrets, or ConfigMaps with the configmap driver), `--create-namespace`, typed deletes
//! (`DeleteOptions`) and `kubectl auth can-i` come this way.
//! The types are decoded with the `k8s-pb` bindings; only those kinds are converted, since
//! generic clients (kubectl, helm's resource handling) send JSON.
//! Answers are always JSON, which every client accepts.

use std::collections::BTreeMap;

use base64::Engine as _;
use k8s_pb::apimachinery::pkg::apis::meta::v1::{DeleteOptions, ObjectMeta};
use k8s_pb::apimachinery::pkg::runtime::Unknown;
use prost::Message as _;
use serde_json::{Map, Value, json};

/// Every protobuf body starts with these four bytes.
const MAGIC: &[u8] = b"k8s\0";

/// The kinds whose protobuf bodies are understood.
pub const KINDS: [&str; 5] = [
    "Secret",
    "ConfigMap",
    "Namespace",
    "DeleteOptions",
    "SelfSubjectAccessReview",
];

/// Decodes a protobuf body into JSON, or says why it cannot.
pub fn decode(body: &[u8]) -> Result<Value, String> {
    let envelope = body
        .strip_prefix(MAGIC)
        .ok_or("the body lacks the k8s protobuf magic prefix")?;
    let unknown = Unknown::decode(envelope).map_err(|e| format!("not a runtime.Unknown: {e}"))?;
    let type_meta = unknown.type_meta.unwrap_or_default();
    let kind = type_meta.kind.unwrap_or_default();
    let api_version = type_meta.api_version.unwrap_or_default();
    let raw = unknown.raw.unwrap_or_default();
    let bad = |e: prost::DecodeError| format!("not a valid {kind}: {e}");
    let mut object = match kind.as_str() {
        "Secret" => {
            let secret = k8s_pb::api::core::v1::Secret::decode(raw.as_slice()).map_err(bad)?;
            let mut o = Map::new();
            o.insert("metadata".into(), metadata(secret.metadata));
            if !secret.data.is_empty() {
                o.insert("data".into(), bytes_map(secret.data));
            }
            if !secret.string_data.is_empty() {
                o.insert("stringData".into(), json!(secret.string_data));
            }
            if let Some(t) = secret.r#type {
                o.insert("type".into(), json!(t));
            }
            if let Some(i) = secret.immutable {
                o.insert("immutable".into(), json!(i));
            }
            o
        }
        "ConfigMap" => {
            let map = k8s_pb::api::core::v1::ConfigMap::decode(raw.as_slice()).map_err(bad)?;
            let mut o = Map::new();
            o.insert("metadata".into(), metadata(map.metadata));
            if !map.data.is_empty() {
                o.insert("data".into(), json!(map.data));
            }
            if !map.binary_data.is_empty() {
                o.insert("binaryData".into(), bytes_map(map.binary_data));
            }
            if let Some(i) = map.immutable {
                o.insert("immutable".into(), json!(i));
            }
            o
        }
        "Namespace" => {
            let ns = k8s_pb::api::core::v1::Namespace::decode(raw.as_slice()).map_err(bad)?;
            let mut o = Map::new();
            o.insert("metadata".into(), metadata(ns.metadata));
            let finalizers = ns.spec.map(|s| s.finalizers).unwrap_or_default();
            o.insert("spec".into(), json!({"finalizers": finalizers}));
            o
        }
        "DeleteOptions" => {
            let options = DeleteOptions::decode(raw.as_slice()).map_err(bad)?;
            let mut o = Map::new();
            if let Some(p) = options.propagation_policy {
                o.insert("propagationPolicy".into(), json!(p));
            }
            if let Some(g) = options.grace_period_seconds {
                o.insert("gracePeriodSeconds".into(), json!(g));
            }
            if !options.dry_run.is_empty() {
                o.insert("dryRun".into(), json!(options.dry_run));
            }
            if let Some(p) = options.preconditions {
                let mut pre = Map::new();
                if let Some(uid) = p.uid {
                    pre.insert("uid".into(), json!(uid));
                }
                if let Some(rv) = p.resource_version {
                    pre.insert("resourceVersion".into(), json!(rv));
                }
                o.insert("preconditions".into(), Value::Object(pre));
            }
            o
        }
        "SelfSubjectAccessReview" => {
            let review =
                k8s_pb::api::authorization::v1::SelfSubjectAccessReview::decode(raw.as_slice())
                    .map_err(bad)?;
            let spec = review.spec.unwrap_or_default();
            let mut s = Map::new();
            if let Some(r) = spec.resource_attributes {
                let attributes: Map<String, Value> = [
                    ("namespace", r.namespace),
                    ("verb", r.verb),
                    ("group", r.group),
                    ("version", r.version),
                    ("resource", r.resource),
                    ("subresource", r.subresource),
                    ("name", r.name),
                ]
                .into_iter()
                .filter_map(|(k, v)| v.map(|v| (k.to_string(), json!(v))))
                .collect();
                s.insert("resourceAttributes".into(), Value::Object(attributes));
            }
            if let Some(n) = spec.non_resource_attributes {
                s.insert(
                    "nonResourceAttributes".into(),
                    json!({"path": n.path, "verb": n.verb}),
                );
            }
            let mut o = Map::new();
            o.insert("metadata".into(), metadata(review.metadata));
            o.insert("spec".into(), Value::Object(s));
            o
        }
        other => {
            return Err(format!(
                "the stand-in decodes protobuf bodies of {} only, not {other:?}; send JSON",
                KINDS.join(", ")
            ));
        }
    };
    object.insert("apiVersion".into(), json!(api_version));
    object.insert("kind".into(), json!(kind));
    Ok(Value::Object(object))
}

fn bytes_map(map: BTreeMap<String, Vec<u8>>) -> Value {
    let engine = base64::engine::general_purpose::STANDARD;
    Value::Object(
        map.into_iter()
            .map(|(k, v)| (k, json!(engine.encode(v))))
            .collect(),
    )
}

/// The client-settable part of `ObjectMeta`; timestamps are the server's to set.
fn metadata(meta: Option<ObjectMeta>) -> Value {
    let meta = meta.unwrap_or_default();
    let mut o = Map::new();
    let mut text = |key: &str, value: Option<String>| {
        if let Some(v) = value.filter(|v| !v.is_empty()) {
            o.insert(key.into(), json!(v));
        }
    };
    text("name", meta.name);
    text("generateName", meta.generate_name);
    text("namespace", meta.namespace);
    text("uid", meta.uid);
    text("resourceVersion", meta.resource_version);
    if let Some(g) = meta.generation {
        o.insert("generation".into(), json!(g));
    }
    if !meta.labels.is_empty() {
        o.insert("labels".into(), json!(meta.labels));
    }
    if !meta.annotations.is_empty() {
        o.insert("annotations".into(), json!(meta.annotations));
    }
    if !meta.finalizers.is_empty() {
        o.insert("finalizers".into(), json!(meta.finalizers));
    }
    if !meta.owner_references.is_empty() {
        let owners: Vec<Value> = meta
            .owner_references
            .into_iter()
            .map(|r| {
                json!({
                    "apiVersion": r.api_version,
                    "kind": r.kind,
                    "name": r.name,
                    "uid": r.uid,
                    "controller": r.controller,
                    "blockOwnerDeletion": r.block_owner_deletion
                })
            })
            .collect();
        o.insert("ownerReferences".into(), json!(owners));
    }
    Value::Object(o)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_pb::apimachinery::pkg::runtime::TypeMeta;

    fn envelope(kind: &str, raw: Vec<u8>) -> Vec<u8> {
        let unknown = Unknown {
            type_meta: Some(TypeMeta {
                api_version: Some("v1".into()),
                kind: Some(kind.into()),
            }),
            raw: Some(raw),
            content_encoding: None,
            content_type: None,
        };
        let mut body = MAGIC.to_vec();
        body.extend(unknown.encode_to_vec());
        body
    }

    #[test]
    fn a_protobuf_secret_becomes_its_json() {
        let secret = k8s_pb::api::core::v1::Secret {
            metadata: Some(ObjectMeta {
                name: Some("sh.helm.release.v1.web.v1".into()),
                labels: BTreeMap::from([("owner".into(), "helm".into())]),
                ..Default::default()
            }),
            data: BTreeMap::from([("release".into(), b"abc".to_vec())]),
            r#type: Some("helm.sh/release.v1".into()),
            ..Default::default()
        };
        let json = decode(&envelope("Secret", secret.encode_to_vec())).expect("decodes");
        assert_eq!(
            json,
            json!({
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "sh.helm.release.v1.web.v1", "labels": {"owner": "helm"}},
                "data": {"release": "YWJj"},
                "type": "helm.sh/release.v1"
            })
        );
        assert!(decode(&envelope("Pod", Vec::new())).is_err());
        assert!(decode(b"{}").is_err());
    }
}
