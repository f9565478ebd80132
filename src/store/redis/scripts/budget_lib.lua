-- Shared by the budget scripts. Every budget key shares the hash tag of ARGV[1] (the base),
-- so keys built here are in the slot of the declared ones.
-- Reservation record (hash) fields: tenant tier request_id model month amount created_at state
-- [actual finished_at]; state is active | settled | released.
local REC_FIELDS = {'tenant', 'tier', 'request_id', 'model', 'month', 'amount', 'created_at'}

local function rec_key(base, id) return base .. 'r:' .. id end
local function spend_key(base, tenant, month) return base .. 's:' .. tenant .. ':' .. month end

-- Finished reservations in finishing order (a list: O(1) to append): about max_finished are
-- remembered, the oldest records deleted first, so Redis memory does not grow with request
-- volume. The oldest are trimmed in batches of max_finished / 1000 + 1 (one call for a hundred).
local function remember_finished(base, id, finished_ttl, max_finished)
  local kfin = base .. 'finished'
  local over = redis.call('RPUSH', kfin, id) - max_finished
  if over > math.floor(max_finished / 1000) then
    local old = redis.call('LRANGE', kfin, 0, over - 1)
    redis.call('LTRIM', kfin, over, -1)
    local keys = {}
    for i, old_id in ipairs(old) do
      keys[i] = rec_key(base, old_id)
    end
    redis.call('DEL', unpack(keys))
  end
  redis.call('PEXPIRE', kfin, finished_ttl)
end

-- Ends an active reservation (actual == nil: released). Returns the record as
-- {id, tenant, tier, request_id, model, month, amount, created_at} or a status code:
-- 0 no such record, -1 not active.
local function finish(base, kactive, id, actual, now, finished_ttl, spend_ttl, max_finished)
  local rk = rec_key(base, id)
  local state = redis.call('HGET', rk, 'state')
  if not state then
    redis.call('ZREM', kactive, id)
    return 0
  end
  if state ~= 'active' then return -1 end
  local r = redis.call('HMGET', rk, unpack(REC_FIELDS))
  local sk = spend_key(base, r[1], r[5])
  redis.call('HINCRBY', sk, 'reserved', -tonumber(r[6]))
  redis.call('HINCRBY', sk, 'active', -1)
  if actual ~= nil then
    redis.call('HINCRBY', sk, 'spent', actual)
    redis.call('HSET', rk, 'state', 'settled', 'actual', actual, 'finished_at', now)
  else
    redis.call('HSET', rk, 'state', 'released', 'finished_at', now)
  end
  redis.call('PEXPIRE', sk, spend_ttl)
  redis.call('PEXPIRE', rk, finished_ttl)
  redis.call('ZREM', kactive, id)
  remember_finished(base, id, finished_ttl, max_finished)
  local out = {id}
  for i = 1, #r do out[i + 1] = r[i] end
  return out
end
