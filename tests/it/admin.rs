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
    // The proxy listener's error shape (CONTRACT §3), header included.
    assert_eq!(r.headers()["x-preauth-error"], "unauthorized");
    let id = r.headers()["x-preauth-request-id"].to_str().unwrap().to_string();
    let v = json_of(r).await;
    let e = &v["error"];
    assert_eq!(
        (&e["code"], &e["type"], &e["id"], &e["details"]),
        (&json!("unauthorized"), &json!("preauth_error"), &json!(id), &json!({})),
        "{v}"
    );
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    let r = c.get(s.admin_url("/api/v1/enforcement/runtime")).bearer_auth("wrong").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = c.get(s.admin_url("/api/v1/enforcement/runtime")).header("authorization", ADMIN_KEY).send().await.unwrap();
    assert_eq!(r.status(), 401, "the key alone, without the scheme, is refused");
    for scheme in ["bearer", "BEARER"] {
        let r = c
            .get(s.admin_url("/api/v1/enforcement/runtime"))
            .header("authorization", format!("{scheme} {ADMIN_KEY}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "the auth scheme is case-insensitive: {scheme}");
    }
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

/// An embedded replica keeps what the on-call engineer changed at runtime across restarts
/// (`PREAUTH_DATA_DIR/runtime-policy.json`): a kill switch stays on after a graceful stop and
/// after a SIGKILL, and `policy_version` does not go back. A setting the configuration changed
/// since the runtime change is the configuration's (a redeploy with a new intent). Through the
/// real binary: its start-up, signals and environment.
#[tokio::test(flavor = "multi_thread")]
async fn runtime_changes_survive_a_restart_unless_the_configuration_changed_them() {
    use preauth_sidecar::demo::upstream::FakeUpstream;
    let up = FakeUpstream::start("127.0.0.1:0").await.unwrap();
    let dir = temp_dir();
    let mut b = Binary::start(&up, &dir, &[("LLM_FAIR_USE_GUARDS_ENABLED", "true")]);
    let body = chat("gpt-4o-mini");
    let killed = |r: reqwest::Response| async move {
        let v = assert_error(r, 429, "llm_fair_use_exceeded").await;
        assert_eq!(v["error"]["details"]["reason"], "global_abuse_kill_switch", "{v}");
    };
    assert_eq!(b.call("acme", &body, &[]).await.status(), 200);
    let v = b
        .patch(json!({"kill_switch": true, "fair_use_per_minute_cap": 2, "reason": "INC-7: cross-tenant burst"}))
        .await;
    let mut version = v["policy_version"].as_u64().unwrap();
    killed(b.call("acme", &body, &[]).await).await;

    for graceful in [true, false] {
        if graceful {
            b.restart_gracefully(&[], &[]);
        } else {
            b.restart_with(&[], &[]);
        }
        killed(b.call("acme", &body, &[]).await).await;
        let rt = b.admin_get("/api/v1/enforcement/runtime").await;
        assert_eq!(
            (rt["kill_switch"].as_bool(), rt["fair_use_per_minute_cap"].as_i64()),
            (Some(true), Some(2)),
            "{rt}"
        );
        let now = rt["policy_version"].as_u64().unwrap();
        assert!(now > version, "policy_version {now} after a restart, {version} before (graceful: {graceful})");
        version = now;
        let m = b.metrics().await;
        assert_eq!(sample(&m, "preauth_kill_switch_enabled"), 1.0);
        assert_eq!(sample(&m, "preauth_policy_version"), now as f64);
        // The restart's new version is on record, with what it restored.
        let e = restart_event(&b).await;
        assert_eq!(e["policy_version"], now, "{e}");
        assert_eq!(e["details"]["changes"]["restored"], json!({"kill_switch": true, "fair_use_per_minute_cap": 2}));
    }

    // Redeployed with a new per-minute cap: the environment's value is in force; the kill
    // switch, which the configuration did not change, is still on.
    b.restart_with(&[("LLM_FAIR_USE_PER_MINUTE_CAP", "3")], &[]);
    let rt = b.admin_get("/api/v1/enforcement/runtime").await;
    assert_eq!((rt["kill_switch"].as_bool(), rt["fair_use_per_minute_cap"].as_i64()), (Some(true), Some(3)), "{rt}");
    assert!(rt["policy_version"].as_u64().unwrap() > version);
    let e = restart_event(&b).await;
    assert_eq!(e["details"]["changes"]["restored"], json!({"kill_switch": true}), "{e}");
    assert_eq!(
        e["details"]["changes"]["configuration_won"],
        json!({"fair_use_per_minute_cap": {"dropped": 2, "configured": 3}}),
        "{e}"
    );
    b.patch(json!({"kill_switch": false, "reason": "INC-7 resolved"})).await;
    for _ in 0..3 {
        assert_eq!(b.call("beta", &body, &[]).await.status(), 200);
    }
    let v = assert_error(b.call("beta", &body, &[]).await, 429, "llm_fair_use_exceeded").await;
    assert_eq!(v["error"]["details"]["reason"], "fair_use_per_minute", "the environment's cap of 3: {v}");
}

/// The newest `runtime_changed` event, which must be a restart's.
async fn restart_event(b: &Binary) -> serde_json::Value {
    let v = b.admin_get("/api/v1/enforcement/ledger?event_type=runtime_changed&limit=1").await;
    let e = v["items"][0].clone();
    assert_eq!(e["details"]["reason"], preauth_sidecar::server::RESTART_REASON, "{v}");
    e
}

/// A runtime change an embedded replica cannot save would be undone by the next restart: it is
/// refused (503, saying why) and nothing changes.
#[tokio::test(flavor = "multi_thread")]
async fn a_runtime_change_that_cannot_be_saved_is_refused() {
    let dir = temp_dir();
    let s = start_in(&[], std::sync::Arc::new(preauth_sidecar::store::memory::MemoryCounters::new()), &dir).await;
    // The temporary file's name taken by a directory: the write fails (even as root).
    std::fs::create_dir(dir.join("runtime-policy.json.tmp")).unwrap();
    let r = patch_runtime(&s, json!({"kill_switch": true, "reason": "INC-8"})).await;
    assert_eq!(r.status(), 503);
    let v = json_of(r).await;
    assert_eq!(v["error"]["code"], "store_unavailable", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("runtime-policy.json") && msg.contains("not applied"), "{msg}");
    let rt = admin_get(s.admin_url("/api/v1/enforcement/runtime")).await;
    assert_eq!((rt["kill_switch"].as_bool(), rt["policy_version"].as_u64()), (Some(false), Some(1)), "{rt}");
    assert_eq!(
        client()
            .post(s.url("/v1/chat/completions"))
            .bearer_auth(token("acme", "pro"))
            .json(&chat("gpt-4o-mini"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    s.stop().await;
}

/// Embedded mode: a freeze set at runtime (`PATCH approval_issuance_frozen`), kept in the data
/// directory, also stops `mint-approval` run with the sidecar's `PREAUTH_DATA_DIR`; a runtime
/// policy file it cannot read mints nothing either.
#[tokio::test(flavor = "multi_thread")]
async fn mint_approval_honours_a_runtime_freeze_kept_in_the_data_directory() {
    let secret = "embedded-approval-secret-0123456789abcdef";
    let dir = temp_dir();
    let s = start_in(
        &[("ENFORCEMENT_APPROVAL_TOKEN_SECRET", secret)],
        std::sync::Arc::new(preauth_sidecar::store::memory::MemoryCounters::new()),
        &dir,
    )
    .await;
    let data_dir = dir.display().to_string();
    let mint = || mint_approval(secret, &[("PREAUTH_DATA_DIR", &data_dir)]);
    let out = mint().await;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let r = patch_runtime(&s, json!({"approval_issuance_frozen": true, "reason": "INC-3 key compromise"})).await;
    assert_eq!(r.status(), 200);
    let version = json_of(r).await["policy_version"].as_u64().unwrap();
    let out = mint().await;
    assert_eq!(out.status.code(), Some(1), "frozen at runtime: {}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout.is_empty(), "no token printed");
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(said.contains(&format!("(policy version {version})")), "names the version in force: {said}");
    let r = patch_runtime(&s, json!({"approval_issuance_frozen": false, "reason": "key rotated"})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(mint().await.status.code(), Some(0));
    s.stop().await;
    std::fs::write(dir.join("runtime-policy.json"), b"{\"version\": 3, \"knobs\": ").unwrap();
    let out = mint().await;
    assert_eq!(out.status.code(), Some(1), "unreadable runtime policy: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("runtime policy could not be read"));
}

/// CONTRACT §9: a replica exposes every metric name of the contract from the start, with the
/// listed labels (before, the reason, denial, evaluation, observed and spend families appeared
/// only after their first event, so a fresh replica or one with fair use off lacked them).
#[tokio::test(flavor = "multi_thread")]
async fn a_fresh_sidecar_exposes_every_contract_metric_with_its_labels() {
    let s = start(&[]).await;
    let text = metrics(&s).await;
    for (name, labels) in [
        ("valdrics_ops_enforcement_gate_decisions_total", &["source", "decision", "path"][..]),
        ("valdrics_ops_enforcement_gate_decision_reasons_total", &["source", "reason"]),
        ("valdrics_ops_enforcement_gate_failures_total", &["source", "failure_type"]),
        ("valdrics_ops_enforcement_gate_latency_seconds_bucket", &["source", "path", "le"]),
        ("valdrics_ops_llm_pre_auth_denials_total", &["reason", "tenant_tier"]),
        ("valdrics_ops_llm_fair_use_denials_total", &["gate", "tenant_tier"]),
        ("valdrics_ops_llm_fair_use_evaluations_total", &["gate", "outcome", "tenant_tier"]),
        ("valdrics_ops_llm_fair_use_observed", &["gate", "tenant_tier"]),
        ("valdrics_ops_llm_spend_usd_total", &["tenant_tier", "provider", "model"]),
        ("valdrics_ops_enforcement_reservation_drift_usd_total", &["direction"]),
        ("valdrics_ops_enforcement_reservation_reconciliations_total", &["trigger", "status"]),
        ("valdrics_ops_enforcement_approval_token_events_total", &["event"]),
        ("valdrics_ops_enforcement_approval_queue_backlog", &[]),
        ("preauth_kill_switch_enabled", &[]),
        ("preauth_global_block_active", &[]),
        ("preauth_policy_version", &[]),
        ("preauth_reservations_active", &[]),
        ("preauth_outbox_events_total", &["state"]),
        ("preauth_outbox_depth", &[]),
        ("preauth_outbox_oldest_age_seconds", &[]),
        ("preauth_store_errors_total", &["op"]),
        ("preauth_upstream_responses_total", &["status_class"]),
    ] {
        let sample = text
            .lines()
            .find(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(['{', ' '])))
            .unwrap_or_else(|| panic!("{name} missing from a fresh sidecar's /metrics:\n{text}"));
        let names: Vec<&str> = match sample[name.len()..].strip_prefix('{') {
            Some(rest) => rest.split('}').next().unwrap().split(',').map(|kv| kv.split('=').next().unwrap()).collect(),
            None => Vec::new(),
        };
        let (mut got, mut want) = (names.clone(), labels.to_vec());
        got.sort_unstable();
        want.sort_unstable();
        assert_eq!(got, want, "labels of {sample}");
    }
    // The series a dashboard reads first exist at 0.
    for series in [
        "valdrics_ops_enforcement_gate_decision_reasons_total{reason=\"budget_exceeded\",source=\"default\"} 0",
        "valdrics_ops_llm_pre_auth_denials_total{reason=\"fair_use_per_minute\",tenant_tier=\"free\"} 0",
        "valdrics_ops_llm_fair_use_evaluations_total{gate=\"per_minute\",outcome=\"deny\",tenant_tier=\"pro\"} 0",
        "valdrics_ops_llm_fair_use_observed{gate=\"concurrency\",tenant_tier=\"enterprise\"} 0",
    ] {
        assert!(text.lines().any(|l| l == series), "{series} missing");
    }
    s.stop().await;
}

/// Tenant ids are any visible ASCII (`org/1`, `x?y`, `a%b`, `a+b`): the admin path segment is
/// percent-decoded like the query parameters, so `/tenants/org%2F1` shows tenant `org/1`
/// (before, it showed an empty view of a tenant literally named `org%2F1`, and `org/1` could not
/// be looked up at all); `+` in a path is itself, not a space.
#[tokio::test(flavor = "multi_thread")]
async fn admin_paths_name_tenants_percent_encoded() {
    let s = start(&[]).await;
    for (tenant, segment) in [("org/1?x#%", "org%2F1%3Fx%23%25"), ("a+b", "a+b"), ("a+b", "a%2Bb")] {
        let r = post(&s, "/v1/chat/completions", tenant, "pro", &chat("gpt-4o-mini")).await;
        assert_eq!(r.status(), 200, "{tenant}");
        let v = tenant_view(&s, segment).await;
        assert_eq!(v["tenant_id"], tenant, "{segment}");
        assert!(v["daily_requests"].as_u64() >= Some(1), "{segment}: {v}");
        assert_eq!(v["tier"], "pro", "{segment}: {v}");
    }
    s.stop().await;
}
