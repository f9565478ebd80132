-- Cluster: KEYS: 1 minute, 2 tokens, 3 tokens sum, 4 day, 5 leases; ARGV: 1 seq, 2 admitted at
rollback_tenant(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[1], tonumber(ARGV[2]))
return 1
