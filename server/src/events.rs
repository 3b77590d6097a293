//! Wake-ups: "a job was queued" for long-polling runners and "this job's log or status changed"
//! for live-log subscribers.
//!
//! Within one process these are `tokio::sync::watch` channels, so a waiter never misses a change
//! that happened after it subscribed. With PostgreSQL every publish is also sent with
//! `pg_notify`, and each replica's listener task re-publishes what it hears locally, so a job
//! enqueued through one replica wakes runners long-polling another.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The PostgreSQL notification channel shared by all replicas.
pub(crate) const CHANNEL: &str = "outpost_events";

/// One job's live-log feed in this process: the wake-up channel and the shared tail.
#[derive(Debug)]
struct LogFeed {
    tx: watch::Sender<u64>,
    tail: SharedTail,
}

/// The end of one job's log as this process last read it, shared by every subscriber of the job
/// here, so that an append is read from the database once, not once per viewer.
///
/// Whoever finds it older than the wake-up it is answering refreshes it, holding the lock, while
/// the others wait and then copy from it: one database read per change, however many watch.
#[derive(Debug, Default)]
pub struct LogTail {
    /// The wake-up version this tail is at least as new as.
    pub version: u64,
    /// Whether it was ever read.
    pub loaded: bool,
    /// When it was last read from the database.
    pub read_at: Option<std::time::Instant>,
    /// The job's status when last read.
    pub status: Option<outpost_protocol::JobStatus>,
    /// The job's log size when last read.
    pub size: u64,
    /// Offset of `bytes[0]` in the log; `start + bytes.len()` is the end read so far.
    pub start: u64,
    /// The last bytes of the log (at most a window's worth).
    pub bytes: Vec<u8>,
}

/// A tail shared by the subscribers of one job.
pub type SharedTail = std::sync::Arc<tokio::sync::Mutex<LogTail>>;

/// The most notifications one statement sends.
const MAX_NOTIFY_BATCH: usize = 256;

/// Notifications waiting for the sender, and whether it is running.
#[derive(Debug, Default)]
struct Outbox {
    pending: Vec<(String, oneshot::Sender<()>)>,
    running: bool,
}

/// Sends what is in the outbox until it is empty, one statement per batch.
async fn send_notifications(outbox: Arc<Mutex<Outbox>>, pool: PgPool) {
    let _unstick = Unstick(outbox.clone());
    loop {
        let batch: Vec<(String, oneshot::Sender<()>)> = {
            let mut state = outbox.lock().expect("outbox poisoned");
            if state.pending.is_empty() {
                state.running = false;
                return;
            }
            let n = state.pending.len().min(MAX_NOTIFY_BATCH);
            state.pending.drain(..n).collect()
        };
        let (mut payloads, waiters): (Vec<String>, Vec<_>) = batch.into_iter().unzip();
        // PostgreSQL delivers identical notifications of one transaction once anyway.
        payloads.sort();
        payloads.dedup();
        if let Err(e) = sqlx::query("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p")
            .bind(CHANNEL)
            .bind(&payloads)
            .execute(&pool)
            .await
        {
            tracing::warn!(error = %e, count = payloads.len(), "could not notify other replicas");
        }
        for waiter in waiters {
            let _ = waiter.send(());
        }
    }
}

/// Should the sender panic, lets the next notification start a new one instead of leaving the
/// outbox marked as running forever.
struct Unstick(Arc<Mutex<Outbox>>);

impl Drop for Unstick {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut state = self.0.lock().unwrap_or_else(|e| e.into_inner());
            state.running = false;
            state.pending.clear();
        }
    }
}

/// The in-process event hub.
#[derive(Debug)]
pub struct Events {
    jobs: watch::Sender<u64>,
    logs: Mutex<HashMap<Uuid, LogFeed>>,
    pg: Option<PgPool>,
    /// Notifications for the other replicas, sent in batches.
    outbox: Arc<Mutex<Outbox>>,
    /// Which label sets were found to have nothing queued, so idle long polls skip the query.
    pub claim_gates: crate::queue::ClaimGates,
    /// Claims that arrive while another is running, gathered into the next batch.
    pub claim_batcher: std::sync::Arc<crate::queue::ClaimBatcher>,
    /// Long polls waiting here, which a new run hands its jobs to.
    pub waiters: crate::queue::Waiters,
}

impl Events {
    /// A hub; with `pg`, publishes are also sent to the other replicas.
    pub fn new(pg: Option<PgPool>) -> Self {
        Self {
            jobs: watch::Sender::new(0),
            logs: Mutex::new(HashMap::new()),
            pg,
            outbox: Default::default(),
            claim_gates: Default::default(),
            claim_batcher: Default::default(),
            waiters: Default::default(),
        }
    }

    /// A receiver that sees every job enqueued after this call.
    pub fn subscribe_jobs(&self) -> watch::Receiver<u64> {
        self.jobs.subscribe()
    }

    /// A receiver that sees every log append or status change of `job` after this call, and the
    /// tail of that log shared by all of this process's subscribers of the job.
    ///
    /// Call [`Events::unsubscribe_log`] after dropping the receiver, so the tail of a log nobody
    /// watches any more is freed at once.
    pub fn subscribe_log(&self, job: Uuid) -> (watch::Receiver<u64>, SharedTail) {
        let mut map = self.logs.lock().expect("events lock poisoned");
        let feed = map.entry(job).or_insert_with(|| LogFeed {
            tx: watch::Sender::new(0),
            tail: Default::default(),
        });
        (feed.tx.subscribe(), feed.tail.clone())
    }

    /// Forgets `job`'s feed if nobody subscribes to it any more.
    pub fn unsubscribe_log(&self, job: Uuid) {
        let mut map = self.logs.lock().expect("events lock poisoned");
        if map.get(&job).is_some_and(|f| f.tx.receiver_count() == 0) {
            map.remove(&job);
        }
    }

    /// How many jobs have a live feed in this process.
    pub fn log_feeds(&self) -> usize {
        self.logs.lock().expect("events lock poisoned").len()
    }

    /// Wakes local waiters for jobs.
    pub fn wake_jobs_local(&self) {
        self.jobs.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Wakes local subscribers of one job's log; forgets jobs nobody watches.
    pub fn wake_log_local(&self, job: Uuid) {
        let mut map = self.logs.lock().expect("events lock poisoned");
        if let Some(feed) = map.get(&job) {
            if feed.tx.receiver_count() == 0 {
                map.remove(&job);
            } else {
                feed.tx.send_modify(|v| *v = v.wrapping_add(1));
            }
        }
    }

    /// Announces that jobs were queued, here and on the other replicas.
    pub async fn publish_jobs(&self) {
        self.wake_jobs_local();
        self.notify_others("jobs").await;
    }

    /// Announces that a job's log or status changed, here and on the other replicas.
    pub async fn publish_log(&self, job: Uuid) {
        self.wake_log_local(job);
        if self.pg.is_some() {
            self.notify_others(&format!("log:{job}")).await;
        }
    }

    /// Sends `payload` to the other replicas and waits until it was sent.
    ///
    /// A `NOTIFY` gives its transaction an id, so each one sent on its own was a durable commit:
    /// with a log append and a completion publishing for every job, that was two of the four
    /// commits a no-op job cost. Notifications published while one is being sent are therefore
    /// gathered and sent together, in one statement and one commit (like claims, see
    /// [`crate::queue::ClaimBatcher`]); a lone notification is not delayed.
    async fn notify_others(&self, payload: &str) {
        let Some(pool) = &self.pg else { return };
        let (tx, rx) = oneshot::channel();
        let lead = {
            let mut outbox = self.outbox.lock().expect("outbox poisoned");
            outbox.pending.push((payload.to_string(), tx));
            !std::mem::replace(&mut outbox.running, true)
        };
        if lead {
            // A task of its own: a request that is dropped must not cancel the others' sends.
            tokio::spawn(send_notifications(self.outbox.clone(), pool.clone()));
        }
        // An error was logged by the sender; other replicas still catch up, as their waiters
        // re-check on their own deadline.
        let _ = rx.await;
    }

    /// Applies a notification received from PostgreSQL.
    fn apply(&self, payload: &str) {
        if payload == "jobs" {
            self.wake_jobs_local();
        } else if let Some(id) = payload.strip_prefix("log:")
            && let Ok(id) = Uuid::parse_str(id)
        {
            self.wake_log_local(id);
        }
    }

    /// Listens for other replicas' notifications until `shutdown`; reconnects on failure.
    pub async fn listen(self: std::sync::Arc<Self>, shutdown: CancellationToken) {
        let Some(pool) = self.pg.clone() else { return };
        let mut backoff = Duration::from_millis(200);
        while !shutdown.is_cancelled() {
            let mut listener = match PgListener::connect_with(&pool).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "could not start the PostgreSQL listener; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            if let Err(e) = listener.listen(CHANNEL).await {
                tracing::warn!(error = %e, "could not LISTEN; retrying");
                continue;
            }
            backoff = Duration::from_millis(200);
            // Anything may have happened while we were not listening.
            self.wake_jobs_local();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    msg = listener.try_recv() => match msg {
                        Ok(Some(n)) => self.apply(n.payload()),
                        Ok(None) => {
                            // The connection was lost and re-established; wake everyone to re-check.
                            self.wake_jobs_local();
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "PostgreSQL listener failed; reconnecting");
                            break;
                        }
                    }
                }
            }
        }
    }
}
