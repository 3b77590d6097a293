//! Throughput: M no-op jobs and K simulated runners doing acquire → empty log append → complete.
//!
//! Three figures, measured in three phases on one server:
//! - enqueue rate: M jobs triggered (runs of `jobs_per_run` independent jobs, several requests at
//!   once) with no runner polling;
//! - drain rate: K runners start against that full queue; M jobs / time to the last completion;
//! - end to end: K runners already long-polling, M more jobs enqueued; M jobs / time from the first
//!   trigger request to the last completion.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use futures::StreamExt;
use outpost_protocol::{Client, TriggerRunRequest};
use tokio::sync::Notify;
use uuid::Uuid;

use super::{Sizes, finish_noop, verify_runs};
use crate::harness::{Backend, Db, Env, Server, cpu_secs, pg_backend_cpu_secs, pipeline_yaml};
use crate::report::Metrics;

/// Runs the scenario once.
pub async fn run(env: &Env, backend: Backend, sizes: &Sizes) -> anyhow::Result<Metrics> {
    let db = Db::create(env, backend).await?;
    let server = Server::start(env, &db, &[]).await?;
    let result = measure(&server, sizes).await;
    server.stop().await?;
    result
}

/// What the enqueue phase produced.
pub struct Enqueued {
    /// The runs created.
    pub runs: Vec<Uuid>,
    /// When the first trigger request started.
    pub started: Instant,
    /// How long all the triggers took.
    pub took: Duration,
}

/// Triggers `runs` runs of `pipeline`, `concurrency` requests at a time.
pub async fn enqueue(
    admin: &Client,
    pipeline: &str,
    runs: usize,
    concurrency: usize,
) -> anyhow::Result<Enqueued> {
    let started = Instant::now();
    let created: Vec<anyhow::Result<Uuid>> = futures::stream::iter(0..runs)
        .map(|i| async move {
            admin
                .trigger_run(pipeline, &TriggerRunRequest::default())
                .await
                .map(|r| r.id)
                .with_context(|| format!("trigger {i} of {pipeline}"))
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let took = started.elapsed();
    let runs = created.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Enqueued {
        runs,
        started,
        took,
    })
}

/// Simulated runners that work until `target` jobs were completed.
pub struct Fleet {
    completed: Arc<AtomicUsize>,
    seen: Arc<Mutex<HashSet<Uuid>>>,
    errors: Arc<Mutex<Vec<String>>>,
    last: Arc<Mutex<Option<Instant>>>,
    done: Arc<Notify>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    target: usize,
}

impl Fleet {
    /// Starts one task per runner client.
    pub fn start(clients: &[Client], target: usize) -> Fleet {
        let completed = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(HashSet::with_capacity(target)));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let last = Arc::new(Mutex::new(None));
        let done = Arc::new(Notify::new());
        let mut tasks = Vec::new();
        for client in clients {
            let client = client.clone();
            let (completed, seen, errors, last, done) = (
                completed.clone(),
                seen.clone(),
                errors.clone(),
                last.clone(),
                done.clone(),
            );
            tasks.push(tokio::spawn(async move {
                loop {
                    let acquired = match client.acquire(Duration::from_secs(30)).await {
                        Ok(Some(a)) => a,
                        Ok(None) => continue,
                        Err(e) => {
                            errors.lock().unwrap().push(format!("acquire: {e}"));
                            done.notify_one();
                            return;
                        }
                    };
                    if !seen.lock().unwrap().insert(acquired.job.id) {
                        errors
                            .lock()
                            .unwrap()
                            .push(format!("job {} was handed out twice", acquired.job.id));
                    }
                    if let Err(e) = finish_noop(&client, &acquired).await {
                        errors.lock().unwrap().push(format!("{e:#}"));
                        done.notify_one();
                        return;
                    }
                    let n = completed.fetch_add(1, Ordering::SeqCst) + 1;
                    if n == target {
                        *last.lock().unwrap() = Some(Instant::now());
                        done.notify_one();
                    }
                }
            }));
        }
        Fleet {
            completed,
            seen,
            errors,
            last,
            done,
            tasks,
            target,
        }
    }

    /// Waits until `target` jobs were completed; returns when the last one was.
    pub async fn wait(&self, timeout: Duration) -> anyhow::Result<Instant> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(e) = self.errors.lock().unwrap().first() {
                bail!("a simulated runner failed: {e}");
            }
            if let Some(at) = *self.last.lock().unwrap() {
                return Ok(at);
            }
            if tokio::time::timeout_at(deadline, self.done.notified())
                .await
                .is_err()
            {
                bail!(
                    "only {} of {} jobs were completed within {timeout:?}",
                    self.completed.load(Ordering::SeqCst),
                    self.target
                );
            }
        }
    }

    /// Stops the runners and checks that each job was handed out once and no more jobs than
    /// `target` were.
    pub fn finish(self) -> anyhow::Result<()> {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(e) = self.errors.lock().unwrap().first() {
            bail!("a simulated runner failed: {e}");
        }
        let seen = self.seen.lock().unwrap().len();
        ensure!(
            seen == self.target,
            "{seen} distinct jobs were handed out, {} expected",
            self.target
        );
        Ok(())
    }
}

async fn measure(server: &Server, sizes: &Sizes) -> anyhow::Result<Metrics> {
    let admin = &server.admin;
    let per_run = sizes.jobs_per_run.max(1);
    let runs = (sizes.jobs / per_run).max(1);
    let jobs = runs * per_run;
    let timeout = Duration::from_secs(120 + jobs as u64 / 50);
    admin
        .apply_pipeline("tp-drain", &pipeline_yaml(per_run))
        .await
        .context("applying the pipeline")?;
    admin
        .apply_pipeline("tp-e2e", &pipeline_yaml(per_run))
        .await
        .context("applying the pipeline")?;
    let clients = server.register_runners(sizes.runners, 16).await?;

    // Phase 1: enqueue with nobody polling.
    let first = enqueue(admin, "tp-drain", runs, sizes.enqueue_concurrency).await?;

    // Phase 2: drain the full queue.
    let fleet = Fleet::start(&clients, jobs);
    let drain_started = Instant::now();
    let last = fleet.wait(timeout).await?;
    let drain = last.duration_since(drain_started);
    fleet.finish()?;
    verify_runs(admin, &first.runs, jobs).await?;

    // Phase 3: runners wait first, then the jobs arrive.
    let fleet = Fleet::start(&clients, jobs);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cpu_before = CpuSnapshot::take(server).await?;
    let second = enqueue(admin, "tp-e2e", runs, sizes.enqueue_concurrency).await?;
    let last = fleet.wait(timeout).await?;
    let cpu = CpuSnapshot::take(server).await?.since(&cpu_before);
    let e2e = last.duration_since(second.started);
    fleet.finish()?;
    verify_runs(admin, &second.runs, jobs).await?;

    let mut m = Metrics::default();
    m.push(
        "enqueue_jobs_per_s",
        "jobs/s",
        jobs as f64 / first.took.as_secs_f64(),
    );
    m.push(
        "drain_jobs_per_s",
        "jobs/s",
        jobs as f64 / drain.as_secs_f64(),
    );
    m.push("e2e_jobs_per_s", "jobs/s", jobs as f64 / e2e.as_secs_f64());
    m.push(
        "e2e_enqueue_jobs_per_s",
        "jobs/s",
        jobs as f64 / second.took.as_secs_f64(),
    );
    // CPU time per job, by process: unlike jobs/s, it hardly depends on what else the machine
    // is doing, and it gives the rate this machine's cores could sustain at best.
    let per_job_ms = |secs: f64| secs * 1000.0 / jobs as f64;
    m.push("e2e_server_cpu_ms_per_job", "ms", per_job_ms(cpu.server));
    m.push(
        "e2e_postgres_cpu_ms_per_job",
        "ms",
        per_job_ms(cpu.postgres),
    );
    m.push("e2e_harness_cpu_ms_per_job", "ms", per_job_ms(cpu.harness));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let total = cpu.server + cpu.postgres + cpu.harness;
    if total > 0.0 {
        m.push(
            "e2e_cpu_bound_jobs_per_s",
            "jobs/s",
            cores * jobs as f64 / total,
        );
    }
    if cpu.server + cpu.postgres > 0.0 {
        m.push(
            "e2e_cpu_bound_without_harness_jobs_per_s",
            "jobs/s",
            cores * jobs as f64 / (cpu.server + cpu.postgres),
        );
    }
    Ok(m)
}

/// CPU seconds used so far by the server, its PostgreSQL backends and this harness.
struct CpuSnapshot {
    server: f64,
    postgres: f64,
    harness: f64,
}

impl CpuSnapshot {
    async fn take(server: &Server) -> anyhow::Result<CpuSnapshot> {
        Ok(CpuSnapshot {
            server: cpu_secs(server.pid).context("reading the server's CPU time")?,
            postgres: pg_backend_cpu_secs(server.db_url()).await?,
            harness: cpu_secs(std::process::id()).context("reading the harness's CPU time")?,
        })
    }

    fn since(&self, before: &CpuSnapshot) -> CpuSnapshot {
        CpuSnapshot {
            server: self.server - before.server,
            postgres: (self.postgres - before.postgres).max(0.0),
            harness: self.harness - before.harness,
        }
    }
}
