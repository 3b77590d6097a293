//! `outpost invoke`: run one command on a runner next to a private cluster, as if locally.
//!
//! The command is queued as a one-job run (trigger `invoke`); its output is the job's log,
//! followed live over the same resumable stream as `outpost logs -f` and printed byte for byte;
//! the CLI exits with the command's exit code.
//! Ctrl-C asks the server to cancel the job, waits (bounded) for the runner to confirm, and
//! exits 130 like an interrupted local command.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use base64::Engine as _;
use chrono::Utc;
use outpost_protocol::{
    INVOKE_MAX_FILE_BYTES, INVOKE_MAX_TOTAL_BYTES, InvokeRequest, JobStatus, UploadedFile,
};
use tokio::signal::unix::{SignalKind, signal};

use crate::context::{Ctx, EXIT_FAILED, EXIT_OK};
use crate::logs::{self, LogPrinter};
use crate::output::{self, Table, ago};

/// Exit code after Ctrl-C, as a shell reports a command killed by SIGINT.
pub const EXIT_INTERRUPTED: u8 = 130;
/// Exit code when the command ran past its timeout, as `timeout(1)` has it.
pub const EXIT_TIMED_OUT: u8 = 124;
/// How long to wait for the runner to confirm a cancellation after Ctrl-C.
const CANCEL_WAIT: Duration = Duration::from_secs(30);
/// How long a queued command waits before the CLI says it is waiting for a runner.
const QUEUED_HINT_AFTER: Duration = Duration::from_secs(5);

/// What `outpost invoke` was asked to do.
#[derive(Debug)]
pub struct Invoke {
    /// The command's words.
    pub argv: Vec<String>,
    /// Run the words as a shell script.
    pub shell: bool,
    /// The cluster to run against.
    pub cluster: Option<String>,
    /// Runner labels.
    pub labels: Vec<String>,
    /// The job's timeout.
    pub timeout: Option<Duration>,
    /// Local files to upload.
    pub files: Vec<PathBuf>,
}

/// Reads `paths` for upload, each under its file name, within the size limits.
pub fn read_files(paths: &[PathBuf]) -> anyhow::Result<Vec<UploadedFile>> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut files: Vec<UploadedFile> = Vec::new();
    let mut total = 0usize;
    for path in paths {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| !n.is_empty())
            .with_context(|| format!("cannot upload {}: it has no file name", path.display()))?;
        let meta = std::fs::metadata(path)
            .with_context(|| format!("could not read --file {}", path.display()))?;
        if meta.is_dir() {
            bail!(
                "--file {} is a directory: upload its files one by one (each with its own --file)",
                path.display()
            );
        }
        if meta.len() > INVOKE_MAX_FILE_BYTES as u64 {
            bail!(
                "--file {} has {}; a file uploaded with invoke may have at most {} \
                 (put larger files on the runner another way, e.g. in a git repository a pipeline checks out)",
                path.display(),
                human_bytes(meta.len()),
                human_bytes(INVOKE_MAX_FILE_BYTES as u64)
            );
        }
        if files.iter().any(|f| f.path == name) {
            bail!(
                "two files are named {name}: uploaded files land in the workspace under their file name, so rename one"
            );
        }
        let bytes = std::fs::read(path)
            .with_context(|| format!("could not read --file {}", path.display()))?;
        total += bytes.len();
        if total > INVOKE_MAX_TOTAL_BYTES {
            bail!(
                "the files add up to more than {}, the most one invoke may upload",
                human_bytes(INVOKE_MAX_TOTAL_BYTES as u64)
            );
        }
        files.push(UploadedFile {
            path: name.to_string(),
            content_base64: base64::engine::general_purpose::STANDARD.encode(&bytes),
            executable: meta.permissions().mode() & 0o111 != 0,
        });
    }
    Ok(files)
}

fn human_bytes(n: u64) -> String {
    if n >= 1024 * 1024 {
        format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0))
    } else if n >= 1024 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else {
        format!("{n} bytes")
    }
}

/// Parses a timeout: `90s`, `5m`, `1h30m`, or a number of seconds.
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let d = match s.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(s)
            .map_err(|e| format!("{s:?} is not a duration ({e}): use e.g. 90s, 5m or 1h"))?,
    };
    if d < Duration::from_secs(1) {
        return Err("the timeout must be at least 1s".into());
    }
    Ok(d)
}

/// The exit code for how the command ended.
fn exit_code(status: JobStatus, code: Option<i32>, interrupted: bool) -> u8 {
    match status {
        JobStatus::Succeeded => EXIT_OK,
        JobStatus::Failed => match code {
            Some(c @ 1..=255) => c as u8,
            _ => EXIT_FAILED,
        },
        JobStatus::Cancelled if interrupted => EXIT_INTERRUPTED,
        JobStatus::TimedOut => EXIT_TIMED_OUT,
        _ => EXIT_FAILED,
    }
}

/// `outpost invoke …`.
pub async fn invoke(ctx: &Ctx, args: Invoke) -> anyhow::Result<u8> {
    // Catch Ctrl-C before anything is queued, so that it can never leave a command running
    // unwatched on the runner.
    let mut sigint = signal(SignalKind::interrupt()).context("could not watch for Ctrl-C")?;
    let files = read_files(&args.files)?;
    let req = InvokeRequest {
        argv: args.argv,
        shell: args.shell,
        cluster: args.cluster,
        labels: args.labels,
        timeout_secs: args.timeout.map(|d| d.as_secs().max(1)),
        files,
    };
    let run = ctx.client.invoke(&req).await.map_err(|e| ctx.fail(e))?;
    let job = run
        .jobs
        .first()
        .cloned()
        .context("the server queued the command but answered without its job")?;
    let mut printer = LogPrinter::new(ctx.output, true);
    if ctx.json() {
        printer.run(&run)?;
        printer.job_start(&job)?;
    }

    let mut interrupted = false;
    let end = {
        let follow = logs::follow_job(ctx, &job, &mut printer);
        tokio::pin!(follow);
        let hint = tokio::time::sleep(QUEUED_HINT_AFTER);
        tokio::pin!(hint);
        let mut hinted = false;
        let give_up = tokio::time::sleep(Duration::from_secs(365 * 24 * 3600));
        tokio::pin!(give_up);
        loop {
            tokio::select! {
                end = &mut follow => break end?,
                _ = &mut hint, if !hinted => {
                    hinted = true;
                    if let Ok(now) = ctx.client.get_job(job.id).await
                        && now.status == JobStatus::Queued
                    {
                        eprintln!(
                            "outpost: waiting for a runner labelled {} (`outpost runners` shows which are online)",
                            job.runs_on.join(", ")
                        );
                    }
                }
                _ = sigint.recv() => {
                    if interrupted {
                        eprintln!(
                            "outpost: stopped waiting; the command may still be stopping on the runner (see `outpost logs {} -f`)",
                            job.id
                        );
                        return Ok(EXIT_INTERRUPTED);
                    }
                    interrupted = true;
                    eprintln!("\noutpost: cancelling the command on the runner (Ctrl-C again to stop waiting)");
                    if let Err(e) = ctx.client.cancel_job(job.id).await {
                        eprintln!("outpost: could not cancel job {}: {}", job.id, crate::context::describe(&e, &ctx.server));
                        return Ok(EXIT_INTERRUPTED);
                    }
                    give_up.as_mut().reset(tokio::time::Instant::now() + CANCEL_WAIT);
                }
                _ = &mut give_up => {
                    eprintln!(
                        "outpost: the runner did not confirm the cancellation within {}s; see `outpost logs {} -f`",
                        CANCEL_WAIT.as_secs(),
                        job.id
                    );
                    return Ok(EXIT_INTERRUPTED);
                }
            }
        }
    };
    if ctx.json() {
        printer.job_end(&job, Some(end))?;
    } else {
        match end.status {
            JobStatus::Succeeded => {}
            JobStatus::Failed if end.exit_code.is_some() => {}
            JobStatus::Failed => eprintln!("outpost: the command could not be started (see above)"),
            JobStatus::Cancelled if interrupted => eprintln!("outpost: the command was cancelled"),
            JobStatus::Cancelled => {
                eprintln!(
                    "outpost: the command was cancelled by someone else (`outpost audit` shows who)"
                )
            }
            JobStatus::TimedOut => eprintln!(
                "outpost: the command ran past its timeout of {} and was stopped (raise it with --timeout)",
                humantime::format_duration(Duration::from_secs(job.timeout_secs))
            ),
            JobStatus::Lost => eprintln!(
                "outpost: the runner stopped answering while the command ran; it may or may not have finished"
            ),
            other => eprintln!("outpost: the command ended {}", other.as_str()),
        }
    }
    Ok(exit_code(end.status, end.exit_code, interrupted))
}

/// `outpost audit`.
pub async fn audit(ctx: &Ctx, kind: Option<&str>, limit: u32) -> anyhow::Result<u8> {
    let list = ctx
        .client
        .list_audit(kind, Some(limit), None)
        .await
        .map_err(|e| ctx.fail(e))?;
    if ctx.json() {
        output::json(&list)?;
        return Ok(EXIT_OK);
    }
    if list.events.is_empty() {
        output::outln("No audit records match.")?;
        return Ok(EXIT_OK);
    }
    let now = Utc::now();
    let mut table = Table::new(&[
        "WHEN", "KIND", "ACTOR", "RUNNER", "STATUS", "EXIT", "COMMAND",
    ]);
    for e in &list.events {
        table.row(vec![
            ago(e.created_at, now),
            e.kind.clone(),
            e.actor.clone(),
            e.runner_name.clone().unwrap_or_else(|| "-".into()),
            e.status
                .map_or_else(|| "-".into(), |s| s.as_str().to_string()),
            e.exit_code.map_or_else(|| "-".into(), |c| c.to_string()),
            e.command.clone().unwrap_or_default(),
        ]);
    }
    table.print()?;
    Ok(EXIT_OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uploadable(path: &std::path::Path) -> bool {
        read_files(&[path.to_path_buf()]).is_ok()
    }

    #[test]
    fn timeouts_read_like_durations() {
        assert_eq!(parse_timeout("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_timeout("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_timeout("1h30m").unwrap(), Duration::from_secs(5400));
        assert!(parse_timeout("0").is_err());
        assert!(parse_timeout("soon").is_err());
    }

    #[test]
    fn exit_codes_are_the_command_s() {
        assert_eq!(exit_code(JobStatus::Succeeded, Some(0), false), 0);
        assert_eq!(exit_code(JobStatus::Failed, Some(3), false), 3);
        assert_eq!(exit_code(JobStatus::Failed, Some(127), false), 127);
        assert_eq!(exit_code(JobStatus::Failed, None, false), 1);
        assert_eq!(exit_code(JobStatus::Failed, Some(-9), false), 1);
        assert_eq!(exit_code(JobStatus::Cancelled, None, true), 130);
        assert_eq!(exit_code(JobStatus::Cancelled, None, false), 1);
        assert_eq!(exit_code(JobStatus::TimedOut, Some(143), false), 124);
    }

    #[test]
    fn files_are_checked_before_anything_is_sent() {
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("m.yaml");
        std::fs::write(&small, "kind: Pod\n").unwrap();
        assert!(uploadable(&small));
        let big = dir.path().join("big.bin");
        std::fs::write(&big, vec![0u8; INVOKE_MAX_FILE_BYTES + 1]).unwrap();
        let err = read_files(std::slice::from_ref(&big))
            .unwrap_err()
            .to_string();
        assert!(err.contains("at most 1.0 MiB"), "{err}");
        assert!(!uploadable(dir.path()));
        assert!(!uploadable(&dir.path().join("missing")));
        let other = tempfile::tempdir().unwrap();
        let twin = other.path().join("m.yaml");
        std::fs::write(&twin, "x").unwrap();
        let err = read_files(&[small, twin]).unwrap_err().to_string();
        assert!(err.contains("two files are named m.yaml"), "{err}");
    }
}
