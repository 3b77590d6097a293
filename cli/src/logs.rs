//! Showing job logs: stored ones, and live ones that survive dropped connections.
//!
//! A live log is read from the server's Server-Sent Events stream.
//! Every text event carries the byte offset just after it; when the connection drops, the
//! follower reconnects with backoff and asks for the bytes after the last offset it printed, so
//! nothing is shown twice and nothing is skipped.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::StreamExt;
use outpost_protocol::sse::LogEvent;
use outpost_protocol::{ClientError, Job, JobStatus, Run, RunStatus};
use serde_json::json;
use uuid::Uuid;

use crate::context::{Ctx, describe};
use crate::output::{self, OutputFormat};

/// Reconnection attempts in a row, without a byte of progress, before giving up.
const MAX_RECONNECTS: u32 = 12;
/// The first reconnection delay; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// The longest reconnection delay.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How often a followed run is polled for jobs that start.
const RUN_POLL: Duration = Duration::from_millis(500);
/// How long a job may sit queued before the follower says it is waiting for a runner.
const QUEUED_HINT_AFTER: Duration = Duration::from_secs(5);

/// The delay before reconnection attempt `attempt` (1-based).
fn backoff(attempt: u32) -> Duration {
    let factor = 1u32 << attempt.saturating_sub(1).min(16);
    (FIRST_BACKOFF * factor).min(MAX_BACKOFF)
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobEnd {
    /// Its final status.
    pub status: JobStatus,
    /// The exit code of the step that decided it, if any.
    pub exit_code: Option<i32>,
}

/// Prints log text and per-job headers, as text for people or as JSON lines.
#[derive(Debug)]
pub struct LogPrinter {
    format: OutputFormat,
    /// One job's log on its own: no header or footer lines, only the log (`outpost logs JOB`).
    bare: bool,
    /// Whether the last text printed ended a line, so that footers start on their own line.
    at_line_start: bool,
}

fn describe_end(status: JobStatus, exit_code: Option<i32>) -> String {
    match exit_code {
        Some(code) if status != JobStatus::Succeeded => {
            format!("{} (exit code {code})", status.as_str())
        }
        _ => status.as_str().to_string(),
    }
}

impl LogPrinter {
    /// A printer; `bare` leaves out the header and footer lines around a single job's log.
    pub fn new(format: OutputFormat, bare: bool) -> Self {
        Self {
            format,
            bare,
            at_line_start: true,
        }
    }

    fn ensure_line_start(&mut self) -> std::io::Result<()> {
        if !self.at_line_start {
            output::out("\n")?;
            self.at_line_start = true;
        }
        Ok(())
    }

    /// A note for the person watching, on stderr so that stdout stays the log.
    pub fn note(&self, message: &str) {
        eprintln!("outpost: {message}");
    }

    /// Announces a run (JSON only: people have already been told).
    pub fn run(&mut self, run: &Run) -> std::io::Result<()> {
        if self.format == OutputFormat::Json {
            output::json_line(&json!({ "event": "run", "run": run }))?;
        }
        Ok(())
    }

    /// The line before a job's log.
    pub fn job_start(&mut self, job: &Job) -> std::io::Result<()> {
        match self.format {
            OutputFormat::Json => output::json_line(&json!({
                "event": "job",
                "job_id": job.id,
                "job": job.name,
                "status": job.status,
            })),
            OutputFormat::Table if self.bare => Ok(()),
            OutputFormat::Table => {
                self.ensure_line_start()?;
                output::outln(&format!("==> job {}", job.name))
            }
        }
    }

    /// Log text of `job` that starts at byte `offset`.
    pub fn text(&mut self, job: &Job, offset: u64, text: &str) -> std::io::Result<()> {
        if text.is_empty() {
            return Ok(());
        }
        match self.format {
            OutputFormat::Json => output::json_line(&json!({
                "event": "log",
                "job_id": job.id,
                "job": job.name,
                "offset": offset,
                "text": text,
            })),
            OutputFormat::Table => {
                self.at_line_start = text.ends_with('\n');
                output::out(text)
            }
        }
    }

    /// A stored log, which need not be UTF-8: people get the bytes as they are.
    pub fn stored(&mut self, job: &Job, bytes: &[u8]) -> std::io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        match self.format {
            OutputFormat::Json => self.text(job, 0, &String::from_utf8_lossy(bytes)),
            OutputFormat::Table => {
                self.at_line_start = bytes.ends_with(b"\n");
                output::out_bytes(bytes)
            }
        }
    }

    /// The line after a job's log; `None` when the job has not ended yet.
    pub fn job_end(&mut self, job: &Job, end: Option<JobEnd>) -> std::io::Result<()> {
        match self.format {
            OutputFormat::Json => output::json_line(&json!({
                "event": "end",
                "job_id": job.id,
                "job": job.name,
                "status": end.map_or(job.status, |e| e.status),
                "exit_code": end.and_then(|e| e.exit_code),
            })),
            OutputFormat::Table => {
                let state = match end {
                    Some(e) => describe_end(e.status, e.exit_code),
                    None => format!("is still {}", job.status.as_str()),
                };
                if self.bare {
                    if end.is_some_and(|e| e.status != JobStatus::Succeeded) || end.is_none() {
                        self.note(&format!("job {} {state}", job.name));
                    }
                    Ok(())
                } else {
                    self.ensure_line_start()?;
                    output::outln(&format!("==> job {} {state}", job.name))
                }
            }
        }
    }

    /// A job that never ran (skipped because a job it needs failed, or cancelled while queued).
    pub fn job_not_run(&mut self, job: &Job) -> std::io::Result<()> {
        match self.format {
            OutputFormat::Json => output::json_line(&json!({
                "event": "end",
                "job_id": job.id,
                "job": job.name,
                "status": job.status,
                "exit_code": job.exit_code,
            })),
            OutputFormat::Table => {
                self.ensure_line_start()?;
                let why = match job.status {
                    JobStatus::Skipped => "skipped: a job it needs did not succeed".to_string(),
                    JobStatus::Pending => "is waiting for the jobs it needs".to_string(),
                    JobStatus::Queued => "is queued: no runner has taken it yet".to_string(),
                    s => format!("{} without running", s.as_str()),
                };
                output::outln(&format!("==> job {} {why}", job.name))
            }
        }
    }

    /// The line after the whole run.
    pub fn run_end(&mut self, run: &Run) -> std::io::Result<()> {
        match self.format {
            OutputFormat::Json => output::json_line(&json!({ "event": "run_end", "run": run })),
            OutputFormat::Table => {
                self.ensure_line_start()?;
                output::outln(&format!(
                    "Run {} #{} {}",
                    run.pipeline,
                    run.number,
                    run.status.as_str()
                ))
            }
        }
    }
}

/// Whether an error while following means stop rather than reconnect: the server said no
/// (`401`, `403`, `404`…), or it answered something that is no log stream at all.
fn is_fatal(err: &ClientError, got_events: bool) -> bool {
    match err {
        ClientError::Api { .. } => !err.is_transient(),
        ClientError::Decode(_) => !got_events,
        ClientError::Transport(_) => false,
    }
}

/// The part of a text event after `seen`, the offset already printed.
///
/// The server resumes exactly at the offset asked for, so an overlap only happens with a server
/// that does not; the bytes are then mapped back when the text is a faithful copy of them.
fn unseen_text(start: u64, next: u64, seen: u64, text: &str) -> Option<String> {
    if next <= seen {
        return None;
    }
    if start >= seen {
        return Some(text.to_string());
    }
    let skip = (seen - start) as usize;
    if next - start == text.len() as u64 && skip <= text.len() {
        Some(String::from_utf8_lossy(&text.as_bytes()[skip..]).into_owned())
    } else {
        Some(text.to_string())
    }
}

/// Follows one job's log from the start until the job ends, reconnecting when the connection
/// drops, and returns how it ended.
pub async fn follow_job(ctx: &Ctx, job: &Job, printer: &mut LogPrinter) -> anyhow::Result<JobEnd> {
    let mut offset = 0u64;
    let mut attempts = 0u32;
    loop {
        let mut events = ctx.client.stream_log(job.id, offset);
        let mut got_events = false;
        let reason = loop {
            match events.next().await {
                Some(Ok(LogEvent::Text {
                    offset: start,
                    next_offset,
                    text,
                })) => {
                    got_events = true;
                    attempts = 0;
                    if start > offset {
                        printer.note(&format!(
                            "the server skipped bytes {offset}..{start} of the log of job {}",
                            job.name
                        ));
                    }
                    if let Some(text) = unseen_text(start, next_offset, offset, &text) {
                        printer.text(job, offset.max(start), &text)?;
                    }
                    offset = offset.max(next_offset);
                }
                Some(Ok(LogEvent::End {
                    status, exit_code, ..
                })) => return Ok(JobEnd { status, exit_code }),
                Some(Err(e)) if is_fatal(&e, got_events) => return Err(ctx.fail(e)),
                Some(Err(e)) => break describe(&e, &ctx.server),
                None => break "the server closed the log stream before the job ended".to_string(),
            }
        };
        attempts += 1;
        if attempts > MAX_RECONNECTS {
            bail!(
                "{reason}; gave up after {MAX_RECONNECTS} attempts to reconnect \
                 (resume with `outpost logs {} -f`)",
                job.id
            );
        }
        let delay = backoff(attempts);
        printer.note(&format!(
            "{reason}; reconnecting in {:.1}s (attempt {attempts} of {MAX_RECONNECTS})",
            delay.as_secs_f64()
        ));
        tokio::time::sleep(delay).await;
    }
}

/// Calls `get` until it succeeds, retrying transient failures (the server restarting, a
/// dropped connection) with backoff.
async fn patiently<T, F, Fut>(ctx: &Ctx, printer: &LogPrinter, mut get: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ClientError>>,
{
    let mut attempts = 0u32;
    loop {
        match get().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() && attempts < MAX_RECONNECTS => {
                attempts += 1;
                let delay = backoff(attempts);
                printer.note(&format!(
                    "{}; retrying in {:.1}s",
                    describe(&e, &ctx.server),
                    delay.as_secs_f64()
                ));
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(ctx.fail(e)),
        }
    }
}

/// The next job to show: the earliest-started one not shown yet.
fn next_started<'a>(run: &'a Run, shown: &HashSet<Uuid>) -> Option<&'a Job> {
    run.jobs
        .iter()
        .enumerate()
        .filter(|(_, j)| !shown.contains(&j.id) && j.started_at.is_some())
        .min_by_key(|(i, j)| (j.started_at, *i))
        .map(|(_, j)| j)
}

/// Follows a run: each job's log in the order the jobs start, one after the other, until the
/// run ends; returns the run as it ended.
pub async fn follow_run(ctx: &Ctx, run_id: Uuid, printer: &mut LogPrinter) -> anyhow::Result<Run> {
    let mut shown: HashSet<Uuid> = HashSet::new();
    let mut waiting_since: Option<Instant> = None;
    let mut hinted: HashSet<Uuid> = HashSet::new();
    loop {
        let run = patiently(ctx, printer, || ctx.client.get_run(run_id)).await?;
        if let Some(job) = next_started(&run, &shown) {
            waiting_since = None;
            printer.job_start(job)?;
            let end = follow_job(ctx, job, printer).await?;
            printer.job_end(job, Some(end))?;
            shown.insert(job.id);
            continue;
        }
        // Jobs that ended without ever starting (skipped, or cancelled while queued).
        for job in &run.jobs {
            if !shown.contains(&job.id) && job.started_at.is_none() && job.status.is_final() {
                printer.job_not_run(job)?;
                shown.insert(job.id);
            }
        }
        if run.status.is_final() {
            // A run ends when all its jobs have; anything left was never started.
            for job in &run.jobs {
                if shown.insert(job.id) {
                    printer.job_not_run(job)?;
                }
            }
            return Ok(run);
        }
        let since = *waiting_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= QUEUED_HINT_AFTER {
            for job in &run.jobs {
                if job.status == JobStatus::Queued && hinted.insert(job.id) {
                    printer.note(&format!(
                        "job {} is queued: waiting for a runner labelled {}",
                        job.name,
                        job.runs_on.join(", ")
                    ));
                }
            }
        }
        tokio::time::sleep(RUN_POLL).await;
    }
}

/// Prints the stored logs of a run's jobs, in the order they started; returns the run.
pub async fn print_run(ctx: &Ctx, run: &Run, printer: &mut LogPrinter) -> anyhow::Result<()> {
    let mut jobs: Vec<(usize, &Job)> = run.jobs.iter().enumerate().collect();
    jobs.sort_by_key(|(i, j)| (j.started_at.is_none(), j.started_at, *i));
    for (_, job) in jobs {
        if job.started_at.is_none() && job.log_size == 0 {
            printer.job_not_run(job)?;
            continue;
        }
        printer.job_start(job)?;
        print_job_log(ctx, job, printer).await?;
    }
    Ok(())
}

/// Prints one job's stored log and the line after it.
pub async fn print_job_log(ctx: &Ctx, job: &Job, printer: &mut LogPrinter) -> anyhow::Result<()> {
    let bytes = ctx
        .client
        .get_log(job.id, 0)
        .await
        .map_err(|e| ctx.fail(e))
        .with_context(|| format!("could not read the log of job {}", job.name))?;
    printer.stored(job, &bytes)?;
    let end = job.status.is_final().then_some(JobEnd {
        status: job.status,
        exit_code: job.exit_code,
    });
    printer.job_end(job, end)?;
    Ok(())
}

/// The exit code for a run's outcome: failure only when it ended badly.
pub fn run_exit(status: RunStatus) -> u8 {
    match status {
        RunStatus::Failed | RunStatus::Cancelled => crate::context::EXIT_FAILED,
        RunStatus::Queued | RunStatus::Running | RunStatus::Succeeded => crate::context::EXIT_OK,
    }
}

/// The exit code for a job's outcome: failure only when it ended and did not succeed.
pub fn job_exit(status: JobStatus) -> u8 {
    if status.is_final() && status != JobStatus::Succeeded {
        crate::context::EXIT_FAILED
    } else {
        crate::context::EXIT_OK
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(2), Duration::from_secs(1));
        assert_eq!(backoff(4), Duration::from_secs(4));
        assert_eq!(backoff(5), Duration::from_secs(8));
        assert_eq!(backoff(6), MAX_BACKOFF);
        assert_eq!(backoff(40), MAX_BACKOFF);
    }

    #[test]
    fn text_already_shown_is_not_shown_again() {
        assert_eq!(unseen_text(0, 6, 0, "hello\n").as_deref(), Some("hello\n"));
        assert_eq!(unseen_text(0, 6, 6, "hello\n"), None);
        assert_eq!(unseen_text(0, 6, 2, "hello\n").as_deref(), Some("llo\n"));
        assert_eq!(unseen_text(10, 12, 4, "ab").as_deref(), Some("ab"));
    }

    #[test]
    fn fatal_errors_stop_and_others_reconnect() {
        let api = |status: u16| ClientError::Api {
            status: status.try_into().unwrap(),
            code: "x".into(),
            message: "m".into(),
            next_offset: None,
        };
        assert!(is_fatal(&api(404), false));
        assert!(is_fatal(&api(401), true));
        assert!(!is_fatal(&api(503), false));
        assert!(!is_fatal(&api(429), false));
        assert!(is_fatal(&ClientError::Decode("html".into()), false));
        assert!(!is_fatal(&ClientError::Decode("cut utf-8".into()), true));
    }

    #[test]
    fn exit_codes_follow_the_outcome() {
        assert_eq!(run_exit(RunStatus::Succeeded), 0);
        assert_eq!(run_exit(RunStatus::Failed), 1);
        assert_eq!(run_exit(RunStatus::Cancelled), 1);
        assert_eq!(job_exit(JobStatus::Succeeded), 0);
        assert_eq!(job_exit(JobStatus::Running), 0);
        assert_eq!(job_exit(JobStatus::TimedOut), 1);
        assert_eq!(job_exit(JobStatus::Skipped), 1);
    }
}
