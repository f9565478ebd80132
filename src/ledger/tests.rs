//! Ledger tests against real receivers: Postgres on 127.0.0.1:5432 (a fresh database per test,
//! dropped afterwards) and a tiny HTTP receiver on 127.0.0.1:0, with the relay driven directly.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_postgres::NoTls;

use super::event::{Event, EventLine};
use super::http_sink::HttpSink;
use super::outbox::tests::{event, TempDir};
use super::outbox::{Outbox, OutboxOptions};
use super::postgres::{self, PostgresSink};
use super::relay::{Relay, RelayConfig};
use super::sink::Sink;
use super::LedgerFilter;
use crate::config::OutboxFullPolicy;

const ADMIN_DSN: &str = "host=127.0.0.1 port=5432 user=postgres dbname=postgres";

/// A fresh database `ledger_test_<uuid>`, dropped (forcibly) when this value is dropped.
struct TestDb {
    name: String,
    url: String,
}

impl TestDb {
    async fn new() -> TestDb {
        let name = format!("ledger_test_{}", uuid::Uuid::new_v4().simple());
        let (c, conn) = tokio_postgres::connect(ADMIN_DSN, NoTls).await.expect("postgres on 127.0.0.1:5432");
        tokio::spawn(conn);
        c.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
        TestDb { url: format!("postgres://postgres@127.0.0.1:5432/{name}"), name }
    }

    async fn client(&self) -> tokio_postgres::Client {
        let (c, conn) = tokio_postgres::connect(&self.url, NoTls).await.unwrap();
        tokio::spawn(conn);
        c
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                if let Ok((c, conn)) = tokio_postgres::connect(ADMIN_DSN, NoTls).await {
                    tokio::spawn(conn);
                    let _ = c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
                }
            });
        })
        .join();
    }
}

fn fast_relay() -> RelayConfig {
    RelayConfig {
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(400),
        idle_poll: Duration::from_millis(50),
        drain_timeout: Duration::from_secs(2),
        ..RelayConfig::default()
    }
}

/// Runs `relay` until `done()` holds or `limit` passes, then shuts it down; true if done.
async fn run_relay_until(relay: Arc<Relay>, limit: Duration, done: impl Fn() -> bool) -> bool {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn({
        let relay = relay.clone();
        async move { relay.run(rx).await }
    });
    let start = Instant::now();
    let mut ok = false;
    while start.elapsed() < limit {
        if done() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task).await.expect("relay stops on shutdown").unwrap();
    ok
}

async fn count(c: &tokio_postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_migrate_idempotent_inserts_append_only_and_queries() {
    let db = TestDb::new().await;
    assert!(postgres::migrate(&db.url).await.unwrap(), "created");
    assert!(!postgres::migrate(&db.url).await.expect("migrate twice is fine"), "already there");
    let c = db.client().await;
    let idx = count(
        &c,
        "SELECT count(*) FROM pg_indexes WHERE tablename = 'enforcement_ledger' AND indexname IN \
         ('enforcement_ledger_tenant_occurred_idx', 'enforcement_ledger_reservation_idx')",
    )
    .await;
    assert_eq!(idx, 2);

    let sink = PostgresSink::new(&db.url).unwrap();
    let events: Vec<Event> = (0..15).map(event).collect();
    let lines: Vec<EventLine> = events.iter().map(EventLine::of).collect();
    assert_eq!(sink.insert(&lines[..10]).await.unwrap(), 10);
    assert_eq!(sink.insert(&lines[..10]).await.unwrap(), 0, "a replayed batch adds nothing");
    sink.deliver(&lines[5..]).await.unwrap();
    assert_eq!(count(&c, "SELECT count(*) FROM enforcement_ledger").await, 15);
    assert_eq!(count(&c, "SELECT count(DISTINCT event_id) FROM enforcement_ledger").await, 15);

    // Columns and payload; money keeps six decimals.
    let row = c
        .query_one(
            "SELECT event_type, tenant_id, decision, payload->>'estimated_cost_usd', payload->>'reserved_usd', \
             payload::text, occurred_at = $2::text::timestamptz \
             FROM enforcement_ledger WHERE event_id = $1::text::uuid",
            &[&events[3].event_id, &events[3].occurred_at],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "decision");
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("tenant-0"));
    assert_eq!(row.get::<_, Option<String>>(2).as_deref(), Some("ALLOW"));
    assert_eq!(row.get::<_, String>(3), "0.000153");
    assert_eq!(row.get::<_, String>(4), "0.000150");
    assert!(row.get::<_, String>(5).contains("\"reserved_usd\": \"0.000150\""));
    assert!(row.get::<_, bool>(6), "occurred_at stored to the microsecond");

    // Append-only.
    for sql in [
        "UPDATE enforcement_ledger SET decision = 'DENY'",
        "DELETE FROM enforcement_ledger",
        "TRUNCATE enforcement_ledger",
    ] {
        let err = c.batch_execute(sql).await.expect_err(sql);
        assert!(format!("{err:?}").contains("append-only"), "{sql}: {err:?}");
    }
    assert_eq!(count(&c, "SELECT count(*) FROM enforcement_ledger").await, 15);

    // Queries: newest first, limit, filters.
    let all = sink.query(&LedgerFilter { limit: 1000, ..LedgerFilter::default() }).await.unwrap();
    assert_eq!(all.len(), 15);
    assert_eq!(all[0], events[14]);
    assert!(all.windows(2).all(|w| w[0].occurred_at > w[1].occurred_at));
    let q = |s: &str| LedgerFilter::from_query(s).unwrap();
    assert_eq!(sink.query(&q("limit=2")).await.unwrap(), vec![events[14].clone(), events[13].clone()]);
    assert_eq!(postgres::query(&db.url, &q("tenant_id=tenant-1")).await.unwrap().len(), 5);
    assert_eq!(sink.query(&q("event_type=decision&limit=1000")).await.unwrap().len(), 15);
    assert_eq!(sink.query(&q("event_type=runtime_changed")).await.unwrap().len(), 0);
    let window = format!("start_at={}&end_at={}", events[4].occurred_at, events[6].occurred_at);
    assert_eq!(sink.query(&q(&window)).await.unwrap(), vec![events[6].clone(), events[5].clone(), events[4].clone()]);
}

/// A TCP port with nothing listening (until a forwarder is started on it).
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Forwards every connection on `port` to Postgres.
async fn forward_to_postgres(port: u16) -> tokio::task::JoinHandle<()> {
    let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("port still free");
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut out) = TcpStream::connect("127.0.0.1:5432").await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_then_recovery_delivers_every_event_once() {
    let db = TestDb::new().await;
    postgres::migrate(&db.url).await.unwrap();
    let port = closed_port();
    let via_port = format!("postgres://postgres@127.0.0.1:{port}/{}", db.name);
    let dir = TempDir::new("relay-pg");
    let outbox = Arc::new(Outbox::open(&dir.0, 1 << 30, OutboxFullPolicy::Failsafe).unwrap());
    let sink: Arc<dyn Sink> = Arc::new(PostgresSink::new(&via_port).unwrap());
    let relay = Arc::new(Relay::with_config(outbox.clone(), sink, fast_relay()));

    // 1,000 events while the ledger is unreachable, more arriving during the outage.
    for i in 0..1000 {
        outbox.append(&event(i)).unwrap();
    }
    let (tx, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn({
        let relay = relay.clone();
        async move { relay.run(rx).await }
    });
    for i in 1000..1200 {
        outbox.append(&event(i)).unwrap();
        if i % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(outbox.depth(), 1200, "nothing delivered while the ledger is down");
    assert!(outbox.stats().oldest_undelivered_ms.is_some());

    // The database comes back on the same URL: the relay resumes by itself.
    let fwd = forward_to_postgres(port).await;
    let start = Instant::now();
    while outbox.depth() > 0 && start.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap();
    fwd.abort();
    assert_eq!(outbox.depth(), 0, "backlog drained after recovery in {:?}", start.elapsed());
    let c = db.client().await;
    assert_eq!(count(&c, "SELECT count(*) FROM enforcement_ledger").await, 1200);
    assert_eq!(count(&c, "SELECT count(DISTINCT event_id) FROM enforcement_ledger").await, 1200);
    let s = outbox.stats();
    assert_eq!((s.delivered, s.parked, s.undelivered_bytes), (1200, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sink_sustained_throughput() {
    let db = TestDb::new().await;
    postgres::migrate(&db.url).await.unwrap();
    let dir = TempDir::new("relay-pg-bench");
    let outbox = Arc::new(Outbox::open(&dir.0, 1 << 32, OutboxFullPolicy::Failsafe).unwrap());
    let n = 20_000u64;
    for i in 0..n {
        outbox.append(&event(i)).unwrap();
    }
    let sink: Arc<dyn Sink> = Arc::new(PostgresSink::new(&db.url).unwrap());
    sink.deliver(&[EventLine::of(&event(n + 1))]).await.unwrap(); // connect and prepare outside the timing
    let relay = Arc::new(Relay::with_config(outbox.clone(), sink, fast_relay()));
    let start = Instant::now();
    let o = outbox.clone();
    assert!(run_relay_until(relay, Duration::from_secs(120), move || o.depth() == 0).await);
    let secs = start.elapsed().as_secs_f64();
    let c = db.client().await;
    assert_eq!(count(&c, "SELECT count(*) FROM enforcement_ledger").await, n as i64 + 1);
    println!(
        "postgres sink sustained throughput (relay, batches of 500, outbox -> enforcement_ledger): \
         {n} events in {secs:.2} s = {:.0} events/s",
        n as f64 / secs
    );
}

/// A minimal HTTP/1.1 receiver: answers `fail_status` to the first `fail_first` batches, then
/// `ok_status`; records every request.
struct Receiver {
    fail_first: usize,
    fail_status: u16,
    ok_status: u16,
    seen: AtomicUsize,
    /// `Retry-After` sent with each failure.
    retry_after: Option<&'static str>,
    /// Bodies longer than this are answered 413 (a proxy's body limit in front of the receiver).
    max_body: Option<usize>,
    /// (status answered, content-type, body)
    log: Mutex<Vec<(u16, String, serde_json::Value)>>,
    /// When each batch arrived.
    arrived: Mutex<Vec<Instant>>,
}

impl Receiver {
    async fn start(fail_first: usize, fail_status: u16, ok_status: u16) -> (Arc<Receiver>, String) {
        Receiver::start_with(fail_first, fail_status, ok_status, None, None).await
    }

    async fn start_with(
        fail_first: usize,
        fail_status: u16,
        ok_status: u16,
        retry_after: Option<&'static str>,
        max_body: Option<usize>,
    ) -> (Arc<Receiver>, String) {
        let r = Arc::new(Receiver {
            fail_first,
            fail_status,
            ok_status,
            seen: AtomicUsize::new(0),
            retry_after,
            max_body,
            log: Mutex::new(Vec::new()),
            arrived: Mutex::new(Vec::new()),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/ingest", listener.local_addr().unwrap());
        let rr = r.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(rr.clone().serve(s));
            }
        });
        (r, url)
    }

    async fn serve(self: Arc<Self>, mut s: TcpStream) {
        let mut buf = Vec::new();
        let mut tmp = vec![0u8; 64 * 1024];
        loop {
            let head_end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                match s.read(&mut tmp).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&tmp[..n]),
                }
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
            let header = |name: &str| {
                head.lines().find_map(|l| l.strip_prefix(&format!("{name}:")).map(|v| v.trim().to_string()))
            };
            let len: usize = header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
            let ct = header("content-type").unwrap_or_default();
            while buf.len() < head_end + len {
                match s.read(&mut tmp).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&tmp[..n]),
                }
            }
            let body: serde_json::Value = serde_json::from_slice(&buf[head_end..head_end + len]).unwrap_or_default();
            buf.drain(..head_end + len);
            let k = self.seen.fetch_add(1, Ordering::SeqCst);
            let status = if k < self.fail_first {
                self.fail_status
            } else if self.max_body.is_some_and(|max| len > max) {
                413
            } else {
                self.ok_status
            };
            self.log.lock().push((status, ct, body));
            self.arrived.lock().push(Instant::now());
            let pause = match self.retry_after {
                Some(v) if k < self.fail_first => format!("retry-after: {v}\r\n"),
                _ => String::new(),
            };
            let resp = format!("HTTP/1.1 {status} X\r\n{pause}content-length: 2\r\n\r\nno");
            if s.write_all(resp.as_bytes()).await.is_err() {
                return;
            }
        }
    }

    /// Ids of events in batches answered 2xx.
    fn accepted_ids(&self) -> Vec<String> {
        let log = self.log.lock();
        log.iter()
            .filter(|(st, _, _)| (200..300).contains(st))
            .flat_map(|(_, _, b)| b.as_array().cloned().unwrap_or_default())
            .map(|ce| ce["id"].as_str().unwrap().to_string())
            .collect()
    }
}

/// Runs an HTTP relay from `outbox` to `url` until the outbox is empty; `false` if it is not
/// within `within`.
async fn drain_over_http(outbox: &Arc<Outbox>, url: &str, within: Duration) -> bool {
    let sink: Arc<dyn Sink> = Arc::new(HttpSink::new(url, "i-test").unwrap());
    let relay = Arc::new(Relay::with_config(outbox.clone(), sink, fast_relay()));
    let o = outbox.clone();
    run_relay_until(relay, within, move || o.depth() == 0).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_sink_retries_503_then_delivers_everything_once() {
    let (recv, url) = Receiver::start(4, 503, 200).await;
    let dir = TempDir::new("relay-http");
    let outbox = Arc::new(Outbox::open(&dir.0, 1 << 30, OutboxFullPolicy::Failsafe).unwrap());
    let events: Vec<Event> = (0..1234).map(event).collect();
    for e in &events {
        outbox.append(e).unwrap();
    }
    assert!(drain_over_http(&outbox, &url, Duration::from_secs(30)).await, "drained");

    let accepted = recv.accepted_ids();
    let unique: HashSet<&String> = accepted.iter().collect();
    assert_eq!(accepted.len(), events.len(), "each event accepted exactly once");
    assert_eq!(unique.len(), events.len());
    assert!(events.iter().all(|e| unique.contains(&e.event_id)));
    let log = recv.log.lock();
    assert_eq!(log.iter().filter(|(s, _, _)| *s == 503).count(), 4);
    assert!(log.iter().all(|(_, ct, _)| ct == "application/cloudevents-batch+json"));
    assert!(log.iter().all(|(_, _, b)| b.as_array().is_some_and(|a| !a.is_empty() && a.len() <= 500)));
    let first = &log.last().unwrap().2[0];
    let e = events.iter().find(|e| e.event_id == first["id"].as_str().unwrap()).unwrap();
    assert_eq!(first["specversion"], "1.0");
    assert_eq!(first["source"], "preauth-sidecar/i-test");
    assert_eq!(first["type"], "dev.preauth.decision");
    assert_eq!(first["time"], e.occurred_at.as_str());
    assert_eq!(first["datacontenttype"], "application/json");
    assert_eq!(serde_json::from_value::<Event>(first["data"].clone()).unwrap(), *e);
    assert_eq!(first["data"]["reserved_usd"], "0.000150");
    assert_eq!(outbox.stats().delivered, 1234);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_sink_400_parks_the_batch_without_looping() {
    let (recv, url) = Receiver::start(usize::MAX, 400, 200).await;
    let dir = TempDir::new("relay-http-400");
    let outbox = Arc::new(Outbox::open(&dir.0, 1 << 30, OutboxFullPolicy::Failsafe).unwrap());
    for i in 0..750 {
        outbox.append(&event(i)).unwrap();
    }
    assert!(drain_over_http(&outbox, &url, Duration::from_secs(10)).await);
    // Give a looping relay the chance to misbehave.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(recv.seen.load(Ordering::SeqCst), 2, "two batches (500 + 250), each posted once");
    let s = outbox.stats();
    assert_eq!((s.parked, s.delivered, s.depth), (750, 0, 0));
    let parked: Vec<_> = std::fs::read_dir(dir.0.join("parked"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let batches: Vec<_> = parked.iter().filter(|n| n.ends_with(".ndjson")).collect();
    assert_eq!(batches.len(), 2, "{parked:?}");
    let lines: usize =
        batches.iter().map(|n| std::fs::read_to_string(dir.0.join("parked").join(n)).unwrap().lines().count()).sum();
    assert_eq!(lines, 750);
    assert!(parked.iter().any(|n| n.ends_with(".reason")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_resumes_from_the_cursor_after_a_restart() {
    let (recv, url) = Receiver::start(0, 503, 200).await;
    let dir = TempDir::new("relay-restart");
    let opts = OutboxOptions { retention: None, ..OutboxOptions::new(1 << 30, OutboxFullPolicy::Failsafe) };
    {
        let outbox = Arc::new(Outbox::open_with(&dir.0, opts.clone()).unwrap());
        for i in 0..800 {
            outbox.append(&event(i)).unwrap();
        }
        // Deliver one batch, then "crash" (drop everything without shutdown).
        let sink: Arc<dyn Sink> = Arc::new(HttpSink::new(&url, "i-test").unwrap());
        let relay = Relay::with_config(outbox.clone(), sink, fast_relay());
        assert_eq!(relay.step().await, super::relay::Step::Delivered(500));
    }
    let outbox = Arc::new(Outbox::open_with(&dir.0, opts).unwrap());
    assert_eq!(outbox.depth(), 300);
    assert!(drain_over_http(&outbox, &url, Duration::from_secs(10)).await);
    let ids = recv.accepted_ids();
    assert_eq!(ids.len(), 800);
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 800);
}

/// What an operator reads in the relay's warning: the cause (not just "error sending request"),
/// the endpoint with its port (credentials and query left out), and for a database without the
/// schema, the command that creates it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_errors_name_their_cause_and_what_to_do() {
    let port = closed_port();
    let http = HttpSink::new(&format!("http://user:pw@127.0.0.1:{port}/ingest?token=qtok"), "i-test").unwrap();
    let msg = http.deliver(&[EventLine::of(&event(1))]).await.unwrap_err().to_string();
    assert!(msg.to_ascii_lowercase().contains("connection refused"), "{msg}");
    assert!(msg.contains(&format!("http://127.0.0.1:{port}/ingest")), "{msg}");
    assert!(!msg.contains("pw") && !msg.contains("qtok"), "{msg}");

    let pg = PostgresSink::new(&format!("postgres://postgres:pgpw@127.0.0.1:{port}/x")).unwrap();
    let msg = pg.deliver(&[EventLine::of(&event(1))]).await.unwrap_err().to_string();
    assert!(msg.to_ascii_lowercase().contains("connection refused"), "{msg}");
    assert!(!msg.contains("pgpw"), "{msg}");

    let db = TestDb::new().await;
    let err = PostgresSink::new(&db.url).unwrap().deliver(&[EventLine::of(&event(1))]).await.unwrap_err();
    assert!(matches!(err, super::sink::SinkError::Retryable(_)), "{err:?}");
    assert!(err.to_string().contains("preauth-sidecar migrate"), "{err}");
}

/// A receiver that refuses every request (bad credentials, wrong path) is a configuration
/// problem, not a bad batch: the relay keeps the events and retries until it is fixed, instead of
/// parking the whole stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_sink_retries_auth_and_routing_failures_instead_of_parking() {
    for status in [401, 403, 404, 301] {
        let (recv, url) = Receiver::start(3, status, 200).await;
        let dir = TempDir::new("relay-http-auth");
        let outbox = Arc::new(Outbox::open(&dir.0, 1 << 30, OutboxFullPolicy::Failsafe).unwrap());
        for i in 0..750 {
            outbox.append(&event(i)).unwrap();
        }
        assert!(drain_over_http(&outbox, &url, Duration::from_secs(10)).await, "{status}");
        let s = outbox.stats();
        assert_eq!((s.parked, s.delivered, s.depth), (0, 750, 0), "{status}");
        assert_eq!(recv.accepted_ids().into_iter().collect::<HashSet<_>>().len(), 750, "{status}");
    }
}

/// The sink's sessions carry a server-side statement timeout below its own (a statement it gave
/// up on is cancelled by the server instead of waiting behind a lock while the sink reconnects:
/// audit, one more stuck connection per 30 s of a table lock), unless the URL sets options.
#[test]
fn sink_sessions_time_out_on_the_server_first() {
    let c = postgres::parse_url("postgres://u@127.0.0.1/db").unwrap();
    assert_eq!(c.get_options(), Some("-c statement_timeout=25000"));
    assert!(postgres::SERVER_STATEMENT_TIMEOUT < postgres::STATEMENT_TIMEOUT);
    let own = postgres::parse_url("postgres://u@127.0.0.1/db?options=-c%20search_path%3Dledger").unwrap();
    assert_eq!(own.get_options(), Some("-c search_path=ledger"));
}

/// One event Postgres refuses for its data no longer takes its batch with it: the others are
/// stored and only it is parked (audit: 3 requests with a bad model name parked 110 events of
/// four tenants, and the replayed batch failed the same way). A NUL sent in a model name or a
/// tenant claim (which `jsonb` and `text` cannot hold) is stored as U+FFFD.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_parks_only_the_event_it_refuses_and_stores_a_nul_as_a_replacement_character() {
    let db = TestDb::new().await;
    postgres::migrate(&db.url).await.unwrap();
    let dir = TempDir::new("relay-pg-poison");
    let outbox = Arc::new(Outbox::open(&dir.0, 1 << 30, OutboxFullPolicy::Failsafe).unwrap());
    let sink: Arc<dyn Sink> = Arc::new(PostgresSink::new(&db.url).unwrap());
    let relay = Relay::with_config(outbox.clone(), sink, fast_relay());
    let mut events: Vec<Event> = (0..10).map(event).collect();
    events[3].model = Some("gpt-4o-mini\u{0}x".into());
    events[4].tenant_id = Some("tenant-\u{0}".into());
    events[6].occurred_at = "not a time".to_string(); // refused by Postgres (22007)
    for e in &events {
        outbox.append(e).unwrap();
    }
    let step = relay.step().await;
    assert!(matches!(step, super::relay::Step::Delivered(10)), "{step:?}");
    let stats = outbox.stats();
    assert_eq!((stats.delivered, stats.parked, outbox.depth()), (9, 1, 0));
    let c = db.client().await;
    assert_eq!(count(&c, "SELECT count(*) FROM enforcement_ledger").await, 9);
    let row = c
        .query_one(
            "SELECT payload->>'model', tenant_id FROM enforcement_ledger WHERE event_id = $1::text::uuid",
            &[&events[3].event_id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "gpt-4o-mini\u{FFFD}x");
    let row = c
        .query_one("SELECT tenant_id FROM enforcement_ledger WHERE event_id = $1::text::uuid", &[&events[4].event_id])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "tenant-\u{FFFD}");
    // The parked file holds the refused event alone, as written.
    let parked = std::fs::read_dir(dir.0.join("parked"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "ndjson") && !p.ends_with("corrupt.ndjson"))
        .unwrap();
    let lines: Vec<String> = std::fs::read_to_string(parked).unwrap().lines().map(str::to_string).collect();
    assert_eq!(lines, [EventLine::of(&events[6]).json]);
}

/// `migrate` after the table was renamed aside creates the new table with all its indexes
/// (audit: the renamed table kept the index names, and `CREATE INDEX IF NOT EXISTS` skipped them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_after_a_rename_gives_the_new_table_its_indexes() {
    let db = TestDb::new().await;
    postgres::migrate(&db.url).await.unwrap();
    let c = db.client().await;
    c.batch_execute("ALTER TABLE enforcement_ledger RENAME TO enforcement_ledger_old").await.unwrap();
    postgres::migrate(&db.url).await.unwrap();
    postgres::migrate(&db.url).await.expect("and again: nothing more to do");
    let on = |table: &'static str| {
        let c = &c;
        async move {
            let q = format!("SELECT count(*) FROM pg_indexes WHERE tablename = '{table}'");
            count(c, &q).await
        }
    };
    assert_eq!(
        (on("enforcement_ledger").await, on("enforcement_ledger_old").await),
        (4, 4),
        "3 indexes + the key each"
    );
}

/// A receiver's `Retry-After` on a 429 is honoured: the relay does not send again sooner (audit:
/// with `Retry-After: 120` it retried after 0.12, 0.15, 0.21 … s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_on_429_holds_the_next_attempt_back() {
    let (rx, url) = Receiver::start_with(1, 429, 200, Some("1"), None).await;
    let sink = HttpSink::new(&url, "i-test").unwrap();
    let err = sink.deliver(&[EventLine::of(&event(0))]).await.unwrap_err();
    assert!(matches!(&err, super::sink::SinkError::RetryAfter(_, d) if *d == Duration::from_secs(1)), "{err:?}");
    let dir = TempDir::new("relay-retry-after");
    let outbox = Arc::new(Outbox::open(&dir.0, 1 << 30, OutboxFullPolicy::Failsafe).unwrap());
    outbox.append(&event(1)).unwrap();
    let (rx2, url2) = Receiver::start_with(1, 429, 200, Some("1"), None).await;
    assert!(drain_over_http(&outbox, &url2, Duration::from_secs(10)).await);
    let at = rx2.arrived.lock().clone();
    assert_eq!(at.len(), 2, "one refused, then accepted");
    assert!(at[1] - at[0] >= Duration::from_millis(950), "{:?} between attempts", at[1] - at[0]);
    drop(rx);
}

/// `Retry-After` as an HTTP-date (RFC 9110 §10.2.3) is counted from the sink's clock: the relay
/// waits until then (before, only delay-seconds were read and the date form was backed off).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_date_on_503_is_counted_from_now() {
    let (_rx, url) = Receiver::start_with(1, 503, 200, Some("Sun, 06 Nov 1994 08:49:37 GMT"), None).await;
    let clock = Arc::new(crate::clock::ManualClock::new(784_111_777_000 - 42_000));
    let sink = HttpSink::new(&url, "i-test").unwrap().with_clock(clock);
    let err = sink.deliver(&[EventLine::of(&event(0))]).await.unwrap_err();
    assert!(matches!(&err, super::sink::SinkError::RetryAfter(_, d) if *d == Duration::from_secs(42)), "{err:?}");
}

/// A receiver's body limit (413) splits the batch until the parts pass; an event too large alone
/// is parked by itself, every other one delivered (before: every batch near the limit was parked
/// whole, 500 events at a time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_413_splits_the_batch_and_parks_only_an_event_too_large_alone() {
    let mut events: Vec<Event> = (0..40).map(event).collect();
    events[17].details = Some(serde_json::json!({"notes": "x".repeat(12_000)}));
    let (rx, url) = Receiver::start_with(0, 200, 200, None, Some(8_000)).await;
    let sink = HttpSink::new(&url, "i-test").unwrap();
    let lines: Vec<EventLine> = events.iter().map(EventLine::of).collect();
    let err = sink.deliver(&lines).await.unwrap_err();
    assert!(matches!(&err, super::sink::SinkError::PartlyRejected { rejected, .. } if rejected == &[17]), "{err:?}");
    let mut got = rx.accepted_ids();
    got.sort();
    let mut want: Vec<String> =
        events.iter().enumerate().filter(|(i, _)| *i != 17).map(|(_, e)| e.event_id.clone()).collect();
    want.sort();
    assert_eq!(got, want, "every other event delivered once");
}
