-- Single node: undo one admission. KEYS as admit.lua (4 unused); ARGV: 1 tenant, 2 seq, 3 admitted at
rollback_tenant(KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], ARGV[2], tonumber(ARGV[3]))
rollback_global(KEYS[1], KEYS[2], ARGV[1], ARGV[2])
return 1
