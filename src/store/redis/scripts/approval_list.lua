-- Newest first, at most ARGV[3] records whose status as of ARGV[2] is ARGV[4] ('' any); scans at
-- most ARGV[5] index entries. KEYS: 1 by_created index; ARGV: 1 base, 2 now, 3 limit, 4 status, 5 scan
local now = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local out = {}
if limit <= 0 then return out end
for _, id in ipairs(redis.call('ZREVRANGE', KEYS[1], 0, tonumber(ARGV[5]) - 1)) do
  local h = redis.call('HGETALL', approval_key(ARGV[1], id))
  if #h == 0 then
    redis.call('ZREM', KEYS[1], id)
  else
    local status, expires
    for i = 1, #h, 2 do
      if h[i] == 'status' then status = h[i + 1] elseif h[i] == 'expires_at' then expires = tonumber(h[i + 1]) end
    end
    if status == 'pending' and now >= expires then status = 'expired' end
    if ARGV[4] == '' or ARGV[4] == status then
      out[#out + 1] = h
      if #out >= limit then break end
    end
  end
end
return out
