-- Single node: one atomic admission across the global and the tenant keys.
-- KEYS: 1 global window, 2 global tenants, 3 global block, 4 global seq,
--       5 minute, 6 tokens, 7 tokens sum, 8 day, 9 leases
-- ARGV: 1 tenant, 2 now ms, 3 tokens, 4 lease ttl ms (-1: none)
-- Returns {seq, daily, minute, minute_oldest, in_flight, tokens, tokens_oldest, global, distinct, block}
local now = tonumber(ARGV[2])
local g, seq = admit_global(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], now, nil)
local t = admit_tenant(KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], seq, now, ARGV[3], tonumber(ARGV[4]))
return {seq, t[1], t[2], t[3], t[4], t[5], t[6], g[1], g[2], g[3]}
