//! The job log: one ordered byte stream per job, buffered in memory and uploaded in batches.
//!
//! The executor writes through a [`LogWriter`], which never blocks on the network: bytes go into a
//! bounded in-memory buffer and a background task ([`LogUploader`]) sends them with
//! `append_log(offset, bytes)` in batches of at most [`LogConfig::batch_bytes`], at most once per
//! [`LogConfig::batch_interval`] unless a full batch is waiting.
//! The server's acknowledged offset is the source of truth: a `416` resynchronises to the offset the
//! server reports, transient errors are retried with backoff while the buffer keeps filling, and a
//! `409` means the lease is lost.
//!
//! The interface is deliberately small (`write`, `line`, `offset`, `finish`, `abort`) so that an
//! on-disk spool and secret masking can be added behind it without touching the executor.

use std::future::Future;
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

/// How the log is batched and how much of it may wait in memory.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Largest body of one `append_log` call.
    pub batch_bytes: usize,
    /// Smallest time between two `append_log` calls, unless a full batch is waiting.
    pub batch_interval: Duration,
    /// Most bytes held in memory while the server does not acknowledge them; beyond that, output is
    /// dropped and a line in the log says how much.
    pub max_buffered: usize,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            batch_bytes: 64 * 1024,
            batch_interval: Duration::from_millis(200),
            max_buffered: 256 * 1024 * 1024,
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

struct State {
    /// Bytes produced but not yet acknowledged; the first of them is at offset `acked`.
    pending: BytesMut,
    /// Offset the server has acknowledged.
    acked: u64,
    /// Bytes refused because the buffer was full, not yet reported in the log.
    dropped: u64,
    /// Whether the last byte written was a newline (or nothing was written yet).
    at_line_start: bool,
    /// No more writes are accepted; the uploader sends what is left without waiting.
    closed: bool,
}

impl State {
    fn produced(&self) -> u64 {
        self.acked + self.pending.len() as u64
    }

    fn push(&mut self, data: &[u8]) {
        if let Some(&last) = data.last() {
            self.pending.extend_from_slice(data);
            self.at_line_start = last == b'\n';
        }
    }

    fn push_drop_notice(&mut self, max_buffered: usize) {
        if self.dropped == 0 {
            return;
        }
        let notice = format!(
            "{}⚠ {} bytes of output were dropped here: the runner could not upload the log fast enough (it buffers at most {} bytes)\n",
            if self.at_line_start { "" } else { "\n" },
            self.dropped,
            max_buffered
        );
        self.dropped = 0;
        self.push(notice.as_bytes());
    }

    /// Moves the acknowledged offset to `next`, which the server reported.
    fn resync(&mut self, next: u64) {
        let produced = self.produced();
        if next >= self.acked && next <= produced {
            self.pending.advance((next - self.acked) as usize);
            self.acked = next;
        } else if next > produced {
            // The server holds more than this runner wrote: nothing of ours is missing there.
            tracing::warn!(
                server_offset = next,
                produced,
                "the server's log is longer than the runner's; skipping ahead"
            );
            self.pending.clear();
            self.acked = next;
        } else {
            // The server lost bytes it had acknowledged and this runner no longer holds them:
            // fill the gap with a notice of exactly that length so that later offsets still line up.
            let gap = (self.acked - next) as usize;
            tracing::warn!(
                server_offset = next,
                acked = self.acked,
                "the server lost acknowledged log bytes; filling the gap"
            );
            let mut filler = b"\n[outpost: this part of the log was lost by the server]".to_vec();
            filler.resize(gap, b' ');
            if gap > 0 {
                filler[gap - 1] = b'\n';
            }
            let mut pending = BytesMut::with_capacity(gap + self.pending.len());
            pending.extend_from_slice(&filler);
            pending.extend_from_slice(&self.pending);
            self.pending = pending;
            self.acked = next;
        }
    }
}

struct Shared {
    state: Mutex<State>,
    wake: Notify,
    max_buffered: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves the state consistent (every mutation is
        // a single step), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Appends to a job's log; cheap to clone, never blocks on the network.
#[derive(Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
}

impl LogWriter {
    /// Appends raw output bytes (a child's stdout and stderr).
    ///
    /// When the buffer is full the bytes that do not fit are dropped and counted; a line saying how
    /// many is written once there is room again.
    pub fn write(&self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let max = self.shared.max_buffered;
        let mut s = self.shared.lock();
        if s.closed {
            return;
        }
        if s.dropped > 0 && s.pending.len() + data.len() < max {
            s.push_drop_notice(max);
        }
        let room = max.saturating_sub(s.pending.len());
        let take = room.min(data.len());
        s.push(&data[..take]);
        s.dropped += (data.len() - take) as u64;
        drop(s);
        self.shared.wake.notify_one();
    }

    /// Writes a line of the runner's own, starting a new line first if output left one open.
    pub fn line(&self, text: &str) {
        let needs_newline = !self.shared.lock().at_line_start;
        let mut s = String::with_capacity(text.len() + 2);
        if needs_newline {
            s.push('\n');
        }
        s.push_str(text);
        if !text.ends_with('\n') {
            s.push('\n');
        }
        self.write(s.as_bytes());
    }

    /// Bytes of log produced so far: the offset the next byte will have.
    pub fn offset(&self) -> u64 {
        self.shared.lock().produced()
    }
}

/// The background task that uploads a job's log; dropping it stops the task.
pub struct LogUploader {
    shared: Arc<Shared>,
    task: Option<JoinHandle<Result<(), LogError>>>,
}

impl Drop for LogUploader {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Starts uploading to `sink`; a `409` cancels `lease_lost`.
pub fn start<S: LogSink>(
    sink: S,
    config: LogConfig,
    lease_lost: CancellationToken,
) -> (LogWriter, LogUploader) {
    start_at(sink, config, lease_lost, 0)
}

/// Like [`start`], for a log the server already holds `offset` bytes of.
pub fn start_at<S: LogSink>(
    sink: S,
    config: LogConfig,
    lease_lost: CancellationToken,
    offset: u64,
) -> (LogWriter, LogUploader) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            pending: BytesMut::new(),
            acked: offset,
            dropped: 0,
            at_line_start: true,
            closed: false,
        }),
        wake: Notify::new(),
        max_buffered: config.max_buffered.max(1),
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
    pub async fn finish(mut self, within: Duration) -> Result<(), LogError> {
        {
            let mut s = self.shared.lock();
            let max = self.shared.max_buffered;
            s.push_drop_notice(max);
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
                    unsent: self.shared.lock().pending.len() as u64,
                })
            }
            Err(_) => {
                task.abort();
                Err(LogError::TimedOut {
                    unsent: self.shared.lock().pending.len() as u64,
                })
            }
        }
    }

    /// Stops at once, discarding what was not uploaded (the lease is lost).
    pub fn abort(self) {
        self.shared.lock().closed = true;
        // Dropping `self` stops the task.
    }
}

async fn upload<S: LogSink>(
    shared: Arc<Shared>,
    sink: S,
    config: LogConfig,
    lease_lost: CancellationToken,
) -> Result<(), LogError> {
    let batch_bytes = config.batch_bytes.max(1);
    let mut backoff = Backoff::new();
    let mut last_send: Option<Instant> = None;
    loop {
        // Wait for something to send.
        loop {
            {
                let s = shared.lock();
                if !s.pending.is_empty() {
                    break;
                }
                if s.closed {
                    return Ok(());
                }
            }
            tokio::select! {
                _ = shared.wake.notified() => {}
                _ = lease_lost.cancelled() => return Err(LogError::LeaseLost),
            }
        }
        // Let a batch gather until it is full, the interval has passed, or the log is closing.
        if let Some(last) = last_send {
            let due = last + config.batch_interval;
            loop {
                {
                    let s = shared.lock();
                    if s.pending.len() >= batch_bytes || s.closed {
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
        let (offset, batch) = {
            let s = shared.lock();
            let n = s.pending.len().min(batch_bytes);
            (s.acked, Bytes::copy_from_slice(&s.pending[..n]))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

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
            let skip = (len - offset) as usize;
            if skip < data.len() {
                log.extend_from_slice(&data[skip..]);
            }
            Ok(log.len() as u64)
        }
    }

    fn fast() -> LogConfig {
        LogConfig {
            batch_bytes: 64 * 1024,
            batch_interval: Duration::from_millis(20),
            max_buffered: 256 * 1024 * 1024,
        }
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
        assert_eq!(
            String::from_utf8(server.log.lock().unwrap().clone()).unwrap(),
            expected
        );
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
    async fn a_full_buffer_drops_output_and_says_so() {
        let server = FakeServer::default();
        // Keep the server failing so that nothing is acknowledged while writing.
        server.fail_first.store(usize::MAX, Ordering::SeqCst);
        let config = LogConfig {
            max_buffered: 1000,
            ..fast()
        };
        let (writer, uploader) = start(server.clone(), config, CancellationToken::new());
        writer.write(&[b'a'; 600]);
        writer.write(&[b'b'; 600]);
        assert_eq!(writer.offset(), 1000);
        server.fail_first.store(0, Ordering::SeqCst);
        uploader.finish(Duration::from_secs(60)).await.unwrap();
        let log = String::from_utf8(server.log.lock().unwrap().clone()).unwrap();
        assert!(log.starts_with(&"a".repeat(600)));
        assert!(log.contains("200 bytes of output were dropped"), "{log}");
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
}
