-- Cluster: the global half of an admission (one slot). KEYS: 1 window, 2 tenants, 3 block
-- ARGV: 1 tenant, 2 now ms, 3 seq. Returns {global, distinct, block}
return (admit_global(KEYS[1], KEYS[2], KEYS[3], nil, ARGV[1], tonumber(ARGV[2]), ARGV[3]))
