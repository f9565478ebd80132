-- wrk script for benches/load/run.sh: POSTs one chat-completion body with a Bearer token.
-- Env: BENCH_BODY (request body), BENCH_TOKEN (tenant JWT), BENCH_PATH (default /v1/chat/completions),
--      BENCH_EXTRA_HEADER ("name: value", optional).
-- At the end it prints one JSON line, prefixed "BENCH_JSON ", that run.sh/bench.py parses:
-- requests, duration (µs), error counts, latency percentiles (µs).
wrk.method = "POST"
wrk.path = os.getenv("BENCH_PATH") or "/v1/chat/completions"
wrk.body = os.getenv("BENCH_BODY") or '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"max_tokens":16}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("BENCH_TOKEN") or "none")
local extra = os.getenv("BENCH_EXTRA_HEADER")
if extra and extra ~= "" then
  local k, v = extra:match("^%s*([^:]+)%s*:%s*(.-)%s*$")
  if k then wrk.headers[k] = v end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.max, latency.mean))
end
