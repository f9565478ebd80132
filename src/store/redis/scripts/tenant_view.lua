-- KEYS: 1 minute, 2 tokens, 3 tokens sum, 4 day, 5 leases; ARGV: 1 now
return tenant_state(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], tonumber(ARGV[1]))
