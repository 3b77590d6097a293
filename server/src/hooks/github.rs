//! GitHub: `X-Hub-Signature-256`, `X-GitHub-Event`, `X-GitHub-Delivery`; `push`,
//! `pull_request` and `ping`.

use axum::http::HeaderMap;
use axum::http::header::CONTENT_TYPE;
use serde_json::Value;

use super::{
    Action, Event, Parsed, RefTarget, Refusal, Source, files_of, header, is_zero_sha, json_object,
    message, ref_target, required, text, verify_hmac_sha256,
};
use crate::settings::WebhookSettings;

/// GitHub lists at most this many commits in a push payload.
const MAX_LISTED_COMMITS: usize = 2048;

/// Pull request actions that start runs: new code to build.
const PR_ACTIONS: &[&str] = &["opened", "synchronize", "reopened"];

/// Checks `X-Hub-Signature-256` against the configured secret.
pub(super) fn verify(
    settings: &WebhookSettings,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), Refusal> {
    let Some(secret) = settings.github.secret.as_ref().filter(|s| !s.0.is_empty()) else {
        return Err(Refusal::not_configured(
            "GitHub webhooks are not enabled on this server: set webhooks.github.secret \
             (OUTPOST__WEBHOOKS__GITHUB__SECRET) to the webhook's secret",
        ));
    };
    let Some(signature) = header(headers, "x-hub-signature-256") else {
        return Err(Refusal::missing(
            if headers.contains_key("x-hub-signature") {
                "the delivery carries only the SHA-1 X-Hub-Signature; Outpost needs X-Hub-Signature-256"
            } else {
                "the delivery has no X-Hub-Signature-256 header: give the GitHub webhook the secret \
             configured in webhooks.github.secret"
            },
        ));
    };
    verify_hmac_sha256(&secret.0, body, &signature, "X-Hub-Signature-256")
}

/// Reads a verified delivery.
pub(super) fn parse(headers: &HeaderMap, body: &[u8]) -> Result<Parsed, String> {
    let event = header(headers, "x-github-event")
        .ok_or("the delivery has no X-GitHub-Event header, so its event is unknown")?;
    let payload = payload(headers, body)?;
    let action = match event.as_str() {
        "ping" => Action::Ping(format!(
            "GitHub ping received: the webhook reaches Outpost and its signature is valid ({})",
            text(&payload, "/zen").unwrap_or_else(|| "no zen today".into())
        )),
        "push" => Action::Run(vec![push(&payload)?]),
        "pull_request" => {
            let action = required(&payload, "/action", "pull_request")?;
            if PR_ACTIONS.contains(&action.as_str()) {
                Action::Run(vec![pull_request(&payload)?])
            } else {
                Action::Ignore(format!(
                    "pull_request action `{action}` starts nothing; runs start when a pull \
                     request is opened, reopened or gets new commits (synchronize)"
                ))
            }
        }
        other => Action::Ignore(format!(
            "GitHub event `{other}` starts nothing; Outpost acts on push and pull_request \
             (and answers ping)"
        )),
    };
    Ok(Parsed {
        event,
        delivery_id: None,
        action,
    })
}

/// The JSON payload, whether the webhook sends `application/json` or
/// `application/x-www-form-urlencoded` (a `payload` field).
fn payload(headers: &HeaderMap, body: &[u8]) -> Result<Value, String> {
    let form = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if form {
        let json = form_urlencoded::parse(body)
            .find(|(k, _)| k == "payload")
            .map(|(_, v)| v.into_owned())
            .ok_or("the form-encoded delivery has no `payload` field")?;
        json_object(json.as_bytes())
    } else {
        json_object(body)
    }
}

fn push(p: &Value) -> Result<Event, String> {
    let git_ref = required(p, "/ref", "push")?;
    let after = required(p, "/after", "push")?;
    let mut e = Event::new(Source::Github, "push", vec!["push"]);
    e.repo = Some(required(p, "/repository/full_name", "push")?);
    e.clone_url = text(p, "/repository/clone_url");
    e.deleted = p.get("deleted").and_then(Value::as_bool) == Some(true) || is_zero_sha(&after);
    e.target = ref_target(&git_ref);
    e.before = text(p, "/before");
    e.actor = text(p, "/sender/login").or_else(|| text(p, "/pusher/name"));
    e.message = message(text(p, "/head_commit/message"));
    e.url = text(p, "/head_commit/url").or_else(|| text(p, "/compare"));
    let commits = p
        .get("commits")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    if commits.is_empty() {
        e.paths_unknown = Some(match e.target {
            RefTarget::Tag(_) => "a tag push lists no changed files".into(),
            _ => "the push lists no commits (a branch created without new commits, or a \
                  force-push to an older commit)"
                .into(),
        });
    } else if commits.len() >= MAX_LISTED_COMMITS {
        e.paths_unknown = Some(format!(
            "GitHub lists at most {MAX_LISTED_COMMITS} commits and this push has at least as many"
        ));
    } else {
        let files = files_of(commits);
        if files.is_empty() {
            e.paths_unknown = Some("the push's commits list no files".into());
        } else {
            e.changed_paths = Some(files);
        }
    }
    e.git_ref = Some(git_ref);
    e.sha = Some(after);
    Ok(e)
}

fn pull_request(p: &Value) -> Result<Event, String> {
    let number = required(p, "/number", "pull_request")?;
    let mut e = Event::new(Source::Github, "pull_request", vec!["pull_request"]);
    e.pull_request = true;
    e.repo = Some(required(p, "/repository/full_name", "pull_request")?);
    e.clone_url = text(p, "/repository/clone_url");
    // The head is fetched from the base repository, where GitHub keeps it (also for forks).
    e.git_ref = Some(format!("refs/pull/{number}/head"));
    e.sha = Some(required(p, "/pull_request/head/sha", "pull_request")?);
    e.before = text(p, "/before");
    e.target = RefTarget::Branch(required(p, "/pull_request/base/ref", "pull_request")?);
    e.actor = text(p, "/sender/login").or_else(|| text(p, "/pull_request/user/login"));
    e.message = message(text(p, "/pull_request/title"));
    e.url = text(p, "/pull_request/html_url");
    e.paths_unknown = Some("pull request payloads do not list the changed files".into());
    Ok(e)
}
