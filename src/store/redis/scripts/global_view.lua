-- KEYS: 1 window, 2 tenants, 3 block; ARGV: 1 now. Returns {global, distinct, block}
return global_state(KEYS[1], KEYS[2], KEYS[3], tonumber(ARGV[1]))
