#!/usr/bin/env node
// Scriptable driver for the official PowerSync Node SDK (@powersync/node 1.1.0).
//
// A long-running process controlled over stdin/stdout with JSON lines (one JSON object per line
// both ways), so Python tests can script a real PowerSync client against the bucketsync gateway.
//
//   node driver.mjs --endpoint http://127.0.0.1:PORT --db /tmp/x.sqlite --schema '<json>'
//
// See README.md in this folder for the full command and event reference.
//
// stdout carries ONLY protocol lines (responses and events). Diagnostics go to stderr.
import fs from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';
import { parseArgs } from 'node:util';
import { createRequire } from 'node:module';

const LEVELS = { trace: 10, debug: 20, info: 30, warn: 40, error: 50 };
const LEVEL_NAMES = Object.entries(LEVELS).sort((a, b) => b[1] - a[1]);
const levelName = (n) => LEVEL_NAMES.find(([, v]) => n >= v)?.[0] ?? String(n);
const MAX_LOG_BUFFER = 20000;
const startedAt = Date.now();

// ---------------------------------------------------------------------------------------------
// Output: every protocol line is one synchronous write (pipes are synchronous on Linux), so lines
// never interleave. Anything the SDK or Node prints through console goes to stderr instead.
const rawStdoutWrite = process.stdout.write.bind(process.stdout);
let stdoutBroken = false;
process.stdout.on('error', (e) => {
  // EPIPE: the reader went away. Nobody is listening any more: close quietly.
  stdoutBroken = true;
  diag(`stdout error (${e.code ?? e.message}); shutting down`);
  shutdown(0);
});
function emit(obj) {
  if (stdoutBroken) return;
  let line;
  try {
    line = JSON.stringify(obj, jsonReplacer);
  } catch (e) {
    line = JSON.stringify({ event: 'driver_error', message: `cannot serialise output: ${e.message}` });
  }
  rawStdoutWrite(`${line}\n`);
}
function jsonReplacer(_key, value) {
  if (typeof value === 'bigint') return value.toString();
  if (value instanceof Uint8Array) return Buffer.from(value).toString('base64');
  return value;
}
function diag(msg) {
  const t = ((Date.now() - startedAt) / 1000).toFixed(3);
  process.stderr.write(`[driver +${t}s] ${msg}\n`);
}
for (const name of ['log', 'info', 'debug', 'warn', 'error', 'trace']) {
  // eslint-disable-next-line no-console
  console[name] = (...a) => process.stderr.write(`[console.${name}] ${a.map(String).join(' ')}\n`);
}

function describeError(e) {
  if (e == null) return String(e);
  if (e instanceof Error) {
    let s = `${e.name}: ${e.message}`;
    if (e.cause) s += ` (cause: ${describeError(e.cause)})`;
    return s;
  }
  if (typeof e === 'string') return e;
  try {
    return JSON.stringify(e);
  } catch {
    return String(e);
  }
}

function fatal(msg) {
  emit({ event: 'fatal', message: msg });
  diag(`FATAL: ${msg}`);
  process.exit(3);
}

// ---------------------------------------------------------------------------------------------
// Arguments
let args;
try {
  args = parseArgs({
    options: {
      endpoint: { type: 'string' },
      db: { type: 'string' },
      schema: { type: 'string' },
      'log-level': { type: 'string', default: 'debug' },
      'retry-delay': { type: 'string' },
      help: { type: 'boolean', default: false }
    },
    strict: true,
    allowPositionals: false
  }).values;
} catch (e) {
  fatal(`bad arguments: ${e.message}`);
}
if (args.help) {
  process.stderr.write(
    'usage: node driver.mjs --endpoint URL --db PATH --schema JSON|FILE [--log-level trace|debug|info|warn|error] [--retry-delay MS]\n'
  );
  process.exit(0);
}
for (const required of ['endpoint', 'db', 'schema']) {
  if (!args[required]) fatal(`--${required} is required`);
}
if (!(args['log-level'] in LEVELS)) fatal(`--log-level must be one of ${Object.keys(LEVELS).join(', ')}`);
const emitLevel = LEVELS[args['log-level']];
let endpoint = args.endpoint.replace(/\/+$/, ''); // the SDK rejects a trailing slash
const defaultRetryDelayMs = args['retry-delay'] !== undefined ? Number(args['retry-delay']) : undefined;

// ---------------------------------------------------------------------------------------------
// SDK
const require = createRequire(import.meta.url);
let ps;
try {
  ps = await import('@powersync/node');
} catch (e) {
  fatal(`cannot load @powersync/node (run scripts/install-node-client.sh): ${describeError(e)}`);
}
const { PowerSyncDatabase, Schema, Table, column, SyncStreamConnectionMethod } = ps;
const versionOf = (pkg) => {
  try {
    return require(`${pkg}/package.json`).version;
  } catch {
    // Packages whose "exports" hide package.json: read it from node_modules directly.
    try {
      const file = path.join(path.dirname(new URL(import.meta.url).pathname), 'node_modules', pkg, 'package.json');
      return JSON.parse(fs.readFileSync(file, 'utf8')).version;
    } catch {
      return null;
    }
  }
};

// Schema: {"table": ["col", ...]} (all text) | {"table": {"col": "text|integer|real"}}
//       | {"table": {"columns": {...} | [...], "local_only": bool, "insert_only": bool,
//                    "view_name": str, "indexes": {"name": ["col", "-col_desc"]}}}
function buildSchema(spec) {
  if (spec == null || typeof spec !== 'object' || Array.isArray(spec)) {
    throw new Error('schema must be a JSON object of table -> columns');
  }
  const tables = {};
  for (const [tableName, def] of Object.entries(spec)) {
    let cols = def;
    const options = {};
    if (def && typeof def === 'object' && !Array.isArray(def) && def.columns && typeof def.columns === 'object') {
      cols = def.columns;
      if (def.local_only) options.localOnly = true;
      if (def.insert_only) options.insertOnly = true;
      if (def.view_name) options.viewName = def.view_name;
      if (def.indexes) options.indexes = def.indexes;
    }
    const entries = Array.isArray(cols) ? cols.map((c) => [c, 'text']) : Object.entries(cols ?? {});
    const columns = {};
    for (const [colName, type] of entries) {
      if (colName === 'id') continue; // implicit text primary key of every PowerSync table
      const t = String(type).toLowerCase();
      if (!['text', 'integer', 'real'].includes(t)) {
        throw new Error(`column ${tableName}.${colName}: type must be text|integer|real, got ${type}`);
      }
      columns[colName] = column[t];
    }
    tables[tableName] = new Table(columns, options);
  }
  return { schema: new Schema(tables), tableNames: Object.keys(tables) };
}

let schemaSpec;
try {
  const text = args.schema.trimStart().startsWith('{') ? args.schema : fs.readFileSync(args.schema, 'utf8');
  schemaSpec = JSON.parse(text);
} catch (e) {
  fatal(`cannot parse --schema (JSON text or a file path): ${e.message}`);
}
let schema;
let tableNames;
try {
  ({ schema, tableNames } = buildSchema(schemaSpec));
} catch (e) {
  fatal(e.message);
}

const dbPath = path.resolve(args.db);
fs.mkdirSync(path.dirname(dbPath), { recursive: true });

// ---------------------------------------------------------------------------------------------
// State observed from the SDK
const logBuffer = []; // {seq, t_ms, level, level_name, message, error?}
let logSeq = 0;
const checksumMismatches = [];
let checkpointsApplied = 0; // checkpoints the core validated and applied in this process
let credentialsFetched = 0;
let uploads = 0;
let currentToken = null;
let connector = null;
let closing = false;
const waiters = new Set(); // functions re-evaluated on every state change

function notifyWaiters() {
  for (const w of [...waiters]) {
    try {
      w();
    } catch (e) {
      diag(`waiter failed: ${describeError(e)}`);
    }
  }
}

// "Could not apply checkpoint, Checksums didn't match, failed for: global[] (expected 0x1d822608,
//  got 0x1d822607 = 0x1d822607 (op) + 0x00000000 (add))"
const MISMATCH_RE = /(\S+) \(expected (0x[0-9a-fA-F]+), got (0x[0-9a-fA-F]+)(?: = (0x[0-9a-fA-F]+) \(op\) \+ (0x[0-9a-fA-F]+) \(add\))?/g;
function parseMismatch(message) {
  const buckets = [];
  const tail = message.includes('failed for:') ? message.slice(message.indexOf('failed for:') + 11) : message;
  for (const m of tail.matchAll(MISMATCH_RE)) {
    buckets.push({
      bucket: m[1],
      expected: parseInt(m[2], 16),
      actual: parseInt(m[3], 16),
      op_checksum: m[4] ? parseInt(m[4], 16) : null,
      add_checksum: m[5] ? parseInt(m[5], 16) : null
    });
  }
  return buckets;
}

const logger = {
  log({ level, message, error }) {
    const msg = typeof message === 'string' ? message : describeError(message);
    if (level >= emitLevel) {
      const rec = {
        seq: ++logSeq,
        t_ms: Date.now() - startedAt,
        level,
        level_name: levelName(level),
        message: msg
      };
      if (error !== undefined) rec.error = describeError(error);
      logBuffer.push(rec);
      if (logBuffer.length > MAX_LOG_BUFFER) logBuffer.splice(0, logBuffer.length - MAX_LOG_BUFFER);
      emit({ event: 'log', ...rec });
    }
    // Trace records repeat every core instruction verbatim (powersync_control(...) -> [...]); the
    // core's own log lines arrive once more as debug/info/warn records: only look at those.
    if (level <= LEVELS.trace) return;
    if (msg.startsWith('Validated and applied checkpoint')) {
      // Logged by the core (debug) each time a complete checkpoint passed validation and was
      // published; partial (priority) checkpoints do not log this.
      checkpointsApplied++;
      emit({ event: 'checkpoint_applied', count: checkpointsApplied, t_ms: Date.now() - startedAt });
      notifyWaiters();
    } else if (msg.includes("Checksums didn't match")) {
      const rec = { t_ms: Date.now() - startedAt, message: msg, partial: msg.includes('partial checkpoint'),
                    buckets: parseMismatch(msg) };
      checksumMismatches.push(rec);
      emit({ event: 'checksum_mismatch', index: checksumMismatches.length - 1, ...rec });
      notifyWaiters();
    } else if (msg.startsWith('Could not apply')) {
      // e.g. "Could not apply checkpoint due to local data" (pending uploads / write checkpoint)
      emit({ event: 'checkpoint_not_applied', t_ms: Date.now() - startedAt, message: msg });
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Sync status
function statusSnapshot(s = db?.currentStatus) {
  if (!s) return null;
  const flow = s.dataFlowStatus ?? {};
  const dl = flow.downloadError ?? s.downloadError;
  const ul = flow.uploadError ?? s.uploadError;
  let progress = null;
  try {
    const p = s.downloadProgress;
    if (p) progress = { downloaded: p.downloadedOperations, total: p.totalOperations, fraction: p.downloadedFraction };
  } catch {
    progress = null;
  }
  return {
    connected: !!s.connected,
    connecting: !!s.connecting,
    downloading: !!flow.downloading,
    uploading: !!flow.uploading,
    has_synced: s.hasSynced ?? null,
    last_synced_at: s.lastSyncedAt ? s.lastSyncedAt.toISOString() : null,
    last_synced_at_ms: s.lastSyncedAt ? s.lastSyncedAt.getTime() : null,
    download_error: dl ? describeError(dl) : null,
    upload_error: ul ? describeError(ul) : null,
    priority_status: (s.priorityStatusEntries ?? []).map((e) => ({
      priority: e.priority,
      has_synced: e.hasSynced ?? null,
      last_synced_at: e.lastSyncedAt ? e.lastSyncedAt.toISOString() : null
    })),
    download_progress: progress
  };
}

function driverState() {
  return {
    checkpoints_applied: checkpointsApplied,
    checksum_mismatches: checksumMismatches.length,
    credentials_fetched: credentialsFetched,
    uploads
  };
}

let lastStatusKey = null;
function onStatus(s) {
  const snap = statusSnapshot(s);
  if (!snap) return;
  const key = JSON.stringify({ ...snap, download_progress: undefined });
  if (key !== lastStatusKey) {
    lastStatusKey = key;
    emit({ event: 'status', ...snap, ...driverState() });
  }
  notifyWaiters();
}

// ---------------------------------------------------------------------------------------------
// Database
let db;
try {
  db = new PowerSyncDatabase({ schema, database: { dbFilename: dbPath }, logger });
  await db.waitForReady();
} catch (e) {
  fatal(`cannot open database ${dbPath}: ${describeError(e)}`);
}
db.registerListener({ statusChanged: onStatus });

function makeConnector(uploadDelayMs) {
  return {
    async fetchCredentials() {
      credentialsFetched++;
      emit({ event: 'credentials_fetched', count: credentialsFetched, has_token: currentToken != null });
      if (currentToken == null) return null;
      return { endpoint, token: currentToken };
    },
    async uploadData(database) {
      // No application backend: acknowledge (drop) local changes so the upload queue drains and the
      // client then asks the sync server for a write checkpoint (GET /write-checkpoint2.json).
      const tx = await database.getNextCrudTransaction();
      if (!tx) return;
      if (uploadDelayMs > 0) await new Promise((r) => setTimeout(r, uploadDelayMs));
      const crud = tx.crud.map((c) => (typeof c.toJSON === 'function' ? c.toJSON() : c));
      await tx.complete();
      uploads++;
      emit({ event: 'upload', transaction_id: tx.transactionId ?? null, crud, count: uploads });
      notifyWaiters();
    }
  };
}

// ---------------------------------------------------------------------------------------------
// Helpers for commands
function waitUntil(predicate, timeoutMs) {
  return new Promise((resolve, reject) => {
    let timer = null;
    const check = () => {
      let r;
      try {
        r = predicate();
      } catch (e) {
        done();
        reject(e);
        return;
      }
      if (r) {
        done();
        resolve(r);
      }
    };
    const done = () => {
      waiters.delete(check);
      if (timer) clearTimeout(timer);
    };
    waiters.add(check);
    if (timeoutMs != null && timeoutMs >= 0) {
      timer = setTimeout(() => {
        done();
        reject(Object.assign(new Error(`timeout after ${timeoutMs} ms`), { code: 'timeout' }));
      }, timeoutMs);
    }
    check();
  });
}

function canonical(v) {
  if (Array.isArray(v)) return v.map(canonical);
  if (v && typeof v === 'object') {
    const out = {};
    for (const k of Object.keys(v).sort()) out[k] = canonical(v[k]);
    return out;
  }
  if (typeof v === 'bigint') return Number(v);
  return v;
}
const sameRows = (a, b) => JSON.stringify(canonical(a)) === JSON.stringify(canonical(b));
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function numberOr(v, dflt) {
  if (v === undefined || v === null) return dflt;
  const n = Number(v);
  if (!Number.isFinite(n)) throw new Error(`expected a number, got ${JSON.stringify(v)}`);
  return n;
}

async function readAllTables() {
  const out = {};
  for (const t of tableNames) {
    out[t] = await db.getAll(`SELECT * FROM "${t.replace(/"/g, '""')}" ORDER BY id`);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Commands
const streamHandles = [];
const commands = {
  async ping() {
    return { pong: true };
  },

  async connect(req) {
    if (req.token !== undefined) currentToken = req.token;
    if (req.endpoint) endpoint = String(req.endpoint).replace(/\/+$/, '');
    const options = { connectionMethod: SyncStreamConnectionMethod.HTTP };
    const retry = numberOr(req.retry_delay_ms, defaultRetryDelayMs);
    if (retry !== undefined) options.retryDelayMs = retry;
    if (req.params) options.params = req.params;
    if (req.crud_upload_throttle_ms != null) options.crudUploadThrottleMs = Number(req.crud_upload_throttle_ms);
    if (req.app_metadata) options.appMetadata = req.app_metadata;
    if (req.include_default_streams != null) options.includeDefaultStreams = !!req.include_default_streams;
    connector = makeConnector(numberOr(req.upload_delay_ms, 0));
    await db.connect(connector, options);
    onStatus(db.currentStatus);
    return { status: statusSnapshot(), options };
  },

  // Sync Streams: db.syncStream(name, params).subscribe({priority}); resolves once the
  // subscription's waitForFirstSync() resolved (or fails after timeout_ms).
  async subscribe(req) {
    if (typeof db.syncStream !== 'function') throw new Error('this SDK has no db.syncStream()');
    const options = {};
    if (req.priority != null) options.priority = Number(req.priority);
    const handle = await db.syncStream(String(req.name), req.params ?? undefined).subscribe(options);
    streamHandles.push(handle);
    const timeoutMs = numberOr(req.timeout_ms, 30000);
    let timer;
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`waitForFirstSync of ${req.name} timed out`)), timeoutMs);
    });
    try {
      await Promise.race([handle.waitForFirstSync(), timeout]);
    } finally {
      clearTimeout(timer);
    }
    return { status: statusSnapshot() };
  },

  // db.waitForFirstSync({priority}): resolves once statusForPriority(priority).hasSynced. At
  // that moment (before anything else is awaited) the status is captured, then row counts of
  // "count_tables" are read in one read transaction, then the status once more: whether the
  // full sync had completed by the time the counts were read.
  async wait_first_sync_priority(req) {
    const priority = Number(req.priority);
    if (!Number.isInteger(priority)) throw new Error('wait_first_sync_priority needs an integer "priority"');
    const timeoutMs = numberOr(req.timeout_ms, 30000);
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), timeoutMs);
    try {
      await db.waitForFirstSync({ priority, signal: abort.signal });
    } finally {
      clearTimeout(timer);
    }
    if (abort.signal.aborted) {
      return { ok: false, error: `waitForFirstSync({priority: ${priority}}) timed out`, error_code: 'timeout',
               status: statusSnapshot() };
    }
    const at = db.currentStatus;
    const prio = at.statusForPriority(priority);
    const statusAt = statusSnapshot(at);
    const counts = {};
    let oplogRows = null;
    const tables = Array.isArray(req.count_tables) ? req.count_tables.map(String) : [];
    await db.readTransaction(async (tx) => {
      for (const t of tables) {
        const r = await tx.getAll(`SELECT count(*) AS n FROM "${t.replace(/"/g, '""')}"`);
        counts[t] = Number(r[0].n);
      }
      const o = await tx.getAll('SELECT count(*) AS n FROM ps_oplog');
      oplogRows = Number(o[0].n);
    });
    return {
      status_at_resolve: statusAt,
      status_for_priority: prio
        ? { priority: prio.priority, has_synced: prio.hasSynced ?? null }
        : null,
      counts,
      oplog_rows: oplogRows, // ops downloaded (all buckets) when the counts were read
      status_after_counts: statusSnapshot(),
      ...driverState()
    };
  },

  async set_token(req) {
    currentToken = req.token ?? null;
    return {};
  },

  async disconnect() {
    await db.disconnect();
    onStatus(db.currentStatus);
    return { status: statusSnapshot() };
  },

  async disconnect_and_clear() {
    await db.disconnectAndClear();
    onStatus(db.currentStatus);
    return { status: statusSnapshot() };
  },

  async status() {
    return { status: statusSnapshot(), ...driverState() };
  },

  // Default: resolve once status.hasSynced is true (at once on a db that synced before).
  // "new": true -> wait for a complete checkpoint applied after this command arrived.
  // "this_run": true -> wait for at least one complete checkpoint applied by this process.
  // "min_checkpoints": N -> wait until N complete checkpoints were applied by this process.
  async wait_synced(req) {
    const timeoutMs = numberOr(req.timeout_ms, 30000);
    let target = null;
    if (req.min_checkpoints != null) target = Number(req.min_checkpoints);
    else if (req.new) target = checkpointsApplied + 1;
    else if (req.this_run) target = 1;
    try {
      await waitUntil(() => {
        const s = db.currentStatus;
        if (target != null) return checkpointsApplied >= target;
        return s.hasSynced === true;
      }, timeoutMs);
    } catch (e) {
      if (e.code === 'timeout') {
        return {
          ok: false,
          error: `wait_synced: ${e.message}`,
          error_code: 'timeout',
          status: statusSnapshot(),
          ...driverState(),
          last_logs: logBuffer.slice(-20)
        };
      }
      throw e;
    }
    return { status: statusSnapshot(), ...driverState() };
  },

  async query(req) {
    if (typeof req.sql !== 'string') throw new Error('query needs "sql"');
    const rows = await db.getAll(req.sql, req.params ?? []);
    return { rows };
  },

  async write(req) {
    if (typeof req.sql !== 'string') throw new Error('write needs "sql"');
    const r = await db.execute(req.sql, req.params ?? []);
    return { rows_affected: r.rowsAffected ?? null, insert_id: r.insertId ?? null, rows: r.rows?._array ?? [] };
  },

  // Poll until the query's rows equal "expect" (order matters; write ORDER BY in the SQL).
  async wait_for(req) {
    if (typeof req.sql !== 'string') throw new Error('wait_for needs "sql"');
    if (!Array.isArray(req.expect)) throw new Error('wait_for needs "expect": an array of row objects');
    const timeoutMs = numberOr(req.timeout_ms, 30000);
    const intervalMs = numberOr(req.interval_ms, 100);
    const deadline = Date.now() + timeoutMs;
    let rows = null;
    for (;;) {
      rows = await db.getAll(req.sql, req.params ?? []);
      if (sameRows(rows, req.expect)) return { rows, elapsed_ms: timeoutMs - (deadline - Date.now()) };
      if (Date.now() >= deadline) break;
      await sleep(Math.min(intervalMs, Math.max(0, deadline - Date.now())));
    }
    return {
      ok: false,
      error: `wait_for: rows did not match within ${timeoutMs} ms`,
      error_code: 'timeout',
      rows,
      expect: req.expect,
      status: statusSnapshot(),
      ...driverState(),
      last_logs: logBuffer.slice(-20)
    };
  },

  async tables() {
    return { tables: await readAllTables() };
  },

  // The core's bookkeeping (powersync-sqlite-core): buckets, oplog, kv (without client_id).
  async dump_state() {
    const out = {};
    for (const [name, sql] of [
      ['ps_buckets', 'SELECT * FROM ps_buckets ORDER BY name'],
      ['ps_oplog', 'SELECT * FROM ps_oplog ORDER BY bucket, op_id'],
      ['ps_kv', "SELECT key, value FROM ps_kv WHERE key != 'client_id' ORDER BY key"],
      ['ps_sync_state', 'SELECT * FROM ps_sync_state ORDER BY priority']
    ]) {
      try {
        out[name] = await db.getAll(sql);
      } catch (e) {
        out[name] = { error: describeError(e) };
      }
    }
    return { state: out };
  },

  async client_id() {
    return { client_id: await db.getClientId() };
  },

  async upload_queue() {
    const s = await db.getUploadQueueStats();
    return { count: s.count, size: s.size ?? null };
  },

  async logs(req) {
    const since = numberOr(req.since, 0);
    const minLevel = req.level ? LEVELS[req.level] ?? Number(req.level) : 0;
    return {
      logs: logBuffer.filter((r) => r.seq > since && r.level >= minLevel),
      checksum_mismatches: checksumMismatches
    };
  },

  async close() {
    await shutdown(0, false);
    return {};
  }
};

async function handleLine(line) {
  const text = line.trim();
  if (!text) return;
  let req;
  try {
    req = JSON.parse(text);
  } catch (e) {
    emit({ ok: false, id: null, error: `invalid JSON: ${e.message}` });
    return;
  }
  const id = req?.id ?? null;
  const handler = req && typeof req.cmd === 'string' && Object.hasOwn(commands, req.cmd) ? commands[req.cmd] : null;
  if (!handler) {
    emit({ id, ok: false, error: `unknown command: ${JSON.stringify(req?.cmd)}` });
    return;
  }
  try {
    const result = (await handler(req)) ?? {};
    emit({ id, ok: result.ok ?? true, cmd: req.cmd, ...result });
  } catch (e) {
    emit({ id, ok: false, cmd: req.cmd, error: describeError(e) });
  }
  if (req.cmd === 'close') process.exit(0);
}

async function shutdown(code, exit = true) {
  if (closing) {
    if (exit) process.exit(code);
    return;
  }
  closing = true;
  // Never hang on close.
  setTimeout(() => {
    diag('close took too long; exiting');
    process.exit(code);
  }, 8000).unref();
  try {
    await db.disconnect();
    await db.close();
  } catch (e) {
    diag(`close failed: ${describeError(e)}`);
  }
  if (exit) process.exit(code);
}

process.on('unhandledRejection', (e) => {
  emit({ event: 'driver_error', message: `unhandled rejection: ${describeError(e)}` });
});
process.on('SIGTERM', () => shutdown(0));
process.on('SIGINT', () => shutdown(0));

const inFlight = new Set();
const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity, terminal: false });
rl.on('line', (line) => {
  const p = handleLine(line).catch((e) => emit({ event: 'driver_error', message: describeError(e) }));
  inFlight.add(p);
  p.finally(() => inFlight.delete(p));
});
// stdin closed (parent went away, or the end of a piped script): finish the commands in flight,
// then close the database and exit; do not linger.
rl.on('close', async () => {
  await Promise.allSettled([...inFlight]);
  await shutdown(0);
});

emit({
  event: 'ready',
  pid: process.pid,
  node: process.version,
  sdk: { '@powersync/node': versionOf('@powersync/node'), '@powersync/common': versionOf('@powersync/common'),
         'better-sqlite3': versionOf('better-sqlite3') },
  db: dbPath,
  endpoint,
  tables: tableNames,
  has_synced: db.currentStatus.hasSynced ?? null,
  last_synced_at: db.currentStatus.lastSyncedAt ? db.currentStatus.lastSyncedAt.toISOString() : null
});
