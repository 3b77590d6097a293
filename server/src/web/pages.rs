//! Page handlers: thin like the API's, rendering with maud (which escapes every interpolation).

use std::collections::BTreeMap;

use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, html};
use outpost_protocol::{Job, Run, RunStatus, TriggerInfo, TriggerKind};
use serde::Deserialize;

use super::{Refusal, WebUser, session};
use crate::api::extract::parse_id;
use crate::api::{ApiError, AppState};
use crate::store::{NewRun, Scope};

type PageResult = Result<Response, Response>;

fn err(e: impl Into<ApiError>) -> Response {
    let e: ApiError = e.into();
    let status = e.status();
    let msg = if status.is_server_error() {
        tracing::error!(error = ?e, "page failed");
        "internal error".to_string()
    } else {
        status.canonical_reason().unwrap_or("error").to_string()
    };
    (status, page("Error", None, html! { h1 { (msg) } })).into_response()
}

fn page(title: &str, user: Option<&WebUser>, body: Markup) -> Markup {
    let v = super::asset_version();
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="color-scheme" content="light dark";
                @if let Some(u) = user { meta name="csrf-token" content=(u.csrf); }
                title { (title) " · Outpost" }
                link rel="stylesheet" href={ "/static/app.css?v=" (v) };
                script src={ "/static/app.js?v=" (v) } defer {}
            }
            body {
                @if let Some(u) = user {
                    header.top {
                        nav aria-label="main" {
                            a.brand href="/" { "Outpost" }
                            a href="/" { "Runs" }
                            a href="/pipelines" { "Pipelines" }
                            a href="/runners" { "Runners" }
                            @if u.principal.scope >= Scope::Admin { a href="/webhooks" { "Webhooks" } }
                        }
                        form.logout method="post" action="/logout" {
                            input type="hidden" name="csrf" value=(u.csrf);
                            span.who { (u.principal.name) " (" (u.principal.scope.as_str()) ")" }
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

fn badge(status: &str) -> Markup {
    html! { span class={ "status s-" (status) } data-status=(status) { (status) } }
}

fn time(t: Option<DateTime<Utc>>) -> Markup {
    match t {
        Some(t) => html! { time datetime=(t.to_rfc3339()) { (t.format("%Y-%m-%d %H:%M:%S UTC")) } },
        None => html! { "–" },
    }
}

/// A duration as `1h 2m 3s`, from start to end (or now, while it runs).
fn duration(start: Option<DateTime<Utc>>, end: Option<DateTime<Utc>>) -> String {
    let Some(start) = start else {
        return "–".into();
    };
    let secs = (end.unwrap_or_else(Utc::now) - start).num_seconds().max(0);
    match secs {
        s if s >= 3600 => format!("{}h {}m {}s", s / 3600, s % 3600 / 60, s % 60),
        s if s >= 60 => format!("{}m {}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

fn csrf_field(u: &WebUser) -> Markup {
    html! { input type="hidden" name="csrf" value=(u.csrf); }
}

// ---------------------------------------------------------------------------
// Sign-in
// ---------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
pub struct NextQuery {
    next: Option<String>,
}

/// Only a local path is a place to go back to, never another site.
fn safe_next(next: Option<&str>) -> &str {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.contains('\\') => n,
        _ => "/",
    }
}

fn login_page(next: &str, error: Option<&str>) -> Markup {
    page(
        "Sign in",
        None,
        html! {
            section.login {
                h1 { "Sign in to Outpost" }
                @if let Some(e) = error { p.error role="alert" { (e) } }
                form method="post" action="/login" {
                    input type="hidden" name="next" value=(next);
                    label for="token" { "API token" }
                    input #token type="password" name="token" autocomplete="current-password" required autofocus;
                    p.hint { "Create one with " code { "outpost-server token create --name NAME --scope read|trigger|admin" } "." }
                    button type="submit" { "Sign in" }
                }
            }
        },
    )
}

/// `GET /login`.
pub async fn login_form(Query(q): Query<NextQuery>) -> Markup {
    login_page(safe_next(q.next.as_deref()), None)
}

#[derive(Debug, Deserialize)]
pub struct LoginForm {
    token: String,
    next: Option<String>,
}

/// Whether the request came over HTTPS (directly configured or through a proxy saying so).
fn is_https(state: &AppState, headers: &HeaderMap) -> bool {
    let proxied = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"));
    let public = state
        .settings
        .server
        .public_url
        .as_deref()
        .is_some_and(|u| u.starts_with("https://"));
    proxied || public
}

/// `POST /login`: checks the token and sets the session cookie.
pub async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> PageResult {
    if super::cross_site(&headers, &state) {
        return Err(Refusal(super::CROSS_SITE).into());
    }
    let next = safe_next(f.next.as_deref()).to_string();
    let token = f.token.trim();
    let principal = state.store.authenticate_api(token).await.map_err(err)?;
    if principal.is_none() {
        return Err((
            StatusCode::UNAUTHORIZED,
            login_page(
                &next,
                Some("That token is not valid: it is unknown, revoked or expired."),
            ),
        )
            .into_response());
    }
    let key = session::key(&state.settings.data_dir)
        .map_err(ApiError::internal)
        .map_err(err)?;
    let value = session::seal(&key, token, session::now() + session::SESSION_SECS);
    let secure = if is_https(&state, &headers) {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={}{secure}",
        session::COOKIE,
        session::SESSION_SECS
    );
    Ok(([(header::SET_COOKIE, cookie)], Redirect::to(&next)).into_response())
}

#[derive(Debug, Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

/// `POST /logout`.
pub async fn logout(user: WebUser, Form(f): Form<CsrfForm>) -> PageResult {
    user.check_csrf(&f.csrf)?;
    let cookie = format!(
        "{}=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0",
        session::COOKIE
    );
    Ok(([(header::SET_COOKIE, cookie)], Redirect::to("/login")).into_response())
}

// ---------------------------------------------------------------------------
// Runs
// ---------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
pub struct RunsQuery {
    pipeline: Option<String>,
    status: Option<String>,
}

fn runs_table(runs: &[Run], live: Option<(&str, &str)>) -> Markup {
    html! {
        table.runs #runs data-live-runs[live.is_some()]
            data-pipeline=[live.map(|l| l.0)] data-status=[live.map(|l| l.1)] {
            thead { tr { th { "Run" } th { "Status" } th { "Trigger" } th { "Ref" } th { "Created" } th { "Duration" } } }
            tbody {
                @for r in runs {
                    tr data-run-id=(r.id) {
                        td { a href={ "/runs/" (r.id) } { (r.pipeline) " #" (r.number) } }
                        td { (badge(r.status.as_str())) }
                        td { (r.trigger.kind.as_str()) @if let Some(a) = &r.trigger.actor { " by " (a) } }
                        td { (r.trigger.git_ref.as_deref().unwrap_or("")) }
                        td { (time(Some(r.created_at))) }
                        td { (duration(r.started_at, r.finished_at)) }
                    }
                }
            }
        }
    }
}

/// `GET /`: runs, newest first, with filters.
pub async fn runs(
    State(state): State<AppState>,
    user: WebUser,
    Query(q): Query<RunsQuery>,
) -> PageResult {
    let pipeline = q.pipeline.as_deref().filter(|s| !s.is_empty());
    let status_s = q.status.as_deref().filter(|s| !s.is_empty());
    let status = status_s.and_then(RunStatus::parse);
    let list = state
        .store
        .list_runs(pipeline, status, 50, None)
        .await
        .map_err(err)?;
    let pipelines = state.store.list_pipelines().await.map_err(err)?;
    let statuses = ["queued", "running", "succeeded", "failed", "cancelled"];
    let body = html! {
        h1 { "Runs" }
        form.filters method="get" action="/" {
            label { "Pipeline " select name="pipeline" {
                option value="" { "all" }
                @for p in &pipelines { option value=(p.name) selected[pipeline == Some(p.name.as_str())] { (p.name) } }
            } }
            label { "Status " select name="status" {
                option value="" { "all" }
                @for s in statuses { option value=(s) selected[status_s == Some(s)] { (s) } }
            } }
            button type="submit" { "Filter" }
        }
        (runs_table(&list.runs, Some((pipeline.unwrap_or(""), status_s.unwrap_or("")))))
        @if list.runs.is_empty() { p.empty { "No runs yet." } }
    };
    Ok(page("Runs", Some(&user), body).into_response())
}

fn trigger_info(t: &TriggerInfo) -> Markup {
    html! {
        dl.trigger {
            dt { "Trigger" } dd { (t.kind.as_str()) @if let Some(s) = &t.source { " (" (s) ")" } }
            @if let Some(v) = &t.repo { dt { "Repository" } dd { (v) } }
            @if let Some(v) = &t.git_ref { dt { "Ref" } dd { (v) } }
            @if let Some(v) = &t.sha { dt { "Commit" } dd { code { (v) } } }
            @if let Some(v) = &t.actor { dt { "Actor" } dd { (v) } }
            @if let Some(v) = &t.message { dt { "Message" } dd { (v) } }
            @if let Some(v) = &t.url {
                dt { "Link" }
                dd { @if v.starts_with("https://") || v.starts_with("http://") { a href=(v) rel="noopener noreferrer" { (v) } } @else { (v) } }
            }
        }
    }
}

/// `GET /runs/{id}`.
pub async fn run(
    State(state): State<AppState>,
    user: WebUser,
    Path(id): Path<String>,
) -> PageResult {
    let id = parse_id(&id, "run").map_err(err)?;
    let run = state.store.get_run(id).await.map_err(err)?;
    let can = user.principal.scope >= Scope::Trigger;
    let body = html! {
        @let invoked = run.trigger.kind == TriggerKind::Invoke;
        h1 {
            // Invoke runs belong to no pipeline: their reserved name links nowhere.
            @if invoked { "invoke" } @else { a href={ "/pipelines/" (run.pipeline) } { (run.pipeline) } }
            " #" (run.number) " " span #run-status data-live-run=(run.id) { (badge(run.status.as_str())) }
        }
        @if can {
            div.actions {
                @if !run.status.is_final() {
                    form method="post" action={ "/runs/" (run.id) "/cancel" } data-hide-when-final {
                        (csrf_field(&user)) button.danger type="submit" { "Cancel run" }
                    }
                }
                @if !invoked {
                    form method="post" action={ "/runs/" (run.id) "/rerun" } {
                        (csrf_field(&user)) button type="submit" { "Re-run" }
                    }
                }
            }
        }
        (trigger_info(&run.trigger))
        @if !run.variables.is_empty() {
            h2 { "Variables" }
            dl.vars { @for (k, v) in &run.variables { dt { (k) } dd { (v) } } }
        }
        h2 { "Jobs" }
        table.jobs {
            thead { tr { th { "Job" } th { "Status" } th { "Needs" } th { "Runs on" } th { "Duration" } } }
            tbody {
                @for j in &run.jobs {
                    tr data-job-id=(j.id) {
                        td { a href={ "/jobs/" (j.id) } { (j.name) } }
                        td.jstatus { (badge(j.status.as_str())) }
                        td { @if j.needs.is_empty() { "–" } @else { (j.needs.join(", ")) } }
                        td { (j.runs_on.join(", ")) }
                        td.jdur { (duration(j.started_at, j.finished_at)) }
                    }
                }
            }
        }
    };
    Ok(page(
        &format!("{} #{}", run.pipeline, run.number),
        Some(&user),
        body,
    )
    .into_response())
}

/// Checks the form's CSRF token and the caller's scope for a state change.
fn allow_change(user: &WebUser, csrf: &str) -> Result<(), Refusal> {
    user.check_csrf(csrf)?;
    if user.principal.scope < Scope::Trigger {
        return Err(Refusal("this needs a token with the `trigger` scope"));
    }
    Ok(())
}

/// `POST /runs/{id}/cancel`.
pub async fn cancel_run(
    State(state): State<AppState>,
    user: WebUser,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> PageResult {
    allow_change(&user, &f.csrf)?;
    let id = parse_id(&id, "run").map_err(err)?;
    state.store.cancel_run(id).await.map_err(err)?;
    tracing::info!(run.id = %id, actor = %user.principal.name, "run cancel requested from the web UI");
    Ok(Redirect::to(&format!("/runs/{id}")).into_response())
}

/// `POST /runs/{id}/rerun`: a new run of the same pipeline with the same trigger and variables.
pub async fn rerun(
    State(state): State<AppState>,
    user: WebUser,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> PageResult {
    allow_change(&user, &f.csrf)?;
    let id = parse_id(&id, "run").map_err(err)?;
    let old = state.store.get_run(id).await.map_err(err)?;
    let (_, def) = state.store.get_pipeline(&old.pipeline).await.map_err(err)?;
    let trigger = TriggerInfo {
        kind: TriggerKind::Manual,
        source: Some("web".into()),
        actor: Some(user.principal.name.clone()),
        delivery_id: None,
        ..old.trigger
    };
    let run = state
        .store
        .create_run(
            NewRun {
                pipeline: old.pipeline,
                trigger,
                variables: old.variables,
            },
            &def,
        )
        .await
        .map_err(err)?;
    Ok(Redirect::to(&format!("/runs/{}", run.id)).into_response())
}

// ---------------------------------------------------------------------------
// Jobs
// ---------------------------------------------------------------------------

/// `GET /jobs/{id}`: the job and its log viewer (rendered by the script from the JSON API).
pub async fn job(
    State(state): State<AppState>,
    user: WebUser,
    Path(id): Path<String>,
) -> PageResult {
    let id = parse_id(&id, "job").map_err(err)?;
    let job: Job = state.store.get_job(id).await.map_err(err)?;
    let run = state.store.get_run(job.run_id).await.map_err(err)?;
    let can = user.principal.scope >= Scope::Trigger;
    let body = html! {
        p.crumbs { a href={ "/runs/" (run.id) } { (run.pipeline) " #" (run.number) } " / " (job.name) }
        h1 { (job.name) " " span #job-status { (badge(job.status.as_str())) } }
        div.actions {
            @if can && !job.status.is_final() {
                form method="post" action={ "/jobs/" (job.id) "/cancel" } data-hide-when-final {
                    (csrf_field(&user)) button.danger #cancel-job type="submit" { "Cancel job" }
                }
            }
            a.button href={ "/api/v1/jobs/" (job.id) "/log" } download={ (job.name) ".log" } { "Download raw" }
        }
        div.logbar {
            label { input #follow type="checkbox" checked; " Follow" }
            input #log-search type="search" placeholder="Search the log" aria-label="Search the log";
            span #search-count {}
            button #search-next type="button" { "Next match" }
        }
        button #load-earlier type="button" hidden { "Load earlier output" }
        div #log.log data-job-id=(job.id) data-log-size=(job.log_size) role="log" aria-live="off" {}
        p #log-state.hint {}
    };
    Ok(page(&job.name, Some(&user), body).into_response())
}

/// `POST /jobs/{id}/cancel`.
pub async fn cancel_job(
    State(state): State<AppState>,
    user: WebUser,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> PageResult {
    allow_change(&user, &f.csrf)?;
    let id = parse_id(&id, "job").map_err(err)?;
    state.store.cancel_job(id).await.map_err(err)?;
    tracing::info!(job.id = %id, actor = %user.principal.name, "job cancel requested from the web UI");
    Ok(Redirect::to(&format!("/jobs/{id}")).into_response())
}

// ---------------------------------------------------------------------------
// Runners, pipelines, webhooks
// ---------------------------------------------------------------------------

/// `GET /runners`.
pub async fn runners(State(state): State<AppState>, user: WebUser) -> PageResult {
    let runners = state.store.list_runners().await.map_err(err)?;
    let body = html! {
        h1 { "Runners" }
        @if user.principal.scope >= Scope::Invoke { (super::invoke::command_box(&user, &runners)) }
        table.runners {
            thead { tr { th { "Name" } th { "State" } th { "Labels" } th { "Pool" } th { "Version" } th { "Current job" } th { "Last seen" } } }
            tbody {
                @for r in &runners {
                    @let state = serde_json::to_value(r.state).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
                    tr {
                        td { (r.name) }
                        td { (badge(&state)) }
                        td { (r.labels.join(", ")) }
                        td { (r.pool) }
                        td { (r.version) " " (r.os) "/" (r.arch) }
                        td { @if let Some(j) = r.current_job { a href={ "/jobs/" (j) } { "job" } } @else { "–" } }
                        td { (time(r.last_seen_at)) }
                    }
                }
            }
        }
        @if runners.is_empty() { p.empty { "No runners registered." } }
    };
    Ok(page("Runners", Some(&user), body).into_response())
}

/// `GET /pipelines`.
pub async fn pipelines(State(state): State<AppState>, user: WebUser) -> PageResult {
    let list = state.store.list_pipelines().await.map_err(err)?;
    let body = html! {
        h1 { "Pipelines" }
        table.pipelines {
            thead { tr { th { "Name" } th { "Description" } th { "Jobs" } th { "Updated" } } }
            tbody {
                @for p in &list {
                    tr {
                        td { a href={ "/pipelines/" (p.name) } { (p.name) } }
                        td { (p.description.as_deref().unwrap_or("")) }
                        td { (p.jobs.join(", ")) }
                        td { (time(Some(p.updated_at))) }
                    }
                }
            }
        }
        @if list.is_empty() { p.empty { "No pipelines yet: apply one with " code { "outpost pipeline apply" } "." } }
    };
    Ok(page("Pipelines", Some(&user), body).into_response())
}

/// `GET /pipelines/{name}`.
pub async fn pipeline(
    State(state): State<AppState>,
    user: WebUser,
    Path(name): Path<String>,
) -> PageResult {
    let (p, _) = state.store.get_pipeline(&name).await.map_err(err)?;
    let runs = state
        .store
        .list_runs(Some(&name), None, 20, None)
        .await
        .map_err(err)?;
    let body = html! {
        h1 { (p.name) }
        @if let Some(d) = &p.description { p { (d) } }
        @if user.principal.scope >= Scope::Trigger {
            details.runform open {
                summary { "Run this pipeline" }
                form method="post" action={ "/pipelines/" (p.name) "/run" } {
                    (csrf_field(&user))
                    label for="ref" { "Ref (optional)" } input #ref type="text" name="ref";
                    label for="sha" { "Commit (optional)" } input #sha type="text" name="sha";
                    label for="variables" { "Variables, one " code { "NAME=value" } " per line" }
                    textarea #variables name="variables" rows="3" {}
                    button #run-pipeline type="submit" { "Run" }
                }
            }
        }
        h2 { "Recent runs" }
        (runs_table(&runs.runs, Some((&p.name, ""))))
        h2 { "Definition" }
        pre.yaml { code { (p.yaml) } }
    };
    Ok(page(&p.name, Some(&user), body).into_response())
}

#[derive(Debug, Deserialize)]
pub struct TriggerForm {
    #[serde(default)]
    csrf: String,
    #[serde(default, rename = "ref")]
    git_ref: String,
    #[serde(default)]
    sha: String,
    #[serde(default)]
    variables: String,
}

/// Parses `NAME=value` lines; blank lines are skipped.
fn parse_variables(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let Some((k, v)) = line.split_once('=') else {
            return Err(format!("{line:?} is not NAME=value"));
        };
        let k = k.trim();
        if !crate::api::runs::valid_variable_name(k) {
            return Err(format!("{k:?} is not a valid variable name"));
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// `POST /pipelines/{name}/run`.
pub async fn trigger(
    State(state): State<AppState>,
    user: WebUser,
    Path(name): Path<String>,
    Form(f): Form<TriggerForm>,
) -> PageResult {
    allow_change(&user, &f.csrf)?;
    let variables = parse_variables(&f.variables).map_err(|m| {
        (
            StatusCode::BAD_REQUEST,
            page(
                "Invalid variables",
                Some(&user),
                html! { h1 { "Invalid variables" } p { (m) } },
            ),
        )
            .into_response()
    })?;
    let (_, def) = state.store.get_pipeline(&name).await.map_err(err)?;
    let opt = |s: String| Some(s.trim().to_string()).filter(|s| !s.is_empty());
    let run = state
        .store
        .create_run(
            NewRun {
                pipeline: name,
                trigger: TriggerInfo {
                    kind: TriggerKind::Manual,
                    source: Some("web".into()),
                    actor: Some(user.principal.name.clone()),
                    git_ref: opt(f.git_ref),
                    sha: opt(f.sha),
                    clone_url: def.repository.clone(),
                    ..Default::default()
                },
                variables,
            },
            &def,
        )
        .await
        .map_err(err)?;
    tracing::info!(run.id = %run.id, actor = %user.principal.name, "run queued from the web UI");
    Ok(Redirect::to(&format!("/runs/{}", run.id)).into_response())
}

/// `GET /webhooks`: recent deliveries, for admins.
pub async fn webhooks(State(state): State<AppState>, user: WebUser) -> PageResult {
    if user.principal.scope < Scope::Admin {
        return Err(err(ApiError::forbidden("admins only")));
    }
    let list = state
        .store
        .list_deliveries(None, 100, None)
        .await
        .map_err(err)?;
    let body = html! {
        h1 { "Webhook deliveries" }
        table.deliveries {
            thead { tr { th { "Received" } th { "Source" } th { "Event" } th { "Pipeline" } th { "Outcome" } th { "Reason" } th { "Runs" } } }
            tbody {
                @for d in &list.deliveries {
                    tr {
                        td { (time(Some(d.received_at))) }
                        td { (d.source) }
                        td { (d.event.as_deref().unwrap_or("")) }
                        td { (d.pipeline.as_deref().unwrap_or("")) }
                        td { (d.outcome) " (" (d.status_code) ")" }
                        td { (d.reason.as_deref().unwrap_or("")) }
                        td { @for r in &d.run_ids { a href={ "/runs/" (r) } { "run" } " " } }
                    }
                }
            }
        }
        @if list.deliveries.is_empty() { p.empty { "No deliveries yet." } }
    };
    Ok(page("Webhooks", Some(&user), body).into_response())
}
