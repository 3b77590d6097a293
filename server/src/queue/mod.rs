//! The job queue: long-poll acquisition and the lease reaper.
//!
//! Claiming itself is one statement in the store (`FOR UPDATE SKIP LOCKED` on PostgreSQL, a
//! single `UPDATE … RETURNING` under the writer lock on SQLite). This module adds the waiting:
//! an acquire that finds nothing sleeps on the "job queued" wake-up, with no polling interval,
//! so a job reaches a waiting runner as soon as it is committed.

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::api::AppState;
use crate::store::runners::RunnerPrincipal;
use crate::store::{Claimed, Store, StoreResult};

/// Claims a job for `runner`, waiting up to `wait` for one to be queued.
pub async fn acquire(
    state: &AppState,
    runner: &RunnerPrincipal,
    wait: Duration,
) -> StoreResult<Option<Claimed>> {
    let deadline = Instant::now() + wait;
    let mut rx = state.store.events.subscribe_jobs();
    loop {
        // Everything published before this point is covered by the claim below.
        rx.borrow_and_update();
        // Boxed so that the (large) claim future lives only while it runs: thousands of idle
        // long polls then hold only this small waiting state.
        let claim = Box::pin(state.store.claim_job(
            runner.id,
            &runner.labels,
            state.settings.queue.lease_secs,
        ));
        if let Some(claimed) = claim.await? {
            return Ok(Some(claimed));
        }
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    return Ok(None);
                }
            }
            _ = tokio::time::sleep_until(deadline) => return Ok(None),
            _ = state.shutdown.cancelled() => return Ok(None),
        }
    }
}

/// Ends expired leases every `interval` until `shutdown`.
pub async fn reaper(store: std::sync::Arc<Store>, interval: Duration, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        if let Err(e) = store.reap_expired().await {
            tracing::warn!(error = %e, "could not reap expired leases; will retry");
        }
    }
}
