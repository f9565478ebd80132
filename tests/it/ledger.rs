//! The ledger end to end: every decision and settlement as an event in Postgres exactly once,
//! through a ledger outage and through a SIGKILL of the real binary under streaming load; the
//! CloudEvents HTTP sink through a receiver outage; the ledger API.

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use parking_lot::Mutex;
use preauth_sidecar::demo::upstream::FakeUpstream;
use preauth_sidecar::store::memory::MemoryCounters;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

const PG_ADMIN: &str = "host=127.0.0.1 port=5432 user=postgres dbname=postgres";

/// A fresh database for one test; dropped by `drop_db`.
pub async fn fresh_db() -> String {
    let name = format!("ledger_it_{}", uuid::Uuid::new_v4().simple());
    let (client, conn) =
        tokio_postgres::connect(PG_ADMIN, tokio_postgres::NoTls).await.expect("postgres at 127.0.0.1:5432");
    tokio::spawn(conn);
    client.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
    name
}

pub async fn drop_db(name: &str) {
    let (client, conn) = tokio_postgres::connect(PG_ADMIN, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let _ = client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
}

pub fn url_for(db: &str, port: u16) -> String {
    format!("postgres://postgres@127.0.0.1:{port}/{db}")
}

pub async fn db_client(db: &str) -> tokio_postgres::Client {
    let (client, conn) =
        tokio_postgres::connect(&format!("host=127.0.0.1 port=5432 user=postgres dbname={db}"), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(conn);
    client
}

/// (event_id, event_type, request_id, payload) of every row.
pub async fn rows(db: &str) -> Vec<(String, String, Option<String>, Value)> {
    let c = db_client(db).await;
    c.query("SELECT event_id::text, event_type, payload->>'request_id', payload::text FROM enforcement_ledger", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), serde_json::from_str(r.get::<_, &str>(3)).unwrap()))
        .collect()
}

pub async fn wait_rows(db: &str, want: usize, within: Duration) -> Vec<(String, String, Option<String>, Value)> {
    let deadline = Instant::now() + within;
    loop {
        let r = rows(db).await;
        if r.len() >= want || Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn migrate(url: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_preauth-sidecar"))
        .arg("migrate")
        .env("PREAUTH_LEDGER_URL", url)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A TCP forwarder to Postgres that can be switched off and on (the ledger "outage").
struct Flaky {
    port: u16,
    up: Arc<AtomicBool>,
}

async fn flaky_postgres() -> Flaky {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let up = Arc::new(AtomicBool::new(false));
    let up2 = up.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else { return };
            if !up2.load(Ordering::SeqCst) {
                drop(client); // refused in effect: the connection is closed at once
                continue;
            }
            tokio::spawn(async move {
                if let Ok(mut server) = TcpStream::connect("127.0.0.1:5432").await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    Flaky { port, up }
}

#[tokio::test(flavor = "multi_thread")]
async fn events_reach_postgres_exactly_once_through_an_outage() {
    let db = fresh_db().await;
    migrate(&url_for(&db, 5432));
    let flaky = flaky_postgres().await;
    let s =
        start(&[("PREAUTH_LEDGER_URL", &url_for(&db, flaky.port)), ("PREAUTH_RESERVATION_TTL_SECONDS", "600")]).await;
    // 1,000 requests while the ledger is unreachable.
    let tenants = ["a", "b", "c", "d"];
    let mut ids = HashSet::new();
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let (url, tok) = (s.url("/v1/chat/completions"), token(tenants[i % 4], "enterprise"));
        tasks.push(tokio::spawn(async move {
            let r = client().post(url).bearer_auth(tok).json(&chat("gpt-4o-mini")).send().await.unwrap();
            let id = r.headers()["x-preauth-request-id"].to_str().unwrap().to_string();
            let status = r.status().as_u16();
            r.bytes().await.unwrap();
            (id, status)
        }));
        if tasks.len() == 50 {
            for t in tasks.drain(..) {
                let (id, status) = t.await.unwrap();
                assert_eq!(status, 200);
                ids.insert(id);
            }
        }
    }
    for t in tasks {
        ids.insert(t.await.unwrap().0);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(rows(&db).await.is_empty(), "nothing delivered while the ledger is down");
    let m = metrics(&s).await;
    assert!(m.contains("preauth_outbox_depth 2000"), "decision + settlement per request are queued:\n{m}");
    assert_eq!(
        client().get(s.admin_url("/readyz")).send().await.unwrap().status(),
        200,
        "a ledger outage does not affect readiness"
    );
    flaky.up.store(true, Ordering::SeqCst);
    let got = wait_rows(&db, 2000, Duration::from_secs(40)).await;
    assert_eq!(got.len(), 2000, "all events arrive");
    let unique: HashSet<&String> = got.iter().map(|r| &r.0).collect();
    assert_eq!(unique.len(), got.len(), "none twice");
    let mut per_request: HashMap<&str, Vec<&str>> = HashMap::new();
    for (_, t, rid, payload) in &got {
        per_request.entry(rid.as_deref().unwrap()).or_default().push(t);
        for k in ["estimated_cost_usd", "reserved_usd", "actual_cost_usd"] {
            if let Some(v) = payload[k].as_str() {
                assert_eq!(v.split_once('.').unwrap().1.len(), 6, "{k} = {v}");
            }
        }
    }
    assert_eq!(per_request.len(), 1000);
    for id in &ids {
        let mut kinds = per_request[id.as_str()].clone();
        kinds.sort();
        assert_eq!(kinds, ["decision", "reservation_settled"], "{id}");
    }
    // Append-only: UPDATE and DELETE are rejected.
    let c = db_client(&db).await;
    assert!(c.execute("UPDATE enforcement_ledger SET decision = 'DENY'", &[]).await.is_err());
    assert!(c.execute("DELETE FROM enforcement_ledger", &[]).await.is_err());
    // The ledger API reads Postgres, newest first, with filters.
    let r = client()
        .get(s.admin_url("/api/v1/enforcement/ledger?limit=5&tenant_id=a&event_type=decision"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    let items = json_of(r).await["items"].as_array().unwrap().clone();
    assert_eq!(items.len(), 5);
    assert!(items.iter().all(|e| e["tenant_id"] == "a" && e["event_type"] == "decision"));
    assert!(items[0]["occurred_at"].as_str() >= items[4]["occurred_at"].as_str());
    s.stop().await;
    drop_db(&db).await;
}

fn spawn_binary(env: &[(&str, String)]) -> Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_preauth-sidecar"));
    c.arg("run").stdout(Stdio::null()).stderr(Stdio::null()).env("RUST_LOG", "warn");
    for (k, v) in env {
        c.env(k, v);
    }
    c.spawn().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_under_streaming_load_loses_no_event() {
    let db = fresh_db().await;
    let url = url_for(&db, 5432);
    migrate(&url);
    let upstream = FakeUpstream::start("127.0.0.1:0").await.unwrap();
    let dir = temp_dir();
    let (proxy, admin) = free_pair();
    let env = vec![
        ("PREAUTH_UPSTREAM_URL", upstream.base_url()),
        ("PREAUTH_LISTEN_ADDR", proxy.to_string()),
        ("PREAUTH_ADMIN_ADDR", admin.to_string()),
        ("SUPABASE_JWT_SECRET", JWT_SECRET.to_string()),
        ("ADMIN_API_KEY", ADMIN_KEY.to_string()),
        ("PREAUTH_DATA_DIR", dir.display().to_string()),
        ("PREAUTH_LEDGER_URL", url.clone()),
        ("PREAUTH_RESERVATION_TTL_SECONDS", "2".to_string()),
        ("PREAUTH_GATE_TIMEOUT_MS", "5000".to_string()),
        ("PREAUTH_STORE_TIMEOUT_MS", "2000".to_string()),
    ];
    let mut child = spawn_binary(&env);
    wait_listening(proxy);
    let body = json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "stream"}]});
    // Phase 1: completed, settled streams.
    for _ in 0..20 {
        let r = client()
            .post(format!("http://{proxy}/v1/chat/completions"))
            .bearer_auth(token("acme", "enterprise"))
            .json(&body)
            .send()
            .await
            .unwrap();
        r.bytes().await.unwrap();
    }
    // Phase 2: 40 concurrent slow streams, killed mid-flight.
    let started = Arc::new(AtomicUsize::new(0));
    let mut streams = Vec::new();
    for i in 0..40 {
        let (body, started) = (body.clone(), started.clone());
        streams.push(tokio::spawn(async move {
            let Ok(r) = client()
                .post(format!("http://{proxy}/v1/chat/completions"))
                .bearer_auth(token(&format!("t{}", i % 5), "enterprise"))
                .header("x-mock-delay-ms", "200")
                .header("x-mock-chunks", "100")
                .json(&body)
                .send()
                .await
            else {
                return;
            };
            let mut s = r.bytes_stream();
            if s.next().await.is_some() {
                started.fetch_add(1, Ordering::SeqCst);
            }
            while let Some(Ok(_)) = s.next().await {}
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while started.load(Ordering::SeqCst) < 40 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    for s in streams {
        let _ = s.await;
    }
    // Restart on the same data directory: the outbox replays, the sweep releases the orphans.
    let mut child = spawn_binary(&env);
    wait_listening(proxy);
    let logged: HashSet<String> =
        upstream.requests().iter().filter_map(|r| r.header("x-preauth-request-id").map(str::to_string)).collect();
    assert_eq!(logged.len(), 60);
    // 60 decisions + 20 settlements + 40 releases (sweep after the 2 s TTL).
    let got = wait_rows(&db, 120, Duration::from_secs(30)).await;
    let unique: HashSet<&String> = got.iter().map(|r| &r.0).collect();
    assert_eq!(unique.len(), got.len(), "no duplicate event ids");
    let decisions: Vec<&str> = got.iter().filter(|r| r.1 == "decision").filter_map(|r| r.2.as_deref()).collect();
    let decided: HashSet<&str> = decisions.iter().copied().collect();
    assert_eq!(decided.len(), decisions.len(), "one decision event per request");
    for id in &logged {
        assert!(decided.contains(id.as_str()), "request {id} reached the upstream without a decision event");
    }
    let settled = got.iter().filter(|r| r.1 == "reservation_settled").count();
    let released = got.iter().filter(|r| r.1 == "reservation_released").count();
    assert_eq!(settled, 20, "every completed stream has its settlement");
    assert_eq!(released, 40, "every killed stream's hold is released once");
    child.kill().unwrap();
    child.wait().unwrap();
    drop_db(&db).await;
}

/// A CloudEvents receiver that answers 503 to its first `fail_first` batches.
async fn receiver(fail_first: usize) -> (u16, Arc<Mutex<Vec<Value>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let calls = Arc::new(AtomicUsize::new(0));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { return };
            let (seen, calls) = (seen2.clone(), calls.clone());
            tokio::spawn(async move {
                loop {
                    let mut buf = Vec::new();
                    let mut tmp = [0u8; 65536];
                    let head_end = loop {
                        let Ok(n) = sock.read(&mut tmp).await else { return };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&tmp[..n]);
                        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break p + 4;
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
                        .unwrap_or(0);
                    assert!(head.contains("content-type: application/cloudevents-batch+json"), "{head}");
                    while buf.len() < head_end + len {
                        let Ok(n) = sock.read(&mut tmp).await else { return };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&tmp[..n]);
                    }
                    let status = if calls.fetch_add(1, Ordering::SeqCst) < fail_first {
                        "503 Service Unavailable"
                    } else {
                        let batch: Vec<Value> = serde_json::from_slice(&buf[head_end..head_end + len]).unwrap();
                        seen.lock().extend(batch);
                        "200 OK"
                    };
                    let resp = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
                    if sock.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, seen)
}

#[tokio::test(flavor = "multi_thread")]
async fn http_sink_delivers_cloudevents_after_a_503_spell() {
    let (port, seen) = receiver(5).await;
    let s = start_in(
        &[("PREAUTH_LEDGER_URL", &format!("http://127.0.0.1:{port}/events")), ("PREAUTH_INSTANCE_ID", "replica-1")],
        Arc::new(MemoryCounters::new()),
        &temp_dir(),
    )
    .await;
    for i in 0..100 {
        let r = post(&s, "/v1/chat/completions", &format!("t{}", i % 3), "enterprise", &chat("gpt-4o-mini")).await;
        r.bytes().await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.lock().len() < 200 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let events = seen.lock().clone();
    assert_eq!(events.len(), 200, "decision + settlement of each request, delivered after the 503s");
    let ids: HashSet<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 200, "no duplicate ids");
    for e in &events {
        assert_eq!(e["specversion"], "1.0");
        assert_eq!(e["id"], e["data"]["event_id"]);
        assert_eq!(e["type"], format!("dev.preauth.{}", e["data"]["event_type"].as_str().unwrap()));
        assert_eq!(e["data"]["instance_id"], "replica-1");
    }
    // Without a Postgres sink the ledger API answers from the local ledger.
    let r = client()
        .get(s.admin_url("/api/v1/enforcement/ledger?limit=3&event_type=reservation_settled"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    let items = json_of(r).await["items"].as_array().unwrap().clone();
    assert_eq!(items.len(), 3);
    assert!(items[0]["actual_cost_usd"].as_str().is_some());
    s.stop().await;
}

/// Runbook, false positives and drift: every decision event names the request's fingerprint
/// (CONTRACT §7; for a refusal, the evidence to capture), and a refused one no hold — the hold
/// the store took alongside the admission was given back at once, so a reconciliation reading
/// the ledger finds no orphan.
#[tokio::test(flavor = "multi_thread")]
async fn decision_events_carry_the_fingerprint_and_refused_ones_no_hold() {
    let s = start(&[("LLM_FAIR_USE_GUARDS_ENABLED", "true"), ("LLM_FAIR_USE_PER_MINUTE_CAP", "1")]).await;
    let body = chat("gpt-4o-mini");
    assert_eq!(post(&s, "/v1/chat/completions", "fp-t", "pro", &body).await.status(), 200);
    assert_error(post(&s, "/v1/chat/completions", "fp-t", "pro", &body).await, 429, "llm_fair_use_exceeded").await;
    let want = preauth_sidecar::proxy::fingerprint(
        "fp-t",
        "POST",
        "/v1/chat/completions",
        &serde_json::to_vec(&body).unwrap(),
    );
    let v = s.admin_get("/api/v1/enforcement/ledger?event_type=decision&tenant_id=fp-t&limit=1").await;
    let e = &v["items"][0];
    assert_eq!(e["decision"], "DENY", "{e}");
    assert_eq!(e["request_fingerprint"], want.as_str(), "{e}");
    assert_eq!(e["reservation_id"], Value::Null, "{e}");
    assert_eq!(e["reserved_usd"], "0.000000", "{e}");
    // The admitted request's decision, and the settlement that follows it, name it too.
    // (The settlement is recorded after the answer: wait for it.)
    for kind in ["decision", "reservation_settled"] {
        let deadline = Instant::now() + Duration::from_secs(5);
        let e = loop {
            let v = s.admin_get(&format!("/api/v1/enforcement/ledger?event_type={kind}&tenant_id=fp-t&limit=2")).await;
            if let Some(e) = v["items"].as_array().unwrap().iter().find(|e| e["decision"] != "DENY") {
                break e.clone();
            }
            assert!(Instant::now() < deadline, "no {kind} event of the admitted request: {v}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(e["request_fingerprint"], want.as_str(), "{e}");
    }
    s.stop().await;
}

/// The outbox fills while the ledger is down (failsafe policy): new requests are refused
/// (503, hard mode), but a request forwarded before it filled still gets its settlement recorded.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_outbox_still_records_the_settlement_of_a_request_in_flight() {
    let ledger = format!("http://127.0.0.1:{}/ingest", free_port());
    let s = Arc::new(
        start(&[
            ("PREAUTH_LEDGER_URL", ledger.as_str()),
            ("PREAUTH_OUTBOX_MAX_BYTES", "1048576"),
            ("LLM_GLOBAL_ABUSE_GUARDS_ENABLED", "false"),
        ])
        .await,
    );
    let body = chat("gpt-4o-mini");
    let slow = {
        let (s, body) = (s.clone(), body.clone());
        tokio::spawn(async move {
            post_with(&s, "/v1/chat/completions", "inflight-t", "pro", &body, &[("x-mock-delay-ms", "3000")]).await
        })
    };
    let t0 = Instant::now();
    while s.upstream.requests().is_empty() && t0.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut refused = false;
    for i in 0..4000 {
        let r = post(&s, "/v1/chat/completions", &format!("fill-{}", i % 64), "pro", &body).await;
        if r.status() == 503 {
            assert_error(r, 503, "enforcement_unavailable").await;
            refused = true;
            break;
        }
        assert_eq!(r.status(), 200);
    }
    assert!(refused, "the outbox never filled");
    assert_eq!(slow.await.unwrap().status(), 200);
    let v = s.admin_get("/api/v1/enforcement/ledger?event_type=reservation_settled&tenant_id=inflight-t").await;
    assert_eq!(v["items"].as_array().map(Vec::len), Some(1), "{v}");
    Arc::try_unwrap(s).ok().expect("one owner").stop().await;
}

/// The kill switch acts in every mode even when nothing can be recorded: with the outbox full, a
/// shadow-mode source (whose failsafe path lets requests through) is still refused 429, and so
/// is a soft one (not escalated to an approval).
#[tokio::test(flavor = "multi_thread")]
async fn a_full_outbox_does_not_open_the_kill_switch_to_shadow_sources() {
    let ledger = format!("http://127.0.0.1:{}/ingest", free_port());
    let s = start(&[
        ("PREAUTH_LEDGER_URL", ledger.as_str()),
        ("PREAUTH_OUTBOX_MAX_BYTES", "1048576"),
        ("PREAUTH_SOURCE_MODES", "evals=shadow,batch=soft"),
        ("LLM_GLOBAL_ABUSE_KILL_SWITCH", "true"),
    ])
    .await;
    let body = chat("gpt-4o-mini");
    let mut full = false;
    for i in 0..4000 {
        let r = post(&s, "/v1/chat/completions", &format!("fill-{}", i % 64), "pro", &body).await;
        let v = assert_error(r, 429, "llm_fair_use_exceeded").await;
        assert_eq!(v["error"]["details"]["reason"], "global_abuse_kill_switch");
        let m = metrics(&s).await;
        if metric_sum(
            &m,
            "valdrics_ops_enforcement_gate_failures_total{failure_type=\"outbox_unavailable\",source=\"default\"}",
        ) > 0.0
        {
            full = true;
            break;
        }
    }
    assert!(full, "the outbox never filled");
    for source in ["evals", "batch", "default"] {
        let r = post_with(&s, "/v1/chat/completions", "acme", "pro", &body, &[("x-preauth-source", source)]).await;
        let v = assert_error(r, 429, "llm_fair_use_exceeded").await;
        assert_eq!(v["error"]["details"]["reason"], "global_abuse_kill_switch", "{source}: {v}");
    }
    assert_eq!(s.upstream.request_count(), 0, "nothing reached the gateway");
    s.stop().await;
}

/// Soft mode with the outbox full: the request cannot be recorded, so it takes the soft failsafe
/// path (403 `approval_required`, `soft_mode_fail_safe_escalation`); its details still carry every
/// key the contract names for that code — the body's fingerprint and cost, and `null` for the
/// approval that could not be queued.
#[tokio::test(flavor = "multi_thread")]
async fn soft_failsafe_on_a_full_outbox_names_every_approval_detail() {
    let ledger = format!("http://127.0.0.1:{}/ingest", free_port());
    let s = start(&[
        ("PREAUTH_LEDGER_URL", ledger.as_str()),
        ("PREAUTH_OUTBOX_MAX_BYTES", "1048576"),
        ("PREAUTH_ENFORCEMENT_MODE", "soft"),
        ("LLM_GLOBAL_ABUSE_GUARDS_ENABLED", "false"),
    ])
    .await;
    let body = chat("gpt-4o-mini");
    let mut details = None;
    for i in 0..4000 {
        let r = post(&s, "/v1/chat/completions", &format!("fill-{}", i % 64), "pro", &body).await;
        if r.status() == 403 {
            let body = assert_error(r, 403, "approval_required").await;
            let message = body["error"]["message"].as_str().unwrap().to_string();
            assert!(message.contains("none could be queued") && message.contains("mint-approval"), "{message}");
            details = Some(body["error"]["details"].clone());
            break;
        }
        assert_eq!(r.status(), 200);
    }
    let d = details.expect("the outbox never filled");
    assert_eq!(d["reason"], "soft_mode_fail_safe_escalation", "{d}");
    assert_eq!(d["request_fingerprint"].as_str().map(str::len), Some(64), "{d}");
    assert!(d["estimated_cost_usd"].is_string(), "{d}");
    for k in ["approval_id", "expires_at"] {
        assert!(d.as_object().unwrap().contains_key(k), "{k} missing: {d}");
    }
    s.stop().await;
}
