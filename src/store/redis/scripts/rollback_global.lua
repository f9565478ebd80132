-- Cluster: KEYS: 1 window, 2 tenants; ARGV: 1 tenant, 2 seq
rollback_global(KEYS[1], KEYS[2], ARGV[1], ARGV[2])
return 1
