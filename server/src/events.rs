//! Wake-ups: "a job was queued" for long-polling runners and "this job's log or status changed"
//! for live-log subscribers.
//!
//! Within one process these are `tokio::sync::watch` channels, so a waiter never misses a change
//! that happened after it subscribed. With PostgreSQL every publish is also sent with
//! `pg_notify`, and each replica's listener task re-publishes what it hears locally, so a job
//! enqueued through one replica wakes runners long-polling another.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The PostgreSQL notification channel shared by all replicas.
pub(crate) const CHANNEL: &str = "outpost_events";

/// The in-process event hub.
#[derive(Debug)]
pub struct Events {
    jobs: watch::Sender<u64>,
    logs: Mutex<HashMap<Uuid, watch::Sender<u64>>>,
    pg: Option<PgPool>,
    /// Which label sets were found to have nothing queued, so idle long polls skip the query.
    pub claim_gates: crate::queue::ClaimGates,
    /// Claims that arrive while another is running, gathered into the next batch.
    pub claim_batcher: std::sync::Arc<crate::queue::ClaimBatcher>,
}

impl Events {
    /// A hub; with `pg`, publishes are also sent to the other replicas.
    pub fn new(pg: Option<PgPool>) -> Self {
        Self {
            jobs: watch::Sender::new(0),
            logs: Mutex::new(HashMap::new()),
            pg,
            claim_gates: Default::default(),
            claim_batcher: Default::default(),
        }
    }

    /// A receiver that sees every job enqueued after this call.
    pub fn subscribe_jobs(&self) -> watch::Receiver<u64> {
        self.jobs.subscribe()
    }

    /// A receiver that sees every log append or status change of `job` after this call.
    pub fn subscribe_log(&self, job: Uuid) -> watch::Receiver<u64> {
        let mut map = self.logs.lock().expect("events lock poisoned");
        map.entry(job)
            .or_insert_with(|| watch::Sender::new(0))
            .subscribe()
    }

    /// Wakes local waiters for jobs.
    pub fn wake_jobs_local(&self) {
        self.jobs.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Wakes local subscribers of one job's log; forgets jobs nobody watches.
    pub fn wake_log_local(&self, job: Uuid) {
        let mut map = self.logs.lock().expect("events lock poisoned");
        if let Some(tx) = map.get(&job) {
            if tx.receiver_count() == 0 {
                map.remove(&job);
            } else {
                tx.send_modify(|v| *v = v.wrapping_add(1));
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

    async fn notify_others(&self, payload: &str) {
        if let Some(pool) = &self.pg
            && let Err(e) = sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANNEL)
                .bind(payload)
                .execute(pool)
                .await
        {
            // Other replicas still catch up: their waiters re-check on their own deadline.
            tracing::warn!(error = %e, "could not notify other replicas");
        }
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
