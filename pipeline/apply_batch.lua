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
--    "maxlen": <changes stream maxlen>,
--    "slots": <row index hashes per table (store.ROW_SLOTS)> }
-- ARGV[3..] the events, flat (raw strings: no JSON to decode per event; written by
--   store.apply_payload from core.plan_batch's events):
--   "U", <ts>, <rf>, <source row json> | "" (no stored copy; tables that never need merges
--        keep none, see core.plan_batch), <lookups json> | "" (absent), <n outputs>,
--        then n x (bucket, entry field, put_checksum, remove_checksum, tail)
--                                                    -- an upsert: the row's complete set
--                                                       of outputs after the event
--   "D", <ts>, <rf>, <row key> | ""                  -- a delete (the row key: the delete
--                                                       half of a primary-key change)
--   "X", <table>                                     -- TRUNCATE
--   <ts> is "<table>:<slot>" and <rf> the row's field: the row key without its table
--   (store.row_slot). The row index of a table is spread over header.slots hashes
--   P:ri:<table>:<slot> (field <rf>), one packed string per row (row_value below); its
--   source row copy and lookup entries sit in P:src:<ts> and P:rl:<ts> under the same field.
--   "entry field" is bucket \31 object_type \31 object_id, each part escaped by the store
--   (\27 \29 \30 \31 -> \27 followed by the byte + 32) so the packed value parses
--   unambiguously. "tail" is the op's wire JSON after the op_id field. Checksums are decimal
--   strings.
--   The lookups json (rows of tables read by parameter queries) is the row's complete
--   list of lookup entries [[lookup key, values json], ...] after the event; the row's
--   previous set is kept in P:rl:<ts>, the lookup index P:lookup:<key> is a hash values
--   json -> number of rows contributing it. A deleted row drops all its entries. Lookup keys
--   whose value set changed are announced in the change entry (field "l", a JSON array).
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
local buckets = {}   -- bucket -> {cs=, n=, last=, moved=}: the buckets this batch changes
local prefetched = {}  -- bucket -> its state as read up front (maybe unchanged)
local fmt = string.format
local find, gmatch, match = string.find, string.gmatch, string.match

-- Op ids and checksums stay decimal strings in this script (as the row index and ARGV
-- hold them): Lua's own number-to-string conversion ("%.14g" through the C library's
-- floating point printf) was the largest single cost of the step. Numbers are formatted
-- with "%d" where one is needed (op ids, bucket totals).

-- Bucket states live in one hash, P:states: bucket -> "checksum count last_op moved"
-- (so a reader gets a connection's 1,000 states with one HMGET; docs/store.md). These
-- functions are the only places this script reads or writes a bucket's state: read once
-- per batch (the buckets of the batch's outputs with one HMGET up front, buckets only a
-- REMOVE touches when first seen), written back with one HSET at the end. last_op stays a
-- decimal string.
local states_key = P .. ":states"
local function parse_state(v)
  if not v then
    return {cs = 0, n = 0, last = "0", moved = 0}
  end
  local cs, n, last, moved = match(v, "^(%d+) (%-?%d+) (%d+) (%d+)$")
  return {cs = tonumber(cs), n = tonumber(n), last = last, moved = tonumber(moved)}
end
local function read_states(list)
  for i = 1, #list, 1000 do
    local part = {unpack(list, i, math.min(#list, i + 999))}
    local v = redis.call("HMGET", states_key, unpack(part))
    for j = 1, #part do
      prefetched[part[j]] = v[j] or false
    end
  end
end

local function bstate(b)
  local s = buckets[b]
  if not s then
    local v = prefetched[b]
    if v == nil then
      v = redis.call("HGET", states_key, b)
    end
    s = parse_state(v)
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
    p.ids[#p.ids + 1] = old_id
  end
  p.m[old_id] = "T" .. target .. "|{\"op_id\":\"" .. old_id .. "\",\"op\":\"MOVE\",\"checksum\":" .. old_cs .. "}"
  local s = bstate(b)
  s.moved = s.moved + 1
end

local function add_op(b, op_id, cs, member)
  local p = pend(b)
  p.ids[#p.ids + 1] = op_id
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

-- The row index: P:ri:<table>:<slot> field <rf> -> one packed string per row,
--   <flags> then per output "\30" <entry field> "\29" <op_id> ":" <checksum> ":" <remove checksum>
-- flags: "0" nothing else stored, "1" a source row copy in P:src:<ts>, "2" lookup entries
-- in P:rl:<ts>, "3" both. The entry field is escaped (no raw \29 or \30 in it). A row the
-- index knows always has a value (at least its flags).
local FLAGS = {[0] = "0", "1", "2", "3"}
local function read_row(ri, rf)
  local v = redis.call("HGET", ri, rf)
  if not v then
    return nil, 0, nil
  end
  local cur = {}
  for f, a, c, r in gmatch(v, "\30([^\29]*)\29(%d+):(%d+):(%d+)") do
    cur[f] = {a, c, r}  -- op id and checksums as decimal strings
  end
  return cur, tonumber(string.sub(v, 1, 1)), v
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

local function unescape(x)
  if find(x, "\27", 1, true) then
    return (string.gsub(x, "\27(.)", function(c) return string.char(string.byte(c) - 32) end))
  end
  return x
end

-- the row no longer produces entry field f (index entry e): a REMOVE in its bucket
local function remove_entry(f, e)
  local b, ot, oid = match(f, "^([^\31]*)\31([^\31]*)\31([^\31]*)$")
  b, ot, oid = unescape(b), unescape(ot), unescape(oid)
  local op_id = next_op()
  add_op(b, op_id, e[3], "{\"op_id\":\"" .. op_id .. "\",\"op\":\"REMOVE\",\"object_type\":"
    .. cjson.encode(ot) .. ",\"object_id\":" .. cjson.encode(oid) .. ",\"checksum\":" .. e[3] .. "}")
  to_move(b, e[1], e[2], op_id)
end

-- One row's event. ts: "<table>:<slot>", rf: its field there; outs: ARGV index of its first
-- output and n its number of outputs (outs nil: the row is deleted); src: source row JSON
-- or nil (no stored copy); lk: lookups JSON or nil (not a table read by parameter queries);
-- pk_gone: the row key when this is the delete half of a primary-key change.
local function apply_row(ts, rf, outs, n, src, lk, pk_gone)
  local ri = P .. ":ri:" .. ts
  local cur, flags, old_v = read_row(ri, rf)
  -- the new packed value, as pieces joined once at the end (entries[1]: the flags)
  local entries, ne = {"0"}, 1
  if outs then
    for i = outs, outs + 5 * (n - 1), 5 do
      local f, cs = ARGV[i + 1], ARGV[i + 2]
      local e = cur and cur[f]
      if e and e[2] == cs then
        cur[f] = nil          -- unchanged data: no new op (invariant: skip identical PUT)
        entries[ne + 1], entries[ne + 2], entries[ne + 3], entries[ne + 4] = "\30", f, "\29", e[1]
        entries[ne + 5], entries[ne + 6], entries[ne + 7], entries[ne + 8] = ":", cs, ":", e[3]
        ne = ne + 8
      else
        local b = ARGV[i]
        local op_id = next_op()
        add_op(b, op_id, cs, "{\"op_id\":\"" .. op_id .. "\"," .. ARGV[i + 4])
        if e then
          to_move(b, e[1], e[2], op_id)
          cur[f] = nil
        end
        entries[ne + 1], entries[ne + 2], entries[ne + 3], entries[ne + 4] = "\30", f, "\29", op_id
        entries[ne + 5], entries[ne + 6], entries[ne + 7], entries[ne + 8] = ":", cs, ":", ARGV[i + 3]
        ne = ne + 8
      end
    end
  end
  -- whatever the row no longer produces leaves its bucket; in op_id order, so the
  -- result never depends on hash iteration order (replays must be byte-identical)
  if cur and next(cur) ~= nil then
    local gone = {}
    for f, e in pairs(cur) do
      gone[#gone + 1] = {f, e}
    end
    if #gone > 1 then
      table.sort(gone, function(x, y) return tonumber(x[2][1]) < tonumber(y[2][1]) end)
    end
    for _, g in ipairs(gone) do
      remove_entry(g[1], g[2])
    end
  end
  local had_src, had_lk = flags % 2 == 1, flags >= 2
  if outs then
    local has_lk = had_lk
    if lk then
      local l = cjson.decode(lk)
      local rl = P .. ":rl:" .. ts
      update_lookups(had_lk and redis.call("HGET", rl, rf) or nil, l)
      has_lk = #l > 0
      if has_lk then
        redis.call("HSET", rl, rf, lk)
      elseif had_lk then
        redis.call("HDEL", rl, rf)
      end
    end
    if src then
      redis.call("HSET", P .. ":src:" .. ts, rf, src)
    elseif had_src then
      redis.call("HDEL", P .. ":src:" .. ts, rf)  -- the table needs no merges: no stored copy
    end
    entries[1] = FLAGS[(src and 1 or 0) + (has_lk and 2 or 0)]
    local v = table.concat(entries)
    if v ~= old_v then  -- (strings are interned: one pointer comparison)
      redis.call("HSET", ri, rf, v)
    end
  elseif cur then
    if had_lk then
      local rl = P .. ":rl:" .. ts
      update_lookups(redis.call("HGET", rl, rf), nil)
      redis.call("HDEL", rl, rf)
    end
    if had_src then
      local sk = P .. ":src:" .. ts
      if pk_gone then
        -- the delete half of a primary-key change: keep the source row for a while, the
        -- create half may carry TOAST placeholders that only the old row can fill
        local old_src = redis.call("HGET", sk, rf)
        if old_src then
          redis.call("SET", P .. ":gone:" .. pk_gone, old_src, "EX", 86400)
        end
      end
      redis.call("HDEL", sk, rf)
    end
    redis.call("HDEL", ri, rf)
  end
end

-- the layout is checked before anything is written (a script is not rolled back); the
-- buckets of the batch's outputs are read with one HMGET on the way
local nargv = #ARGV
do
  local j = 3
  local seen, list = {}, {}
  while j <= nargv do
    local kind = ARGV[j]
    if kind == "U" then
      local n = tonumber(ARGV[j + 5])
      for o = j + 6, j + 1 + 5 * n, 5 do
        local b = ARGV[o]
        if b and not seen[b] then
          seen[b] = true
          list[#list + 1] = b
        end
      end
      j = j + 6 + 5 * n
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
  read_states(list)
end

local i = 3
while i <= nargv do
  local kind = ARGV[i]
  if kind == "U" then
    local n = tonumber(ARGV[i + 5])
    local src, lk = ARGV[i + 3], ARGV[i + 4]
    if src == "" then src = nil end
    if lk == "" then lk = nil end
    apply_row(ARGV[i + 1], ARGV[i + 2], i + 6, n, src, lk, nil)
    i = i + 6 + 5 * n
  elseif kind == "D" then
    local gk = ARGV[i + 3]
    apply_row(ARGV[i + 1], ARGV[i + 2], nil, 0, nil, nil, gk ~= "" and gk or nil)
    i = i + 4
  elseif kind == "X" then
    -- every row of the table (all its slots), in row key order (replays are byte-identical)
    local rows, slot_of = {}, {}
    for slot = 0, batch.slots - 1 do
      local ts = ARGV[i + 1] .. ":" .. slot
      for _, rf in ipairs(redis.call("HKEYS", P .. ":ri:" .. ts)) do
        rows[#rows + 1] = rf
        slot_of[rf] = ts
      end
    end
    table.sort(rows)
    for _, rf in ipairs(rows) do
      apply_row(slot_of[rf], rf, nil, 0, nil, nil, nil)
    end
    i = i + 2
  end
end

flush_ops()

local merge_key = P .. ":merge_tables"
if batch.merge_tables and #batch.merge_tables > 0 then
  redis.call("SADD", merge_key, unpack(batch.merge_tables))
end

local any = false
local dirty = {}
local changed_json = {}
local states, ns = {}, 0
for b, s in pairs(buckets) do
  states[ns + 1] = b
  states[ns + 2] = fmt("%d %d %s %d", s.cs, s.n, s.last, s.moved)
  ns = ns + 2
  if ns >= 2000 then
    redis.call("HSET", states_key, unpack(states, 1, ns))
    ns = 0
  end
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
if ns > 0 then
  redis.call("HSET", states_key, unpack(states, 1, ns))
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
redis.call("SET", P .. ":layout", "3")
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
