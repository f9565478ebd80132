-- The fleet-wide half of a settlement turn: claims reservation ARGV[2] for owner ARGV[3] until
-- ARGV[4] + ARGV[5] ms (ARGV[5] > 0), or gives the owner's claim back (ARGV[5] = 0).
-- KEYS: 1 active index (its slot); ARGV: 1 base, 2 id, 3 owner, 4 now, 5 ttl
-- Returns 1: claimed, given back, or nothing to claim (unknown or no longer active: the
-- caller's read of the reservation says so); 0: another owner's claim is in force.
local rk = rec_key(ARGV[1], ARGV[2])
local r = redis.call('HMGET', rk, 'state', 'claim', 'claim_until')
local ttl = tonumber(ARGV[5])
if ttl == 0 then
  if r[2] == ARGV[3] then redis.call('HDEL', rk, 'claim', 'claim_until') end
  return 1
end
if r[1] ~= 'active' then return 1 end
if r[2] and r[2] ~= ARGV[3] and tonumber(r[3] or '0') > tonumber(ARGV[4]) then return 0 end
redis.call('HSET', rk, 'claim', ARGV[3], 'claim_until', int(tonumber(ARGV[4]) + ttl))
return 1
