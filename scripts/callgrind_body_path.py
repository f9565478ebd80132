#!/usr/bin/env python3
"""Instructions and allocator calls per request-body-path case of benches/hot_path.rs, noise-free.

Runs the bench binary under callgrind at two iteration counts (HOT_PATH_BODY / HOT_PATH_ITERS,
see benches/hot_path.rs) and divides the differences, so start-up costs cancel out.

Usage: scripts/callgrind_body_path.py <hot_path bench binary> [case ...] [--iters N]
  cases: chat chat_stream messages chat_tools_4k (default: all)
Build the binary with `cargo bench --bench hot_path --no-run` (it prints its path).
"""
import os
import re
import subprocess
import sys
import tempfile

ALLOC = re.compile(r'^(mi_malloc\w*|mi_zalloc\w*|mi_realloc\w*|mi_calloc\w*|malloc|calloc|realloc)$')
FREE = re.compile(r'^(mi_free\w*|free)$')


def run(binary, case, iters, out):
    env = dict(os.environ, HOT_PATH_BODY=case, HOT_PATH_ITERS=str(iters))
    subprocess.run(['valgrind', '--tool=callgrind', f'--callgrind-out-file={out}', binary], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    names, total, calls = {}, 0, {}
    callee = None
    for line in open(out):
        if line.startswith('summary:'):
            total = int(line.split()[1])
        m = re.match(r'^(c?fn)=\((\d+)\)(?: (.*))?$', line.strip())
        if m:
            if m.group(3):
                names[m.group(2)] = m.group(3)
            if m.group(1) == 'cfn':
                callee = names.get(m.group(2))
            continue
        if line.startswith('calls=') and callee:
            base = callee.split("'")[0]
            if ALLOC.match(base) or FREE.match(base):
                calls[base] = calls.get(base, 0) + int(line.split('=')[1].split()[0])
    return total, calls


def main():
    args = sys.argv[1:]
    iters = 2001
    if '--iters' in args:
        i = args.index('--iters')
        iters = int(args[i + 1])
        del args[i:i + 2]
    binary, cases = args[0], args[1:] or ['chat', 'chat_stream', 'messages', 'chat_tools_4k']
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            t1, c1 = run(binary, case, 1, f'{tmp}/one.out')
            t2, c2 = run(binary, case, iters, f'{tmp}/many.out')
            n = iters - 1
            per = {k: (c2.get(k, 0) - c1.get(k, 0)) / n for k in set(c1) | set(c2)}
            allocs = sum(v for k, v in per.items() if ALLOC.match(k))
            detail = ', '.join(f'{k} {v:g}' for k, v in sorted(per.items()) if v)
            print(f'{case}: {(t2 - t1) / n:.0f} Ir, {allocs:g} allocations per iteration ({detail})')


if __name__ == '__main__':
    main()
