-- Shared by the counter scripts (prepended to each). Times are the caller's injected Unix ms;
-- key TTLs are real time and only bound how long an idle key can linger.
local WINDOW_MS = 60000
local WINDOW_TTL_MS = 120000
local DAY_TTL_MS = 172800000
local LEASE_TTL_MARGIN_MS = 60000

local function num(v)
  if v then return tonumber(v) end
  return nil
end

local function oldest_score(key)
  local r = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if #r == 0 then return -1 end
  return tonumber(r[2])
end

-- Global window: members "seq|tenant" scored by admission ms; hash tenant -> entries in window.
local function prune_global(kw, kt, horizon)
  local old = redis.call('ZRANGEBYSCORE', kw, '-inf', horizon)
  if #old > 0 then
    -- Counted per tenant first: after a pause the whole window may go at once, and one call per
    -- tenant (not per entry) keeps that from stalling Redis.
    local gone = {}
    for _, m in ipairs(old) do
      local sep = string.find(m, '|', 1, true)
      local tenant = string.sub(m, sep + 1)
      gone[tenant] = (gone[tenant] or 0) + 1
    end
    for tenant, n in pairs(gone) do
      if redis.call('HINCRBY', kt, tenant, -n) <= 0 then
        redis.call('HDEL', kt, tenant)
      end
    end
    redis.call('ZREMRANGEBYSCORE', kw, '-inf', horizon)
  end
end

local function global_state(kw, kt, kb, now)
  prune_global(kw, kt, now - WINDOW_MS)
  local block = num(redis.call('GET', kb))
  if block == nil or block <= now then block = -1 end
  local requests = redis.call('ZCARD', kw)
  local distinct = 0
  if requests == 0 then
    redis.call('DEL', kt)
  else
    distinct = redis.call('HLEN', kt)
  end
  return {requests, distinct, block}
end

local function admit_global(kw, kt, kb, kseq, tenant, now, seq)
  local g = global_state(kw, kt, kb, now)
  if seq == nil then
    seq = string.format('%d', redis.call('INCR', kseq))
  end
  redis.call('ZADD', kw, now, seq .. '|' .. tenant)
  redis.call('HINCRBY', kt, tenant, 1)
  redis.call('PEXPIRE', kw, WINDOW_TTL_MS)
  redis.call('PEXPIRE', kt, WINDOW_TTL_MS)
  return g, seq
end

local function rollback_global(kw, kt, tenant, seq)
  if redis.call('ZREM', kw, seq .. '|' .. tenant) == 1 then
    if redis.call('HINCRBY', kt, tenant, -1) <= 0 then
      redis.call('HDEL', kt, tenant)
    end
  end
end

-- Tenant: minute window (member seq), token window (member "seq:tokens") with a running sum,
-- UTC-day counter, leases (member seq scored by expiry).
-- kday == nil: the day's count is not read (admit_tenant learns it from its INCR).
local function tenant_state(km, ktk, ksum, kday, kl, now)
  local horizon = now - WINDOW_MS
  redis.call('ZREMRANGEBYSCORE', km, '-inf', horizon)
  local old = redis.call('ZRANGEBYSCORE', ktk, '-inf', horizon)
  local tsum = nil
  if #old > 0 then
    local sub = 0
    for _, m in ipairs(old) do
      local sep = string.find(m, ':', 1, true)
      sub = sub + tonumber(string.sub(m, sep + 1))
    end
    redis.call('ZREMRANGEBYSCORE', ktk, '-inf', horizon)
    tsum = redis.call('DECRBY', ksum, sub)
  end
  local tcount = redis.call('ZCARD', ktk)
  local toldest = -1
  if tcount == 0 then
    redis.call('DEL', ksum)
    tsum = 0
  else
    if tsum == nil then tsum = num(redis.call('GET', ksum)) or 0 end
    toldest = oldest_score(ktk)
  end
  redis.call('ZREMRANGEBYSCORE', kl, '-inf', now)
  local mcount = redis.call('ZCARD', km)
  local moldest = -1
  if mcount > 0 then moldest = oldest_score(km) end
  local daily = 0
  if kday then daily = num(redis.call('GET', kday)) or 0 end
  return {daily, mcount, moldest, redis.call('ZCARD', kl), tsum, toldest}
end

local function admit_tenant(km, ktk, ksum, kday, kl, seq, now, tokens_arg, lease_ttl)
  local t = tenant_state(km, ktk, ksum, nil, kl, now)
  -- The count before this admission; the key names its day, so its TTL is set once, at creation.
  local daily = redis.call('INCR', kday)
  t[1] = daily - 1
  if daily == 1 then
    redis.call('PEXPIRE', kday, DAY_TTL_MS)
  end
  redis.call('ZADD', km, now, seq)
  redis.call('PEXPIRE', km, WINDOW_TTL_MS)
  local tokens = tonumber(tokens_arg)
  if tokens > 0 then
    redis.call('ZADD', ktk, now, seq .. ':' .. tokens_arg)
    redis.call('INCRBY', ksum, tokens_arg)
    redis.call('PEXPIRE', ktk, WINDOW_TTL_MS)
    redis.call('PEXPIRE', ksum, WINDOW_TTL_MS)
  end
  if lease_ttl >= 0 then
    redis.call('ZADD', kl, now + lease_ttl, seq)
    local want = lease_ttl + LEASE_TTL_MARGIN_MS
    if redis.call('PTTL', kl) < want then
      redis.call('PEXPIRE', kl, want)
    end
  end
  return t
end

-- Idempotent: the day's count goes down only with the admission's minute-window member, so a
-- rollback sent again (its first answer lost to a timeout) takes nothing twice.
local function rollback_tenant(km, ktk, ksum, kday, kl, seq, at)
  if redis.call('ZREM', km, seq) == 1 then
    local daily = num(redis.call('GET', kday))
    if daily ~= nil and daily > 0 then
      redis.call('DECR', kday)
    end
  end
  local prefix = seq .. ':'
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', ktk, at, at)) do
    if string.sub(m, 1, #prefix) == prefix then
      redis.call('ZREM', ktk, m)
      redis.call('DECRBY', ksum, tonumber(string.sub(m, #prefix + 1)))
      break
    end
  end
  redis.call('ZREM', kl, seq)
end
