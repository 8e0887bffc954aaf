-- One bounded, read-only scan step for the scheduled re-append (compaction.plan_reappend).
--
-- Reads up to ARGV[4] ops of one bucket with op_id > ARGV[3] and returns them run-length
-- encoded: a flat list of {is_put, run_length, last_op_id} (is_put = 1 for a live PUT, 0 for
-- MOVE / REMOVE / CLEAR, the ops compaction may fold). Only the member's first byte is
-- looked at (R = PUT, see store.md), so nothing is decoded.
--
-- ARGV[1] prefix, ARGV[2] bucket, ARGV[3] cursor (exclusive op_id), ARGV[4] count
-- Returns {ops_read, is_put, len, last, is_put, len, last, ...}

local k = ARGV[1] .. ":ops:" .. ARGV[2]
local rows = redis.call("ZRANGEBYSCORE", k, "(" .. ARGV[3], "+inf", "WITHSCORES", "LIMIT", 0,
  tonumber(ARGV[4]))
local out = {#rows / 2}
local kind, len, last = -1, 0, nil
for i = 1, #rows, 2 do
  local put = 0
  if string.byte(rows[i], 1) == 82 then put = 1 end -- "R"
  if put ~= kind and len > 0 then
    out[#out + 1] = kind
    out[#out + 1] = len
    out[#out + 1] = last
    len = 0
  end
  kind = put
  len = len + 1
  last = rows[i + 1]
end
if len > 0 then
  out[#out + 1] = kind
  out[#out + 1] = len
  out[#out + 1] = last
end
return out
