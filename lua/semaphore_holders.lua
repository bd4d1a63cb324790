-- semaphore_holders: how many live holders the semaphore has (read-only).
-- KEYS[1] the semaphore (sorted set of tokens scored by lease end, Redis time in ms)
-- returns the number of holders whose lease has not ended
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
