//! The patch types `kubectl` and `helm` send: JSON patch (RFC 6902) and JSON merge patch
//! (RFC 7386) through the `json-patch` crate, and two approximations written here because no
//! crate implements them outside Go: strategic merge patch and server-side apply.

use serde_json::{Map, Value};

/// The patch formats of `PATCH` requests, by their `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    /// `application/json-patch+json`.
    Json,
    /// `application/merge-patch+json`.
    Merge,
    /// `application/strategic-merge-patch+json`.
    StrategicMerge,
    /// `application/apply-patch+yaml` (server-side apply).
    Apply,
}

impl PatchType {
    /// The patch type a `Content-Type` header names, if any.
    pub fn from_content_type(content_type: &str) -> Option<PatchType> {
        let essence = content_type.split(';').next().unwrap_or("").trim();
        match essence {
            "application/json-patch+json" => Some(PatchType::Json),
            "application/merge-patch+json" => Some(PatchType::Merge),
            "application/strategic-merge-patch+json" => Some(PatchType::StrategicMerge),
            "application/apply-patch+yaml" => Some(PatchType::Apply),
            _ => None,
        }
    }
}

/// Applies an RFC 6902 JSON patch; the error is the crate's description of the failing
/// operation.
pub fn json_patch(target: &mut Value, patch: &Value) -> Result<(), String> {
    let patch: json_patch::Patch =
        serde_json::from_value(patch.clone()).map_err(|e| format!("invalid JSON patch: {e}"))?;
    json_patch::patch(target, &patch).map_err(|e| e.to_string())
}

/// Applies an RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    json_patch::merge(target, patch);
}

/// The merge key of a list field in the built-in types, from the `patchMergeKey` tags of the
/// Kubernetes Go types; lists without one are replaced as a whole.
///
/// `ports` is keyed by `containerPort` in containers and by `port` in services, so the key is
/// chosen by which of the two the elements carry.
fn merge_key(field: &str, items: &[Value]) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets" => "name",
        "volumeMounts" | "volumeDevices" => "mountPath",
        "conditions" => "type",
        "ownerReferences" => "uid",
        "hostAliases" => "ip",
        "topologySpreadConstraints" => "topologyKey",
        "ports" => {
            if items.iter().any(|i| i.get("containerPort").is_some()) {
                "containerPort"
            } else {
                "port"
            }
        }
        _ => return None,
    })
}

/// Whether `value` is a map carrying the `$patch: delete` directive.
fn is_delete(value: &Value) -> bool {
    value.get("$patch").and_then(Value::as_str) == Some("delete")
}

/// `value` without the `$`-directives strategic merge patches carry.
fn without_directives(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), without_directives(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .filter(|i| !i.get("$patch").is_some_and(|p| p == "replace"))
                .map(without_directives)
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Applies a strategic merge patch the way the real server does for the built-in types, as far
/// as the patches `kubectl apply` and `helm` compute go: maps are merged, `null` deletes a key,
/// lists of the fields in [`merge_key`] are merged element by element by their key (honouring
/// `$patch: delete` elements, `$setElementOrder/…` and `$deleteFromPrimitiveList/…`), other
/// lists are replaced, `$patch: replace` replaces a map and `$retainKeys` drops the keys it
/// does not list.
pub fn strategic_merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if p.get("$patch").and_then(Value::as_str) == Some("replace") {
        *target = without_directives(patch);
        return;
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().expect("made an object above");
    if let Some(Value::Array(keep)) = p.get("$retainKeys") {
        t.retain(|k, _| keep.iter().any(|x| x == k.as_str()));
    }
    let mut orders = Vec::new();
    for (key, value) in p {
        if let Some(field) = key.strip_prefix("$setElementOrder/") {
            orders.push((field.to_string(), value));
            continue;
        }
        if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Value::Array(gone)) = (t.get_mut(field), value) {
                list.retain(|v| !gone.contains(v));
            }
            continue;
        }
        if key.starts_with('$') {
            continue;
        }
        match value {
            Value::Null => {
                t.remove(key);
            }
            Value::Object(_) if is_delete(value) => {
                t.remove(key);
            }
            Value::Object(_) => {
                strategic_merge_patch(t.entry(key.clone()).or_insert(Value::Null), value);
            }
            Value::Array(items) => {
                merge_list(key, t.entry(key.clone()).or_insert(Value::Null), items)
            }
            other => {
                t.insert(key.clone(), other.clone());
            }
        }
    }
    for (field, order) in orders {
        reorder(t.get_mut(&field), order);
    }
}

fn merge_list(field: &str, target: &mut Value, items: &[Value]) {
    let replace = items
        .iter()
        .any(|i| i.get("$patch").is_some_and(|p| p == "replace"));
    let key = merge_key(field, items);
    let (Some(key), false, Value::Array(existing)) = (key, replace, &mut *target) else {
        *target = without_directives(&Value::Array(items.to_vec()));
        return;
    };
    for item in items {
        let id = &item[key];
        let position = existing.iter().position(|e| &e[key] == id);
        match position {
            Some(i) if is_delete(item) => {
                existing.remove(i);
            }
            Some(i) => strategic_merge_patch(&mut existing[i], item),
            None if is_delete(item) => {}
            None => existing.push(without_directives(item)),
        }
    }
}

/// Orders a merged list as a `$setElementOrder/…` directive says; elements it does not name
/// keep their relative order after the named ones.
fn reorder(list: Option<&mut Value>, order: &Value) {
    let (Some(Value::Array(list)), Value::Array(order)) = (list, order) else {
        return;
    };
    let rank = |element: &Value| {
        order.iter().position(|o| match o {
            Value::Object(keys) => keys.iter().all(|(k, v)| &element[k] == v),
            primitive => primitive == element,
        })
    };
    list.sort_by_key(|e| rank(e).unwrap_or(usize::MAX));
}

/// The merge patch that turns `previous` into `next`: keys `previous` had and `next` lacks
/// become `null`, maps present in both are compared key by key.
fn merge_diff(previous: &Value, next: &Value) -> Value {
    match (previous, next) {
        (Value::Object(p), Value::Object(n)) => {
            let mut out = Map::new();
            for key in p.keys().filter(|k| !n.contains_key(*k)) {
                out.insert(key.clone(), Value::Null);
            }
            for (key, value) in n {
                let diff = match p.get(key) {
                    Some(old) => merge_diff(old, value),
                    None => value.clone(),
                };
                out.insert(key.clone(), diff);
            }
            Value::Object(out)
        }
        _ => next.clone(),
    }
}

/// Server-side apply, approximated: the applied configuration is merged into the live object,
/// and fields the same field manager applied last time but no longer applies are removed.
///
/// Lists are replaced as a whole, and there are no ownership conflicts between field managers:
/// the real server merges lists by their list-map keys and refuses to take over another
/// manager's fields without `force=true`.
pub fn server_side_apply(live: &mut Value, previously_applied: Option<&Value>, applied: &Value) {
    let empty = Value::Object(Map::new());
    let patch = merge_diff(previously_applied.unwrap_or(&empty), applied);
    merge_patch(live, &patch);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strategic_merge_merges_containers_by_name() {
        let mut live = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "web", "image": "web:1", "env": [{"name": "A", "value": "1"}]},
            {"name": "sidecar", "image": "proxy:1"}
        ]}}}});
        let patch = json!({"spec": {"template": {"spec": {
            "$setElementOrder/containers": [{"name": "sidecar"}, {"name": "web"}],
            "containers": [{"name": "web", "image": "web:2"}, {"name": "gone", "$patch": "delete"}]
        }}}});
        strategic_merge_patch(&mut live, &patch);
        assert_eq!(
            live,
            json!({"spec": {"template": {"spec": {"containers": [
                {"name": "sidecar", "image": "proxy:1"},
                {"name": "web", "image": "web:2", "env": [{"name": "A", "value": "1"}]}
            ]}}}})
        );
        strategic_merge_patch(&mut live, &json!({"spec": {"template": null}}));
        assert_eq!(live, json!({"spec": {}}));
    }

    #[test]
    fn strategic_merge_replaces_unkeyed_lists_and_deletes_nulls() {
        let mut live = json!({"data": {"a": "1", "b": "2"}, "args": ["x", "y"]});
        strategic_merge_patch(
            &mut live,
            &json!({"data": {"a": null, "c": "3"}, "args": ["z"]}),
        );
        assert_eq!(live, json!({"data": {"b": "2", "c": "3"}, "args": ["z"]}));
    }

    #[test]
    fn apply_removes_what_the_manager_stopped_applying() {
        let first = json!({"metadata": {"labels": {"a": "1", "b": "2"}}, "data": {"x": "1"}});
        let mut live = json!({});
        server_side_apply(&mut live, None, &first);
        live["metadata"]["labels"]["other"] = json!("kept");
        let second = json!({"metadata": {"labels": {"a": "1"}}, "data": {"x": "2"}});
        server_side_apply(&mut live, Some(&first), &second);
        assert_eq!(
            live,
            json!({"metadata": {"labels": {"a": "1", "other": "kept"}}, "data": {"x": "2"}})
        );
    }
}
