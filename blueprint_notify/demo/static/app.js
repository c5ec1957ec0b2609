// blueprint_notify live demo. Plain JavaScript, no build step, nothing
// loaded from elsewhere.
//
// Each job card owns an EventSource on /v1/jobs/{id}/events?token=... (an
// EventSource cannot send an Authorization header). The job's log keeps the
// ids of the events received, in order, in its data-ids attribute: the
// browser test checks them for gaps and duplicates after a dropped stream.
//
// A second EventSource, /api/feed, carries what the built-in webhook
// receiver got, the dead letters and the notifier's counters.
//
// window.demo: startJob(options) -> job id, dropStream(jobId),
// setFailing(bool), ids(jobId).
'use strict';

(() => {
  const STATUSES = ['queued', 'processing', 'completed', 'failed', 'cancelled'];
  const TERMINAL = new Set(['completed', 'failed', 'cancelled']);
  const MAX_ROWS = 150;
  const MAX_CARDS = 24;

  const jobs = new Map(); // job id -> job state
  const $ = (sel, root = document) => root.querySelector(sel);

  function h(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (value === undefined || value === null) continue;
      if (key === 'class') node.className = value;
      else if (key === 'text') node.textContent = value;
      else if (key.startsWith('data-')) node.setAttribute(key, value);
      else node[key] = value;
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  function clock(unixSeconds, millis = true) {
    const d = new Date(unixSeconds * 1000);
    const pad = (n, w = 2) => String(n).padStart(w, '0');
    const hms = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
    return millis ? `${hms}.${pad(d.getMilliseconds(), 3)}` : hms;
  }

  function describe(status, progress) {
    if (status === 'processing' && progress !== undefined && progress !== null) return `processing ${progress} %`;
    if (status === 'failed' && progress !== undefined && progress !== null) return `failed at ${progress} %`;
    return status || '?';
  }

  async function api(method, path, body) {
    const init = { method, headers: {} };
    if (body !== undefined) {
      init.headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    const data = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(data.error || `${response.status} ${response.statusText}`);
    return data;
  }

  function toast(message) {
    const node = h('div', { class: 'toast', text: message });
    document.body.append(node);
    setTimeout(() => node.remove(), 4000);
  }

  // -- job cards -------------------------------------------------------------------
  function addCard(jobId, token) {
    $('#jobs-empty')?.remove();
    const badge = h('span', { class: 'badge', 'data-status': 'registered', text: 'registered' });
    const fill = h('div', { class: 'fill' });
    const bar = h('div', { class: 'bar', role: 'progressbar', 'data-progress': '0' }, fill);
    bar.setAttribute('aria-valuemin', '0');
    bar.setAttribute('aria-valuemax', '100');
    bar.setAttribute('aria-valuenow', '0');
    const pct = h('span', { class: 'pct', text: '0 %' });
    const conn = h('span', { class: 'conn', 'data-state': 'connecting' }, h('span', { class: 'dot' }), h('span', { class: 'conn-label', text: 'connecting…' }));
    const hooks = h('span', { class: 'job-hooks', text: '' });
    const outcome = h('div', { class: 'outcome' });
    const log = h('ol', { class: 'log', 'data-ids': '' });
    const drop = h('button', { class: 'link drop', type: 'button', text: 'drop stream', title: 'the server ends this SSE stream; EventSource reconnects with Last-Event-ID' });
    const cancel = h('button', { class: 'link cancel', type: 'button', text: 'cancel' });
    const card = h(
      'article',
      { class: 'job', 'data-job': jobId, 'data-status': 'registered' },
      h('div', { class: 'job-head' }, h('span', { class: 'job-id', text: jobId, title: jobId }), badge),
      bar,
      h('div', { class: 'job-meta' }, pct, conn, hooks),
      outcome,
      log,
      h('div', { class: 'job-actions' }, drop, cancel),
    );
    const job = {
      id: jobId, token, card, badge, bar, fill, pct, conn, hooks, outcome, log, drop, cancel,
      es: null, ids: [], lastId: null, done: false, dropped: false, delivered: 0, dead: 0,
    };
    drop.addEventListener('click', () => dropStream(jobId).catch((e) => toast(e.message)));
    cancel.addEventListener('click', () => api('POST', `/api/jobs/${encodeURIComponent(jobId)}/cancel`).catch((e) => toast(e.message)));
    $('#jobs').prepend(card);
    jobs.set(jobId, job);
    // Keep the page light: forget the oldest finished cards.
    const finished = [...jobs.values()].filter((j) => j.done);
    while (jobs.size > MAX_CARDS && finished.length) {
      const old = finished.shift();
      old.card.remove();
      jobs.delete(old.id);
    }
    return job;
  }

  function setConn(job, state, label) {
    job.conn.dataset.state = state;
    job.conn.querySelector('.conn-label').textContent = label;
  }

  function logLine(job, id, text, kind) {
    const item = h('li', { class: kind || 'event' });
    if (id !== null) item.append(h('span', { class: 'eid', text: `#${id}` }));
    item.append(h('span', { class: 'what', text }));
    job.log.append(item);
    job.log.scrollTop = job.log.scrollHeight;
  }

  function connect(job) {
    const url = `/v1/jobs/${encodeURIComponent(job.id)}/events?token=${encodeURIComponent(job.token)}`;
    const es = new EventSource(url);
    job.es = es;
    for (const status of STATUSES) es.addEventListener(status, (e) => onJobEvent(job, status, e));
    es.addEventListener('open', () => {
      if (job.reconnecting) logLine(job, null, 'reconnected', 'info');
      job.reconnecting = false;
      setConn(job, 'live', 'streaming');
    });
    es.addEventListener('error', (e) => {
      if (e.data) {
        // A frame named "error" from the server: the client fell behind.
        let info = {};
        try { info = JSON.parse(e.data); } catch (_) { /* not JSON */ }
        logLine(job, null, `lagged: ${info.skipped ?? '?'} event(s) skipped`, 'warn');
        return;
      }
      if (job.done) return;
      if (es.readyState === EventSource.CONNECTING) {
        // The stream ended early: the browser reconnects by itself after
        // the server's retry delay and sends Last-Event-ID.
        job.reconnecting = true;
        setConn(job, 'reconnecting', 'reconnecting…');
        logLine(job, null, `stream ended; reconnecting with Last-Event-ID: ${job.lastId ?? '(none)'}`, 'warn');
      } else {
        setConn(job, 'closed', 'stream closed');
      }
    });
  }

  function onJobEvent(job, status, e) {
    const id = Number(e.lastEventId);
    let event = {};
    try { event = JSON.parse(e.data); } catch (_) { /* keep going */ }
    job.ids.push(id);
    job.lastId = id;
    job.log.dataset.ids = job.ids.join(',');
    logLine(job, id, describe(status, event.progress));
    job.card.dataset.status = status;
    job.badge.dataset.status = status;
    job.badge.textContent = status;
    const progress = status === 'completed' ? 100 : event.progress;
    if (progress !== undefined && progress !== null) {
      job.fill.style.width = `${progress}%`;
      job.bar.dataset.progress = String(progress);
      job.bar.setAttribute('aria-valuenow', String(progress));
      job.pct.textContent = `${progress} %`;
    }
    if (TERMINAL.has(status)) {
      job.done = true;
      job.es.close();
      setConn(job, 'closed', 'done');
      job.drop.disabled = true;
      job.cancel.disabled = true;
      if (status === 'completed' && event.result) {
        const r = event.result;
        const facts = [];
        if (r.bytes) facts.push(`${(r.bytes / 1048576).toFixed(0)} MiB`);
        if (r.seconds !== undefined) facts.push(`${r.seconds} s`);
        job.outcome.append(h('code', { text: r.output || JSON.stringify(r) }), h('span', { class: 'muted', text: facts.join(' · ') }));
      } else if (event.error) {
        job.outcome.append(h('span', { class: 'error-text', text: event.error }));
      }
    }
  }

  async function startJob(options = {}) {
    const { job_id: jobId, token } = await api('POST', '/api/jobs', options);
    connect(addCard(jobId, token));
    refreshJobHooks();
    return jobId;
  }

  async function dropStream(jobId) {
    const job = jobs.get(jobId);
    const { dropped } = await api('POST', `/api/jobs/${encodeURIComponent(jobId)}/drop`);
    if (job) logLine(job, null, dropped ? 'server dropped the stream (demo)' : 'no open stream to drop', 'info');
    return dropped;
  }

  // -- the feed: webhooks, dead letters, counters ---------------------------------------
  const feed = { hooks: [], dead: [] };

  function hookRow(hook) {
    const retry = hook.attempt > 1;
    const sig = hook.verified
      ? h('span', { class: 'sig ok', title: hook.signature, text: hook.fresh ? '✓ verified' : '✓ verified (stale)' })
      : h('span', { class: 'sig bad', title: hook.signature, text: '✗ invalid' });
    return h(
      'tr',
      { class: hook.answer === 200 ? 'row-ok' : 'row-bad', 'data-seq': String(hook.seq), 'data-job': hook.job_id },
      h('td', { class: 'time', text: clock(hook.at) }),
      h('td', { class: 'job-cell', text: hook.job_id }),
      h('td', { text: describe(hook.status, hook.progress) }),
      h('td', { class: retry ? 'num retry' : 'num', text: retry ? `retry ${hook.attempt - 1}` : '1st' }),
      h('td', {}, sig),
      h('td', { class: 'num' }, h('span', { class: `code c${String(hook.answer)[0]}xx`, text: String(hook.answer) })),
    );
  }

  function deadRow(dead) {
    return h(
      'tr',
      { 'data-id': String(dead.id), 'data-job': dead.job_id },
      h('td', { class: 'time', text: clock(dead.failed_at, false) }),
      h('td', { class: 'job-cell', text: dead.job_id }, h('span', { class: 'sub', text: describe(dead.status, dead.progress) })),
      h('td', { class: 'num', text: String(dead.attempts) }),
      h('td', { class: 'error-text', text: dead.last_error }),
    );
  }

  function prependRow(tableSel, row, flash) {
    const body = $(`${tableSel} tbody`);
    if (flash) row.classList.add('new');
    body.prepend(row);
    while (body.rows.length > MAX_ROWS) body.deleteRow(-1);
    $(`${tableSel}-empty`).hidden = body.rows.length > 0;
  }

  function refreshJobHooks() {
    for (const job of jobs.values()) {
      job.delivered = feed.hooks.filter((x) => x.job_id === job.id && x.answer === 200).length;
      job.dead = feed.dead.filter((x) => x.job_id === job.id).length;
      renderJobHooks(job);
    }
  }

  function renderJobHooks(job) {
    job.hooks.textContent = '';
    if (job.delivered) job.hooks.append(h('span', { class: 'ok-text', text: `${job.delivered} webhook${job.delivered === 1 ? '' : 's'} ✓` }));
    if (job.dead) job.hooks.append(h('span', { class: 'error-text', text: ` · ${job.dead} dead` }));
  }

  function onHook(hook, flash = true) {
    feed.hooks.push(hook);
    if (feed.hooks.length > 1000) feed.hooks.shift();
    prependRow('#hooks', hookRow(hook), flash);
    const job = jobs.get(hook.job_id);
    if (job && hook.answer === 200) { job.delivered += 1; renderJobHooks(job); }
  }

  function onDead(dead, flash = true) {
    feed.dead.push(dead);
    prependRow('#dead', deadRow(dead), flash);
    const job = jobs.get(dead.job_id);
    if (job) { job.dead += 1; renderJobHooks(job); }
  }

  function onStats(stats) {
    $('#stat-delivered').textContent = stats.delivered ?? 0;
    $('#stat-failed').textContent = stats.failed_attempts ?? 0;
    $('#stat-pending').textContent = stats.pending ?? 0;
    $('#stat-dead').textContent = stats.dead_lettered ?? 0;
    $('#stat-streams').textContent = stats.sse_streams ?? 0;
    for (const [id, value] of [['#stat-pending', stats.pending], ['#stat-dead', stats.dead_lettered]]) {
      $(id).parentElement.classList.toggle('lit', Boolean(value));
    }
  }

  function onEndpoint(failing) {
    const box = $('#endpoint');
    box.dataset.failing = String(failing);
    const toggle = $('#endpoint-toggle');
    toggle.setAttribute('aria-checked', String(failing));
    toggle.setAttribute('aria-label', failing ? 'make the customer endpoint healthy' : 'make the customer endpoint fail');
    $('#endpoint-label').textContent = failing ? 'failing (500)' : 'healthy';
  }

  function onSnapshot(state) {
    feed.hooks = [];
    feed.dead = [];
    $('#hooks tbody').textContent = '';
    $('#dead tbody').textContent = '';
    for (const hook of state.hooks) onHook(hook, false);
    for (const dead of state.dead_letters) onDead(dead, false);
    $('#hooks-empty').hidden = state.hooks.length > 0;
    $('#dead-empty').hidden = state.dead_letters.length > 0;
    refreshJobHooks();
    onStats(state.stats);
    onEndpoint(state.failing);
  }

  function onResume(resume) {
    const job = jobs.get(resume.job_id);
    if (job) logLine(job, null, `server resumed after #${resume.last_event_id} (${resume.via})`, 'info');
  }

  function connectFeed() {
    const es = new EventSource('/api/feed');
    const state = $('#feed-state');
    const set = (value, label) => { state.dataset.state = value; $('.label', state).textContent = label; };
    const on = (name, fn) => es.addEventListener(name, (e) => fn(JSON.parse(e.data)));
    on('snapshot', onSnapshot);
    on('hook', (x) => onHook(x));
    on('dead_letter', (x) => onDead(x));
    on('stats', onStats);
    on('endpoint', (x) => onEndpoint(x.failing));
    on('resume', onResume);
    es.addEventListener('open', () => set('live', 'live'));
    es.addEventListener('error', () => set(es.readyState === EventSource.CLOSED ? 'down' : 'connecting', es.readyState === EventSource.CLOSED ? 'disconnected' : 'reconnecting…'));
  }

  async function setFailing(failing) {
    const { failing: now } = await api('POST', '/api/endpoint', { failing });
    onEndpoint(now);
    return now;
  }

  // -- wiring ----------------------------------------------------------------------------
  function guard(fn) {
    return (e) => {
      const button = e.currentTarget;
      button.disabled = true;
      Promise.resolve(fn()).catch((err) => toast(err.message)).finally(() => { button.disabled = false; });
    };
  }

  document.addEventListener('DOMContentLoaded', () => {
    $('#start-job').addEventListener('click', guard(() => startJob()));
    $('#start-three').addEventListener('click', guard(() => Promise.all([startJob(), startJob(), startJob()])));
    $('#start-crash').addEventListener('click', guard(() => startJob({ crash: true })));
    $('#endpoint-toggle').addEventListener('click', guard(() => setFailing($('#endpoint').dataset.failing !== 'true')));
    connectFeed();
  });

  window.demo = {
    startJob,
    dropStream,
    setFailing,
    ids: (jobId) => (jobs.get(jobId)?.ids ?? []).slice(),
    jobs,
  };
})();
