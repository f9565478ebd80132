-- Frees the lease parked for a gate-API hold (any replica may end the hold). Both keys are in
-- the tenant's slot. KEYS: 1 parked (holds the lease's seq), 2 leases. Returns 1 freed, 0 none.
local seq = redis.call('GET', KEYS[1])
if not seq then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], seq)
return 1
