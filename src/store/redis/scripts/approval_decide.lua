-- Approve or deny a pending, unexpired approval.
-- KEYS: 1 pending index; ARGV: 1 base, 2 id, 3 now, 4 new status, 5 reason ('' none), 6 has reason (0/1),
--       7 retention ms
-- Returns {1} done, {0} not found, {-1, status as of now}
local rk = approval_key(ARGV[1], ARGV[2])
local st = redis.call('HMGET', rk, 'status', 'expires_at', 'pkey')
if not st[1] then return {0} end
local now = tonumber(ARGV[3])
local status = st[1]
if status == 'pending' and now >= tonumber(st[2]) then status = 'expired' end
if status ~= 'pending' then return {-1, status} end
redis.call('HSET', rk, 'status', ARGV[4], 'decided_at', ARGV[3])
if ARGV[6] == '1' then redis.call('HSET', rk, 'decided_reason', ARGV[5]) end
redis.call('PEXPIRE', rk, tonumber(ARGV[7]))
unindex_pending(KEYS[1], ARGV[2], st[3])
return {1}
