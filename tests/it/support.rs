//! Test support: a sidecar on free loopback ports in front of the built-in fake upstream,
//! configured from a map (never the process environment), plus HTTP helpers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use preauth_sidecar::clock::{Clock, SystemClock};
use preauth_sidecar::config::{self, Purpose};
use preauth_sidecar::demo::mint_tenant_jwt;
use preauth_sidecar::demo::upstream::FakeUpstream;
use preauth_sidecar::server::{self, Parts, RunningServer};
use preauth_sidecar::store::approvals_memory::MemoryApprovals;
use preauth_sidecar::store::budget_memory::MemoryBudgets;
use preauth_sidecar::store::memory::MemoryCounters;
use preauth_sidecar::store::Counters;

pub const JWT_SECRET: &str = "test-secret-0123456789abcdef0123456789";
pub const ADMIN_KEY: &str = "test-admin-key";

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Two distinct free loopback addresses (proxy, admin): both bound at once, so the kernel cannot
/// hand out the same port twice (two `free_port` calls can, and the config then refuses it).
pub fn free_pair() -> (SocketAddr, SocketAddr) {
    let (a, b) = (TcpListener::bind("127.0.0.1:0").unwrap(), TcpListener::bind("127.0.0.1:0").unwrap());
    (a.local_addr().unwrap(), b.local_addr().unwrap())
}

/// Whether process `pid` holds the socket listening on `addr` (an IPv4 address; Linux
/// `/proc/net/tcp`), so that a listener of another test on the same port is not mistaken for it.
pub fn listens_on(pid: u32, addr: SocketAddr) -> bool {
    let SocketAddr::V4(v4) = addr else { panic!("IPv4 only: {addr}") };
    let local = format!("{:08X}:{:04X}", u32::from_le_bytes(v4.ip().octets()), v4.port());
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let inodes: Vec<String> = tcp
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() > 9 && f[1] == local && f[3] == "0A")
        .map(|f| format!("socket:[{}]", f[9]))
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    fds.flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| inodes.iter().any(|i| l.as_os_str() == i.as_str())))
}

pub fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
        assert!(Instant::now() < deadline, "{addr} did not start listening");
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub struct Sidecar {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub upstream: FakeUpstream,
    running: Option<RunningServer>,
}

impl Sidecar {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }
    pub async fn admin_get(&self, path: &str) -> serde_json::Value {
        admin_get(self.admin_url(path)).await
    }
    pub async fn admin_post(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
        admin_post(self.admin_url(path), body).await
    }
    pub fn state(&self) -> Arc<preauth_sidecar::state::AppState> {
        self.running.as_ref().unwrap().state.clone()
    }
    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            tokio::task::spawn_blocking(move || r.stop()).await.unwrap();
        }
    }
}

/// Starts the fake upstream and a sidecar configured by `env` (on top of test defaults).
pub async fn start(env: &[(&str, &str)]) -> Sidecar {
    start_with(env, Arc::new(MemoryCounters::new())).await
}

pub async fn start_with(env: &[(&str, &str)], counters: Arc<dyn Counters>) -> Sidecar {
    let dir = temp_dir();
    start_in(env, counters, &dir).await
}

/// A fresh data directory for one sidecar.
pub fn temp_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("preauth-it-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Starts a sidecar whose embedded state lives in `dir` (restart tests reuse it).
pub async fn start_in(env: &[(&str, &str)], counters: Arc<dyn Counters>, dir: &std::path::Path) -> Sidecar {
    let upstream = FakeUpstream::start("127.0.0.1:0").await.unwrap();
    let (proxy, admin) = free_pair();
    let mut m: HashMap<String, String> = HashMap::new();
    m.insert("PREAUTH_UPSTREAM_URL".into(), upstream.base_url());
    m.insert("PREAUTH_LISTEN_ADDR".into(), proxy.to_string());
    m.insert("PREAUTH_ADMIN_ADDR".into(), admin.to_string());
    m.insert("SUPABASE_JWT_SECRET".into(), JWT_SECRET.into());
    m.insert("ADMIN_API_KEY".into(), ADMIN_KEY.into());
    m.insert("PREAUTH_THREADS".into(), "2".into());
    m.insert("PREAUTH_DATA_DIR".into(), dir.display().to_string());
    // The suite runs many servers at once on 2 cores: decisions must not hit the production
    // deadlines by scheduling delay alone (tests that exercise deadlines set their own).
    m.insert("PREAUTH_GATE_TIMEOUT_MS".into(), "5000".into());
    m.insert("PREAUTH_STORE_TIMEOUT_MS".into(), "2000".into());
    for (k, v) in env {
        if v.is_empty() {
            m.remove(*k);
        } else {
            m.insert(k.to_string(), v.to_string());
        }
    }
    let cfg = config::parse(&m, Purpose::Run).expect("test config is valid");
    let budgets = Arc::new(MemoryBudgets::open(&cfg.data_dir).unwrap());
    let approvals = Arc::new(MemoryApprovals::open(&cfg.data_dir).unwrap());
    let parts = Parts {
        clock: Arc::new(SystemClock),
        counters,
        budgets: budgets.clone(),
        approvals,
        policy: None,
        gatekeeper: None,
        health: None,
        journal: Some(budgets),
    };
    let built = server::build_with(cfg, parts).unwrap();
    let running = server::spawn(built);
    wait_listening(proxy);
    wait_listening(admin);
    Sidecar { proxy, admin, upstream, running: Some(running) }
}

pub fn token(tenant: &str, tier: &str) -> String {
    let now = (SystemClock.now_ms() / 1000) as i64;
    mint_tenant_jwt(JWT_SECRET, tenant, tier, now, 3600)
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap()
}

pub fn chat(model: &str) -> serde_json::Value {
    serde_json::json!({"model": model, "max_tokens": 20, "messages": [{"role": "user", "content": "hello there"}]})
}

/// POST a JSON body to an LLM route as `tenant` of `tier`.
pub async fn post(s: &Sidecar, path: &str, tenant: &str, tier: &str, body: &serde_json::Value) -> reqwest::Response {
    post_with(s, path, tenant, tier, body, &[]).await
}

/// [`post`] with extra request headers (e.g. the fake upstream's `x-mock-*` controls).
pub async fn post_with(
    s: &Sidecar,
    path: &str,
    tenant: &str,
    tier: &str,
    body: &serde_json::Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut req = client().post(s.url(path)).bearer_auth(token(tenant, tier)).json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

pub async fn json_of(r: reqwest::Response) -> serde_json::Value {
    let text = r.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

pub async fn patch_runtime(s: &Sidecar, body: serde_json::Value) -> reqwest::Response {
    client().patch(s.admin_url("/api/v1/enforcement/runtime")).bearer_auth(ADMIN_KEY).json(&body).send().await.unwrap()
}

/// An admin `GET` with the admin key; the JSON answer.
pub async fn admin_get(url: String) -> serde_json::Value {
    json_of(client().get(url).bearer_auth(ADMIN_KEY).send().await.unwrap()).await
}

/// An admin `POST` of `body` with the admin key.
pub async fn admin_post(url: String, body: serde_json::Value) -> reqwest::Response {
    client().post(url).bearer_auth(ADMIN_KEY).json(&body).send().await.unwrap()
}

pub async fn metrics(s: &Sidecar) -> String {
    client().get(s.admin_url("/metrics")).send().await.unwrap().text().await.unwrap()
}

/// `GET /api/v1/enforcement/tenants/{tenant}` on `s`'s admin listener (200 expected).
pub async fn tenant_view(s: &Sidecar, tenant: &str) -> serde_json::Value {
    let r = client()
        .get(s.admin_url(&format!("/api/v1/enforcement/tenants/{tenant}")))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    json_of(r).await
}

/// One Gate API hold of tenant `racy` (`id`) raced three ways: an operator's reconcile on
/// `manual_on`, its caller's settle on `caller_on` and, with `sweep`, the overdue sweep on
/// `caller_on`. Exactly one ends it: the other two answer 409 (or release nothing). `round`
/// names the race in a failure.
pub async fn race_to_end_a_hold(manual_on: &Sidecar, caller_on: &Sidecar, id: &str, sweep: bool, round: usize) {
    let reconcile = format!("/api/v1/enforcement/reservations/{id}/reconcile");
    let manual = manual_on.admin_post(&reconcile, serde_json::json!({"actual_cost_usd": "0.000070"}));
    let caller = client()
        .post(caller_on.url(&format!("/api/v1/enforcement/reservations/{id}/settle")))
        .bearer_auth(token("racy", "enterprise"))
        .json(&serde_json::json!({"actual_cost_usd": "0.000030"}))
        .send();
    let sweeper = async {
        if !sweep {
            return None;
        }
        let body = serde_json::json!({"older_than_seconds": 0});
        let r = caller_on.admin_post("/api/v1/enforcement/reservations/reconcile-overdue", body).await;
        Some(json_of(r).await["released_count"].as_u64().unwrap())
    };
    let (manual, caller, swept) = tokio::join!(manual, caller, sweeper);
    let mut statuses = [manual.status().as_u16(), caller.unwrap().status().as_u16()];
    statuses.sort_unstable();
    let want = if swept == Some(1) { [409, 409] } else { [200, 409] };
    assert_eq!(statuses, want, "hold {round}, swept {swept:?}");
}

/// The ledgers of `replicas` hold exactly one ending event (settled or released) for each of
/// tenant `racy`'s `holds`, and what they charged is the tenant's spend.
pub async fn assert_one_ending_per_hold(replicas: &[&Sidecar], holds: usize) {
    let (mut settled, mut released) = (Vec::new(), Vec::new());
    for s in replicas {
        for (kind, into) in [("reservation_settled", &mut settled), ("reservation_released", &mut released)] {
            let url = format!("/api/v1/enforcement/ledger?tenant_id=racy&event_type={kind}&limit=1000");
            into.extend(s.admin_get(&url).await["items"].as_array().unwrap().clone());
        }
    }
    let ended: std::collections::HashSet<&str> =
        settled.iter().chain(&released).map(|e| e["reservation_id"].as_str().unwrap()).collect();
    assert_eq!((settled.len() + released.len(), ended.len()), (holds, holds), "one ending per hold");
    let charged: f64 = settled.iter().map(|e| e["actual_cost_usd"].as_str().unwrap().parse::<f64>().unwrap()).sum();
    let spent: f64 = tenant_view(replicas[0], "racy").await["spent_usd"].as_str().unwrap().parse().unwrap();
    assert!((charged - spent).abs() < 1e-9, "ledger {charged} = spend {spent}");
}

/// The sum of the samples in a Prometheus text exposition whose series starts with `series`
/// (a name, or a name with its opening labels such as `name{op="admit"`); 0 when none.
pub fn metric_sum(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.strip_prefix(series).is_some_and(|rest| rest.starts_with(['{', ' ', ',', '}'])))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// Asserts a sidecar-made error: status, `code`, headers.
pub async fn assert_error(r: reqwest::Response, status: u16, code: &str) -> serde_json::Value {
    assert_eq!(r.status().as_u16(), status, "status for {code}");
    let h = r.headers().clone();
    assert_eq!(h.get("x-preauth-error").and_then(|v| v.to_str().ok()), Some(code));
    assert_eq!(h.get("content-type").and_then(|v| v.to_str().ok()), Some("application/json"));
    let rid = h.get("x-preauth-request-id").and_then(|v| v.to_str().ok()).map(str::to_string);
    assert!(rid.is_some(), "x-preauth-request-id on {code}");
    // The SDKs expose the origin's request id from these (openai: `x-request-id` → `requestID` /
    // `request_id`; anthropic: `request-id`): for a sidecar-made answer that is the sidecar's.
    for name in ["x-request-id", "request-id"] {
        assert_eq!(h.get(name).and_then(|v| v.to_str().ok()), rid.as_deref(), "{name} on {code}");
    }
    if matches!(status, 429 | 503) {
        assert!(h.get("retry-after").is_some(), "Retry-After on {status} {code}");
    }
    let v = json_of(r).await;
    assert_eq!(v["error"]["code"], code);
    assert_eq!(v["error"]["type"], "preauth_error");
    assert_eq!(v["error"]["id"].as_str(), rid.as_deref());
    assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    v
}

/// The Redis every fleet test shares (isolated by key prefix).
pub const REDIS: &str = "redis://127.0.0.1:6379";

/// A key prefix of one test's own.
pub fn redis_prefix() -> String {
    format!("it:{}:", uuid::Uuid::new_v4().simple())
}

/// Deletes every key under `prefix` (test isolation on the shared Redis).
pub async fn redis_cleanup(prefix: &str) {
    let client = redis::Client::open(REDIS).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}*")).query_async(&mut c).await.unwrap();
    for k in keys {
        let _: () = redis::cmd("DEL").arg(&k).query_async(&mut c).await.unwrap();
    }
}

/// Starts a sidecar in fleet mode: all shared state in the Redis at 127.0.0.1:6379 (or `redis_url`)
/// under `prefix`, so several sidecars in one test are replicas of one fleet.
pub async fn start_fleet(env: &[(&str, &str)], redis_url: &str, prefix: &str) -> Sidecar {
    let upstream = FakeUpstream::start("127.0.0.1:0").await.unwrap();
    let (proxy, admin) = free_pair();
    let dir = temp_dir();
    let mut m: HashMap<String, String> = HashMap::new();
    m.insert("PREAUTH_UPSTREAM_URL".into(), upstream.base_url());
    m.insert("PREAUTH_LISTEN_ADDR".into(), proxy.to_string());
    m.insert("PREAUTH_ADMIN_ADDR".into(), admin.to_string());
    m.insert("SUPABASE_JWT_SECRET".into(), JWT_SECRET.into());
    m.insert("ADMIN_API_KEY".into(), ADMIN_KEY.into());
    m.insert("PREAUTH_THREADS".into(), "2".into());
    m.insert("PREAUTH_DATA_DIR".into(), dir.display().to_string());
    m.insert("PREAUTH_REDIS_URL".into(), redis_url.to_string());
    m.insert("PREAUTH_REDIS_KEY_PREFIX".into(), prefix.to_string());
    m.insert("PREAUTH_GATE_TIMEOUT_MS".into(), "5000".into());
    m.insert("PREAUTH_STORE_TIMEOUT_MS".into(), "1000".into());
    for (k, v) in env {
        m.insert(k.to_string(), v.to_string());
    }
    let cfg = config::parse(&m, Purpose::Run).expect("test config is valid");
    let parts = Parts::fleet(&cfg, redis_url).unwrap();
    let running = server::spawn(server::build_with(cfg, parts).unwrap());
    wait_listening(proxy);
    wait_listening(admin);
    Sidecar { proxy, admin, upstream, running: Some(running) }
}

/// The real binary (`preauth-sidecar run`) on free loopback ports, in front of a fake upstream
/// that lives in the test. Killed (SIGKILL) on drop.
pub struct Binary {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub env: Vec<(String, String)>,
    child: Option<std::process::Child>,
}

impl Binary {
    pub fn start(upstream: &FakeUpstream, dir: &std::path::Path, extra: &[(&str, &str)]) -> Binary {
        let (proxy, admin) = free_pair();
        let mut env: Vec<(String, String)> = vec![
            ("PREAUTH_UPSTREAM_URL".into(), upstream.base_url()),
            ("PREAUTH_LISTEN_ADDR".into(), proxy.to_string()),
            ("PREAUTH_ADMIN_ADDR".into(), admin.to_string()),
            ("SUPABASE_JWT_SECRET".into(), JWT_SECRET.into()),
            ("ADMIN_API_KEY".into(), ADMIN_KEY.into()),
            ("PREAUTH_DATA_DIR".into(), dir.display().to_string()),
            ("PREAUTH_THREADS".into(), "2".into()),
            ("PREAUTH_GATE_TIMEOUT_MS".into(), "5000".into()),
            ("PREAUTH_STORE_TIMEOUT_MS".into(), "2000".into()),
        ];
        for (k, v) in extra {
            env.retain(|(ek, _)| ek != k);
            env.push((k.to_string(), v.to_string()));
        }
        let mut b = Binary { proxy, admin, env, child: None };
        b.spawn();
        b
    }

    /// (Re)starts the process with `self.env` and waits until it listens on both of its ports.
    /// A port handed out by [`free_port`] may be taken by another test before the sidecar binds
    /// it: the sidecar then exits (or another process answers there), so the ports are checked
    /// to belong to this process, and on a clash it starts again on fresh ones.
    pub fn spawn(&mut self) {
        for _ in 0..5 {
            let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_preauth-sidecar"));
            c.arg("run")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .env("RUST_LOG", "warn");
            for (k, v) in &self.env {
                c.env(k, v);
            }
            let mut child = c.spawn().unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if child.try_wait().unwrap().is_some() {
                    break; // did not start (a port was taken): again on fresh ports
                }
                if listens_on(child.id(), self.proxy) && listens_on(child.id(), self.admin) {
                    self.child = Some(child);
                    return;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("the sidecar did not listen on {} and {} within 10 s", self.proxy, self.admin);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            self.use_fresh_ports(&[], &[]);
        }
        panic!("the sidecar did not start in 5 attempts (see `preauth-sidecar check-config` with this env)");
    }

    /// Restarts the process with `set`/`unset` applied to its environment, on fresh ports: the
    /// ports the old process freed may be taken meanwhile by another test's listener (which
    /// `wait_listening` would then mistake for this process; seen as a 404 from a stranger).
    pub fn restart_with(&mut self, set: &[(&str, &str)], unset: &[&str]) {
        self.kill();
        self.relaunch(set, unset);
    }

    /// [`Binary::restart_with`] after a graceful stop ([`Binary::terminate`]) instead of a SIGKILL.
    pub fn restart_gracefully(&mut self, set: &[(&str, &str)], unset: &[&str]) {
        self.terminate();
        self.relaunch(set, unset);
    }

    /// Starts the stopped process again with `set`/`unset` applied, on fresh ports.
    fn relaunch(&mut self, set: &[(&str, &str)], unset: &[&str]) {
        self.use_fresh_ports(set, unset);
        self.spawn();
    }

    /// Applies `set`/`unset` to the environment, with fresh proxy and admin ports.
    fn use_fresh_ports(&mut self, set: &[(&str, &str)], unset: &[&str]) {
        (self.proxy, self.admin) = free_pair();
        let ports = [("PREAUTH_LISTEN_ADDR", self.proxy.to_string()), ("PREAUTH_ADMIN_ADDR", self.admin.to_string())];
        for (k, v) in set.iter().map(|(k, v)| (*k, v.to_string())).chain(ports) {
            self.env.retain(|(ek, _)| ek != k);
            self.env.push((k.to_string(), v));
        }
        self.env.retain(|(k, _)| !unset.contains(&k.as_str()));
    }

    /// Stops the process as Kubernetes and systemd do (SIGTERM: drain, then the services stop)
    /// and waits for it to exit cleanly.
    pub fn terminate(&mut self) {
        let Some(mut c) = self.child.take() else { return };
        let sent = std::process::Command::new("kill").args(["-TERM", &c.id().to_string()]).status().unwrap();
        assert!(sent.success(), "kill -TERM {}", c.id());
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = c.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("the sidecar did not exit within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "exit after SIGTERM: {status}");
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    pub async fn metrics(&self) -> String {
        client().get(self.admin_url("/metrics")).send().await.unwrap().text().await.unwrap()
    }

    pub async fn patch(&self, body: serde_json::Value) -> serde_json::Value {
        let r = client()
            .patch(self.admin_url("/api/v1/enforcement/runtime"))
            .bearer_auth(ADMIN_KEY)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "PATCH {body}");
        json_of(r).await
    }

    pub async fn admin_get(&self, path: &str) -> serde_json::Value {
        admin_get(self.admin_url(path)).await
    }

    pub async fn admin_post(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
        admin_post(self.admin_url(path), body).await
    }

    /// An LLM call as `tenant` with extra headers.
    pub async fn call(&self, tenant: &str, body: &serde_json::Value, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut r = client().post(self.url("/v1/chat/completions")).bearer_auth(token(tenant, "enterprise")).json(body);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.send().await.unwrap()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The value of one Prometheus sample (`name{labels}`), 0 when absent.
pub fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Polls `f` every 25 ms until it holds (panics after 5 s naming `what`): for what the sidecar
/// records after the client has its answer (settlement, counters).
pub async fn wait_for<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Runs `preauth-sidecar mint-approval` for tenant `acme` (a fixed fingerprint, 2.50 USD) with the
/// approval `secret`, issuance not frozen by the environment, and `env` set (where the runtime
/// freeze is read from: a data directory or Redis). The command is built at once: the future
/// borrows nothing.
pub fn mint_approval(
    secret: &str,
    env: &[(&str, &str)],
) -> impl std::future::Future<Output = std::process::Output> + use<> {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_preauth-sidecar"));
    c.args(["mint-approval", "--tenant", "acme", "--fingerprint", &"a".repeat(64), "--max-cost-usd", "2.50"])
        .env("ENFORCEMENT_APPROVAL_TOKEN_SECRET", secret)
        .env_remove("ENFORCEMENT_APPROVAL_ISSUANCE_FROZEN")
        .env_remove("PREAUTH_REDIS_URL");
    for (k, v) in env {
        c.env(k, v);
    }
    async move { tokio::task::spawn_blocking(move || c.output().unwrap()).await.unwrap() }
}
