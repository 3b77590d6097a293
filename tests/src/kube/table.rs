//! Server-side printing: the `Table` objects `kubectl get` asks for (`Accept: …;as=Table`),
//! with a few columns per kind as the real server's printers have them, and `Age` for all.

use serde_json::{Value, json};

use super::resources::ResourceType;

/// Whether an `Accept` header asks for a Table.
pub fn wanted(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| a.contains("as=Table"))
}

/// A cell computed from an object.
type Cell = fn(&Value) -> Value;

fn count(value: &Value) -> Value {
    json!(value.as_i64().unwrap_or(0))
}

fn ready_of(object: &Value) -> Value {
    let status = &object["status"];
    json!(format!(
        "{}/{}",
        status["readyReplicas"].as_i64().unwrap_or(0),
        object["spec"]["replicas"].as_i64().unwrap_or(0)
    ))
}

fn entries(value: &Value) -> usize {
    value.as_object().map_or(0, |m| m.len())
}

fn ports(object: &Value) -> Value {
    let ports: Vec<String> = object["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            format!(
                "{}/{}",
                p["port"].as_i64().unwrap_or(0),
                p["protocol"].as_str().unwrap_or("TCP")
            )
        })
        .collect();
    json!(if ports.is_empty() {
        "<none>".to_string()
    } else {
        ports.join(",")
    })
}

/// The columns between Name and Age, by kind.
fn columns(rt: &ResourceType) -> Vec<(&'static str, &'static str, Cell)> {
    match (rt.group, rt.kind) {
        ("apps", "Deployment") => vec![
            ("Ready", "string", ready_of),
            ("Up-to-date", "integer", |o| {
                count(&o["status"]["updatedReplicas"])
            }),
            ("Available", "integer", |o| {
                count(&o["status"]["availableReplicas"])
            }),
        ],
        ("apps", "StatefulSet" | "ReplicaSet") => vec![("Ready", "string", ready_of)],
        ("", "Service") => vec![
            ("Type", "string", |o| o["spec"]["type"].clone()),
            ("Cluster-IP", "string", |o| o["spec"]["clusterIP"].clone()),
            ("External-IP", "string", |o| {
                o["status"]["loadBalancer"]["ingress"][0]["ip"]
                    .as_str()
                    .map_or(json!("<none>"), |ip| json!(ip))
            }),
            ("Port(s)", "string", ports),
        ],
        ("", "ConfigMap") => vec![("Data", "integer", |o| {
            json!(entries(&o["data"]) + entries(&o["binaryData"]))
        })],
        ("", "Secret") => vec![
            ("Type", "string", |o| o["type"].clone()),
            ("Data", "integer", |o| json!(entries(&o["data"]))),
        ],
        ("", "Namespace") => vec![("Status", "string", |o| o["status"]["phase"].clone())],
        ("", "Pod") => vec![
            ("Ready", "string", |o| {
                let statuses = o["status"]["containerStatuses"].as_array();
                let ready = statuses
                    .into_iter()
                    .flatten()
                    .filter(|c| c["ready"] == true)
                    .count();
                let all = o["spec"]["containers"].as_array().map_or(0, Vec::len);
                json!(format!("{ready}/{all}"))
            }),
            ("Status", "string", |o| o["status"]["phase"].clone()),
        ],
        _ => Vec::new(),
    }
}

/// How long ago `timestamp` was, the way `kubectl` shows ages (`42s`, `3m12s`, `5h`, `2d`).
fn age(timestamp: &Value) -> String {
    let Some(created) = timestamp
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
    else {
        return "<unknown>".into();
    };
    let seconds = (chrono::Utc::now() - created.with_timezone(&chrono::Utc))
        .num_seconds()
        .max(0);
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 3 * 3600 => format!("{}m", s / 60),
        s if s < 48 * 3600 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// A Table of `objects`; `with_columns` false leaves out the column definitions, as for watch
/// events after the first.
pub fn table(
    rt: &ResourceType,
    objects: &[&Value],
    resource_version: &str,
    with_columns: bool,
) -> Value {
    let extra = columns(rt);
    let rows: Vec<Value> = objects
        .iter()
        .map(|object| {
            let mut cells = vec![object["metadata"]["name"].clone()];
            cells.extend(extra.iter().map(|(_, _, cell)| cell(object)));
            cells.push(json!(age(&object["metadata"]["creationTimestamp"])));
            json!({
                "cells": cells,
                "object": {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": object["metadata"]
                }
            })
        })
        .collect();
    let mut table = json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version},
        "rows": rows
    });
    if with_columns {
        let column = |name: &str, kind: &str, format: &str| json!({"name": name, "type": kind, "format": format, "description": "", "priority": 0});
        let mut definitions = vec![column("Name", "string", "name")];
        definitions.extend(extra.iter().map(|(name, kind, _)| column(name, kind, "")));
        definitions.push(column("Age", "string", ""));
        table["columnDefinitions"] = json!(definitions);
    }
    table
}
