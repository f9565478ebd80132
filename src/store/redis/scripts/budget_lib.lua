-- Shared by the budget scripts. Every budget key shares the hash tag of ARGV[1] (the base),
-- so keys built here are in the slot of the declared ones.
-- Reservation record (hash) fields: tenant tier request_id model month amount created_at state
-- [actual finished_at]; state is active | settled | released.
local REC_FIELDS = {'tenant', 'tier', 'request_id', 'model', 'month', 'amount', 'created_at'}

-- Integer text for a hash field written from Lua arithmetic (a Lua number handed to redis.call
-- is formatted as a float, in exponent form when large). Exact below 2^53 micro-USD.
local function int(n) return string.format('%d', n) end

local function rec_key(base, id) return base .. 'r:' .. id end
local function spend_key(base, tenant, month) return base .. 's:' .. tenant .. ':' .. month end

-- Finished reservations in finishing order (a list: O(1) to append): about max_finished are
-- remembered, the oldest records deleted first, so Redis memory does not grow with request
-- volume. The oldest are trimmed in batches of max_finished / 1000 + 1 (one call for a hundred).
-- The list's TTL is refreshed when it is created, trimmed, or reaches a multiple of 1000, not on
-- every append: should it expire between refreshes, the fewer than 1000 records appended since
-- the last one outlive it only until their own TTL (the same length).
local function remember_finished(base, id, finished_ttl, max_finished)
  local kfin = base .. 'finished'
  local len = redis.call('RPUSH', kfin, id)
  local over = len - max_finished
  local refresh = len == 1 or len % 1000 == 0
  if over > math.floor(max_finished / 1000) then
    local old = redis.call('LRANGE', kfin, 0, over - 1)
    redis.call('LTRIM', kfin, over, -1)
    local keys = {}
    for i, old_id in ipairs(old) do
      keys[i] = rec_key(base, old_id)
    end
    redis.call('DEL', unpack(keys))
    refresh = true
  end
  if refresh then
    redis.call('PEXPIRE', kfin, finished_ttl)
  end
end

-- Ends an active reservation (actual == nil: released). Returns the record as
-- {id, tenant, tier, request_id, model, month, amount, created_at} or a status code:
-- 0 no such record, -1 not active.
local function finish(base, kactive, id, actual, now, finished_ttl, spend_ttl, max_finished)
  local rk = rec_key(base, id)
  local r = redis.call('HMGET', rk, 'state', unpack(REC_FIELDS))
  local state = table.remove(r, 1)
  if not state then
    redis.call('ZREM', kactive, id)
    return 0
  end
  if state ~= 'active' then return -1 end
  local sk = spend_key(base, r[1], r[5])
  -- The spend hash is rewritten from the values just read (atomic inside the script): one call
  -- instead of an HINCRBY per field.
  local s = redis.call('HMGET', sk, 'reserved', 'active', 'spent')
  local reserved = int(tonumber(s[1] or '0') - tonumber(r[6]))
  local active = int(tonumber(s[2] or '0') - 1)
  if actual ~= nil then
    redis.call('HSET', sk, 'reserved', reserved, 'active', active, 'spent', int(tonumber(s[3] or '0') + actual))
    redis.call('HSET', rk, 'state', 'settled', 'actual', actual, 'finished_at', now)
  else
    redis.call('HSET', sk, 'reserved', reserved, 'active', active)
    redis.call('HSET', rk, 'state', 'released', 'finished_at', now)
  end
  if not (s[1] or s[2] or s[3]) then
    redis.call('PEXPIRE', sk, spend_ttl) -- re-created (it had expired): see reserve.lua
  end
  redis.call('PEXPIRE', rk, finished_ttl)
  redis.call('ZREM', kactive, id)
  remember_finished(base, id, finished_ttl, max_finished)
  local out = {id}
  for i = 1, #r do out[i + 1] = r[i] end
  return out
end
