-- One bounded defragmentation step on one bucket (sync-protocol.md §7, process 3).
--
-- Re-appends up to ARGV[3] live PUTs with op_id in (ARGV[4], ARGV[5]] as fresh PUTs at the
-- end of the bucket (new op_ids, same data and checksum); each old PUT becomes a MOVE
-- targeting its copy, so a later compaction step can fold the whole old prefix.
-- Clients holding those rows download them again: this is why it is opt-in.
--
-- ARGV[1] prefix, ARGV[2] bucket, ARGV[3] chunk, ARGV[4] cursor (exclusive), ARGV[5] cutoff
-- Returns {moved, new_cursor, done}

local P, b, chunk = ARGV[1], ARGV[2], tonumber(ARGV[3])
local cursor, cutoff = ARGV[4], ARGV[5]
local k = P .. ":ops:" .. b
local rows = redis.call("ZRANGEBYSCORE", k, "(" .. cursor, cutoff, "WITHSCORES", "LIMIT", 0, chunk)
local SEP = "\31"
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
  if string.sub(m, 1, 1) == "R" then
    local len, rest = string.match(m, "^R(%d+):(.*)$")
    len = tonumber(len)
    local rk = string.sub(rest, 1, len)
    local wire = string.sub(rest, len + 1)
    local ot = cjson.decode(wire)
    local cs = tonumber(ot.checksum)
    op_id = redis.call("INCR", P .. ":seq")
    local tail = string.gsub(wire, '^{"op_id":"%d+",', "", 1)
    redis.call("ZREMRANGEBYSCORE", k, old_id, old_id)
    redis.call("ZADD", k, old_id,
      "T" .. op_id .. "|{\"op_id\":\"" .. string.format("%d", old_id) .. "\",\"op\":\"MOVE\",\"checksum\":" .. string.format("%d", cs) .. "}")
    redis.call("ZADD", k, op_id, "R" .. len .. ":" .. rk .. "{\"op_id\":\"" .. op_id .. "\"," .. tail)
    local f = b .. SEP .. ot.object_type .. SEP .. ot.object_id
    local rkey = P .. ":row:" .. rk
    local cur = redis.call("HGET", rkey, f)
    if cur then
      local rcs = string.match(cur, ":(%d+)$")
      redis.call("HSET", rkey, f, op_id .. ":" .. string.format("%d", cs) .. ":" .. rcs)
    end
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
  local cp = tonumber(redis.call("GET", P .. ":seq"))
  redis.call("SET", P .. ":checkpoint", cp)
  local changed = {}
  changed[b] = {total, count}
  redis.call("XADD", P .. ":changes", "MAXLEN", "~", ARGV[6], "*",
    "n", redis.call("INCR", P .. ":changes:n"), "cp", cp, "b", cjson.encode(changed))
end
return {n, string.format("%d", last), done}
