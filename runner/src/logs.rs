//! The job log: one ordered byte stream per job, masked, spooled to disk while the server lags,
//! and uploaded in batches.
//!
//! The executor writes through a [`LogWriter`], which never blocks on the network. Every byte goes
//! through the job's [`Masker`] first, so no secret reaches memory buffers, the spool or the
//! server. What the server has not acknowledged yet is kept in a small in-memory window and,
//! beyond that, in a bounded on-disk [`Spool`]. A background task ([`LogUploader`]) sends it with
//! `append_log(offset, bytes)` in batches of at most [`LogConfig::batch_bytes`], at most once per
//! [`LogConfig::batch_interval`] unless a full batch is waiting.
//!
//! The server's acknowledged offset is the source of truth: a `416` resynchronises to the offset the
//! server reports, transient errors are retried with backoff while the spool keeps filling, and a
//! `409` means the lease is lost. Offsets (step reports, [`LogWriter::offset`]) count bytes after
//! masking.
//!
//! When the spool is full, new output is dropped (never old: the server's log stays one contiguous
//! stream) and counted; once the spool has drained to half its size a line says how much was
//! dropped and the newest output flows again.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use outpost_protocol::ClientError;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::backoff::{Backoff, error_chain, lease_is_gone};
use crate::mask::{self, Masker};
use crate::spool::{ReadPlan, Spool};

/// How long a spool that could not be written is left alone before it is tried again.
const SPOOL_RETRY: Duration = Duration::from_secs(10);

/// How the log is batched, and where and how much of it may wait for the server.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Largest body of one `append_log` call.
    pub batch_bytes: usize,
    /// Smallest time between two `append_log` calls, unless a full batch is waiting; also the
    /// longest time masking holds back the possible beginning of a secret.
    pub batch_interval: Duration,
    /// Directory of the on-disk spool (one file per job, removed when the job ends); `None` keeps
    /// unacknowledged bytes in memory only, up to [`LogConfig::memory_max`].
    pub spool_dir: Option<PathBuf>,
    /// Most unacknowledged bytes held (spool and memory together); beyond that, new output is
    /// dropped and a line in the log says how much.
    pub spool_max_bytes: u64,
    /// Unacknowledged bytes kept in memory before they go to the spool.
    pub memory_window: usize,
    /// Most unacknowledged bytes kept in memory when there is no spool or it cannot be written.
    pub memory_max: usize,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            batch_bytes: 64 * 1024,
            batch_interval: Duration::from_millis(200),
            spool_dir: None,
            spool_max_bytes: 256 * 1024 * 1024,
            memory_window: 256 * 1024,
            memory_max: 16 * 1024 * 1024,
        }
    }
}

/// Where log batches go: the server in production, a recorder in tests.
pub trait LogSink: Send + Sync + 'static {
    /// Appends `data` at `offset` and answers the offset up to which the log is now stored.
    fn append(
        &self,
        offset: u64,
        data: Bytes,
    ) -> impl Future<Output = Result<u64, ClientError>> + Send;
}

/// Why the log could not be delivered in full.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The server answered `409`: another runner holds the job now.
    #[error("the lease on the job was lost while uploading its log")]
    LeaseLost,
    /// The server did not take the rest of the log in time.
    #[error("{unsent} bytes of log could not be uploaded in time")]
    TimedOut {
        /// Bytes the server never acknowledged.
        unsent: u64,
    },
}

/// What a log needs besides its sink and configuration.
#[derive(Debug, Default)]
pub struct LogSetup {
    /// Bytes of the log the server already holds.
    pub offset: u64,
    /// Masks secrets before anything is buffered.
    pub masker: Masker,
    /// File name of the spool in [`LogConfig::spool_dir`] (default: a fresh unique name).
    pub spool_name: Option<String>,
}

/// Where a log's bytes are, for diagnostics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogStats {
    /// Bytes produced (after masking): the offset of the next byte.
    pub produced: u64,
    /// Bytes the server has acknowledged.
    pub acknowledged: u64,
    /// Unacknowledged bytes in memory.
    pub in_memory: u64,
    /// Unacknowledged bytes in the spool file.
    pub spooled: u64,
    /// Bytes dropped and not yet reported in the log.
    pub dropped: u64,
    /// Bytes the masker holds back.
    pub held: u64,
}

/// Why output is being dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dropping {
    /// The spool is full.
    SpoolFull,
    /// There is no usable spool and the in-memory limit is reached.
    MemoryFull,
}

/// Log bytes `[start, end)` the server lost after acknowledging them, which this runner no longer
/// holds: they are resent as a filler of exactly that length so that later offsets still line up.
#[derive(Debug, Clone, Copy)]
struct Lost {
    start: u64,
    end: u64,
}

impl Lost {
    fn filler(&self, from: u64, len: usize) -> Bytes {
        filler(
            b"\n[outpost: this part of the log was lost by the server]",
            self.end - self.start,
            from - self.start,
            len,
        )
    }
}

/// `len` bytes from `at` of a filler `total` bytes long: `note`, then spaces, ending in a newline.
fn filler(note: &[u8], total: u64, at: u64, len: usize) -> Bytes {
    (at..at + len as u64)
        .map(|i| {
            if i + 1 == total {
                b'\n'
            } else if (i as usize) < note.len() {
                note[i as usize]
            } else {
                b' '
            }
        })
        .collect::<Vec<u8>>()
        .into()
}

/// One batch to send.
enum Batch {
    /// Bytes at hand.
    Ready(u64, Bytes),
    /// Bytes to read from the spool first.
    Spooled(u64, ReadPlan),
}

struct State {
    /// Offset the server has acknowledged: the first unsent byte.
    acked: u64,
    /// Acknowledged bytes the server lost, resent as a filler before anything else.
    lost: Option<Lost>,
    /// Unsent bytes after `lost`, on disk.
    spool: Spool,
    /// When a spool that failed may be tried again.
    spool_retry_at: Option<Instant>,
    /// Whether the job's log already says that the spool failed.
    spool_failure_reported: bool,
    /// Unsent bytes after the spool's, in memory; the first of them is at `mem_start`.
    mem: BytesMut,
    mem_start: u64,
    memory_window: usize,
    memory_max: usize,
    masker: Masker,
    /// Since when the masker holds back its oldest held byte.
    held_since: Option<Instant>,
    /// Bytes refused, not yet reported in the log.
    dropped: u64,
    /// Set while output is being dropped.
    dropping: Option<Dropping>,
    /// Whether the last byte produced was a newline (or nothing was produced yet).
    at_line_start: bool,
    /// No more writes are accepted; the uploader sends what is left without waiting.
    closed: bool,
    /// Reused buffer for the masker's output.
    scratch: Vec<u8>,
}

impl State {
    fn produced(&self) -> u64 {
        self.mem_start + self.mem.len() as u64
    }

    fn unsent(&self) -> u64 {
        self.produced() - self.acked
    }

    /// Unsent bytes this runner stores (the filler of lost bytes is made up on the fly).
    fn stored(&self) -> u64 {
        self.spool.len() + self.mem.len() as u64
    }

    fn spool_usable(&self, now: Instant) -> bool {
        self.spool.is_enabled() && self.spool_retry_at.is_none_or(|t| now >= t)
    }

    /// Most bytes that may be stored now.
    fn limit(&self, now: Instant) -> u64 {
        let cap = self.spool.capacity();
        if self.spool_usable(now) {
            cap
        } else {
            cap.min(self.spool.len() + self.memory_max as u64)
        }
    }

    fn stats(&self) -> LogStats {
        LogStats {
            produced: self.produced(),
            acknowledged: self.acked,
            in_memory: self.mem.len() as u64,
            spooled: self.spool.len(),
            dropped: self.dropped,
            held: self.masker.held() as u64,
        }
    }

    /// Masks `data` and stores what the masker releases; with `flush`, releases everything.
    fn write(&mut self, data: &[u8], flush: bool, now: Instant) {
        if !self.masker.is_active() {
            self.accept(data, now);
            return;
        }
        let before = self.masker.held_range().end;
        let mut out = std::mem::take(&mut self.scratch);
        out.clear();
        self.masker.push(data, &mut out);
        if flush {
            self.masker.flush(&mut out);
        }
        self.accept(&out, now);
        if out.capacity() <= 1024 * 1024 {
            self.scratch = out;
        }
        let held = self.masker.held_range();
        if held.is_empty() {
            self.held_since = None;
        } else if held.start >= before || self.held_since.is_none() {
            // Everything held back came with this write.
            self.held_since = Some(now);
        }
    }

    /// Releases what the masker holds back.
    fn release_held(&mut self, now: Instant) {
        if self.masker.held() > 0 {
            self.write(&[], true, now);
        }
        self.held_since = None;
    }

    /// Releases what the masker has held back for a whole batch interval.
    fn release_overdue(&mut self, now: Instant, interval: Duration) {
        if self.held_since.is_some_and(|t| now >= t + interval) {
            self.release_held(now);
        }
    }

    /// Stores masked output, or drops and counts what does not fit.
    fn accept(&mut self, data: &[u8], now: Instant) {
        if data.is_empty() {
            return;
        }
        let limit = self.limit(now);
        if self.dropping.is_some() {
            // Resume only once there is room for a good stretch, not for every batch that leaves.
            if self.stored() > limit / 2 {
                self.dropped += data.len() as u64;
                return;
            }
            self.push_drop_note();
        }
        let room = limit.saturating_sub(self.stored());
        let take = room.min(data.len() as u64) as usize;
        if take > 0 {
            self.append(&data[..take], now);
        }
        if take < data.len() {
            self.dropped += (data.len() - take) as u64;
            if self.dropping.is_none() {
                self.dropping = Some(if self.spool_usable(now) {
                    Dropping::SpoolFull
                } else {
                    Dropping::MemoryFull
                });
                tracing::warn!(
                    limit,
                    "the job's log cannot be uploaded fast enough and its buffer is full; dropping new output until it drains"
                );
            }
        }
    }

    /// Writes the line that says how much output was dropped, if any was.
    fn push_drop_note(&mut self) {
        let why = self.dropping.take();
        if self.dropped == 0 {
            return;
        }
        let why = match why {
            Some(Dropping::MemoryFull) if self.spool.is_enabled() => {
                "the spool on disk could not be written and the in-memory buffer was full"
            }
            Some(Dropping::MemoryFull) => "the in-memory buffer was full",
            _ => "spool full",
        };
        let note = format!(
            "{}[outpost] {} bytes of output were dropped while the server was unreachable ({why})\n",
            if self.at_line_start { "" } else { "\n" },
            self.dropped,
        );
        self.dropped = 0;
        self.append(note.as_bytes(), Instant::now());
    }

    /// Appends masked bytes, moving the in-memory window to the spool when it is full.
    fn append(&mut self, data: &[u8], now: Instant) {
        let Some(&last) = data.last() else {
            return;
        };
        self.mem.extend_from_slice(data);
        self.at_line_start = last == b'\n';
        if self.mem.len() > self.memory_window && self.spool_usable(now) {
            self.spill(now);
        }
    }

    fn spill(&mut self, now: Instant) {
        match self.spool.append(self.mem_start, &self.mem) {
            Ok(()) => {
                self.mem_start += self.mem.len() as u64;
                self.mem.clear();
                if self.spool_retry_at.take().is_some() {
                    tracing::info!("the log spool can be written again");
                }
            }
            Err(e) => {
                self.spool_retry_at = Some(now + SPOOL_RETRY);
                let path = self
                    .spool
                    .path()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                tracing::error!(
                    path,
                    error = %e,
                    "could not write the job's log spool; keeping at most {} bytes of its output in memory until the server catches up",
                    self.memory_max
                );
                if !self.spool_failure_reported {
                    self.spool_failure_reported = true;
                    let line = format!(
                        "{}[outpost] the runner could not write the log spool ({e}); until the server catches up, at most {} bytes of output are kept in memory\n",
                        if self.at_line_start { "" } else { "\n" },
                        self.memory_max
                    );
                    self.mem.extend_from_slice(line.as_bytes());
                    self.at_line_start = true;
                }
            }
        }
    }

    /// The next batch from the acknowledged offset, if anything is unsent.
    fn next_batch(&self, max: usize) -> Option<Batch> {
        let at = self.acked;
        if let Some(lost) = self.lost
            && at < lost.end
        {
            let n = (lost.end - at).min(max as u64) as usize;
            return Some(Batch::Ready(at, lost.filler(at, n)));
        }
        if !self.spool.is_empty() {
            debug_assert_eq!(at, self.spool.start());
            return self
                .spool
                .read_plan(at, max)
                .map(|plan| Batch::Spooled(at, plan));
        }
        if !self.mem.is_empty() {
            let skip = at.saturating_sub(self.mem_start) as usize;
            let n = (self.mem.len() - skip).min(max);
            return Some(Batch::Ready(
                at,
                Bytes::copy_from_slice(&self.mem[skip..skip + n]),
            ));
        }
        None
    }

    /// Forgets everything before `next`, which the server now holds.
    fn consume_to(&mut self, next: u64) {
        self.acked = next;
        if self.lost.is_some_and(|l| next >= l.end) {
            self.lost = None;
        }
        self.spool.consume_to(next);
        if next > self.mem_start {
            let n = ((next - self.mem_start) as usize).min(self.mem.len());
            self.mem.advance(n);
            self.mem_start += n as u64;
        }
    }

    /// Moves the acknowledged offset to `next`, which the server reported.
    fn resync(&mut self, next: u64) {
        let produced = self.produced();
        if next >= self.acked && next <= produced {
            self.consume_to(next);
        } else if next > produced {
            // The server holds more than this runner wrote: nothing of ours is missing there.
            tracing::warn!(
                server_offset = next,
                produced,
                "the server's log is longer than the runner's; skipping ahead"
            );
            self.lost = None;
            self.spool.reset(next);
            self.mem.clear();
            self.mem_start = next;
            self.acked = next;
        } else {
            // The server lost bytes it had acknowledged and this runner no longer holds them.
            tracing::warn!(
                server_offset = next,
                acked = self.acked,
                "the server lost acknowledged log bytes; filling the gap"
            );
            let end = self.lost.map_or(self.acked, |l| l.end.max(self.acked));
            self.lost = Some(Lost { start: next, end });
            self.acked = next;
        }
    }
}

struct Shared {
    state: Mutex<State>,
    wake: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves the state consistent enough to go on (the worst
        // is a batch sent twice, which the server's offsets absorb), so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Appends to a job's log; cheap to clone, never blocks on the network.
#[derive(Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
}

impl LogWriter {
    /// Appends raw output bytes (a child's stdout and stderr), masking secrets.
    ///
    /// When the spool is full the bytes that do not fit are dropped and counted; a line saying how
    /// many is written once it has drained.
    pub fn write(&self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let mut s = self.shared.lock();
        if s.closed {
            return;
        }
        s.write(data, false, Instant::now());
        drop(s);
        self.shared.wake.notify_one();
    }

    /// Writes a line of the runner's own, starting a new line first if output left one open.
    /// Whatever the masker held back is released first, and the line is masked too.
    pub fn line(&self, text: &str) {
        let mut s = self.shared.lock();
        if s.closed {
            return;
        }
        let now = Instant::now();
        s.release_held(now);
        let mut line = String::with_capacity(text.len() + 2);
        if !s.at_line_start {
            line.push('\n');
        }
        line.push_str(text);
        if !text.ends_with('\n') {
            line.push('\n');
        }
        s.write(line.as_bytes(), true, now);
        drop(s);
        self.shared.wake.notify_one();
    }

    /// Masks `value` (a secret learnt during the job, such as a checkout credential) from now on,
    /// with the same forms as the job's secrets (lines, base64).
    pub fn add_secret(&self, name: &str, value: &str) {
        let (patterns, too_short) = mask::patterns([(name, value)]);
        warn_too_short(&too_short);
        let mut s = self.shared.lock();
        if let Err(e) = s.masker.add(patterns) {
            tracing::error!("{e}; withholding the rest of the job's output");
            let now = Instant::now();
            s.release_held(now);
            s.masker = Masker::withhold_all();
        }
    }

    /// Bytes of log produced so far, after masking: the offset the next byte will have. Bytes the
    /// masker still holds back (at most the length of the longest secret, and never after a
    /// [`LogWriter::line`]) are not counted yet.
    pub fn offset(&self) -> u64 {
        self.shared.lock().produced()
    }

    /// Where the log's bytes are.
    pub fn stats(&self) -> LogStats {
        self.shared.lock().stats()
    }
}

fn warn_too_short(names: &[String]) {
    if !names.is_empty() {
        tracing::warn!(
            secrets = ?names,
            "some secret values are shorter than {} bytes and are not masked in the job's log (masking them would destroy it)",
            mask::MIN_SECRET_LEN
        );
    }
}

/// The background task that uploads a job's log; dropping it stops the task and removes the
/// spool.
pub struct LogUploader {
    shared: Arc<Shared>,
    task: Option<JoinHandle<Result<(), LogError>>>,
}

impl Drop for LogUploader {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        let mut s = self.shared.lock();
        s.closed = true;
        s.spool.remove();
    }
}

/// Starts uploading to `sink`; a `409` cancels `lease_lost`.
pub fn start<S: LogSink>(
    sink: S,
    config: LogConfig,
    lease_lost: CancellationToken,
) -> (LogWriter, LogUploader) {
    start_with(sink, config, lease_lost, LogSetup::default())
}

/// Like [`start`], for a log the server already holds `offset` bytes of.
pub fn start_at<S: LogSink>(
    sink: S,
    config: LogConfig,
    lease_lost: CancellationToken,
    offset: u64,
) -> (LogWriter, LogUploader) {
    start_with(
        sink,
        config,
        lease_lost,
        LogSetup {
            offset,
            ..LogSetup::default()
        },
    )
}

/// A job's log: masks `secrets` (name → value), spools to `<spool_dir>/<job id>.spool`.
///
/// Values too short to mask are named once in the runner's own log, never in the job's.
pub fn start_for_job<S: LogSink>(
    sink: S,
    config: LogConfig,
    lease_lost: CancellationToken,
    job_id: uuid::Uuid,
    secrets: &BTreeMap<String, String>,
) -> (LogWriter, LogUploader) {
    let (patterns, too_short) =
        mask::patterns(secrets.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    warn_too_short(&too_short);
    let masker = Masker::new(patterns).unwrap_or_else(|e| {
        tracing::error!("{e}; withholding the job's output");
        Masker::withhold_all()
    });
    start_with(
        sink,
        config,
        lease_lost,
        LogSetup {
            offset: 0,
            masker,
            spool_name: Some(format!("{job_id}.spool")),
        },
    )
}

/// Starts uploading to `sink` with everything spelt out.
pub fn start_with<S: LogSink>(
    sink: S,
    config: LogConfig,
    lease_lost: CancellationToken,
    setup: LogSetup,
) -> (LogWriter, LogUploader) {
    let spool_path = config.spool_dir.as_ref().map(|dir| {
        dir.join(
            setup
                .spool_name
                .unwrap_or_else(|| format!("{}.spool", uuid::Uuid::now_v7())),
        )
    });
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            acked: setup.offset,
            lost: None,
            spool: Spool::new(spool_path, config.spool_max_bytes),
            spool_retry_at: None,
            spool_failure_reported: false,
            mem: BytesMut::new(),
            mem_start: setup.offset,
            memory_window: config.memory_window,
            memory_max: config.memory_max.max(1),
            masker: setup.masker,
            held_since: None,
            dropped: 0,
            dropping: None,
            at_line_start: true,
            closed: false,
            scratch: Vec::new(),
        }),
        wake: Notify::new(),
    });
    let task = tokio::spawn(upload(shared.clone(), sink, config, lease_lost).in_current_span());
    (
        LogWriter {
            shared: shared.clone(),
        },
        LogUploader {
            shared,
            task: Some(task),
        },
    )
}

impl LogUploader {
    /// Stops accepting writes and waits up to `within` for the server to acknowledge everything.
    ///
    /// What the masker held back is released first (a secret at the very end is masked), and a
    /// line says how much output was dropped, if any was. The spool is removed either way.
    pub async fn finish(mut self, within: Duration) -> Result<(), LogError> {
        {
            let mut s = self.shared.lock();
            s.release_held(Instant::now());
            s.push_drop_note();
            s.closed = true;
        }
        self.shared.wake.notify_one();
        let Some(mut task) = self.task.take() else {
            return Ok(());
        };
        match tokio::time::timeout(within, &mut task).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => {
                tracing::error!(error = %join, "the log uploader stopped unexpectedly");
                Err(LogError::TimedOut {
                    unsent: self.shared.lock().unsent(),
                })
            }
            Err(_) => {
                task.abort();
                Err(LogError::TimedOut {
                    unsent: self.shared.lock().unsent(),
                })
            }
        }
        // Dropping `self` removes the spool.
    }

    /// Stops at once, discarding what was not uploaded (the lease is lost).
    pub fn abort(self) {
        // Dropping `self` stops the task and removes the spool.
    }
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn upload<S: LogSink>(
    shared: Arc<Shared>,
    sink: S,
    config: LogConfig,
    lease_lost: CancellationToken,
) -> Result<(), LogError> {
    let batch_bytes = config.batch_bytes.max(1);
    let interval = config.batch_interval;
    let mut backoff = Backoff::new();
    let mut last_send: Option<Instant> = None;
    loop {
        // Wait for something to send; what the masker held back goes once it waited an interval.
        loop {
            let release_at = {
                let mut s = shared.lock();
                s.release_overdue(Instant::now(), interval);
                if s.unsent() > 0 {
                    break;
                }
                if s.closed {
                    return Ok(());
                }
                s.held_since.map(|t| t + interval)
            };
            tokio::select! {
                _ = shared.wake.notified() => {}
                _ = sleep_until_some(release_at) => {}
                _ = lease_lost.cancelled() => return Err(LogError::LeaseLost),
            }
        }
        // Let a batch gather until it is full, the interval has passed, or the log is closing.
        if let Some(last) = last_send {
            let due = last + interval;
            loop {
                {
                    let s = shared.lock();
                    if s.unsent() >= batch_bytes as u64 || s.closed {
                        break;
                    }
                }
                if Instant::now() >= due {
                    break;
                }
                tokio::select! {
                    _ = shared.wake.notified() => {}
                    _ = tokio::time::sleep_until(due) => {}
                    _ = lease_lost.cancelled() => return Err(LogError::LeaseLost),
                }
            }
        }
        let batch = {
            let mut s = shared.lock();
            s.release_overdue(Instant::now(), interval);
            s.next_batch(batch_bytes)
        };
        let (offset, batch) = match batch {
            None => continue,
            Some(Batch::Ready(offset, bytes)) => (offset, bytes),
            Some(Batch::Spooled(offset, plan)) => {
                let len = plan.len();
                let read = tokio::task::spawn_blocking(move || plan.read()).await;
                match read {
                    Ok(Ok(bytes)) => (offset, Bytes::from(bytes)),
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "could not read the job's log spool back; {len} bytes of the log are lost");
                        (offset, unreadable(len))
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "could not read the job's log spool back; {len} bytes of the log are lost");
                        (offset, unreadable(len))
                    }
                }
            }
        };
        let sent_up_to = offset + batch.len() as u64;
        last_send = Some(Instant::now());
        let result = tokio::select! {
            r = sink.append(offset, batch) => r,
            _ = lease_lost.cancelled() => return Err(LogError::LeaseLost),
        };
        match result {
            Ok(next) => {
                if next != sent_up_to {
                    tracing::debug!(
                        offset,
                        sent_up_to,
                        next,
                        "the server acknowledged a different log offset"
                    );
                }
                shared.lock().resync(next);
                backoff.reset();
            }
            Err(e) if lease_is_gone(&e) => {
                tracing::warn!(
                    "the server says the lease on the job is gone ({}) while uploading its log",
                    error_chain(&e)
                );
                lease_lost.cancel();
                return Err(LogError::LeaseLost);
            }
            Err(ClientError::Api {
                status,
                next_offset: Some(next),
                ..
            }) if status.as_u16() == 416 => {
                tracing::info!(
                    offset,
                    next,
                    "the server's log ends elsewhere (416); resending from there"
                );
                shared.lock().resync(next);
            }
            Err(e) => {
                let delay = backoff.next_delay();
                if e.is_transient() {
                    tracing::warn!(
                        "could not upload the log ({}); retrying in {}",
                        error_chain(&e),
                        crate::backoff::human(delay)
                    );
                } else {
                    tracing::error!(
                        "the server refused a log upload ({}); retrying in {}",
                        error_chain(&e),
                        crate::backoff::human(delay)
                    );
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = lease_lost.cancelled() => return Err(LogError::LeaseLost),
                }
            }
        }
    }
}

/// A stand-in of `len` bytes for a stretch of the spool that could not be read back.
fn unreadable(len: usize) -> Bytes {
    filler(
        b"\n[outpost: this part of the log could not be read back from the runner's spool]",
        len as u64,
        0,
        len,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    fn api_error(code: u16, next_offset: Option<u64>) -> ClientError {
        ClientError::Api {
            status: reqwest::StatusCode::from_u16(code).unwrap(),
            code: "test".into(),
            message: "test".into(),
            next_offset,
        }
    }

    /// A server log in memory that behaves like the protocol says.
    #[derive(Clone, Default)]
    struct FakeServer {
        log: Arc<Mutex<Vec<u8>>>,
        batches: Arc<Mutex<Vec<usize>>>,
        /// Fail this many calls with a 503 before accepting.
        fail_first: Arc<AtomicUsize>,
        /// Store only the first half of each batch (a server that acknowledges less than sent).
        half: Arc<AtomicBool>,
    }

    impl FakeServer {
        fn unreachable(&self, yes: bool) {
            self.fail_first
                .store(if yes { usize::MAX } else { 0 }, Ordering::SeqCst);
        }

        fn text(&self) -> String {
            String::from_utf8_lossy(&self.log.lock().unwrap()).into_owned()
        }
    }

    impl LogSink for FakeServer {
        async fn append(&self, offset: u64, data: Bytes) -> Result<u64, ClientError> {
            if self
                .fail_first
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(api_error(503, None));
            }
            let mut log = self.log.lock().unwrap();
            let len = log.len() as u64;
            if offset > len {
                return Err(api_error(416, Some(len)));
            }
            self.batches.lock().unwrap().push(data.len());
            let take = if self.half.load(Ordering::SeqCst) {
                data.len().div_ceil(2)
            } else {
                data.len()
            };
            let skip = (len - offset) as usize;
            if skip < take {
                log.extend_from_slice(&data[skip..take]);
            }
            Ok(log.len() as u64)
        }
    }

    fn fast() -> LogConfig {
        LogConfig {
            batch_interval: Duration::from_millis(20),
            ..LogConfig::default()
        }
    }

    fn masked(secrets: &[&str]) -> LogSetup {
        let (p, _) = mask::patterns(secrets.iter().map(|s| ("S", *s)));
        LogSetup {
            masker: Masker::new(p).unwrap(),
            ..LogSetup::default()
        }
    }

    async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + within;
        while !check() {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    fn sha256(data: &[u8]) -> String {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(data))
    }

    /// Lines of varied text, `n` bytes in all, that contain no secret.
    fn text(n: usize, tag: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 100);
        let mut i = 0u64;
        while out.len() < n {
            let x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            out.extend_from_slice(
                format!(
                    "{tag} line {i} {x:016x} {}\n",
                    "=".repeat((x % 97) as usize)
                )
                .as_bytes(),
            );
            i += 1;
        }
        out.truncate(n);
        out
    }

    #[tokio::test]
    async fn a_long_line_is_split_into_batches_of_at_most_64_kib() {
        let server = FakeServer::default();
        let (writer, uploader) = start(server.clone(), fast(), CancellationToken::new());
        let big = vec![b'x'; 1024 * 1024];
        writer.write(&big);
        uploader.finish(Duration::from_secs(30)).await.unwrap();
        let log = server.log.lock().unwrap();
        assert_eq!(log.len(), big.len());
        let batches = server.batches.lock().unwrap();
        assert!(batches.len() >= 16, "batches: {batches:?}");
        assert!(batches.iter().all(|&n| n <= 64 * 1024), "{batches:?}");
    }

    #[tokio::test]
    async fn transient_errors_are_retried_and_nothing_is_lost_or_doubled() {
        let server = FakeServer::default();
        server.fail_first.store(2, Ordering::SeqCst);
        let (writer, uploader) = start(server.clone(), fast(), CancellationToken::new());
        for i in 0..100 {
            writer.write(format!("line {i}\n").as_bytes());
        }
        uploader.finish(Duration::from_secs(30)).await.unwrap();
        let expected: String = (0..100).map(|i| format!("line {i}\n")).collect();
        assert_eq!(server.text(), expected);
    }

    #[tokio::test]
    async fn a_416_resynchronises_to_the_servers_offset() {
        // The server already holds 5 bytes this runner thinks it still has to send.
        let server = FakeServer::default();
        server.log.lock().unwrap().extend_from_slice(b"hello");
        let (writer, uploader) = start(server.clone(), fast(), CancellationToken::new());
        writer.write(b"hello world\n");
        uploader.finish(Duration::from_secs(30)).await.unwrap();
        assert_eq!(&*server.log.lock().unwrap(), b"hello world\n");

        // A runner that believes it is further than the server resends from the server's end.
        let server = FakeServer::default();
        server.log.lock().unwrap().extend_from_slice(b"abc");
        let (writer, uploader) = start_at(server.clone(), fast(), CancellationToken::new(), 3);
        writer.write(b"def");
        uploader.finish(Duration::from_secs(30)).await.unwrap();
        assert_eq!(&*server.log.lock().unwrap(), b"abcdef");
    }

    #[tokio::test]
    async fn a_409_cancels_the_lease_token() {
        #[derive(Clone)]
        struct Gone;
        impl LogSink for Gone {
            async fn append(&self, _: u64, _: Bytes) -> Result<u64, ClientError> {
                Err(api_error(409, None))
            }
        }
        let lost = CancellationToken::new();
        let (writer, uploader) = start(Gone, fast(), lost.clone());
        writer.write(b"x");
        assert!(matches!(
            uploader.finish(Duration::from_secs(30)).await,
            Err(LogError::LeaseLost)
        ));
        assert!(lost.is_cancelled());
    }

    #[tokio::test]
    async fn a_full_memory_buffer_drops_output_and_says_so() {
        let server = FakeServer::default();
        // Keep the server failing so that nothing is acknowledged while writing.
        server.unreachable(true);
        let config = LogConfig {
            memory_max: 1000,
            ..fast()
        };
        let (writer, uploader) = start(server.clone(), config, CancellationToken::new());
        writer.write(&[b'a'; 600]);
        writer.write(&[b'b'; 600]);
        assert_eq!(writer.offset(), 1000);
        server.unreachable(false);
        uploader.finish(Duration::from_secs(60)).await.unwrap();
        let log = server.text();
        assert!(log.starts_with(&"a".repeat(600)));
        assert!(
            log.contains(
                "[outpost] 200 bytes of output were dropped while the server was unreachable (the in-memory buffer was full)"
            ),
            "{log}"
        );
    }

    #[tokio::test]
    async fn line_starts_on_a_new_line() {
        let server = FakeServer::default();
        let (writer, uploader) = start(server.clone(), fast(), CancellationToken::new());
        writer.write(b"no newline");
        writer.line("runner says");
        writer.line("again\n");
        uploader.finish(Duration::from_secs(30)).await.unwrap();
        assert_eq!(
            &*server.log.lock().unwrap(),
            b"no newline\nrunner says\nagain\n"
        );
    }

    #[tokio::test]
    async fn secrets_are_masked_and_offsets_count_masked_bytes() {
        let server = FakeServer::default();
        let setup = masked(&["hunter2-pass", "line-one\nline-two"]);
        let (writer, uploader) =
            start_with(server.clone(), fast(), CancellationToken::new(), setup);
        writer.write(b"pw=hunter2-");
        writer.write(b"pass\n");
        assert_eq!(writer.offset(), b"pw=***\n".len() as u64);
        writer.write(b"key:\nline-one\n");
        writer.write(b"line-two\n");
        writer.line("$ kubectl --token hunter2-pass");
        // A secret as the very last output is masked when the log is finished.
        writer.write(b"end hunter2-pa");
        writer.write(b"ss");
        uploader.finish(Duration::from_secs(30)).await.unwrap();
        assert_eq!(
            server.text(),
            "pw=***\nkey:\n***\n$ kubectl --token ***\nend ***"
        );
    }

    #[tokio::test]
    async fn a_held_back_prefix_goes_out_within_the_batch_interval() {
        let server = FakeServer::default();
        let config = LogConfig {
            batch_interval: Duration::from_millis(200),
            ..LogConfig::default()
        };
        let (writer, uploader) = start_with(
            server.clone(),
            config,
            CancellationToken::new(),
            masked(&["secret-value"]),
        );
        writer.write(b"progress: secret-");
        // Not the whole secret, and no more output: it must still show up, once the interval
        // has passed, without waiting for the job to end.
        assert!(
            eventually(Duration::from_secs(10), || server.text()
                == "progress: secret-")
            .await,
            "{:?}",
            server.text()
        );
        // Its end, when it comes after the release, is still masked.
        writer.write(b"value!\n");
        uploader.finish(Duration::from_secs(30)).await.unwrap();
        assert_eq!(server.text(), "progress: secret-***!\n");
    }

    #[tokio::test]
    async fn a_2_mib_line_with_a_secret_goes_through_masked() {
        let server = FakeServer::default();
        let (writer, uploader) = start_with(
            server.clone(),
            fast(),
            CancellationToken::new(),
            masked(&["middle-secret"]),
        );
        let mut line = vec![b'x'; 1024 * 1024];
        line.extend_from_slice(b"middle-secret");
        line.extend_from_slice(&[b'y'; 1024 * 1024]);
        for chunk in line.chunks(64 * 1024) {
            writer.write(chunk);
        }
        uploader.finish(Duration::from_secs(60)).await.unwrap();
        let log = server.log.lock().unwrap();
        assert_eq!(log.len(), 2 * 1024 * 1024 + 3);
        assert_eq!(&log[1024 * 1024..1024 * 1024 + 3], b"***");
    }

    #[tokio::test]
    async fn an_unreachable_server_spools_to_disk_and_resumes_from_its_offset() {
        let tmp = tempfile::tempdir().unwrap();
        let server = FakeServer::default();
        server.unreachable(true);
        let config = LogConfig {
            spool_dir: Some(tmp.path().join("spool")),
            ..fast()
        };
        let window = config.memory_window as u64;
        let (writer, uploader) = start_with(
            server.clone(),
            config,
            CancellationToken::new(),
            LogSetup {
                spool_name: Some("job.spool".into()),
                ..LogSetup::default()
            },
        );
        let spool_file = tmp.path().join("spool/job.spool");
        let data = text(40 * 1024 * 1024, "out");
        for chunk in data.chunks(64 * 1024) {
            writer.write(chunk);
            let stats = writer.stats();
            assert!(stats.in_memory <= window + 64 * 1024, "{stats:?}");
        }
        let stats = writer.stats();
        assert_eq!(stats.produced, data.len() as u64);
        assert_eq!(stats.acknowledged, 0);
        assert!(stats.spooled > 39 * 1024 * 1024, "{stats:?}");
        assert!(std::fs::metadata(&spool_file).unwrap().len() >= stats.spooled);

        // Reachable again, but taking only half of each batch: the runner resends from the
        // offset the server acknowledged.
        server.half.store(true, Ordering::SeqCst);
        server.unreachable(false);
        assert!(
            eventually(Duration::from_secs(120), || writer.stats().acknowledged
                > 8 * 1024 * 1024)
            .await
        );
        server.half.store(false, Ordering::SeqCst);
        uploader.finish(Duration::from_secs(120)).await.unwrap();
        let log = server.log.lock().unwrap();
        assert_eq!(log.len(), data.len());
        assert_eq!(sha256(&log), sha256(&data));
        assert!(!spool_file.exists(), "the spool was not removed");
    }

    #[tokio::test]
    async fn a_full_spool_drops_the_newest_output_and_says_so() {
        let tmp = tempfile::tempdir().unwrap();
        let server = FakeServer::default();
        server.unreachable(true);
        let config = LogConfig {
            spool_dir: Some(tmp.path().to_path_buf()),
            spool_max_bytes: 1024 * 1024,
            memory_window: 16 * 1024,
            ..fast()
        };
        let (writer, uploader) = start(server.clone(), config, CancellationToken::new());
        let before = text(3 * 1024 * 1024, "old");
        for chunk in before.chunks(4096) {
            writer.write(chunk);
        }
        let stats = writer.stats();
        assert_eq!(stats.produced, 1024 * 1024);
        assert_eq!(stats.dropped, 2 * 1024 * 1024);
        server.unreachable(false);
        assert!(eventually(Duration::from_secs(60), || writer.stats().spooled == 0).await);
        let after = text(100 * 1024, "new");
        writer.write(&after);
        uploader.finish(Duration::from_secs(60)).await.unwrap();
        let log = server.log.lock().unwrap().clone();
        let kept = &before[..1024 * 1024];
        let note = format!(
            "{}[outpost] {} bytes of output were dropped while the server was unreachable (spool full)\n",
            if kept.ends_with(b"\n") { "" } else { "\n" },
            2 * 1024 * 1024
        );
        let mut expected = kept.to_vec();
        expected.extend_from_slice(note.as_bytes());
        expected.extend_from_slice(&after);
        assert_eq!(log.len(), expected.len());
        assert!(
            log == expected,
            "the delivered log is not the expected stream"
        );
    }

    #[tokio::test]
    async fn a_full_disk_keeps_the_job_running_and_says_so() {
        let tmp = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/dev/full", tmp.path().join("job.spool")).unwrap();
        let server = FakeServer::default();
        server.unreachable(true);
        let config = LogConfig {
            spool_dir: Some(tmp.path().to_path_buf()),
            memory_window: 16 * 1024,
            ..fast()
        };
        let (writer, uploader) = start_with(
            server.clone(),
            config,
            CancellationToken::new(),
            LogSetup {
                spool_name: Some("job.spool".into()),
                ..LogSetup::default()
            },
        );
        let data = text(1024 * 1024, "out");
        for chunk in data.chunks(4096) {
            writer.write(chunk);
        }
        server.unreachable(false);
        uploader.finish(Duration::from_secs(60)).await.unwrap();
        let log = server.text();
        assert!(
            log.contains(
                "[outpost] the runner could not write the log spool (No space left on device"
            ),
            "{}",
            &log[..log.len().min(2000)]
        );
        // Nothing was lost: memory took over. Without the notice (and the line break before it,
        // if one was added), the log is exactly the output.
        let data = String::from_utf8(data).unwrap();
        let at = log.find("[outpost]").unwrap();
        let end = at + log[at..].find('\n').unwrap() + 1;
        let without = format!("{}{}", &log[..at], &log[end..]);
        let without_break = format!("{}{}", &log[..at - 1], &log[end..]);
        assert!(without == data || without_break == data);
    }
}
