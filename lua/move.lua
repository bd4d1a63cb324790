-- move: take one lock for a run and, in the same step, free another the instance held while
-- queued (a unique task with one queued and one running instance per key).
-- KEYS[1] the queued lock, KEYS[2] the running lock (one hash slot; values "<fence>:<token>")
-- ARGV[1] the instance's own token (its task id): the queued lock's owner, and the running
--         lock's owner while a retry of the instance is on its way
-- ARGV[2] the run's token, ARGV[3] the running lock's ttl in ms (integer > 0)
-- returns {1, token, ttl_ms, fence}  the running lock is the run's now (taken, taken over from
--                                    the instance's own token, or refreshed for the same run),
--                                    and the queued lock is freed if the instance held it
--         {0, owner, pttl_ms}        another token runs: nothing changed
local value = redis.call('GET', KEYS[2])
local last = 0
if value then
  local sep = string.find(value, ':', 1, true)
  local owner = string.sub(value, sep + 1)
  last = tonumber(string.sub(value, 1, sep - 1))
  if owner ~= ARGV[1] and owner ~= ARGV[2] then
    return {0, owner, redis.call('PTTL', KEYS[2])}
  end
  if owner == ARGV[2] then
    redis.call('PEXPIRE', KEYS[2], ARGV[3])
    return {1, ARGV[2], tonumber(ARGV[3]), last}
  end
end
local fence = last + 1
if not value then  -- held all along by the instance's own token: its fence goes on from there
  local now = redis.call('TIME')
  fence = math.max(fence, tonumber(now[1]) * 1000000 + tonumber(now[2]))
end
redis.call('SET', KEYS[2], string.format('%.0f', fence) .. ':' .. ARGV[2], 'PX', ARGV[3])
local queued = redis.call('GET', KEYS[1])
if queued and string.sub(queued, string.find(queued, ':', 1, true) + 1) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
return {1, ARGV[2], tonumber(ARGV[3]), fence}
