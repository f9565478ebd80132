-- Release up to ARGV[4] active reservations created before ARGV[2] (strictly). Each is claimed
-- by its state transition inside this atomic script: concurrent sweeps never return one twice.
-- KEYS: 1 active index; ARGV: 1 base, 2 older than, 3 now, 4 batch, 5 finished ttl, 6 spend ttl,
--       7 finished records remembered at most
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[2], 'LIMIT', 0, tonumber(ARGV[4]))
local out = {}
for _, id in ipairs(ids) do
  local r = finish(ARGV[1], KEYS[1], id, nil, ARGV[3], tonumber(ARGV[5]), tonumber(ARGV[6]),
    tonumber(ARGV[7]))
  if type(r) == 'table' then
    out[#out + 1] = r
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return {#ids, out}
