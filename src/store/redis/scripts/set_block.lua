-- KEYS: 1 block; ARGV: 1 until ms, 2 margin ms. Keeps the later block. The value is compared
-- with the caller's clock on reads; the key's TTL (server clock) only bounds its life.
local until_ms = tonumber(ARGV[1])
local cur = redis.call('GET', KEYS[1])
if cur and tonumber(cur) >= until_ms then return 0 end
local t = redis.call('TIME')
local server_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = until_ms - server_ms
if ttl < 0 then ttl = 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl + tonumber(ARGV[2]))
return 1
