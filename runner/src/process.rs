//! Child processes for steps.
//!
//! Every step runs in a process group of its own so that stopping it reaches the grandchildren too.
//! Its stdout and stderr are the same pipe, so the log shows them in exactly the order they were
//! written, and the pipe is read asynchronously so that a chatty child never blocks the runtime.
//!
//! Stopping is staged: `SIGINT` to the group, `SIGTERM` shortly after, `SIGKILL` once the grace
//! period is over. When the step's main process exits, whatever it left running in its group is
//! stopped as well: nothing a step starts outlives it.

use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::time::Instant;

/// What to run.
#[derive(Debug, Clone)]
pub struct CommandSpec {
    /// The program: a path, or a name looked up on `PATH`.
    pub program: PathBuf,
    /// Its arguments, passed as they are (no shell).
    pub args: Vec<String>,
    /// The working directory.
    pub cwd: PathBuf,
    /// Variables set on top of the runner's own environment.
    pub env: Vec<(String, String)>,
}

/// How to stop a running step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillMode {
    /// `SIGINT`, then `SIGTERM`, then `SIGKILL` after the grace period.
    Graceful,
    /// `SIGKILL` at once (the lease is lost: another runner may be running the job).
    Immediate,
}

/// Timing of a graceful stop.
#[derive(Debug, Clone, Copy)]
pub struct KillTiming {
    /// How long after `SIGINT` the group gets `SIGTERM`.
    pub interrupt_for: Duration,
    /// How long after `SIGINT` the group gets `SIGKILL`.
    pub grace: Duration,
}

impl KillTiming {
    /// `SIGTERM` after at most 2 s, `SIGKILL` after `grace`.
    pub fn with_grace(grace: Duration) -> Self {
        Self {
            interrupt_for: (grace / 2).min(Duration::from_secs(2)),
            grace,
        }
    }
}

/// Where a step's output and the runner's notices about it go.
pub trait StepOutput {
    /// Output of the child, as read from its pipe.
    fn bytes(&mut self, data: &[u8]);
    /// A line of the runner's own (no trailing newline needed).
    fn notice(&mut self, line: &str);
}

impl StepOutput for crate::logs::LogWriter {
    fn bytes(&mut self, data: &[u8]) {
        self.write(data);
    }

    fn notice(&mut self, line: &str) {
        self.line(line);
    }
}

impl StepOutput for Vec<u8> {
    fn bytes(&mut self, data: &[u8]) {
        self.extend_from_slice(data);
    }

    fn notice(&mut self, line: &str) {
        if self.last().is_some_and(|&b| b != b'\n') {
            self.push(b'\n');
        }
        self.extend_from_slice(line.as_bytes());
        self.push(b'\n');
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The exit code, or `128 + signal` when a signal ended it (as shells report it).
    pub code: i32,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    /// The process group it ran in (equal to its pid).
    pub pgid: i32,
}

impl Exit {
    fn from_status(status: ExitStatus, pgid: i32) -> Self {
        match (status.code(), status.signal()) {
            (Some(code), _) => Exit {
                code,
                signal: None,
                pgid,
            },
            (None, Some(sig)) => Exit {
                code: 128 + sig,
                signal: Some(sig),
                pgid,
            },
            (None, None) => Exit {
                code: 1,
                signal: None,
                pgid,
            },
        }
    }
}

/// Sends SIGKILL to the group if the step is dropped before it was cleaned up (for example when
/// the runner itself is shutting down), so that no step outlives its runner.
struct GroupGuard {
    pgid: Pid,
    armed: bool,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = killpg(self.pgid, Signal::SIGKILL);
        }
    }
}

fn signal_group(pgid: Pid, sig: Signal) {
    match killpg(pgid, sig) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => {
            tracing::warn!(pgid = pgid.as_raw(), signal = %sig, error = %e, "could not signal a step's process group")
        }
    }
}

fn group_exists(pgid: Pid) -> bool {
    killpg(pgid, None).is_ok()
}

/// The read end of a step's output pipe.
struct OutputPipe {
    rx: pipe::Receiver,
    buf: Box<[u8]>,
    eof: bool,
}

impl OutputPipe {
    /// Reads once and passes what came to `out`; marks end of file.
    async fn read_into(&mut self, out: &mut impl StepOutput) {
        match self.rx.read(&mut self.buf).await {
            Ok(0) => self.eof = true,
            Ok(n) => out.bytes(&self.buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!(error = %e, "could not read a step's output");
                self.eof = true;
            }
        }
    }

    /// Reads until end of file or `deadline`; answers whether end of file came.
    async fn drain_until(&mut self, deadline: Instant, out: &mut impl StepOutput) -> bool {
        while !self.eof {
            tokio::select! {
                _ = self.read_into(out) => {}
                _ = tokio::time::sleep_until(deadline) => return false,
            }
        }
        true
    }

    /// Reads until end of file and the group is empty, or `deadline`; answers whether both came.
    async fn settle_until(
        &mut self,
        pgid: Pid,
        deadline: Instant,
        out: &mut impl StepOutput,
    ) -> bool {
        loop {
            if self.eof && !group_exists(pgid) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            let tick = (Instant::now() + Duration::from_millis(50)).min(deadline);
            if self.eof {
                tokio::time::sleep_until(tick).await;
            } else {
                tokio::select! {
                    _ = self.read_into(out) => {}
                    _ = tokio::time::sleep_until(tick) => {}
                }
            }
        }
    }
}

/// Runs `spec` to the end, passing its output to `out`, and stops it when `stop` resolves.
///
/// `stop` resolves to how to stop the process and why; the reason comes back with the exit so the
/// caller can tell a timeout from a cancellation. An error means the process could not be started.
pub async fn run<T>(
    spec: &CommandSpec,
    timing: KillTiming,
    out: &mut impl StepOutput,
    stop: impl Future<Output = (KillMode, T)>,
) -> io::Result<(Exit, Option<T>)> {
    let (reader, writer) = io::pipe()?;
    let writer_for_stderr = writer.try_clone()?;
    let mut cmd = tokio::process::Command::new(&spec.program);
    cmd.args(&spec.args)
        .current_dir(&spec.cwd)
        .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::from(writer))
        .stderr(Stdio::from(writer_for_stderr))
        .process_group(0);
    let spawned = cmd.spawn();
    // The command holds this process's copies of the write end; drop them so that the pipe
    // reaches end of file once every process of the step has closed it.
    drop(cmd);
    let mut child = spawned?;
    let pid = child
        .id()
        .ok_or_else(|| io::Error::other("the child exited before its pid was known"))?;
    let pgid = Pid::from_raw(pid as i32);
    let mut guard = GroupGuard { pgid, armed: true };
    let mut pipe = OutputPipe {
        rx: pipe::Receiver::from_owned_fd(OwnedFd::from(reader))?,
        buf: vec![0; 64 * 1024].into_boxed_slice(),
        eof: false,
    };

    let mut stop = std::pin::pin!(stop);
    let mut stopped: Option<T> = None;
    let mut escalation: Vec<(Instant, Signal)> = Vec::new();
    let status = loop {
        let next_signal = escalation.first().map(|(at, _)| *at);
        tokio::select! {
            _ = pipe.read_into(out), if !pipe.eof => {}
            status = child.wait() => break status?,
            (mode, why) = &mut stop, if stopped.is_none() => {
                stopped = Some(why);
                match mode {
                    KillMode::Immediate => signal_group(pgid, Signal::SIGKILL),
                    KillMode::Graceful => {
                        signal_group(pgid, Signal::SIGINT);
                        let now = Instant::now();
                        escalation = vec![
                            (now + timing.interrupt_for, Signal::SIGTERM),
                            (now + timing.grace, Signal::SIGKILL),
                        ];
                    }
                }
            }
            _ = tokio::time::sleep_until(next_signal.unwrap_or_else(Instant::now)), if next_signal.is_some() => {
                let (_, sig) = escalation.remove(0);
                if sig == Signal::SIGKILL {
                    out.notice(&format!(
                        "⚠ still running {} after it was asked to stop: killing it (SIGKILL)",
                        crate::backoff::human(timing.grace)
                    ));
                }
                signal_group(pgid, sig);
            }
        }
    };

    // The main process is gone. Take what is still in the pipe, then stop whatever it left behind
    // in its group (a background `sleep &`, a daemon): nothing a step starts outlives it.
    let short = Instant::now() + Duration::from_millis(100);
    pipe.drain_until(short, out).await;
    if !pipe.eof || group_exists(pgid) {
        if stopped.is_none() {
            out.notice(
                "⚠ the step's main process exited but left processes running; stopping them",
            );
        }
        signal_group(pgid, Signal::SIGTERM);
        let term_wait = Instant::now() + timing.grace.min(Duration::from_secs(2));
        if !pipe.settle_until(pgid, term_wait, out).await {
            signal_group(pgid, Signal::SIGKILL);
            let kill_wait = Instant::now() + Duration::from_secs(2);
            if !pipe.drain_until(kill_wait, out).await {
                out.notice(
                    "⚠ a process outside the step's process group still holds its output open; no longer reading it",
                );
            }
        }
    }
    guard.armed = false;
    Ok((Exit::from_status(status, pgid.as_raw()), stopped))
}

/// Processes in group `pgid` that are still alive (not zombies), found by scanning `/proc`.
pub fn live_group_members(pgid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // `pid (comm) state ppid pgrp …`; comm may hold spaces and parentheses.
            let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
                return false;
            };
            let mut fields = after.split_whitespace();
            let state = fields.next();
            let pgrp = fields.nth(1).and_then(|f| f.parse::<i32>().ok());
            pgrp == Some(pgid) && !matches!(state, Some("Z") | Some("X"))
        })
        .collect()
}
