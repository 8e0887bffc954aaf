-- One bounded, read-only scan step for the scheduled re-append (compaction.plan_reappend).
--
-- Reads up to ARGV[4] ops of one bucket with op_id > ARGV[3] and returns them run-length
-- encoded: a flat list of {is_put, run_length, last_op_id} (is_put = 1 for a live PUT, 0 for
-- MOVE / REMOVE / CLEAR, the ops compaction may fold). Nothing is decoded: a member starting
-- with "T" is a MOVE or CLEAR, "R" a PUT tagged with its row key (stores written before
-- 2026-12), "{" an untagged PUT or REMOVE, told apart by the op field right after the
-- op_id (see store.md).
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
  local m = rows[i]
  local c = string.byte(m, 1)
  if c == 82 then -- "R"
    put = 1
  elseif c == 123 then -- "{": {"op_id":"<id>","op":"PUT"...
    local q = string.find(m, '"', 12, true) -- the quote closing the op id
    if q and string.byte(m, q + 8) == 80 then put = 1 end -- ","op":"P
  end
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
