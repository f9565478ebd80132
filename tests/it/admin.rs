//! The admin listener: health, readiness, auth, the runtime API.

use serde_json::json;

use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn health_ready_and_auth() {
    let s = start(&[]).await;
    let c = client();
    assert_eq!(c.get(s.admin_url("/healthz")).send().await.unwrap().status(), 200);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while c.get(s.admin_url("/readyz")).send().await.unwrap().status() != 200 {
        assert!(std::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let r = c.get(s.admin_url("/api/v1/enforcement/runtime")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(json_of(r).await["error"]["code"], "unauthorized");
    let r = c.get(s.admin_url("/api/v1/enforcement/runtime")).bearer_auth("wrong").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = c.get(s.admin_url("/api/v1/enforcement/runtime")).bearer_auth(ADMIN_KEY).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v = json_of(r).await;
    assert_eq!(v["policy_version"], 1);
    assert_eq!(v["enforcement_mode"], "hard");
    // PATCH needs a reason and known, valid settings.
    let r = patch_runtime(&s, json!({"kill_switch": true})).await;
    assert_eq!(r.status(), 400);
    assert_eq!(json_of(r).await["error"]["code"], "invalid_request");
    let r = patch_runtime(&s, json!({"kill_switch": "on", "reason": "x"})).await;
    assert_eq!(r.status(), 400);
    let r = patch_runtime(&s, json!({"no_such_knob": 1, "reason": "x"})).await;
    assert_eq!(r.status(), 400);
    let r = patch_runtime(
        &s,
        json!({"enforcement_mode": "shadow", "fair_use_guards_enabled": true, "fair_use_per_minute_cap": 2,
               "source_modes": {"batch": "soft"}, "audit_sample_rate": 1, "reason": "tighten"}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let v = json_of(r).await;
    assert_eq!((v["policy_version"].as_u64(), v["enforcement_mode"].as_str()), (Some(2), Some("shadow")));
    assert_eq!(v["source_modes"]["batch"], "soft");
    assert!(metrics(&s).await.contains("preauth_policy_version 2"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_disabled_without_key() {
    let s = start(&[("ADMIN_API_KEY", "")]).await;
    let r = client().get(s.admin_url("/api/v1/enforcement/runtime")).bearer_auth("anything").send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(json_of(r).await["error"]["code"], "admin_disabled");
    assert_eq!(client().get(s.admin_url("/metrics")).send().await.unwrap().status(), 200);
    s.stop().await;
}
