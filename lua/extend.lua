-- extend: set a new TTL on the lock only if the caller still owns it.
-- KEYS[1] the lock key (value "<fence>:<token>")
-- ARGV[1] token, ARGV[2] new ttl in ms, counted from now (integer > 0)
-- returns 1 when the caller was the owner and the TTL is set, 0 otherwise
local value = redis.call('GET', KEYS[1])
if value and string.sub(value, string.find(value, ':', 1, true) + 1) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
