//! Composition root of a sidecar: builds the stores, the shared state and the pingora `Server`
//! (proxy listener, admin listener, background services) from a `Config`, and runs it on a
//! dedicated thread so tests and `demo` can start and stop servers in-process.
//!
//! Owns: `build`, `spawn`, `RunningServer`. Imports: everything (this is the wiring).

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use async_trait::async_trait;
use pingora::apps::HttpServerOptions;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use tokio::sync::Notify;

use crate::admin::AdminApp;
use crate::clock::{Clock, SystemClock};
use crate::commit::{GroupCommit, StageCounter, Staged};
use crate::config::Config;
use crate::ledger::outbox::{Outbox, OutboxMetrics, OutboxSyncer};
use crate::ledger::postgres::PostgresSink;
use crate::ledger::relay::Relay;
use crate::ledger::sink::{is_postgres_url, sink_from_url, Sink};
use crate::ledger::LedgerSource;
use crate::proxy::h1::LeanH1;
use crate::proxy::PreauthProxy;
use crate::state::{AppState, Ledger, Stores};
use crate::store::approvals::Approvals;
use crate::store::approvals_memory::MemoryApprovals;
use crate::store::budget::Budgets;
use crate::store::budget_memory::MemoryBudgets;
use crate::store::memory::{MemoryCounters, MemoryPolicy};
use crate::store::redis::RedisStore;
use crate::store::{Counters, Gatekeeper, HealthProbe, PolicyStore, Sequential};
use crate::worker::{Housekeeper, Reloader};

/// Longest drain after SIGTERM ([`crate::drain`]): requests in flight get this long to finish
/// (the process goes on as soon as none is left); those still running 2 s before it are ended
/// and settled from what was seen. Then pingora stops its services (up to 5 s). Kubernetes'
/// `terminationGracePeriodSeconds` must exceed this plus 5 s plus the preStop delay.
pub const GRACE_PERIOD_SECONDS: u64 = 10;

/// A built, not yet running, sidecar.
pub struct Built {
    pub server: Server,
    pub state: Arc<AppState>,
}

pub use crate::config::load_pricing;

/// An h2c connection with no open stream is closed after this (the HTTP/1 driver's idle time).
const H2_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Streams one h2c connection may have open at once (`SETTINGS_MAX_CONCURRENT_STREAMS`).
const H2_MAX_CONCURRENT_STREAMS: u32 = 128;

/// Resolves the upstream once (pingora's `HttpPeer::new` would resolve per request and panic).
pub fn resolve_upstream(config: &Config) -> Result<SocketAddr, String> {
    let up = config.upstream.as_ref().ok_or("PREAUTH_UPSTREAM_URL is not set")?;
    (up.host.as_str(), up.port)
        .to_socket_addrs()
        .map_err(|e| format!("PREAUTH_UPSTREAM_URL: cannot resolve {}: {e}", up.host))?
        .next()
        .ok_or_else(|| format!("PREAUTH_UPSTREAM_URL: {} resolves to no address", up.host))
}

/// Fails when a listener address cannot be bound (in use by another process, not a local
/// address, no permission). pingora retries a busy address for 30 s and then loses that listener
/// in a panicked thread while the process, and its admin `/readyz`, lived on: the operator saw a
/// ready replica that refused every connection. Checked with `SO_REUSEADDR` as pingora binds, so
/// only a live listener (not a `TIME_WAIT` connection) counts as in use.
pub fn check_listeners(config: &Config) -> Result<(), String> {
    for (var, addr) in [("PREAUTH_LISTEN_ADDR", config.listen_addr), ("PREAUTH_ADMIN_ADDR", config.admin_addr)] {
        let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() };
        socket.and_then(|s| s.set_reuseaddr(true).and_then(|()| s.bind(addr))).map_err(|e| {
            format!("{var}: cannot listen on {addr}: {e} (stop the process that holds it or choose another address)")
        })?;
    }
    Ok(())
}

/// The `reason` of the `runtime_changed` event a restart records in embedded mode: the runtime
/// policy is assembled anew (a new `policy_version`) from the configuration and the runtime
/// changes kept in the data directory.
pub const RESTART_REASON: &str = "restart: runtime policy restored from PREAUTH_DATA_DIR/runtime-policy.json";

/// The replaceable parts of a sidecar: time and state backends.
pub struct Parts {
    pub clock: Arc<dyn Clock>,
    pub counters: Arc<dyn Counters>,
    pub budgets: Arc<dyn Budgets>,
    pub approvals: Arc<dyn Approvals>,
    /// `None`: the runtime policy lives in this process (embedded), its runtime knobs and version
    /// kept in `PREAUTH_DATA_DIR` across restarts (`MemoryPolicy::open`).
    pub policy: Option<Arc<dyn PolicyStore>>,
    /// `None`: admit, then reserve, in-process (`store::Sequential`).
    pub gatekeeper: Option<Arc<dyn Gatekeeper>>,
    /// Polled by the housekeeper for `/readyz` while idle.
    pub health: Option<HealthProbe>,
    /// The embedded budgets (the same store as `budgets`), whose journal joins the group commit
    /// with the outbox (`crate::commit`); `None` for a shared store.
    pub journal: Option<Arc<MemoryBudgets>>,
}

/// An embedded data directory whose outbox holds events but whose budget or approvals journal
/// is missing (every start writes both), or whose budget journal is empty (every start writes
/// a snapshot line into it; an approvals journal may be empty), lost its state (a volume
/// restored in part, a file deleted): month spend and consumed approval tokens start from
/// nothing. Said loudly at start (durability audit: it started silently with every tenant at 0).
fn warn_if_state_is_gone(data_dir: &std::path::Path) {
    use crate::ledger::outbox::{list_segments, outbox_dir, segment_file_name};
    let outbox = outbox_dir(data_dir);
    let held: u64 = list_segments(&outbox)
        .unwrap_or_default()
        .iter()
        .filter_map(|id| std::fs::metadata(outbox.join(segment_file_name(*id))).ok())
        .map(|m| m.len())
        .sum();
    if held == 0 {
        return;
    }
    for (file, what, empty_is_loss) in [
        (crate::store::budget_memory::JOURNAL_FILE, "month spend and holds start from zero", true),
        (crate::store::approvals_memory::JOURNAL_FILE, "consumed approval tokens can be used again", false),
    ] {
        let path = data_dir.join(file);
        let lost = match std::fs::metadata(&path) {
            Err(_) => true,
            Ok(m) => empty_is_loss && m.len() == 0,
        };
        if lost {
            tracing::error!(
                path = %path.display(),
                outbox_bytes = held,
                "embedded state: this journal is missing (or empty) while the outbox holds events — the data directory \
                 lost it: {what}. Restore it from a backup (stop the sidecar first); the local ledger \
                 (GET /api/v1/enforcement/ledger) still has the settlements"
            );
        }
    }
}

impl Parts {
    /// System clock and embedded in-process state (one replica), durable in `PREAUTH_DATA_DIR`.
    pub fn embedded(config: &Config) -> Result<Parts, String> {
        warn_if_state_is_gone(&config.data_dir);
        let budgets = MemoryBudgets::open(&config.data_dir)
            .map_err(|e| format!("PREAUTH_DATA_DIR: cannot open {}: {e}", config.data_dir.display()))?;
        let approvals = MemoryApprovals::open(&config.data_dir)
            .map_err(|e| format!("PREAUTH_DATA_DIR: cannot open {}: {e}", config.data_dir.display()))?;
        let budgets = Arc::new(budgets);
        let clock = Arc::new(SystemClock);
        Ok(Parts {
            counters: Arc::new(MemoryCounters::open(&config.data_dir, clock.now_ms())),
            clock,
            budgets: budgets.clone(),
            approvals: Arc::new(approvals),
            policy: None,
            gatekeeper: None,
            health: None,
            journal: Some(budgets),
        })
    }

    /// Fleet mode: every shared state in Redis (`PREAUTH_REDIS_URL`), one store for all four
    /// traits. Redis being down at start is not fatal: the store reports unhealthy (failsafe
    /// path, `/readyz` 503) and recovers by itself.
    pub fn fleet(config: &Config, url: &str) -> Result<Parts, String> {
        let timeout = std::time::Duration::from_millis(config.store_timeout_ms);
        let rs = RedisStore::connect_blocking(url, &config.redis_key_prefix, timeout)
            .map_err(|e| format!("PREAUTH_REDIS_URL: {e}"))?;
        let policy: Arc<dyn PolicyStore> =
            rs.policy_store_blocking(config.policy.clone(), Some(config.data_dir.clone()));
        let probe = rs.clone();
        Ok(Parts {
            clock: Arc::new(SystemClock),
            counters: Arc::new(rs.clone()),
            budgets: Arc::new(rs.clone()),
            approvals: Arc::new(rs.clone()),
            gatekeeper: Some(Arc::new(rs)),
            policy: Some(policy),
            health: Some(Arc::new(move || probe.healthy())),
            journal: None,
        })
    }

    /// Embedded or fleet, as the configuration says.
    pub fn from_config(config: &Config) -> Result<Parts, String> {
        match config.redis_url.as_deref() {
            Some(url) => Parts::fleet(config, url),
            None => Parts::embedded(config),
        }
    }
}

/// Builds the sidecar with the system clock and the configured state (embedded or Redis).
pub fn build(config: Config) -> Result<Built, String> {
    let parts = Parts::from_config(&config)?;
    build_with(config, parts)
}

pub fn build_with(config: Config, parts: Parts) -> Result<Built, String> {
    let pricing = Arc::new(load_pricing(&config)?);
    let upstream_addr = resolve_upstream(&config)?;
    check_listeners(&config)?;
    let up = config.upstream.clone().expect("resolved above");

    let Parts { clock, counters, budgets, approvals, policy, gatekeeper, health, journal } = parts;
    let gatekeeper =
        gatekeeper.unwrap_or_else(|| Arc::new(Sequential { counters: counters.clone(), budgets: budgets.clone() }));
    // Embedded: the runtime policy kept in the data directory; what its start changed goes on
    // record once the ledger is open (below).
    let (policy, restarted) = match policy {
        Some(p) => (p, None),
        None => {
            let p = Arc::new(MemoryPolicy::open(&config.data_dir, config.policy.clone()));
            let changes = p.take_start_changes();
            (p as Arc<dyn PolicyStore>, changes)
        }
    };
    let listen = config.listen_addr.to_string();
    let admin_addr = config.admin_addr.to_string();
    let threads = config.threads;
    let mut outbox = Outbox::open_from_config(&config)
        .map_err(|e| format!("PREAUTH_DATA_DIR: cannot open the outbox in {}: {e}", config.data_dir.display()))?;
    // The hot path stages its journal and outbox lines; the group commit writes them together.
    let stage_counter = Arc::new(StageCounter::default());
    outbox.group_commit(stage_counter.clone());
    let outbox = Arc::new(outbox);
    let mut logs: Vec<Arc<dyn Staged>> = Vec::new();
    if let Some(j) = journal {
        j.group_commit(stage_counter.clone());
        logs.push(j);
    }
    logs.push(outbox.clone());
    let group = Arc::new(GroupCommit::new(logs, stage_counter));
    let (ledger, sink): (LedgerSource, Option<Arc<dyn Sink>>) = match config.ledger_url.as_deref() {
        Some(url) if is_postgres_url(url) => {
            let pg = Arc::new(PostgresSink::new(url).map_err(|e| format!("PREAUTH_LEDGER_URL: {e}"))?);
            (LedgerSource::Postgres(pg.clone()), Some(pg))
        }
        Some(url) => (
            LedgerSource::Local(outbox.dir().to_path_buf()),
            Some(sink_from_url(url, &config.instance_id).map_err(|e| format!("PREAUTH_LEDGER_URL: {e}"))?),
        ),
        None => (LedgerSource::Local(outbox.dir().to_path_buf()), None),
    };
    let state = Arc::new(AppState::new(
        config,
        Stores { policy, gatekeeper, counters, budgets, approvals },
        Ledger { outbox: outbox.clone(), source: ledger, group: group.clone() },
        clock,
        pricing,
    ));
    if let Some(changes) = restarted {
        let version = state.policy.current().version;
        state.record_runtime_change(version, RESTART_REASON, changes, serde_json::Map::new());
    }

    let conf = ServerConf {
        threads,
        // The drain happens before pingora hears of the signal (`Draining`): nothing is left
        // to wait for once it does.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(5),
        work_stealing: work_stealing(threads),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let proxy = PreauthProxy::new(state.clone(), upstream_addr, up.tls, &up.host, up.port);
    // HTTP/1 requests take the lean driver; h2c sessions go to pingora's proxy (same phases).
    let mut h2 = pingora::proxy::http_proxy(&server.configuration, proxy.clone());
    let mut opts = HttpServerOptions::default();
    opts.h2c = true;
    // As the HTTP/1 driver: an h2c connection without a stream for 60 s is closed (without it, idle
    // connections stayed open until the process ran out of file descriptors).
    opts.h2_idle_timeout = Some(H2_IDLE_TIMEOUT);
    h2.server_options = Some(opts);
    // nginx's default: one connection cannot open streams without bound.
    let mut h2_options = pingora::protocols::http::v2::server::H2Options::new();
    h2_options.max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS);
    // Request heads as large as the HTTP/1 driver takes, not h2's default 16 MiB (HPACK lets a
    // few kilobytes on the wire decode to that).
    h2_options.max_header_list_size(crate::proxy::h1::wire::MAX_HEAD_BYTES as u32);
    h2.h2_options = Some(h2_options);
    let mut svc = Service::new("preauth proxy".to_string(), LeanH1::new(h2, proxy));
    // Unbuffered: the HTTP/1 driver keeps its own buffers (pingora's default 64 KiB read buffer
    // per connection would copy every byte once more), and h2 frames its own.
    svc.add_listener(ListenerConfig::tcp(listen.as_str()).l4_buffer(L4BufferSettings::unbuffered()));

    let mut admin = Service::new("preauth admin".to_string(), AdminApp::new(state.clone()));
    admin.add_tcp(&admin_addr);
    admin.threads = Some(1);

    let mut housekeeper = background_service("housekeeper", Housekeeper { state: state.clone(), health });
    housekeeper.threads = Some(1);
    let mut reloader = background_service("reloader", Reloader { state: state.clone() });
    reloader.threads = Some(1);

    let mut syncer = background_service(
        "outbox-syncer",
        OutboxSyncer::new(outbox.clone(), Some(OutboxMetrics::new(&state.metrics))).with_group(group),
    );
    syncer.threads = Some(1);
    server.add_service(syncer);
    if let Some(sink) = sink {
        let mut relay = background_service("ledger-relay", Relay::new(outbox, sink));
        relay.threads = Some(1);
        server.add_service(relay);
    }
    server.add_service(svc);
    server.add_service(admin);
    server.add_service(housekeeper);
    server.add_service(reloader);
    Ok(Built { server, state })
}

/// The lock file that makes a data directory one process's (`PREAUTH_DATA_DIR/.lock`).
pub const DATA_DIR_LOCK: &str = ".lock";

/// Takes `dir` (created if missing) for this process: an exclusive lock on its `.lock` file,
/// holding this process's id, kept until the returned file is dropped (the process exits). A
/// second process on the same directory would rewrite the journals under the first one, whose
/// later writes then go to deleted files (lost at its next restart): it is refused instead, with
/// the holder's pid.
pub fn lock_data_dir(dir: &std::path::Path) -> Result<nix::fcntl::Flock<std::fs::File>, String> {
    use nix::fcntl::{Flock, FlockArg};
    use std::io::{Read, Seek, Write};
    let cannot = |e: std::io::Error| format!("PREAUTH_DATA_DIR {}: cannot lock {DATA_DIR_LOCK}: {e}", dir.display());
    std::fs::create_dir_all(dir).map_err(cannot)?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(DATA_DIR_LOCK))
        .map_err(cannot)?;
    let mut f = match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        Ok(locked) => locked,
        Err((mut f, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            return Err(format!(
                "PREAUTH_DATA_DIR {} is in use by another preauth-sidecar process (pid {}): one process per data \
                 directory; give each replica its own, or stop the other one",
                dir.display(),
                holder.trim()
            ));
        }
        Err((_, errno)) => return Err(cannot(errno.into())),
    };
    f.set_len(0).and_then(|()| f.rewind()).and_then(|()| write!(f, "{}", std::process::id())).map_err(cannot)?;
    Ok(f)
}

/// Whether pingora runs each service on a work-stealing runtime. With one thread there is nothing
/// to steal from: a single-threaded runtime then drives the same tasks with less per-wake-up work
/// (no shared run queues, no atomics on the hand-off), about 5% less CPU per request on the
/// embedded JSON path and 10% on the Redis one (README, Performance). With more threads each keeps
/// stealing, so that a few busy connections still spread over every thread.
///
/// One server per process: pingora finds its single-threaded runtimes through a thread-local
/// keyed by thread ids, which are reused once a thread exits. A process that stops such a server
/// and then starts another can hand the new one a runtime that is gone (the binary never does;
/// in-process tests keep to more threads and run `PREAUTH_THREADS=1` through the binary).
fn work_stealing(threads: usize) -> bool {
    threads > 1
}

/// The process's signals, with a drain on `SIGTERM` before pingora stops: `/readyz` answers
/// 503, connections close after their current request, and the signal reaches pingora once no
/// request is in flight (at most [`GRACE_PERIOD_SECONDS`]). `SIGINT` stops at once, `SIGQUIT`
/// is pingora's graceful upgrade.
pub struct Draining(pub Arc<AppState>);

#[async_trait]
impl ShutdownSignalWatch for Draining {
    async fn recv(&self) -> ShutdownSignal {
        let signal = pingora::server::UnixShutdownSignalWatch.recv().await;
        if let ShutdownSignal::GracefulTerminate = signal {
            self.0.set_ready(false);
            let t0 = std::time::Instant::now();
            let cut = self.0.drain.drain(std::time::Duration::from_secs(GRACE_PERIOD_SECONDS)).await;
            tracing::info!(elapsed_ms = t0.elapsed().as_millis() as u64, cut, "drained; stopping");
        }
        signal
    }
}

struct NotifyShutdown(Arc<Notify>);

#[async_trait]
impl ShutdownSignalWatch for NotifyShutdown {
    async fn recv(&self) -> ShutdownSignal {
        self.0.notified().await;
        ShutdownSignal::FastShutdown
    }
}

/// A sidecar running on its own thread.
pub struct RunningServer {
    stop: Arc<Notify>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub state: Arc<AppState>,
}

impl RunningServer {
    /// Fast shutdown; returns once every service stopped.
    pub fn stop(mut self) {
        self.stop.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs a built server until it stops (on this thread; pingora builds its own runtimes, so never
/// from inside one), then writes the embedded counters' daily request counts a last time: every
/// service has stopped, nothing is admitted any more. The housekeeper wrote them when shutdown
/// began, but pingora tells services of a `SIGINT` only by stopping their runtimes.
pub fn run(built: Built, args: RunArgs) {
    let Built { server, state } = built;
    server.run(args);
    crate::worker::persist_daily(&state);
}

/// Runs a built server on a dedicated thread ([`run`]). Stop it with [`RunningServer::stop`].
pub fn spawn(built: Built) -> RunningServer {
    let stop = Arc::new(Notify::new());
    let signal = stop.clone();
    let state = built.state.clone();
    let thread = std::thread::Builder::new()
        .name("preauth-server".into())
        .spawn(move || run(built, RunArgs { shutdown_signal: Box::new(NotifyShutdown(signal)) }))
        .expect("spawn server thread");
    RunningServer { stop, thread: Some(thread), state }
}
