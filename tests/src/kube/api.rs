//! The HTTP side: authentication, the request record, discovery, and generic create, read,
//! update, patch, delete, list and watch over every type in the resource table.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::KubeRequest;
use super::patch::{self, PatchType};
use super::protobuf;
use super::resources::{self, ResourceType};
use super::selectors::{FieldSelector, LabelSelector};
use super::store::{self, Change, Event, Key, Store};
use super::table;

/// Everything the handlers share.
pub struct Shared {
    /// The objects.
    pub store: Mutex<Store>,
    /// The bearer tokens that are let in.
    pub tokens: Mutex<HashSet<String>>,
    /// A test's own rule for tokens not in `tokens` (say, any token an identity stand-in
    /// issued).
    pub token_rule: Mutex<Option<TokenRule>>,
    /// Every request answered, in order.
    pub requests: Mutex<Vec<KubeRequest>>,
    /// The address `/api` names as the server's.
    pub server_address: String,
}

/// A rule that decides whether a bearer token is let in.
pub type TokenRule = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// How long the namespace controller takes to empty and remove a deleted namespace: clients
/// that delete a namespace and then its objects (`kubectl delete -f` of a manifest that holds
/// both) find them still there, as on a real cluster.
const NAMESPACE_FINALIZE_DELAY: Duration = Duration::from_millis(500);

impl Shared {
    fn rule_accepts(&self, token: &str) -> bool {
        // The rule is cloned out of the lock so that it may take its time, or lock things
        // of its own, without holding up other requests.
        let rule = lock(&self.token_rule).clone();
        rule.is_some_and(|rule| rule(token))
    }
}

/// Locks a mutex, shrugging off a panic in another holder: the data stays usable for a test.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// An error answered as a `Status` object, as the real server does.
#[derive(Debug)]
pub struct ApiError {
    code: StatusCode,
    reason: &'static str,
    message: String,
    details: Option<Value>,
}

impl ApiError {
    fn new(code: StatusCode, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    fn with_details(mut self, rt: &ResourceType, name: &str) -> ApiError {
        self.details = Some(json!({"name": name, "group": rt.group, "kind": rt.plural}));
        self
    }

    fn not_found(rt: &ResourceType, name: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{} \"{name}\" not found", qualified(rt)),
        )
        .with_details(rt, name)
    }

    fn namespace_not_found(namespace: &str) -> ApiError {
        ApiError {
            code: StatusCode::NOT_FOUND,
            reason: "NotFound",
            message: format!("namespaces \"{namespace}\" not found"),
            details: Some(json!({"name": namespace, "kind": "namespaces"})),
        }
    }

    fn path_not_found() -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code.as_u16()
        });
        if let Some(details) = self.details {
            status["details"] = details;
        }
        json_response(self.code, &status)
    }
}

/// `deployments.apps`, or `configmaps` for the core group, as messages name a resource.
fn qualified(rt: &ResourceType) -> String {
    if rt.group.is_empty() {
        rt.plural.to_string()
    } else {
        format!("{}.{}", rt.plural, rt.group)
    }
}

fn json_response(code: StatusCode, value: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(value).expect("a JSON value serialises"),
    )
        .into_response()
}

fn ok(value: &Value) -> Result<Response, ApiError> {
    Ok(json_response(StatusCode::OK, value))
}

/// The bearer token of a request, if it carries one.
fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
}

/// The one handler: authenticates, answers, and records the request with the answer's status.
pub async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let token = bearer(&headers);
    let allowed = token.as_ref().is_some_and(|t| {
        let listed = lock(&shared.tokens).contains(t);
        listed || shared.rule_accepts(t)
    });
    let response = if allowed {
        route(&shared, &method, &uri, &headers, &body).unwrap_or_else(IntoResponse::into_response)
    } else {
        ApiError::new(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized").into_response()
    };
    let text = |name: header::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    lock(&shared.requests).push(KubeRequest {
        method: method.to_string(),
        path: uri.path().to_string(),
        query: uri.query().unwrap_or_default().to_string(),
        content_type: text(header::CONTENT_TYPE),
        user_agent: text(header::USER_AGENT),
        token,
        body_size: body.len(),
        status: response.status().as_u16(),
    });
    response
}

/// A request's query parameters.
struct Query(HashMap<String, String>);

impl Query {
    fn parse(uri: &Uri) -> Query {
        Query(
            form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
                .into_owned()
                .collect(),
        )
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    fn flag(&self, name: &str) -> bool {
        matches!(self.get(name), Some("true" | "1"))
    }

    fn dry_run(&self) -> bool {
        self.get("dryRun") == Some("All")
    }

    fn selectors(&self) -> Result<(LabelSelector, FieldSelector), ApiError> {
        let labels = LabelSelector::parse(self.get("labelSelector").unwrap_or_default())
            .map_err(|e| ApiError::bad_request(format!("unable to parse requirement: {e}")))?;
        let fields = FieldSelector::parse(self.get("fieldSelector").unwrap_or_default())
            .map_err(ApiError::bad_request)?;
        Ok((labels, fields))
    }
}

/// What a resource path addresses.
struct Target<'a> {
    rt: &'a ResourceType,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn route(
    shared: &Arc<Shared>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let path = uri.path().trim_end_matches('/');
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let resources = lock(&shared.store).resources().to_vec();
    let resources = &resources;
    let (group, version, rest) = match segments.as_slice() {
        ["version"] => return ok(&resources::version()),
        ["healthz" | "livez" | "readyz"] => {
            return Ok((StatusCode::OK, "ok").into_response());
        }
        ["api"] => return ok(&resources::core_versions(&shared.server_address)),
        ["apis"] => return ok(&resources::group_list(resources)),
        ["apis", group] => {
            return resources::group(resources, group)
                .map(|g| json_response(StatusCode::OK, &g))
                .ok_or_else(ApiError::path_not_found);
        }
        ["openapi", "v3"] => return ok(&resources::openapi_index(resources)),
        ["openapi", "v3", key @ ..] => {
            return resources::openapi_document(resources, &key.join("/"))
                .map(|d| json_response(StatusCode::OK, &d))
                .ok_or_else(ApiError::path_not_found);
        }
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Err(ApiError::path_not_found()),
    };
    let find = |plural: &str| {
        resources
            .iter()
            .find(|r| r.group == group && r.version == version && r.plural == plural)
    };
    let target = match rest {
        [] => {
            return resources::resource_list(resources, group, version)
                .map(|l| json_response(StatusCode::OK, &l))
                .ok_or_else(ApiError::path_not_found);
        }
        ["namespaces", namespace, plural, tail @ ..]
            if find(plural).is_some_and(|r| r.namespaced) =>
        {
            Target {
                rt: find(plural).expect("checked above"),
                namespace: Some(namespace.to_string()),
                name: tail.first().map(|s| s.to_string()),
                subresource: tail.get(1).map(|s| s.to_string()),
            }
        }
        [plural, tail @ ..] => {
            let rt = find(plural).ok_or_else(ApiError::path_not_found)?;
            if rt.namespaced && !tail.is_empty() {
                return Err(ApiError::path_not_found());
            }
            Target {
                rt,
                namespace: None,
                name: tail.first().map(|s| s.to_string()),
                subresource: tail.get(1).map(|s| s.to_string()),
            }
        }
    };
    let query = Query::parse(uri);
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let as_table = table::wanted(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    match target.subresource.as_deref() {
        None => {}
        Some("status") if target.rt.status_subresource => {}
        Some("scale") if target.rt.has_scale() && target.name.is_some() => {
            return scale(shared, &target, method, &query, content_type, body);
        }
        Some(_) => return Err(ApiError::path_not_found()),
    }
    match (method, target.name.is_some()) {
        (&Method::GET, false) if query.flag("watch") => watch(shared, &target, &query, as_table),
        (&Method::GET, false) => list(shared, &target, &query, as_table),
        (&Method::GET, true) => get(shared, &target, as_table),
        (&Method::POST, false) => create(shared, &target, &query, content_type, body),
        (&Method::PUT, true) => update(shared, &target, &query, content_type, body),
        (&Method::PATCH, true) => patch_object(shared, &target, &query, content_type, body),
        (&Method::DELETE, true) => {
            let options = delete_options(content_type, body)?;
            delete(shared, &target, &query, &options)
        }
        (&Method::DELETE, false) => {
            let options = delete_options(content_type, body)?;
            delete_collection(shared, &target, &query, &options)
        }
        _ => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )),
    }
}

/// Whether `rt` is the type of CustomResourceDefinitions, whose objects add served types.
fn is_crd(rt: &ResourceType) -> bool {
    (rt.group, rt.kind) == ("apiextensions.k8s.io", "CustomResourceDefinition")
}

/// The key a target names, checking that a namespaced type got a namespace.
fn key_of(target: &Target, name: &str) -> Key {
    Key::new(
        target.rt,
        target.namespace.as_deref().unwrap_or_default(),
        name,
    )
}

fn parse_body(content_type: &str, body: &Bytes) -> Result<Value, ApiError> {
    let value: Value = if content_type.contains("protobuf") {
        protobuf::decode(body).map_err(|e| {
            ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                e,
            )
        })?
    } else if content_type.contains("yaml") {
        serde_yaml_ng::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("the body is not valid YAML: {e}")))?
    } else if content_type.contains("json") {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?
    } else {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            format!("the stand-in reads JSON and YAML bodies, not {content_type}"),
        ));
    };
    if !value.is_object() {
        return Err(ApiError::bad_request("the body is not an object"));
    }
    Ok(value)
}

fn get(shared: &Shared, target: &Target, as_table: bool) -> Result<Response, ApiError> {
    let name = target.name.as_deref().expect("routed with a name");
    let store = lock(&shared.store);
    let object = store
        .get(&key_of(target, name))
        .ok_or_else(|| ApiError::not_found(target.rt, name))?;
    if as_table && target.subresource.is_none() {
        let version = object["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default();
        return ok(&table::table(target.rt, &[object], version, true));
    }
    ok(object)
}

fn list(
    shared: &Shared,
    target: &Target,
    query: &Query,
    as_table: bool,
) -> Result<Response, ApiError> {
    let (labels, fields) = query.selectors()?;
    let store = lock(&shared.store);
    let selected: Vec<&Value> = store
        .list(
            target.rt.group,
            target.rt.plural,
            target.namespace.as_deref(),
        )
        .into_iter()
        .filter(|o| labels.matches(o) && fields.matches(o))
        .collect();
    let version = store.resource_version().to_string();
    if as_table {
        return ok(&table::table(target.rt, &selected, &version, true));
    }
    let items: Vec<Value> = selected.into_iter().cloned().collect();
    ok(&json!({
        "kind": format!("{}List", target.rt.kind),
        "apiVersion": target.rt.api_version(),
        "metadata": {"resourceVersion": version},
        "items": items
    }))
}

/// Checks what the body says about its own type, name and namespace against the path.
fn check_identity(target: &Target, object: &mut Value, name: Option<&str>) -> Result<(), ApiError> {
    let rt = target.rt;
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let kind = object["kind"].as_str().unwrap_or_default();
    if (!api_version.is_empty() && api_version != rt.api_version())
        || (!kind.is_empty() && kind != rt.kind)
    {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({api_version}) and kind ({kind}) do not match the \
             expected {} {}",
            rt.api_version(),
            rt.kind
        )));
    }
    object["apiVersion"] = json!(rt.api_version());
    object["kind"] = json!(rt.kind);
    if !object["metadata"].is_object() {
        object["metadata"] = json!({});
    }
    if let Some(namespace) = &target.namespace {
        match object["metadata"]["namespace"].as_str() {
            Some(ns) if ns != namespace => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent \
                     on the request",
                ));
            }
            _ => object["metadata"]["namespace"] = json!(namespace),
        }
    } else if let Some(meta) = object["metadata"].as_object_mut() {
        meta.remove("namespace");
    }
    if let Some(name) = name {
        match object["metadata"]["name"].as_str() {
            Some(n) if n != name => {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({n}) does not match the name on the URL ({name})"
                )));
            }
            _ => object["metadata"]["name"] = json!(name),
        }
    }
    Ok(())
}

/// Whether two objects differ outside `metadata` and `status`: what makes a new generation.
fn spec_changed(old: &Value, new: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(o) = v.as_object_mut() {
            o.remove("metadata");
            o.remove("status");
        }
        v
    };
    strip(old) != strip(new)
}

/// Stores a new or changed object the way the real server does: server-set metadata, defaults,
/// the status rules of types with a status subresource, a new resource version unless nothing
/// changed, and nothing at all for a dry run. Returns the stored (or would-be) object and
/// whether it was created.
fn write(
    store: &mut Store,
    target: &Target,
    old: Option<&Value>,
    mut object: Value,
    dry_run: bool,
) -> Result<(Value, bool), ApiError> {
    let rt = target.rt;
    let name = object["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let key = key_of(target, &name);
    let status_write = target.subresource.as_deref() == Some("status");
    match old {
        None => {
            let meta = &mut object["metadata"];
            meta["uid"] = json!(uuid::Uuid::now_v7().to_string());
            meta["creationTimestamp"] = json!(store::now());
            meta["generation"] = json!(1);
            if let Some(m) = meta.as_object_mut() {
                m.remove("resourceVersion");
                m.remove("deletionTimestamp");
            }
            if rt.status_subresource
                && let Some(o) = object.as_object_mut()
            {
                o.remove("status");
            }
        }
        Some(old) => {
            if status_write {
                let status = object["status"].clone();
                object = old.clone();
                object["status"] = status;
            } else if rt.status_subresource {
                object["status"] = old["status"].clone();
                if object["status"].is_null()
                    && let Some(o) = object.as_object_mut()
                {
                    o.remove("status");
                }
            }
            let meta = &mut object["metadata"];
            for field in ["uid", "creationTimestamp", "generation"] {
                meta[field] = old["metadata"][field].clone();
            }
        }
    }
    if !status_write {
        store::apply_defaults(rt, old, &mut object, store);
        if let Some(old) = old
            && spec_changed(old, &object)
        {
            let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
            object["metadata"]["generation"] = json!(generation + 1);
        }
        let stalled = store.rollouts_stalled;
        store::reconcile_status(rt, old, &mut object, stalled);
    }
    if let Some(old) = old {
        let mut unchanged = object.clone();
        unchanged["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        if &unchanged == old {
            return Ok((old.clone(), false));
        }
    }
    if dry_run {
        return Ok((object, old.is_none()));
    }
    let resource_version = store.next_resource_version();
    object["metadata"]["resourceVersion"] = json!(resource_version.to_string());
    store.put(key, object.clone(), resource_version);
    if is_crd(rt)
        && let Some(custom) = resources::from_crd(&object)
    {
        store.register(custom);
    }
    Ok((object, old.is_none()))
}

fn namespace_key(name: &str) -> Key {
    Key {
        group: String::new(),
        plural: "namespaces".into(),
        namespace: String::new(),
        name: name.to_string(),
    }
}

/// Refuses to create objects in a namespace that does not exist or is being deleted.
fn require_namespace(store: &Store, target: &Target) -> Result<(), ApiError> {
    let Some(namespace) = &target.namespace else {
        return Ok(());
    };
    match store.get(&namespace_key(namespace)) {
        Some(ns) if !ns["metadata"]["deletionTimestamp"].is_null() => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!(
                "unable to create new content in namespace {namespace} because it is being \
                 terminated"
            ),
        )),
        Some(_) => Ok(()),
        None => Err(ApiError::namespace_not_found(namespace)),
    }
}

fn create(
    shared: &Shared,
    target: &Target,
    query: &Query,
    content_type: &str,
    body: &Bytes,
) -> Result<Response, ApiError> {
    if target.rt.namespaced && target.namespace.is_none() {
        return Err(ApiError::path_not_found());
    }
    let mut object = parse_body(content_type, body)?;
    check_identity(target, &mut object, None)?;
    if target.rt.is_review() {
        // Every accepted token may do everything: there is no RBAC to consult.
        object["status"] = json!({
            "allowed": true,
            "reason": "the Kubernetes API stand-in allows every request with an accepted token"
        });
        return Ok(json_response(StatusCode::CREATED, &object));
    }
    if object["metadata"]["name"]
        .as_str()
        .is_none_or(str::is_empty)
    {
        match object["metadata"]["generateName"].as_str() {
            Some(prefix) => {
                let suffix = &uuid::Uuid::now_v7().simple().to_string()[27..];
                object["metadata"]["name"] = json!(format!("{prefix}{suffix}"));
            }
            None => {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    format!(
                        "{} \"\" is invalid: metadata.name: Required value",
                        target.rt.kind
                    ),
                ));
            }
        }
    }
    let name = object["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut store = lock(&shared.store);
    require_namespace(&store, target)?;
    if store.get(&key_of(target, &name)).is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", qualified(target.rt)),
        )
        .with_details(target.rt, &name));
    }
    let (object, _) = write(&mut store, target, None, object, query.dry_run())?;
    Ok(json_response(StatusCode::CREATED, &object))
}

fn update(
    shared: &Shared,
    target: &Target,
    query: &Query,
    content_type: &str,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let name = target.name.as_deref().expect("routed with a name");
    let mut object = parse_body(content_type, body)?;
    check_identity(target, &mut object, Some(name))?;
    let mut store = lock(&shared.store);
    let old = store
        .get(&key_of(target, name))
        .cloned()
        .ok_or_else(|| ApiError::not_found(target.rt, name))?;
    let sent = object["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default();
    if !sent.is_empty() && old["metadata"]["resourceVersion"] != sent {
        return Err(conflict(target.rt, name));
    }
    let (object, _) = write(&mut store, target, Some(&old), object, query.dry_run())?;
    ok(&object)
}

fn conflict(rt: &ResourceType, name: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
             please apply your changes to the latest version and try again",
            qualified(rt)
        ),
    )
    .with_details(rt, name)
}

fn patch_type(content_type: &str) -> Result<PatchType, ApiError> {
    PatchType::from_content_type(content_type).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types \
                 include: application/json-patch+json, application/merge-patch+json, \
                 application/apply-patch+yaml, application/strategic-merge-patch+json; got \
                 {content_type}"
            ),
        )
    })
}

/// Applies a JSON, merge or strategic merge patch (server-side apply has its own path).
fn apply_patch(patch_type: PatchType, object: &mut Value, patch: &Value) -> Result<(), ApiError> {
    match patch_type {
        PatchType::Json => patch::json_patch(object, patch)
            .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", e))?,
        PatchType::Merge => patch::merge_patch(object, patch),
        PatchType::StrategicMerge => patch::strategic_merge_patch(object, patch),
        PatchType::Apply => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                "apply patches are not supported here",
            ));
        }
    }
    Ok(())
}

/// The `autoscaling/v1` `Scale` view of a workload.
fn scale_of(object: &Value) -> Value {
    let meta = &object["metadata"];
    let selector: Vec<String> = object["spec"]["selector"]["matchLabels"]
        .as_object()
        .map(|labels| {
            labels
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
            "resourceVersion": meta["resourceVersion"],
            "creationTimestamp": meta["creationTimestamp"]
        },
        "spec": {"replicas": object["spec"]["replicas"]},
        "status": {
            "replicas": object["status"]["replicas"].as_i64().unwrap_or(0),
            "selector": selector.join(",")
        }
    })
}

/// The `scale` subresource (`kubectl scale`): reads and writes `spec.replicas` through a
/// `Scale` object.
fn scale(
    shared: &Shared,
    target: &Target,
    method: &Method,
    query: &Query,
    content_type: &str,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let name = target.name.as_deref().expect("routed with a name");
    let main = Target {
        rt: target.rt,
        namespace: target.namespace.clone(),
        name: target.name.clone(),
        subresource: None,
    };
    let mut store = lock(&shared.store);
    let old = store
        .get(&key_of(target, name))
        .cloned()
        .ok_or_else(|| ApiError::not_found(target.rt, name))?;
    let current = scale_of(&old);
    let wanted = match *method {
        Method::GET => return ok(&current),
        Method::PUT => parse_body(content_type, body)?,
        Method::PATCH => {
            let patch: Value = serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("the patch is not valid JSON: {e}")))?;
            let mut scale = current;
            apply_patch(patch_type(content_type)?, &mut scale, &patch)?;
            scale
        }
        _ => {
            return Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "the scale subresource allows GET, PUT and PATCH",
            ));
        }
    };
    let replicas = wanted["spec"]["replicas"].as_i64().ok_or_else(|| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "spec.replicas: Required value",
        )
    })?;
    let mut object = old.clone();
    object["spec"]["replicas"] = json!(replicas);
    let (object, _) = write(&mut store, &main, Some(&old), object, query.dry_run())?;
    ok(&scale_of(&object))
}

fn patch_object(
    shared: &Shared,
    target: &Target,
    query: &Query,
    content_type: &str,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let name = target.name.as_deref().expect("routed with a name");
    let patch_type = patch_type(content_type)?;
    let patch: Value = match patch_type {
        PatchType::Apply => parse_body("application/yaml", body)?,
        _ => serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("the patch is not valid JSON: {e}")))?,
    };
    let key = key_of(target, name);
    let mut store = lock(&shared.store);
    let old = store.get(&key).cloned();
    if patch_type == PatchType::Apply {
        let manager = query
            .get("fieldManager")
            .filter(|m| !m.is_empty())
            .ok_or_else(|| {
                ApiError::bad_request("PATCH requests of type apply must name a fieldManager")
            })?
            .to_string();
        let mut applied = patch;
        check_identity(target, &mut applied, Some(name))?;
        let (object, created) = match &old {
            None => {
                if target.subresource.is_some() {
                    return Err(ApiError::not_found(target.rt, name));
                }
                require_namespace(&store, target)?;
                write(&mut store, target, None, applied.clone(), query.dry_run())?
            }
            Some(old) => {
                let mut object = old.clone();
                patch::server_side_apply(&mut object, store.applied(&key, &manager), &applied);
                write(&mut store, target, Some(old), object, query.dry_run())?
            }
        };
        if !query.dry_run() {
            store.set_applied(&key, &manager, applied);
        }
        let code = if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        return Ok(json_response(code, &object));
    }
    let old = old.ok_or_else(|| ApiError::not_found(target.rt, name))?;
    let mut object = old.clone();
    apply_patch(patch_type, &mut object, &patch)?;
    check_identity(target, &mut object, Some(name))?;
    let sent = &patch["metadata"]["resourceVersion"];
    if sent.is_string() && old["metadata"]["resourceVersion"] != *sent {
        return Err(conflict(target.rt, name));
    }
    object["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
    let (object, _) = write(&mut store, target, Some(&old), object, query.dry_run())?;
    ok(&object)
}

/// Removes an object; a Namespace is marked `Terminating` instead, and a moment later the
/// namespace controller stand-in removes everything in it, then the namespace itself.
fn remove(shared: &Arc<Shared>, store: &mut Store, target: &Target, name: &str) -> Option<Value> {
    if is_crd(target.rt) {
        let removed = store.remove(&key_of(target, name))?;
        if let Some(custom) = resources::from_crd(&removed) {
            store.unregister(custom.group, custom.plural);
        }
        return Some(removed);
    }
    if (target.rt.group, target.rt.plural) != ("", "namespaces") {
        return store.remove(&key_of(target, name));
    }
    let key = namespace_key(name);
    let mut namespace = store.get(&key)?.clone();
    if namespace["metadata"]["deletionTimestamp"].is_null() {
        namespace["metadata"]["deletionTimestamp"] = json!(store::now());
        namespace["status"]["phase"] = json!("Terminating");
        let resource_version = store.next_resource_version();
        namespace["metadata"]["resourceVersion"] = json!(resource_version.to_string());
        store.put(key.clone(), namespace.clone(), resource_version);
        let shared = shared.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(NAMESPACE_FINALIZE_DELAY).await;
            let mut store = lock(&shared.store);
            for object in store.keys_in_namespace(&name) {
                store.remove(&object);
            }
            store.remove(&key);
        });
    }
    Some(namespace)
}

/// The `DeleteOptions` a DELETE may carry in its body (clients put `dryRun`,
/// `propagationPolicy` and `preconditions` there); an empty body is no options.
fn delete_options(content_type: &str, body: &Bytes) -> Result<Value, ApiError> {
    if body.is_empty() {
        return Ok(json!({}));
    }
    parse_body(content_type, body)
}

/// Whether the query or the `DeleteOptions` ask for a dry run.
fn delete_dry_run(query: &Query, options: &Value) -> bool {
    query.dry_run()
        || options["dryRun"]
            .as_array()
            .is_some_and(|d| d.iter().any(|v| v == "All"))
}

fn delete(
    shared: &Arc<Shared>,
    target: &Target,
    query: &Query,
    options: &Value,
) -> Result<Response, ApiError> {
    let name = target.name.as_deref().expect("routed with a name");
    if target.subresource.is_some() {
        return Err(ApiError::path_not_found());
    }
    let mut store = lock(&shared.store);
    let existing = store
        .get(&key_of(target, name))
        .cloned()
        .ok_or_else(|| ApiError::not_found(target.rt, name))?;
    let preconditions = &options["preconditions"];
    for field in ["uid", "resourceVersion"] {
        let wanted = &preconditions[field];
        if wanted.is_string() && existing["metadata"][field] != *wanted {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": Precondition failed: \
                     {field} in precondition: {wanted}, {field} in object meta: {}",
                    qualified(target.rt),
                    existing["metadata"][field]
                ),
            )
            .with_details(target.rt, name));
        }
    }
    if delete_dry_run(query, options) {
        return ok(&existing);
    }
    if (target.rt.group, target.rt.plural) == ("", "namespaces")
        && ["default", "kube-system", "kube-public"].contains(&name)
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!("namespaces \"{name}\" is forbidden: this namespace may not be deleted"),
        ));
    }
    let removed = remove(shared, &mut store, target, name).expect("the object was just there");
    ok(&removed)
}

fn delete_collection(
    shared: &Arc<Shared>,
    target: &Target,
    query: &Query,
    options: &Value,
) -> Result<Response, ApiError> {
    let dry_run = delete_dry_run(query, options);
    let (labels, fields) = query.selectors()?;
    let mut store = lock(&shared.store);
    let names: Vec<String> = store
        .list(
            target.rt.group,
            target.rt.plural,
            target.namespace.as_deref(),
        )
        .into_iter()
        .filter(|o| labels.matches(o) && fields.matches(o))
        .filter_map(|o| o["metadata"]["name"].as_str().map(str::to_string))
        .collect();
    let mut items = Vec::new();
    for name in names {
        if dry_run {
            items.extend(store.get(&key_of(target, &name)).cloned());
        } else {
            items.extend(remove(shared, &mut store, target, &name));
        }
    }
    ok(&json!({
        "kind": format!("{}List", target.rt.kind),
        "apiVersion": target.rt.api_version(),
        "metadata": {"resourceVersion": store.resource_version().to_string()},
        "items": items
    }))
}

/// How a stored change looks to one watch: its type and object, or nothing when the watch
/// does not see it (another type or namespace, or not matching the selectors before or after).
fn as_seen(
    event: &Event,
    target: &Target,
    labels: &LabelSelector,
    fields: &FieldSelector,
) -> Option<Value> {
    let key = &event.key;
    if key.group != target.rt.group
        || key.plural != target.rt.plural
        || target
            .namespace
            .as_ref()
            .is_some_and(|ns| *ns != key.namespace)
    {
        return None;
    }
    let selected = |o: &Value| labels.matches(o) && fields.matches(o);
    let now = selected(&event.object);
    let before = event.previous.as_ref().is_some_and(selected);
    let change = match (event.change, before, now) {
        (Change::Added, _, true) => Change::Added,
        (Change::Modified, true, true) => Change::Modified,
        (Change::Modified, false, true) => Change::Added,
        (Change::Modified, true, false) => Change::Deleted,
        (Change::Deleted, _, true) => Change::Deleted,
        _ => return None,
    };
    Some(json!({"type": change.as_str(), "object": event.object}))
}

/// Turns watch events into the lines of the stream, as Tables when the client asked for them
/// (column definitions in the first only, as the real server sends them).
struct Frames {
    rt: ResourceType,
    as_table: bool,
    columns_sent: bool,
}

impl Frames {
    fn frame(&mut self, mut event: Value) -> Bytes {
        if self.as_table && event["type"] != "BOOKMARK" {
            let object = &event["object"];
            let version = object["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or_default();
            let table = table::table(&self.rt, &[object], version, !self.columns_sent);
            self.columns_sent = true;
            event["object"] = table;
        }
        let mut bytes = serde_json::to_vec(&event).expect("a JSON value serialises");
        bytes.push(b'\n');
        Bytes::from(bytes)
    }
}

/// A watch: a chunked stream of `{"type", "object"}` lines.
///
/// Without a resource version (or with `0`), and with `sendInitialEvents=true`, it starts with
/// an `ADDED` event per existing object; with `sendInitialEvents=true` those end with a
/// `BOOKMARK` annotated `k8s.io/initial-events-end`, as streaming lists expect.
/// With a resource version it replays every change after it (the stand-in keeps its whole
/// history, so it never answers `410 Gone`), then streams changes as they happen, until
/// `timeoutSeconds` (default 30 minutes) or the client hangs up.
fn watch(
    shared: &Shared,
    target: &Target,
    query: &Query,
    as_table: bool,
) -> Result<Response, ApiError> {
    let mut frames_of = Frames {
        rt: target.rt.clone(),
        as_table,
        columns_sent: false,
    };
    let (labels, fields) = query.selectors()?;
    let since = query
        .get("resourceVersion")
        .filter(|v| !v.is_empty() && *v != "0")
        .map(|v| {
            v.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version {v:?}")))
        })
        .transpose()?;
    let initial_events = query.flag("sendInitialEvents") || since.is_none();
    let bookmark = query.flag("sendInitialEvents");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);

    let store = lock(&shared.store);
    let current = store.resource_version();
    let mut frames = Vec::new();
    let (replay, receiver) = if initial_events {
        for object in store.list(
            target.rt.group,
            target.rt.plural,
            target.namespace.as_deref(),
        ) {
            if labels.matches(object) && fields.matches(object) {
                frames.push(frames_of.frame(json!({"type": "ADDED", "object": object})));
            }
        }
        let (_, receiver) = store.changes_since(current);
        (Vec::new(), receiver)
    } else {
        store.changes_since(since.expect("checked above"))
    };
    drop(store);
    for event in &replay {
        frames.extend(as_seen(event, target, &labels, &fields).map(|e| frames_of.frame(e)));
    }
    if bookmark {
        frames.push(frames_of.frame(json!({
            "type": "BOOKMARK",
            "object": {
                "kind": target.rt.kind,
                "apiVersion": target.rt.api_version(),
                "metadata": {
                    "resourceVersion": current.to_string(),
                    "annotations": {"k8s.io/initial-events-end": "true"}
                }
            }
        })));
    }
    let rt = target.rt.clone();
    let namespace = target.namespace.clone();
    let deadline = tokio::time::Instant::now() + timeout;
    let live = futures::stream::unfold(
        (receiver, frames_of),
        move |(mut receiver, mut frames_of)| {
            let rt = rt.clone();
            let namespace = namespace.clone();
            let labels = labels.clone();
            let fields = fields.clone();
            async move {
                let target = Target {
                    rt: &rt,
                    namespace,
                    name: None,
                    subresource: None,
                };
                loop {
                    let event = match tokio::time::timeout_at(deadline, receiver.recv()).await {
                        Ok(Ok(event)) => event,
                        // A watch that fell behind, or a store that is gone, ends; clients then
                        // list and watch again, as they do with the real server.
                        Ok(Err(_)) | Err(_) => return None,
                    };
                    if event.resource_version <= current {
                        continue;
                    }
                    if let Some(seen) = as_seen(&event, &target, &labels, &fields) {
                        let frame = frames_of.frame(seen);
                        return Some((Ok::<_, Infallible>(frame), (receiver, frames_of)));
                    }
                }
            }
        },
    );
    let stream = futures::StreamExt::chain(
        futures::stream::iter(frames.into_iter().map(Ok::<_, Infallible>)),
        live,
    );
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(stream),
    )
        .into_response())
}
