// bucketsync live demo: the official PowerSync web SDK syncing from the bucketsync gateway.
//
// The demo backend (bucketsync/demo_web.py, same origin as this page) mints dev tokens
// (/api/token), tells the gateway's URL (/api/config) and takes the client's uploads
// (/api/upload), which it turns into Debezium change events on Kafka (or SQL on
// PostgreSQL with --source postgres): a write comes back through CDC like any other.
import {
  PowerSyncDatabase,
  Schema,
  Table,
  column,
  SyncStreamConnectionMethod,
  LogLevels,
} from '@powersync/web';

const T0 = performance.now();
const $ = (sel) => document.querySelector(sel);
const params = new URLSearchParams(location.search);

// What the test (and a curious person in the console) can read: window.bucketsyncDemo.
const demo = {
  user: null,
  firstSyncedRowsMs: null, // page start -> first complete checkpoint applied with rows shown
  databaseReadyMs: null, // page start -> the SDK's database (wa-sqlite in a worker) is open
  checksumErrors: [],
  status: null,
  rows: { lists: [], todos: [], memberships: [] },
  buckets: [],
  log: [],
};
window.bucketsyncDemo = demo;

function log(msg) {
  const line = `${new Date().toISOString().slice(11, 23)} ${msg}`;
  demo.log.push(line);
  const li = document.createElement('li');
  li.textContent = line;
  const ol = $('#log');
  ol.prepend(li);
  while (ol.children.length > 40) ol.lastChild.remove();
}

// The SDK's logger: watch it for checksum failures (the core reports them as warnings,
// "Checksums didn't match", not as a status error); the sync worker's messages come here too.
const logger = {
  log({ level, message, error }) {
    const text = `${message}${error ? ` ${error?.message ?? error}` : ''}`;
    if (/checksum/i.test(text)) {
      demo.checksumErrors.push(text);
      log(`CHECKSUM: ${text}`);
    }
    if (level >= LogLevels.warn) (level >= LogLevels.error ? console.error : console.warn)(`[powersync] ${text}`);
  },
};

const api = async (path, init) => {
  const r = await fetch(path, init);
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status} ${await r.text()}`);
  return r.json();
};

const config = await api('./api/config');
const user = params.get('user') || localStorage.getItem('bucketsync-demo-user') || config.users[0];
demo.user = user;
localStorage.setItem('bucketsync-demo-user', user);

const userSelect = $('#user');
for (const u of config.users) {
  const o = document.createElement('option');
  o.value = o.textContent = u;
  o.selected = u === user;
  userSelect.append(o);
}
userSelect.addEventListener('change', () => {
  const q = new URLSearchParams(location.search);
  q.set('user', userSelect.value);
  location.search = q.toString();
});
$('#who').textContent = `signed in as ${user} · gateway ${config.endpoint} · source ${config.source}`;
document.title = `bucketsync demo · ${user}`;

const tables = {
  lists: new Table({ name: column.text, owner_id: column.text }),
  todos: new Table({
    list_id: column.text,
    owner_id: column.text,
    description: column.text,
    completed: column.integer,
  }),
};
if (config.sharing) {
  tables.memberships = new Table({ list_id: column.text, user_id: column.text });
}
const schema = new Schema(tables);

let token = null;
const connector = {
  async fetchCredentials() {
    const r = await api(`./api/token?user=${encodeURIComponent(user)}`);
    token = r.token;
    return { endpoint: config.endpoint, token: r.token };
  },
  // The client's CRUD queue goes to the demo backend, which applies it to the source; the
  // rows come back through CDC. The SDK then asks the gateway for a write checkpoint and
  // keeps the optimistic rows until a checkpoint includes it (no flicker).
  async uploadData(database) {
    const batch = await database.getCrudBatch(100);
    if (!batch) return;
    const ops = batch.crud.map((e) => ({ op: e.op, table: e.table, id: e.id, data: e.opData ?? null }));
    const t = performance.now();
    await api('./api/upload', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${token}` },
      body: JSON.stringify({ ops }),
    });
    await batch.complete();
    log(`uploaded ${ops.length} change(s) in ${(performance.now() - t).toFixed(0)} ms`);
  },
};

log('opening the local database (wa-sqlite in a worker)');
const db = new PowerSyncDatabase({
  schema,
  database: { dbFilename: `bucketsync-demo-${user}.sqlite` },
  logger,
});
demo.db = db;

// ---------------------------------------------------------------------------- status

const fmtTime = (d) => (d ? d.toLocaleTimeString() : '—');
function renderStatus(s) {
  const p = s.downloadProgress;
  const entries = [
    ['state', s.connected ? 'connected' : s.connecting ? 'connecting…' : 'disconnected'],
    [
      'download',
      s.dataFlowStatus.downloading
        ? p
          ? `downloading ${p.downloadedOperations} / ${p.totalOperations} ops (${Math.round(p.downloadedFraction * 100)}%)`
          : 'downloading'
        : 'idle',
    ],
    ['upload', s.dataFlowStatus.uploading ? 'uploading' : 'idle'],
    ['has synced', String(s.hasSynced ?? false)],
    ['last synced', fmtTime(s.lastSyncedAt)],
  ];
  for (const e of s.priorityStatusEntries ?? []) {
    entries.push([e.priority >= 2147483647 ? 'all priorities' : `priority ${e.priority}`, e.hasSynced ? `synced ${fmtTime(e.lastSyncedAt)}` : 'not yet']);
  }
  const err = s.dataFlowStatus.downloadError || s.dataFlowStatus.uploadError;
  if (err) entries.push(['error', err.message ?? String(err)]);
  const dl = $('#status');
  dl.replaceChildren();
  for (const [k, v] of entries) {
    const dt = document.createElement('dt');
    dt.textContent = k;
    const dd = document.createElement('dd');
    dd.textContent = v;
    dd.className = k === 'state' ? (s.connected ? 'ok' : 'warn') : k === 'error' ? 'err' : '';
    dl.append(dt, dd);
  }
  const bar = document.createElement('progress');
  bar.max = 1;
  bar.value = p ? p.downloadedFraction : s.hasSynced ? 1 : 0;
  dl.append(bar);
  demo.status = {
    connected: s.connected,
    hasSynced: s.hasSynced ?? false,
    lastSyncedAt: s.lastSyncedAt?.toISOString() ?? null,
    downloading: s.dataFlowStatus.downloading,
    error: err ? String(err.message ?? err) : null,
  };
}

async function refreshBuckets() {
  // ps_buckets / ps_oplog are the client core's own tables (read-only here)
  const rows = await db.getAll(
    `SELECT b.name, b.last_op, (SELECT count(*) FROM ps_oplog o WHERE o.bucket = b.id) AS ops
       FROM ps_buckets b WHERE b.name != '$local' ORDER BY b.name`,
  );
  demo.buckets = rows;
  const tbody = $('#buckets tbody');
  tbody.replaceChildren();
  for (const r of rows) {
    const tr = document.createElement('tr');
    for (const v of [r.name, r.last_op, r.ops]) {
      const td = document.createElement('td');
      td.textContent = v;
      tr.append(td);
    }
    tbody.append(tr);
  }
  $('#bucket-count').textContent = `(${rows.length})`;
}

let wasConnected = false;
db.registerListener({
  statusChanged: (s) => {
    if (s.connected !== wasConnected) {
      wasConnected = s.connected;
      log(s.connected ? 'sync stream connected' : 'sync stream disconnected');
    }
    renderStatus(s);
    refreshBuckets().catch((e) => console.error(e));
  },
});
renderStatus(db.currentStatus);

// ---------------------------------------------------------------------------- data

function renderData() {
  const { lists, todos, memberships } = demo.rows;
  const byList = new Map();
  for (const l of lists) byList.set(l.id, { list: l, todos: [] });
  for (const t of todos) {
    if (!byList.has(t.list_id)) byList.set(t.list_id, { list: null, todos: [] });
    byList.get(t.list_id).todos.push(t);
  }
  const root = $('#lists');
  root.replaceChildren();
  const addList = $('#add-list');
  const chosen = addList.value;
  addList.replaceChildren();
  const keys = [...byList.keys()].sort();
  for (const id of keys) {
    const { list, todos: items } = byList.get(id);
    const o = document.createElement('option');
    o.value = id;
    o.textContent = list ? list.name : id;
    addList.append(o);
    const box = document.createElement('div');
    box.className = 'list';
    box.dataset.listId = id;
    const h = document.createElement('h3');
    const shared = list && list.owner_id !== user;
    h.textContent = list ? list.name : `list ${id}`;
    if (list) {
      const tag = document.createElement('span');
      tag.className = 'muted';
      const members = memberships.filter((m) => m.list_id === id).map((m) => m.user_id);
      tag.textContent = shared
        ? ` shared by ${list.owner_id}`
        : members.length
          ? ` shared with ${members.join(', ')}`
          : '';
      h.append(tag);
    }
    box.append(h);
    const ul = document.createElement('ul');
    for (const t of items.sort((a, b) => a.id.localeCompare(b.id))) {
      const li = document.createElement('li');
      li.dataset.id = t.id;
      const cb = document.createElement('input');
      cb.type = 'checkbox';
      cb.checked = !!t.completed;
      cb.addEventListener('change', () =>
        db.execute('UPDATE todos SET completed = ? WHERE id = ?', [cb.checked ? 1 : 0, t.id]),
      );
      const span = document.createElement('span');
      span.className = 'desc';
      span.textContent = t.description;
      const del = document.createElement('button');
      del.textContent = '×';
      del.title = 'delete';
      del.addEventListener('click', () => db.execute('DELETE FROM todos WHERE id = ?', [t.id]));
      li.append(cb, span, del);
      if (t.owner_id !== user) {
        const who = document.createElement('span');
        who.className = 'muted';
        who.textContent = ` (${t.owner_id})`;
        li.append(who);
      }
      ul.append(li);
    }
    box.append(ul);
    root.append(box);
  }
  if (keys.includes(chosen)) addList.value = chosen;
  else {
    const own = lists.find((l) => l.id === `l-${user}`) ?? lists.find((l) => l.owner_id === user);
    if (own) addList.value = own.id;
  }
  $('#counts').textContent = `(${lists.length} lists, ${todos.length} todos)`;
  renderSharing();
}

function renderSharing() {
  const box = $('#sharing');
  if (!config.sharing) {
    box.textContent = 'Sharing: the sync rules in use have no memberships bucket; each user sees their own rows.';
    box.className = 'muted';
    return;
  }
  box.className = '';
  const own = demo.rows.lists.filter((l) => l.owner_id === user);
  if (box.dataset.built === String(own.length)) return;
  box.dataset.built = String(own.length);
  box.replaceChildren();
  const form = document.createElement('form');
  form.id = 'share';
  const listSel = document.createElement('select');
  listSel.id = 'share-list';
  for (const l of own) {
    const o = document.createElement('option');
    o.value = l.id;
    o.textContent = l.name;
    listSel.append(o);
  }
  const userSel = document.createElement('select');
  userSel.id = 'share-user';
  for (const u of config.users.filter((x) => x !== user)) {
    const o = document.createElement('option');
    o.value = o.textContent = u;
    userSel.append(o);
  }
  const share = document.createElement('button');
  share.textContent = 'share';
  const unshare = document.createElement('button');
  unshare.textContent = 'unshare';
  unshare.type = 'button';
  form.append('share ', listSel, ' with ', userSel, ' ', share, ' ', unshare);
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    demo.share(listSel.value, userSel.value).catch((e) => log(`share failed: ${e}`));
  });
  unshare.addEventListener('click', () =>
    demo.unshare(listSel.value, userSel.value).catch((e) => log(`unshare failed: ${e}`)),
  );
  box.append(form);
}

const newId = () => crypto.randomUUID();

demo.addTodo = async (description, listId) => {
  const list = listId ?? ($('#add-list').value || `l-${user}`);
  const id = newId();
  await db.execute(
    'INSERT INTO todos (id, list_id, owner_id, description, completed) VALUES (?, ?, ?, ?, 0)',
    [id, list, user, description],
  );
  log(`added todo ${id.slice(0, 8)} "${description}"`);
  return id;
};
demo.share = async (listId, member) => {
  await db.execute('INSERT INTO memberships (id, list_id, user_id) VALUES (?, ?, ?)', [
    `m-${listId}-${member}`,
    listId,
    member,
  ]);
  log(`shared ${listId} with ${member}`);
};
demo.unshare = async (listId, member) => {
  await db.execute('DELETE FROM memberships WHERE list_id = ? AND user_id = ?', [listId, member]);
  log(`unshared ${listId} from ${member}`);
};

$('#add').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const input = $('#add-text');
  const text = input.value.trim();
  if (!text) return;
  input.value = '';
  demo.addTodo(text).catch((e) => log(`add failed: ${e}`));
});

function watch(sql, key) {
  db.watch(sql, [], {
    onResult: (r) => {
      demo.rows[key] = r.rows?._array ?? [];
      renderData();
      if (demo.firstSyncedRowsMs === null && db.currentStatus.hasSynced && demo.rows.todos.length) {
        demo.firstSyncedRowsMs = Math.round(performance.now() - T0);
        log(`first synced rows shown ${demo.firstSyncedRowsMs} ms after page start`);
      }
    },
    onError: (e) => log(`query failed: ${e}`),
  });
}
watch('SELECT * FROM lists ORDER BY name', 'lists');
watch('SELECT * FROM todos ORDER BY id', 'todos');
if (config.sharing) watch('SELECT * FROM memberships ORDER BY id', 'memberships');

await db.init();
demo.databaseReadyMs = Math.round(performance.now() - T0);
log(`database ready ${demo.databaseReadyMs} ms after page start; connecting to ${config.endpoint} as ${user}`);
await db.connect(connector, { connectionMethod: SyncStreamConnectionMethod.HTTP });
db.waitForFirstSync().then(() => {
  log('first sync complete');
  if (demo.firstSyncedRowsMs === null && demo.rows.todos.length) {
    demo.firstSyncedRowsMs = Math.round(performance.now() - T0);
    log(`first synced rows shown ${demo.firstSyncedRowsMs} ms after page start`);
  }
  refreshBuckets();
});
