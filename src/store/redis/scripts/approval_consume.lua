-- Single use of a token id across every replica: SET NX, remembered until ARGV[3] (Unix ms).
-- KEYS: 1 jti key, 2 pending index; ARGV: 1 base, 2 jti, 3 forget at ms, 4 now, 5 retention ms
-- Returns 1 consumed, 0 replayed
if not redis.call('SET', KEYS[1], '1', 'NX', 'PXAT', ARGV[3]) then return 0 end
local rk = approval_key(ARGV[1], ARGV[2])
local st = redis.call('HMGET', rk, 'status', 'pkey')
if st[1] == 'pending' or st[1] == 'approved' then
  redis.call('HSET', rk, 'status', 'consumed', 'consumed_at', ARGV[4])
  redis.call('PEXPIRE', rk, tonumber(ARGV[5]))
  unindex_pending(KEYS[2], ARGV[2], st[2])
end
return 1
