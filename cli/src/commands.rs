//! One function per command: call the API, print the answer, return the exit code.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail};
use chrono::Utc;
use outpost_protocol::{ClientError, Job, JobStatus, Run, RunStatus, TriggerRunRequest};
use serde_json::json;
use uuid::Uuid;

use crate::context::{Ctx, EXIT_ERROR, EXIT_OK, is_not_found};
use crate::logs::{self, LogPrinter};
use crate::output::{self, Table, ago};

/// The pipeline name a file stands for: its name without the extension.
fn name_from_file(path: &Path) -> anyhow::Result<String> {
    path.file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .ok_or_else(|| {
            anyhow!(
                "cannot take a pipeline name from {}: pass --name",
                path.display()
            )
        })
}

/// `outpost pipeline apply FILE… [--name N]`.
pub async fn pipeline_apply(
    ctx: &Ctx,
    files: &[PathBuf],
    name: Option<&str>,
) -> anyhow::Result<u8> {
    if name.is_some() && files.len() > 1 {
        bail!(
            "--name names one pipeline, but {} files were given: apply them one at a time, or drop --name to name each after its file",
            files.len()
        );
    }
    let mut results = Vec::new();
    let mut failed = 0usize;
    for file in files {
        let name = match name {
            Some(n) => n.to_string(),
            None => name_from_file(file)?,
        };
        let yaml = match std::fs::read_to_string(file) {
            Ok(yaml) => yaml,
            Err(e) => {
                failed += 1;
                eprintln!("error: could not read {}: {e}", file.display());
                continue;
            }
        };
        match ctx.client.apply_pipeline_created(&name, &yaml).await {
            Ok((pipeline, created)) => {
                if ctx.json() {
                    results.push(json!({ "file": file, "created": created, "pipeline": pipeline }));
                } else {
                    let verb = if created { "created" } else { "updated" };
                    let jobs = pipeline.jobs.len();
                    let plural = if jobs == 1 { "" } else { "s" };
                    output::outln(&format!(
                        "pipeline {} {verb} from {} ({jobs} job{plural}: {})",
                        pipeline.name,
                        file.display(),
                        pipeline.jobs.join(", ")
                    ))?;
                }
            }
            // A pipeline the server rejects is the file's fault: say which file and go on, so
            // that one run shows every broken file.
            Err(ClientError::Api {
                status, message, ..
            }) if status.as_u16() == 400 => {
                failed += 1;
                eprintln!("error: {}: {message}", file.display());
            }
            Err(e) => return Err(ctx.fail(e)),
        }
    }
    if ctx.json() {
        output::json(&results)?;
    }
    Ok(if failed > 0 { EXIT_ERROR } else { EXIT_OK })
}

/// `outpost pipeline list`.
pub async fn pipeline_list(ctx: &Ctx) -> anyhow::Result<u8> {
    let list = ctx.client.list_pipelines().await.map_err(|e| ctx.fail(e))?;
    if ctx.json() {
        output::json(&list)?;
        return Ok(EXIT_OK);
    }
    if list.pipelines.is_empty() {
        output::outln("No pipelines yet: add one with `outpost pipeline apply FILE`.")?;
        return Ok(EXIT_OK);
    }
    let now = Utc::now();
    let mut table = Table::new(&["NAME", "JOBS", "UPDATED", "DESCRIPTION"]);
    for p in &list.pipelines {
        table.row(vec![
            p.name.clone(),
            p.jobs.join(","),
            ago(p.updated_at, now),
            p.description.clone().unwrap_or_default(),
        ]);
    }
    table.print()?;
    Ok(EXIT_OK)
}

/// `outpost run PIPELINE …`.
pub async fn run(
    ctx: &Ctx,
    pipeline: &str,
    variables: BTreeMap<String, String>,
    git_ref: Option<String>,
    sha: Option<String>,
    follow: bool,
) -> anyhow::Result<u8> {
    let req = TriggerRunRequest {
        variables,
        git_ref,
        sha,
        ..Default::default()
    };
    let run = ctx
        .client
        .trigger_run(pipeline, &req)
        .await
        .map_err(|e| ctx.fail(e))?;
    let mut printer = LogPrinter::new(ctx.output, false);
    if ctx.json() {
        if !follow {
            output::json(&run)?;
            return Ok(EXIT_OK);
        }
        printer.run(&run)?;
    } else {
        output::outln(&format!(
            "Run {} #{} started: {}",
            run.pipeline, run.number, run.id
        ))?;
        if !follow {
            eprintln!("Follow it with: outpost logs {} -f", run.id);
            return Ok(EXIT_OK);
        }
    }
    let run = logs::follow_run(ctx, run.id, &mut printer).await?;
    printer.run_end(&run)?;
    Ok(logs::run_exit(run.status))
}

/// `outpost runs`.
pub async fn runs(
    ctx: &Ctx,
    pipeline: Option<&str>,
    status: Option<RunStatus>,
    limit: u32,
) -> anyhow::Result<u8> {
    let list = ctx
        .client
        .list_runs(pipeline, status, Some(limit), None)
        .await
        .map_err(|e| ctx.fail(e))?;
    if ctx.json() {
        output::json(&list)?;
        return Ok(EXIT_OK);
    }
    if list.runs.is_empty() {
        output::outln("No runs match.")?;
        return Ok(EXIT_OK);
    }
    let now = Utc::now();
    let mut table = Table::new(&["NUMBER", "PIPELINE", "STATUS", "TRIGGER", "AGE", "ID"]);
    for r in &list.runs {
        table.row(vec![
            format!("#{}", r.number),
            r.pipeline.clone(),
            r.status.as_str().to_string(),
            r.trigger.kind.as_str().to_string(),
            ago(r.created_at, now),
            r.id.to_string(),
        ]);
    }
    table.print()?;
    Ok(EXIT_OK)
}

/// A run or a job, found by id.
enum Target {
    Run(Run),
    Job(Job),
}

/// Looks `id` up as a run, then as a job.
async fn find(ctx: &Ctx, id: Uuid) -> anyhow::Result<Target> {
    match ctx.client.get_run(id).await {
        Ok(run) => return Ok(Target::Run(run)),
        Err(e) if is_not_found(&e) => {}
        Err(e) => return Err(ctx.fail(e)),
    }
    match ctx.client.get_job(id).await {
        Ok(job) => Ok(Target::Job(job)),
        Err(e) if is_not_found(&e) => {
            bail!("no run or job has the id {id}: `outpost runs` lists runs with their ids")
        }
        Err(e) => Err(ctx.fail(e)),
    }
}

/// `outpost logs ID [-f]`.
pub async fn logs(ctx: &Ctx, id: Uuid, follow: bool) -> anyhow::Result<u8> {
    match find(ctx, id).await? {
        Target::Run(run) => {
            let mut printer = LogPrinter::new(ctx.output, false);
            printer.run(&run)?;
            if follow {
                let run = logs::follow_run(ctx, run.id, &mut printer).await?;
                printer.run_end(&run)?;
                Ok(logs::run_exit(run.status))
            } else {
                logs::print_run(ctx, &run, &mut printer).await?;
                if run.status.is_final() {
                    printer.run_end(&run)?;
                } else if !ctx.json() {
                    eprintln!(
                        "Run {} #{} is still {}: add -f to follow it",
                        run.pipeline,
                        run.number,
                        run.status.as_str()
                    );
                }
                Ok(logs::run_exit(run.status))
            }
        }
        Target::Job(job) => {
            let mut printer = LogPrinter::new(ctx.output, true);
            if follow {
                printer.job_start(&job)?;
                let end = logs::follow_job(ctx, &job, &mut printer).await?;
                printer.job_end(&job, Some(end))?;
                Ok(logs::job_exit(end.status))
            } else {
                printer.job_start(&job)?;
                logs::print_job_log(ctx, &job, &mut printer).await?;
                Ok(logs::job_exit(job.status))
            }
        }
    }
}

/// `outpost cancel ID`.
pub async fn cancel(ctx: &Ctx, id: Uuid) -> anyhow::Result<u8> {
    match ctx.client.cancel_run(id).await {
        Ok(run) => {
            if ctx.json() {
                output::json(&run)?;
            } else if run.status == RunStatus::Cancelled {
                output::outln(&format!(
                    "Run {} #{} is cancelled",
                    run.pipeline, run.number
                ))?;
            } else if run.status.is_final() {
                output::outln(&format!(
                    "Run {} #{} had already ended ({}): nothing to cancel",
                    run.pipeline,
                    run.number,
                    run.status.as_str()
                ))?;
            } else {
                output::outln(&format!(
                    "Cancelling run {} #{}: its running jobs stop shortly",
                    run.pipeline, run.number
                ))?;
            }
            return Ok(EXIT_OK);
        }
        Err(e) if is_not_found(&e) => {}
        Err(e) => return Err(ctx.fail(e)),
    }
    match ctx.client.cancel_job(id).await {
        Ok(job) => {
            if ctx.json() {
                output::json(&job)?;
            } else if job.status == JobStatus::Cancelled {
                output::outln(&format!("Job {} is cancelled", job.name))?;
            } else if job.status.is_final() {
                output::outln(&format!(
                    "Job {} had already ended ({}): nothing to cancel",
                    job.name,
                    job.status.as_str()
                ))?;
            } else {
                output::outln(&format!(
                    "Cancelling job {} of run {}: it stops shortly",
                    job.name, job.run_id
                ))?;
            }
            Ok(EXIT_OK)
        }
        Err(e) if is_not_found(&e) => {
            bail!("no run or job has the id {id}: `outpost runs` lists runs with their ids")
        }
        Err(e) => Err(ctx.fail(e)),
    }
}

/// `outpost runners`.
pub async fn runners(ctx: &Ctx) -> anyhow::Result<u8> {
    let list = ctx.client.list_runners().await.map_err(|e| ctx.fail(e))?;
    if ctx.json() {
        output::json(&list)?;
        return Ok(EXIT_OK);
    }
    if list.runners.is_empty() {
        output::outln(
            "No runners registered: register one with `outpost-runner register` on a machine \
             inside the network.",
        )?;
        return Ok(EXIT_OK);
    }
    let now = Utc::now();
    let mut table = Table::new(&["NAME", "STATE", "LABELS", "VERSION", "LAST SEEN"]);
    for r in &list.runners {
        let state = serde_json::to_value(r.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        table.row(vec![
            r.name.clone(),
            state,
            r.labels.join(","),
            r.version.clone(),
            r.last_seen_at
                .map_or_else(|| "never".into(), |t| ago(t, now)),
        ]);
    }
    table.print()?;
    Ok(EXIT_OK)
}

/// `outpost login`: checks the server and token, then saves them in the config file.
pub async fn login(
    path: Option<&Path>,
    server: Option<&str>,
    token: Option<&str>,
    file: &crate::config::FileConfig,
    output: crate::output::OutputFormat,
) -> anyhow::Result<u8> {
    use std::io::IsTerminal as _;
    let Some(path) = path else {
        bail!("cannot tell where the config file goes: set OUTPOST_CONFIG to its path (or HOME)");
    };
    let server = server
        .map(str::to_string)
        .or_else(|| file.server.clone())
        .unwrap_or_else(|| crate::config::DEFAULT_SERVER.to_string());
    let token = match token.map(str::trim).filter(|t| !t.is_empty()) {
        Some(t) => t.to_string(),
        None => {
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                eprint!("API token for {server} (from `outpost-server token create`): ");
            }
            let mut line = String::new();
            stdin
                .read_line(&mut line)
                .map_err(|e| anyhow!("could not read the token from standard input: {e}"))?;
            let line = line.trim().to_string();
            if line.is_empty() {
                bail!("no token given: pass --token, set OUTPOST_TOKEN, or type it when asked");
            }
            line
        }
    };
    let ctx = Ctx::new(&server, Some(&token), output)?;
    // Any valid token may list runners, so this checks the server and the token at once.
    ctx.client.list_runners().await.map_err(|e| ctx.fail(e))?;
    let config = crate::config::FileConfig {
        server: Some(ctx.server.clone()),
        token: Some(token),
    };
    crate::config::save(path, &config)?;
    if ctx.json() {
        output::json(&json!({ "server": ctx.server, "config": path }))?;
    } else {
        output::outln(&format!(
            "Logged in to {}; saved to {} (readable only by you)",
            ctx.server,
            path.display()
        ))?;
    }
    Ok(EXIT_OK)
}

/// `outpost logout`: forgets the saved token, keeping the server.
pub fn logout(path: Option<&Path>, mut file: crate::config::FileConfig) -> anyhow::Result<u8> {
    let Some(path) = path else {
        bail!("cannot tell where the config file is: set OUTPOST_CONFIG to its path (or HOME)");
    };
    if file.token.take().is_none() {
        output::outln(&format!("No token is saved in {}", path.display()))?;
        return Ok(EXIT_OK);
    }
    crate::config::save(path, &file)?;
    output::outln(&format!("Removed the token from {}", path.display()))?;
    Ok(EXIT_OK)
}
