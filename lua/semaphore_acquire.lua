-- semaphore_acquire: take one of `limit` slots, or report how soon the earliest lease ends.
-- KEYS[1] the semaphore: a sorted set of holder tokens, each scored by when its lease ends
--         (Redis time in ms); the key itself expires when the last lease does
-- ARGV[1] token, ARGV[2] limit (integer > 0), ARGV[3] ttl in ms (integer > 0)
-- returns {1, holders, ttl_ms}    acquired (or re-acquired by the same token: lease renewed);
--                                 holders counts the caller
--         {0, holders, wait_ms}   every slot is held: the earliest lease ends in wait_ms
--
-- Expired holders are dropped before anything is counted, so a crashed holder's slot frees
-- by itself when its lease ends.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local holders = redis.call('ZCARD', KEYS[1])
local mine = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not mine and holders >= tonumber(ARGV[2]) then
  local earliest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, holders, tonumber(earliest[2]) - now}
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
if not mine then
  holders = holders + 1
end
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], tonumber(last[2]))
return {1, holders, ttl}
