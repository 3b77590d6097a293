//! GitLab: `X-Gitlab-Token`, `X-Gitlab-Event`, `Idempotency-Key` / `X-Gitlab-Event-UUID`;
//! `Push Hook`, `Tag Push Hook` and `Merge Request Hook`.

use axum::http::HeaderMap;
use serde_json::Value;

use super::{
    Action, Event, Parsed, RefTarget, Refusal, Source, files_of, header, is_zero_sha, json_object,
    message, ref_target, required, same_secret, text,
};
use crate::settings::WebhookSettings;

/// Checks `X-Gitlab-Token` against the configured token.
pub(super) fn verify(settings: &WebhookSettings, headers: &HeaderMap) -> Result<(), Refusal> {
    let Some(token) = settings.gitlab.token.as_ref().filter(|s| !s.0.is_empty()) else {
        return Err(Refusal::not_configured(
            "GitLab webhooks are not enabled on this server: set webhooks.gitlab.token \
             (OUTPOST__WEBHOOKS__GITLAB__TOKEN) to the webhook's secret token",
        ));
    };
    // Not `header()`: a token is compared exactly as sent, surrounding spaces included.
    let Some(presented) = headers.get("x-gitlab-token") else {
        return Err(Refusal::missing(
            "the delivery has no X-Gitlab-Token header: give the GitLab webhook the secret token \
             configured in webhooks.gitlab.token",
        ));
    };
    if same_secret(presented.as_bytes(), token.0.as_bytes()) {
        Ok(())
    } else {
        Err(Refusal::invalid(
            "the X-Gitlab-Token does not match the token configured in webhooks.gitlab.token",
        ))
    }
}

/// Reads a verified delivery.
pub(super) fn parse(headers: &HeaderMap, body: &[u8]) -> Result<Parsed, String> {
    let header_event = header(headers, "x-gitlab-event")
        .ok_or("the delivery has no X-Gitlab-Event header, so its event is unknown")?;
    let payload = json_object(body)?;
    // System hooks say what they carry only in the body.
    let kind = match header_event.as_str() {
        "Push Hook" => "push".to_string(),
        "Tag Push Hook" => "tag_push".to_string(),
        "Merge Request Hook" => "merge_request".to_string(),
        "System Hook" => text(&payload, "/object_kind").unwrap_or_default(),
        _ => String::new(),
    };
    let action = match kind.as_str() {
        "push" => Action::Run(vec![push(&payload, false)?]),
        "tag_push" => Action::Run(vec![push(&payload, true)?]),
        "merge_request" => merge_request(&payload)?,
        _ => Action::Ignore(format!(
            "GitLab event `{header_event}` starts nothing; Outpost acts on Push Hook, Tag Push Hook \
             and Merge Request Hook"
        )),
    };
    let event = if kind.is_empty() { header_event } else { kind };
    Ok(Parsed {
        event,
        delivery_id: None,
        action,
    })
}

fn push(p: &Value, tag: bool) -> Result<Event, String> {
    let what = if tag { "Tag Push Hook" } else { "Push Hook" };
    let git_ref = required(p, "/ref", what)?;
    let after = required(p, "/after", what)?;
    let (name, names) = if tag {
        ("tag_push", vec!["tag_push", "push"])
    } else {
        ("push", vec!["push"])
    };
    let mut e = Event::new(Source::Gitlab, name, names);
    e.repo = Some(required(p, "/project/path_with_namespace", what)?);
    e.clone_url = text(p, "/project/git_http_url").or_else(|| text(p, "/repository/git_http_url"));
    e.deleted = is_zero_sha(&after);
    e.target = ref_target(&git_ref);
    e.before = text(p, "/before");
    e.actor = text(p, "/user_username").or_else(|| text(p, "/user_name"));
    let sha = text(p, "/checkout_sha").unwrap_or_else(|| after.clone());
    let commits = p
        .get("commits")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let head = commits
        .iter()
        .find(|c| c.get("id").and_then(Value::as_str) == Some(sha.as_str()))
        .or(commits.last());
    e.message = message(
        head.and_then(|c| text(c, "/message"))
            .or_else(|| text(p, "/message")),
    );
    e.url = head
        .and_then(|c| text(c, "/url"))
        .or_else(|| text(p, "/project/web_url").map(|web| format!("{web}/-/commit/{sha}")));
    let total = p
        .get("total_commits_count")
        .and_then(Value::as_u64)
        .unwrap_or(commits.len() as u64);
    if commits.is_empty() {
        e.paths_unknown = Some(if tag {
            "a tag push lists no changed files".into()
        } else {
            "the push lists no commits (a branch created without new commits)".into()
        });
    } else if total > commits.len() as u64 {
        e.paths_unknown = Some(format!(
            "GitLab lists only the newest {} of the push's {total} commits",
            commits.len()
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
    e.sha = Some(sha);
    Ok(e)
}

fn merge_request(p: &Value) -> Result<Action, String> {
    let what = "Merge Request Hook";
    let action = text(p, "/object_attributes/action").unwrap_or_default();
    // An `update` carries `oldrev` only when the source branch got new commits; other updates
    // (title, labels, reviewers) have nothing new to build.
    let new_code = match action.as_str() {
        "open" | "reopen" => true,
        "update" => p
            .pointer("/object_attributes/oldrev")
            .is_some_and(|v| !v.is_null()),
        _ => false,
    };
    if !new_code {
        return Ok(Action::Ignore(if action == "update" {
            "the merge request was updated without new commits; nothing to build".into()
        } else {
            format!(
                "merge request action `{action}` starts nothing; runs start when a merge request \
                 is opened, reopened or gets new commits"
            )
        }));
    }
    let iid = required(p, "/object_attributes/iid", what)?;
    let mut e = Event::new(
        Source::Gitlab,
        "merge_request",
        vec!["merge_request", "pull_request"],
    );
    e.pull_request = true;
    e.repo = Some(required(p, "/project/path_with_namespace", what)?);
    e.clone_url = text(p, "/project/git_http_url")
        .or_else(|| text(p, "/object_attributes/target/git_http_url"));
    // GitLab keeps every merge request's head in the target project under this ref.
    e.git_ref = Some(format!("refs/merge-requests/{iid}/head"));
    e.sha = Some(required(p, "/object_attributes/last_commit/id", what)?);
    e.before = text(p, "/object_attributes/oldrev");
    e.target = RefTarget::Branch(required(p, "/object_attributes/target_branch", what)?);
    e.actor = text(p, "/user/username").or_else(|| text(p, "/user/name"));
    e.message = message(text(p, "/object_attributes/title"));
    e.url = text(p, "/object_attributes/url");
    e.paths_unknown = Some("merge request payloads do not list the changed files".into());
    Ok(Action::Run(vec![e]))
}
