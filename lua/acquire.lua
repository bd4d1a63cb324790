-- acquire: take the lock, or report who holds it. One round trip, atomic.
-- KEYS[1] the lock key; its value is "<fence>:<token>", so a held lock is one key
-- ARGV[1] token, ARGV[2] ttl in ms (integer > 0),
-- ARGV[3] optional predecessor token: if it holds the lock, the lock passes to ARGV[1]
-- returns {1, token, ttl_ms, fence}  acquired, re-acquired by the same token (TTL refreshed,
--                                    fence kept) or taken over from the predecessor
--         {0, owner, pttl_ms}        held by another token (pttl_ms is -1 for a key with no TTL)
--
-- The fence is the last fence + 1 when the lock passes from its predecessor (held all along:
-- no fence was lost), else Redis time in microseconds (or more). Seeding from the clock keeps
-- it strictly increasing after the lock expired and its last fence went with it, so the fence
-- needs no key of its own and an idle name costs no memory.
local token = ARGV[1]
local value = redis.call('GET', KEYS[1])
local last = 0
if value then
  local sep = string.find(value, ':', 1, true)
  local owner = string.sub(value, sep + 1)
  last = tonumber(string.sub(value, 1, sep - 1))
  if owner == token then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {1, token, tonumber(ARGV[2]), last}
  end
  if owner ~= ARGV[3] then
    return {0, owner, redis.call('PTTL', KEYS[1])}
  end
end

local fence = last + 1
if not value then  -- the one case that needs the clock (a command less on a hand-over)
  local now = redis.call('TIME')
  fence = math.max(fence, tonumber(now[1]) * 1000000 + tonumber(now[2]))
end
-- '%.0f' keeps all 16 digits; tostring() would switch to exponent notation.
redis.call('SET', KEYS[1], string.format('%.0f', fence) .. ':' .. token, 'PX', ARGV[2])
return {1, token, tonumber(ARGV[2]), fence}
