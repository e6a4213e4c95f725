// berth dashboard: plain JavaScript, no build step. Text from the server is only ever written
// with textContent/append (never parsed as markup), and the page's CSP runs only its own files.
'use strict';

const KEY = 'berth.adminKey';
const GIB = 2 ** 30;
const MAX_EVENTS = 200;
// A silent stream is dead: the gateway sends a keep-alive every 15 s.
const SILENCE_MS = 45000;

const $ = (id) => document.getElementById(id);
/** Instance id -> { the fields shown, eventAt, touched, tr, cells, stop }. */
const rows = new Map();
let key = sessionStorage.getItem(KEY);
let stream = null; // the AbortController of the events request in flight
let session = 0; // bumped when the key changes: an older stream loop then ends
let refreshTimer = 0;
let refreshes = 0;

class Unauthorized extends Error {}

function el(tag, className, ...children) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  e.append(...children); // strings become text nodes
  return e;
}

const gib = (bytes) => `${(bytes / GIB).toFixed(1)} GiB`;

function setConn(state, text) {
  const c = $('conn');
  c.dataset.state = state;
  c.textContent = text;
}

function notice(text) {
  $('notice').textContent = text;
  $('notice').hidden = !text;
}

/** No header when there is no key: a gateway run with --no-auth. */
const auth = () => (key ? { Authorization: `Bearer ${key}` } : {});

async function api(method, path, body) {
  const headers = auth();
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const r = await fetch(path, {
    method, headers, cache: 'no-store',
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (r.status === 401) throw new Unauthorized('unauthorized');
  const data = await r.json().catch(() => null);
  if (!r.ok) throw new Error(data?.error?.message || `${method} ${path}: HTTP ${r.status}`);
  return data;
}

function failed(e) {
  if (e instanceof Unauthorized) askKey('The key is no longer accepted. Enter an admin key.');
  else notice(e.message);
}

// --- the key ------------------------------------------------------------------------------

function askKey(message) {
  key = null;
  session += 1;
  sessionStorage.removeItem(KEY);
  const s = stream;
  stream = null;
  s?.abort();
  clearTimeout(refreshTimer);
  refreshTimer = 0;
  rows.clear();
  $('instance-rows').replaceChildren();
  $('events').replaceChildren();
  $('app').hidden = true;
  $('forget').hidden = true;
  $('login').hidden = false;
  $('key-error').textContent = message;
  $('key-error').hidden = !message;
  setConn('offline', 'not connected');
  $('key').value = '';
  $('key').focus();
}

$('key-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const candidate = $('key').value.trim();
  key = candidate;
  try {
    await api('GET', '/api/v1/workers');
  } catch (err) {
    askKey(err instanceof Unauthorized
      ? 'That key was refused: the dashboard needs a live admin key.'
      : `Cannot reach the gateway: ${err.message}`);
    return;
  }
  sessionStorage.setItem(KEY, candidate);
  open();
});

$('forget').addEventListener('click', () => askKey(''));

function open() {
  $('login').hidden = true;
  $('app').hidden = false;
  $('forget').hidden = !key;
  session += 1;
  follow(session);
}

// --- the event stream -----------------------------------------------------------------------

/** Reads GET /api/v1/events with fetch (EventSource cannot send the key), reconnecting. */
async function follow(mine) {
  let delay = 500;
  setConn('connecting', 'connecting…');
  while (key !== null && mine === session) {
    const ctl = new AbortController();
    stream = ctl;
    let watchdog = 0;
    const arm = () => {
      clearTimeout(watchdog);
      watchdog = setTimeout(() => ctl.abort(), SILENCE_MS);
    };
    try {
      arm(); // also bounds the wait for the answer
      const r = await fetch('/api/v1/events', {
        headers: auth(), signal: ctl.signal, cache: 'no-store',
      });
      if (r.status === 401) throw new Unauthorized('unauthorized');
      if (!r.ok || !r.body) throw new Error(`the event stream answered HTTP ${r.status}`);
      setConn('live', 'live');
      // Subscribed from here on: the lists cover whatever happened before (or while away).
      refresh();
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        arm();
        delay = 500;
        buf = (buf + value).replace(/\r\n/g, '\n');
        let end;
        while ((end = buf.indexOf('\n\n')) >= 0) {
          sseBlock(buf.slice(0, end));
          buf = buf.slice(end + 2);
        }
      }
      throw new Error('the event stream ended');
    } catch (e) {
      if (mine !== session) return; // the key was dropped: stopped on purpose
      if (e instanceof Unauthorized) return failed(e);
      const why = ctl.signal.aborted ? 'no keep-alive' : e.message;
      setConn('reconnecting', `reconnecting (${why}; next try in ${delay / 1000} s)`);
      await new Promise((ok) => setTimeout(ok, delay));
      delay = Math.min(delay * 2, 15000);
    } finally {
      clearTimeout(watchdog);
    }
  }
}

/** One server-sent event: `event:` and `data:` lines (comments start with ':'). */
function sseBlock(text) {
  let name = 'message';
  const data = [];
  for (const line of text.split('\n')) {
    if (line.startsWith(':')) continue;
    const i = line.indexOf(':');
    const field = i < 0 ? line : line.slice(0, i);
    const value = i < 0 ? '' : line.slice(i + 1).replace(/^ /, '');
    if (field === 'event') name = value;
    else if (field === 'data') data.push(value);
  }
  if (name !== 'instance' || data.length === 0) return;
  let ev;
  try {
    ev = JSON.parse(data.join('\n'));
  } catch {
    return;
  }
  applyEvent(ev);
  logEvent(ev);
  refreshSoon();
}

// --- the lists ----------------------------------------------------------------------------

/** At most one refresh per 250 ms however many events arrive (GPU memory follows placements). */
function refreshSoon() {
  if (refreshTimer) return;
  refreshTimer = setTimeout(() => {
    refreshTimer = 0;
    refresh();
  }, 250);
}

async function refresh() {
  if (key === null) return;
  const n = ++refreshes;
  const mine = session;
  const started = performance.now();
  try {
    const [workers, instances] = await Promise.all([
      api('GET', '/api/v1/workers'), api('GET', '/api/v1/instances'),
    ]);
    if (n !== refreshes || mine !== session) return; // a newer refresh answers, or a new key
    renderWorkers(workers);
    syncInstances(instances, started);
    notice('');
  } catch (e) {
    if (mine === session) failed(e);
  }
}

function renderWorkers(workers) {
  $('workers').replaceChildren(...workers.map(workerCard));
  $('no-workers').hidden = workers.length > 0;
}

function workerCard(w) {
  const card = el('article', 'worker');
  card.dataset.worker = w.id;
  const status = el('span', w.schedulable ? 'ok' : 'warn',
    w.schedulable ? 'schedulable' : 'silent: nothing new is placed on it');
  status.title = `last heartbeat ${new Date(w.last_heartbeat).toLocaleString()}`;
  const labels = Object.entries(w.labels).map(([k, v]) => `${k}=${v}`).join(' ');
  card.append(el('h3', '', w.id, ' ', status));
  if (labels) card.append(el('p', 'labels', labels));
  card.append(...w.gpus.map((g) => gpuView(w.id, g)));
  return card;
}

function gpuView(worker, g) {
  const parts = [
    ['sys', 'system', g.system_reserved_bytes],
    ['berth', 'berth', g.reserved_bytes],
    ['outside', 'outside berth', g.used_outside_bytes],
    ['free', 'free', Math.max(g.free_bytes, 0)],
  ];
  const summary = parts.map(([, label, b]) => `${label} ${gib(b)}`).join(' · ');
  const bar = el('div', 'bar');
  bar.setAttribute('role', 'img');
  bar.setAttribute('aria-label', `${summary}, of ${gib(g.total_bytes)}`);
  for (const [cls, label, bytes] of parts) {
    const seg = el('span', `seg ${cls}`);
    seg.style.width = `${(100 * bytes) / Math.max(g.total_bytes, 1)}%`;
    seg.title = `${label}: ${gib(bytes)}`;
    seg.dataset.bytes = bytes;
    bar.append(seg);
  }
  const over = g.free_bytes < 0 ? ` (outside use is ${gib(-g.free_bytes)} past what was left)` : '';
  const view = el('div', 'gpu',
    el('div', 'gpu-name', `GPU ${g.idx} · ${g.name} · ${gib(g.total_bytes)}`),
    bar, el('div', 'gpu-numbers', summary + over));
  view.dataset.gpu = `${worker}:${g.idx}`;
  view.title = g.uuid;
  return view;
}

const placementText = (placement) =>
  placement.map((a) => `${a.worker_id}:${a.gpu} (${gib(a.bytes)})`).join(', ');

/**
 * The list is the truth, except for rows an event changed while it was being read: the list
 * may predate that event, and the refresh the event asked for follows.
 */
function syncInstances(list, started) {
  const listed = new Set();
  for (const i of list) {
    listed.add(i.id);
    const patch = { model: i.model, gpus: placementText(i.placement) };
    const cur = rows.get(i.id);
    if (!cur || cur.touched < started) {
      Object.assign(patch, {
        state: i.state, worker: i.worker_id, endpoint: i.endpoint,
        reason: i.reason, restarts: i.restarts,
      });
    }
    upsert(i.id, patch);
  }
  for (const [id, r] of rows) {
    if (!listed.has(id) && r.touched < started) {
      r.tr.remove();
      rows.delete(id);
    }
  }
  $('no-instances').hidden = rows.size > 0;
}

function applyEvent(ev) {
  const cur = rows.get(ev.instance_id);
  // Events of one instance are stamped in commit order: an older one is a late copy.
  if (cur && ev.at_ms < cur.eventAt) return;
  const patch = {
    state: ev.state, worker: ev.worker_id ?? null, endpoint: ev.endpoint ?? null,
    reason: ev.reason ?? null, restarts: ev.restarts ?? 0, eventAt: ev.at_ms,
    touched: performance.now(),
  };
  if (ev.gpus?.length) patch.gpus = ev.gpus.map((g) => `${ev.worker_id}:${g}`).join(', ');
  upsert(ev.instance_id, patch);
}

const COLUMNS = ['model', 'state', 'worker', 'gpus', 'endpoint', 'restarts', 'reason'];

function upsert(id, patch) {
  let r = rows.get(id);
  if (!r) {
    const tr = document.createElement('tr');
    tr.dataset.instance = id;
    const head = el('th', 'id', id);
    head.scope = 'row';
    tr.append(head);
    const cells = {};
    for (const c of COLUMNS) tr.append((cells[c] = el('td', c)));
    const stop = el('button', 'stop', 'Stop');
    stop.type = 'button';
    stop.setAttribute('aria-label', `Stop ${id}`);
    stop.addEventListener('click', () => stopInstance(id, stop));
    tr.append(el('td', 'actions', stop));
    r = { id, model: '', gpus: '', eventAt: -Infinity, touched: -Infinity, tr, cells, stop };
    rows.set(id, r);
    const body = $('instance-rows');
    const next = [...body.rows].find((x) => x.dataset.instance > id);
    body.insertBefore(tr, next ?? null);
    $('no-instances').hidden = true;
  }
  Object.assign(r, patch);
  const c = r.cells;
  c.model.textContent = r.model || '—';
  c.state.textContent = r.state;
  c.state.dataset.state = r.state;
  c.worker.textContent = r.worker ?? '—';
  c.gpus.textContent = r.gpus || '—';
  c.endpoint.textContent = r.endpoint ?? '—';
  c.restarts.textContent = String(r.restarts ?? 0);
  c.reason.textContent = r.reason ?? '';
  r.stop.disabled = r.state === 'stopped';
}

async function stopInstance(id, button) {
  button.disabled = true;
  try {
    await api('POST', `/api/v1/instances/${encodeURIComponent(id)}/stop`,
      { reason: 'stopped from the dashboard' });
    notice('');
  } catch (e) {
    button.disabled = false;
    failed(e);
  }
}

function logEvent(ev) {
  const at = new Date(ev.at_ms);
  const time = el('time', '',
    `${at.toLocaleTimeString([], { hour12: false })}.${String(at.getMilliseconds()).padStart(3, '0')}`);
  time.dateTime = at.toISOString();
  const state = el('span', 'state', ev.state);
  state.dataset.state = ev.state;
  const more = [];
  if (ev.worker_id) more.push(`on ${ev.worker_id}`);
  if (ev.endpoint) more.push(`at ${ev.endpoint}`);
  if (ev.restarts) more.push(`restart ${ev.restarts}`);
  if (ev.reason) more.push(`: ${ev.reason}`);
  const li = el('li', '', time, ' ', el('strong', '', ev.instance_id), ' ', state, ` ${more.join(' ')}`);
  li.dataset.instance = ev.instance_id;
  const list = $('events');
  list.prepend(li);
  while (list.children.length > MAX_EVENTS) list.lastElementChild.remove();
}

// --- the start form -----------------------------------------------------------------------

$('start-form').addEventListener('change', () => {
  const file = $('start-form').elements.mode.value === 'file';
  $('mode-vram').hidden = file;
  $('mode-file').hidden = !file;
});

function startSpec() {
  const raw = $('start-json').value.trim();
  if (raw) {
    let spec;
    try {
      spec = JSON.parse(raw);
    } catch (e) {
      throw new Error(`The JSON start spec does not parse: ${e.message}`);
    }
    if (typeof spec !== 'object' || spec === null || Array.isArray(spec)) {
      throw new Error('The JSON start spec must be an object.');
    }
    return spec;
  }
  const spec = { model: $('start-model').value.trim() };
  if ($('start-form').elements.mode.value === 'file') {
    const path = $('start-path').value.trim();
    if (!path) throw new Error("Give the model file's path.");
    spec.model_ref = { path };
    spec.backend = { backend: 'llama_cpp' };
    if ($('start-ctx').value) spec.backend.context = Number($('start-ctx').value);
  } else {
    spec.vram_bytes = Math.round(Number($('start-vram').value) * GIB);
    spec.gpus = Number($('start-gpus').value);
  }
  return spec;
}

$('start-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const out = $('start-result');
  const id = $('start-id').value.trim();
  try {
    const a = await api('POST', `/api/v1/instances/${encodeURIComponent(id)}/start`, startSpec());
    out.className = 'ok';
    out.textContent = `Start of ${a.instance_id} accepted (command ${a.cmd_seq}).`;
  } catch (err) {
    if (err instanceof Unauthorized) return failed(err);
    out.className = 'error';
    out.textContent = err.message;
  }
});

(async () => {
  if (key === null) {
    // A gateway run with --no-auth answers without a key: then none is asked for.
    const r = await fetch('/api/v1/workers', { cache: 'no-store' }).catch(() => null);
    if (r?.ok) key = '';
  }
  if (key !== null) open();
  else askKey('');
})();
