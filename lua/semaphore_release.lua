-- semaphore_release: give up the caller's slot.
-- KEYS[1] the semaphore (sorted set of tokens scored by lease end, Redis time in ms)
-- KEYS[2] optional: the typical hold time (ms, a moving average; see semaphore_acquire)
-- ARGV[1] token, ARGV[2] optional: how long the caller held its slot, in ms (folded into the
--         moving average, which expires a day after the last release)
-- returns 1 when the caller held a live slot and it is free now, 0 otherwise (its lease had
--         ended, or it never held one); other holders are never touched
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ends = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not ends then
  return 0
end
redis.call('ZREM', KEYS[1], ARGV[1])
if redis.call('ZCARD', KEYS[1]) > 0 then
  local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  redis.call('PEXPIREAT', KEYS[1], tonumber(last[2]))
end
if KEYS[2] and ARGV[2] then
  local held = tonumber(ARGV[2])
  local mean = tonumber(redis.call('GET', KEYS[2]))
  mean = mean and (0.8 * mean + 0.2 * held) or held
  redis.call('SET', KEYS[2], string.format('%.0f', mean), 'PX', 86400000)
end
if tonumber(ends) <= now then
  return 0
end
return 1
