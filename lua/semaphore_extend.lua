-- semaphore_extend: renew the caller's lease, only while it still holds a live slot.
-- KEYS[1] the semaphore (sorted set of tokens scored by lease end, Redis time in ms)
-- ARGV[1] token, ARGV[2] new ttl in ms, counted from now (integer > 0)
-- returns 1 when the caller's slot was live and its lease now ends ttl ms from now, else 0
--         (an ended lease is never revived: its slot may have been given to another)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ends = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not ends or tonumber(ends) <= now then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], tonumber(last[2]))
return 1
