-- release: delete the lock only if the caller still owns it.
-- KEYS[1] lock key
-- ARGV[1] token
-- returns 1 when the caller was the owner and the lock is gone, 0 otherwise
-- (expired, or taken over by another owner, whose lock is left untouched)
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
