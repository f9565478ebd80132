-- Compare-and-set of the runtime policy document on its version, then publish it.
-- KEYS: 1 document; ARGV: 1 expected version (-1: absent), 2 new document, 3 channel
-- Returns 1 written, 0 conflict
local cur = redis.call('GET', KEYS[1])
local v = -1
if cur then
  local ok, doc = pcall(cjson.decode, cur)
  if ok and type(doc) == 'table' and tonumber(doc.version) then v = tonumber(doc.version) else v = -2 end
end
if v ~= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[2])
return 1
