-- KEYS: 1 by_created index, 2 pending index, 3 pending key (tenant + fingerprint)
-- ARGV: 1 base, 2 id, 3 doc, 4 created_at, 5 expires_at, 6 now, 7 retention ms, 8 max approvals,
--       9 longest token ttl ms
-- Returns {1, id} (created) or {0, existing id}
local now = tonumber(ARGV[6])
local existing = redis.call('GET', KEYS[3])
if existing then
  local st = redis.call('HMGET', approval_key(ARGV[1], existing), 'status', 'expires_at')
  if st[1] == 'pending' and tonumber(st[2]) > now then return {0, existing} end
end
local id = ARGV[2]
local expires = tonumber(ARGV[5])
local retention = tonumber(ARGV[7])
local rk = approval_key(ARGV[1], id)
redis.call('HSET', rk, 'doc', ARGV[3], 'status', 'pending', 'created_at', ARGV[4], 'expires_at', ARGV[5],
  'pkey', KEYS[3])
local ttl = expires + retention - now
if ttl < 1 then ttl = 1 end
redis.call('PEXPIRE', rk, ttl)
redis.call('ZADD', KEYS[1], ARGV[4], id)
redis.call('ZADD', KEYS[2], ARGV[5], id)
if expires > now then
  redis.call('SET', KEYS[3], id, 'PX', expires - now)
end
-- Housekeeping: expired pending entries, index entries whose record is surely gone, the cap.
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - retention - tonumber(ARGV[9])))
local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[8])
if over > 0 then
  for _, old in ipairs(redis.call('ZRANGE', KEYS[1], 0, over - 1)) do
    local ok = approval_key(ARGV[1], old)
    unindex_pending(KEYS[2], old, redis.call('HGET', ok, 'pkey'))
    redis.call('DEL', ok)
  end
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, over - 1)
end
return {1, id}
