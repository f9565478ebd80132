//! The gate API on the proxy listener: decide-and-hold, then the caller settles.

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::support::*;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

async fn gate(s: &Sidecar, tenant: &str, body: &serde_json::Value) -> reqwest::Response {
    client()
        .post(s.url("/api/v1/enforcement/gate/llm"))
        .bearer_auth(token(tenant, "enterprise"))
        .json(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn gate_decides_holds_and_the_caller_settles() {
    let s = start(&[("PREAUTH_REQUIRE_APPROVAL_ABOVE_USD", "0.05")]).await;
    // Keys out of order and spaced: the fingerprint is over the compact sorted-key form.
    let request = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100});
    let r = gate(&s, "acme", &json!({"route": "/v1/chat/completions", "request": request})).await;
    assert_eq!(r.status(), 200);
    let held = r.headers().get("x-preauth-reservation-id").map(|h| h.to_str().unwrap().to_string());
    let v = json_of(r).await;
    assert_eq!(v["decision"], "ALLOW");
    assert_eq!(held.as_deref(), v["reservation_id"].as_str(), "the header names the hold, as on the proxy path");
    assert_eq!(v["mode"], "hard");
    assert!(v["estimated_cost_usd"].as_str().unwrap().contains('.'));
    let canonical = br#"{"max_tokens":100,"messages":[{"content":"hi","role":"user"}],"model":"gpt-4o-mini"}"#;
    let inner = hex(&Sha256::digest(canonical));
    let want = hex(&Sha256::digest(format!("acme\nPOST /v1/chat/completions\n{inner}").as_bytes()));
    assert_eq!(v["request_fingerprint"], want.as_str());
    // Non-ASCII text and floats as Python's json.dumps(sort_keys=True, separators=(",", ":"))
    // writes them: what a client of the reference control plane computes.
    let intl = json!({"model": "gpt-4o-mini", "temperature": 1.0, "top_p": 1e-5,
                      "messages": [{"role": "user", "content": "héllo 😀"}]});
    let r = gate(&s, "acme", &json!({"route": "/v1/chat/completions", "request": intl})).await;
    let fp = json_of(r).await["request_fingerprint"].clone();
    let canonical = br#"{"messages":[{"content":"h\u00e9llo \ud83d\ude00","role":"user"}],"model":"gpt-4o-mini","temperature":1.0,"top_p":1e-05}"#;
    let inner = hex(&Sha256::digest(canonical));
    let want_intl = hex(&Sha256::digest(format!("acme\nPOST /v1/chat/completions\n{inner}").as_bytes()));
    assert_eq!(fp, want_intl.as_str());
    let rid = v["reservation_id"].as_str().expect("ALLOW holds a reservation").to_string();
    assert!(s.upstream.requests().is_empty(), "the gate never forwards");

    let settle = |body: serde_json::Value, tenant: &'static str| {
        let url = s.url(&format!("/api/v1/enforcement/reservations/{rid}/settle"));
        async move { client().post(url).bearer_auth(token(tenant, "enterprise")).json(&body).send().await.unwrap() }
    };
    let usage =
        json!({"usage": {"prompt_tokens": 10, "completion_tokens": 20, "cached_tokens": 0, "reasoning_tokens": 0}});
    assert_eq!(settle(usage.clone(), "globex").await.status(), 404, "another tenant cannot settle it");
    // Token counts that are negative or beyond any model's are refused, not charged as 0 or 2^64.
    for bad in [json!({"usage": {"prompt_tokens": -1000000}}), json!({"usage": {"completion_tokens": u64::MAX}})] {
        assert_error(settle(bad, "acme").await, 400, "invalid_request").await;
    }
    let r = settle(usage.clone(), "acme").await;
    assert_eq!(r.status(), 200);
    let v = json_of(r).await;
    assert_eq!(v["actual_cost_usd"], "0.000014", "10 × 0.15 + 20 × 0.60 per Mtok, rounded up");
    assert!(v["drift_usd"].as_str().unwrap().starts_with('-'));
    assert!(v["released_usd"].as_str().is_some());
    assert_error(settle(usage, "acme").await, 409, "reservation_not_active").await;

    // Denials and escalations are answers too (HTTP 200), with reasons and approval ids.
    let big =
        json!({"route": "/v1/chat/completions", "request": {"model": "gpt-4o", "max_tokens": 10000, "messages": []}});
    let v = json_of(gate(&s, "acme", &big).await).await;
    assert_eq!(v["decision"], "REQUIRE_APPROVAL");
    assert_eq!(v["reasons"], json!(["approval_required"]));
    assert!(v["approval_id"].as_str().is_some() && v["reservation_id"].is_null());
    patch_runtime(&s, json!({"kill_switch": true, "reason": "gate test"})).await;
    let v = json_of(
        gate(
            &s,
            "acme",
            &json!({"route": "/v1/embeddings", "request": {"model": "text-embedding-3-small", "input": "x"}}),
        )
        .await,
    )
    .await;
    assert_eq!((v["decision"].as_str(), v["reasons"][0].as_str()), (Some("DENY"), Some("global_abuse_kill_switch")));
    // Bad input is a 400, unauthenticated a 401.
    let r = gate(&s, "acme", &json!({"route": "/v1/nope", "request": {}})).await;
    assert_error(r, 400, "invalid_request").await;
    let r = client().post(s.url("/api/v1/enforcement/gate/llm")).json(&big).send().await.unwrap();
    assert_error(r, 401, "unauthenticated").await;
    let m = metrics(&s).await;
    assert!(m.contains("valdrics_ops_enforcement_gate_decisions_total{decision=\"REQUIRE_APPROVAL\",path=\"normal\",source=\"default\"} 1"), "{m}");
    // The gate contacts no gateway: none of its answers is an upstream response.
    assert_eq!(metric_sum(&m, "preauth_upstream_responses_total"), 0.0, "{m}");
    s.stop().await;
}

/// A gate hold holds a concurrency slot until it is settled — by its caller, by an operator's
/// reconcile, or released by the sweep: either way the slot comes back at once, not at the
/// lease TTL.
#[tokio::test(flavor = "multi_thread")]
async fn released_or_reconciled_gate_holds_give_their_concurrency_slot_back() {
    let s = start(&[("LLM_FAIR_USE_GUARDS_ENABLED", "true"), ("LLM_FAIR_USE_PER_TENANT_CONCURRENCY_CAP", "2")]).await;
    let body = json!({"route": "/v1/chat/completions",
                      "request": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}});
    let hold = || async { json_of(gate(&s, "acme", &body).await).await };
    let (a, b) = (hold().await, hold().await);
    assert_eq!((a["decision"].as_str(), b["decision"].as_str()), (Some("ALLOW"), Some("ALLOW")));
    let full = hold().await;
    assert_eq!((full["decision"].as_str(), full["reasons"][0].as_str()), (Some("DENY"), Some("fair_use_concurrency")));

    // An operator reconciles one hold: one slot back.
    let id = a["reservation_id"].as_str().unwrap();
    let r = s
        .admin_post(&format!("/api/v1/enforcement/reservations/{id}/reconcile"), json!({"actual_cost_usd": "0.000010"}))
        .await;
    assert_eq!(r.status(), 200);
    let c = hold().await;
    assert_eq!(c["decision"], "ALLOW", "{c}");
    assert_eq!(hold().await["decision"], "DENY");

    // The sweep releases both remaining holds: both slots back.
    let r = s.admin_post("/api/v1/enforcement/reservations/reconcile-overdue", json!({"older_than_seconds": 0})).await;
    assert_eq!(json_of(r).await["released_count"], 2);
    for _ in 0..2 {
        let v = hold().await;
        assert_eq!(v["decision"], "ALLOW", "{v}");
    }
    s.stop().await;
}

/// `reconcile-overdue` with `older_than_seconds: 0` releases every active hold, also one made in
/// the same millisecond as the call (audit: such a hold was skipped, the sweep's cutoff being
/// strictly before now).
#[tokio::test(flavor = "multi_thread")]
async fn reconcile_overdue_with_zero_releases_a_hold_made_just_before() {
    let s = start(&[]).await;
    let body = json!({"route": "/v1/chat/completions",
                      "request": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}});
    for i in 0..100 {
        let v = json_of(gate(&s, "fresh", &body).await).await;
        assert_eq!(v["decision"], "ALLOW", "{v}");
        let r =
            s.admin_post("/api/v1/enforcement/reservations/reconcile-overdue", json!({"older_than_seconds": 0})).await;
        let r = json_of(r).await;
        assert_eq!(r["released_count"], 1, "round {i}: {r}");
        assert_eq!(r["reservation_ids"][0], v["reservation_id"], "round {i}");
    }
    s.stop().await;
}

/// A `route` that is not a string is a 400, not silently the chat route (whose fingerprint and
/// required fields the caller did not ask for).
#[tokio::test(flavor = "multi_thread")]
async fn a_route_that_is_not_a_string_is_refused() {
    let s = start(&[]).await;
    let request = json!({"model": "gpt-4o-mini", "input": "hi"});
    for route in [json!(5), json!(["/v1/embeddings"]), json!(null)] {
        let r = gate(&s, "acme", &json!({"route": route, "request": request})).await;
        let v = assert_error(r, 400, "invalid_request").await;
        assert!(v["error"]["message"].as_str().unwrap().contains("route"), "{v}");
    }
    // Left out, it is the chat route.
    let r = gate(&s, "acme", &json!({"request": {"model": "gpt-4o-mini", "messages": []}})).await;
    assert_eq!(json_of(r).await["decision"], "ALLOW");
    s.stop().await;
}

/// The Gate API takes `x-approval-token` and `x-preauth-source` as the proxy path does
/// (CONTRACT §10, §3): an approved request is admitted and its token used up; a source's mode
/// applies. Before, both headers were ignored on the gate: a request above the approval
/// threshold could never be admitted there.
#[tokio::test(flavor = "multi_thread")]
async fn the_gate_takes_approval_tokens_and_sources() {
    let s = start(&[
        ("PREAUTH_REQUIRE_APPROVAL_ABOVE_USD", "0.05"),
        ("ENFORCEMENT_APPROVAL_TOKEN_SECRET", "gate-approval-secret-0123456789abcdef0123"),
        ("PREAUTH_SOURCE_MODES", "ev=shadow,b=soft"),
    ])
    .await;
    let big =
        json!({"route": "/v1/chat/completions", "request": {"model": "gpt-4o", "max_tokens": 10000, "messages": []}});
    let with = async |headers: &[(&str, &str)]| {
        post_with(&s, "/api/v1/enforcement/gate/llm", "acme", "enterprise", &big, headers).await
    };
    let v = json_of(with(&[]).await).await;
    assert_eq!((v["decision"].as_str(), v["mode"].as_str()), (Some("REQUIRE_APPROVAL"), Some("hard")));
    let id = v["approval_id"].as_str().unwrap().to_string();
    let r = s.admin_post(&format!("/api/v1/enforcement/approvals/{id}/approve"), json!({})).await;
    let approval = json_of(r).await["approval_token"].as_str().unwrap().to_string();
    let v = json_of(with(&[("x-approval-token", &approval)]).await).await;
    assert_eq!(v["decision"], "ALLOW", "{v}");
    assert!(v["reservation_id"].is_string(), "and holds its cost: {v}");
    // A token refused is a decision too (HTTP 200, DENY with the proxy path's reason).
    for (t, reason) in [(approval.as_str(), "approval_token_replayed"), ("garbage", "approval_token_invalid")] {
        let r = with(&[("x-approval-token", t)]).await;
        assert_eq!(r.status(), 200);
        let v = json_of(r).await;
        assert_eq!((v["decision"].as_str(), v["reasons"][0].as_str()), (Some("DENY"), Some(reason)), "{v}");
    }
    // Sources: shadow lets it through (nothing held), soft escalates.
    let v = json_of(with(&[("x-preauth-source", "ev")]).await).await;
    assert_eq!((v["decision"].as_str(), v["mode"].as_str()), (Some("ALLOW"), Some("shadow")), "{v}");
    assert!(v["reservation_id"].is_null());
    let v = json_of(with(&[("x-preauth-source", "b")]).await).await;
    assert_eq!((v["decision"].as_str(), v["mode"].as_str()), (Some("REQUIRE_APPROVAL"), Some("soft")), "{v}");
    s.stop().await;
}

/// A reconcile racing a Gate API settle of the same hold, and the overdue sweep racing both:
/// one of them ends the hold, the others answer 409 (or find nothing to release), and the ledger
/// has exactly one ending event per hold, the winner's (audits: 9 of 60 racing pairs left two
/// `reservation_settled` events, and 3 of 300 holds raced by the sweep a settlement and a
/// release, so the ledger summed more than the tenant's spend).
#[tokio::test(flavor = "multi_thread")]
async fn a_reconcile_racing_a_gate_settle_and_the_sweep_leaves_one_ending() {
    const HOLDS: usize = 300;
    let s = start(&[]).await;
    let body = json!({"route": "/v1/chat/completions",
                      "request": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}});
    for i in 0..HOLDS {
        let id = json_of(gate(&s, "racy", &body).await).await["reservation_id"].as_str().unwrap().to_string();
        // Every third hold also meets the sweep.
        race_to_end_a_hold(&s, &s, &id, i % 3 == 0, i).await;
    }
    assert_one_ending_per_hold(&[&s], HOLDS).await;
    s.stop().await;
}
