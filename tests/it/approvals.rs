//! Approval tokens through the real proxy: the full loop, every rejection path, single use,
//! and the signing-key rotation drill.

use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use preauth_sidecar::store::memory::MemoryCounters;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::support::*;

const KEY_OLD: &str = "old-approval-secret-0123456789abcdef-0001";
const KEY_NEW: &str = "new-approval-secret-0123456789abcdef-0002";

/// A token built here, independently of the product's signing code.
fn raw_token(header: &Value, claims: &Value, key: &str) -> String {
    let mut t = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(header).unwrap()),
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap())
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(t.as_bytes());
    t.push('.');
    t.push_str(&URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()));
    t
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn fingerprint(tenant: &str, path: &str, body: &[u8]) -> String {
    let inner = hex(&Sha256::digest(body));
    hex(&Sha256::digest(format!("{tenant}\nPOST {path}\n{inner}").as_bytes()))
}

fn now_s() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

fn claims(tenant: &str, fp: &str, max_cost: &str, id: &str) -> Value {
    let now = now_s();
    json!({
        "iss": "preauth-sidecar", "aud": "llm_preauth", "sub": format!("enforcement_approval:{id}"),
        "jti": id, "iat": now, "nbf": now, "exp": now + 600, "tenant_id": tenant, "approval_id": id,
        "request_fingerprint": fp, "max_cost_usd": max_cost, "token_type": "enforcement_approval"
    })
}

/// An expensive request body (above the 0.05 USD approval threshold used here).
fn expensive() -> Vec<u8> {
    serde_json::to_vec(
        &json!({"model": "gpt-4o", "max_tokens": 10000, "messages": [{"role": "user", "content": "big job"}]}),
    )
    .unwrap()
}

async fn send(s: &Sidecar, tenant: &str, body: &[u8], token: Option<&str>) -> reqwest::Response {
    let mut r = client()
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(crate::support::token(tenant, "enterprise"))
        .header("content-type", "application/json")
        .body(body.to_vec());
    if let Some(t) = token {
        r = r.header("x-approval-token", t);
    }
    r.send().await.unwrap()
}

fn env(secret: &'static str, fallbacks: &'static str) -> Vec<(&'static str, &'static str)> {
    vec![
        ("PREAUTH_REQUIRE_APPROVAL_ABOVE_USD", "0.05"),
        ("ENFORCEMENT_APPROVAL_TOKEN_SECRET", secret),
        ("ENFORCEMENT_APPROVAL_TOKEN_FALLBACK_SECRETS", fallbacks),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn full_loop_request_approve_retry_replay() {
    let s = start(&env(KEY_NEW, "")).await;
    let body = expensive();
    let r = send(&s, "acme", &body, None).await;
    let v = assert_error(r, 403, "approval_required").await;
    let d = &v["error"]["details"];
    let id = d["approval_id"].as_str().unwrap().to_string();
    assert_eq!(d["request_fingerprint"], fingerprint("acme", "/v1/chat/completions", &body));
    let pending = client()
        .get(s.admin_url("/api/v1/enforcement/approvals?status=pending"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    let pending = json_of(pending).await;
    assert_eq!(pending["items"][0]["approval_id"], id.as_str());
    let mine = s.admin_get("/api/v1/enforcement/approvals?status=pending&tenant_id=acme").await;
    assert_eq!(mine["items"].as_array().map(Vec::len), Some(1), "{mine}");
    let other = s.admin_get("/api/v1/enforcement/approvals?status=pending&tenant_id=globex").await;
    assert_eq!(other["items"].as_array().map(Vec::len), Some(0), "another tenant's filter: {other}");
    for bad in ["0", "1001", "x"] {
        let url = s.admin_url(&format!("/api/v1/enforcement/approvals?limit={bad}"));
        let r = client().get(url).bearer_auth(ADMIN_KEY).send().await.unwrap();
        assert_eq!(r.status(), 400, "limit={bad}");
    }
    assert!(metrics(&s).await.contains("valdrics_ops_enforcement_approval_queue_backlog 1"));
    let approved = client()
        .post(s.admin_url(&format!("/api/v1/enforcement/approvals/{id}/approve")))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(approved.status(), 200);
    let approved = json_of(approved).await;
    let token = approved["approval_token"].as_str().unwrap().to_string();
    assert!(approved["expires_at"].as_str().is_some());
    let r = send(&s, "acme", &body, Some(&token)).await;
    assert_eq!(r.status(), 200, "approved request goes through");
    assert_eq!(s.upstream.last_request().unwrap().header("x-approval-token"), None, "token not forwarded");
    let held = r.headers()["x-preauth-reservation-id"].to_str().unwrap().to_string();
    r.bytes().await.unwrap();
    // The consumption names the approval and the hold it admitted (as its decision does).
    let consumed = s.admin_get("/api/v1/enforcement/ledger?tenant_id=acme&event_type=approval_consumed").await;
    let e = &consumed["items"][0];
    assert_eq!(
        (e["approval_id"].as_str(), e["reservation_id"].as_str()),
        (Some(id.as_str()), Some(held.as_str())),
        "{e}"
    );
    let r = send(&s, "acme", &body, Some(&token)).await;
    // 409 is retried by the OpenAI/Anthropic SDKs unless told otherwise; a used token stays used.
    assert_eq!(r.headers().get("x-should-retry").and_then(|v| v.to_str().ok()), Some("false"));
    assert_error(r, 409, "approval_token_replayed").await;
    // Approving again is refused: it is no longer pending.
    let again = client()
        .post(s.admin_url(&format!("/api/v1/enforcement/approvals/{id}/approve")))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409);
    assert_eq!(json_of(again).await["error"]["code"], "approval_not_pending");
    let m = metrics(&s).await;
    for e in ["issued", "consumed", "replay"] {
        assert!(
            m.contains(&format!("valdrics_ops_enforcement_approval_token_events_total{{event=\"{e}\"}} 1")),
            "{e}\n{m}"
        );
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn independently_minted_tokens_and_every_rejection() {
    let s = start(&env(KEY_NEW, "")).await;
    let body = expensive();
    let fp = fingerprint("acme", "/v1/chat/completions", &body);
    let hs256 = json!({"alg": "HS256", "typ": "JWT"});
    // Accepted: minted by hand.
    let good = raw_token(&hs256, &claims("acme", &fp, "5.00", "appr-1"), KEY_NEW);
    let r = send(&s, "acme", &body, Some(&good)).await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    // Invalid (401): wrong key, alg none / HS512, wrong aud / iss / token_type, missing claim, garbage.
    let mut bad_aud = claims("acme", &fp, "5.00", "appr-2");
    bad_aud["aud"] = json!("authenticated");
    let mut bad_iss = claims("acme", &fp, "5.00", "appr-3");
    bad_iss["iss"] = json!("someone-else");
    let mut bad_type = claims("acme", &fp, "5.00", "appr-4");
    bad_type["token_type"] = json!("access");
    let mut missing = claims("acme", &fp, "5.00", "appr-5");
    missing.as_object_mut().unwrap().remove("request_fingerprint");
    let none_alg = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#),
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims("acme", &fp, "5.00", "appr-6")).unwrap())
    );
    for (name, tok) in [
        ("wrong key", raw_token(&hs256, &claims("acme", &fp, "5.00", "appr-7"), KEY_OLD)),
        ("alg HS512", raw_token(&json!({"alg": "HS512"}), &claims("acme", &fp, "5.00", "appr-8"), KEY_NEW)),
        ("alg none", none_alg),
        ("aud", raw_token(&hs256, &bad_aud, KEY_NEW)),
        ("iss", raw_token(&hs256, &bad_iss, KEY_NEW)),
        ("token_type", raw_token(&hs256, &bad_type, KEY_NEW)),
        ("missing claim", raw_token(&hs256, &missing, KEY_NEW)),
        ("garbage", "not-a-token".to_string()),
    ] {
        let r = send(&s, "acme", &body, Some(&tok)).await;
        assert_eq!(r.status(), 401, "{name}");
        assert_error(r, 401, "approval_token_invalid").await;
    }
    // Expired (409).
    let mut expired = claims("acme", &fp, "5.00", "appr-9");
    expired["exp"] = json!(now_s() - 10);
    let r = send(&s, "acme", &body, Some(&raw_token(&hs256, &expired, KEY_NEW))).await;
    assert_error(r, 409, "approval_token_expired").await;
    // Mismatch (403): another tenant, another body, a lower max cost.
    let other_tenant = raw_token(&hs256, &claims("globex", &fp, "5.00", "appr-10"), KEY_NEW);
    assert_error(send(&s, "acme", &body, Some(&other_tenant)).await, 403, "approval_token_mismatch").await;
    let other_body = raw_token(
        &hs256,
        &claims("acme", &fingerprint("acme", "/v1/chat/completions", b"{}"), "5.00", "appr-11"),
        KEY_NEW,
    );
    assert_error(send(&s, "acme", &body, Some(&other_body)).await, 403, "approval_token_mismatch").await;
    let too_low = raw_token(&hs256, &claims("acme", &fp, "0.01", "appr-12"), KEY_NEW);
    assert_error(send(&s, "acme", &body, Some(&too_low)).await, 403, "approval_token_mismatch").await;
    // A request refused by a later step keeps its token usable: kill switch on, token unused.
    let keep = raw_token(&hs256, &claims("acme", &fp, "5.00", "appr-13"), KEY_NEW);
    patch_runtime(&s, json!({"kill_switch": true, "reason": "test"})).await;
    assert_eq!(send(&s, "acme", &body, Some(&keep)).await.status(), 429);
    patch_runtime(&s, json!({"kill_switch": false, "reason": "test"})).await;
    let r = send(&s, "acme", &body, Some(&keep)).await;
    assert_eq!(r.status(), 200, "token survived the refused attempt");
    r.bytes().await.unwrap();
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn key_rotation_drill() {
    let dir = temp_dir();
    let body = expensive();
    let fp = fingerprint("acme", "/v1/chat/completions", &body);
    let hs256 = json!({"alg": "HS256", "typ": "JWT"});
    let old_a = raw_token(&hs256, &claims("acme", &fp, "5.00", "rot-a"), KEY_OLD);
    let old_b = raw_token(&hs256, &claims("acme", &fp, "5.00", "rot-b"), KEY_OLD);
    // Rotation step 1: new primary, old key kept as a fallback — old tokens still verify.
    let s = start_in(&env(KEY_NEW, KEY_OLD), Arc::new(MemoryCounters::new()), &dir).await;
    let r = send(&s, "acme", &body, Some(&old_a)).await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    s.stop().await;
    // Step 2: the compromised key is removed (restart with new env) — old tokens get 401.
    let s = start_in(&env(KEY_NEW, ""), Arc::new(MemoryCounters::new()), &dir).await;
    assert_error(send(&s, "acme", &body, Some(&old_b)).await, 401, "approval_token_invalid").await;
    // Issue and consume still work with the new key…
    let v = assert_error(send(&s, "acme", &body, None).await, 403, "approval_required").await;
    let id = v["error"]["details"]["approval_id"].as_str().unwrap().to_string();
    let approved = client()
        .post(s.admin_url(&format!("/api/v1/enforcement/approvals/{id}/approve")))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    let token = json_of(approved).await["approval_token"].as_str().unwrap().to_string();
    let r = send(&s, "acme", &body, Some(&token)).await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    // …and replay protection survived the restart: a token consumed before it is refused.
    let replay_after_restart = raw_token(&hs256, &claims("acme", &fp, "5.00", "rot-a"), KEY_NEW);
    assert_error(send(&s, "acme", &body, Some(&replay_after_restart)).await, 409, "approval_token_replayed").await;
    assert_error(send(&s, "acme", &body, Some(&token)).await, 409, "approval_token_replayed").await;
    // Freezing issuance (runbook step 2) refuses approvals with 423.
    let v = assert_error(send(&s, "acme", &body, None).await, 403, "approval_required").await;
    let id = v["error"]["details"]["approval_id"].as_str().unwrap().to_string();
    patch_runtime(&s, json!({"approval_issuance_frozen": true, "reason": "key compromise"})).await;
    let r = client()
        .post(s.admin_url(&format!("/api/v1/enforcement/approvals/{id}/approve")))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 423);
    assert_eq!(json_of(r).await["error"]["code"], "approval_issuance_frozen");
    let deny = client()
        .post(s.admin_url(&format!("/api/v1/enforcement/approvals/{id}/deny")))
        .bearer_auth(ADMIN_KEY)
        .json(&json!({"reason": "not now"}))
        .send()
        .await
        .unwrap();
    assert_eq!(deny.status(), 200);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn soft_mode_token_admits_over_budget_hard_mode_does_not() {
    let dir = temp_dir();
    let tenants = dir.join("tenants.toml");
    std::fs::write(&tenants, "[tenants.\"poor\"]\ntier = \"pro\"\nmonthly_budget_usd = \"0.01\"\n").unwrap();
    let body = expensive();
    let fp = fingerprint("poor", "/v1/chat/completions", &body);
    let hs256 = json!({"alg": "HS256", "typ": "JWT"});
    let mut e = env(KEY_NEW, "");
    e.push(("PREAUTH_TENANTS_FILE", Box::leak(tenants.display().to_string().into_boxed_str())));
    let s = start_in(&e, Arc::new(MemoryCounters::new()), &dir).await;
    let t1 = raw_token(&hs256, &claims("poor", &fp, "5.00", "ob-1"), KEY_NEW);
    let v = assert_error(send(&s, "poor", &body, Some(&t1)).await, 402, "budget_exceeded").await;
    assert_eq!(v["error"]["details"]["reason"], "budget_exceeded", "hard mode: a token does not create budget");
    s.stop().await;
    e.push(("PREAUTH_ENFORCEMENT_MODE", "soft"));
    let s = start_in(&e, Arc::new(MemoryCounters::new()), &temp_dir()).await;
    let r = send(&s, "poor", &body, Some(&t1)).await;
    assert_eq!(r.status(), 200, "soft mode: approved over budget (token unused by the hard-mode refusal)");
    r.bytes().await.unwrap();
    assert!(metrics(&s).await.contains("reason=\"approved_over_budget\""));
    s.stop().await;
}

/// Soft mode escalates a request above the hard limit to REQUIRE_APPROVAL and queues an
/// approval; the token the operator then issues admits it (CONTRACT §5: a valid token lifts
/// soft-mode escalations), holding its cost. Before, the retry met the same 403 and queued yet
/// another approval: an approval that could never be used. In hard mode it stays a 402.
#[tokio::test(flavor = "multi_thread")]
async fn soft_mode_hard_limit_escalation_is_lifted_by_its_approval() {
    let mut e = env(KEY_NEW, "");
    e.push(("PREAUTH_HARD_DENY_ABOVE_USD", "0.06"));
    e.push(("PREAUTH_ENFORCEMENT_MODE", "soft"));
    let s = start(&e).await;
    let body = expensive(); // ≈ 0.10 USD: above both thresholds
    let v = assert_error(send(&s, "acme", &body, None).await, 403, "approval_required").await;
    assert_eq!(v["error"]["details"]["reason"], "soft_mode_hard_deny_threshold_exceeded");
    let id = v["error"]["details"]["approval_id"].as_str().expect("an approval is queued").to_string();
    let r = s.admin_post(&format!("/api/v1/enforcement/approvals/{id}/approve"), json!({})).await;
    assert_eq!(r.status(), 200);
    let token = json_of(r).await["approval_token"].as_str().unwrap().to_string();
    let r = send(&s, "acme", &body, Some(&token)).await;
    assert_eq!(r.status(), 200, "the approved request is admitted");
    assert_eq!(r.headers()["x-preauth-decision"], "ALLOW");
    assert!(r.headers().get("x-preauth-reservation-id").is_some(), "and holds its cost");
    r.bytes().await.unwrap();
    let pending = s.admin_get("/api/v1/enforcement/approvals?status=pending").await;
    assert_eq!(pending["items"].as_array().map(Vec::len), Some(0), "no new approval was queued");
    assert_error(send(&s, "acme", &body, Some(&token)).await, 409, "approval_token_replayed").await;
    s.stop().await;

    // Hard mode: the hard limit is refused outright, token or not (and the token stays unused).
    e.retain(|(k, _)| *k != "PREAUTH_ENFORCEMENT_MODE");
    let s = start(&e).await;
    let fp = fingerprint("acme", "/v1/chat/completions", &body);
    let t = raw_token(&json!({"alg": "HS256", "typ": "JWT"}), &claims("acme", &fp, "5.00", "hl-1"), KEY_NEW);
    let v = assert_error(send(&s, "acme", &body, Some(&t)).await, 402, "budget_exceeded").await;
    assert_eq!(v["error"]["details"]["reason"], "hard_deny_threshold_exceeded");
    // A token that fails its checks changes nothing: the limit refuses first (step 7 before 8),
    // not the token — a new approval could never admit this request.
    let mut old = claims("acme", &fp, "5.00", "hl-2");
    old["exp"] = json!(now_s() - 60);
    let expired = raw_token(&json!({"alg": "HS256", "typ": "JWT"}), &old, KEY_NEW);
    let other = raw_token(&json!({"alg": "HS256", "typ": "JWT"}), &claims("other", &fp, "5.00", "hl-3"), KEY_NEW);
    for bad in [expired.as_str(), "not.a.token", other.as_str()] {
        let v = assert_error(send(&s, "acme", &body, Some(bad)).await, 402, "budget_exceeded").await;
        assert_eq!(v["error"]["details"]["reason"], "hard_deny_threshold_exceeded", "{bad}");
    }
    s.stop().await;
}

#[test]
fn mint_approval_cli() {
    let bin = env!("CARGO_BIN_EXE_preauth-sidecar");
    let fp = "a".repeat(64);
    let out = std::process::Command::new(bin)
        .args(["mint-approval", "--tenant", "acme", "--fingerprint", &fp, "--max-cost-usd", "2.50"])
        .env("ENFORCEMENT_APPROVAL_TOKEN_SECRET", KEY_NEW)
        .env_remove("ENFORCEMENT_APPROVAL_ISSUANCE_FROZEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap();
    let claims =
        preauth_sidecar::decide::approval::verify(token.trim(), &[KEY_NEW.as_bytes()], "preauth-sidecar", now_s())
            .unwrap();
    assert_eq!((claims.tenant_id.as_str(), claims.max_cost_usd.to_string().as_str()), ("acme", "2.500000"));
    let frozen = std::process::Command::new(bin)
        .args(["mint-approval", "--tenant", "acme", "--fingerprint", &fp, "--max-cost-usd", "2.50"])
        .env("ENFORCEMENT_APPROVAL_TOKEN_SECRET", KEY_NEW)
        .env("ENFORCEMENT_APPROVAL_ISSUANCE_FROZEN", "true")
        .output()
        .unwrap();
    assert_eq!(frozen.status.code(), Some(1));
    let short = std::process::Command::new(bin)
        .args(["mint-approval", "--tenant", "acme", "--fingerprint", &fp, "--max-cost-usd", "2.50"])
        .env("ENFORCEMENT_APPROVAL_TOKEN_SECRET", "too-short")
        .output()
        .unwrap();
    assert_eq!(short.status.code(), Some(64), "secrets shorter than 32 characters are a config error");
    // A bad option is named with what it must be (a negative cost was reported as a bad id or
    // fingerprint).
    for (flag, value) in [("--max-cost-usd", "-2.50"), ("--fingerprint", "ABC")] {
        let mut args = vec!["mint-approval", "--tenant", "acme", "--fingerprint", &fp, "--max-cost-usd", "2.50"];
        let at = args.iter().position(|a| *a == flag).unwrap() + 1;
        args[at] = value;
        let out = std::process::Command::new(bin)
            .args(&args)
            .env("ENFORCEMENT_APPROVAL_TOKEN_SECRET", KEY_NEW)
            .env_remove("ENFORCEMENT_APPROVAL_ISSUANCE_FROZEN")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{flag} {value}");
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err.lines().next().unwrap_or_default();
        assert!(first.starts_with(&format!("{flag} must be")), "{flag} {value}: {err}");
    }
}

/// An approved request is admitted and uses its token up; when the gateway then fails (5xx, 429),
/// the OpenAI/Anthropic SDKs retry the same request with the same, now used, token and the
/// caller sees `409 approval_token_replayed` instead of the gateway's error. The forwarded
/// failure says `x-should-retry: false`; without a token the gateway's answer is untouched.
#[tokio::test(flavor = "multi_thread")]
async fn failed_upstream_answer_of_an_approved_request_is_not_retried_by_sdks() {
    let s = start(&env(KEY_NEW, "")).await;
    let body = expensive();
    let fp = fingerprint("acme", "/v1/chat/completions", &body);
    let token = raw_token(&json!({"alg": "HS256", "typ": "JWT"}), &claims("acme", &fp, "5.00", "appr-up"), KEY_NEW);
    let call = |token: Option<String>, status: &'static str, body: Vec<u8>| {
        let mut r = client()
            .post(s.url("/v1/chat/completions"))
            .bearer_auth(crate::support::token("acme", "enterprise"))
            .header("content-type", "application/json")
            .header("x-mock-status", status)
            .body(body);
        if let Some(t) = token {
            r = r.header("x-approval-token", t);
        }
        r.send()
    };
    let r = call(Some(token.clone()), "500", body.clone()).await.unwrap();
    assert_eq!(r.status(), 500);
    assert_eq!(r.headers().get("x-should-retry").and_then(|v| v.to_str().ok()), Some("false"));
    assert_eq!(json_of(r).await["error"]["code"], "mock_status", "the gateway's body passes through");
    // What the SDK's retry would have got.
    assert_error(send(&s, "acme", &body, Some(&token)).await, 409, "approval_token_replayed").await;
    // An approved request that succeeds, and a failure without a token, carry no hint.
    let ok = raw_token(&json!({"alg": "HS256", "typ": "JWT"}), &claims("acme", &fp, "5.00", "appr-ok"), KEY_NEW);
    let r = send(&s, "acme", &body, Some(&ok)).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-should-retry").is_none());
    r.bytes().await.unwrap();
    let r = call(None, "503", serde_json::to_vec(&chat("gpt-4o-mini")).unwrap()).await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("x-should-retry").is_none(), "no token: the gateway's answer as sent");
    // The sidecar's own 502 (the gateway unreachable) for a request that used its token says so too.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let mut e = env(KEY_NEW, "");
    e.push(("PREAUTH_UPSTREAM_URL", dead.as_str()));
    let down = start(&e).await;
    let t = raw_token(&json!({"alg": "HS256", "typ": "JWT"}), &claims("acme", &fp, "5.00", "appr-502"), KEY_NEW);
    let r = send(&down, "acme", &body, Some(&t)).await;
    assert_eq!(r.headers().get("x-should-retry").and_then(|v| v.to_str().ok()), Some("false"));
    assert_error(r, 502, "upstream_unavailable").await;
    down.stop().await;
    s.stop().await;
}

/// Every approval step's ledger event carries what the approval is about (tier, model, estimated
/// cost), the denial as much as the request and the grant: a ledger reader filtering by tier or
/// model must see the denials too.
#[tokio::test(flavor = "multi_thread")]
async fn approval_events_all_carry_tier_model_and_cost() {
    let s = start(&env(KEY_NEW, "")).await;
    let body = expensive();
    for (tenant, action, event_type) in
        [("ev-granted", "approve", "approval_granted"), ("ev-denied", "deny", "approval_denied")]
    {
        let v = assert_error(send(&s, tenant, &body, None).await, 403, "approval_required").await;
        let id = v["error"]["details"]["approval_id"].as_str().unwrap().to_string();
        let r = client()
            .post(s.admin_url(&format!("/api/v1/enforcement/approvals/{id}/{action}")))
            .bearer_auth(ADMIN_KEY)
            .json(&json!({"reason": "test"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let items = s.admin_get(&format!("/api/v1/enforcement/ledger?tenant_id={tenant}")).await["items"].clone();
        let of = |t: &str| items.as_array().unwrap().iter().find(|e| e["event_type"] == t).cloned().unwrap_or_default();
        let (requested, step) = (of("approval_requested"), of(event_type));
        for k in ["tenant_tier", "model", "estimated_cost_usd", "request_id", "request_fingerprint", "approval_id"] {
            assert!(!requested[k].is_null(), "{k}: {requested}");
            assert_eq!(step[k], requested[k], "{action} {k}: {step}");
        }
    }
    s.stop().await;
}

/// An `approval_requested` event names the reasons of the request that asked (as its decision
/// event does), also when it asks again for an approval still pending from an earlier request
/// decided under another mode.
#[tokio::test(flavor = "multi_thread")]
async fn approval_requested_carries_the_reasons_of_the_request_that_asked() {
    let mut e = env(KEY_NEW, "");
    e.push(("PREAUTH_SOURCE_MODES", "b=soft"));
    let s = start(&e).await;
    let body = expensive();
    assert_error(send(&s, "again", &body, None).await, 403, "approval_required").await;
    let same: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let r = post_with(&s, "/v1/chat/completions", "again", "enterprise", &same, &[("x-preauth-source", "b")]).await;
    assert_error(r, 403, "approval_required").await;
    let items = s.admin_get("/api/v1/enforcement/ledger?tenant_id=again").await["items"].clone();
    let reasons = |t: &str| -> Vec<String> {
        let mut v: Vec<String> = items
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["event_type"] == t)
            .map(|e| e["reasons"][0].as_str().unwrap_or("").to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(reasons("decision"), ["approval_required", "soft_mode_approval_required"]);
    assert_eq!(reasons("approval_requested"), reasons("decision"), "{items}");
    s.stop().await;
}
