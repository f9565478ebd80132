//! Decision steps 3–6 through the real proxy: kill switch, global guard, quotas, fair use,
//! modes and the failsafe path.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::StreamExt;
use preauth_sidecar::decide::{CountersView, GlobalView, TenantView, UnixMillis};
use preauth_sidecar::demo::upstream::FakeUpstream;
use preauth_sidecar::store::memory::MemoryCounters;
use preauth_sidecar::store::{AdmitRequest, Counters, StoreError, SweepStats, Ticket};
use serde_json::json;

use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn kill_switch_flips_at_runtime_without_restart() {
    let s = start(&[]).await;
    assert_eq!(post(&s, "/v1/chat/completions", "acme", "pro", &chat("gpt-4o-mini")).await.status(), 200);
    let r = patch_runtime(&s, json!({"kill_switch": true, "reason": "incident drill"})).await;
    assert_eq!(r.status(), 200);
    let v = json_of(r).await;
    assert_eq!((v["kill_switch"].as_bool(), v["policy_version"].as_u64()), (Some(true), Some(2)));
    let r = post(&s, "/v1/chat/completions", "acme", "pro", &chat("gpt-4o-mini")).await;
    assert_eq!(r.headers()["retry-after"], "60");
    assert_eq!(r.headers()["x-preauth-decision"], "DENY");
    let v = assert_error(r, 429, "llm_fair_use_exceeded").await;
    assert_eq!(v["error"]["details"]["reason"], "global_abuse_kill_switch");
    assert_eq!(v["error"]["details"]["policy_version"], 2);
    assert!(metrics(&s).await.contains("preauth_kill_switch_enabled 1"));
    patch_runtime(&s, json!({"kill_switch": false, "reason": "drill over"})).await;
    assert_eq!(post(&s, "/v1/chat/completions", "acme", "pro", &chat("gpt-4o-mini")).await.status(), 200);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn global_burst_trips_then_blocks_everyone() {
    let s = start(&[
        ("LLM_GLOBAL_ABUSE_PER_MINUTE_CAP", "5"),
        ("LLM_GLOBAL_ABUSE_UNIQUE_TENANTS_THRESHOLD", "2"),
        ("LLM_GLOBAL_ABUSE_BLOCK_SECONDS", "30"),
    ])
    .await;
    for i in 0..5 {
        let r = post(&s, "/v1/chat/completions", &format!("t{}", i % 3), "pro", &chat("gpt-4o-mini")).await;
        assert_eq!(r.status(), 200, "request {i}");
    }
    let r = post(&s, "/v1/chat/completions", "t9", "pro", &chat("gpt-4o-mini")).await;
    assert_eq!(r.headers()["retry-after"], "30");
    let v = assert_error(r, 429, "llm_fair_use_exceeded").await;
    assert_eq!(v["error"]["details"]["reason"], "global_abuse_triggered");
    let r = post(&s, "/v1/chat/completions", "another", "enterprise", &chat("gpt-4o-mini")).await;
    let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry));
    let v = assert_error(r, 429, "llm_fair_use_exceeded").await;
    assert_eq!(v["error"]["details"]["reason"], "global_abuse_temporal_block");
    // Lifting the guard at runtime lets traffic through again.
    patch_runtime(&s, json!({"global_abuse_guards_enabled": false, "reason": "false positive"})).await;
    assert_eq!(post(&s, "/v1/chat/completions", "t1", "pro", &chat("gpt-4o-mini")).await.status(), 200);
    s.stop().await;
}

/// Runbook, false-positive block: the operator raises the global cap/threshold (or switches the
/// guard off and on again). The block in force was tripped under the old settings, so it is lifted
/// at once; the next request is judged by the new settings (and re-trips if they say so).
#[tokio::test(flavor = "multi_thread")]
async fn changing_the_global_guard_lifts_the_block_in_force() {
    let s = start(&[
        ("LLM_GLOBAL_ABUSE_PER_MINUTE_CAP", "3"),
        ("LLM_GLOBAL_ABUSE_UNIQUE_TENANTS_THRESHOLD", "2"),
        ("LLM_GLOBAL_ABUSE_BLOCK_SECONDS", "300"),
    ])
    .await;
    let body = chat("gpt-4o-mini");
    let call = |t: &'static str| post(&s, "/v1/chat/completions", t, "pro", &body);
    for t in ["a", "b", "a"] {
        assert_eq!(call(t).await.status(), 200);
    }
    let v = assert_error(call("b").await, 429, "llm_fair_use_exceeded").await;
    assert_eq!(v["error"]["details"]["reason"], "global_abuse_triggered");
    // Raising the cap and threshold (normal peak was above them) lifts the block at once.
    let r = patch_runtime(
        &s,
        json!({"global_abuse_per_minute_cap": 1000, "global_abuse_unique_tenants_threshold": 100, "reason": "INC: guard below normal peak"}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(call("a").await.status(), 200, "raised thresholds lift the block in force");
    assert_eq!(sample(&metrics(&s).await, "preauth_global_block_active"), 0.0);
    let lifted = s.admin_get("/api/v1/enforcement/ledger?event_type=runtime_changed&limit=1").await;
    assert_eq!(lifted["items"][0]["details"]["global_block_lifted"], true, "{lifted}");
    // Tightened again: the live window re-trips under the new settings.
    patch_runtime(
        &s,
        json!({"global_abuse_per_minute_cap": 2, "global_abuse_unique_tenants_threshold": 2, "reason": "INC: tighten"}),
    )
    .await;
    let v = assert_error(call("a").await, 429, "llm_fair_use_exceeded").await;
    assert_eq!(v["error"]["details"]["reason"], "global_abuse_triggered");
    // Switched off and on again: the old block does not come back with the guard.
    patch_runtime(&s, json!({"global_abuse_guards_enabled": false, "reason": "INC: guard off"})).await;
    patch_runtime(&s, json!({"global_abuse_guards_enabled": true, "global_abuse_per_minute_cap": 1000, "reason": "INC: guard on, higher cap"})).await;
    assert_eq!(call("b").await.status(), 200, "re-enabling the guard does not revive the old block");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tier_daily_quota_is_402() {
    let s = start(&[]).await;
    assert_eq!(
        post(&s, "/v1/embeddings", "tiny", "free", &json!({"model": "text-embedding-3-small", "input": "a"}))
            .await
            .status(),
        200
    );
    let r = post(&s, "/v1/embeddings", "tiny", "free", &json!({"model": "text-embedding-3-small", "input": "a"})).await;
    let v = assert_error(r, 402, "budget_exceeded").await;
    assert_eq!(v["error"]["details"]["reason"], "daily_tenant_limit_exceeded");
    assert_eq!(v["error"]["details"]["decision"], "DENY");
    // Another tenant is unaffected.
    assert_eq!(
        post(&s, "/v1/embeddings", "other", "free", &json!({"model": "text-embedding-3-small", "input": "a"}))
            .await
            .status(),
        200
    );
    s.stop().await;
}

/// The tier daily quota is not handed out again by a restart of an embedded sidecar: the day's
/// counts are kept in `PREAUTH_DATA_DIR`, written when a graceful stop (SIGTERM) ends and every
/// few seconds (what a SIGKILL keeps). Through the real binary: its signals and shutdown order.
#[tokio::test(flavor = "multi_thread")]
async fn tier_daily_quota_survives_a_restart() {
    let up = FakeUpstream::start("127.0.0.1:0").await.unwrap();
    let dir = temp_dir();
    let mut b = Binary::start(&up, &dir, &[]);
    let call = |b: &Binary, tenant: &str| {
        let r = client()
            .post(b.url("/v1/embeddings"))
            .bearer_auth(token(tenant, "free"))
            .json(&json!({"model": "text-embedding-3-small", "input": "a"}));
        async move { r.send().await.unwrap() }
    };
    let refused = |r: reqwest::Response| async move {
        let v = assert_error(r, 402, "budget_exceeded").await;
        assert_eq!(v["error"]["details"]["reason"], "daily_tenant_limit_exceeded", "{v}");
    };
    assert_eq!(call(&b, "free-a").await.status(), 200);
    refused(call(&b, "free-a").await).await;
    b.restart_gracefully(&[], &[]);
    refused(call(&b, "free-a").await).await;
    let v = b.admin_get("/api/v1/enforcement/tenants/free-a").await;
    assert_eq!(v["daily_requests"], 1, "{v}");

    // A SIGKILL keeps what the periodic snapshot holds.
    assert_eq!(call(&b, "free-b").await.status(), 200);
    let snapshot = dir.join("counters-daily.json");
    wait_for("the periodic snapshot to hold free-b", || {
        let s = std::fs::read_to_string(&snapshot).unwrap_or_default();
        async move { s.contains("\"free-b\":1") }
    })
    .await;
    b.restart_with(&[], &[]);
    refused(call(&b, "free-a").await).await;
    refused(call(&b, "free-b").await).await;
    assert_eq!(call(&b, "free-c").await.status(), 200, "another tenant is unaffected");
}

/// SDKs (openai-node, anthropic) retry a 429 after sleeping its whole `Retry-After`: the soft
/// daily cap (until UTC midnight) says `x-should-retry: false` so the caller gets its error now.
#[tokio::test(flavor = "multi_thread")]
async fn soft_daily_429_tells_sdks_not_to_wait_until_midnight() {
    let s = start(&[("LLM_FAIR_USE_GUARDS_ENABLED", "true"), ("LLM_FAIR_USE_PRO_DAILY_SOFT_CAP", "1")]).await;
    assert_eq!(post(&s, "/v1/chat/completions", "acme", "pro", &chat("gpt-4o-mini")).await.status(), 200);
    let r = post(&s, "/v1/chat/completions", "acme", "pro", &chat("gpt-4o-mini")).await;
    let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    // Within the last minute of the UTC day a retry may succeed.
    let want = if retry > 60 { "false" } else { "true" };
    assert_eq!(r.headers().get("x-should-retry").and_then(|v| v.to_str().ok()), Some(want), "Retry-After {retry}");
    let v = assert_error(r, 429, "llm_fair_use_exceeded").await;
    assert_eq!(v["error"]["details"]["reason"], "fair_use_soft_daily");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn per_minute_cap_with_retry_after() {
    let s = start(&[("LLM_FAIR_USE_GUARDS_ENABLED", "true"), ("LLM_FAIR_USE_PER_MINUTE_CAP", "3")]).await;
    for _ in 0..3 {
        assert_eq!(post(&s, "/v1/chat/completions", "acme", "pro", &chat("gpt-4o-mini")).await.status(), 200);
    }
    let r = post(&s, "/v1/chat/completions", "acme", "pro", &chat("gpt-4o-mini")).await;
    let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((55..=60).contains(&retry), "seconds until the window admits again: {retry}");
    assert_eq!(r.headers()["x-should-retry"], "true", "an SDK may wait this out");
    let v = assert_error(r, 429, "llm_fair_use_exceeded").await;
    assert_eq!(v["error"]["details"]["reason"], "fair_use_per_minute");
    assert_eq!(post(&s, "/v1/chat/completions", "other", "pro", &chat("gpt-4o-mini")).await.status(), 200);
    let m = metrics(&s).await;
    for want in [
        "valdrics_ops_enforcement_gate_decisions_total{decision=\"ALLOW\",path=\"normal\",source=\"default\"} 4",
        "valdrics_ops_enforcement_gate_decisions_total{decision=\"DENY\",path=\"normal\",source=\"default\"} 1",
        "valdrics_ops_enforcement_gate_decision_reasons_total{reason=\"fair_use_per_minute\",source=\"default\"} 1",
        "valdrics_ops_llm_pre_auth_denials_total{reason=\"fair_use_per_minute\",tenant_tier=\"pro\"} 1",
        "valdrics_ops_llm_fair_use_denials_total{gate=\"per_minute\",tenant_tier=\"pro\"} 1",
        "valdrics_ops_llm_fair_use_evaluations_total{gate=\"per_minute\",outcome=\"deny\",tenant_tier=\"pro\"} 1",
        "valdrics_ops_enforcement_gate_latency_seconds_bucket{path=\"normal\",source=\"default\",le=\"0.0001\"}",
        "valdrics_ops_llm_fair_use_observed{gate=\"per_minute\",tenant_tier=\"pro\"}",
    ] {
        assert!(m.contains(want), "missing `{want}` in\n{m}");
    }
    assert!(!m.contains("acme"), "tenant ids never appear in metrics");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrency_lease_is_freed_when_the_client_disconnects() {
    let s = start(&[
        ("LLM_FAIR_USE_GUARDS_ENABLED", "true"),
        ("LLM_FAIR_USE_PER_TENANT_CONCURRENCY_CAP", "1"),
        ("LLM_FAIR_USE_CONCURRENCY_LEASE_TTL_SECONDS", "120"),
    ])
    .await;
    let body = json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let slow = post_with(
        &s,
        "/v1/chat/completions",
        "acme",
        "enterprise",
        &body,
        &[("x-mock-delay-ms", "400"), ("x-mock-chunks", "50")],
    )
    .await;
    assert_eq!(slow.status(), 200);
    let mut stream = slow.bytes_stream();
    stream.next().await.unwrap().unwrap(); // first event is flowing: the lease is held
    let r = post(&s, "/v1/chat/completions", "acme", "enterprise", &chat("gpt-4o-mini")).await;
    assert_eq!(r.headers()["retry-after"], "60");
    let v = assert_error(r, 429, "llm_fair_use_exceeded").await;
    assert_eq!(v["error"]["details"]["reason"], "fair_use_concurrency");
    drop(stream); // client goes away mid-stream
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let r = post(&s, "/v1/chat/completions", "acme", "enterprise", &chat("gpt-4o-mini")).await;
        if r.status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "lease not released after client disconnect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A completed request releases its lease too: sequential requests never trip the cap.
    for _ in 0..3 {
        assert_eq!(post(&s, "/v1/chat/completions", "acme", "enterprise", &chat("gpt-4o-mini")).await.status(), 200);
    }
    s.stop().await;
}

/// In-process counters whose lease release takes 300 ms (a slow shared store, made certain).
struct SlowRelease(MemoryCounters);

#[async_trait]
impl Counters for SlowRelease {
    async fn admit(&self, r: &AdmitRequest<'_>) -> Result<(Ticket, CountersView), StoreError> {
        self.0.admit(r).await
    }
    async fn rollback(&self, t: &Ticket) -> Result<(), StoreError> {
        self.0.rollback(t).await
    }
    async fn release_lease(&self, t: &Ticket) -> Result<(), StoreError> {
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.0.release_lease(t).await
    }
    async fn park_lease(&self, id: &str, t: &Ticket, ttl_ms: u64) -> Result<(), StoreError> {
        self.0.park_lease(id, t, ttl_ms).await
    }
    async fn release_parked_lease(&self, tenant: &str, id: &str) -> Result<(), StoreError> {
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.0.release_parked_lease(tenant, id).await
    }
    async fn set_global_block(&self, until: UnixMillis) -> Result<(), StoreError> {
        self.0.set_global_block(until).await
    }
    async fn clear_global_block(&self) -> Result<bool, StoreError> {
        self.0.clear_global_block().await
    }
    async fn tenant_view(&self, tenant: &str, now: UnixMillis) -> Result<TenantView, StoreError> {
        self.0.tenant_view(tenant, now).await
    }
    async fn global_view(&self, now: UnixMillis) -> Result<GlobalView, StoreError> {
        self.0.global_view(now).await
    }
    async fn sweep(&self, now: UnixMillis) -> Result<SweepStats, StoreError> {
        self.0.sweep(now).await
    }
}

/// An answer's lease is released (and its hold settled) before the client has the answer's last
/// byte: a client sending one request after another — each on a new connection, right after the
/// previous answer — never meets a concurrency cap of 1, even when releasing takes 300 ms.
#[tokio::test(flavor = "multi_thread")]
async fn a_sequential_client_never_meets_a_concurrency_cap_of_one() {
    let env = [("LLM_FAIR_USE_GUARDS_ENABLED", "true"), ("LLM_FAIR_USE_PER_TENANT_CONCURRENCY_CAP", "1")];
    let s = start_with(&env, Arc::new(SlowRelease(MemoryCounters::new()))).await;
    let stream = json!({"model": "gpt-4o-mini", "stream": true, "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]});
    for i in 0..6 {
        let (body, headers, want): (_, &[(&str, &str)], u16) = match i % 3 {
            0 => (chat("gpt-4o-mini"), &[], 200),
            1 => (stream.clone(), &[("x-mock-chunks", "5")], 200),
            _ => (chat("gpt-4o-mini"), &[("x-mock-status", "500")], 500),
        };
        let r = post_with(&s, "/v1/chat/completions", "acme", "enterprise", &body, headers).await;
        assert_eq!(r.status().as_u16(), want, "request {i}");
        r.bytes().await.unwrap();
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn token_rate_limits_estimated_tokens() {
    let s = start(&[("PREAUTH_TENANT_TOKENS_PER_MINUTE", "100")]).await;
    let small = json!({"model": "gpt-4o-mini", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(post(&s, "/v1/chat/completions", "acme", "pro", &small).await.status(), 200);
    let big = json!({"model": "gpt-4o-mini", "max_tokens": 500, "messages": [{"role": "user", "content": "hi"}]});
    let r = post(&s, "/v1/chat/completions", "acme", "pro", &big).await;
    let v = assert_error(r, 429, "llm_fair_use_exceeded").await;
    assert_eq!(v["error"]["details"]["reason"], "fair_use_token_rate");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn soft_and_shadow_modes_per_source() {
    let s = start(&[
        ("LLM_FAIR_USE_GUARDS_ENABLED", "true"),
        ("LLM_FAIR_USE_PER_MINUTE_CAP", "1"),
        ("PREAUTH_ENFORCEMENT_MODE", "soft"),
        ("PREAUTH_SOURCE_MODES", "evals=shadow"),
    ])
    .await;
    assert_eq!(post(&s, "/v1/chat/completions", "acme", "pro", &chat("gpt-4o-mini")).await.status(), 200);
    let r = post(&s, "/v1/chat/completions", "acme", "pro", &chat("gpt-4o-mini")).await;
    assert_eq!(r.headers()["x-preauth-decision"], "REQUIRE_APPROVAL");
    let v = assert_error(r, 403, "approval_required").await;
    let d = &v["error"]["details"];
    assert_eq!(d["reason"], "soft_mode_fair_use_per_minute");
    assert_eq!(d["mode"], "soft");
    assert_eq!(d["request_fingerprint"].as_str().map(str::len), Some(64));
    assert!(d["approval_id"].as_str().is_some() && d["expires_at"].as_str().is_some());
    assert!(d["estimated_cost_usd"].as_str().is_some_and(|c| c.split_once('.').unwrap().1.len() == 6));
    // Source `evals` is in shadow: the same violation goes through, counted as would-deny.
    let r = client()
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(token("acme", "pro"))
        .header("x-preauth-source", "evals")
        .json(&chat("gpt-4o-mini"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-preauth-decision"], "ALLOW");
    // An unknown source is `default` (soft), so it cannot be used to dodge the policy.
    let r = client()
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(token("acme", "pro"))
        .header("x-preauth-source", "anything")
        .json(&chat("gpt-4o-mini"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let m = metrics(&s).await;
    assert!(m.contains("reason=\"shadow_mode_fair_use_per_minute_override\",source=\"evals\"} 1"), "{m}");
    s.stop().await;
}

/// A state store that always fails: fault injection for the failsafe path.
struct DeadStore;

#[async_trait]
impl Counters for DeadStore {
    async fn admit(&self, _: &AdmitRequest<'_>) -> Result<(Ticket, CountersView), StoreError> {
        Err(StoreError::Unavailable("connection refused".into()))
    }
    async fn rollback(&self, _: &Ticket) -> Result<(), StoreError> {
        Err(StoreError::Unavailable("connection refused".into()))
    }
    async fn release_lease(&self, _: &Ticket) -> Result<(), StoreError> {
        Err(StoreError::Unavailable("connection refused".into()))
    }
    async fn park_lease(&self, _: &str, _: &Ticket, _: u64) -> Result<(), StoreError> {
        Err(StoreError::Unavailable("connection refused".into()))
    }
    async fn release_parked_lease(&self, _: &str, _: &str) -> Result<(), StoreError> {
        Err(StoreError::Unavailable("connection refused".into()))
    }
    async fn set_global_block(&self, _: UnixMillis) -> Result<(), StoreError> {
        Err(StoreError::Unavailable("connection refused".into()))
    }
    async fn clear_global_block(&self) -> Result<bool, StoreError> {
        Err(StoreError::Unavailable("connection refused".into()))
    }
    async fn tenant_view(&self, _: &str, _: UnixMillis) -> Result<TenantView, StoreError> {
        Err(StoreError::Unavailable("connection refused".into()))
    }
    async fn global_view(&self, _: UnixMillis) -> Result<GlobalView, StoreError> {
        Err(StoreError::Unavailable("connection refused".into()))
    }
    async fn sweep(&self, _: UnixMillis) -> Result<SweepStats, StoreError> {
        Err(StoreError::Unavailable("connection refused".into()))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn failsafe_path_per_mode_when_the_store_fails() {
    let s = start_with(&[("PREAUTH_SOURCE_MODES", "batch=soft,evals=shadow")], Arc::new(DeadStore)).await;
    let r = post(&s, "/v1/chat/completions", "acme", "pro", &chat("gpt-4o-mini")).await;
    assert_eq!(r.headers()["retry-after"], "1");
    let v = assert_error(r, 503, "enforcement_unavailable").await;
    assert_eq!(v["error"]["details"]["reason"], "hard_mode_fail_closed");
    for (source, status) in [("batch", 403u16), ("evals", 200)] {
        let r = client()
            .post(s.url("/v1/chat/completions"))
            .bearer_auth(token("acme", "pro"))
            .header("x-preauth-source", source)
            .json(&chat("gpt-4o-mini"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{source}");
    }
    let m = metrics(&s).await;
    assert!(
        m.contains(
            "valdrics_ops_enforcement_gate_decisions_total{decision=\"DENY\",path=\"failsafe\",source=\"default\"} 1"
        ),
        "{m}"
    );
    assert!(
        m.contains(
            "valdrics_ops_enforcement_gate_decisions_total{decision=\"ALLOW\",path=\"failsafe\",source=\"evals\"} 1"
        ),
        "{m}"
    );
    assert!(m.contains("reason=\"soft_mode_fail_safe_escalation\",source=\"batch\""), "{m}");
    assert!(
        m.contains("valdrics_ops_enforcement_gate_failures_total{failure_type=\"store_error\",source=\"default\"} 1"),
        "{m}"
    );
    assert!(metric_sum(&m, "preauth_store_errors_total{op=\"admit\"") >= 1.0, "{m}");
    let ready = client().get(s.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503, "readiness reflects the failing store");
    s.stop().await;
}
