//! The "Run command" box on the runners page: `outpost invoke` from a browser.
//!
//! The form posts to `/runners/invoke`, which applies the same checks as `POST /api/v1/invoke`
//! (the `invoke` scope, the request's validity) plus the session's CSRF token, writes the same
//! audit record, and redirects to the job's page, whose log viewer (`app.js`, over the job
//! log's Server-Sent Events stream) shows the output live.

use axum::Form;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use outpost_protocol::{InvokeRequest, Runner};
use serde::Deserialize;

use super::{Refusal, WebUser};
use crate::api::AppState;
use crate::api::invoke::{queue, require_invoke};

/// The form on the runners page, for people allowed to invoke.
pub fn command_box(user: &WebUser, runners: &[Runner]) -> Markup {
    let mut labels: Vec<&str> = runners
        .iter()
        .flat_map(|r| r.labels.iter().map(String::as_str))
        .collect();
    labels.sort_unstable();
    labels.dedup();
    html! {
        details.runform #run-command {
            summary { "Run command" }
            p.hint {
                "Runs one command on a runner with these labels, as a direct process unless "
                em { "through the shell" } " is ticked. "
                code { "kubectl" } " and " code { "helm" } " get the cluster's KUBECONFIG. "
                "Every command is recorded in the audit trail."
            }
            form method="post" action="/runners/invoke" {
                input type="hidden" name="csrf" value=(user.csrf);
                label for="invoke-cluster" { "Cluster (optional)" }
                input #invoke-cluster type="text" name="cluster" placeholder="aks-prod";
                label for="invoke-labels" { "Runner labels, comma-separated (optional if a cluster is given)" }
                input #invoke-labels type="text" name="labels" list="invoke-known-labels";
                datalist #invoke-known-labels { @for l in &labels { option value=(l) {} } }
                label for="invoke-command" { "Command" }
                input #invoke-command type="text" name="command" required placeholder="kubectl get pods -A";
                label { input #invoke-shell type="checkbox" name="shell" value="on"; " through the shell (pipes, &&, variables)" }
                label for="invoke-timeout" { "Timeout" }
                input #invoke-timeout type="text" name="timeout" value="5m";
                button #invoke-run type="submit" { "Run" }
            }
        }
    }
}

/// What the form sends.
#[derive(Debug, Deserialize)]
pub struct InvokeForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    cluster: String,
    #[serde(default)]
    labels: String,
    #[serde(default)]
    command: String,
    #[serde(default)]
    shell: Option<String>,
    #[serde(default)]
    timeout: String,
}

fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, message).into_response()
}

/// `POST /runners/invoke`: queues the command and shows its job.
pub async fn run_command(
    State(state): State<AppState>,
    user: WebUser,
    Form(f): Form<InvokeForm>,
) -> Result<Response, Response> {
    user.check_csrf(&f.csrf)?;
    if require_invoke(&user.principal).is_err() {
        return Err(
            Refusal("running commands needs a token with the `invoke` scope (or `admin`)").into(),
        );
    }
    let shell = f.shell.is_some();
    let command = f.command.trim();
    let argv = if shell {
        vec![command.to_string()]
    } else {
        shell_words::split(command).map_err(|e| {
            bad_request(format!(
                "the command's quotes do not match ({e}): fix them, or tick `through the shell`"
            ))
        })?
    };
    let timeout = f.timeout.trim();
    let timeout_secs = if timeout.is_empty() {
        None
    } else {
        Some(crate::pipeline::duration_secs(timeout).ok_or_else(|| {
            bad_request(format!(
                "{timeout:?} is not a duration: use e.g. 90s, 5m or 1h"
            ))
        })?)
    };
    let req = InvokeRequest {
        argv,
        shell,
        cluster: Some(f.cluster.trim().to_string()).filter(|c| !c.is_empty()),
        labels: f
            .labels
            .split(',')
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect(),
        timeout_secs,
        files: Vec::new(),
    };
    let run = queue(&state, &user.principal, req, "web")
        .await
        .map_err(IntoResponse::into_response)?;
    let Some(job) = run.jobs.first() else {
        return Ok(Redirect::to(&format!("/runs/{}", run.id)).into_response());
    };
    Ok(Redirect::to(&format!("/jobs/{}", job.id)).into_response())
}
