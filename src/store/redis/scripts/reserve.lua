-- KEYS: 1 spend hash, 2 active index
-- ARGV: 1 base, 2 id, 3 tenant, 4 tier, 5 request_id, 6 model, 7 month, 8 now, 9 budget,
--       10 amount, 11 min amount (-1: all or nothing), 12 spend ttl ms, 13 active record ttl ms
-- Returns {1, held} or {0, spent, reserved, remaining}
local a = redis.call('HMGET', KEYS[1], 'spent', 'reserved', 'active')
local spent = tonumber(a[1] or '0')
local reserved = tonumber(a[2] or '0')
local budget = tonumber(ARGV[9])
local amount = tonumber(ARGV[10])
local min = tonumber(ARGV[11])
local remaining = budget - spent - reserved
local hold
if amount <= remaining then
  hold = amount
elseif min >= 0 and math.max(remaining, 0) >= min then
  -- What is left, or nothing past the budget (an approved over-budget request, min 0).
  hold = math.max(remaining, 0)
else
  if remaining < 0 then remaining = 0 end
  return {0, spent, reserved, remaining}
end
local rk = rec_key(ARGV[1], ARGV[2])
redis.call('HSET', rk, 'tenant', ARGV[3], 'tier', ARGV[4], 'request_id', ARGV[5], 'model', ARGV[6],
  'month', ARGV[7], 'amount', hold, 'created_at', ARGV[8], 'state', 'active')
redis.call('PEXPIRE', rk, tonumber(ARGV[13]))
-- Written from the values just read (one call instead of two HINCRBYs; the script is atomic).
-- `tier`: the tier the tenant's latest hold resolved to, for every replica's tenant view.
redis.call('HSET', KEYS[1], 'reserved', int(reserved + hold), 'active', int(tonumber(a[3] or '0') + 1),
  'tier', ARGV[4])
if not (a[1] or a[2] or a[3]) then
  -- A month's spend hash gets its TTL when created: 70 days outlast the month and any late settle.
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[12]))
end
redis.call('ZADD', KEYS[2], ARGV[8], ARGV[2])
return {1, hold}
