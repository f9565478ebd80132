//! Criterion benchmarks of the per-request work that is not pingora's: the pure decision, the
//! embedded store's admission with 100k tracked tenants, JWT verification, the estimator and
//! the usage scanner.
//!
//! Run: `cargo bench --bench hot_path` (numbers go in the issue notes, never into tests).
//!
//! Instruction counts of the request-body path (noise-free on a shared machine): with
//! `HOT_PATH_BODY=<case>` and `HOT_PATH_ITERS=<n>` set, the binary runs that case `n` times and
//! exits without criterion, e.g.
//! `HOT_PATH_BODY=chat HOT_PATH_ITERS=10000 valgrind --tool=callgrind <bench binary>`;
//! the difference between two iteration counts divided by their difference is the cost of one.
//! `scripts/callgrind_body_path.py <bench binary>` does that for every case, with allocations.

use std::hint::black_box;

use criterion::{criterion_group, Criterion, Throughput};
use preauth_sidecar::decide::estimate::estimate;
use preauth_sidecar::decide::estimate::output_choices;
use preauth_sidecar::decide::json::Doc;
use preauth_sidecar::decide::time::parse_rfc3339;
use preauth_sidecar::decide::usage::{BodyKind, ScanResult, UsageScanner};
use preauth_sidecar::decide::{evaluate, jwt, CountersView, Facts, Mode, Policy, Route, Tier};
use preauth_sidecar::proxy::extract::{inject_include_usage, parse_body};
use preauth_sidecar::store::memory::MemoryCounters;
use preauth_sidecar::store::AdmitRequest;
use serde_json::json;

/// The production allocator, so that allocation costs count as they do in the proxy.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn policy() -> Policy {
    let mut p = Policy::for_test();
    p.fair_use.enabled = true;
    p.fair_use.tokens_per_minute = 1_000_000;
    p.global.per_minute_cap = 100_000;
    p
}

fn bench_decision(c: &mut Criterion) {
    let p = policy();
    let now = parse_rfc3339("2026-11-25T10:00:00Z").unwrap();
    let facts = Facts { tenant: "tenant-42", tier: Tier::Pro, source: "default", estimated_tokens: 500 };
    let mut view = CountersView::default();
    view.tenant.minute_requests = 3;
    view.global.requests_last_minute = 400;
    c.bench_function("decide::evaluate (pure)", |b| {
        b.iter(|| evaluate(black_box(&p), black_box(&facts), black_box(&view), Mode::Hard, now))
    });

    // Admission + decision over 100k tracked tenants, as the proxy does it (embedded store).
    let store = MemoryCounters::new();
    let tenants: Vec<String> = (0..100_000).map(|i| format!("tenant-{i:06}")).collect();
    for (i, t) in tenants.iter().enumerate() {
        store.admit_now(&AdmitRequest { tenant: t, now: now + i as u64 / 100, tokens: 100, lease_ttl_ms: None });
    }
    let mut i = 0usize;
    let mut t = now + 1_000;
    c.bench_function("store admit + evaluate + lease release, 100k tenants", |b| {
        b.iter(|| {
            i = (i + 7919) % tenants.len();
            t += 1;
            let tenant = &tenants[i];
            let req = AdmitRequest { tenant, now: t, tokens: 100, lease_ttl_ms: Some(180_000) };
            let (ticket, view) = store.admit_now(&req);
            let f = Facts { tenant, tier: Tier::Pro, source: "default", estimated_tokens: 100 };
            let d = evaluate(&p, &f, &view, Mode::Hard, t);
            store.release_now(&ticket);
            black_box(d)
        })
    });
}

fn bench_jwt(c: &mut Criterion) {
    let key = b"0123456789abcdef0123456789abcdef";
    let token = jwt::sign_hs256(
        &json!({"sub": "u", "aud": "authenticated", "tenant_id": "acme", "tier": "pro", "exp": 4_000_000_000u64}),
        key,
        None,
    );
    c.bench_function("jwt::verify_hs256", |b| b.iter(|| jwt::verify_hs256(black_box(&token), &[key], 1_800_000_000)));
}

fn bench_estimate(c: &mut Criterion) {
    let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(100_000 / 45);
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}]});
    let body = Doc::from_value(&body);
    let mut g = c.benchmark_group("estimate");
    g.throughput(Throughput::Bytes(prompt.len() as u64));
    g.bench_function("100 KB prompt", |b| b.iter(|| estimate(Route::ChatCompletions, black_box(&body))));
    g.finish();
}

fn bench_scanner(c: &mut Criterion) {
    let mut sse = String::new();
    let delta = r#"data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"hello world "},"finish_reason":null}],"usage":null}"#;
    while sse.len() < 1 << 20 {
        sse.push_str(delta);
        sse.push_str("\n\n");
    }
    sse.push_str(r#"data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":10,"completion_tokens":5000,"total_tokens":5010}}"#);
    sse.push_str("\n\ndata: [DONE]\n\n");
    let mut g = c.benchmark_group("usage scanner");
    g.throughput(Throughput::Bytes(sse.len() as u64));
    g.bench_function("1 MiB SSE in 16 KiB chunks", |b| {
        b.iter(|| {
            let mut s = UsageScanner::new(Route::ChatCompletions, BodyKind::Sse);
            for chunk in sse.as_bytes().chunks(16 * 1024) {
                s.feed(chunk);
            }
            s.finish()
        })
    });
    g.finish();
}

/// The fake upstream's non-streaming chat completion (600 bytes, usage last).
const MOCK_CHAT_JSON: &str = r#"{"choices":[{"finish_reason":"stop","index":0,"logprobs":null,"message":{"annotations":[],"content":"Hello from the mock upstream","refusal":null,"role":"assistant"}}],"created":1796329966,"id":"chatcmpl-mock000000000000000000000001","model":"gpt-4o-mini","object":"chat.completion","service_tier":"default","system_fingerprint":"fp_mock","usage":{"completion_tokens":16,"completion_tokens_details":{"accepted_prediction_tokens":0,"audio_tokens":0,"reasoning_tokens":0,"rejected_prediction_tokens":0},"prompt_tokens":46,"prompt_tokens_details":{"audio_tokens":0,"cached_tokens":0},"total_tokens":62}}"#;

/// The fake upstream's chat stream with `include_usage`: 5 content events, the finish event, the
/// usage event and `[DONE]` (2.2 KB).
fn mock_chat_sse() -> String {
    let head = r#"{"choices":["#;
    let tail = r#","created":1796329966,"id":"chatcmpl-mock000000000000000000000002","model":"gpt-4o-mini","object":"chat.completion.chunk","system_fingerprint":"fp_mock","usage":"#;
    let mut s = String::new();
    for (i, word) in ["Hello", " from", " the", " mock", " upstream"].iter().enumerate() {
        let role = if i == 0 { r#","role":"assistant""# } else { "" };
        s += &format!(
            r#"data: {head}{{"delta":{{"content":"{word}"{role}}},"finish_reason":null,"index":0,"logprobs":null}}]{tail}null}}"#
        );
        s += "\n\n";
    }
    s += &format!(r#"data: {head}{{"delta":{{}},"finish_reason":"stop","index":0,"logprobs":null}}]{tail}null}}"#);
    s += "\n\n";
    s += &format!(
        r#"data: {{"choices":[]{tail}{{"completion_tokens":16,"completion_tokens_details":{{"accepted_prediction_tokens":0,"audio_tokens":0,"reasoning_tokens":0,"rejected_prediction_tokens":0}},"prompt_tokens":59,"prompt_tokens_details":{{"audio_tokens":0,"cached_tokens":0}},"total_tokens":75}}}}"#
    );
    s += "\n\ndata: [DONE]\n\n";
    s
}

/// The body split into `n` pieces of (nearly) equal length, at byte boundaries that fall inside
/// lines: the scanner's buffering path is exercised, as with TCP segments.
fn pieces(body: &str, n: usize) -> Vec<&[u8]> {
    body.as_bytes().chunks(body.len().div_ceil(n)).collect()
}

fn scan(route: Route, kind: BodyKind, pieces: &[&[u8]]) -> ScanResult {
    let mut s = UsageScanner::new(route, kind);
    for p in pieces {
        s.feed(black_box(p));
    }
    s.finish()
}

/// The fake upstream's bodies: what every proxied request in the load benchmark costs to scan.
fn bench_scanner_mock(c: &mut Criterion) {
    let sse = mock_chat_sse();
    let mut g = c.benchmark_group("usage scanner, mock upstream bodies");
    g.bench_function("chat JSON 600 B, 1 chunk", |b| {
        b.iter(|| scan(Route::ChatCompletions, BodyKind::Json, &[MOCK_CHAT_JSON.as_bytes()]))
    });
    g.bench_function("chat SSE 2.2 KB, 1 chunk", |b| {
        b.iter(|| scan(Route::ChatCompletions, BodyKind::Sse, &[sse.as_bytes()]))
    });
    let three = pieces(&sse, 3);
    g.bench_function("chat SSE 2.2 KB, 3 chunks", |b| b.iter(|| scan(Route::ChatCompletions, BodyKind::Sse, &three)));
    g.finish();
}

/// `SCAN_ITERS=N SCAN_BODY=json|sse1|sse3 hot_path`: scans that mock body N times and exits, for
/// instruction and allocation counts under valgrind (run it with N and with 0, divide the
/// difference by N):
/// `SCAN_ITERS=1000 SCAN_BODY=json valgrind --tool=callgrind --callgrind-out-file=/dev/null <bench binary>`.
fn fixed_iterations() -> bool {
    let Some(n) = std::env::var("SCAN_ITERS").ok().and_then(|n| n.parse::<u64>().ok()) else {
        return false;
    };
    let sse = mock_chat_sse();
    let (kind, pieces) = match std::env::var("SCAN_BODY").as_deref() {
        Ok("json") => (BodyKind::Json, vec![MOCK_CHAT_JSON.as_bytes()]),
        Ok("sse1") => (BodyKind::Sse, vec![sse.as_bytes()]),
        Ok("sse3") => (BodyKind::Sse, pieces(&sse, 3)),
        other => panic!("SCAN_BODY must be json, sse1 or sse3, not {other:?}"),
    };
    let want = scan(Route::ChatCompletions, kind, &pieces);
    assert!(want.usage.is_some() && want.model.is_some(), "{want:?}");
    for _ in 0..n {
        assert_eq!(scan(Route::ChatCompletions, kind, black_box(&pieces)), want);
    }
    true
}

/// Request bodies of the body path: the load benchmark's chat body (plain and streaming with
/// `include_usage`), an Anthropic Messages body and a 4 KB chat body with tools and tool calls.
fn body_cases() -> Vec<(&'static str, Route, &'static [u8])> {
    vec![
        (
            "chat",
            Route::ChatCompletions,
            br#"{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are a terse assistant."},{"role":"user","content":"Say hello to the load benchmark in five words."}],"max_tokens":16}"#,
        ),
        (
            "chat_stream",
            Route::ChatCompletions,
            br#"{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are a terse assistant."},{"role":"user","content":"Say hello to the load benchmark in five words."}],"max_tokens":16,"stream":true,"stream_options":{"include_usage":true}}"#,
        ),
        (
            "messages",
            Route::Messages,
            br#"{"model":"claude-3-5-haiku-latest","max_tokens":256,"system":"You are a terse assistant.","messages":[{"role":"user","content":[{"type":"text","text":"Say hello to the load benchmark in five words."}]}]}"#,
        ),
        ("chat_tools_4k", Route::ChatCompletions, include_bytes!("fixtures/chat_tools_4k.json")),
    ]
}

/// What the proxy does with a body before the guards: parse and validate it, estimate its
/// prompt, read its output choices, decide on the `include_usage` rewrite; then drop it all.
fn body_path(route: Route, body: &[u8]) -> (u64, Option<u64>, u64, Option<usize>, usize, bool) {
    let req = parse_body(route, body).expect("valid bench body");
    let est = estimate(route, &req.json);
    let choices = output_choices(route, &req.json);
    let rewritten = inject_include_usage(route, &req, body).map(|b| b.len());
    (est.prompt_tokens, est.requested_max_output, choices, rewritten, req.model.len(), req.stream)
}

fn bench_body_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("body path (parse + estimate + choices + include_usage)");
    for (name, route, body) in body_cases() {
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(name, |b| b.iter(|| body_path(route, black_box(body))));
    }
    g.finish();
}

criterion_group!(
    benches,
    bench_decision,
    bench_jwt,
    bench_estimate,
    bench_scanner,
    bench_scanner_mock,
    bench_body_path
);

fn main() {
    if fixed_iterations() {
        return;
    }
    if let Ok(case) = std::env::var("HOT_PATH_BODY") {
        let iters: u64 = std::env::var("HOT_PATH_ITERS").ok().and_then(|n| n.parse().ok()).unwrap_or(1);
        let (_, route, body) = body_cases().into_iter().find(|c| c.0 == case).expect("unknown HOT_PATH_BODY case");
        for _ in 0..iters {
            black_box(body_path(route, black_box(body)));
        }
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
