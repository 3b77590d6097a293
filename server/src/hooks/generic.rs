//! Generic webhooks: `POST /hooks/generic/{pipeline}` with `X-Outpost-Signature: sha256=<hex>`
//! (HMAC-SHA256 of the body under the pipeline's secret) and an optional `X-Outpost-Delivery`.
//! The body is any JSON object; `ref`, `sha`, `variables` and a few descriptive fields are used.

use std::collections::BTreeMap;

use axum::http::HeaderMap;
use serde_json::Value;

use super::{
    Action, Event, Parsed, Refusal, Source, header, message, ref_target, verify_hmac_sha256,
};
use crate::api::runs::valid_variable_name;
use crate::settings::WebhookSettings;

/// Checks `X-Outpost-Signature` against the pipeline's configured secret.
pub(super) fn verify(
    settings: &WebhookSettings,
    pipeline: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), Refusal> {
    let Some(secret) = settings.generic_secret(pipeline).filter(|s| !s.is_empty()) else {
        let env = pipeline.replace('-', "_").to_ascii_uppercase();
        return Err(Refusal::not_configured(format!(
            "no generic webhook secret is configured for pipeline {pipeline}: set \
             webhooks.generic.{pipeline}.secret (OUTPOST__WEBHOOKS__GENERIC__{env}__SECRET)"
        )));
    };
    let Some(signature) = header(headers, "x-outpost-signature") else {
        return Err(Refusal::missing(
            "the delivery has no X-Outpost-Signature header: sign the body with HMAC-SHA256 \
             under the pipeline's secret and send `X-Outpost-Signature: sha256=<hex>`",
        ));
    };
    verify_hmac_sha256(secret, body, &signature, "X-Outpost-Signature")
}

/// Reads a verified delivery: an empty body counts as `{}`.
pub(super) fn parse(body: &[u8]) -> Result<Parsed, String> {
    let payload = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Object(Default::default())
    } else {
        super::json_object(body)?
    };
    let field = |key: &str| -> Result<Option<String>, String> {
        match payload.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.trim().to_owned())),
            Some(other) => Err(format!("`{key}` must be a string, but it is {other}")),
        }
    };
    let mut variables = BTreeMap::new();
    match payload.get("variables") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (name, value) in map {
                if !valid_variable_name(name) {
                    return Err(format!(
                        "variable name {name:?} is not valid: use letters, digits and \
                         underscores, not starting with a digit"
                    ));
                }
                let value = match value {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    other => {
                        return Err(format!(
                            "variable {name} must be a string, number or boolean, but it is {other}"
                        ));
                    }
                };
                variables.insert(name.clone(), value);
            }
        }
        Some(other) => {
            return Err(format!(
                "`variables` must be an object of names to values, but it is {other}"
            ));
        }
    }
    let mut e = Event::new(Source::Generic, "generic", vec!["generic"]);
    e.git_ref = field("ref")?;
    if let Some(r) = &e.git_ref {
        e.target = ref_target(r);
    }
    e.sha = field("sha")?;
    e.repo = field("repo")?;
    e.clone_url = field("clone_url")?;
    e.actor = field("actor")?;
    e.message = message(field("message")?);
    e.url = field("url")?;
    e.variables = variables;
    Ok(Parsed {
        event: "generic".into(),
        delivery_id: None,
        action: Action::Run(vec![e]),
    })
}
