-- Release up to ARGV[4] active reservations created before ARGV[2] (strictly). Each is claimed
-- by its state transition inside this atomic script: concurrent sweeps never return one twice.
-- KEYS: 1 active index; ARGV: 1 base, 2 older than, 3 now, 4 batch, 5 finished ttl, 6 spend ttl,
--       7 finished records remembered at most
-- A reservation that a replica has claimed for its settlement (claim.lua) is left to it; such
-- ones do not count as scanned, so a batch full of them ends the sweep (the next one retries).
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[2], 'LIMIT', 0, tonumber(ARGV[4]))
local out = {}
local skipped = 0
for _, id in ipairs(ids) do
  local until_ms = redis.call('HGET', rec_key(ARGV[1], id), 'claim_until')
  if until_ms and tonumber(until_ms) > tonumber(ARGV[3]) then
    skipped = skipped + 1
  else
    local r = finish(ARGV[1], KEYS[1], id, nil, ARGV[3], tonumber(ARGV[5]), tonumber(ARGV[6]),
      tonumber(ARGV[7]))
    if type(r) == 'table' then
      out[#out + 1] = r
    else
      redis.call('ZREM', KEYS[1], id)
    end
  end
end
return {#ids - skipped, out}
