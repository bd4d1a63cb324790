-- token_bucket: admit `cost` tokens now if every limit has them, or book them for the
-- earliest moment within a max wait at which every limit will; one atomic decision.
-- KEYS[i]   the bucket of limit i (all KEYS share one hash tag, so one cluster slot)
-- ARGV[1]   cost (integer > 0)
-- ARGV[2]   max wait W in microseconds (integer >= 0; 0: admit now or not at all; the
--           caller keeps (2 B P + W N) under 2^53 for every limit)
-- ARGV[3+3(i-1)], ARGV[4+3(i-1)], ARGV[5+3(i-1)]
--           limit i: count N, period P in microseconds, burst B (integers > 0): N tokens
--           per P, at most B at once
-- returns {allowed (1/0), remaining, retry_after_us, delay_us}
--           {1, remaining, 0, 0}      admitted now
--           {1, remaining, 0, delay}  booked: taken for the slot delay us from now (0 < delay <= W)
--           {0, remaining, retry_after, 0}
--                                     denied, nothing taken: every limit has the tokens in
--                                     retry_after us (> W), so a booking within W becomes
--                                     possible in retry_after - W us
--           remaining: tokens left under the tightest limit (after this request, at its slot)
--
-- A generic cell rate algorithm, which is a token bucket kept as its debt: each bucket stores
-- "debt last" where debt is in units of 1/N microsecond-tokens (one token costs P units, and
-- every microsecond repays N), so all arithmetic is on integers below 2^53 and nothing is
-- rounded in anyone's favour. Time is Redis TIME. The debt is always stored as of `last` =
-- the time of writing: a booking adds the repayment still due before its slot, so a bucket
-- with bookings may owe more than its capacity, and anyone reading it (older clients too)
-- sees the slots already taken. A denied request writes nothing; a bucket expires when its
-- debt is repaid (full again).
--
-- Several limits: limit i has the tokens from delay_i = ceil((debt_i + cost P_i - B_i P_i) / N_i)
-- on; the slot is the latest of them, delay = max(delay_i), and each bucket is advanced to it:
-- repaid until then (never below empty), then charged. Stored as of now, that is
-- max(debt_i, delay N_i) + cost P_i. W = 0 is the plain check: delay 0 or a denial.
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000000 + tonumber(now_parts[2])
local cost = tonumber(ARGV[1])
local max_wait = tonumber(ARGV[2])

-- ceil(a / n) for integers, exact: the float quotient is only a first guess.
local function ceil_div(a, n)
  local q = math.floor(a / n)
  while q * n < a do q = q + 1 end
  while q > 0 and (q - 1) * n >= a do q = q - 1 end
  return q
end

local buckets = {}
local delay = 0
for i, key in ipairs(KEYS) do
  local base = 3 + 3 * (i - 1)
  local n, p, b = tonumber(ARGV[base]), tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2])
  local debt = 0
  local state = redis.call('GET', key)
  if state then
    local d, l = string.match(state, '^(%d+) (%d+)$')
    debt = tonumber(d)
    local elapsed = math.max(0, now - tonumber(l))
    -- Repay N per microsecond; compare before multiplying so the product stays small.
    if elapsed >= ceil_div(debt, n) then
      debt = 0
    else
      debt = debt - elapsed * n
    end
  end
  local short = debt + cost * p - b * p
  if short > 0 then
    delay = math.max(delay, ceil_div(short, n))
  end
  buckets[i] = {key, n, p, b, debt, short}
end

local remaining = nil
if delay > max_wait then
  -- As the plain check always answered: a limit that would admit counts after the request.
  for _, u in ipairs(buckets) do
    local p, b, debt, short = u[3], u[4], u[5], u[6]
    local left = math.max(0, math.floor((b * p - debt - (short > 0 and 0 or cost * p)) / p))
    remaining = math.min(remaining or left, left)
  end
  return {0, remaining, delay, 0}
end

for _, u in ipairs(buckets) do
  local key, n, p, b, debt = u[1], u[2], u[3], u[4], u[5]
  local new_debt = math.max(debt, delay * n) + cost * p
  local left = math.floor((b * p - (new_debt - delay * n)) / p)
  remaining = math.min(remaining or left, left)
  redis.call('SET', key, string.format('%.0f %.0f', new_debt, now), 'PX',
    math.max(1, ceil_div(new_debt, n * 1000)))
end
return {1, remaining, 0, delay}
