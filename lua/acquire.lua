-- acquire: take the lock, or report who holds it. One round trip, atomic.
-- KEYS[1] lock key, KEYS[2] fence key (both carry the same hash tag, so one cluster slot)
-- ARGV[1] token, ARGV[2] ttl in ms (integer > 0),
-- ARGV[3] optional predecessor token: if it holds the lock, the lock passes to ARGV[1]
-- returns {1, token, ttl_ms, fence}  acquired, re-acquired by the same token (TTL refreshed,
--                                    fence kept) or taken over from the predecessor
--         {0, owner, pttl_ms}        held by another token (pttl_ms is -1 for a key with no TTL)
--
-- The fence is max(last fence + 1, Redis time in microseconds). Seeding from the clock keeps
-- it strictly increasing even after the fence key has expired, so that key only has to live
-- as long as the lock it belongs to and an idle name costs no memory.
local token = ARGV[1]
local ttl = tonumber(ARGV[2])
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= token and owner ~= ARGV[3] then
  return {0, owner, redis.call('PTTL', KEYS[1])}
end

local last = tonumber(redis.call('GET', KEYS[2]) or '0')
local fence
if owner == token and last > 0 then
  -- Re-acquired by the holder: keep the fence it was given.
  fence = last
else
  local now = redis.call('TIME')
  fence = math.max(last + 1, tonumber(now[1]) * 1000000 + tonumber(now[2]))
end

redis.call('SET', KEYS[1], token, 'PX', ttl)
-- '%.0f' keeps all 16 digits; tostring() would switch to exponent notation.
redis.call('SET', KEYS[2], string.format('%.0f', fence), 'PX', ttl)
return {1, token, ttl, fence}
