-- semaphore_acquire: take one of `limit` slots, or report how soon one is likely free.
-- KEYS[1] the semaphore: a sorted set of holder tokens, each scored by when its lease ends
--         (Redis time in ms); the key expires when the last lease does
-- KEYS[2] optional: the queue of callers turned away, scored by when each is due back (ms)
-- KEYS[3] optional: how long a holder typically keeps its slot (ms, a moving average kept by
--         semaphore_release; 1000 until the first release)
-- ARGV[1] token, ARGV[2] limit (integer > 0), ARGV[3] ttl in ms (integer > 0)
-- returns {1, holders, ttl_ms}            acquired (or re-acquired by the same token: lease
--                                         renewed); holders counts the caller
--         {0, holders, wait_ms, due_ms}   every slot is held; the earliest lease ends in
--                                         wait_ms; with the queue keys the caller is queued
--                                         and due back in due_ms (else due_ms = wait_ms)
--
-- Expired holders are dropped before anything is counted, so a crashed holder's slot frees by
-- itself when its lease ends. The queue spreads callers turned away over the time slots are
-- likely to free (one typical hold time per `limit` callers, first come first served), so
-- they come back one after another instead of all at once; a caller due more than a lease ago
-- that never came back (revoked, say) leaves the queue.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local token, limit, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local holders = redis.call('ZCARD', KEYS[1])
local mine = redis.call('ZSCORE', KEYS[1], token)
local queued = #KEYS == 3
if queued then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - ttl)
end
if not mine and holders >= limit then
  local earliest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  local wait = tonumber(earliest[2]) - now
  if not queued then
    return {0, holders, wait, wait}
  end
  local step = math.max(1, math.ceil((tonumber(redis.call('GET', KEYS[3])) or 1000) / limit))
  local due
  if redis.call('ZREM', KEYS[2], token) == 1 then
    due = now + step  -- back at its turn and still turned away: it queues near the front
  else
    local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
    due = math.max(now, tonumber(last[2] or now)) + step  -- new: after everyone queued
  end
  redis.call('ZADD', KEYS[2], due, token)
  local latest = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
  redis.call('PEXPIREAT', KEYS[2], tonumber(latest[2]) + ttl)
  return {0, holders, wait, due - now}
end
redis.call('ZADD', KEYS[1], now + ttl, token)
if not mine then
  holders = holders + 1
end
if queued then
  redis.call('ZREM', KEYS[2], token)
end
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], tonumber(last[2]))
return {1, holders, ttl}
