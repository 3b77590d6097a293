//! `POST /api/v1/invoke` (an ad-hoc command on a runner) and `GET /api/v1/audit`.
//!
//! Invoke is arbitrary command execution inside the private network, so it needs the `invoke`
//! scope (or `admin`), is checked before anything is parsed or queued, and every accepted call
//! leaves an audit record with the command line, secrets masked.

use std::collections::BTreeSet;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::IntoResponse;
use base64::Engine as _;
use outpost_protocol::{
    AuditList, ErrorBody, INVOKE_MAX_FILE_BYTES, INVOKE_MAX_TOTAL_BYTES, InvokeRequest, Run,
    StepAction, StepSpec, TriggerInfo, TriggerKind, When,
};
use serde::Deserialize;

use super::extract::{Body, Caller};
use super::{ApiError, ApiResult, AppState};
use crate::pipeline::JobDef;
use crate::store::{ApiPrincipal, NewInvoke, NewRun, Scope};

/// The job's timeout when the request names none.
pub const DEFAULT_TIMEOUT_SECS: u64 = 300;
/// The longest timeout an invoke may ask for.
pub const MAX_TIMEOUT_SECS: u64 = 24 * 3600;
/// The most files one invoke may upload.
const MAX_FILES: usize = 64;
/// The longest command line accepted, in bytes over all words.
const MAX_COMMAND_BYTES: usize = 64 * 1024;

/// `POST /invoke`: `201` with the run (one job, `invoke`).
#[utoipa::path(
    post,
    path = "/api/v1/invoke",
    tag = "runs",
    operation_id = "invoke",
    summary = "Run an ad-hoc command on a runner (invoke)",
    request_body(content = InvokeRequest),
    security(("api_token" = [])),
    responses(
        (status = 201, description = "The queued run", body = Run),
        (status = 400, description = "The request is malformed", body = ErrorBody),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The token's scope is too small", body = ErrorBody),
        (status = 404, description = "No such object", body = ErrorBody),
        (status = 409, description = "Conflict with the server's state", body = ErrorBody),
        (status = 413, description = "The body is larger than the server accepts", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all, err(Debug))]
pub async fn invoke(
    State(state): State<AppState>,
    caller: Caller,
    body: Body,
) -> ApiResult<impl IntoResponse> {
    // Authorisation comes first: a refused caller learns nothing about the request's validity.
    require_invoke(&caller.0)?;
    let req: InvokeRequest = body.json_required()?;
    let run = queue(&state, &caller.0, req, "api").await?;
    Ok((StatusCode::CREATED, Json(run)))
}

/// Fails with `403` unless the principal may run ad-hoc commands.
pub fn require_invoke(principal: &ApiPrincipal) -> Result<(), ApiError> {
    if principal.scope >= Scope::Invoke {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "running commands on runners needs a token with the `invoke` scope (or `admin`); yours has `{}`: \
             ask an administrator for one (`outpost-server token create --name NAME --scope invoke`)",
            principal.scope.as_str()
        )))
    }
}

/// Checks an invoke request, queues it and writes its audit record; `source` is `api` or `web`.
///
/// The caller must already have passed [`require_invoke`].
pub async fn queue(
    state: &AppState,
    principal: &ApiPrincipal,
    req: InvokeRequest,
    source: &str,
) -> Result<Run, ApiError> {
    let job = job_for(&req)?;
    let masked = masked_command(&req.argv, req.shell);
    let files = req.files.iter().map(|f| f.path.clone()).collect();
    let run = state
        .store
        .create_invoke(NewInvoke {
            run: NewRun {
                pipeline: String::new(),
                trigger: TriggerInfo {
                    kind: TriggerKind::Invoke,
                    source: Some(source.to_string()),
                    actor: Some(principal.name.clone()),
                    ..Default::default()
                },
                variables: Default::default(),
            },
            job,
            actor_id: principal.id,
            masked_command: masked.clone(),
            files,
        })
        .await?;
    tracing::info!(run.id = %run.id, actor = %principal.name, command = %masked, "invoke queued");
    Ok(run)
}

/// The one job an invoke request becomes, after checking it.
fn job_for(req: &InvokeRequest) -> Result<JobDef, ApiError> {
    if req.argv.first().is_none_or(|w| w.trim().is_empty()) {
        return Err(ApiError::bad_request(
            "no command: give the command after `--`, e.g. `outpost invoke --labels prod -- kubectl get pods`",
        ));
    }
    if req.argv.iter().map(String::len).sum::<usize>() > MAX_COMMAND_BYTES {
        return Err(ApiError::bad_request(format!(
            "the command line is longer than {MAX_COMMAND_BYTES} bytes: upload long input with --file instead"
        )));
    }
    // The `cluster:NAME` label a cluster needs is added where every run's jobs are created, as
    // for a pipeline job that names a cluster, so it is not listed here as well.
    if let Some(cluster) = &req.cluster
        && !valid_label(cluster)
    {
        return Err(ApiError::bad_request(format!(
            "cluster name {cluster:?} is not valid: use letters, digits, `-`, `_` and `.`"
        )));
    }
    let mut runs_on: Vec<String> = Vec::new();
    for label in &req.labels {
        let label = label.trim();
        if label.is_empty() {
            continue;
        }
        if label.chars().any(char::is_whitespace) || label.contains(',') {
            return Err(ApiError::bad_request(format!(
                "label {label:?} is not valid: labels have no spaces or commas"
            )));
        }
        if !runs_on.iter().any(|l| l == label) {
            runs_on.push(label.to_string());
        }
    }
    if runs_on.is_empty() && req.cluster.is_none() {
        return Err(ApiError::bad_request(
            "say where the command runs: name a cluster (--cluster NAME) or runner labels (--labels a,b)",
        ));
    }
    let timeout_secs = req.timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS);
    if timeout_secs == 0 || timeout_secs > MAX_TIMEOUT_SECS {
        return Err(ApiError::bad_request(format!(
            "the timeout must be between 1 second and {} hours",
            MAX_TIMEOUT_SECS / 3600
        )));
    }
    check_files(req)?;
    let name = step_name(&masked_command(&req.argv, req.shell));
    Ok(JobDef {
        name: "invoke".into(),
        runs_on,
        cluster: req.cluster.clone(),
        environment: None,
        timeout_secs,
        needs: Vec::new(),
        steps: vec![StepSpec {
            index: 0,
            name,
            action: StepAction::Invoke {
                argv: req.argv.clone(),
                shell: req.shell,
                files: req.files.clone(),
            },
            when: When::OnSuccess,
            timeout_secs: None,
        }],
    })
}

/// Whether `s` can be a cluster name.
fn valid_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 100
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Checks the uploaded files: safe relative paths, no duplicates, valid base64, within limits.
fn check_files(req: &InvokeRequest) -> Result<(), ApiError> {
    if req.files.len() > MAX_FILES {
        return Err(ApiError::bad_request(format!(
            "{} files were uploaded; at most {MAX_FILES} are accepted",
            req.files.len()
        )));
    }
    let mut seen = BTreeSet::new();
    let mut total = 0usize;
    for f in &req.files {
        let path = f.path.as_str();
        let safe = !path.is_empty()
            && path.len() <= 255
            && !path.starts_with('/')
            && !path.contains('\\')
            && !path.contains('\0')
            && path
                .split('/')
                .all(|part| !part.is_empty() && part != "." && part != "..");
        if !safe {
            return Err(ApiError::bad_request(format!(
                "file path {path:?} is not allowed: use a relative path inside the workspace, without `..`"
            )));
        }
        if !seen.insert(path) {
            return Err(ApiError::bad_request(format!(
                "the file {path:?} was uploaded twice"
            )));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&f.content_base64)
            .map_err(|e| {
                ApiError::bad_request(format!("the content of file {path:?} is not base64: {e}"))
            })?;
        if bytes.len() > INVOKE_MAX_FILE_BYTES {
            return Err(too_large(format!(
                "the file {path:?} has {} bytes; an uploaded file may have at most {INVOKE_MAX_FILE_BYTES}",
                bytes.len()
            )));
        }
        total += bytes.len();
    }
    if total > INVOKE_MAX_TOTAL_BYTES {
        return Err(too_large(format!(
            "the uploaded files add up to {total} bytes; at most {INVOKE_MAX_TOTAL_BYTES} are accepted"
        )));
    }
    Ok(())
}

fn too_large(message: String) -> ApiError {
    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
}

/// A step name from the command: its first 80 characters.
fn step_name(command: &str) -> String {
    const MAX: usize = 80;
    if command.chars().count() <= MAX {
        command.to_string()
    } else {
        let cut: String = command.chars().take(MAX - 1).collect();
        format!("{cut}…")
    }
}

/// Whether an option or variable name suggests that its value is a secret.
fn sensitive(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "password",
        "passwd",
        "secret",
        "token",
        "apikey",
        "api-key",
        "api_key",
        "credential",
        "private-key",
        "private_key",
        "auth",
    ]
    .iter()
    .any(|s| name.contains(s))
}

/// Masks the value of a `KEY=VALUE` word whose key looks secret; other words come back as
/// they are.
fn mask_assignment(word: &str) -> Option<String> {
    let (key, _) = word.split_once('=')?;
    let plain_key = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    (plain_key && sensitive(key)).then(|| format!("{key}=***"))
}

/// Masks the password of a URL with credentials (`https://user:pass@host`).
fn mask_url(word: &str) -> Option<String> {
    let scheme_end = word.find("://")? + 3;
    let rest = &word[scheme_end..];
    let at = rest.find('@')?;
    let userinfo = &rest[..at];
    if userinfo.contains('/') {
        return None;
    }
    let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
    Some(format!("{}{user}:***{}", &word[..scheme_end], &rest[at..]))
}

/// Masks the secrets that a word list carries in the usual places: values of options named
/// like `--token`/`--password` (either `--opt=value` or `--opt value`), `KEY=value` words with
/// such keys, the password of URLs with credentials, and the word after `Bearer`.
fn mask_words(words: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(words.len());
    let mut mask_next = false;
    for word in words {
        if mask_next {
            out.push("***".to_string());
            mask_next = false;
            continue;
        }
        if word.eq_ignore_ascii_case("bearer") || word.eq_ignore_ascii_case("basic") {
            out.push(word.clone());
            mask_next = true;
            continue;
        }
        if let Some(i) = word.to_ascii_lowercase().find("bearer ") {
            out.push(format!("{}***", &word[..i + "bearer ".len()]));
            continue;
        }
        if let Some(option) = word.strip_prefix("--").filter(|o| !o.is_empty()) {
            match option.split_once('=') {
                Some((name, _)) if sensitive(name) => out.push(format!("--{name}=***")),
                Some((name, value)) => {
                    let value = mask_assignment(value)
                        .or_else(|| mask_url(value))
                        .unwrap_or_else(|| value.to_string());
                    out.push(format!("--{name}={value}"));
                }
                None => {
                    mask_next = sensitive(option);
                    out.push(word.clone());
                }
            }
            continue;
        }
        let masked = mask_assignment(word)
            .or_else(|| mask_url(word))
            .unwrap_or_else(|| word.clone());
        out.push(masked);
    }
    out
}

/// Replaces `word` in `script` wherever it stands as a whole shell word (bounded by the
/// start or end, blanks, quotes or operators), so that a short secret does not mask unrelated
/// text.
fn replace_word(script: &str, word: &str, with: &str) -> String {
    let boundary = |c: Option<char>| {
        c.is_none_or(|c| c.is_whitespace() || matches!(c, '\'' | '"' | ';' | '&' | '|' | '(' | ')'))
    };
    if word.is_empty() {
        return script.to_string();
    }
    let mut out = String::with_capacity(script.len());
    let mut rest = script;
    while let Some(i) = rest.find(word) {
        let before = out.chars().last().or_else(|| rest[..i].chars().last());
        let before = if i > 0 {
            rest[..i].chars().last()
        } else {
            before
        };
        let after = rest[i + word.len()..].chars().next();
        out.push_str(&rest[..i]);
        if boundary(before) && boundary(after) {
            out.push_str(with);
        } else {
            out.push_str(word);
        }
        rest = &rest[i + word.len()..];
    }
    out.push_str(rest);
    out
}

/// The command line as the audit trail and the step name show it, secrets masked.
pub fn masked_command(argv: &[String], shell: bool) -> String {
    if shell {
        // The script is kept as written (quotes, operators); only the words that masking
        // changed are replaced in it, where they stand as whole words.
        let mut script = argv.join(" ");
        let words = shell_words::split(&script)
            .unwrap_or_else(|_| script.split_whitespace().map(str::to_string).collect());
        for (orig, masked) in words.iter().zip(mask_words(&words)) {
            if *orig != masked {
                script = replace_word(&script, orig, &masked);
            }
        }
        format!("sh: {script}")
    } else {
        shell_words::join(mask_words(argv))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    kind: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

/// `GET /audit?kind=&limit=&cursor=`: audit records newest first (admin).
#[utoipa::path(
    get,
    path = "/api/v1/audit",
    tag = "admin",
    operation_id = "list_audit",
    summary = "Audit records, newest first (admin)",
    params(
        ("kind" = Option<String>, Query, description = "Only records of this kind"),
        ("limit" = Option<u32>, Query, description = "Page size"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"),
    ),
    security(("api_token" = [])),
    responses(
        (status = 200, description = "A page of audit records", body = AuditList),
        (status = 400, description = "The request is malformed", body = ErrorBody),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The token's scope is too small", body = ErrorBody),
    )
)]
pub async fn list_audit(
    State(state): State<AppState>,
    caller: Caller,
    uri: Uri,
) -> ApiResult<Json<AuditList>> {
    caller.require(Scope::Admin)?;
    let axum::extract::Query(q) = axum::extract::Query::<AuditQuery>::try_from_uri(&uri)
        .map_err(|e| ApiError::bad_request(format!("invalid query: {}", e.body_text())))?;
    let cursor = match q.cursor.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(c) => Some(uuid::Uuid::parse_str(c).map_err(|_| {
            ApiError::bad_request("invalid cursor: pass next_cursor from the previous page")
        })?),
    };
    let kind = q.kind.as_deref().filter(|s| !s.is_empty());
    Ok(Json(
        state
            .store
            .list_audit(kind, q.limit.unwrap_or(50), cursor)
            .await?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &[&str]) -> Vec<String> {
        s.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn secrets_in_the_usual_places_are_masked() {
        let cmd = masked_command(
            &words(&[
                "kubectl",
                "--token=abc123",
                "create",
                "secret",
                "generic",
                "db",
                "--from-literal=password=hunter2",
                "--password",
                "p4ss",
                "DB_TOKEN=xyz",
                "https://bob:pw@example.com/x",
                "-H",
                "Authorization: Bearer t0k",
                "get",
                "pods",
            ]),
            false,
        );
        for secret in ["abc123", "hunter2", "p4ss", "xyz", ":pw@", "t0k"] {
            assert!(!cmd.contains(secret), "{secret} leaked in {cmd}");
        }
        assert!(cmd.contains("--token=***"), "{cmd}");
        assert!(cmd.contains("--from-literal=password=***"), "{cmd}");
        assert!(cmd.contains("https://bob:***@example.com/x"), "{cmd}");
        assert!(cmd.ends_with("get pods"), "{cmd}");
    }

    #[test]
    fn ordinary_commands_are_unchanged() {
        let argv = words(&["kubectl", "get", "pods", "-A", "-o", "wide"]);
        assert_eq!(masked_command(&argv, false), "kubectl get pods -A -o wide");
        assert_eq!(
            masked_command(&words(&["echo 'a b' && exit 3"]), true),
            "sh: echo 'a b' && exit 3"
        );
        assert_eq!(
            masked_command(&words(&["export", "API_TOKEN=s3cret;", "run"]), true),
            "sh: export API_TOKEN=*** run"
        );
        assert_eq!(
            masked_command(
                &words(&["curl -u bob:x https://a:b@h/ --password 'p w'"]),
                true
            ),
            "sh: curl -u bob:x https://a:***@h/ --password '***'"
        );
    }

    #[test]
    fn file_paths_stay_inside_the_workspace() {
        let file = |path: &str| outpost_protocol::UploadedFile {
            path: path.into(),
            content_base64: "aGk=".into(),
            executable: false,
        };
        let req = |f| InvokeRequest {
            argv: words(&["true"]),
            labels: words(&["x"]),
            files: vec![f],
            ..Default::default()
        };
        assert!(check_files(&req(file("m.yaml"))).is_ok());
        assert!(check_files(&req(file("k8s/m.yaml"))).is_ok());
        for bad in ["../x", "/etc/passwd", "a/../../b", "", "a//b", "./x"] {
            assert!(check_files(&req(file(bad))).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn a_target_is_required() {
        let req = InvokeRequest {
            argv: words(&["true"]),
            ..Default::default()
        };
        assert!(job_for(&req).is_err());
        let req = InvokeRequest {
            argv: words(&["true"]),
            cluster: Some("aks-prod".into()),
            labels: words(&["linux"]),
            ..Default::default()
        };
        let job = job_for(&req).unwrap();
        assert_eq!(job.runs_on, vec!["linux"]);
        assert_eq!(job.cluster.as_deref(), Some("aks-prod"));
        let req = InvokeRequest {
            argv: words(&["true"]),
            cluster: Some("aks-prod".into()),
            ..Default::default()
        };
        assert!(job_for(&req).unwrap().runs_on.is_empty());
        assert_eq!(job.timeout_secs, DEFAULT_TIMEOUT_SECS);
    }
}
