// Browser tests of the web UI: real Chromium (playwright-core), the real outpost-server and a
// real outpost-runner, a temp SQLite database. Screenshots go to ./artifacts/.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, mkdirSync, writeFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, '..', '..');
const bin = (name) => join(process.env.CARGO_TARGET_DIR || join(root, 'target'), 'debug', name);
const artifacts = join(here, 'artifacts');
mkdirSync(artifacts, { recursive: true });

const tmp = mkdtempSync(join(tmpdir(), 'outpost-ui-'));
const env = {
  ...process.env,
  OUTPOST__DATA_DIR: join(tmp, 'data'),
  OUTPOST__DATABASE__URL: `sqlite://${join(tmp, 'o.db')}`,
};
const log = (...a) => { if (process.env.TEST_LOG) console.error(...a); };

let server = null;
let runner = null;
let base = '';
let port = 0;
let admin = '';
let reader = '';
let browser = null;

function startServer(listen) {
  return new Promise((resolve, reject) => {
    const child = spawn(bin('outpost-server'), ['serve'], {
      env: { ...env, OUTPOST__SERVER__LISTEN: listen },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    const timer = setTimeout(() => reject(new Error('the server did not start: ' + out)), 30000);
    child.stdout.on('data', (d) => {
      out += d;
      const m = /listening on (http:\/\/127\.0\.0\.1:(\d+))/.exec(out);
      if (m) { clearTimeout(timer); resolve({ child, url: m[1], port: Number(m[2]) }); }
    });
    child.stderr.on('data', (d) => log('server:', String(d)));
    child.on('exit', (code) => { clearTimeout(timer); if (!out.includes('listening')) reject(new Error('server exited ' + code)); });
  });
}

function stop(child) {
  return new Promise((resolve) => {
    if (!child || child.exitCode !== null) return resolve();
    child.once('exit', () => resolve());
    child.kill('SIGTERM');
    setTimeout(() => child.kill('SIGKILL'), 10000).unref();
  });
}

async function until(what, fn, ms = 20000) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > end) throw new Error('timed out waiting for ' + what);
    await new Promise((r) => setTimeout(r, 100));
  }
}

async function api(path, init = {}) {
  const r = await fetch(base + path, {
    ...init,
    headers: { Authorization: 'Bearer ' + admin, ...(init.headers || {}) },
  });
  if (!r.ok) throw new Error(path + ': ' + r.status + ' ' + (await r.text()));
  return r.status === 204 ? null : r.json();
}

const PIPELINE = `description: UI test pipeline
jobs:
  show:
    runs_on: [local]
    steps:
      - name: Colours
        run: |
          printf '\\033[31mred text\\033[0m and \\033[1mbold text\\033[0m\\n'
          printf '\\033[38;2;255;128;0;48;5;17mtruecolour\\033[0m \\033[2K\\033]0;title\\007on \\033[38;5;9mpalette\\033[m\\n'
          echo '<script>window.__pwned = 1</script>'
          echo "first line"
      - name: Wait for the gate
        run: |
          echo "waiting for the gate"
          while [ ! -f "$GATE" ]; do sleep 0.05; done
          echo "stamp $(date +%s%3N)"
          for i in $(seq 1 $COUNT); do echo "n $i"; sleep 0.05; done
          echo "all done"
`;

async function newPage(token) {
  const ctx = await browser.newContext({ viewport: { width: 1100, height: 800 } });
  const page = await ctx.newPage();
  page.on('console', (m) => log('console:', m.text()));
  page.on('pageerror', (e) => { console.error('page error:', e.message); });
  await page.goto(base + '/login');
  await page.fill('#token', token);
  await Promise.all([page.waitForURL(base + '/'), page.click('button[type=submit]')]);
  return page;
}

async function triggerFromUi(page, vars) {
  await page.goto(base + '/pipelines/ui');
  await page.fill('#variables', vars);
  await Promise.all([page.waitForURL(/\/runs\/[0-9a-f-]+$/), page.click('#run-pipeline')]);
  const runId = page.url().split('/').pop();
  const run = await until('the run has its job', async () => {
    const r = await api('/api/v1/runs/' + runId);
    return r.jobs.length ? r : null;
  });
  return { runId, jobId: run.jobs[0].id };
}

async function lineTexts(page) {
  return page.$$eval('#log .line .lt', (ls) => ls.map((l) => l.textContent));
}

before(async () => {
  admin = execFileSync(bin('outpost-server'), ['token', 'create', '--name', 'ui-admin', '--scope', 'admin'], { env }).toString().trim();
  reader = execFileSync(bin('outpost-server'), ['token', 'create', '--name', 'ui-reader', '--scope', 'read'], { env }).toString().trim();
  const reg = execFileSync(bin('outpost-server'), ['registration-token', 'create', '--pool', 'p'], { env }).toString().trim();
  const s = await startServer('127.0.0.1:0');
  server = s.child;
  base = s.url;
  port = s.port;
  const cfg = join(tmp, 'runner');
  execFileSync(bin('outpost-runner'), ['register', '--server', base, '--token', reg, '--name', 'r', '--labels', 'local', '--config-dir', cfg], { env });
  runner = spawn(bin('outpost-runner'), ['run', '--config-dir', cfg], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  runner.stdout.on('data', (d) => log('runner:', String(d)));
  runner.stderr.on('data', (d) => log('runner:', String(d)));
  await api('/api/v1/pipelines/ui', { method: 'PUT', headers: { 'Content-Type': 'application/yaml' }, body: PIPELINE });
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'],
  });
});

after(async () => {
  if (browser) await browser.close();
  await stop(runner);
  await stop(server);
  rmSync(tmp, { recursive: true, force: true });
});

test('sign in: a read token sees no Run button and the server refuses it', async () => {
  const page = await newPage(reader);
  await page.screenshot({ path: join(artifacts, 'runs-reader.png'), fullPage: true });
  await page.goto(base + '/pipelines/ui');
  assert.equal(await page.locator('#run-pipeline').count(), 0);
  const status = await page.evaluate(async () => {
    const csrf = document.querySelector('meta[name=csrf-token]').content;
    const r = await fetch('/api/v1/pipelines/ui/runs', { method: 'POST', headers: { 'X-CSRF-Token': csrf } });
    return r.status;
  });
  assert.equal(status, 403);
  await page.context().close();

  const anon = await browser.newPage();
  await anon.goto(base + '/runners');
  assert.match(anon.url(), /\/login\?next=%2Frunners$/);
  await anon.screenshot({ path: join(artifacts, 'login.png') });
  await anon.close();
});

test('trigger from the UI, watch the live log, ANSI, escaping, #L links', async () => {
  const page = await newPage(admin);
  const gate = join(tmp, 'gate-1');
  const { runId, jobId } = await triggerFromUi(page, `GATE=${gate}\nCOUNT=5`);
  await page.screenshot({ path: join(artifacts, 'run.png'), fullPage: true });

  await page.goto(base + '/jobs/' + jobId);
  await page.waitForSelector('#log .line .lt >> text="waiting for the gate"', { timeout: 30000 });
  const job = await api('/api/v1/jobs/' + jobId);
  assert.equal(job.status, 'running', 'the line appeared while the step was still running');

  const red = page.locator('#log span.fg-red');
  assert.equal(await red.first().textContent(), 'red text');
  assert.equal(await page.locator('#log span.b').first().textContent(), 'bold text');
  // Colours without a class come inline (CSSOM, which the CSP allows); other escapes vanish.
  const rgb = page.locator('#log .lt span').filter({ hasText: /^truecolour$/ });
  assert.deepEqual(await rgb.evaluate((e) => [e.style.color, e.style.backgroundColor]), ['rgb(255, 128, 0)', 'rgb(0, 0, 95)']);
  assert.equal(await page.locator('#log span.fg-bright-red').textContent(), 'palette');
  const lines = await lineTexts(page);
  assert.ok(lines.includes('<script>window.__pwned = 1</script>'), JSON.stringify(lines));
  assert.ok(lines.includes('truecolour on palette'), JSON.stringify(lines));
  assert.equal(await page.evaluate(() => window.__pwned), undefined);
  assert.equal(await page.locator('#log script').count(), 0);

  // Release the gate and measure from the runner's write to the line in the page.
  writeFileSync(gate, '');
  await page.waitForFunction(() => [...document.querySelectorAll('#log .lt')].some((l) => l.textContent.startsWith('stamp ')), null, { polling: 'raf', timeout: 30000 });
  const seen = Date.now();
  const stampLine = (await lineTexts(page)).find((l) => l.startsWith('stamp '));
  const delay = seen - Number(stampLine.split(' ')[1]);
  console.log(`# runner write to browser line: ${delay} ms`);
  writeFileSync(join(artifacts, 'latency.txt'), `${delay} ms\n`);

  await page.waitForSelector('#log[data-ended="succeeded"]', { timeout: 30000 });
  await page.waitForSelector('#job-status [data-status="succeeded"]');
  const all = await lineTexts(page);
  log('log lines:', JSON.stringify(all));
  assert.deepEqual(all.filter((l) => l.startsWith('n ')), ['n 1', 'n 2', 'n 3', 'n 4', 'n 5']);
  // One section per step, each line in its step, succeeded steps collapsed.
  const sectionOf = (text) => page.evaluate((t) => {
    const line = [...document.querySelectorAll('#log .lt')].find((l) => l.textContent === t);
    const d = line && line.closest('details');
    return d ? { name: d.querySelector('.step-name').textContent, open: d.open } : null;
  }, text);
  assert.deepEqual(await sectionOf('red text and bold text'), { name: 'Colours', open: false });
  assert.deepEqual(await sectionOf('n 3'), { name: 'Wait for the gate', open: false });
  await page.screenshot({ path: join(artifacts, 'job.png'), fullPage: true });

  // Run page status updated live to the final status.
  await page.goto(base + '/runs/' + runId);
  await page.waitForSelector('#run-status [data-status="succeeded"]');

  // A #L link scrolls to and highlights that line (numbered from 1 over the whole log).
  const n = all.indexOf('<script>window.__pwned = 1</script>') + 1;
  assert.ok(n > 0);
  await page.goto(base + '/jobs/' + jobId + '#L' + n);
  const target = page.locator('#L' + n);
  await target.waitFor();
  await page.waitForSelector(`#L${n}.hl`);
  assert.equal(await page.locator(`#L${n} .lt`).textContent(), '<script>window.__pwned = 1</script>');
  const inView = await target.evaluate((e) => { const r = e.getBoundingClientRect(); return r.top >= 0 && r.bottom <= window.innerHeight; });
  assert.ok(inView, `line ${n} is scrolled into view`);
  assert.equal(await page.locator(`#L${n} a.ln`).getAttribute('href'), '#L' + n);
  assert.equal(await page.locator(`#L${n} a.ln`).textContent(), String(n));

  // Search finds the command and its output, and Enter moves to the next match.
  await page.fill('#log-search', 'FIRST line');
  assert.equal(await page.locator('#search-count').textContent(), '2 matches');
  await page.press('#log-search', 'Enter');
  await page.press('#log-search', 'Enter');
  assert.equal(await page.locator('#log .line.current .lt').textContent(), 'first line');

  for (const [name, path] of [['runs', '/'], ['pipeline', '/pipelines/ui'], ['pipelines', '/pipelines'], ['runners', '/runners'], ['webhooks', '/webhooks']]) {
    await page.goto(base + path);
    await page.screenshot({ path: join(artifacts, name + '.png'), fullPage: true });
  }
  await page.setViewportSize({ width: 380, height: 800 });
  await page.goto(base + '/jobs/' + jobId);
  await page.waitForSelector('#log[data-ended]');
  await page.screenshot({ path: join(artifacts, 'job-narrow.png'), fullPage: true });
  await page.context().close();
});

test('cancel a running job from the UI', async () => {
  const page = await newPage(admin);
  const { jobId } = await triggerFromUi(page, `GATE=${join(tmp, 'never')}\nCOUNT=1`);
  await page.goto(base + '/jobs/' + jobId);
  await page.waitForSelector('#log .line .lt >> text="waiting for the gate"', { timeout: 30000 });
  await Promise.all([page.waitForURL(base + '/jobs/' + jobId), page.click('#cancel-job')]);
  await page.waitForSelector('#job-status [data-status="cancelled"]', { timeout: 30000 });
  await page.waitForSelector('#log[data-ended="cancelled"]', { timeout: 30000 });
  assert.equal(await page.locator('#cancel-job').count(), 0);
  await until('the cancelled step is shown', async () => page.evaluate(() =>
    [...document.querySelectorAll('#log details.step')].some((d) => d.dataset.status === 'cancelled' && d.open)));
  assert.equal((await api('/api/v1/jobs/' + jobId)).status, 'cancelled');
  await page.screenshot({ path: join(artifacts, 'job-cancelled.png'), fullPage: true });
  await page.context().close();
});

test('a dropped stream (server restart) resumes with no duplicated or missing line', async () => {
  const page = await newPage(admin);
  const gate = join(tmp, 'gate-restart');
  const count = 60;
  const { jobId } = await triggerFromUi(page, `GATE=${gate}\nCOUNT=${count}`);
  await page.goto(base + '/jobs/' + jobId);
  await page.waitForSelector('#log .line .lt >> text="waiting for the gate"', { timeout: 30000 });
  writeFileSync(gate, '');
  await page.waitForSelector('#log .line .lt >> text="n 5"', { timeout: 30000 });

  await stop(server);
  const s = await startServer(`127.0.0.1:${port}`);
  server = s.child;

  await page.waitForSelector('#log[data-ended="succeeded"]', { timeout: 60000 });
  const ns = (await lineTexts(page)).filter((l) => l.startsWith('n '));
  assert.deepEqual(ns, Array.from({ length: count }, (_, i) => `n ${i + 1}`));
  const lines = await lineTexts(page);
  assert.equal(lines.filter((l) => l === 'all done').length, 1);
  assert.equal(lines.filter((l) => l === 'first line').length, 1);
  await page.context().close();
});

test('a large log opens at its tail and loads earlier parts on demand', async () => {
  const total = 250000;
  await api('/api/v1/pipelines/big', {
    method: 'PUT',
    headers: { 'Content-Type': 'application/yaml' },
    body: `jobs:\n  big:\n    runs_on: [local]\n    steps:\n      - run: seq -f 'big %g' 1 ${total}\n`,
  });
  const run = await api('/api/v1/pipelines/big/runs', { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: '{}' });
  const jobId = run.jobs[0].id;
  const job = await until('the big job ends', async () => {
    const j = await api('/api/v1/jobs/' + jobId);
    return j.status === 'succeeded' ? j : null;
  }, 120000);
  assert.ok(job.log_size > 2 * 1024 * 1024, `log is ${job.log_size} bytes`);

  const page = await newPage(admin);
  const t0 = Date.now();
  await page.goto(base + '/jobs/' + jobId);
  await page.waitForSelector('#log[data-ended="succeeded"]', { timeout: 30000 });
  console.log(`# ${job.log_size} byte log: tail shown and stream ended after ${Date.now() - t0} ms`);
  assert.ok(await page.locator('#load-earlier').isVisible());
  // The succeeded step is collapsed; opened, following stops when the reader scrolls up.
  assert.equal(await page.locator('#log details.step').first().evaluate((d) => d.open), false);
  await page.click('#log details.step > summary');
  await page.evaluate(() => window.scrollTo(0, document.body.scrollHeight));
  assert.ok(await page.isChecked('#follow'));
  const y0 = await page.evaluate(() => window.scrollY);
  await page.evaluate(() => window.scrollBy(0, -2000));
  assert.ok((await page.evaluate(() => window.scrollY)) < y0, 'scrolled up ' + y0 + ' ' + JSON.stringify(await page.evaluate(() => [window.scrollY, document.body.scrollHeight, document.documentElement.scrollHeight, window.innerHeight, document.querySelector('#log details.step').open])));
  await until('follow stops', async () => !(await page.isChecked('#follow')));
  const shown = await page.locator('#log .line').count();
  assert.ok(shown < total / 2, `only the tail is rendered (${shown} lines)`);

  // Line numbers are absolute once the lines before the tail are counted.
  const last = page.locator('#log .line', { hasText: `big ${total}` }).last();
  await until('numbers', async () => (await last.getAttribute('id')) !== null);
  const lastId = await last.getAttribute('id');
  const lastText = await last.locator('.lt').textContent();
  assert.equal(lastText, `big ${total}`);
  const num = Number(lastId.slice(1));
  const ids = await page.$$eval('#log .line', (ls) => ls.map((l) => Number(l.id.slice(1))));
  assert.ok(ids.every((n, i) => n === ids[0] + i), 'consecutive line numbers');
  const first = await page.locator('#log .line').first().locator('.lt').textContent();
  const offsetInLog = num - total; // lines before `big 1`
  assert.equal(Number(/big (\d+)/.exec(first)[1]) + offsetInLog, ids[0]);

  // Load earlier until the start: the first line is L1 and no line is lost or doubled.
  while (await page.locator('#load-earlier').isVisible()) {
    const before = await page.locator('#log .line').count();
    await page.click('#load-earlier');
    await until('earlier lines', async () => (await page.locator('#log .line').count()) > before)
      .catch(async (e) => { throw new Error(e.message + ': ' + (await page.locator('#log-state').textContent()) + ' ' + before + ' ' + (await page.evaluate(() => window.outpostLog.start))); });
  }
  const bigs = await page.$$eval('#log .line .lt', (ls) => ls.map((l) => l.textContent).filter((t) => t.startsWith('big ')));
  assert.equal(bigs.length, total);
  assert.ok(bigs.every((t, i) => t === `big ${i + 1}`));
  assert.equal(await page.locator('#L1').count(), 1);
  assert.equal(Number((await last.getAttribute('id')).slice(1)), num, 'numbers unchanged after loading earlier');
  await page.context().close();
});
