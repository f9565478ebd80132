//! Fleet mode: every store trait backed by one shared Redis (or Redis Cluster), so many replicas
//! enforce one global cap, one budget per tenant, single-use approval tokens and one runtime
//! policy (CONTRACT §2 `PREAUTH_REDIS_URL`).
//!
//! # One handle, four trait objects
//! [`RedisStore`] is a cheap, cloneable handle that implements [`Counters`](super::Counters),
//! [`Budgets`](super::budget::Budgets) and [`Approvals`](super::approvals::Approvals);
//! [`RedisStore::policy_store`] makes the [`PolicyStore`](super::PolicyStore) ([`RedisPolicy`]).
//!
//! # Keys (all under the prefix `P` = `PREAUTH_REDIS_KEY_PREFIX`)
//! Redis Cluster hash tags keep what one script touches in one slot:
//! - tenant counters, tag `{<tenant>}`: `P t:{T}:minute` (zset seq → ms), `…:tokens` (zset
//!   `seq:n` → ms) and `…:tokens_sum`, `…:day:<YYYYMMDD>` (counter), `…:leases` (zset seq → expiry),
//!   `…:gate_lease:<reservation id>` (a gate-API hold's lease seq, so any replica frees it);
//! - global counters, tag `{global}`: `P{global}:window` (zset `seq|tenant` → ms),
//!   `P{global}:window_tenants` (hash tenant → entries), `P{global}:block`, `P{global}:seq`,
//!   and the runtime policy `P{global}:policy` (JSON) published on channel `P policy`;
//! - budgets, tag `{budget}`: `P{budget}:s:<tenant>:<YYYY-MM>` (hash spent/reserved/active),
//!   `P{budget}:r:<id>` (reservation record), `P{budget}:active` (zset id → created_at);
//! - approvals, tag `{approvals}`: `P{approvals}:a:<id>`, `…:by_created`, `…:pending`,
//!   `…:pkey:<tenant>\n<fingerprint>`, and consumed token ids `P{approvals}:jti:<jti>`.
//!
//! A tenant name that is empty or contains `{`, `}` or `%` is percent-encoded in its tag
//! (injective, so tenants never share keys). TTLs (server clock) bound every key that can be
//! orphaned: windows 120 s after the last write, day counters 2 days after their first count,
//! leases (and a gate-API hold's parked lease) their TTL + 60 s, month spend 70 days after its first reservation (or last `charge`),
//! active reservation records 35 days, finished ones 24 h (and the list indexing them is
//! refreshed at least every 1,000 appends), consumed token ids until the token's `exp` + 5 min,
//! approvals 24 h after they end. A TTL is set only when it must move: the scripts make one
//! call to Redis fewer per request for each TTL they leave alone (each call costs redis-server
//! about 1.5 µs of CPU).
//! Everything the logic compares uses the caller's injected `now`, never the server clock.
//!
//! Budgets and approvals each live in one slot (`{budget}`, `{approvals}`): settling by id must
//! find the record and the tenant's month in one atomic script without knowing the tenant. In
//! a cluster that puts all budget traffic on one shard (one reserve and one settle script per
//! request), which a single shard serves well beyond typical sidecar fleets.
//!
//! # Round trips
//! Single node: `admit` is one `EVALSHA` (global window + tenant windows + day + lease, atomic),
//! `reserve` one, `settle` one. Cluster: the global and the tenant halves of `admit` are two
//! scripts in two slots, sent concurrently (two commands, about one round trip of latency); the
//! sequence then is a random 53-bit number (unique per tenant with overwhelming probability;
//! global members carry the tenant too) instead of the single-node `INCR`.
//!
//! # Failures
//! Every operation is bounded by `op_timeout` (`PREAUTH_STORE_TIMEOUT_MS`) → `StoreError::Timeout`;
//! other errors → `StoreError::Unavailable`. A command whose answer is no longer awaited still runs
//! in Redis: the admission (counts, lease, hold) therefore runs in a task of its own to the end
//! ([`RedisStore::exec_undoable`]), and when nobody takes its answer (the timeout, or the caller's
//! own deadline) that task gives back what it took, so a request answered on the failsafe path
//! holds and counts nothing. A [`Breaker`] fails calls in microseconds while
//! Redis is down; a background task on the store's own runtime pings every 500 ms (probing the
//! half-open breaker, so recovery is noticed without traffic) and replaces the connection once
//! per breaker opening (a connection wedged by a silent network loss cannot survive). The
//! connection manager reconnects on I/O errors on its own, and only on those: a caller's own
//! connection whose reconnect failed otherwise (`WRONGPASS` while a password changes) is set
//! aside at its first such error and the health task has every caller connect afresh once the
//! breaker is closed. [`RedisStore::healthy`] feeds
//! readiness; [`RedisStore::error_counts`] counts failures per operation.
//!
//! The store owns a small tokio runtime (one worker, `preauth-redis`) that hosts the shared
//! connection's driver, reconnects, the health task and the policy sync. On a single node, each
//! thread of another runtime (the proxy's) sends its commands on a connection of its own whose
//! driver runs on that runtime (`caller_conn`): no cross-thread wake-up per round trip (−36% CPU
//! per request on the Redis row of the load benchmark). A breaker opening replaces them all.
//!
//! Owns: `RedisStore`, key layout, Lua scripts (`scripts/`). Imports: store traits, `decide`
//! types, `telemetry::EverySecond` and `clock::SystemClock` (log pacing), redis, tokio, parking_lot,
//! serde_json, uuid, tracing.

mod approvals;
pub mod breaker;
mod budgets;
mod counters;
mod policy;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Script, Value};

pub use breaker::{Breaker, BreakerConfig, BreakerState};
pub use policy::{OutboxBehind, RedisPolicy};

use super::StoreError;

/// How often the health task pings (and probes a half-open breaker).
const HEALTH_INTERVAL: Duration = Duration::from_millis(500);
/// Bound on establishing a connection (initial and replacement).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Waits between attempts to give back what a step nobody waited for took: the breaker may be
/// open while Redis recovers (its health probe closes it within about a second).
/// ≈ 2 minutes in all: a Redis restart or failover, within the concurrency lease's default TTL.
const UNDO_WAITS: [Duration; 8] = [
    Duration::from_millis(250),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
    Duration::from_secs(15),
    Duration::from_secs(30),
    Duration::from_secs(60),
];

/// Runs an idempotent `step` until it succeeds, at most once more after each of [`UNDO_WAITS`].
pub(crate) async fn patiently<T, F, Fut>(mut step: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let first = step().await;
    if first.is_ok() {
        return first;
    }
    crate::store::after_each(&UNDO_WAITS, step).await.unwrap_or(first)
}

/// Default of [`RedisOptions::max_finished`] (≈ 50 MB of Redis memory at ≈ 0.5 KB a record).
const MAX_FINISHED: u64 = 100_000;

/// Tuning beyond the URL, prefix and timeout (defaults are production values).
#[derive(Clone, Debug)]
pub struct RedisOptions {
    pub breaker: BreakerConfig,
    /// Wait for the first connection in `connect` up to this long (an unreachable Redis does not
    /// fail `connect`: the store starts unhealthy and recovers on its own).
    pub connect_wait: Duration,
    /// Settled and released reservations remembered (fleet-wide; a second settle of one of them
    /// is refused as not active, of an older one as unknown): at most this many plus a trimming
    /// batch of a thousandth of it. Default 100,000: Redis memory must not grow with request
    /// volume, so at high rates records age out before their 24 h.
    pub max_finished: u64,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions { breaker: BreakerConfig::default(), connect_wait: CONNECT_TIMEOUT, max_finished: MAX_FINISHED }
    }
}

/// A connection to a single node or to a cluster; both speak `ConnectionLike`.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Where to connect.
#[derive(Clone)]
enum Target {
    Single(redis::Client),
    /// The cluster, and a plain client for its first seed (pub/sub is cluster-wide).
    Cluster(Box<ClusterClient>, redis::Client),
}

/// The Lua scripts, each with the library it needs prepended.
pub(crate) struct Scripts {
    pub admit: Script,
    pub admit_global: Script,
    pub admit_tenant: Script,
    pub rollback: Script,
    pub rollback_global: Script,
    pub rollback_tenant: Script,
    pub global_view: Script,
    pub tenant_view: Script,
    pub set_block: Script,
    pub release_parked: Script,
    pub reserve: Script,
    pub finish: Script,
    pub expire: Script,
    pub claim: Script,
    pub charge: Script,
    pub active: Script,
    pub approval_create: Script,
    pub approval_decide: Script,
    pub approval_consume: Script,
    pub approval_list: Script,
    pub policy_cas: Script,
}

impl Scripts {
    fn new() -> Scripts {
        let counters = include_str!("scripts/counters_lib.lua");
        let budget = include_str!("scripts/budget_lib.lua");
        let approvals = include_str!("scripts/approvals_lib.lua");
        let with = |lib: &str, body: &str| Script::new(&format!("{lib}\n{body}"));
        Scripts {
            admit: with(counters, include_str!("scripts/admit.lua")),
            admit_global: with(counters, include_str!("scripts/admit_global.lua")),
            admit_tenant: with(counters, include_str!("scripts/admit_tenant.lua")),
            rollback: with(counters, include_str!("scripts/rollback.lua")),
            rollback_global: with(counters, include_str!("scripts/rollback_global.lua")),
            rollback_tenant: with(counters, include_str!("scripts/rollback_tenant.lua")),
            global_view: with(counters, include_str!("scripts/global_view.lua")),
            tenant_view: with(counters, include_str!("scripts/tenant_view.lua")),
            set_block: with(counters, include_str!("scripts/set_block.lua")),
            release_parked: Script::new(include_str!("scripts/release_parked.lua")),
            reserve: with(budget, include_str!("scripts/reserve.lua")),
            finish: with(budget, include_str!("scripts/finish.lua")),
            claim: with(budget, include_str!("scripts/claim.lua")),
            charge: with(budget, include_str!("scripts/charge.lua")),
            expire: with(budget, include_str!("scripts/expire.lua")),
            active: with(budget, include_str!("scripts/active.lua")),
            approval_create: with(approvals, include_str!("scripts/approval_create.lua")),
            approval_decide: with(approvals, include_str!("scripts/approval_decide.lua")),
            approval_consume: with(approvals, include_str!("scripts/approval_consume.lua")),
            approval_list: with(approvals, include_str!("scripts/approval_list.lua")),
            policy_cas: Script::new(include_str!("scripts/policy_cas.lua")),
        }
    }

    fn all(&self) -> [&Script; 19] {
        [
            &self.admit,
            &self.admit_global,
            &self.admit_tenant,
            &self.rollback,
            &self.rollback_global,
            &self.rollback_tenant,
            &self.global_view,
            &self.tenant_view,
            &self.set_block,
            &self.release_parked,
            &self.reserve,
            &self.finish,
            &self.expire,
            &self.active,
            &self.approval_create,
            &self.approval_decide,
            &self.approval_consume,
            &self.approval_list,
            &self.policy_cas,
        ]
    }
}

/// Key names (see the module docs).
pub(crate) struct Keys {
    prefix: String,
}

impl Keys {
    /// The hash-tag content for a tenant: the name itself, or percent-encoded when it is empty or
    /// holds a character that would end the tag early (`{`, `}`) or the escape (`%`).
    fn tenant_tag(tenant: &str) -> std::borrow::Cow<'_, str> {
        if tenant.is_empty() {
            return "%00".into();
        }
        if !tenant.contains(['{', '}', '%']) {
            return tenant.into();
        }
        let mut s = String::with_capacity(tenant.len() + 8);
        for c in tenant.chars() {
            match c {
                '{' => s.push_str("%7B"),
                '}' => s.push_str("%7D"),
                '%' => s.push_str("%25"),
                c => s.push(c),
            }
        }
        s.into()
    }

    /// `P` `t:{tag}:` `name` (built by hand: several per request, `format!` is slow here).
    pub fn tenant(&self, tenant: &str, name: &str) -> String {
        let tag = Self::tenant_tag(tenant);
        let mut s = String::with_capacity(self.prefix.len() + tag.len() + name.len() + 5);
        s.push_str(&self.prefix);
        s.push_str("t:{");
        s.push_str(&tag);
        s.push_str("}:");
        s.push_str(name);
        s
    }

    pub fn global(&self, name: &str) -> String {
        let mut s = String::with_capacity(self.prefix.len() + name.len() + 9);
        s.push_str(&self.prefix);
        s.push_str("{global}:");
        s.push_str(name);
        s
    }

    /// The base of every budget key (`P{budget}:`).
    pub fn budget_base(&self) -> String {
        format!("{}{{budget}}:", self.prefix)
    }

    /// The base of every approval key (`P{approvals}:`).
    pub fn approvals_base(&self) -> String {
        format!("{}{{approvals}}:", self.prefix)
    }

    pub fn policy_channel(&self) -> String {
        format!("{}policy", self.prefix)
    }
}

/// Failures per operation name (for metrics and tests; the proxy also counts its own).
#[derive(Default)]
struct ErrorCounts {
    by_op: Mutex<HashMap<&'static str, u64>>,
}

impl ErrorCounts {
    fn add(&self, op: &'static str) {
        *self.by_op.lock().entry(op).or_insert(0) += 1;
    }
}

pub(crate) struct Inner {
    pub keys: Keys,
    pub scripts: Scripts,
    pub cluster: bool,
    op_timeout: Duration,
    target: Target,
    /// `None` until a cluster connection could be made.
    conn: RwLock<Option<Conn>>,
    breaker: Breaker,
    errors: ErrorCounts,
    /// Openings of the breaker already answered with a fresh connection.
    reset_openings: AtomicU64,
    /// Bumped by every replacement of the single-node connection: the callers' own
    /// connections ([`RedisStore::caller_conn`]) made before it are dropped and made anew.
    generation: AtomicU64,
    /// A caller's own connection is stuck: its manager failed to reconnect with an error it does
    /// not retry on its own (`WRONGPASS` after a password change, say). The health task then
    /// bumps `generation` once the breaker is closed, so every caller connects afresh.
    own_stuck: AtomicBool,
    /// Paces the log line of commands Redis refused (`NOPERM`, `OOM`…): every request may fail
    /// so, one line a second says how many it stands for.
    refused_log: crate::telemetry::EverySecond,
    /// Commands sent, for measuring round trips (a script call is one).
    commands: AtomicU64,
    /// [`RedisOptions::max_finished`].
    max_finished: u64,
    handle: tokio::runtime::Handle,
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.lock().take() {
            rt.shutdown_background();
        }
    }
}

/// The shared (fleet) store. Clone it freely; every clone shares one connection.
#[derive(Clone)]
pub struct RedisStore {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.inner.keys.prefix)
            .field("cluster", &self.inner.cluster)
            .field("op_timeout", &self.inner.op_timeout)
            .finish()
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Whether `url` is a Redis URL the store can use (parsed as at start, nothing connected), for
/// configuration checks: the message names no credential.
pub fn check_url(url: &str) -> Result<(), String> {
    match target_for(url) {
        Ok(_) => Ok(()),
        Err(e) => {
            let e = e.to_string();
            let e = e.strip_prefix("state store unavailable: ").unwrap_or(&e);
            Err(e.strip_prefix("PREAUTH_REDIS_URL: ").unwrap_or(e).to_string())
        }
    }
}

/// Parses `redis://`, `rediss://` and `redis+cluster://host:port[,host:port…]`.
fn target_for(url: &str) -> Result<Target, StoreError> {
    let bad = |e: RedisError| StoreError::Unavailable(format!("PREAUTH_REDIS_URL: {e}"));
    if let Some(rest) = url.strip_prefix("redis+cluster://") {
        let (auth, hosts) = match rest.rsplit_once('@') {
            Some((a, h)) => (Some(a), h),
            None => (None, rest),
        };
        let (hosts, path) = match hosts.split_once('/') {
            Some((h, p)) => (h, Some(p)),
            None => (hosts, None),
        };
        let seeds: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.trim().is_empty())
            .map(|h| {
                let mut s = String::from("redis://");
                if let Some(a) = auth {
                    s.push_str(a);
                    s.push('@');
                }
                s.push_str(h.trim());
                if let Some(p) = path {
                    s.push('/');
                    s.push_str(p);
                }
                s
            })
            .collect();
        if seeds.is_empty() {
            return Err(StoreError::Unavailable("PREAUTH_REDIS_URL: redis+cluster:// names no node".into()));
        }
        let first = redis::Client::open(seeds[0].as_str()).map_err(bad)?;
        let client =
            ClusterClient::builder(seeds).connection_timeout(CONNECT_TIMEOUT).retries(1).build().map_err(bad)?;
        return Ok(Target::Cluster(Box::new(client), first));
    }
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        return Err(StoreError::Unavailable(
            "PREAUTH_REDIS_URL: expected redis://, rediss:// or redis+cluster://".into(),
        ));
    }
    redis::Client::open(url).map(Target::Single).map_err(bad)
}

impl RedisStore {
    /// Connects with default options. Fails only on a bad URL (or when no runtime thread can be
    /// started); an unreachable Redis gives a store that starts unhealthy and recovers by itself.
    pub async fn connect(url: &str, key_prefix: &str, op_timeout: Duration) -> Result<RedisStore, StoreError> {
        Self::connect_with(url, key_prefix, op_timeout, RedisOptions::default()).await
    }

    pub async fn connect_with(
        url: &str,
        key_prefix: &str,
        op_timeout: Duration,
        opts: RedisOptions,
    ) -> Result<RedisStore, StoreError> {
        let store = Self::build(url, key_prefix, op_timeout, opts.clone())?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let s = store.clone();
        store.inner.handle.spawn(async move {
            s.establish(opts.connect_wait).await;
            let _ = tx.send(());
        });
        let _ = rx.await;
        Ok(store)
    }

    /// [`connect`](Self::connect) for synchronous callers (the composition root, before pingora
    /// starts its runtimes). Must not be called from inside an async task.
    pub fn connect_blocking(url: &str, key_prefix: &str, op_timeout: Duration) -> Result<RedisStore, StoreError> {
        let opts = RedisOptions::default();
        let store = Self::build(url, key_prefix, op_timeout, opts.clone())?;
        let s = store.clone();
        store.block_on(async move { s.establish(opts.connect_wait).await });
        Ok(store)
    }

    /// Runs `fut` on the store's own runtime and waits for its output (synchronous callers; not
    /// from inside an async task). `None`: the runtime stopped first.
    pub(crate) fn block_on<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> Option<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.inner.handle.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().ok()
    }

    fn build(url: &str, key_prefix: &str, op_timeout: Duration, opts: RedisOptions) -> Result<RedisStore, StoreError> {
        let target = target_for(url)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("preauth-redis")
            .enable_all()
            .build()
            .map_err(|e| unavailable(format!("cannot start the redis runtime: {e}")))?;
        let inner = Arc::new(Inner {
            keys: Keys { prefix: key_prefix.to_string() },
            scripts: Scripts::new(),
            cluster: matches!(target, Target::Cluster(..)),
            op_timeout: op_timeout.max(Duration::from_millis(1)),
            target,
            conn: RwLock::new(None),
            breaker: Breaker::new(opts.breaker),
            errors: ErrorCounts::default(),
            reset_openings: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            own_stuck: AtomicBool::new(false),
            refused_log: crate::telemetry::EverySecond::default(),
            commands: AtomicU64::new(0),
            max_finished: opts.max_finished.max(1),
            handle: runtime.handle().clone(),
            runtime: Mutex::new(Some(runtime)),
        });
        let store = RedisStore { inner };
        if let Target::Single(client) = &store.inner.target {
            // Lazily connecting manager, made inside the store's runtime so its reconnects run there.
            let _guard = store.inner.handle.enter();
            let mgr = ConnectionManager::new_lazy_with_config(client.clone(), manager_config())
                .map_err(|e| unavailable(format!("redis connection manager: {e}")))?;
            *store.inner.conn.write() = Some(Conn::Single(mgr));
        }
        let weak = Arc::downgrade(&store.inner);
        store.inner.handle.spawn(health_task(weak));
        Ok(store)
    }

    /// First connection (on the store runtime): connect, load the scripts, count the outcome.
    async fn establish(&self, wait: Duration) {
        let ok = tokio::time::timeout(wait, async {
            if self.inner.conn.read().is_none() {
                self.replace_connection().await?;
            }
            let mut conn = self.inner.conn.read().clone().ok_or_else(|| unavailable("not connected"))?;
            redis::cmd("PING").query_async::<()>(&mut conn).await.map_err(unavailable)?;
            for s in self.inner.scripts.all() {
                s.load_async(&mut conn).await.map_err(unavailable)?;
            }
            Ok::<(), StoreError>(())
        })
        .await;
        match ok {
            Ok(Ok(())) => tracing::info!(cluster = self.inner.cluster, "connected to the shared state store (redis)"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "shared state store (redis) not reachable at start; retrying in the background");
                self.mark_down();
            }
            Err(_) => {
                tracing::warn!("shared state store (redis) did not answer at start; retrying in the background");
                self.mark_down();
            }
        }
    }

    /// Opens the breaker (start-up failure): requests fail fast until the health task's probe.
    fn mark_down(&self) {
        self.inner.breaker.force_open();
    }

    /// A fresh connection replaces the current one (single: a new lazy manager; cluster: a new
    /// cluster connection, kept only if it could be made).
    async fn replace_connection(&self) -> Result<(), StoreError> {
        match &self.inner.target {
            Target::Single(client) => {
                let mgr = {
                    let _guard = self.inner.handle.enter();
                    ConnectionManager::new_lazy_with_config(client.clone(), manager_config())
                        .map_err(|e| unavailable(format!("redis connection manager: {e}")))?
                };
                *self.inner.conn.write() = Some(Conn::Single(mgr));
                self.inner.generation.fetch_add(1, Ordering::Release);
                Ok(())
            }
            Target::Cluster(client, _) => {
                let c = tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_connection())
                    .await
                    .map_err(|_| StoreError::Timeout)?
                    .map_err(unavailable)?;
                *self.inner.conn.write() = Some(Conn::Cluster(c));
                Ok(())
            }
        }
    }

    /// Connects afresh and sends `PING`, outside the breaker, and says why that failed (refused,
    /// timed out, `WRONGPASS`…; no credential in the text): for command-line tools, whose
    /// operator needs the cause rather than "circuit open". Synchronous, like `connect_blocking`.
    pub fn probe_blocking(&self) -> Result<(), String> {
        let target = self.inner.target.clone();
        let probe = async move {
            let ping = async {
                match target {
                    Target::Single(client) => {
                        let mut c = client.get_multiplexed_async_connection().await?;
                        redis::cmd("PING").query_async::<()>(&mut c).await
                    }
                    Target::Cluster(cluster, _) => {
                        let mut c = cluster.get_async_connection().await?;
                        redis::cmd("PING").query_async::<()>(&mut c).await
                    }
                }
            };
            match tokio::time::timeout(CONNECT_TIMEOUT, ping).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {} s", CONNECT_TIMEOUT.as_secs())),
            }
        };
        self.block_on(probe).unwrap_or_else(|| Err("the store's runtime stopped".into()))
    }

    /// Whether the store is usable: the breaker is closed (fewer than the threshold of
    /// consecutive failures). Feed it to readiness.
    pub fn healthy(&self) -> bool {
        self.inner.breaker.is_closed()
    }

    pub fn breaker_state(&self) -> BreakerState {
        self.inner.breaker.state()
    }

    /// Failed operations so far, by operation name.
    pub fn error_counts(&self) -> Vec<(&'static str, u64)> {
        let mut v: Vec<_> = self.inner.errors.by_op.lock().iter().map(|(k, v)| (*k, *v)).collect();
        v.sort();
        v
    }

    /// Commands sent to Redis so far (a script call or a pipeline is one round trip).
    pub fn commands_sent(&self) -> u64 {
        self.inner.commands.load(Ordering::Relaxed)
    }

    pub fn is_cluster(&self) -> bool {
        self.inner.cluster
    }

    pub fn key_prefix(&self) -> &str {
        &self.inner.keys.prefix
    }

    /// Runs one store operation: breaker, timeout, error mapping, accounting. `round_trips` is
    /// how many commands `f` sends (for [`commands_sent`](Self::commands_sent)).
    pub(crate) async fn exec<T, F, Fut>(&self, op: &'static str, round_trips: u64, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let Some(permit) = self.inner.breaker.try_acquire() else {
            self.inner.errors.add(op);
            return Err(StoreError::Unavailable("circuit open".into()));
        };
        let Some((conn, own_ready)) = self.caller_conn() else {
            permit.failure();
            self.inner.errors.add(op);
            return Err(StoreError::Unavailable("not connected".into()));
        };
        self.inner.commands.fetch_add(round_trips, Ordering::Relaxed);
        match tokio::time::timeout(self.inner.op_timeout, f(conn)).await {
            Ok(Ok(v)) => {
                permit.success();
                Ok(v)
            }
            Ok(Err(e)) => {
                self.inner.errors.add(op);
                if is_connectivity(&e) {
                    permit.failure();
                    if let Some(ready) = own_ready.filter(|_| stuck(&e)) {
                        // This thread takes the shared connection until the health task has
                        // every caller connect afresh.
                        ready.store(false, Ordering::Release);
                        self.inner.own_stuck.store(true, Ordering::Release);
                    }
                } else {
                    // Redis answered (a script or data error): not a reason to stop talking to it.
                    permit.success();
                    let now_s = crate::clock::Clock::now_ms(&crate::clock::SystemClock) / 1000;
                    if let Some(not_logged) = self.inner.refused_log.pass(now_s) {
                        tracing::error!(
                            op,
                            error = %e,
                            not_logged,
                            "state store command refused by Redis (every failure: preauth_store_errors_total{{op}}); \
                             check the ACL user's permissions and Redis' memory (maxmemory)"
                        );
                    }
                }
                Err(if e.is_timeout() { StoreError::Timeout } else { unavailable(format!("{op}: {e}")) })
            }
            Err(_) => {
                permit.failure();
                self.inner.errors.add(op);
                Err(StoreError::Timeout)
            }
        }
    }

    /// [`Self::exec`] for a step with effects that a caller who stops waiting must not keep (an
    /// admission: counts, a lease, a hold). The commands `f` sends run in a task of their own to
    /// the end; whoever finds their answer unclaimed — the task, when the caller is gone (the
    /// store timeout, or the caller's own deadline, dropped it) before the answer came, or the
    /// caller's dropped [`Answer`] when it came but was not taken — runs `undo` on it.
    pub(crate) async fn exec_undoable<T, F, Fut, U, UFut>(
        &self,
        op: &'static str,
        round_trips: u64,
        f: F,
        undo: U,
    ) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>> + Send + 'static,
        U: FnOnce(T) -> UFut + Send + 'static,
        UFut: Future<Output = ()> + Send + 'static,
    {
        self.exec(op, round_trips, |conn| {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let undo: Undo<T> = Box::new(move |t| Box::pin(undo(t)));
            let undo = Arc::new(Mutex::new(Some(undo)));
            let running = f(conn);
            let task_undo = undo.clone();
            tokio::spawn(async move {
                if let Err(Ok(unclaimed)) = tx.send(running.await) {
                    let undo = task_undo.lock().take();
                    if let Some(undo) = undo {
                        undo(unclaimed).await;
                    }
                }
            });
            Answer { rx, undo }
        })
        .await
    }

    /// Releases hold `id` (idempotent), again while Redis does not take it ([`patiently`]); a
    /// failure is logged and left to the sweep.
    pub(crate) async fn release_patiently(&self, id: &str, now: crate::decide::UnixMillis) {
        use crate::store::budget::Budgets;
        if let Err(e) = patiently(|| self.release(id, now)).await {
            tracing::warn!(error = %e, reservation_id = %id, "a hold nobody waited for could not be released; the sweep will");
        }
    }

    /// The connection a command is sent on. Single node, called from a runtime other than the
    /// store's (the proxy's): this thread's own connection to the same node, so that its driver
    /// runs on the caller's runtime. A command then goes out and its reply comes back without
    /// waking the store's thread (two cross-thread wake-ups per round trip otherwise). It is made
    /// on the thread's first command and connects in the background ([`warm_up`]); until it
    /// answers, commands take the shared connection, so no request waits for a connect. Cluster,
    /// or on the store's runtime: the shared connection. `None`: not connected. With it, the
    /// `ready` flag of the caller's own connection when that is the one returned.
    fn caller_conn(&self) -> Option<(Conn, Option<Arc<AtomicBool>>)> {
        /// This thread's connection to one store: made on `runtime`, for connection `generation`.
        struct Own {
            store: Weak<Inner>,
            runtime: tokio::runtime::Id,
            generation: u64,
            conn: Conn,
            ready: Arc<AtomicBool>,
        }
        thread_local! {
            static OWN: std::cell::RefCell<Vec<Own>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        // Read (a lock and a clone) only when it is the answer.
        let shared = || self.inner.conn.read().clone().map(|c| (c, None));
        let Target::Single(client) = &self.inner.target else { return shared() };
        let runtime = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.id() != self.inner.handle.id() => h,
            _ => return shared(),
        };
        let generation = self.inner.generation.load(Ordering::Acquire);
        OWN.with_borrow_mut(|own| {
            own.retain(|o| o.store.strong_count() > 0);
            let slot = own.iter().position(|o| std::ptr::eq(o.store.as_ptr(), Arc::as_ptr(&self.inner)));
            if let Some(i) = slot {
                let o = &own[i];
                if o.runtime == runtime.id() && o.generation == generation {
                    return if o.ready.load(Ordering::Acquire) {
                        Some((o.conn.clone(), Some(o.ready.clone())))
                    } else {
                        shared()
                    };
                }
                // Replaced, or made on a runtime this thread no longer runs.
                own.swap_remove(i);
            }
            // Lazy: connects (and later reconnects) on this runtime when first used.
            let Ok(mgr) = ConnectionManager::new_lazy_with_config(client.clone(), manager_config()) else {
                return shared();
            };
            let ready = Arc::new(AtomicBool::new(false));
            runtime.spawn(warm_up(Arc::downgrade(&self.inner), generation, mgr.clone(), ready.clone()));
            own.push(Own {
                store: Arc::downgrade(&self.inner),
                runtime: runtime.id(),
                generation,
                conn: Conn::Single(mgr),
                ready,
            });
            shared()
        })
    }

    /// Deletes every key under this store's prefix (tests, `rebuild` tooling). SCAN + DEL; single
    /// node only.
    pub async fn delete_all_keys(&self) -> Result<u64, StoreError> {
        let pattern = format!("{}*", glob_escape(&self.inner.keys.prefix));
        let (mut conn, _) = self.caller_conn().ok_or_else(|| unavailable("not connected"))?;
        let mut cursor: u64 = 0;
        let mut deleted = 0;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if !keys.is_empty() {
                deleted += redis::cmd("DEL").arg(&keys).query_async::<u64>(&mut conn).await.map_err(unavailable)?;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }
}

fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn manager_config() -> ConnectionManagerConfig {
    // Short, bounded reconnect attempts: the breaker and the health task decide when to retry.
    ConnectionManagerConfig::new()
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_millis(250))
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(None)
}

/// Errors that mean "cannot talk to Redis" (count towards opening the breaker).
fn is_connectivity(e: &RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.kind(),
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::ReadOnly
            ) | ErrorKind::Client
                | ErrorKind::AuthenticationFailed
                | ErrorKind::ClusterConnectionNotFound
        )
}

/// Whether a connection manager that gave `e` is stuck: its reconnect failed with an error
/// it does not retry on its own (only I/O errors trigger another attempt), so every command on
/// it fails the same way until it is replaced.
fn stuck(e: &RedisError) -> bool {
    is_connectivity(e) && !e.is_io_error() && !e.is_connection_dropped() && !e.is_timeout()
}

/// Connects a caller's own connection ([`RedisStore::caller_conn`]) and marks it `ready` once it
/// answers a PING (retried every [`HEALTH_INTERVAL`]), then keeps it alive with a PING every
/// [`HEALTH_INTERVAL`]: a Redis `timeout` or a NAT / load balancer idle timer would otherwise close
/// a quiet replica's connections, and the first request after the quiet spell would meet the
/// closed one and take the failsafe path. Ends when its store goes or replaces its connections.
async fn warm_up(store: Weak<Inner>, generation: u64, mut conn: ConnectionManager, ready: Arc<AtomicBool>) {
    loop {
        let ping = redis::cmd("PING");
        let answer = tokio::time::timeout(CONNECT_TIMEOUT, ping.query_async::<()>(&mut conn)).await;
        if let Ok(Ok(())) = answer {
            ready.store(true, Ordering::Release);
        }
        match store.upgrade() {
            Some(inner) if inner.generation.load(Ordering::Acquire) == generation => {
                if let Ok(Err(e)) = &answer {
                    if stuck(e) {
                        // This manager will not connect again: a new generation will.
                        ready.store(false, Ordering::Release);
                        inner.own_stuck.store(true, Ordering::Release);
                        return;
                    }
                    // Otherwise (an I/O error) the manager reconnects by itself.
                }
            }
            _ => return,
        }
        tokio::time::sleep(HEALTH_INTERVAL).await;
    }
}

/// Pings every [`HEALTH_INTERVAL`]; replaces the connection once per breaker opening; the ping
/// is the half-open probe, so recovery is noticed without traffic. Ends with the store.
async fn health_task(weak: Weak<Inner>) {
    let mut tick = tokio::time::interval(HEALTH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = weak.upgrade() else { return };
        let store = RedisStore { inner };
        let openings = store.inner.breaker.openings();
        let need_reset = store.inner.conn.read().is_none()
            || (!store.inner.breaker.is_closed() && store.inner.reset_openings.load(Ordering::Relaxed) < openings);
        if need_reset && store.inner.breaker.state() != BreakerState::Open {
            store.inner.reset_openings.store(openings, Ordering::Relaxed);
            if let Err(e) = store.replace_connection().await {
                tracing::debug!(error = %e, "state store reconnect failed");
            }
        }
        if store.inner.breaker.state() == BreakerState::Open {
            continue;
        }
        if store.inner.breaker.is_closed() && store.inner.own_stuck.swap(false, Ordering::AcqRel) {
            // Callers' own connections that will not reconnect by themselves: all made anew
            // (they take the shared connection, which answers, until theirs does).
            store.inner.generation.fetch_add(1, Ordering::Release);
        }
        let _ = store.exec("ping", 0, |mut c| async move { redis::cmd("PING").query_async::<()>(&mut c).await }).await;
    }
}

/// The answer of a step run by [`RedisStore::exec_undoable`], awaited. Dropped before it was
/// taken (the store timeout, or the caller's deadline), it closes the channel: an answer that had
/// come already is undone here, one still to come by the task that runs the step.
struct Answer<T> {
    rx: tokio::sync::oneshot::Receiver<RedisResult<T>>,
    undo: Arc<Mutex<Option<Undo<T>>>>,
}

/// Gives back what an unclaimed answer took.
type Undo<T> = Box<dyn FnOnce(T) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

impl<T> Future for Answer<T> {
    type Output = RedisResult<T>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.rx).poll(cx).map(|r| {
            r.unwrap_or_else(|_| Err(RedisError::from((redis::ErrorKind::Client, "the store step's task ended"))))
        })
    }
}

impl<T> Drop for Answer<T> {
    fn drop(&mut self) {
        self.rx.close();
        let Ok(Ok(unclaimed)) = self.rx.try_recv() else { return };
        let Some(undo) = self.undo.lock().take() else { return };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(undo(unclaimed));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reply decoding helpers.

pub(crate) fn proto(msg: impl Into<String>) -> RedisError {
    RedisError::from((redis::ErrorKind::Parse, "unexpected reply from a preauth script", msg.into()))
}

pub(crate) fn as_i64(v: &Value) -> RedisResult<i64> {
    match v {
        Value::Int(i) => Ok(*i),
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
            .ok_or_else(|| proto(format!("not an integer: {:?}", String::from_utf8_lossy(b)))),
        Value::SimpleString(s) => s.parse::<i64>().map_err(|_| proto(format!("not an integer: {s:?}"))),
        other => Err(proto(format!("not an integer: {other:?}"))),
    }
}

pub(crate) fn as_string(v: &Value) -> RedisResult<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).map_err(|_| proto("not UTF-8")),
        Value::SimpleString(s) => Ok(s.clone()),
        Value::Int(i) => Ok(i.to_string()),
        other => Err(proto(format!("not a string: {other:?}"))),
    }
}

pub(crate) fn as_array(v: Value) -> RedisResult<Vec<Value>> {
    match v {
        Value::Array(a) | Value::Set(a) => Ok(a),
        Value::Nil => Ok(Vec::new()),
        other => Err(proto(format!("not an array: {other:?}"))),
    }
}

/// A flat `field, value, …` reply (HGETALL, or a Lua table of pairs) as a map.
pub(crate) fn as_map(v: Value) -> RedisResult<HashMap<String, String>> {
    match v {
        Value::Map(pairs) => pairs.iter().map(|(k, v)| Ok((as_string(k)?, as_string(v)?))).collect(),
        other => {
            let a = as_array(other)?;
            let mut m = HashMap::with_capacity(a.len() / 2);
            for kv in a.chunks(2) {
                if let [k, v] = kv {
                    m.insert(as_string(k)?, as_string(v)?);
                }
            }
            Ok(m)
        }
    }
}

/// `-1` from a script means "none".
pub(crate) fn opt_ms(v: i64) -> Option<u64> {
    (v >= 0).then_some(v as u64)
}

// === impl Gatekeeper ===

#[async_trait::async_trait]
impl crate::store::Gatekeeper for RedisStore {
    /// Admission and reservation pipelined on the multiplexed connection: one network round trip.
    async fn admit_reserve(
        &self,
        admit: &crate::store::AdmitRequest<'_>,
        reserve: Option<&crate::store::budget::ReserveRequest<'_>>,
    ) -> Result<
        (crate::store::Ticket, crate::decide::CountersView, Option<crate::store::budget::ReserveOutcome>),
        StoreError,
    > {
        use crate::store::budget::Budgets;
        use crate::store::budget::ReserveOutcome;
        use crate::store::Counters;
        let Some(r) = reserve else {
            let (t, v) = self.admit(admit).await?;
            return Ok((t, v, None));
        };
        // The step runs in a task of its own (`exec_undoable`): it owns what it sends.
        let ticket = counters::ticket_of(admit, 0);
        let (res, args) = budgets::reservation_of(r);
        let commands = self.admit_commands() + 1;
        let (store, held, lease_ttl_ms) = (self.clone(), ticket.clone(), admit.lease_ttl_ms);
        let run = move |c: Conn| async move {
            let admit = counters::admission_of(&held, lease_ttl_ms);
            let plan = store.plan_admit(&admit);
            let inv = store.reserve_invocation(&res, &args);
            let mut c2 = c.clone();
            // Both futures write before either reads: the commands share one round trip.
            let (a, b) = tokio::join!(plan.run(c), budgets::run_reserve(inv, &mut c2));
            Ok((a, b, res))
        };
        let (store, taken) = (self.clone(), ticket.clone());
        let undo = move |(a, b, res): (
            RedisResult<(u64, crate::decide::CountersView)>,
            RedisResult<Vec<i64>>,
            crate::store::budget::Reservation,
        )| async move {
            let now = taken.at;
            if let Ok((seq, _)) = a {
                store.undo_admission(&crate::store::Ticket { seq, ..taken }).await;
            }
            // A hold it took — or may have taken, when the reply was lost — goes back (releasing a
            // hold that never was is a no-op); one refused for lack of budget holds nothing.
            // (The reserve script answers `[1, amount]` when it held.)
            let nothing_held = b.as_ref().is_ok_and(|reply| !matches!(reply.as_slice(), [1, _]));
            if !nothing_held {
                store.release_patiently(&res.id, now).await;
            }
        };
        let (a, b, res) = self.exec_undoable("admit_reserve", commands, run, undo).await?;
        let outcome = match b {
            Ok(reply) => budgets::reserve_outcome(res, &reply),
            Err(e) => {
                // The reserve may have run before its reply was lost (a dropped connection): its
                // hold goes back in the background.
                let (store, now) = (self.clone(), r.now);
                tokio::spawn(async move { store.release_patiently(&res.id, now).await });
                Err(unavailable(format!("reserve: {e}")))
            }
        };
        match (a, outcome) {
            (Ok((seq, view)), Ok(o)) => Ok((crate::store::Ticket { seq, ..ticket }, view, Some(o))),
            (Ok((seq, _)), Err(e)) => {
                let _ = self.rollback(&crate::store::Ticket { seq, ..ticket }).await;
                Err(e)
            }
            (Err(e), Ok(ReserveOutcome::Reserved(held))) => {
                let _ = self.release(&held.id, r.now).await;
                Err(unavailable(format!("admit: {e}")))
            }
            (Err(e), _) => Err(unavailable(format!("admit: {e}"))),
        }
    }

    /// Settlement and lease release pipelined: one round trip after the response.
    async fn settle_release(
        &self,
        settle: Option<(&str, crate::decide::Micros, crate::decide::UnixMillis)>,
        lease: Option<&crate::store::Ticket>,
    ) -> (Option<Result<crate::store::budget::SettleOutcome, StoreError>>, Result<(), StoreError>) {
        let lease = lease.filter(|t| t.has_lease());
        let (Some((id, actual, now)), Some(ticket)) = (settle, lease) else {
            // Only one of the two: no pipelining to do.
            return crate::store::settle_then_release(self, self, settle, lease).await;
        };
        let actual = actual.max(crate::decide::Micros::ZERO);
        let inv = self.plan_finish(id, Some(actual), now);
        let key = self.inner.keys.tenant(&ticket.tenant, "leases");
        let seq = ticket.seq;
        let mut zrem = redis::cmd("ZREM");
        zrem.arg(&key).arg(seq);
        let both = self
            .exec("settle_release", 2, |c| async move {
                let (mut c1, mut c2) = (c.clone(), c);
                // Both futures write before either reads: the commands share one round trip.
                Ok(tokio::join!(budgets::run_finish(inv, &mut c1), zrem.query_async::<()>(&mut c2)))
            })
            .await;
        match both {
            Ok((settled, released)) => (
                Some(
                    settled
                        .map(|r| budgets::settle_outcome(r, actual))
                        .map_err(|e| unavailable(format!("settle: {e}"))),
                ),
                released.map_err(|e| unavailable(format!("release_lease: {e}"))),
            ),
            Err(e) => (Some(Err(e.clone())), Err(e)),
        }
    }
}
