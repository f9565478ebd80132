-- Up to ARGV[2] active reservations, oldest first. KEYS: 1 active index; ARGV: 1 base, 2 limit
local ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)
local out = {}
for _, id in ipairs(ids) do
  local rk = rec_key(ARGV[1], id)
  local r = redis.call('HMGET', rk, 'state', unpack(REC_FIELDS))
  if r[1] == 'active' then
    local row = {id}
    for i = 2, #r do row[i] = r[i] end
    out[#out + 1] = row
  elseif not r[1] then
    redis.call('ZREM', KEYS[1], id)
  end
end
return out
