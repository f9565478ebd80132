//! Spend through the real proxy: exact charges, atomic reservations under concurrency, upstream
//! errors, cut streams, restart, sweep, clamp, and the admin reconcile API.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use preauth_sidecar::decide::pricing::{cost, PriceTable};
use preauth_sidecar::decide::usage_types::Usage;
use preauth_sidecar::decide::Micros;
use preauth_sidecar::demo::upstream::FakeUpstream;
use preauth_sidecar::store::memory::MemoryCounters;
use serde_json::{json, Value};

use crate::support::*;

fn usd(v: &Value) -> Micros {
    Micros::from_usd_str(v.as_str().unwrap_or_else(|| panic!("not a money string: {v}"))).unwrap()
}

fn price_cost(model: &str, u: Usage) -> Micros {
    let t = PriceTable::builtin();
    cost(t.lookup(model).price, &u)
}

/// The sidecar's worst-case estimate for a chat body (estimator + built-in prices).
fn worst_case(model: &str, body: &Value, max_output: u64) -> Micros {
    let t = PriceTable::builtin();
    let body = preauth_sidecar::decide::json::Doc::from_value(body);
    let e = preauth_sidecar::decide::estimate::estimate(preauth_sidecar::decide::Route::ChatCompletions, &body);
    preauth_sidecar::decide::pricing::worst_case_cost(t.lookup(model).price, e.prompt_tokens, max_output)
}

#[tokio::test(flavor = "multi_thread")]
async fn spend_equals_the_price_of_reported_usage_json_and_sse() {
    let s = start(&[]).await;
    let usage = Usage { prompt_tokens: 1200, completion_tokens: 300, cached_tokens: 200, reasoning_tokens: 50 };
    let r = client()
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(token("acme", "pro"))
        .header("x-mock-prompt-tokens", "1200")
        .header("x-mock-completion-tokens", "300")
        .header("x-mock-cached-tokens", "200")
        .header("x-mock-reasoning-tokens", "50")
        .json(&chat("gpt-4o-mini"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-preauth-reservation-id").is_some(), "allowed request holds a reservation");
    r.bytes().await.unwrap();
    let one = price_cost("gpt-4o-mini", usage);
    wait_for("JSON settlement", || async { usd(&tenant_view(&s, "acme").await["spent_usd"]) == one }).await;

    let body = json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let r = client()
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(token("acme", "pro"))
        .header("x-mock-prompt-tokens", "1200")
        .header("x-mock-completion-tokens", "300")
        .header("x-mock-cached-tokens", "200")
        .header("x-mock-reasoning-tokens", "50")
        .json(&body)
        .send()
        .await
        .unwrap();
    r.bytes().await.unwrap();
    wait_for("SSE settlement", || async {
        let v = tenant_view(&s, "acme").await;
        usd(&v["spent_usd"]) == Micros(one.0 * 2) && usd(&v["reserved_usd"]) == Micros::ZERO
    })
    .await;

    // Anthropic and the Responses API are priced from their own usage shapes.
    let r = client()
        .post(s.url("/v1/messages"))
        .bearer_auth(token("anth", "pro"))
        .header("x-mock-prompt-tokens", "1000")
        .header("x-mock-completion-tokens", "100")
        .json(&json!({"model": "claude-3-5-haiku", "max_tokens": 200, "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    r.bytes().await.unwrap();
    let want =
        price_cost("claude-3-5-haiku", Usage { prompt_tokens: 1000, completion_tokens: 100, ..Usage::default() });
    wait_for("Anthropic SSE settlement", || async { usd(&tenant_view(&s, "anth").await["spent_usd"]) == want }).await;
    let m = metrics(&s).await;
    let spend = "valdrics_ops_llm_spend_usd_total{model=\"gpt-4o-mini\",provider=\"openai\",tenant_tier=\"pro\"";
    assert!(metric_sum(&m, spend) > 0.0, "{m}");
    let savings = "valdrics_ops_enforcement_reservation_reconciliations_total{status=\"savings\",trigger=\"usage\"";
    assert!(metric_sum(&m, savings) >= 1.0, "{m}");
    assert!(metric_sum(&m, "valdrics_ops_enforcement_reservation_drift_usd_total{direction=\"savings\"") > 0.0, "{m}");
    s.stop().await;
}

/// `PREAUTH_THREADS=1` runs the proxy on a single-threaded runtime (no work stealing). Requests on
/// HTTP/1 and h2c, JSON and SSE, are all in flight at once on that one thread, and each settles.
/// The real binary: one pingora server per process, as in production (pingora finds its
/// single-threaded runtimes through a thread-local that outlives a stopped in-process server).
async fn one_proxy_thread_serves_requests_concurrently_and_settles_each(extra: &[(&str, &str)]) {
    let up = FakeUpstream::start("127.0.0.1:0").await.unwrap();
    let env: Vec<_> = [("PREAUTH_THREADS", "1")].into_iter().chain(extra.iter().copied()).collect();
    let b = Binary::start(&up, &temp_dir(), &env);
    let h2c = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let sse = json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let mut tasks = Vec::new();
    for i in 0..24 {
        let c = if i % 4 < 2 { client() } else { h2c.clone() };
        let (body, delay) = if i % 2 == 0 { (chat("gpt-4o-mini"), "3000") } else { (sse.clone(), "0") };
        let req = c
            .post(b.url("/v1/chat/completions"))
            .bearer_auth(token("solo", "pro"))
            .header("x-mock-prompt-tokens", "1000")
            .header("x-mock-completion-tokens", "100")
            .header("x-mock-delay-ms", delay)
            .json(&body);
        tasks.push(tokio::spawn(async move {
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap();
        }));
    }
    // The JSON answers wait 3 s at the upstream: one after another, the last of the 24 would
    // reach it after 36 s; served concurrently, all are there within the wait's 5 s.
    wait_for("all 24 requests at the upstream at once", || async { up.request_count() == 24 }).await;
    for t in tasks {
        t.await.unwrap();
    }
    let one = price_cost("gpt-4o-mini", Usage { prompt_tokens: 1000, completion_tokens: 100, ..Usage::default() });
    wait_for("every settlement", || async {
        let v = b.admin_get("/api/v1/enforcement/tenants/solo").await;
        usd(&v["spent_usd"]) == Micros(one.0 * 24) && usd(&v["reserved_usd"]) == Micros::ZERO
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_proxy_thread_embedded() {
    one_proxy_thread_serves_requests_concurrently_and_settles_each(&[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_proxy_thread_on_redis() {
    let p = redis_prefix();
    one_proxy_thread_serves_requests_concurrently_and_settles_each(&[
        ("PREAUTH_REDIS_URL", REDIS),
        ("PREAUTH_REDIS_KEY_PREFIX", &p),
    ])
    .await;
    redis_cleanup(&p).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_never_overspend() {
    // One request's worst case, as the sidecar estimates it: the budget fits exactly 10.
    let body = json!({"model": "gpt-4o", "max_tokens": 1000, "messages": [{"role": "user", "content": "concurrency"}]});
    let est = worst_case("gpt-4o", &body, 1000);
    for round in 0..3 {
        let dir = temp_dir();
        let budget = Micros(est.0 * 10 + est.0 / 2);
        let tenants = dir.join("tenants.toml");
        std::fs::write(
            &tenants,
            format!("[tenants.\"race\"]\ntier = \"enterprise\"\nmonthly_budget_usd = \"{budget}\"\ndaily_request_quota = 0\n"),
        )
        .unwrap();
        let s = start_in(
            &[("PREAUTH_TENANTS_FILE", tenants.to_str().unwrap()), ("PREAUTH_REQUIRE_APPROVAL_ABOVE_USD", "50")],
            Arc::new(MemoryCounters::new()),
            &dir,
        )
        .await;
        let tok = token("race", "enterprise");
        let mut tasks = Vec::new();
        for _ in 0..200 {
            let (url, tok, body) = (s.url("/v1/chat/completions"), tok.clone(), body.clone());
            tasks.push(tokio::spawn(async move {
                let r = client()
                    .post(url)
                    .bearer_auth(tok)
                    .header("x-mock-delay-ms", "300")
                    .header("x-mock-completion-tokens", "1000")
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let code = r.headers().get("x-preauth-error").map(|v| v.to_str().unwrap().to_string());
                r.bytes().await.unwrap();
                (status, code)
            }));
        }
        let mut peak_reserved = Micros::ZERO;
        let mut results = Vec::new();
        for t in tasks {
            let v = tenant_view(&s, "race").await;
            peak_reserved = peak_reserved.max(usd(&v["reserved_usd"]));
            assert!(usd(&v["spent_usd"]).saturating_add(usd(&v["reserved_usd"])) <= budget, "round {round}: {v}");
            results.push(t.await.unwrap());
        }
        let admitted = results.iter().filter(|(s, _)| *s == 200).count();
        let denied = results.iter().filter(|(s, c)| *s == 402 && c.as_deref() == Some("budget_exceeded")).count();
        assert_eq!((admitted, denied), (10, 190), "round {round}");
        assert!(peak_reserved <= budget);
        s.stop().await;
    }
}

/// Requests refused by the concurrency cap (step 6) while they race never make others look over
/// their daily quota (step 5) or budget (step 9): a refused admission leaves the counters and the
/// budget before anything waits, so the racing ones are refused for the cap that is really full.
#[tokio::test(flavor = "multi_thread")]
async fn racing_refusals_are_counted_for_the_cap_that_refused_them() {
    let body = json!({"model": "gpt-4o", "max_tokens": 1000, "messages": [{"role": "user", "content": "race"}]});
    let est = worst_case("gpt-4o", &body, 1000);
    let dir = temp_dir();
    let tenants = dir.join("tenants.toml");
    std::fs::write(
        &tenants,
        format!(
            "[tenants.\"quota\"]\ntier = \"enterprise\"\ndaily_request_quota = 6\n\n\
             [tenants.\"budget\"]\ntier = \"enterprise\"\nmonthly_budget_usd = \"{}\"\ndaily_request_quota = 0\n",
            Micros(est.0 * 3)
        ),
    )
    .unwrap();
    let s = start_in(
        &[
            ("PREAUTH_TENANTS_FILE", tenants.to_str().unwrap()),
            ("PREAUTH_REQUIRE_APPROVAL_ABOVE_USD", "50"),
            ("LLM_FAIR_USE_GUARDS_ENABLED", "true"),
            ("LLM_FAIR_USE_PER_TENANT_CONCURRENCY_CAP", "2"),
        ],
        Arc::new(MemoryCounters::new()),
        &dir,
    )
    .await;
    let mut tasks = Vec::new();
    for i in 0..160 {
        let tenant = if i % 2 == 0 { "quota" } else { "budget" };
        let (url, tok, body) = (s.url("/v1/chat/completions"), token(tenant, "enterprise"), body.clone());
        tasks.push(tokio::spawn(async move {
            let r =
                client().post(url).bearer_auth(tok).header("x-mock-delay-ms", "800").json(&body).send().await.unwrap();
            let status = r.status().as_u16();
            let code = r.headers().get("x-preauth-error").map(|v| v.to_str().unwrap().to_string());
            let v: Value = r.json().await.unwrap();
            (tenant, status, code, v["error"]["details"]["reason"].as_str().map(str::to_string))
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    for tenant in ["quota", "budget"] {
        let mine: Vec<_> = results.iter().filter(|r| r.0 == tenant).collect();
        let admitted = mine.iter().filter(|r| r.1 == 200).count();
        let capped = mine.iter().filter(|r| r.1 == 429 && r.3.as_deref() == Some("fair_use_concurrency")).count();
        let other: Vec<_> =
            mine.iter().filter(|r| r.1 != 200 && r.3.as_deref() != Some("fair_use_concurrency")).collect();
        assert_eq!((admitted, capped), (2, 78), "{tenant}: other answers {other:?}");
        let v = tenant_view(&s, tenant).await;
        assert_eq!(v["daily_requests"], 2, "{tenant}: only the admitted ones count: {v}");
        assert_eq!(v["active_reservations"], 0, "{tenant}: {v}");
    }
    // The quota and the budget were never touched by the refusals: what is left is usable.
    for _ in 0..4 {
        assert_eq!(post(&s, "/v1/chat/completions", "quota", "enterprise", &chat("gpt-4o-mini")).await.status(), 200);
    }
    let r = post(&s, "/v1/chat/completions", "quota", "enterprise", &chat("gpt-4o-mini")).await;
    let v = assert_error(r, 402, "budget_exceeded").await;
    assert_eq!(v["error"]["details"]["reason"], "daily_tenant_limit_exceeded");
    // The budget tenant's two admitted requests were settled; three estimates still fit minus
    // what they cost, so one more worst case is admitted.
    assert_eq!(post(&s, "/v1/chat/completions", "budget", "enterprise", &body).await.status(), 200);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_error_charges_nothing_and_cut_stream_charges_the_estimate() {
    let s = start(&[]).await;
    let r = client()
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(token("acme", "pro"))
        .header("x-mock-status", "500")
        .json(&chat("gpt-4o-mini"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    r.bytes().await.unwrap();
    wait_for("release", || async {
        let v = tenant_view(&s, "acme").await;
        usd(&v["reserved_usd"]) == Micros::ZERO && v["active_reservations"] == 0
    })
    .await;
    assert_eq!(usd(&tenant_view(&s, "acme").await["spent_usd"]), Micros::ZERO, "upstream 500: nothing charged");

    let body = json!({"model": "gpt-4o-mini", "stream": true, "max_tokens": 2000, "messages": [{"role": "user", "content": "tell me a story"}]});
    let r = post_with(
        &s,
        "/v1/chat/completions",
        "acme",
        "pro",
        &body,
        &[("x-mock-cut-after", "3"), ("x-mock-chunks", "10")],
    )
    .await;
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await; // the stream breaks
    wait_for("estimated charge", || async {
        let v = tenant_view(&s, "acme").await;
        usd(&v["spent_usd"]).is_positive() && usd(&v["reserved_usd"]) == Micros::ZERO
    })
    .await;
    let spent = usd(&tenant_view(&s, "acme").await["spent_usd"]);
    let worst = price_cost("gpt-4o-mini", Usage { prompt_tokens: 50, completion_tokens: 2000, ..Usage::default() });
    assert!(spent < worst, "charged from what was observed ({spent}), not the worst case ({worst})");

    // More text than the request allowed (max_tokens 3) before the cut: the estimate is capped
    // at what the hold was sized for.
    let body = json!({"model": "gpt-4o-mini", "stream": true, "max_tokens": 3, "messages": [{"role": "user", "content": "x"}]});
    let r = post_with(
        &s,
        "/v1/chat/completions",
        "capped",
        "pro",
        &body,
        &[("x-mock-cut-after", "60"), ("x-mock-chunks", "100")],
    )
    .await;
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await;
    let settled = || async {
        s.admin_get("/api/v1/enforcement/ledger?tenant_id=capped&event_type=reservation_settled").await["items"][0]
            .clone()
    };
    wait_for("the capped settlement", || async { settled().await.is_object() }).await;
    let e = settled().await;
    assert_eq!((&e["usage_source"], &e["usage"]["completion_tokens"]), (&json!("estimated"), &json!(3)), "{e}");

    // An Anthropic stream cut after message_start: the prompt the provider reported there is
    // charged, not the sidecar's estimate of the request (a client hanging up mid-stream does not
    // make the prompt cheaper).
    let body = json!({"model": "claude-sonnet-4", "stream": true, "max_tokens": 300, "messages": [{"role": "user", "content": "hi"}]});
    let r = post_with(
        &s,
        "/v1/messages",
        "claude",
        "pro",
        &body,
        &[("x-mock-prompt-tokens", "5000"), ("x-mock-cut-after", "2")],
    )
    .await;
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await;
    let settled = || async {
        s.admin_get("/api/v1/enforcement/ledger?tenant_id=claude&event_type=reservation_settled").await["items"][0]
            .clone()
    };
    wait_for("the cut Anthropic settlement", || async { settled().await.is_object() }).await;
    let e = settled().await;
    assert_eq!((&e["usage_source"], &e["usage"]["prompt_tokens"]), (&json!("estimated"), &json!(5000)), "{e}");
    let seen = e["usage"]["completion_tokens"].as_u64().unwrap();
    let want =
        price_cost("claude-sonnet-4", Usage { prompt_tokens: 5000, completion_tokens: seen, ..Usage::default() });
    assert_eq!(usd(&e["actual_cost_usd"]), want, "{e}");

    // A gateway reporting 10^12 prompt tokens: not usage, settled from what was observed (it would
    // otherwise charge the tenant more than any budget).
    let mock = [("x-mock-prompt-tokens", "1000000000000")];
    let r = post_with(&s, "/v1/chat/completions", "absurd", "pro", &chat("gpt-4o-mini"), &mock).await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    let settled = || async {
        s.admin_get("/api/v1/enforcement/ledger?tenant_id=absurd&event_type=reservation_settled").await["items"][0]
            .clone()
    };
    wait_for("the absurd settlement", || async { settled().await.is_object() }).await;
    let e = settled().await;
    assert_eq!(e["usage_source"], "estimated", "{e}");
    assert!(usd(&e["actual_cost_usd"]) < Micros(1000), "{e}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_keeps_spend_and_active_reservations() {
    let dir = temp_dir();
    let s = start_in(&[], Arc::new(MemoryCounters::new()), &dir).await;
    let r = client()
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(token("acme", "pro"))
        .header("x-mock-prompt-tokens", "1000")
        .header("x-mock-completion-tokens", "1000")
        .json(&chat("gpt-4o"))
        .send()
        .await
        .unwrap();
    r.bytes().await.unwrap();
    let want = price_cost("gpt-4o", Usage { prompt_tokens: 1000, completion_tokens: 1000, ..Usage::default() });
    wait_for("settlement", || async { usd(&tenant_view(&s, "acme").await["spent_usd"]) == want }).await;
    let before = tenant_view(&s, "acme").await;
    s.stop().await;
    let s = start_in(&[], Arc::new(MemoryCounters::new()), &dir).await;
    let after = tenant_view(&s, "acme").await;
    assert_eq!(usd(&after["spent_usd"]), want, "spend survived the restart");
    // The tier came from the token, not the tenants file: still known before the next request.
    for field in ["tier", "monthly_budget_usd", "remaining_usd"] {
        assert_eq!(after[field], before[field], "{field} after the restart");
    }
    assert_eq!(after["tier"], "pro");
    s.stop().await;
}

fn active_list(s: &Sidecar) -> impl std::future::Future<Output = Value> {
    let url = s.admin_url("/api/v1/enforcement/reservations?active=true");
    async move { json_of(client().get(url).bearer_auth(ADMIN_KEY).send().await.unwrap()).await }
}

/// The sweep releases the hold of a request still streaming (`PREAUTH_RESERVATION_TTL_SECONDS=1`);
/// the request still ran at the gateway and is charged when it ends, as its settlement event
/// says (the ledger and the spend agree).
async fn a_request_outliving_its_hold_is_charged_when_it_ends(s: Sidecar) {
    let body = json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "slow"}]});
    let r = client()
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(token("acme", "pro"))
        .header("x-mock-delay-ms", "400")
        .header("x-mock-chunks", "20")
        .json(&body)
        .send()
        .await
        .unwrap();
    let rid = r.headers()["x-preauth-reservation-id"].to_str().unwrap().to_string();
    let mut stream = r.bytes_stream();
    stream.next().await.unwrap().unwrap();
    let items = active_list(&s).await;
    assert_eq!(items["items"][0]["reservation_id"], rid.as_str());
    wait_for("the sweep", || async { active_list(&s).await["items"].as_array().unwrap().is_empty() }).await;
    assert!(metrics(&s).await.contains(
        "valdrics_ops_enforcement_reservation_reconciliations_total{status=\"auto_release\",trigger=\"auto\"} 1"
    ));
    drop(stream);
    let ledger = s.admin_url(&format!("/api/v1/enforcement/ledger?reservation_id={rid}"));
    let settled = || async {
        let v = json_of(client().get(&ledger).bearer_auth(ADMIN_KEY).send().await.unwrap()).await;
        let items = v["items"].as_array().unwrap().clone();
        items.into_iter().find(|e| e["event_type"] == "reservation_settled")
    };
    wait_for("the late settlement", || async { settled().await.is_some() }).await;
    let event = settled().await.unwrap();
    let actual = usd(&event["actual_cost_usd"]);
    assert!(actual > Micros::ZERO, "{event}");
    wait_for("the late charge", || async { usd(&tenant_view(&s, "acme").await["spent_usd"]) == actual }).await;
    let view = tenant_view(&s, "acme").await;
    assert_eq!(usd(&view["reserved_usd"]), Micros::ZERO, "{view}");
    assert_eq!(
        sample(
            &metrics(&s).await,
            r#"valdrics_ops_enforcement_reservation_reconciliations_total{status="savings",trigger="usage"}"#
        ),
        1.0,
        "the late settlement counts as one (a cut stream costs less than its hold)"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_outliving_its_hold_is_charged_embedded() {
    a_request_outliving_its_hold_is_charged_when_it_ends(start(&[("PREAUTH_RESERVATION_TTL_SECONDS", "1")]).await)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_outliving_its_hold_is_charged_on_redis() {
    let p = redis_prefix();
    let s = start_fleet(&[("PREAUTH_RESERVATION_TTL_SECONDS", "1")], REDIS, &p).await;
    a_request_outliving_its_hold_is_charged_when_it_ends(s).await;
    redis_cleanup(&p).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reconcile_api_and_a_reconciled_hold_is_not_charged_again() {
    // Manual reconcile: idempotent by key, 409 on payload change or inactive reservation.
    let dir = temp_dir();
    let s = start_in(&[], Arc::new(MemoryCounters::new()), &dir).await;
    let r = client()
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(token("acme", "pro"))
        .header("x-mock-delay-ms", "2000")
        .json(&chat("gpt-4o-mini"))
        .send();
    let pending = tokio::spawn(r);
    // A reconciled hold is never charged again by its request's own settlement.
    let mut rid = None;
    for _ in 0..100 {
        if let Some(id) = active_list(&s).await["items"][0]["reservation_id"].as_str() {
            rid = Some(id.to_string());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rid = rid.expect("a reservation is held while the upstream is slow");
    let url = s.admin_url(&format!("/api/v1/enforcement/reservations/{rid}/reconcile"));
    let call = |body: Value| {
        let url = url.clone();
        async move { client().post(url).bearer_auth(ADMIN_KEY).json(&body).send().await.unwrap() }
    };
    let first = call(json!({"actual_cost_usd": "0.001000", "idempotency_key": "k1", "notes": "manual"})).await;
    assert_eq!(first.status(), 200);
    let first = json_of(first).await;
    assert_eq!(first["actual_cost_usd"], "0.001000");
    let again = call(json!({"actual_cost_usd": "0.001000", "idempotency_key": "k1", "notes": "manual"})).await;
    assert_eq!(again.status(), 200);
    assert_eq!(json_of(again).await, first, "same key and payload: same answer");
    let spend_metric = metric_sum(&metrics(&s).await, "valdrics_ops_llm_spend_usd_total");
    assert!((spend_metric - 0.001).abs() < 1e-9, "a manual reconcile counts its spend: {spend_metric}");
    // The key as an `Idempotency-Key` header (it wins over the body's).
    let by_header = client()
        .post(&url)
        .bearer_auth(ADMIN_KEY)
        .header("idempotency-key", "k1")
        .json(&json!({"actual_cost_usd": "0.001000", "idempotency_key": "other", "notes": "manual"}))
        .send()
        .await
        .unwrap();
    assert_eq!(by_header.status(), 200);
    assert_eq!(json_of(by_header).await, first, "the header's key replays");
    assert_eq!(call(json!({"actual_cost_usd": "0.002000", "idempotency_key": "k1"})).await.status(), 409);
    assert_eq!(call(json!({"actual_cost_usd": "0.001000", "idempotency_key": "k2"})).await.status(), 409);
    assert_eq!(call(json!({"idempotency_key": "k3"})).await.status(), 400);
    let overdue = client()
        .post(s.admin_url("/api/v1/enforcement/reservations/reconcile-overdue"))
        .bearer_auth(ADMIN_KEY)
        .json(&json!({"older_than_seconds": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(overdue).await["released_count"], 0);
    pending.await.unwrap().unwrap().bytes().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(usd(&tenant_view(&s, "acme").await["spent_usd"]), Micros(1000), "reconciled amount, not charged twice");
    s.stop().await;
    // After a restart the key still replays: the answer comes back from the ledger.
    let s = start_in(&[], Arc::new(MemoryCounters::new()), &dir).await;
    let url = s.admin_url(&format!("/api/v1/enforcement/reservations/{rid}/reconcile"));
    let call = |body: Value| {
        let url = url.clone();
        async move { client().post(url).bearer_auth(ADMIN_KEY).json(&body).send().await.unwrap() }
    };
    let again = call(json!({"actual_cost_usd": "0.001000", "idempotency_key": "k1", "notes": "manual"})).await;
    assert_eq!(again.status(), 200);
    assert_eq!(json_of(again).await, first, "same key and payload after a restart: same answer");
    for (body, code) in [
        (
            json!({"actual_cost_usd": "0.002000", "idempotency_key": "k1", "notes": "manual"}),
            "idempotency_key_mismatch",
        ),
        (json!({"actual_cost_usd": "0.001000", "idempotency_key": "k9"}), "reservation_not_active"),
    ] {
        let r = call(body).await;
        assert_eq!(r.status(), 409);
        assert_eq!(json_of(r).await["error"]["code"], code);
    }
    assert_eq!(usd(&tenant_view(&s, "acme").await["spent_usd"]), Micros(1000), "replays charge nothing");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn clamp_mode_rewrites_max_tokens_to_what_fits() {
    let dir = temp_dir();
    let tenants = dir.join("tenants.toml");
    // gpt-4o output is 10 USD/Mtok: 0.01 USD buys ~1000 output tokens; the request asks 16000.
    std::fs::write(&tenants, "[tenants.\"small\"]\ntier = \"pro\"\nmonthly_budget_usd = \"0.01\"\n").unwrap();
    let s = start_in(
        &[("PREAUTH_TENANTS_FILE", tenants.to_str().unwrap()), ("PREAUTH_CLAMP_MAX_TOKENS_TO_BUDGET", "true")],
        Arc::new(MemoryCounters::new()),
        &dir,
    )
    .await;
    let body = json!({"model": "gpt-4o", "max_tokens": 16000, "messages": [{"role": "user", "content": "hi"}]});
    let r = post(&s, "/v1/chat/completions", "small", "pro", &body).await;
    assert_eq!(r.status(), 200);
    let seen = s.upstream.last_request().unwrap().json().unwrap();
    let clamped = seen["max_tokens"].as_u64().unwrap();
    assert!((64..1000).contains(&clamped), "clamped to what fits: {clamped}");
    let m = metrics(&s).await;
    assert!(m.contains("reason=\"max_tokens_clamped_to_budget\""), "{m}");
    // Without clamp mode the same request is refused.
    s.stop().await;
    let s =
        start_in(&[("PREAUTH_TENANTS_FILE", tenants.to_str().unwrap())], Arc::new(MemoryCounters::new()), &temp_dir())
            .await;
    let r = post(&s, "/v1/chat/completions", "small", "pro", &body).await;
    let v = assert_error(r, 402, "budget_exceeded").await;
    assert_eq!(v["error"]["details"]["reason"], "budget_exceeded");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn thresholds_and_shadow_mode_spend() {
    let s = start(&[("PREAUTH_REQUIRE_APPROVAL_ABOVE_USD", "0.05"), ("PREAUTH_HARD_DENY_ABOVE_USD", "0.50")]).await;
    let mid = json!({"model": "gpt-4o", "max_tokens": 10000, "messages": [{"role": "user", "content": "x"}]});
    let r = post(&s, "/v1/chat/completions", "acme", "enterprise", &mid).await;
    assert_eq!(r.headers()["x-preauth-decision"], "REQUIRE_APPROVAL");
    let v = assert_error(r, 403, "approval_required").await;
    assert_eq!(v["error"]["details"]["reason"], "approval_required");
    assert_eq!(v["error"]["details"]["estimated_cost_usd"], worst_case("gpt-4o", &mid, 10_000).to_string());
    let big = json!({"model": "gpt-4o", "max_tokens": 16384, "n": 4, "messages": [{"role": "user", "content": "x"}]});
    let r = post(&s, "/v1/chat/completions", "acme", "enterprise", &big).await;
    let v = assert_error(r, 402, "budget_exceeded").await;
    assert_eq!(v["error"]["details"]["reason"], "hard_deny_threshold_exceeded");
    s.stop().await;

    // Shadow: over the threshold but let through, nothing reserved, usage still charged.
    let s = start(&[("PREAUTH_REQUIRE_APPROVAL_ABOVE_USD", "0.05"), ("PREAUTH_ENFORCEMENT_MODE", "shadow")]).await;
    let r = client()
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(token("acme", "enterprise"))
        .header("x-mock-prompt-tokens", "100")
        .header("x-mock-completion-tokens", "100")
        .json(&mid)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-preauth-reservation-id").is_none(), "shadow reserves nothing");
    r.bytes().await.unwrap();
    let want = price_cost("gpt-4o", Usage { prompt_tokens: 100, completion_tokens: 100, ..Usage::default() });
    wait_for("shadow charge", || async { usd(&tenant_view(&s, "acme").await["spent_usd"]) == want }).await;
    assert!(metrics(&s).await.contains("reason=\"shadow_mode_approval_required_override\""));
    // No hold, no drift: the settlement says so, as the drift metrics count none.
    let e = s.admin_get("/api/v1/enforcement/ledger?tenant_id=acme&event_type=reservation_settled").await["items"][0]
        .clone();
    assert_eq!((&e["reserved_usd"], &e["drift_usd"]), (&json!("0.000000"), &Value::Null), "{e}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reload_swaps_prices_and_keeps_them_on_a_bad_file() {
    use preauth_sidecar::worker::Reloader;
    let dir = temp_dir();
    let pricing = dir.join("pricing.toml");
    let tenants = dir.join("tenants.toml");
    std::fs::write(&pricing, "[models.\"house-model\"]\nprovider = \"house\"\ninput_per_mtok = \"1.00\"\ncached_input_per_mtok = \"0.50\"\noutput_per_mtok = \"2.00\"\ndefault_max_output_tokens = 100\nmax_output_tokens = 1000\n").unwrap();
    std::fs::write(&tenants, "[tenants.\"acme\"]\ntier = \"pro\"\n").unwrap();
    let s = start_in(
        &[("PREAUTH_PRICING_FILE", pricing.to_str().unwrap()), ("PREAUTH_TENANTS_FILE", tenants.to_str().unwrap())],
        Arc::new(MemoryCounters::new()),
        &dir,
    )
    .await;
    let body = json!({"model": "house-model", "max_tokens": 1000, "messages": [{"role": "user", "content": "x"}]});
    let gate = |b: Value| {
        let url = s.url("/api/v1/enforcement/gate/llm");
        async move {
            let r =
                client().post(url).bearer_auth(token("acme", "pro")).json(&json!({"request": b})).send().await.unwrap();
            json_of(r).await
        }
    };
    let before = usd(&gate(body.clone()).await["estimated_cost_usd"]);
    std::fs::write(&pricing, "[models.\"house-model\"]\nprovider = \"house\"\ninput_per_mtok = \"1.00\"\ncached_input_per_mtok = \"0.50\"\noutput_per_mtok = \"20.00\"\ndefault_max_output_tokens = 100\nmax_output_tokens = 1000\n").unwrap();
    std::fs::write(&tenants, "[tenants.\"acme\"]\ntier = \"enterprise\"\n").unwrap();
    let reloader = Reloader { state: s.state() };
    reloader.reload_and_count("SIGHUP").await.unwrap();
    let after = usd(&gate(body.clone()).await["estimated_cost_usd"]);
    assert!(after.0 > before.0 * 5, "new prices in force: {before} -> {after}");
    assert_eq!(tenant_view(&s, "acme").await["tier"], "enterprise", "tenants file reloaded");
    // The reload is on record like any runtime change (the runbook's evidence of config changes).
    let changes = s.admin_get("/api/v1/enforcement/ledger?event_type=runtime_changed").await;
    let items = changes["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{changes}");
    assert_eq!(items[0]["details"]["reason"], "SIGHUP: tenants, tiers and pricing files reloaded", "{changes}");
    let files = items[0]["details"]["changes"]["files_reloaded"].as_array().unwrap();
    assert!(files.contains(&json!(tenants.display().to_string())), "{changes}");
    assert!(files.contains(&json!(pricing.display().to_string())), "{changes}");
    std::fs::write(&pricing, "[models.\"house-model\"]\nunknown_key = 1\n").unwrap();
    assert!(reloader.reload_and_count("SIGHUP").await.is_err());
    assert_eq!(usd(&gate(body).await["estimated_cost_usd"]), after, "a bad file keeps the old table");
    let m = metrics(&s).await;
    assert!(
        m.contains("preauth_config_reloads_total{result=\"error\"} 1")
            && m.contains("preauth_config_reloads_total{result=\"ok\"} 1")
    );
    s.stop().await;
}

/// SIGTERM's drain: with nothing in flight it ends at once; a stream still running at its
/// deadline is ended and settled from what was seen — no hold or lease is left behind for the
/// sweep — and connections close after their current request meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn the_drain_ends_at_once_when_idle_and_settles_streams_it_cuts() {
    let s = start(&[("LLM_FAIR_USE_GUARDS_ENABLED", "true")]).await;
    let t0 = Instant::now();
    assert_eq!(s.state().drain.drain(Duration::from_secs(10)).await, 0);
    assert!(t0.elapsed() < Duration::from_millis(500), "idle: no wait ({:?})", t0.elapsed());
    s.stop().await;

    let s = start(&[("LLM_FAIR_USE_GUARDS_ENABLED", "true")]).await;
    let body = json!({"model": "gpt-4o-mini", "stream": true, "max_tokens": 500, "messages": [{"role": "user", "content": "long"}]});
    let r = post_with(
        &s,
        "/v1/chat/completions",
        "acme",
        "pro",
        &body,
        &[("x-mock-delay-ms", "200"), ("x-mock-chunks", "100")],
    )
    .await;
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    stream.next().await.unwrap().unwrap();
    let v = tenant_view(&s, "acme").await;
    assert_eq!((v["active_reservations"].as_u64(), v["in_flight"].as_u64()), (Some(1), Some(1)), "{v}");
    let t0 = Instant::now();
    assert_eq!(s.state().drain.drain(Duration::from_secs(3)).await, 1, "the stream was still running");
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    // The client sees its stream end (cut short), and the hold was settled from what was seen.
    while let Some(Ok(_)) = stream.next().await {}
    let v = tenant_view(&s, "acme").await;
    assert_eq!((v["active_reservations"].as_u64(), v["in_flight"].as_u64()), (Some(0), Some(0)), "{v}");
    assert_eq!(usd(&v["reserved_usd"]), Micros::ZERO, "{v}");
    assert!(usd(&v["spent_usd"]).is_positive(), "{v}");
    s.stop().await;
}

/// The drain counts h2c requests too: a stream over h2c still running at the deadline is ended
/// and settled, not dropped with the runtime.
#[tokio::test(flavor = "multi_thread")]
async fn the_drain_counts_and_settles_h2c_streams() {
    let s = start(&[]).await;
    let c = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let body = json!({"model": "gpt-4o-mini", "stream": true, "max_tokens": 500, "messages": [{"role": "user", "content": "long"}]});
    let r = c
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(token("acme", "pro"))
        .header("x-mock-delay-ms", "200")
        .header("x-mock-chunks", "100")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!((r.version(), r.status().as_u16()), (reqwest::Version::HTTP_2, 200));
    let mut stream = r.bytes_stream();
    stream.next().await.unwrap().unwrap();
    assert_eq!(s.state().drain.in_flight(), 1);
    assert_eq!(s.state().drain.drain(Duration::from_secs(3)).await, 1, "the h2c stream was still running");
    while let Some(Ok(_)) = stream.next().await {}
    let v = tenant_view(&s, "acme").await;
    assert_eq!((usd(&v["reserved_usd"]), v["active_reservations"].as_u64()), (Micros::ZERO, Some(0)), "{v}");
    assert!(usd(&v["spent_usd"]).is_positive(), "{v}");
    s.stop().await;
}

/// A client that gives up (its timeout) after its request reached the gateway, before any answer:
/// the gateway may bill the call all the same, so the request is charged its estimated prompt
/// (as a stream cut before its usage), not released — short client timeouts do not make calls
/// free. Over HTTP/1 (the connection closes) and h2c (the stream is reset) alike.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_gone_before_the_answer_is_charged_its_prompt() {
    let s = start(&[]).await;
    let h1 = reqwest::Client::builder().timeout(Duration::from_millis(300)).build().unwrap();
    let h2c = reqwest::Client::builder().http2_prior_knowledge().timeout(Duration::from_millis(300)).build().unwrap();
    let body =
        json!({"model": "gpt-4o", "max_tokens": 10, "messages": [{"role": "user", "content": "word ".repeat(2000)}]});
    for (n, (tenant, impatient)) in [("hasty", h1), ("hasty-h2", h2c)].into_iter().enumerate() {
        let r = impatient
            .post(s.url("/v1/chat/completions"))
            .bearer_auth(token(tenant, "pro"))
            .header("x-mock-delay-ms", "1500")
            .json(&body)
            .send()
            .await;
        assert!(r.is_err(), "{tenant}: the client timed out");
        wait_for("the request reached the gateway", || async { s.upstream.request_count() == n as u64 + 1 }).await;
        let ledger = format!("/api/v1/enforcement/ledger?tenant_id={tenant}&event_type=reservation_settled");
        let settled = || async { s.admin_get(&ledger).await["items"][0].clone() };
        wait_for("the settlement", || async { settled().await.is_object() }).await;
        let e = settled().await;
        assert_eq!((&e["usage_source"], &e["usage"]["completion_tokens"]), (&json!("estimated"), &json!(0)), "{e}");
        let prompt = e["usage"]["prompt_tokens"].as_u64().unwrap();
        assert!(prompt > 1000, "{tenant}: the request's estimated prompt: {e}");
        let want = price_cost("gpt-4o", Usage { prompt_tokens: prompt, ..Usage::default() });
        wait_for("charged", || async { usd(&tenant_view(&s, tenant).await["spent_usd"]) == want }).await;
    }
    s.stop().await;
}

/// A gateway that has the request and does not answer within `PREAUTH_UPSTREAM_TIMEOUT_SECONDS`
/// may bill it all the same: charged the estimated prompt like a client that gave up, answered
/// 502 with `x-should-retry: false` (an SDK retry would send the work again).
#[tokio::test(flavor = "multi_thread")]
async fn a_gateway_that_times_out_is_charged_its_prompt_and_not_retried() {
    let s = start(&[("PREAUTH_UPSTREAM_TIMEOUT_SECONDS", "1")]).await;
    let body =
        json!({"model": "gpt-4o", "max_tokens": 10, "messages": [{"role": "user", "content": "word ".repeat(2000)}]});
    let h2c = reqwest::Client::builder().http2_prior_knowledge().timeout(Duration::from_secs(20)).build().unwrap();
    for (tenant, c) in [("slowgw", client()), ("slowgw-h2", h2c)] {
        let r = c
            .post(s.url("/v1/chat/completions"))
            .bearer_auth(token(tenant, "pro"))
            .header("x-mock-delay-ms", "2500")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 502, "{tenant}");
        assert_eq!(r.headers()["x-should-retry"], "false", "{tenant}");
        let v = json_of(r).await;
        assert!(v["error"]["message"].as_str().unwrap().contains("PREAUTH_UPSTREAM_TIMEOUT_SECONDS"), "{v}");
        let ledger = format!("/api/v1/enforcement/ledger?tenant_id={tenant}&event_type=reservation_settled");
        let settled = || async { s.admin_get(&ledger).await["items"][0].clone() };
        wait_for("the settlement", || async { settled().await.is_object() }).await;
        let e = settled().await;
        assert_eq!(e["usage_source"], json!("estimated"), "{e}");
        let prompt = e["usage"]["prompt_tokens"].as_u64().unwrap();
        let want = price_cost("gpt-4o", Usage { prompt_tokens: prompt, ..Usage::default() });
        let view = tenant_view(&s, tenant).await;
        assert_eq!((usd(&view["spent_usd"]), usd(&view["reserved_usd"])), (want, Micros(0)), "{view}");
    }
    s.stop().await;
}

/// A client that says `include_usage: false` is still charged what the gateway reports —
/// reasoning tokens included, which never show in the streamed text — and gets the stream it
/// asked for: no usage chunk, every other event as the gateway sent it. Over HTTP/1.1 (chunked),
/// HTTP/1.0 (to the close) and h2c.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_refusing_the_usage_chunk_is_charged_the_reported_usage_and_does_not_see_it() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = start(&[]).await;
    let mock =
        [("x-mock-prompt-tokens", "10"), ("x-mock-completion-tokens", "1990"), ("x-mock-reasoning-tokens", "1900")];
    let body = |include_usage: bool| {
        json!({"model": "o3-mini", "max_completion_tokens": 2000, "stream": true,
               "stream_options": {"include_usage": include_usage},
               "messages": [{"role": "user", "content": "think"}]})
    };
    let events = |text: &str| -> Vec<String> {
        text.split("\n\n").filter(|e| !e.trim().is_empty()).map(|e| e.replace("\r", "")).collect()
    };
    // What the gateway streams when asked for usage (the same bytes the client that refuses it
    // gets, less one event).
    let full = post_with(&s, "/v1/chat/completions", "asks", "pro", &body(true), &mock).await.text().await.unwrap();
    let full = events(&full);
    let usage_chunk = full.iter().position(|e| e.contains("\"choices\":[]")).expect("a usage chunk");
    let mut want = full.clone();
    want.remove(usage_chunk);

    let h2 = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    for (tenant, how) in [("h11", "HTTP/1.1"), ("h10", "HTTP/1.0"), ("h2c", "h2c")] {
        let text = match how {
            "HTTP/1.1" => {
                let r = post_with(&s, "/v1/chat/completions", tenant, "pro", &body(false), &mock).await;
                assert_eq!(r.status(), 200);
                assert!(r.headers().get("content-length").is_none());
                r.text().await.unwrap()
            }
            "h2c" => {
                let mut req =
                    h2.post(s.url("/v1/chat/completions")).bearer_auth(token(tenant, "pro")).json(&body(false));
                for (k, v) in mock {
                    req = req.header(k, v);
                }
                let r = req.send().await.unwrap();
                assert_eq!((r.status().as_u16(), r.version()), (200, reqwest::Version::HTTP_2));
                r.text().await.unwrap()
            }
            _ => {
                let raw = serde_json::to_vec(&body(false)).unwrap();
                let extra: String = mock.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
                let head = format!(
                    "POST /v1/chat/completions HTTP/1.0\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra}\r\n",
                    token(tenant, "pro"),
                    raw.len()
                );
                let mut sock = tokio::net::TcpStream::connect(s.proxy).await.unwrap();
                sock.write_all(&[head.as_bytes(), &raw].concat()).await.unwrap();
                let mut got = Vec::new();
                tokio::time::timeout(Duration::from_secs(10), sock.read_to_end(&mut got)).await.unwrap().unwrap();
                let got = String::from_utf8(got).unwrap();
                let (head, body) = got.split_once("\r\n\r\n").unwrap();
                let head = head.to_ascii_lowercase();
                assert!(head.starts_with("http/1.1 200") && head.contains("connection: close"), "{head}");
                assert!(!head.contains("content-length") && !head.contains("transfer-encoding"), "{head}");
                body.to_string()
            }
        };
        let got = events(&text);
        assert_eq!(got.len(), want.len(), "{how}: {text}");
        for (g, w) in got.iter().zip(&want) {
            // Ids and timestamps differ between the two calls; the shape of each event does not.
            let shape = |e: &str| e.contains("\"choices\":[]") || e.contains("[DONE]");
            assert_eq!(shape(g), shape(w), "{how}: {g} / {w}");
        }
        assert!(!text.contains("\"choices\":[]") && text.trim_end().ends_with("data: [DONE]"), "{how}: {text}");
        assert_eq!(s.upstream.last_request().unwrap().json().unwrap()["stream_options"]["include_usage"], true);

        let settled = || async {
            s.admin_get(&format!("/api/v1/enforcement/ledger?tenant_id={tenant}&event_type=reservation_settled")).await
                ["items"][0]
                .clone()
        };
        wait_for("the settlement", || async { settled().await.is_object() }).await;
        let e = settled().await;
        assert_eq!(e["usage_source"], "reported", "{how}: {e}");
        assert_eq!((&e["usage"]["completion_tokens"], &e["usage"]["reasoning_tokens"]), (&json!(1990), &json!(1900)));
    }
    s.stop().await;
}

/// The runbook's false-positive relief without a signal: `POST /api/v1/enforcement/reload`
/// re-reads the files and answers once they apply, so the operator knows the next request meets
/// them (audit: after `kill -HUP` the first request still met the old table). A bad file is
/// refused with its reason and the previous tables stay.
#[tokio::test(flavor = "multi_thread")]
async fn the_admin_api_reloads_the_files_and_answers_once_they_apply() {
    let dir = temp_dir();
    let tenants = dir.join("tenants.toml");
    std::fs::write(&tenants, "[tenants.\"known-good\"]\ntier = \"starter\"\ndaily_request_quota = 1\n").unwrap();
    let s =
        start_in(&[("PREAUTH_TENANTS_FILE", tenants.to_str().unwrap())], Arc::new(MemoryCounters::new()), &dir).await;
    let body = json!({"model": "text-embedding-3-small", "input": "x"});
    let call = || post(&s, "/v1/embeddings", "known-good", "starter", &body);
    assert_eq!(call().await.status(), 200);
    assert_error(call().await, 402, "budget_exceeded").await;

    std::fs::write(&tenants, "[tenants.\"known-good\"]\ntier = \"starter\"\ndaily_request_quota = 1000\n").unwrap();
    let r = s.admin_post("/api/v1/enforcement/reload", json!({})).await;
    assert_eq!(r.status(), 200);
    let v = json_of(r).await;
    assert_eq!(v["reloaded"], json!([tenants.display().to_string()]), "{v}");
    assert_eq!(call().await.status(), 200, "the very next request meets the new table");

    std::fs::write(&tenants, "[tenants.\"known-good\"]\ndaily_request_quota = \"lots\"\n").unwrap();
    let r = s.admin_post("/api/v1/enforcement/reload", json!({})).await;
    assert_eq!(r.status(), 400);
    let v = json_of(r).await;
    assert_eq!(v["error"]["code"], "reload_failed", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("PREAUTH_TENANTS_FILE"), "{v}");
    assert_eq!(call().await.status(), 200, "the previous tables stay");
    // A FIFO (or a device, a directory) is refused without being opened: reading one would wait
    // for a writer for ever.
    std::fs::remove_file(&tenants).unwrap();
    assert!(std::process::Command::new("mkfifo").arg(&tenants).status().unwrap().success());
    let r = s.admin_post("/api/v1/enforcement/reload", json!({})).await;
    assert_eq!(r.status(), 400);
    let v = json_of(r).await;
    assert!(v["error"]["message"].as_str().unwrap().contains("is not a regular file"), "{v}");
    // A file that names no tenant is applied (it is valid), with a warning: every per-tenant
    // setting lapses.
    std::fs::remove_file(&tenants).unwrap();
    std::fs::write(&tenants, "").unwrap();
    let r = s.admin_post("/api/v1/enforcement/reload", json!({})).await;
    assert_eq!(r.status(), 200);
    let v = json_of(r).await;
    assert!(v["warnings"][0].as_str().unwrap().contains("names no tenant"), "{v}");
    let changes = s.admin_get("/api/v1/enforcement/ledger?event_type=runtime_changed").await;
    assert_eq!(changes["items"][0]["details"]["reason"], "admin API: tenants, tiers and pricing files reloaded");
    s.stop().await;
}
