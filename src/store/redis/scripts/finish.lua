-- Settle (ARGV[3] = actual >= 0) or release (ARGV[3] = -1) one reservation, exactly once.
-- KEYS: 1 active index; ARGV: 1 base, 2 id, 3 actual, 4 now, 5 finished ttl, 6 spend ttl,
--       7 finished records remembered at most
local actual = tonumber(ARGV[3])
if actual < 0 then actual = nil end
local r = finish(ARGV[1], KEYS[1], ARGV[2], actual, ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]),
  tonumber(ARGV[7]))
if type(r) == 'number' then return {r} end
return {1, r}
