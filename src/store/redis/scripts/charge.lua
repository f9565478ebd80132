-- Adds ARGV[5] micro-USD to the spend of tenant ARGV[3] in month ARGV[4], once per charge id
-- ARGV[2]: a retry of a charge whose first attempt landed unseen (a timeout) adds nothing while
-- the id's marker lives (ARGV[7] ms).
-- KEYS: 1 active index (its slot); ARGV: 1 base, 2 charge id, 3 tenant, 4 month, 5 amount,
--       6 spend ttl, 7 marker ttl
-- Returns 1 charged, 0 already charged under this id.
if not redis.call('SET', ARGV[1] .. 'c:' .. ARGV[2], '1', 'NX', 'PX', ARGV[7]) then return 0 end
local sk = spend_key(ARGV[1], ARGV[3], ARGV[4])
redis.call('HINCRBY', sk, 'spent', ARGV[5])
redis.call('PEXPIRE', sk, ARGV[6])
return 1
