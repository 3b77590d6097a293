// Outpost web UI script: live statuses and the job log viewer.
// Log text is only ever put into the page through textContent, never innerHTML.
'use strict';

(function () {
  const FINAL = ['succeeded', 'failed', 'cancelled', 'timed_out', 'lost', 'skipped'];
  const WINDOW = 256 * 1024;

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function setBadge(container, status) {
    if (!container) return;
    const b = el('span', 'status s-' + status, status);
    b.dataset.status = status;
    container.replaceChildren(b);
  }

  function fmtDuration(start, end) {
    if (!start) return '–';
    const s = Math.max(0, Math.round(((end ? Date.parse(end) : Date.now()) - Date.parse(start)) / 1000));
    if (s >= 3600) return Math.floor(s / 3600) + 'h ' + Math.floor((s % 3600) / 60) + 'm ' + (s % 60) + 's';
    if (s >= 60) return Math.floor(s / 60) + 'm ' + (s % 60) + 's';
    return s + 's';
  }

  async function getJson(url) {
    const r = await fetch(url, { credentials: 'same-origin', headers: { Accept: 'application/json' } });
    if (!r.ok) throw new Error(url + ': ' + r.status);
    return r.json();
  }

  function hideWhenFinal(status) {
    if (FINAL.includes(status)) {
      document.querySelectorAll('[data-hide-when-final]').forEach((f) => f.remove());
    }
  }

  // Runs list: refresh statuses and new runs every few seconds.
  function liveRuns(table) {
    const q = new URLSearchParams({ limit: '50' });
    if (table.dataset.pipeline) q.set('pipeline', table.dataset.pipeline);
    if (table.dataset.status) q.set('status', table.dataset.status);
    async function tick() {
      try {
        const list = await getJson('/api/v1/runs?' + q);
        const body = table.tBodies[0];
        const rows = list.runs.map((r) => {
          const tr = el('tr');
          tr.dataset.runId = r.id;
          const a = el('a', null, r.pipeline + ' #' + r.number);
          a.href = '/runs/' + r.id;
          const c0 = el('td'); c0.append(a);
          const c1 = el('td'); setBadge(c1, r.status);
          const t = r.trigger || {};
          const c2 = el('td', null, t.kind + (t.actor ? ' by ' + t.actor : ''));
          const c3 = el('td', null, t.ref || '');
          const c4 = el('td', null, new Date(r.created_at).toISOString().replace('T', ' ').slice(0, 19) + ' UTC');
          const c5 = el('td', null, fmtDuration(r.started_at, r.finished_at));
          tr.append(c0, c1, c2, c3, c4, c5);
          return tr;
        });
        body.replaceChildren(...rows);
      } catch (e) { /* keep the last view; try again on the next tick */ }
      setTimeout(tick, 2000);
    }
    setTimeout(tick, 2000);
  }

  // Run page: job statuses and the run status.
  function liveRun(span) {
    const id = span.dataset.liveRun;
    async function tick() {
      let done = false;
      try {
        const run = await getJson('/api/v1/runs/' + id);
        setBadge(span, run.status);
        for (const j of run.jobs) {
          const tr = document.querySelector('tr[data-job-id="' + j.id + '"]');
          if (!tr) continue;
          setBadge(tr.querySelector('.jstatus'), j.status);
          tr.querySelector('.jdur').textContent = fmtDuration(j.started_at, j.finished_at);
        }
        hideWhenFinal(run.status);
        done = FINAL.includes(run.status);
      } catch (e) { /* try again */ }
      if (!done) setTimeout(tick, 1500);
    }
    setTimeout(tick, 1000);
  }

  // ---- Rendered log text ---------------------------------------------------
  // The server renders ANSI escapes (server/src/ansi.rs) into spans of text with the classes of
  // app.css, and colours that have no class as CSS values; the page only places them.

  function appendSpan(target, sp) {
    if (!sp.class && !sp.fg && !sp.bg) { target.append(document.createTextNode(sp.text)); return; }
    const e = el('span', sp.class || null, sp.text);
    if (sp.fg) e.style.color = sp.fg;
    if (sp.bg) e.style.backgroundColor = sp.bg;
    target.append(e);
  }

  // Cuts spans into lines: the server keeps every newline of the text, and only newlines, so the
  // spans have as many lines as the text.
  function spanLines(spans) {
    const lines = [[]];
    for (const sp of spans) {
      sp.text.split('\n').forEach((t, k) => {
        if (k > 0) lines.push([]);
        if (t) lines[lines.length - 1].push({ text: t, class: sp.class, fg: sp.fg, bg: sp.bg });
      });
    }
    return lines;
  }

  // ---- Log viewer ------------------------------------------------------------

  function LogView(root) {
    this.root = root;
    this.jobId = root.dataset.jobId;
    this.enc = new TextEncoder();
    this.lines = []; // {el, text, offset}
    this.open = null; // the line still being written
    this.offset = 0; // byte offset after the last byte rendered
    this.start = 0; // byte offset of the first rendered line
    this.base = null; // line number of the first rendered line, once known
    this.sections = []; // {step, el, body}
    this.steps = [];
    this.status = null;
    this.follow = document.getElementById('follow');
    this.stateEl = document.getElementById('log-state');
    this.hashDone = false;
  }

  LogView.prototype.sectionFor = function (offset) {
    let chosen = this.pre;
    for (const s of this.sections) {
      if (s.step.log_start != null && s.step.log_start <= offset) chosen = s;
    }
    return chosen;
  };

  LogView.prototype.renderSteps = function (steps) {
    this.steps = steps;
    const bounds = steps.map((s) => s.log_start).join(',');
    for (const step of steps) {
      let s = this.sections.find((x) => x.step.index === step.index);
      if (!s) {
        const d = el('details', 'step');
        const sum = el('summary');
        const body = el('div', 'lines');
        d.append(sum, body);
        d.open = true;
        this.root.append(d);
        s = { step, el: d, body, sum, auto: true };
        // Once the reader opens or closes a step, it stays as they left it.
        sum.addEventListener('click', () => { s.auto = false; });
        this.sections.push(s);
      }
      s.step = step;
      s.el.dataset.status = step.status;
      const name = el('span', 'step-name', step.name);
      const st = el('span', 'status s-' + step.status, step.status);
      const dur = el('span', 'step-dur', fmtDuration(step.started_at, step.finished_at));
      s.sum.replaceChildren(name, st, dur);
      if (s.auto) {
        s.el.open = step.status !== 'succeeded' && step.status !== 'skipped';
      }
    }
    // Lines that arrived before their step was reported move to their step, in order.
    if (bounds !== this.bounds) {
      this.bounds = bounds;
      for (const line of this.lines) {
        const body = this.sectionFor(line.offset).body;
        if (line.el.parentNode !== body || line.el !== body.lastChild) body.append(line.el);
      }
    }
  };

  LogView.prototype.numberLine = function (line, n) {
    line.num = n;
    line.el.id = 'L' + n;
    const a = line.el.firstChild;
    a.textContent = String(n);
    a.href = '#L' + n;
  };

  LogView.prototype.makeLine = function (offset) {
    const div = el('div', 'line');
    const a = el('a', 'ln');
    a.setAttribute('aria-hidden', 'true');
    a.tabIndex = -1;
    const txt = el('span', 'lt');
    div.append(a, txt);
    const line = { el: div, txt, text: '', offset };
    return line;
  };

  // Appends decoded text that starts at byte `offset`, shown as the server rendered it (`spans`).
  LogView.prototype.append = function (text, offset, spans) {
    const rendered = spanLines(spans);
    const parts = text.split('\n');
    let at = offset;
    for (let i = 0; i < parts.length; i++) {
      const part = parts[i];
      const last = i === parts.length - 1;
      if (last && part === '') break;
      if (!this.open) {
        const line = this.makeLine(at);
        this.open = line;
        this.sectionFor(at).body.append(line.el);
        this.lines.push(line);
        if (this.base != null) this.numberLine(line, this.base + this.lines.length - 1);
      }
      for (const sp of rendered[i] || []) {
        appendSpan(this.open.txt, sp);
        this.open.text += sp.text;
      }
      at += this.enc.encode(part).length;
      if (!last) { at += 1; this.open = null; }
    }
    this.offset = offset + this.enc.encode(text).length;
    if (this.follow && this.follow.checked) window.scrollTo(0, document.body.scrollHeight);
    this.applyHash();
  };

  LogView.prototype.applyHash = function () {
    if (this.hashDone) return;
    const m = /^#L(\d+)$/.exec(location.hash);
    if (!m) { this.hashDone = true; return; }
    const target = document.getElementById('L' + m[1]);
    if (!target) return;
    this.hashDone = true;
    if (this.follow) this.follow.checked = false;
    target.classList.add('hl');
    const d = target.closest('details');
    if (d) { d.open = true; const s = this.sections.find((x) => x.el === d); if (s) s.auto = false; }
    target.scrollIntoView({ block: 'center' });
  };

  // The offset of the first line that starts after byte `from` (or `end`, if none starts before it).
  LogView.prototype.lineStart = async function (from, end) {
    if (from <= 0) return 0;
    const r = await fetch('/api/v1/jobs/' + this.jobId + '/log', { credentials: 'same-origin', headers: { Range: 'bytes=' + from + '-' } });
    if (!r.ok && r.status !== 206) throw new Error('log: ' + r.status);
    const reader = r.body.getReader();
    let at = from;
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      const nl = value.indexOf(10);
      if (nl >= 0) { at += nl + 1; break; }
      at += value.length;
      if (at >= end) break;
    }
    reader.cancel().catch(() => {});
    return Math.min(at, end);
  };

  LogView.prototype.streamUrl = function (from) {
    return '/api/v1/jobs/' + this.jobId + '/log/stream?format=spans&offset=' + from;
  };

  // Renders bytes `[from, to)` of the log into `view`, from a stream that stops at `to`.
  LogView.prototype.renderRange = function (view, from, to) {
    return new Promise((resolve, reject) => {
      if (from >= to) { resolve(); return; }
      const es = new EventSource(this.streamUrl(from) + '&to=' + to);
      es.addEventListener('log', (ev) => {
        const d = JSON.parse(ev.data);
        view.append(d.text, d.offset, d.spans);
        if (Number(ev.lastEventId) >= to) { es.close(); resolve(); }
      });
      es.addEventListener('end', () => { es.close(); resolve(); });
      es.onerror = () => { es.close(); reject(new Error('the log could not be read')); };
    });
  };

  // Counts the lines before `end`, streaming, without keeping the text.
  LogView.prototype.countLines = async function (end) {
    const r = await fetch('/api/v1/jobs/' + this.jobId + '/log', { credentials: 'same-origin' });
    const reader = r.body.getReader();
    let n = 0;
    let seen = 0;
    while (seen < end) {
      const { done, value } = await reader.read();
      if (done) break;
      const lim = Math.min(value.length, end - seen);
      for (let i = 0; i < lim; i++) if (value[i] === 10) n++;
      seen += value.length;
    }
    reader.cancel().catch(() => {});
    return n;
  };

  LogView.prototype.setNumbers = function (base) {
    this.base = base;
    this.lines.forEach((l, i) => this.numberLine(l, base + i));
    this.applyHash();
  };

  LogView.prototype.loadEarlier = async function () {
    const btn = document.getElementById('load-earlier');
    if (this.start <= 0 || btn.disabled) return;
    btn.disabled = true;
    try {
      const from = Math.max(0, this.start - WINDOW);
      const start = await this.lineStart(from, this.start);
      // Render the earlier window into a detached viewer, then move its lines to the front.
      const tmp = new LogView(document.createElement('div'));
      tmp.pre = { body: document.createDocumentFragment() };
      tmp.sections = [];
      tmp.follow = null;
      tmp.hashDone = true;
      await this.renderRange(tmp, start, this.start);
      const firstBody = this.lines.length ? this.lines[0].el.parentNode : this.pre.body;
      firstBody.insertBefore(tmp.pre.body, firstBody.firstChild);
      this.lines = tmp.lines.concat(this.lines);
      this.start = start;
      if (start === 0) this.setNumbers(1);
      else if (this.base != null) this.setNumbers(this.base - tmp.lines.length);
      btn.hidden = start <= 0;
    } catch (e) {
      this.stateEl.textContent = 'Could not load earlier output: ' + e.message;
    } finally {
      btn.disabled = false;
    }
  };

  LogView.prototype.stream = function () {
    const self = this;
    let es = null;
    let retry = 500;
    function connect() {
      es = new EventSource(self.streamUrl(self.offset));
      self.stateEl.textContent = 'Live';
      es.addEventListener('log', (ev) => {
        retry = 500;
        const d = JSON.parse(ev.data);
        if (d.offset < self.offset) return; // Already shown (a replayed event).
        self.append(d.text, d.offset, d.spans);
        self.root.dataset.offset = String(self.offset);
      });
      es.addEventListener('end', (ev) => {
        const d = JSON.parse(ev.data);
        es.close();
        self.ended = true;
        self.root.dataset.ended = d.status;
        self.stateEl.textContent = 'Finished: ' + d.status + (d.exit_code != null ? ' (exit code ' + d.exit_code + ')' : '');
        self.refresh();
      });
      es.onerror = () => {
        if (self.ended) return;
        self.stateEl.textContent = 'Reconnecting…';
        // Reconnect ourselves from the last byte shown, whatever the browser would do.
        es.close();
        setTimeout(connect, retry);
        retry = Math.min(retry * 2, 10000);
      };
    }
    connect();
  };

  LogView.prototype.refresh = async function () {
    try {
      const job = await getJson('/api/v1/jobs/' + this.jobId);
      this.status = job.status;
      setBadge(document.getElementById('job-status'), job.status);
      this.renderSteps(job.steps || []);
      hideWhenFinal(job.status);
      return job;
    } catch (e) {
      return null;
    }
  };

  LogView.prototype.search = function () {
    const input = document.getElementById('log-search');
    const count = document.getElementById('search-count');
    const next = document.getElementById('search-next');
    let hits = [];
    let at = -1;
    const run = () => {
      this.lines.forEach((l) => l.el.classList.remove('match', 'current'));
      const q = input.value.toLowerCase();
      hits = q ? this.lines.filter((l) => l.text.toLowerCase().includes(q)) : [];
      hits.forEach((l) => l.el.classList.add('match'));
      at = -1;
      count.textContent = q ? hits.length + ' matches' : '';
    };
    const go = () => {
      if (!hits.length) return;
      if (at >= 0) hits[at].el.classList.remove('current');
      at = (at + 1) % hits.length;
      const t = hits[at].el;
      t.classList.add('current');
      const d = t.closest('details');
      if (d) d.open = true;
      if (this.follow) this.follow.checked = false;
      t.scrollIntoView({ block: 'center' });
    };
    input.addEventListener('input', run);
    input.addEventListener('keydown', (e) => { if (e.key === 'Enter') { e.preventDefault(); go(); } });
    next.addEventListener('click', go);
  };

  LogView.prototype.init = async function () {
    this.pre = { body: el('div', 'lines pre-steps') };
    this.root.append(this.pre.body);
    const job = await this.refresh();
    const size = job ? job.log_size : parseInt(this.root.dataset.logSize || '0', 10);
    const from = size > WINDOW ? size - WINDOW : 0;
    // The stream renders the log from the first whole line of its last window on.
    const start = await this.lineStart(from, size);
    this.start = start;
    this.base = start === 0 ? 1 : null;
    this.offset = start;
    const btn = document.getElementById('load-earlier');
    if (start > 0) {
      btn.hidden = false;
      btn.addEventListener('click', () => this.loadEarlier());
      this.countLines(start).then((n) => { if (this.base == null) this.setNumbers(n + 1); });
    }
    this.search();
    // Stop following when the reader scrolls up; follow again at the bottom.
    let lastY = window.scrollY;
    window.addEventListener('scroll', () => {
      const atBottom = window.innerHeight + window.scrollY >= document.body.scrollHeight - 4;
      if (window.scrollY < lastY && !atBottom && this.follow) this.follow.checked = false;
      lastY = window.scrollY;
    }, { passive: true });
    window.addEventListener('hashchange', () => {
      document.querySelectorAll('.line.hl').forEach((l) => l.classList.remove('hl'));
      this.hashDone = false;
      this.applyHash();
    });
    this.stream();
    const poll = async () => {
      const j = await this.refresh();
      if (!j || !FINAL.includes(j.status) || !this.ended) setTimeout(poll, 2000);
    };
    setTimeout(poll, 2000);
  };

  document.addEventListener('DOMContentLoaded', () => {
    const runs = document.querySelector('table[data-live-runs]');
    if (runs) liveRuns(runs);
    const run = document.querySelector('[data-live-run]');
    if (run) liveRun(run);
    const log = document.getElementById('log');
    if (log) {
      const v = new LogView(log);
      window.outpostLog = v;
      v.init().catch((e) => { document.getElementById('log-state').textContent = 'Could not load the log: ' + e.message; });
    }
  });
})();
