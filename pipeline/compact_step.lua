-- One bounded compaction step on one bucket (sync-protocol.md §7, architecture §7).
--
-- Folds the longest leading run of MOVE / REMOVE / CLEAR ops among the first
-- ARGV[3] ops of the bucket into one CLEAR: op_id = last folded op, checksum =
-- sum of the folded checksums, target = largest target among them. Atomic, so a
-- reader never sees a half-folded prefix; bounded, so Redis is never blocked long.
--
-- ARGV[1] prefix, ARGV[2] bucket, ARGV[3] chunk size
-- Returns {folded_ops, bytes_freed, more} where more = 1 when the run may go on
-- past this chunk (call again), 0 when the bucket's leading run is fully folded.

local P, b, chunk = ARGV[1], ARGV[2], tonumber(ARGV[3])
local k = P .. ":ops:" .. b
local rows = redis.call("ZRANGE", k, 0, chunk - 1, "WITHSCORES")
local n = 0
local sum = 0
local target = 0
local last_id = nil
local bytes = 0
for i = 1, #rows, 2 do
  local m = rows[i]
  local first = string.sub(m, 1, 1)
  if first == "R" then
    break  -- a PUT stored with its row key (before 2026-12): the foldable run ends here
  end
  local kind = string.match(m, '"op":"(%u+)"')  -- a PUT ends the foldable run
  if kind ~= "MOVE" and kind ~= "REMOVE" and kind ~= "CLEAR" then
    break
  end
  local t = tonumber(string.match(m, "^T(%d+)|")) or 0
  -- a REMOVE is its own "target": clients that see it at C are consistent at C
  local id = tonumber(rows[i + 1])
  if kind == "REMOVE" then t = id end
  if t > target then target = t end
  sum = (sum + tonumber(string.match(m, '"checksum":(%d+)'))) % 4294967296
  last_id = id
  bytes = bytes + #m
  n = n + 1
end
local more = 0
if n * 2 == #rows and #rows == chunk * 2 then more = 1 end
if n == 0 or (n == 1 and string.find(rows[1], '"op":"CLEAR"', 1, true)) then
  return {0, 0, 0}
end
local clear = "T" .. target .. "|{\"op_id\":\"" .. string.format("%d", last_id)
  .. "\",\"op\":\"CLEAR\",\"checksum\":" .. string.format("%d", sum) .. "}"
redis.call("ZREMRANGEBYRANK", k, 0, n - 1)
redis.call("ZADD", k, last_id, clear)
-- the bucket's state (P:states: "checksum count last_op moved"): n ops became one, and
-- every MOVE up to here is folded
local sk = P .. ":states"
local cs, count, last_op = string.match(redis.call("HGET", sk, b) or "0 0 0 0",
  "^(%d+) (%-?%d+) (%d+) ")
redis.call("HSET", sk, b, cs .. " " .. string.format("%d", tonumber(count) + 1 - n) .. " "
  .. last_op .. " 0")
return {n - 1, bytes - #clear, more}
