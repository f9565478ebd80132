#!/usr/bin/env bash
# Load benchmark: the sidecar beside nginx, in one run, on this machine.
#
#   benches/load/run.sh                      # full run: 3 rounds x 10 s per target and mode (~15 min)
#   ROUNDS=2 DURATION=5 benches/load/run.sh  # quicker
#
# What it does (everything on 127.0.0.1; every process it starts is stopped by PID on exit):
#   1. installs wrk and nginx from Debian if missing (apt-get; no system nginx is started or used),
#      builds `cargo build --release --bin preauth-sidecar --example fake_upstream --example openloop`
#      (fat LTO: minutes).
#   2. starts the fast mock upstream (target/release/examples/fake_upstream), nginx as a plain
#      keepalive reverse proxy to it (private prefix and port, benches/load/nginx.conf.tmpl), the
#      sidecar on embedded state and the sidecar on Redis (REDIS_URL, unique key prefix deleted at the
#      end), both with every guard, reservation, settlement and the outbox on, PREAUTH_THREADS=1.
#   3. measures interleaved rounds with wrk (benches/load/post.lua): direct / nginx / embedded / redis
#      x JSON / SSE (5 chunks): req/s, p50/p99, CPU µs per request of the proxy process
#      (/proc/PID/stat), RSS, non-2xx (must be 0, else it fails). Load generator and system under test
#      are pinned to different CPUs.
#   4. a fixed-rate open-loop run (FIXED_RATE req/s, latency from the scheduled start): added p99 over
#      direct. Generator: target/release/examples/openloop (examples/openloop.rs, one thread, timerfd
#      schedule); if it is missing, bench.py's Python asyncio generator (scheduling lag of its own
#      often 0.3-1.8 ms at p99 on 2 CPUs). The report names the generator used.
#   5. a 100k-tenant run on a fresh embedded sidecar (one JWT per tenant): RSS.
#   6. prints markdown tables and writes them to benches/load/results/<timestamp>.md.
#
# Environment (defaults):
#   ROUNDS=3 DURATION=10 CONNECTIONS=32 WARMUP=2     rounds, seconds per wrk run, wrk connections, warm-up s
#   SUT_CPUS=0 LOADGEN_CPUS=1                         taskset CPU lists: proxies + mock / load generators
#   TARGETS="direct nginx embedded redis" MODES="json sse"
#   FIXED_RATE=1000 FIXED_DURATION=10 FIXED_MODES="json sse" FIXED_ROUNDS=$ROUNDS FIXED_CONNECTIONS=16
#   OPENLOOP_BIN=target/release/examples/openloop     fixed-rate generator; a path that does not exist
#                         (e.g. OPENLOOP_BIN=none) selects the Python fallback
#   LOADGEN_RT=1          run the fixed-rate generator SCHED_FIFO 1 (chrt) when allowed, so that other
#                         work on the machine does not delay its sends; 0: normal scheduling
#   TENANTS=100000 (0 skips; at most 100000: the global guard cap is 100000/min) TENANTS_IDENTITY=jwt|header TENANTS_CONNECTIONS=32 TENANTS_RECLAIM_WAIT=0 (s)
#   STORE_TIMEOUT_MS=1000 GATE_TIMEOUT_MS=2000  sidecar store/gate timeouts (production 20/50 fail closed
#                         when 32 connections queue on one pinned thread)
#   SSE_INCLUDE_USAGE=1   SSE bodies carry stream_options.include_usage=true (same bytes on every
#                         target); 0 makes the sidecar splice it in
#   BENCH_NICE=-10        nice level of everything it starts (SUT and load generators; root only) so that
#                         other work on the machine preempts the measurement less
#   REDIS_URL=redis://127.0.0.1:6379
#   PROFILE=0             1: also perf record -g the embedded sidecar under wrk (JSON) and list the top
#                         15 self-cost symbols (installs linux-perf if missing)
#   SKIP_BUILD=0  SKIP_INSTALL=0  KEEP_WORKDIR=0  RESULTS_DIR=benches/load/results
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)

say() { printf '[run.sh %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# ---- 1. install ---------------------------------------------------------------------------------
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  need=()
  command -v wrk >/dev/null 2>&1 || need+=(wrk)
  command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
  command -v taskset >/dev/null 2>&1 || need+=(util-linux)
  command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
  command -v python3 >/dev/null 2>&1 || need+=(python3)
  if [ "${PROFILE:-0}" = 1 ] && ! command -v perf >/dev/null 2>&1; then need+=(linux-perf); fi
  if [ ${#need[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    say "installing ${need[*]} (apt-get)"
    $SUDO apt-get update -qq
    # policy-rc.d (if present) keeps the package's system nginx from starting; we never use it:
    # our nginx runs with a private prefix on its own port.
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  ./scripts/setup.sh
fi
export PATH="$PATH:/usr/sbin"

# ---- build -------------------------------------------------------------------------------------
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  say "cargo build --release --bin preauth-sidecar --example fake_upstream --example openloop (fat LTO: a cold build takes minutes)"
  t0=$(date +%s)
  cargo build --release --bin preauth-sidecar --example fake_upstream --example openloop
  say "build done in $(( $(date +%s) - t0 )) s"
fi

if [[ " ${TARGETS:-direct nginx embedded redis} " == *" redis "* ]]; then
  if ! redis-cli -u "${REDIS_URL:-redis://127.0.0.1:6379}" ping 2>/dev/null | grep -q PONG; then
    echo "run.sh: Redis at ${REDIS_URL:-redis://127.0.0.1:6379} does not answer PING; start it or set TARGETS without redis" >&2
    exit 1
  fi
fi

# ---- run ---------------------------------------------------------------------------------------
WORKDIR=$(mktemp -d /tmp/preauth-load.XXXXXX)
cleanup() {
  rc=$?
  # Backstop: bench.py stops what it started; anything still alive from its PID list is ended here.
  if [ -f "$WORKDIR/pids" ]; then
    while read -r pid; do
      [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && kill -INT "$pid" 2>/dev/null || true
    done < "$WORKDIR/pids"
    sleep 1
    while read -r pid; do
      [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    done < "$WORKDIR/pids"
  fi
  if [ "${KEEP_WORKDIR:-0}" = 1 ] || [ $rc -ne 0 ]; then
    say "work directory kept: $WORKDIR (logs, env files, runs.jsonl)"
  else
    rm -rf "$WORKDIR"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

python3 "$ROOT/benches/load/bench.py" run --workdir "$WORKDIR"
