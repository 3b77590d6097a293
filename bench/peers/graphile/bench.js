#!/usr/bin/env node
// graphile-worker 0.17.3 running the same workload as `outpost-bench throughput` and
// `outpost-bench dispatch`, against the same PostgreSQL, at graphile-worker's defaults
// (no local queue, no completion batching: its "unbatched" rate).
//
// Input (environment):
//   PEER_DATABASE_URL  a fresh, empty database (required)
//   PEER_JOBS          no-op jobs per phase (default 5000)
//   PEER_CONCURRENCY   worker concurrency, like Outpost's K runners (default 16)
//   PEER_BATCH         jobs per addJobs call, like Outpost's jobs per run (default 50)
//   PEER_ENQUEUERS     addJobs calls in flight, like Outpost's trigger concurrency (default 8)
//   PEER_SAMPLES       dispatch-latency samples (default 200)
//   PEER_LAT_WORKERS   worker concurrency while measuring latency (default 4)
//   PEER_GAP_MS        pause between latency samples (default 25)
// Output: one JSON line on stdout. Exit status 1 if any job was lost, run twice or failed.

"use strict";

const { performance } = require("node:perf_hooks");
const { run, makeWorkerUtils, Logger } = require("graphile-worker");

const env = (name, dflt) => {
  const v = process.env[name];
  return v === undefined || v === "" ? dflt : Number(v);
};

const connectionString = process.env.PEER_DATABASE_URL;
const JOBS = env("PEER_JOBS", 5000);
const CONCURRENCY = env("PEER_CONCURRENCY", 16);
const BATCH = env("PEER_BATCH", 50);
const ENQUEUERS = env("PEER_ENQUEUERS", 8);
const SAMPLES = env("PEER_SAMPLES", 200);
const LAT_WORKERS = env("PEER_LAT_WORKERS", 4);
const GAP_MS = env("PEER_GAP_MS", 25);

const quiet = new Logger(() => (level, message) => {
  if (level === "error") process.stderr.write(`graphile-worker: ${message}\n`);
});
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function percentile(samples, p) {
  const v = [...samples].sort((a, b) => a - b);
  const rank = Math.min(Math.max(Math.ceil((p / 100) * v.length), 1), v.length);
  return v[rank - 1];
}

// Adds `count` noop jobs tagged with `phase`, BATCH per call, ENQUEUERS calls at once.
async function enqueue(utils, phase, count) {
  const started = performance.now();
  let next = 0;
  const lanes = [];
  for (let l = 0; l < ENQUEUERS; l++) {
    lanes.push(
      (async () => {
        while (next < count) {
          const from = next;
          next = Math.min(count, next + BATCH);
          const specs = [];
          for (let i = from; i < next; i++) {
            specs.push({ identifier: "noop", payload: { phase, i } });
          }
          await utils.addJobs(specs);
        }
      })(),
    );
  }
  await Promise.all(lanes);
  return performance.now() - started;
}

// Starts a worker pool that runs noop jobs and resolves `done` after `target` successes.
async function startPool(concurrency, target, seen) {
  let completed = 0;
  let failed = null;
  let resolveDone;
  const done = new Promise((r) => (resolveDone = r));
  const runner = await run({
    connectionString,
    concurrency,
    noHandleSignals: true,
    logger: quiet,
    taskList: {
      noop: async (payload) => {
        const key = `${payload.phase}:${payload.i}`;
        if (seen.has(key)) failed = `job ${key} ran twice`;
        seen.add(key);
      },
    },
  });
  runner.events.on("job:success", () => {
    completed += 1;
    if (completed === target) resolveDone(performance.now());
  });
  runner.events.on("job:error", ({ error }) => {
    failed = `a job failed: ${error}`;
    resolveDone(performance.now());
  });
  return { runner, done, failed: () => failed, completed: () => completed };
}

async function main() {
  if (!connectionString) throw new Error("PEER_DATABASE_URL is required");
  const utils = await makeWorkerUtils({ connectionString, logger: quiet });
  await utils.migrate();
  const seen = new Set();

  // Phase 1: enqueue with no worker running.
  const enqueueMs = await enqueue(utils, "drain", JOBS);

  // Phase 2: drain the full queue.
  const drainStart = performance.now();
  const pool = await startPool(CONCURRENCY, JOBS, seen);
  const drainEnd = await pool.done;
  await pool.runner.stop();
  if (pool.failed()) throw new Error(pool.failed());

  // Phase 3: workers idle first, then the jobs arrive.
  const pool2 = await startPool(CONCURRENCY, JOBS, seen);
  await sleep(300);
  const e2eStart = performance.now();
  const e2eEnqueueMs = await enqueue(utils, "e2e", JOBS);
  const e2eEnd = await pool2.done;
  await pool2.runner.stop();
  if (pool2.failed()) throw new Error(pool2.failed());

  // Dispatch latency: idle workers, jobs added one at a time.
  let waiting = null;
  const latRunner = await run({
    connectionString,
    concurrency: LAT_WORKERS,
    noHandleSignals: true,
    logger: quiet,
    taskList: {
      lat: async (payload) => {
        const at = performance.now();
        if (waiting && waiting.i === payload.i) waiting.resolve(at);
      },
    },
  });
  await sleep(300);
  const latencies = [];
  for (let i = 0; i < SAMPLES; i++) {
    await sleep(GAP_MS);
    const got = new Promise((resolve) => (waiting = { i, resolve }));
    const t0 = performance.now();
    await utils.addJob("lat", { i });
    const at = await Promise.race([got, sleep(30000).then(() => null)]);
    if (at === null) throw new Error(`latency job ${i} did not start within 30 s`);
    latencies.push(at - t0);
  }
  await sleep(200);
  await latRunner.stop();

  // Every job ran exactly once and nothing is left in the queue.
  if (seen.size !== 2 * JOBS) throw new Error(`${seen.size} distinct jobs ran, ${2 * JOBS} expected`);
  const left = await utils.withPgClient((c) =>
    c.query("select count(*)::int as n from graphile_worker._private_jobs"),
  );
  if (left.rows[0].n !== 0) throw new Error(`${left.rows[0].n} jobs are still in the queue`);
  await utils.release();

  const out = {
    peer: "graphile-worker",
    version: require("graphile-worker/package.json").version,
    node: process.version,
    jobs: JOBS,
    concurrency: CONCURRENCY,
    enqueue_jobs_per_s: JOBS / (enqueueMs / 1000),
    drain_jobs_per_s: JOBS / ((drainEnd - drainStart) / 1000),
    e2e_jobs_per_s: JOBS / ((e2eEnd - e2eStart) / 1000),
    e2e_enqueue_jobs_per_s: JOBS / (e2eEnqueueMs / 1000),
    dispatch_p50_ms: percentile(latencies, 50),
    dispatch_p90_ms: percentile(latencies, 90),
    dispatch_p99_ms: percentile(latencies, 99),
    dispatch_max_ms: percentile(latencies, 100),
  };
  process.stdout.write(JSON.stringify(out) + "\n");
}

main().then(
  () => process.exit(0),
  (e) => {
    process.stderr.write(`graphile peer failed: ${e && e.stack ? e.stack : e}\n`);
    process.exit(1);
  },
);
