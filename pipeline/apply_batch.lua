-- Apply one planned batch of row changes atomically (architecture invariants 1-4).
--
-- KEYS: none are passed: every key derives from the prefix in ARGV[1], because the
-- buckets a batch touches are only known once the row index is read. This script is
-- therefore not cluster-safe; bucketsync runs on one primary (docs/store.md).
--
-- ARGV[1] prefix
-- ARGV[2] batch header JSON:
--   {"guard": {"<topic>/<partition>": <lowest offset in batch>, ...},
--    "offsets": {"<topic>/<partition>": <highest offset in batch>, ...},
--    "merge_tables": [<table>, ...]  (tables newly known to need source rows; P:merge_tables),
--    "source_lsn": {"<connector>": <highest PostgreSQL LSN in batch>, ...} | null,
--    "maxlen": <changes stream maxlen> }
-- ARGV[3..] the events, flat (raw strings: no JSON to decode per event; Store.apply
--   writes them from core.plan_batch's dicts):
--   "U", <row key>, <table>, <source row json> | "" (no stored copy; tables that never
--        need merges keep none, see core.plan_batch), <lookups json> | "" (absent),
--        <n outputs>, then n x (bucket, object_type, object_id, put_checksum,
--        remove_checksum, tail)                      -- an upsert: the row's complete
--                                                       set of outputs after the event
--   "D", <row key>, <table>, "1" | "0"               -- a delete ("1": the delete half of
--                                                       a primary-key change)
--   "X", <table>                                     -- TRUNCATE
--   "tail" is the op's wire JSON after the op_id field. Checksums are decimal strings.
--   The lookups json (rows of tables read by parameter queries) is the row's complete
--   list of lookup entries [[lookup key, values json], ...] after the event; the row's
--   previous set is kept in its row hash (field "\31L"), the lookup index P:lookup:<key>
--   is a hash values json -> number of rows contributing it. A deleted row drops all its
--   entries. Lookup keys whose value set changed are announced in the change entry
--   (field "l", a JSON array).
-- Returns {"ok", checkpoint, n_ops, number of merge tables} or {"stale", "<tp>", stored_offset}.

local P = ARGV[1]
local batch = cjson.decode(ARGV[2])
local SEP = "\31"

local offsets_key = P .. ":offsets"
for tp, low in pairs(batch.guard) do
  local stored = redis.call("HGET", offsets_key, tp)
  if stored and tonumber(stored) >= low then
    return {"stale", tp, stored}
  end
end

local seq_key = P .. ":seq"
local dirty_key = P .. ":dirty"
local n_ops = 0
local buckets = {}   -- bucket -> {cs=, n=, last=, moved=}
local LF = SEP .. "L"  -- row hash field: the row's lookup entries (JSON)
local fmt = string.format

-- Op ids and checksums stay decimal strings in this script (as the row index and ARGV
-- hold them): Lua's own number-to-string conversion ("%.14g" through the C library's
-- floating point printf) was the largest single cost of the step. Numbers are formatted
-- with "%d" where one is needed (op ids, bucket totals).

-- Bucket states live in one hash, P:states: bucket -> "checksum count last_op moved"
-- (so a reader gets a connection's 1,000 states with one HMGET; docs/store.md). These
-- two functions are the only places this script reads or writes a bucket's state (read
-- once per batch, written back at the end). last_op stays a decimal string.
local states_key = P .. ":states"
local function read_state(b)
  local v = redis.call("HGET", states_key, b)
  if not v then
    return {cs = 0, n = 0, last = "0", moved = 0}
  end
  local cs, n, last, moved = string.match(v, "^(%d+) (%-?%d+) (%d+) (%d+)$")
  return {cs = tonumber(cs), n = tonumber(n), last = last, moved = tonumber(moved)}
end
local function write_state(b, s)
  redis.call("HSET", states_key, b, fmt("%d %d %s %d", s.cs, s.n, s.last, s.moved))
end

local function bstate(b)
  local s = buckets[b]
  if not s then
    s = read_state(b)
    buckets[b] = s
  end
  return s
end

-- op ids come from a local counter, written back once: one command less per op
local seq = tonumber(redis.call("GET", seq_key) or "0")
local function next_op()
  n_ops = n_ops + 1
  seq = seq + 1
  return fmt("%d", seq)
end

-- Members to add per bucket, written with one variadic ZADD per bucket at the end:
-- pending[b] = {ids = {op_id, ...} (in order), m = {op_id -> member}}. An op superseded
-- within the batch is replaced in memory; one from an earlier batch is removed by score.
local pending = {}
local function pend(b)
  local p = pending[b]
  if not p then
    p = {ids = {}, m = {}}
    pending[b] = p
  end
  return p
end

-- Defragmentation re-appends a live PUT under a new op id without touching the row index
-- (ops carry no row key): P:reloc:<bucket> maps the row index's op id to the live copy
-- ("<indexed id>" -> "<copy id>") and back ("~<copy id>" -> "<indexed id>", so a copy moved
-- again replaces its entry instead of growing a chain: at most two fields per live row), and
-- P:relocated lists the buckets that have one. The row's op in a bucket is therefore its
-- index entry's op id, or the copy it maps to; both fields are dropped here (the row gets a
-- new op id). Costs nothing while no bucket has relocations.
local relocated_key = P .. ":relocated"
local relocated = nil  -- bucket -> has relocations (asked once per batch); nil: none at all
if redis.call("EXISTS", relocated_key) == 1 then
  relocated = {}
end

local function resolve(b, id)
  if not relocated then
    return id
  end
  local r = relocated[b]
  if r == nil then
    r = redis.call("SISMEMBER", relocated_key, b) == 1
    relocated[b] = r
  end
  if not r then
    return id
  end
  local rk = P .. ":reloc:" .. b
  local copy = redis.call("HGET", rk, id)
  if not copy then
    return id
  end
  redis.call("HDEL", rk, id, "~" .. copy)
  if redis.call("EXISTS", rk) == 0 then
    redis.call("SREM", relocated_key, b)
    relocated[b] = false
  end
  return copy
end

-- Rewrite the row's op at old_id (its index entry) as MOVE (same op_id and checksum),
-- remembering its target.
local function to_move(b, old_id, old_cs, target)
  old_id = resolve(b, old_id)
  local p = pend(b)
  if not p.m[old_id] then
    redis.call("ZREMRANGEBYSCORE", P .. ":ops:" .. b, old_id, old_id)
    table.insert(p.ids, old_id)
  end
  p.m[old_id] = "T" .. target .. "|{\"op_id\":\"" .. old_id .. "\",\"op\":\"MOVE\",\"checksum\":" .. old_cs .. "}"
  local s = bstate(b)
  s.moved = s.moved + 1
end

local function add_op(b, op_id, cs, member)
  local p = pend(b)
  table.insert(p.ids, op_id)
  p.m[op_id] = member
  local s = bstate(b)
  s.cs = (s.cs + tonumber(cs)) % 4294967296
  s.n = s.n + 1
  s.last = op_id
end

local function flush_ops()
  for b, p in pairs(pending) do
    local k = P .. ":ops:" .. b
    local ids, m = p.ids, p.m
    if #ids == 1 then
      redis.call("ZADD", k, ids[1], m[ids[1]])
    else
      local args, na = {}, 0
      for _, id in ipairs(ids) do
        args[na + 1] = id
        args[na + 2] = m[id]
        na = na + 2
        if na >= 2000 then  -- stay well below Lua's unpack limit
          redis.call("ZADD", k, unpack(args, 1, na))
          na = 0
        end
      end
      if na > 0 then
        redis.call("ZADD", k, unpack(args, 1, na))
      end
    end
  end
end

-- Table set changes (P:table:<table>, for TRUNCATE), written per table at the end (or
-- before a TRUNCATE reads one): tmembers[table][row key] = true (add) / false (remove).
local tmembers = {}
local function tmark(t, k, present)
  local m = tmembers[t]
  if not m then
    m = {}
    tmembers[t] = m
  end
  m[k] = present
end

local function flush_tables()
  for t, m in pairs(tmembers) do
    local tk = P .. ":table:" .. t
    local add, rem = {}, {}
    for k, present in pairs(m) do
      if present then
        add[#add + 1] = k
      else
        rem[#rem + 1] = k
      end
      if #add >= 1000 then
        redis.call("SADD", tk, unpack(add))
        add = {}
      end
      if #rem >= 1000 then
        redis.call("SREM", tk, unpack(rem))
        rem = {}
      end
    end
    if #add > 0 then
      redis.call("SADD", tk, unpack(add))
    end
    if #rem > 0 then
      redis.call("SREM", tk, unpack(rem))
    end
  end
  tmembers = {}
end

-- Current index entries of a row: field -> {op_id, checksum, remove_checksum}.
-- Also says whether the row was known at all (then it is in its table set already).
local function read_row(rk)
  local flat = redis.call("HGETALL", rk)
  local cur = {}
  local lookups = nil
  local has_src = false
  for i = 1, #flat, 2 do
    local f = flat[i]
    if f == LF then
      lookups = flat[i + 1]
    elseif f == "" then
      has_src = true
    else
      local a, c, r = string.match(flat[i + 1], "^(%d+):(%d+):(%d+)$")
      cur[f] = {a, c, r}  -- op id and checksums as decimal strings
    end
  end
  return cur, #flat > 0, lookups, has_src
end

-- Replace a row's lookup entries (old: stored JSON or nil; new: list or nil = none).
-- lookup_counts: "<key>\31\31<values>" -> {key, count before the batch, count now}; a
-- key is announced when one of its values appeared or vanished over the whole batch.
local lookup_counts = {}
local function bump(key, values, delta)
  local k = P .. ":lookup:" .. key
  local now = redis.call("HINCRBY", k, values, delta)
  if now <= 0 then
    redis.call("HDEL", k, values)
  end
  local id = key .. SEP .. SEP .. values
  local c = lookup_counts[id]
  if not c then
    c = {key, now - delta, now}
    lookup_counts[id] = c
  end
  c[3] = now
end

local function update_lookups(old_raw, new)
  local old = {}
  if old_raw then
    for _, e in ipairs(cjson.decode(old_raw)) do
      old[e[1] .. SEP .. SEP .. e[2]] = e
    end
  end
  local keep = {}
  for _, e in ipairs(new or {}) do
    local id = e[1] .. SEP .. SEP .. e[2]
    if old[id] then
      keep[id] = true
    else
      bump(e[1], e[2], 1)
    end
  end
  for id, e in pairs(old) do
    if not keep[id] then
      bump(e[1], e[2], -1)
    end
  end
end

local function remove_entry(f, e, hdel)
  local b, ot, oid = string.match(f, "^(.-)" .. SEP .. "(.-)" .. SEP .. "(.*)$")
  local op_id = next_op()
  add_op(b, op_id, e[3], "{\"op_id\":\"" .. op_id .. "\",\"op\":\"REMOVE\",\"object_type\":"
    .. cjson.encode(ot) .. ",\"object_id\":" .. cjson.encode(oid) .. ",\"checksum\":" .. e[3] .. "}")
  to_move(b, e[1], e[2], op_id)
  table.insert(hdel, f)
end

-- One row's event. outs: ARGV index of its first output and n its number of outputs
-- (outs nil: the row is deleted); src: source row JSON or nil (no stored copy); lk:
-- lookups JSON or nil (not a table read by parameter queries); pk_gone: the delete half of
-- a primary-key change.
local function apply_row(k, t, outs, n, src, lk, pk_gone)
  local rk = P .. ":row:" .. k
  local cur, known, old_lookups, has_src = read_row(rk)
  local hset, hdel = {}, {}
  if outs then
    for i = outs, outs + 6 * (n - 1), 6 do
      local b, ot, oid, cs, rcs, tail = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
      local f = b .. SEP .. ot .. SEP .. oid
      local e = cur[f]
      if e and e[2] == cs then
        cur[f] = nil          -- unchanged data: no new op (invariant: skip identical PUT)
      else
        local op_id = next_op()
        add_op(b, op_id, cs, "{\"op_id\":\"" .. op_id .. "\"," .. tail)
        if e then
          to_move(b, e[1], e[2], op_id)
          cur[f] = nil
        end
        hset[#hset + 1] = f
        hset[#hset + 1] = op_id .. ":" .. cs .. ":" .. rcs
      end
    end
  end
  -- whatever the row no longer produces leaves its bucket; in op_id order, so the
  -- result never depends on hash iteration order (replays must be byte-identical)
  if next(cur) ~= nil then
    local gone = {}
    for f, e in pairs(cur) do
      table.insert(gone, {f, e})
    end
    if #gone > 1 then
      table.sort(gone, function(x, y) return tonumber(x[2][1]) < tonumber(y[2][1]) end)
    end
    for _, g in ipairs(gone) do
      remove_entry(g[1], g[2], hdel)
    end
  end
  if outs then
    if lk then
      local l = cjson.decode(lk)
      update_lookups(old_lookups, l)
      if #l > 0 then
        table.insert(hset, LF)
        table.insert(hset, lk)
      elseif old_lookups then
        table.insert(hdel, LF)
      end
    end
    if not src and has_src then
      table.insert(hdel, "")  -- the table needs no merges: no stored copy
    end
    if #hdel > 0 then
      redis.call("HDEL", rk, unpack(hdel))
    end
    if src then
      table.insert(hset, "")
      table.insert(hset, src)
    end
    if #hset > 0 then
      redis.call("HSET", rk, unpack(hset))
    end
    if not known then
      tmark(t, k, true)
    end
  elseif known then
    if old_lookups then
      update_lookups(old_lookups, nil)
    end
    if pk_gone then
      -- the delete half of a primary-key change: keep the source row for a while, the
      -- create half may carry TOAST placeholders that only the old row can fill
      local old_src = redis.call("HGET", rk, "")
      if old_src then
        redis.call("SET", P .. ":gone:" .. k, old_src, "EX", 86400)
      end
    end
    redis.call("DEL", rk)
    tmark(t, k, false)
  end
end

-- the layout is checked before anything is written (a script is not rolled back)
local nargv = #ARGV
do
  local j = 3
  while j <= nargv do
    local kind = ARGV[j]
    if kind == "U" then
      j = j + 6 + 6 * tonumber(ARGV[j + 5])
    elseif kind == "D" then
      j = j + 4
    elseif kind == "X" then
      j = j + 2
    else
      return redis.error_reply("apply_batch: unknown event kind at ARGV[" .. j .. "]")
    end
  end
  if j ~= nargv + 1 then
    return redis.error_reply("apply_batch: truncated event list")
  end
end

local i = 3
while i <= nargv do
  local kind = ARGV[i]
  if kind == "U" then
    local n = tonumber(ARGV[i + 5])
    local src, lk = ARGV[i + 3], ARGV[i + 4]
    if src == "" then src = nil end
    if lk == "" then lk = nil end
    apply_row(ARGV[i + 1], ARGV[i + 2], i + 6, n, src, lk, false)
    i = i + 6 + 6 * n
  elseif kind == "D" then
    apply_row(ARGV[i + 1], ARGV[i + 2], nil, 0, nil, nil, ARGV[i + 3] == "1")
    i = i + 4
  elseif kind == "X" then
    local tk = P .. ":table:" .. ARGV[i + 1]
    flush_tables()
    local members = redis.call("SMEMBERS", tk)
    table.sort(members)
    for _, k in ipairs(members) do
      apply_row(k, ARGV[i + 1], nil, 0, nil, nil, false)
    end
    redis.call("DEL", tk)
    i = i + 2
  end
end

flush_ops()
flush_tables()

local merge_key = P .. ":merge_tables"
if batch.merge_tables and #batch.merge_tables > 0 then
  redis.call("SADD", merge_key, unpack(batch.merge_tables))
end

local any = false
local dirty = {}
local changed_json = {}
for b, s in pairs(buckets) do
  write_state(b, s)
  if s.moved > 0 then
    dirty[#dirty + 1] = b
    if #dirty >= 1000 then
      redis.call("SADD", dirty_key, unpack(dirty))
      dirty = {}
    end
  end
  changed_json[#changed_json + 1] = cjson.encode(b) .. fmt(":[%d,%d]", s.cs, s.n)
  any = true
end
if #dirty > 0 then
  redis.call("SADD", dirty_key, unpack(dirty))
end

for tp, high in pairs(batch.offsets) do
  redis.call("HSET", offsets_key, tp, high)
end

-- highest applied source position (PostgreSQL LSN) per connector, never lowered; announced
-- with the offsets as "lsn:<connector>" (exact write checkpoints compare against it)
if type(batch.source_lsn) == "table" then
  for name, lsn in pairs(batch.source_lsn) do
    local cur = tonumber(redis.call("HGET", P .. ":source_lsn", name) or "-1")
    if lsn > cur then
      cur = lsn
      redis.call("HSET", P .. ":source_lsn", name, string.format("%d", lsn))
    end
    batch.offsets["lsn:" .. name] = string.format("%d", cur)
  end
end

if n_ops > 0 then
  redis.call("SET", seq_key, string.format("%d", seq))
end
local cp = seq
redis.call("SET", P .. ":checkpoint", string.format("%d", cp))
-- the layout these keys follow (pipeline/store.py STORE_LAYOUT): a processor refuses to
-- apply to a store of another layout instead of mixing two
redis.call("SET", P .. ":layout", "2")
local note = {"n", redis.call("INCR", P .. ":changes:n"), "cp", cp}
if any then
  table.insert(note, "b")
  table.insert(note, "{" .. table.concat(changed_json, ",") .. "}")
end
local changed_lookups, lookup_list = {}, {}
for _, c in pairs(lookup_counts) do
  if (c[2] > 0) ~= (c[3] > 0) and not changed_lookups[c[1]] then
    changed_lookups[c[1]] = true
    table.insert(lookup_list, c[1])
  end
end
if #lookup_list > 0 then
  table.sort(lookup_list)
  table.insert(note, "l")
  table.insert(note, cjson.encode(lookup_list))
end
table.insert(note, "o")
table.insert(note, cjson.encode(batch.offsets))
redis.call("XADD", P .. ":changes", "MAXLEN", "~", batch.maxlen, "*", unpack(note))
return {"ok", cp, n_ops, redis.call("SCARD", merge_key)}
