-- Shared by the approval scripts. Every approval key shares the hash tag of ARGV[1] (the base).
-- Approval record (hash): doc (JSON as created), status, created_at, expires_at, pkey
-- [decided_at decided_reason consumed_at].
local function approval_key(base, id) return base .. 'a:' .. id end

local function unindex_pending(kpending, id, pkey)
  redis.call('ZREM', kpending, id)
  if pkey and redis.call('GET', pkey) == id then
    redis.call('DEL', pkey)
  end
end
