-- One bounded defragmentation step on one bucket (sync-protocol.md §7, process 3).
--
-- Re-appends up to ARGV[3] live PUTs with op_id in (ARGV[4], ARGV[5]] as fresh PUTs at the
-- end of the bucket (new op_ids, same data and checksum); each old PUT becomes a MOVE
-- targeting its copy, so a later compaction step can fold the whole old prefix. Ops carry
-- no row key, so the row index is left alone: the relocation (indexed id -> new id, and
-- back) goes to P:reloc:<bucket> (and the bucket to P:relocated), which the apply step
-- follows.
-- Clients holding those rows download them again, so the scheduled compaction re-appends
-- only the few rows that block a long foldable run (compaction.plan_reappend; the cutoff).
--
-- ARGV[1] prefix, ARGV[2] bucket, ARGV[3] chunk, ARGV[4] cursor (exclusive), ARGV[5] cutoff
-- Returns {moved, new_cursor, done}

local P, b, chunk = ARGV[1], ARGV[2], tonumber(ARGV[3])
local cursor, cutoff = ARGV[4], ARGV[5]
local k = P .. ":ops:" .. b
local rows = redis.call("ZRANGEBYSCORE", k, "(" .. cursor, cutoff, "WITHSCORES", "LIMIT", 0, chunk)
-- the bucket's state: P:states field b = "checksum count last_op moved"
local sk = P .. ":states"
local v = {string.match(redis.call("HGET", sk, b) or "0 0 0 0",
  "^(%d+) (%-?%d+) (%d+) (%d+)$")}
local total, count, moved = tonumber(v[1]) or 0, tonumber(v[2]) or 0, tonumber(v[4]) or 0
local n = 0
local last = tonumber(cursor)
local op_id = nil
for i = 1, #rows, 2 do
  local m = rows[i]
  local old_id = tonumber(rows[i + 1])
  last = old_id
  local first = string.sub(m, 1, 1)
  local wire = nil
  if first == "R" then  -- a PUT stored with its row key (written before 2026-12)
    local len, rest = string.match(m, "^R(%d+):(.*)$")
    wire = string.sub(rest, tonumber(len) + 1)
  elseif first == "{" and string.match(m, '^{"op_id":"%d+","op":"(%u+)"') == "PUT" then
    wire = m
  end
  if wire then
    local cs = tonumber(string.match(wire, '"checksum":(%d+)'))
    op_id = redis.call("INCR", P .. ":seq")
    local new_id = string.format("%d", op_id)
    local old = string.format("%d", old_id)
    local tail = string.gsub(wire, '^{"op_id":"%d+",', "", 1)
    redis.call("ZREMRANGEBYSCORE", k, old_id, old_id)
    redis.call("ZADD", k, old_id,
      "T" .. new_id .. "|{\"op_id\":\"" .. old .. "\",\"op\":\"MOVE\",\"checksum\":" .. string.format("%d", cs) .. "}")
    redis.call("ZADD", k, op_id, "{\"op_id\":\"" .. new_id .. "\"," .. tail)
    -- the row index keeps its id: the apply step maps it to the copy (rowindex.py). A
    -- copy moved again replaces its entry: the indexed id maps straight to the newest copy
    local rk = P .. ":reloc:" .. b
    local indexed = redis.call("HGET", rk, "~" .. old)
    if indexed then
      redis.call("HDEL", rk, "~" .. old)
    else
      indexed = old
    end
    redis.call("HSET", rk, indexed, new_id, "~" .. new_id, indexed)
    total = (total + cs) % 4294967296
    count = count + 1
    moved = moved + 1
    n = n + 1
  end
end
local done = 0
if #rows < chunk * 2 then done = 1 end
if n > 0 then
  redis.call("HSET", sk, b, string.format("%d %d %d %d", total, count, op_id, moved))
  redis.call("SADD", P .. ":dirty", b)
  redis.call("SADD", P .. ":relocated", b)
  local cp = tonumber(redis.call("GET", P .. ":seq"))
  redis.call("SET", P .. ":checkpoint", cp)
  local changed = {}
  changed[b] = {total, count}
  redis.call("XADD", P .. ":changes", "MAXLEN", "~", ARGV[6], "*",
    "n", redis.call("INCR", P .. ":changes:n"), "cp", cp, "b", cjson.encode(changed))
end
return {n, string.format("%d", last), done}
