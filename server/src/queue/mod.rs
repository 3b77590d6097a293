//! The job queue: long-poll acquisition and the lease reaper.
//!
//! Claiming itself is one statement in the store (`FOR UPDATE SKIP LOCKED` on PostgreSQL, a
//! single `UPDATE … RETURNING` under the writer lock on SQLite). This module adds the waiting:
//! an acquire that finds nothing sleeps on the "job queued" wake-up, with no polling interval,
//! so a job reaches a waiting runner as soon as it is committed. It also gathers claims: the
//! claims that arrive while one is running go to the database together, as one statement per
//! label set and one commit ([`ClaimBatcher`]), which is what lets a busy queue hand out more jobs
//! per second than the database commits.
//!
//! A long poll that found nothing also waits in [`Waiters`]: a run created on this replica hands
//! its new jobs straight to such waiting runners, in the statement that creates them
//! ([`crate::store::Store::create_run`]), so the job reaches its runner with one commit, not two
//! (the run's, then the runner's claim).

use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::api::AppState;
use crate::store::runners::RunnerPrincipal;
use crate::store::{ClaimRequest, Claimed, Store, StoreError, StoreResult};

/// How long "nothing queued for these labels" is trusted without asking the database again.
const EMPTY_FRESH: std::time::Duration = std::time::Duration::from_secs(2);

/// How often a waiting long poll re-checks even without a wake-up, in case a notification from
/// another replica was lost.
const RECHECK: Duration = Duration::from_secs(5);

/// Per label set: the newest wake-up version at which a claim found nothing, and when.
///
/// Without this, every job queued would wake every idle long poll into its own claim query:
/// with thousands of idle runners that is thousands of queries per job. Claims that a wake-up
/// triggers go through the group's lock one at a time; once one of them finds nothing, the
/// others waiting on the same wake-up know there is nothing for their labels and go back to
/// sleep without a query. The first claim of a fresh acquire does not take the lock, so runners
/// draining a full queue still claim in parallel.
#[derive(Debug, Default)]
pub struct LabelGroup {
    empty_at: tokio::sync::Mutex<Option<(u64, std::time::Instant)>>,
}

impl LabelGroup {
    fn known_empty(state: &Option<(u64, std::time::Instant)>, seen: u64) -> bool {
        matches!(state, Some((v, at)) if *v >= seen && at.elapsed() < EMPTY_FRESH)
    }
}

/// The label groups of this replica, by sorted label set.
#[derive(Debug, Default)]
pub struct ClaimGates {
    groups: std::sync::Mutex<std::collections::HashMap<Vec<String>, std::sync::Arc<LabelGroup>>>,
}

impl ClaimGates {
    fn group(&self, labels: &[String]) -> std::sync::Arc<LabelGroup> {
        let mut key = labels.to_vec();
        key.sort();
        key.dedup();
        let mut groups = self.groups.lock().expect("claim gates poisoned");
        groups.entry(key).or_default().clone()
    }
}

/// Claims a job for `runner`, waiting up to `wait` for one to be queued.
pub async fn acquire(
    state: &AppState,
    runner: &RunnerPrincipal,
    wait: Duration,
) -> StoreResult<Option<Claimed>> {
    let deadline = Instant::now() + wait;
    let events = &state.store.events;
    let mut rx = events.subscribe_jobs();
    let group = events.claim_gates.group(&runner.labels);
    let mut woken = false;
    loop {
        // Everything published up to `seen` is covered by the claim below.
        let seen = *rx.borrow_and_update();
        let claimed = if woken {
            let mut empty_at = group.empty_at.lock().await;
            if LabelGroup::known_empty(&empty_at, seen) {
                None
            } else {
                let claimed = claim(state, runner).await?;
                if claimed.is_none() {
                    *empty_at = Some((seen, std::time::Instant::now()));
                }
                claimed
            }
        } else if LabelGroup::known_empty(&*group.empty_at.lock().await, seen) {
            None
        } else {
            claim(state, runner).await?
        };
        if let Some(claimed) = claimed {
            return Ok(Some(claimed));
        }
        // Nothing queued: wait, where a new run on this replica can hand its job straight here.
        let mut ticket =
            events
                .waiters
                .register(runner.id, &runner.labels, state.settings.queue.lease_secs);
        let go_on = tokio::select! {
            handed = &mut ticket.rx => match handed {
                Ok(Some(claimed)) => return Ok(Some(*claimed)),
                // The run that took this poll was not created: claim as after a wake-up.
                Ok(None) | Err(_) => {
                    woken = true;
                    continue;
                }
            },
            changed = rx.changed() => changed.is_ok(),
            _ = tokio::time::sleep(RECHECK) => true,
            _ = tokio::time::sleep_until(deadline) => false,
            _ = state.shutdown.cancelled() => false,
        };
        // A run being created may have taken this poll just now; its answer is on the way.
        if let Some(Some(claimed)) = ticket.leave().await {
            return Ok(Some(*claimed));
        }
        if !go_on {
            return Ok(None);
        }
        woken = true;
    }
}

/// One claim, through the batcher; boxed so that the claim future lives only while it runs:
/// thousands of idle long polls then hold only their small waiting state.
async fn claim(state: &AppState, runner: &RunnerPrincipal) -> StoreResult<Option<Claimed>> {
    let request = ClaimRequest {
        runner_id: runner.id,
        labels: runner.labels.clone(),
    };
    Box::pin(state.store.events.claim_batcher.clone().claim(
        state.store.clone(),
        request,
        state.settings.queue.lease_secs,
    ))
    .await
}

/// A long poll waiting in [`Waiters`]. The job travels boxed: the channel's slot is part of every
/// waiting poll's memory, and a boxed job keeps it a pointer wide.
#[derive(Debug)]
struct Waiting {
    runner_id: Uuid,
    labels: Vec<String>,
    lease_secs: u64,
    tx: oneshot::Sender<Option<Box<Claimed>>>,
}

/// The long polls of this replica that found nothing queued for their labels, longest waiting
/// first. A run created here takes one for each new job whose labels it carries
/// ([`Waiters::take`]) and inserts the job already claimed for it, under a lease, in the same
/// statement that creates the run.
///
/// This may give a waiting runner the new job while an older one it could run is still queued:
/// only when that older job was queued by another replica or put back by the reaper since this
/// runner last looked, and the older job's wake-up then reaches the other runners as usual.
#[derive(Debug, Default)]
pub struct Waiters {
    inner: std::sync::Mutex<WaitersInner>,
}

#[derive(Debug, Default)]
struct WaitersInner {
    next: u64,
    waiting: std::collections::BTreeMap<u64, Waiting>,
}

/// A waiting runner taken for a new job; [`Handoff::deliver`] answers its long poll.
#[derive(Debug)]
pub struct Handoff {
    /// The runner.
    pub runner_id: Uuid,
    /// The lease its job gets.
    pub lease_secs: u64,
    tx: oneshot::Sender<Option<Box<Claimed>>>,
}

impl Handoff {
    /// Answers the long poll: with the job once it is committed, or `None` when the run was not
    /// created (the poll then claims as usual). `false` when the runner has gone: a job it was
    /// given waits for its lease to expire and is queued again, like any claim that never
    /// reached its runner.
    pub fn deliver(self, job: Option<Claimed>) -> bool {
        self.tx.send(job.map(Box::new)).is_ok()
    }
}

/// One long poll's place in [`Waiters`]; leaving it (or dropping it) takes the place back.
struct Ticket<'a> {
    waiters: &'a Waiters,
    key: u64,
    rx: oneshot::Receiver<Option<Box<Claimed>>>,
}

impl Ticket<'_> {
    /// Leaves the wait. `Some` when a run took this poll in the meantime: its answer, waited for.
    async fn leave(mut self) -> Option<Option<Box<Claimed>>> {
        if self.waiters.withdraw(self.key) {
            return None;
        }
        Some((&mut self.rx).await.ok().flatten())
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.waiters.withdraw(self.key);
    }
}

impl Waiters {
    fn register(&self, runner_id: Uuid, labels: &[String], lease_secs: u64) -> Ticket<'_> {
        let (tx, rx) = oneshot::channel();
        let mut inner = self.inner.lock().expect("waiters poisoned");
        inner.next += 1;
        let key = inner.next;
        inner.waiting.insert(
            key,
            Waiting {
                runner_id,
                labels: labels.to_vec(),
                lease_secs,
                tx,
            },
        );
        Ticket {
            waiters: self,
            key,
            rx,
        }
    }

    /// Whether the poll was still waiting (not taken by a run).
    fn withdraw(&self, key: u64) -> bool {
        let mut inner = self.inner.lock().expect("waiters poisoned");
        inner.waiting.remove(&key).is_some()
    }

    /// Takes the longest-waiting runner whose labels include all of `runs_on`, if any.
    pub fn take(&self, runs_on: &[String]) -> Option<Handoff> {
        let mut inner = self.inner.lock().expect("waiters poisoned");
        let key = inner
            .waiting
            .iter()
            .find(|(_, w)| !w.tx.is_closed() && runs_on.iter().all(|l| w.labels.contains(l)))
            .map(|(k, _)| *k)?;
        let w = inner.waiting.remove(&key)?;
        Some(Handoff {
            runner_id: w.runner_id,
            lease_secs: w.lease_secs,
            tx: w.tx,
        })
    }

    /// How many long polls are waiting.
    pub fn len(&self) -> usize {
        self.inner.lock().expect("waiters poisoned").waiting.len()
    }

    /// Whether no long poll is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The most claims one batch carries.
const MAX_BATCH: usize = 64;

type Waiter = (ClaimRequest, oneshot::Sender<StoreResult<Option<Claimed>>>);

/// Group commit for claims: the first claim runs at once; the claims that arrive while it runs
/// wait for it and then go to the store together ([`Store::claim_jobs`]). A lone claim is not
/// delayed at all, and a burst costs one statement per label set instead of one per runner.
#[derive(Debug, Default)]
pub struct ClaimBatcher {
    state: std::sync::Mutex<BatcherState>,
}

#[derive(Debug, Default)]
struct BatcherState {
    pending: Vec<Waiter>,
    running: bool,
}

impl ClaimBatcher {
    /// Claims a job for one runner, in the next batch.
    pub async fn claim(
        self: std::sync::Arc<Self>,
        store: std::sync::Arc<Store>,
        request: ClaimRequest,
        lease_secs: u64,
    ) -> StoreResult<Option<Claimed>> {
        let (tx, rx) = oneshot::channel();
        let lead = {
            let mut state = self.state.lock().expect("claim batcher poisoned");
            state.pending.push((request, tx));
            !std::mem::replace(&mut state.running, true)
        };
        if lead {
            // The batch runs in a task of its own: a runner that hangs up must not cancel the
            // claims of the others waiting on the same batch.
            tokio::spawn(self.drain(store, lease_secs));
        }
        rx.await.unwrap_or_else(|_| {
            Err(StoreError::Db(sqlx::Error::Io(std::io::Error::other(
                "the claim batch ended without an answer",
            ))))
        })
    }

    /// Runs batches until nobody is waiting.
    async fn drain(self: std::sync::Arc<Self>, store: std::sync::Arc<Store>, lease_secs: u64) {
        let _unstick = Unstick(self.clone());
        loop {
            let batch: Vec<Waiter> = {
                let mut state = self.state.lock().expect("claim batcher poisoned");
                if state.pending.is_empty() {
                    state.running = false;
                    return;
                }
                let n = state.pending.len().min(MAX_BATCH);
                state.pending.drain(..n).collect()
            };
            let (requests, waiters): (Vec<ClaimRequest>, Vec<_>) = batch.into_iter().unzip();
            match store.claim_jobs(&requests, lease_secs).await {
                Ok(results) => {
                    for (waiter, result) in waiters.into_iter().zip(results) {
                        if let Err(Ok(Some(lost))) = waiter.send(Ok(result)) {
                            // The runner hung up: its job stays unconfirmed and goes back to the
                            // queue when the lease expires (the reaper's rule for first claims).
                            tracing::info!(job.id = %lost.job.id, "a runner left before its claimed job reached it");
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, batch = waiters.len(), "a claim batch failed");
                    let message = e.to_string();
                    for waiter in waiters {
                        let _ = waiter.send(Err(StoreError::Db(sqlx::Error::Io(
                            std::io::Error::other(message.clone()),
                        ))));
                    }
                }
            }
        }
    }
}

/// Should a batch panic, lets the next claim start a new batch and answers the waiting ones with
/// an error, instead of leaving every later claim waiting on a batch that will never run.
struct Unstick(std::sync::Arc<ClaimBatcher>);

impl Drop for Unstick {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut state = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
            state.running = false;
            state.pending.clear();
        }
    }
}

/// How often the reaper looks for runs that no job will advance any more
/// ([`Store::repair_runs`]); it also does so when it starts.
const REPAIR_EVERY: Duration = Duration::from_secs(60);

/// Ends expired leases every `interval` until `shutdown`, and now and then finishes runs left
/// behind by a replica that stopped between a completion and its run's advance.
pub async fn reaper(store: std::sync::Arc<Store>, interval: Duration, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut repaired_at: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        if let Err(e) = store.check_writer().await {
            tracing::warn!(error = %e, "could not reopen the SQLite writer connection; will retry");
        }
        if let Err(e) = store.reap_expired().await {
            tracing::warn!(error = %e, "could not reap expired leases; will retry");
        }
        if repaired_at.is_none_or(|at| at.elapsed() >= REPAIR_EVERY) {
            repaired_at = Some(Instant::now());
            match store.repair_runs().await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(
                    count = n,
                    "advanced runs that no job would advance any more"
                ),
                Err(e) => tracing::warn!(error = %e, "could not look for stalled runs; will retry"),
            }
        }
    }
}
