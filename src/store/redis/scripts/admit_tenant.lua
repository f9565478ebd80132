-- Cluster: the tenant half of an admission (the tenant's slot).
-- KEYS: 1 minute, 2 tokens, 3 tokens sum, 4 day, 5 leases; ARGV: 1 seq, 2 now, 3 tokens, 4 lease ttl
return admit_tenant(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4]))
