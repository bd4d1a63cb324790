-- token_bucket: admit `cost` tokens only if every limit has them; one atomic decision.
-- KEYS[i]   the bucket of limit i (all KEYS share one hash tag, so one cluster slot)
-- ARGV[1]   cost (integer > 0)
-- ARGV[2+3(i-1)], ARGV[3+3(i-1)], ARGV[4+3(i-1)]
--           limit i: count N, period P in microseconds, burst B (integers > 0): N tokens
--           per P, at most B at once
-- returns {allowed (1/0), remaining (tokens left under the tightest limit),
--          retry_after_us (0 when allowed; else when every limit will have the tokens)}
--
-- A generic cell rate algorithm, which is a token bucket kept as its debt: each bucket stores
-- "debt last" where debt is in units of 1/N microsecond-tokens (one token costs P units, and
-- every microsecond repays N), so all arithmetic is on integers far below 2^53 (the caller
-- keeps B * P under 9e15) and nothing is rounded in anyone's favour. Time is Redis TIME.
-- A denied request writes nothing; a bucket expires when its debt is repaid (full again).
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000000 + tonumber(now_parts[2])
local cost = tonumber(ARGV[1])
local allowed = 1
local remaining = nil
local retry_after = 0
local updates = {}

for i, key in ipairs(KEYS) do
  local base = 2 + 3 * (i - 1)
  local n, p, b = tonumber(ARGV[base]), tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2])
  local debt, last = 0, now
  local state = redis.call('GET', key)
  if state then
    local d, l = string.match(state, '^(%d+) (%d+)$')
    debt, last = tonumber(d), tonumber(l)
  end
  local elapsed = math.max(0, now - last)
  -- Repay N per microsecond; compare before multiplying so the product stays small.
  if elapsed >= math.ceil(debt / n) then
    debt = 0
  else
    debt = debt - elapsed * n
  end
  local capacity = b * p
  local new_debt = debt + cost * p
  local left
  if new_debt <= capacity then
    left = math.floor((capacity - new_debt) / p)
    updates[#updates + 1] = {key, new_debt, math.max(1, math.ceil(new_debt / n / 1000))}
  else
    allowed = 0
    left = math.floor((capacity - debt) / p)
    retry_after = math.max(retry_after, math.ceil((new_debt - capacity) / n))
  end
  if remaining == nil or left < remaining then
    remaining = left
  end
end

if allowed == 1 then
  for _, u in ipairs(updates) do
    redis.call('SET', u[1], string.format('%.0f %.0f', u[2], now), 'PX', u[3])
  end
  retry_after = 0
end
return {allowed, remaining, retry_after}
