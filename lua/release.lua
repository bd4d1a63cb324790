-- release: delete the lock only if the caller still owns it.
-- KEYS[1] the lock key (value "<fence>:<token>")
-- ARGV[1] token, ARGV[2] optional owner prefix: also release when the owner starts with it
--         (a task frees the lock of any of its own runs, whose tokens extend its id)
-- returns 1 when the caller was the owner and the lock is gone, 0 otherwise
-- (expired, or taken over by another owner, whose lock is left untouched)
local value = redis.call('GET', KEYS[1])
if not value then
  return 0
end
local owner = string.sub(value, string.find(value, ':', 1, true) + 1)
if owner == ARGV[1] or (ARGV[2] and string.sub(owner, 1, #ARGV[2]) == ARGV[2]) then
  return redis.call('DEL', KEYS[1])
end
return 0
