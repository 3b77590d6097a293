//! Azure DevOps service hooks ("Web Hooks" consumer): basic authentication or a custom header;
//! `git.push`, `git.pullrequest.created` and `git.pullrequest.updated`; the notification's `id`
//! de-duplicates.

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use base64::Engine;
use serde_json::Value;

use super::{
    Action, Event, Parsed, RefTarget, Refusal, Source, is_zero_sha, json_object, message,
    ref_target, required, same_secret, text,
};
use crate::settings::WebhookSettings;

/// Checks basic authentication or the custom header, whichever is configured (either passes).
pub(super) fn verify(settings: &WebhookSettings, headers: &HeaderMap) -> Result<(), Refusal> {
    let ado = &settings.azure_devops;
    let password = ado.password.as_ref().filter(|s| !s.0.is_empty());
    let custom = ado
        .header_name
        .as_deref()
        .filter(|n| !n.trim().is_empty())
        .zip(ado.header_value.as_ref().filter(|s| !s.0.is_empty()));
    if password.is_none() && custom.is_none() {
        return Err(Refusal::not_configured(
            "Azure DevOps webhooks are not enabled on this server: set \
             webhooks.azure_devops.password (and optionally .username) for basic authentication, \
             or webhooks.azure_devops.header_name and .header_value for a custom header",
        ));
    }
    let mut presented_any = false;
    if let Some((name, value)) = custom
        && let Some(presented) = headers.get(name.trim())
    {
        presented_any = true;
        if same_secret(presented.as_bytes(), value.0.as_bytes()) {
            return Ok(());
        }
    }
    if let Some(password) = password
        && let Some(auth) = headers.get(AUTHORIZATION)
    {
        presented_any = true;
        if let Some((user, pass)) = basic_credentials(auth.as_bytes()) {
            let user_ok = match ado.username.as_deref() {
                Some(expected) => same_secret(user.as_bytes(), expected.as_bytes()),
                None => true,
            };
            let pass_ok = same_secret(pass.as_bytes(), password.0.as_bytes());
            if user_ok && pass_ok {
                return Ok(());
            }
        }
    }
    if presented_any {
        Err(Refusal::invalid(
            "the Azure DevOps credentials do not match the configured ones \
             (webhooks.azure_devops)",
        ))
    } else {
        Err(Refusal::missing(
            "the delivery carries no credentials: set the service hook's basic authentication \
             user name and password (or the configured custom header) to those in \
             webhooks.azure_devops",
        ))
    }
}

/// The user name and password of an `Authorization: Basic …` header.
fn basic_credentials(value: &[u8]) -> Option<(String, String)> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, pass) = decoded.split_once(':')?;
    Some((user.to_owned(), pass.to_owned()))
}

/// Reads a verified delivery.
pub(super) fn parse(body: &[u8]) -> Result<Parsed, String> {
    let payload = json_object(body)?;
    let event = required(&payload, "/eventType", "service hook")?;
    let delivery_id = text(&payload, "/id");
    let action = match event.as_str() {
        "git.push" => Action::Run(push(&payload)?),
        "git.pullrequest.created" | "git.pullrequest.updated" => pull_request(&payload, &event)?,
        other => Action::Ignore(format!(
            "Azure DevOps event `{other}` starts nothing; Outpost acts on git.push, \
             git.pullrequest.created and git.pullrequest.updated"
        )),
    };
    Ok(Parsed {
        event,
        delivery_id,
        action,
    })
}

/// The repository fields every event shares: (`project/name`, name, clone URL).
fn repository(p: &Value, what: &str) -> Result<(String, String, Option<String>), String> {
    let name = required(p, "/resource/repository/name", what)?;
    let full = match text(p, "/resource/repository/project/name") {
        Some(project) => format!("{project}/{name}"),
        None => name.clone(),
    };
    Ok((full, name, text(p, "/resource/repository/remoteUrl")))
}

/// One event per ref the push updated.
fn push(p: &Value) -> Result<Vec<Event>, String> {
    let what = "git.push";
    let (repo, repo_name, clone_url) = repository(p, what)?;
    let updates = p
        .pointer("/resource/refUpdates")
        .and_then(Value::as_array)
        .filter(|u| !u.is_empty())
        .ok_or("the git.push payload has no `resource.refUpdates`")?;
    let commits = p
        .pointer("/resource/commits")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let actor = text(p, "/resource/pushedBy/displayName")
        .or_else(|| text(p, "/resource/pushedBy/uniqueName"));
    let mut events = Vec::with_capacity(updates.len());
    for update in updates {
        let git_ref = required(update, "/name", "git.push refUpdates")?;
        let new = required(update, "/newObjectId", "git.push refUpdates")?;
        let mut e = Event::new(Source::AzureDevops, what, vec!["git.push", "push"]);
        e.repo = Some(repo.clone());
        e.repo_name = Some(repo_name.clone());
        e.clone_url = clone_url.clone();
        e.deleted = is_zero_sha(&new);
        e.target = ref_target(&git_ref);
        e.before = text(update, "/oldObjectId");
        e.actor = actor.clone();
        let head = commits
            .iter()
            .find(|c| c.get("commitId").and_then(Value::as_str) == Some(new.as_str()));
        e.message = message(head.and_then(|c| text(c, "/comment")));
        e.url = head
            .and_then(|c| text(c, "/url"))
            .or_else(|| clone_url.as_ref().map(|u| format!("{u}/commit/{new}")));
        e.paths_unknown =
            Some("Azure DevOps push notifications do not list the changed files".into());
        e.git_ref = Some(git_ref);
        e.sha = Some(new);
        events.push(e);
    }
    Ok(events)
}

fn pull_request(p: &Value, event: &str) -> Result<Action, String> {
    let id = required(p, "/resource/pullRequestId", event)?;
    let status = text(p, "/resource/status").unwrap_or_default();
    if status != "active" {
        return Ok(Action::Ignore(format!(
            "pull request {id} is {status}, not active; only active pull requests start runs \
             (a completed one starts its push to the target branch instead)"
        )));
    }
    let (repo, repo_name, clone_url) = repository(p, event)?;
    let target = required(p, "/resource/targetRefName", event)?;
    let mut e = Event::new(
        Source::AzureDevops,
        event,
        vec![
            if event == "git.pullrequest.created" {
                "git.pullrequest.created"
            } else {
                "git.pullrequest.updated"
            },
            "pull_request",
        ],
    );
    e.pull_request = true;
    e.repo = Some(repo);
    e.repo_name = Some(repo_name);
    e.url = clone_url.as_ref().map(|u| format!("{u}/pullrequest/{id}"));
    e.clone_url = clone_url;
    // The source branch holds the commit under review.
    e.git_ref = Some(required(p, "/resource/sourceRefName", event)?);
    e.sha = Some(required(
        p,
        "/resource/lastMergeSourceCommit/commitId",
        event,
    )?);
    e.target = match ref_target(&target) {
        RefTarget::Branch(b) => RefTarget::Branch(b),
        _ => RefTarget::Branch(target),
    };
    e.actor = text(p, "/resource/createdBy/displayName")
        .or_else(|| text(p, "/resource/createdBy/uniqueName"));
    e.message = message(text(p, "/resource/title"));
    e.paths_unknown = Some("pull request notifications do not list the changed files".into());
    Ok(Action::Run(vec![e]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_are_decoded() {
        assert_eq!(
            basic_credentials(b"Basic dXNlcjpwYTpzcw=="),
            Some(("user".into(), "pa:ss".into()))
        );
        assert_eq!(basic_credentials(b"Bearer abc"), None);
        assert_eq!(basic_credentials(b"Basic !!!"), None);
    }
}
