//! [`PolicyStore`] for a fleet: the runtime knobs (kill switch, global and fair-use guards, modes,
//! source modes, approval issuance freeze, audit sample rate) are one JSON document at
//! `P{global}:policy` with an integer `version`; everything else in [`Policy`] (the tenants/tiers
//! directory, spend thresholds) stays local to each replica.
//!
//! - Reads are synchronous and never touch Redis: each replica keeps the current `Arc<Policy>`.
//! - `update` applies the patch to the stored document with optimistic concurrency (a Lua
//!   compare-and-set on `version`; on a conflict the fields the patch changed are re-applied to
//!   the newer document), then the script publishes the document on channel `P policy`.
//! - Every replica subscribes to that channel on a dedicated connection (reconnecting on error)
//!   and also re-reads the document every 2 s as a safety net, so a change on one replica is
//!   visible on all within milliseconds, at worst ~2 s after a lost message.
//! - Every replica says which document it runs in the hash `P{global}:policy_seen` (its field, a
//!   random id followed by the marks of its environment's floor, `+kill_switch` /
//!   `+approval_issuance_frozen`, holds `epoch:version:expires_ms`), when it adopts one and every
//!   [`ACK_EVERY`]. An `update` (an
//!   operator's `PATCH`) answers once every live replica (a field not expired) runs the new
//!   document, or after [`FLEET_WAIT`]: the request an operator sends to any replica right after
//!   the answer meets the change (CONTRACT §8: "applies at once, all replicas"). With the same
//!   field, a replica with a ledger sink says in `P{global}:outbox_seen` when its oldest event
//!   not yet delivered was written (`oldest_ms:as_of_ms`, 0 for none), for `rebuild-spend` to
//!   wait for the settlements still on their way ([`RedisStore::outboxes_behind`]).
//! - On start, a missing document is initialised from the local configuration (`SET NX`) — or
//!   from the fleet's policy this replica last ran, kept in `PREAUTH_DATA_DIR` each time it
//!   adopts one (which is also what it runs while Redis is unreachable); an existing one
//!   overrides the local knobs. A document that disappears (Redis lost its data) is
//!   re-created from the replica's current knobs, so a kill switch survives a flush. A document
//!   re-created by another replica (another epoch) below the version this replica runs — one
//!   started during the loss wrote its environment's policy — is not adopted: this replica
//!   writes its own knobs over it at a higher version, and the fleet follows.
//! - Each document carries an `epoch` (random, set when it is created): a replica applies a
//!   document of a newer version, or any document of another epoch (a re-created one).
//! - A stored field of the wrong type or out of the admin API's range (written by hand) keeps the
//!   replica's value, logged as an error naming it; the document's other fields still apply (a
//!   kill switch acts whatever else is wrong), and the next update writes the repaired document.
//! - A patch that changes only local parts (a `SIGHUP` directory reload) is applied locally and
//!   bumps the document's version (same knobs), so that a version never names two policies; with
//!   Redis down it is applied all the same and the bump follows once Redis answers.
//! - A patch of knobs that Redis cannot take (down, timing out) is applied to this replica at
//!   once and kept as pending (`unshared`); the 2 s re-read writes it to the document when Redis
//!   answers again, and documents adopted meanwhile keep the pending knobs on top. An operator
//!   can contain an incident during a store outage, replica by replica.
//! - The environment's kill switch and approval-issuance freeze are a floor (`Floor`): a replica
//!   started with `LLM_GLOBAL_ABUSE_KILL_SWITCH=true` or `ENFORCEMENT_APPROVAL_ISSUANCE_FROZEN=true`
//!   runs with it on whatever the document says (the runbook's "set the variable and roll out"
//!   contains an incident); the document cannot turn them off there. Every other knob: the
//!   document wins, and the start logs which settings of the environment it overrides.
//!
//! Owns: `RedisPolicy`, the document format (its `knobs` are `store::knobs::Knobs`, the
//! serialisation the embedded runtime-policy file shares). Imports: `store::redis` core,
//! `store::knobs`, `decide::policy`, serde_json, tokio, futures-util, parking_lot.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

use super::{RedisStore, Target};
use crate::decide::Policy;
use crate::store::knobs::Knobs;
use crate::store::{PolicyPatch, PolicyStore, StoreError};

/// The safety-net re-read period.
const REFRESH_EVERY: Duration = Duration::from_secs(2);
/// Compare-and-set attempts before `update` gives up.
const CAS_ATTEMPTS: usize = 16;
/// How often a replica repeats which document it runs; its word lasts three times as long.
const ACK_EVERY: Duration = Duration::from_secs(2);
/// The longest an `update` waits for the other live replicas to run the new document.
const FLEET_WAIT: Duration = Duration::from_secs(1);

/// What a replica's environment forces whatever the document says, towards the safe side only
/// (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
struct Floor {
    kill_switch: bool,
    approval_issuance_frozen: bool,
}

impl Floor {
    /// How a replica's field in `policy_seen` names its floor (after its random id), so that a
    /// `PATCH` elsewhere can say the replicas where turning a switch off does not act.
    const KILL_SWITCH_MARK: &'static str = "+kill_switch";
    const FROZEN_MARK: &'static str = "+approval_issuance_frozen";

    fn of(configured: &Policy) -> Floor {
        Floor { kill_switch: configured.kill_switch, approval_issuance_frozen: configured.approval_issuance_frozen }
    }

    /// The marks of this floor, appended to the replica's field.
    fn marks(self) -> String {
        let mut m = String::new();
        if self.kill_switch {
            m.push_str(Self::KILL_SWITCH_MARK);
        }
        if self.approval_issuance_frozen {
            m.push_str(Self::FROZEN_MARK);
        }
        m
    }

    fn apply(self, p: &mut Policy) {
        p.kill_switch |= self.kill_switch;
        p.approval_issuance_frozen |= self.approval_issuance_frozen;
    }
}

/// The stored document.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Doc {
    version: u64,
    epoch: String,
    #[serde(default)]
    updated_at_ms: u64,
    knobs: Map<String, Json>,
}

impl Doc {
    fn new(p: &Policy) -> Doc {
        Doc {
            version: p.version,
            epoch: uuid::Uuid::new_v4().simple().to_string(),
            updated_at_ms: now_ms(),
            knobs: Knobs::of(p).to_map(),
        }
    }

    /// The document's knobs over `local`'s: fields it lacks, and fields of the wrong type or out
    /// of range (named in the second result), keep the local value.
    fn knobs_over(&self, local: &Policy) -> (Knobs, Vec<String>) {
        Knobs::merged(&Knobs::of(local), &self.knobs)
    }

    /// `local` running this document: its knobs over `local`'s, and its version; the second
    /// result names the fields that kept the local value because they were bad.
    fn over(&self, local: &Policy) -> (Policy, Vec<String>) {
        let mut p = local.clone();
        let (knobs, rejected) = self.knobs_over(local);
        knobs.apply(&mut p);
        p.version = self.version;
        (p, rejected)
    }

    fn parse(text: &str) -> Option<Doc> {
        serde_json::from_str(text).ok()
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

struct Shared {
    store: RedisStore,
    doc_key: String,
    channel: String,
    current: RwLock<Arc<Policy>>,
    /// The local parts (directory, spend thresholds); its knobs are only the fallback.
    local: Mutex<Policy>,
    /// Epoch of the document the current policy came from.
    epoch: Mutex<String>,
    /// The environment's kill switch and approval freeze (see `Floor`).
    floor: Floor,
    /// Knobs changed here that Redis could not take yet: they apply on this replica and are
    /// written to the document by the re-read once Redis answers.
    pending: Mutex<Map<String, Json>>,
    /// A local change (a `SIGHUP` reload) made while Redis was unavailable: the document's
    /// version is still to be bumped (with the pending knobs, if any).
    bump_pending: AtomicBool,
    /// Serialises this replica's updates (the CAS serialises the fleet's).
    write: tokio::sync::Mutex<()>,
    /// Where the policy adopted last is kept for a restart (`None`: not kept).
    save_dir: Option<std::path::PathBuf>,
    /// The environment's knobs (the saved file's `base`).
    base: Knobs,
    /// This replica's field in `seen_key` (random per process).
    instance: String,
    /// The hash where each replica says which document it runs.
    seen_key: String,
    /// Wakes the task that says so, after an adoption.
    adopted: Arc<tokio::sync::Notify>,
    /// Replicas still behind when the last `update` answered.
    lagging: std::sync::atomic::AtomicUsize,
    /// Other live replicas whose environment sets the kill switch / the approval freeze, as
    /// seen when the last `update` answered.
    pinned: Mutex<Pinned>,
    /// Changes made here while Redis was unavailable that became the fleet's since the last
    /// `take_shared_changes`: (the document's version, the settings written).
    shared_since: Mutex<Vec<(u64, Map<String, Json>)>>,
    /// What this replica's outbox holds for the central ledger (see `note_outbox`), said with
    /// each ack in `outbox_key`: `(oldest undelivered event ms or 0, as of ms)`.
    outbox: Mutex<Option<(u64, u64)>>,
    /// The hash where each replica (same field as in `seen_key`) says what its outbox holds.
    outbox_key: String,
}

/// A live replica whose outbox still held, when it last said so, events from before a moment
/// (see [`RedisStore::outboxes_behind`]).
#[derive(Clone, Debug, PartialEq)]
pub struct OutboxBehind {
    /// The replica's field in `policy_seen` (a random id per process).
    pub replica: String,
    /// When its oldest undelivered event was written (Unix ms; 0: none was undelivered when it
    /// last said so — which was before the moment).
    pub oldest_ms: u64,
    /// When it said so (Unix ms).
    pub as_of_ms: u64,
}

/// Other replicas where a switch stays on whatever the document says (their environment's
/// floor), named by the knob.
#[derive(Clone, Copy, Debug, Default)]
struct Pinned {
    kill_switch: usize,
    approval_issuance_frozen: usize,
}

/// The fleet's runtime policy as seen by one replica (see the module docs).
pub struct RedisPolicy {
    shared: Arc<Shared>,
}

impl RedisStore {
    /// The live replicas (their word in `policy_seen` not expired at `now_ms`) whose outbox, when
    /// they last said so, still held events for the central ledger written at or before
    /// `since_ms`, or that have not said so since then; and how many live replicas say nothing
    /// of their outbox (no ledger sink, or a version that does not).
    pub async fn outboxes_behind(&self, since_ms: u64, now_ms: u64) -> Result<(Vec<OutboxBehind>, usize), StoreError> {
        type Hash = std::collections::HashMap<String, String>;
        let (seen_key, outbox_key) = (self.inner.keys.global("policy_seen"), self.inner.keys.global("outbox_seen"));
        let (seen, outboxes) = self
            .exec("policy_seen", 1, |mut c| async move {
                redis::pipe().hgetall(&seen_key).hgetall(&outbox_key).query_async::<(Hash, Hash)>(&mut c).await
            })
            .await?;
        let (mut behind, mut silent) = (Vec::new(), 0);
        for (replica, word) in &seen {
            if Seen::parse(word).is_none_or(|s| s.expires <= now_ms) {
                continue;
            }
            let said = outboxes.get(replica).and_then(|w| {
                let (oldest, as_of) = w.split_once(':')?;
                Some((oldest.parse::<u64>().ok()?, as_of.parse::<u64>().ok()?))
            });
            match said {
                None => silent += 1,
                Some((oldest, as_of)) if as_of < since_ms || (oldest != 0 && oldest <= since_ms) => {
                    behind.push(OutboxBehind { replica: replica.clone(), oldest_ms: oldest, as_of_ms: as_of })
                }
                Some(_) => {}
            }
        }
        behind.sort_by(|a, b| a.replica.cmp(&b.replica));
        Ok((behind, silent))
    }

    /// The runtime policy shared through this store, starting from the local configuration's
    /// policy: initialises the document if absent (else adopts its knobs), subscribes to changes
    /// and starts the 2 s re-read. Never fails: with Redis down it starts from `local` and
    /// catches up once Redis answers.
    pub async fn policy_store(&self, local: Policy) -> Arc<RedisPolicy> {
        self.policy_store_saved(local, None).await
    }

    /// [`policy_store`](Self::policy_store) that also keeps the fleet's policy it runs in
    /// `save_dir` (`runtime-policy.json`, the embedded format) each time it adopts one, and
    /// starts from that file: a replica restarted while Redis is down, or after Redis lost its
    /// data, runs the fleet's last policy (an incident's kill switch) instead of its environment's.
    /// The environment wins for a setting changed there since (as in embedded mode).
    pub async fn policy_store_saved(&self, local: Policy, save_dir: Option<std::path::PathBuf>) -> Arc<RedisPolicy> {
        let saved = save_dir.as_deref().and_then(|d| match crate::store::runtime_policy::peek(d, &local) {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(error = %e, "runtime policy: the fleet policy saved here cannot be read; starting from the configuration");
                None
            }
        });
        let mut start = saved.clone().unwrap_or_else(|| local.clone());
        Floor::of(&local).apply(&mut start);
        let shared = Arc::new(Shared {
            store: self.clone(),
            doc_key: self.inner.keys.global("policy"),
            channel: self.inner.keys.policy_channel(),
            current: RwLock::new(Arc::new(start)),
            save_dir,
            base: Knobs::of(&local),
            floor: Floor::of(&local),
            local: Mutex::new(local.clone()),
            epoch: Mutex::new(String::new()),
            pending: Mutex::new(Map::new()),
            bump_pending: AtomicBool::new(false),
            write: tokio::sync::Mutex::new(()),
            instance: format!("{}{}", crate::ids::v7(), Floor::of(&local).marks()),
            seen_key: self.inner.keys.global("policy_seen"),
            adopted: Arc::new(tokio::sync::Notify::new()),
            lagging: std::sync::atomic::AtomicUsize::new(0),
            pinned: Mutex::new(Pinned::default()),
            shared_since: Mutex::new(Vec::new()),
            outbox: Mutex::new(None),
            outbox_key: self.inner.keys.global("outbox_seen"),
        });
        match shared.refresh().await {
            Ok(()) => {
                // Settings of this replica's environment that the fleet's document overrides.
                let (configured, running) = (Knobs::of(&local).to_map(), Knobs::of(&shared.current.read()).to_map());
                let overridden: Vec<&String> =
                    configured.iter().filter(|(k, v)| running.get(*k) != Some(*v)).map(|(k, _)| k).collect();
                if !overridden.is_empty() {
                    tracing::warn!(
                        settings = ?overridden,
                        version = shared.current.read().version,
                        "runtime policy: the fleet's document (shared store) overrides these settings of this \
                         replica's environment; change them fleet-wide with PATCH /api/v1/enforcement/runtime \
                         (a kill switch or approval freeze set in the environment always applies)"
                    );
                }
            }
            Err(e) => match &saved {
                Some(p) => tracing::warn!(
                    error = %e,
                    version = p.version,
                    kill_switch = p.kill_switch,
                    "runtime policy: shared store not reachable; running the fleet's policy this replica last ran \
                     (saved in PREAUTH_DATA_DIR) until it is"
                ),
                None => tracing::warn!(
                    error = %e,
                    "runtime policy: shared store not reachable; using the local configuration until it is"
                ),
            },
        }
        let weak = Arc::downgrade(&shared);
        self.inner.handle.spawn(refresh_task(weak.clone()));
        self.inner.handle.spawn(ack_task(weak.clone(), shared.adopted.clone()));
        self.inner.handle.spawn(subscribe_task(weak, self.inner.target.clone()));
        Arc::new(RedisPolicy { shared })
    }

    /// The fleet's runtime policy as stored, over `local` (the knobs the document lacks keep the
    /// local value), read once: nothing written, no subscription (for tools such as
    /// `mint-approval`). `local` as is when no document exists yet.
    pub async fn read_policy(&self, local: &Policy) -> Result<Policy, StoreError> {
        match self.policy_doc(self.inner.keys.global("policy")).await? {
            None => Ok(local.clone()),
            Some(text) => Doc::parse(&text)
                .map(|doc| {
                    let mut p = doc.over(local).0;
                    Floor::of(local).apply(&mut p);
                    p
                })
                .ok_or_else(|| StoreError::Unavailable("runtime policy document is unreadable".into())),
        }
    }

    /// [`read_policy`](Self::read_policy) for synchronous callers (not from inside a task).
    pub fn read_policy_blocking(&self, local: &Policy) -> Result<Policy, StoreError> {
        let (s, local) = (self.clone(), local.clone());
        self.block_on(async move { s.read_policy(&local).await })
            .ok_or_else(|| StoreError::Unavailable("redis runtime stopped".into()))?
    }

    /// [`policy_store`](Self::policy_store) for synchronous callers (not from inside a task).
    pub fn policy_store_blocking(&self, local: Policy, save_dir: Option<std::path::PathBuf>) -> Arc<RedisPolicy> {
        let s = self.clone();
        self.block_on(async move { s.policy_store_saved(local, save_dir).await })
            .expect("the redis runtime runs while the store exists")
    }

    /// The stored runtime policy document at `key`, as text.
    async fn policy_doc(&self, key: String) -> Result<Option<String>, StoreError> {
        self.exec("policy_read", 1, |mut c| async move {
            redis::cmd("GET").arg(&key).query_async::<Option<String>>(&mut c).await
        })
        .await
    }
}

impl Shared {
    async fn get_doc(&self) -> Result<Option<String>, StoreError> {
        self.store.policy_doc(self.doc_key.clone()).await
    }

    /// Writes `doc` if the stored version is `expected` (-1: absent, -2: unreadable).
    async fn cas(&self, expected: i64, doc: &Doc) -> Result<bool, StoreError> {
        let text = serde_json::to_string(doc).map_err(|e| StoreError::Unavailable(format!("policy: {e}")))?;
        let mut inv = self.store.inner.scripts.policy_cas.prepare_invoke();
        inv.key(&self.doc_key).arg(expected).arg(text).arg(&self.channel);
        self.store
            .exec("policy_update", 1, |mut c| async move { inv.invoke_async::<i64>(&mut c).await })
            .await
            .map(|r| r == 1)
    }

    /// Whether `doc` was created anew (another epoch) at a version below the one this replica
    /// runs: the store lost its data and a replica that did not know the fleet's policy (one
    /// started meanwhile) created the document from its environment. Adopting it would undo the
    /// fleet's runtime changes (an incident's kill switch) everywhere; [`Shared::refresh`] writes
    /// this replica's policy over it instead.
    fn is_lost_newer(&self, epoch: &str, doc: &Doc) -> bool {
        !epoch.is_empty() && epoch != doc.epoch && doc.version < self.current.read().version
    }

    /// Adopts `doc` if it is newer (or from another epoch) than what this replica runs.
    fn adopt(&self, doc: &Doc) {
        let mut epoch = self.epoch.lock();
        let cur = self.current.read().clone();
        if (*epoch == doc.epoch && doc.version <= cur.version) || self.is_lost_newer(&epoch, doc) {
            return;
        }
        let (mut next, rejected) = doc.over(&self.local.lock());
        self.keep_pending(&mut next);
        if !rejected.is_empty() {
            tracing::error!(
                version = doc.version,
                fields = ?rejected,
                "runtime policy document (shared store): these fields are of the wrong type or out of range and keep \
                 this replica's values; the document's other fields apply. Set them again with \
                 PATCH /api/v1/enforcement/runtime"
            );
        }
        if *epoch != doc.epoch || Knobs::of(&next) != Knobs::of(&cur) || next.version != cur.version {
            tracing::info!(
                version = doc.version,
                kill_switch = next.kill_switch,
                "runtime policy changed (shared store)"
            );
        }
        *epoch = doc.epoch.clone();
        if let Some(dir) = &self.save_dir {
            if let Err(e) = crate::store::runtime_policy::write(dir, next.version, &Knobs::of(&next), &self.base) {
                tracing::warn!(
                    error = %e,
                    "runtime policy: could not keep the fleet's policy in PREAUTH_DATA_DIR (a restart while Redis is \
                     unreachable would run the configuration's); check the data volume"
                );
            }
        }
        *self.current.write() = Arc::new(next);
        self.adopted.notify_one();
    }

    /// Says in `seen_key` which document this replica runs (for `ACK_EVERY` × 3), and forgets
    /// replicas silent for a minute.
    async fn ack(&self) -> Result<(), StoreError> {
        let version = self.current.read().version;
        let now = now_ms();
        let word = format!("{}:{version}:{}", self.epoch.lock(), now + 3 * ACK_EVERY.as_millis() as u64);
        let (key, field) = (self.seen_key.clone(), self.instance.clone());
        let outbox = self.outbox.lock().map(|(oldest, as_of)| (self.outbox_key.clone(), format!("{oldest}:{as_of}")));
        let seen = self
            .store
            .exec("policy_ack", 1, |mut c| async move {
                let mut pipe = redis::pipe();
                pipe.hset(&key, &field, word).ignore();
                if let Some((outbox_key, said)) = &outbox {
                    pipe.hset(outbox_key, &field, said).ignore();
                }
                pipe.hgetall(&key).query_async::<(std::collections::HashMap<String, String>,)>(&mut c).await
            })
            .await?
            .0;
        let gone: Vec<String> = seen
            .into_iter()
            .filter(|(_, w)| Seen::parse(w).is_none_or(|s| s.expires + 60_000 < now))
            .map(|(f, _)| f)
            .collect();
        if !gone.is_empty() {
            forget_replicas(&self.store, [self.seen_key.clone(), self.outbox_key.clone()], gone).await?;
        }
        Ok(())
    }

    /// Waits until every other live replica runs document `epoch`/`version` (or later), at
    /// most [`FLEET_WAIT`]; returns how many did not in time.
    async fn await_fleet(&self, epoch: &str, version: u64) -> usize {
        let deadline = tokio::time::Instant::now() + FLEET_WAIT;
        loop {
            let key = self.seen_key.clone();
            let seen = self
                .store
                .exec("policy_seen", 1, |mut c| async move {
                    redis::cmd("HGETALL")
                        .arg(&key)
                        .query_async::<std::collections::HashMap<String, String>>(&mut c)
                        .await
                })
                .await;
            let Ok(seen) = seen else { return 0 };
            let now = now_ms();
            let live: Vec<(&String, Seen)> = seen
                .iter()
                .filter(|(field, _)| **field != self.instance)
                .filter_map(|(field, w)| Seen::parse(w).map(|s| (field, s)))
                .filter(|(_, s)| s.expires > now)
                .collect();
            let lagging = live.iter().filter(|(_, s)| !(s.epoch == epoch && s.version >= version)).count();
            if lagging == 0 || tokio::time::Instant::now() >= deadline {
                let marked = |mark: &str| live.iter().filter(|(field, _)| field.contains(mark)).count();
                *self.pinned.lock() = Pinned {
                    kill_switch: marked(Floor::KILL_SWITCH_MARK),
                    approval_issuance_frozen: marked(Floor::FROZEN_MARK),
                };
                return lagging;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// `p` with the knobs Redis has not taken yet and the environment's floor.
    fn keep_pending(&self, p: &mut Policy) {
        let pending = self.pending.lock();
        if !pending.is_empty() {
            Knobs::merged(&Knobs::of(p), &pending).0.apply(p);
        }
        self.floor.apply(p);
    }

    /// Writes `changes` (knob fields) over the stored document with a version bump (none: a bump
    /// alone) and adopts the result. `Ok(None)`: too many concurrent writers.
    async fn write_knobs(&self, changes: &Map<String, Json>) -> Result<Option<Arc<Policy>>, StoreError> {
        let fallback = (*self.current.read().clone()).clone();
        for _ in 0..CAS_ATTEMPTS {
            let text = self.get_doc().await?;
            let stored = text.as_deref().map(Doc::parse);
            let (expected, base) = match stored {
                None => (-1, Doc::new(&fallback)),
                Some(None) => (-2, Doc::new(&fallback)),
                Some(Some(d)) => (d.version as i64, d),
            };
            let local = self.local.lock().clone();
            // The patch was validated; a bad stored field is replaced by this replica's value.
            let (knobs, _) = Knobs::merged(&base.knobs_over(&local).0, changes);
            let doc = Doc {
                version: base.version + 1,
                epoch: base.epoch.clone(),
                updated_at_ms: now_ms(),
                knobs: knobs.to_map(),
            };
            if self.cas(expected, &doc).await? {
                self.pending.lock().clear();
                self.bump_pending.store(false, Ordering::Relaxed);
                self.adopt(&doc);
                return Ok(Some(self.current.read().clone()));
            }
        }
        Ok(None)
    }

    /// Writes the knobs changed while Redis was unavailable (the re-read calls it).
    async fn push_pending(&self) -> Result<(), StoreError> {
        let _w = self.write.lock().await;
        let pending = self.pending.lock().clone();
        if pending.is_empty() && !self.bump_pending.load(Ordering::Relaxed) {
            return Ok(());
        }
        if let Some(p) = self.write_knobs(&pending).await? {
            self.shared_since.lock().push((p.version, pending.clone()));
            tracing::warn!(
                version = p.version,
                settings = ?pending.keys().collect::<Vec<_>>(),
                "runtime policy: the changes made on this replica while the shared store was unavailable are now the \
                 fleet's"
            );
        }
        Ok(())
    }

    /// Reads the document and adopts it; creates it from the current knobs if it is absent, and
    /// restores them over one created anew below this replica's version.
    async fn refresh(&self) -> Result<(), StoreError> {
        match self.get_doc().await? {
            Some(text) => match Doc::parse(&text) {
                Some(doc) if self.is_lost_newer(&self.epoch.lock().clone(), &doc) => self.restore_over(&doc).await?,
                Some(doc) => self.adopt(&doc),
                None => {
                    tracing::error!(key = %self.doc_key, "runtime policy document is unreadable; keeping the current policy")
                }
            },
            None => {
                let doc = Doc::new(&self.current.read());
                if self.cas(-1, &doc).await? {
                    tracing::info!(version = doc.version, "runtime policy document created from this replica's policy");
                    self.adopt(&doc);
                } else if let Some(doc) = self.get_doc().await?.as_deref().and_then(Doc::parse) {
                    self.adopt(&doc);
                }
            }
        }
        Ok(())
    }

    /// Writes this replica's runtime knobs over `lost` (see [`Shared::is_lost_newer`]) at a
    /// version above both, in `lost`'s epoch: every replica, the one that created it included,
    /// adopts the restored policy at its next read (within 2 s).
    async fn restore_over(&self, lost: &Doc) -> Result<(), StoreError> {
        let _w = self.write.lock().await;
        let cur = self.current.read().clone();
        let doc = Doc {
            version: cur.version.max(lost.version) + 1,
            epoch: lost.epoch.clone(),
            updated_at_ms: now_ms(),
            knobs: Knobs::of(&cur).to_map(),
        };
        if self.cas(lost.version as i64, &doc).await? {
            tracing::warn!(
                found_version = lost.version,
                running_version = cur.version,
                restored_version = doc.version,
                kill_switch = cur.kill_switch,
                "runtime policy: the shared store's document was re-created below the version this replica runs \
                 (the store lost its data, and a replica started meanwhile wrote its environment's policy); \
                 restored this replica's runtime policy for the fleet. Check GET /api/v1/enforcement/runtime, and \
                 give Redis persistence"
            );
            self.adopt(&doc);
        }
        Ok(())
    }
}

#[async_trait]
impl PolicyStore for RedisPolicy {
    fn current(&self) -> Arc<Policy> {
        self.shared.current.read().clone()
    }

    async fn update(&self, patch: PolicyPatch) -> Result<Arc<Policy>, StoreError> {
        let sh = &self.shared;
        let _w = sh.write.lock().await;
        // What the patch changes, worked out once against the current snapshot.
        let before = (*sh.current.read().clone()).clone();
        let mut after = before.clone();
        patch(&mut after);
        after.version = before.version;
        let (k0, k1) = (Knobs::of(&before), Knobs::of(&after));
        let changed: Map<String, Json> = {
            let (m0, m1) = (k0.to_map(), k1.to_map());
            m1.into_iter().filter(|(k, v)| m0.get(k) != Some(v)).collect()
        };
        let local_changed = {
            let mut a = after.clone();
            k0.apply(&mut a);
            a != before
        };
        if local_changed {
            *sh.local.lock() = after.clone();
        }
        if changed.is_empty() && local_changed {
            // Local only (directory reload): applied here at once, and the document's version
            // bumped (same knobs) — with Redis down, once it answers again.
            let mut next = after;
            k0.apply(&mut next);
            let next = Arc::new(next);
            *sh.current.write() = next.clone();
            let pending = sh.pending.lock().clone();
            return match sh.write_knobs(&pending).await {
                Ok(Some(p)) => Ok(p),
                Ok(None) | Err(_) => {
                    // Bumped by the re-read once Redis answers (`push_pending`).
                    sh.bump_pending.store(true, Ordering::Relaxed);
                    Ok(next)
                }
            };
        }
        // Knobs Redis has not taken yet go with this change.
        let mut changes = sh.pending.lock().clone();
        changes.extend(changed.clone());
        match sh.write_knobs(&changes).await {
            Ok(Some(p)) => {
                // Answered once the other replicas run it too (or after FLEET_WAIT).
                let epoch = sh.epoch.lock().clone();
                let lagging = sh.await_fleet(&epoch, p.version).await;
                sh.lagging.store(lagging, Ordering::Relaxed);
                if lagging > 0 {
                    tracing::warn!(
                        version = p.version,
                        replicas = lagging,
                        "runtime policy: replicas still run an older document after 1 s; they catch up within 2 s \
                         (pub/sub or the periodic re-read) unless they cannot reach the shared store"
                    );
                }
                Ok(p)
            }
            Ok(None) => Err(StoreError::Unavailable("runtime policy: too many concurrent updates; retry".into())),
            Err(e) => {
                // Applied here now, written to the document once Redis answers (`push_pending`).
                sh.pending.lock().extend(changed.clone());
                let mut next = after;
                sh.keep_pending(&mut next);
                let next = Arc::new(next);
                *sh.current.write() = next.clone();
                tracing::warn!(
                    error = %e,
                    settings = ?changed.keys().collect::<Vec<_>>(),
                    "runtime policy: the shared store cannot take this change now; it applies to this replica \
                     only until the store answers, then to the fleet (repeat it on each replica meanwhile)"
                );
                Ok(next)
            }
        }
    }

    fn unshared(&self) -> bool {
        !self.shared.pending.lock().is_empty() || self.shared.bump_pending.load(Ordering::Relaxed)
    }

    fn lagging(&self) -> usize {
        self.shared.lagging.load(Ordering::Relaxed)
    }

    fn note_outbox(&self, oldest_undelivered_ms: u64, now_ms: u64) {
        *self.shared.outbox.lock() = Some((oldest_undelivered_ms, now_ms));
    }

    fn take_shared_changes(&self) -> Vec<(u64, Map<String, Json>)> {
        std::mem::take(&mut *self.shared.shared_since.lock())
    }

    fn pinned_elsewhere(&self, knob: &str) -> usize {
        let p = *self.shared.pinned.lock();
        match knob {
            "kill_switch" => p.kill_switch,
            "approval_issuance_frozen" => p.approval_issuance_frozen,
            _ => 0,
        }
    }
}

impl Drop for RedisPolicy {
    /// A replica that stops says so: `PATCH`es elsewhere stop waiting for it at once, not after
    /// its word in `policy_seen` expires.
    fn drop(&mut self) {
        let sh = &self.shared;
        let (store, keys) = (sh.store.clone(), [sh.seen_key.clone(), sh.outbox_key.clone()]);
        let field = vec![sh.instance.clone()];
        let handle = store.inner.handle.clone();
        handle.spawn(async move {
            let _ = forget_replicas(&store, keys, field).await;
        });
    }
}

/// Removes `replicas` (their fields) from the presence hashes `keys` (`policy_seen`,
/// `outbox_seen`).
async fn forget_replicas(store: &RedisStore, keys: [String; 2], replicas: Vec<String>) -> Result<(), StoreError> {
    store
        .exec("policy_ack", 1, |mut c| async move {
            let mut pipe = redis::pipe();
            for key in &keys {
                pipe.hdel(key, &replicas).ignore();
            }
            pipe.query_async::<()>(&mut c).await
        })
        .await
}

/// One replica's word in `policy_seen`: `epoch:version:expires_ms`.
struct Seen<'a> {
    epoch: &'a str,
    version: u64,
    expires: u64,
}

impl<'a> Seen<'a> {
    fn parse(word: &'a str) -> Option<Seen<'a>> {
        let mut parts = word.rsplitn(3, ':');
        let expires = parts.next()?.parse().ok()?;
        let version = parts.next()?.parse().ok()?;
        Some(Seen { epoch: parts.next()?, version, expires })
    }
}

/// Says which document this replica runs: after each adoption and every [`ACK_EVERY`].
async fn ack_task(weak: Weak<Shared>, adopted: Arc<tokio::sync::Notify>) {
    loop {
        tokio::select! {
            _ = adopted.notified() => {}
            _ = tokio::time::sleep(ACK_EVERY) => {}
        }
        let Some(sh) = weak.upgrade() else { return };
        if let Err(e) = sh.ack().await {
            tracing::debug!(error = %e, "runtime policy: could not say which document this replica runs");
        }
    }
}

async fn refresh_task(weak: Weak<Shared>) {
    let mut tick = tokio::time::interval(REFRESH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(sh) = weak.upgrade() else { return };
        if let Err(e) = sh.push_pending().await {
            tracing::debug!(error = %e, "runtime policy: pending changes not written yet");
        }
        if let Err(e) = sh.refresh().await {
            tracing::debug!(error = %e, "runtime policy re-read failed");
        }
    }
}

/// Follows the policy channel on a dedicated RESP3 connection (pushes arrive on a channel);
/// reconnects after errors. A message is the whole document. After every (re)subscription the
/// document is re-read (messages may have been missed meanwhile).
async fn subscribe_task(weak: Weak<Shared>, target: Target) {
    use redis::{PushKind, Value};
    // Classic pub/sub is cluster-wide: in a cluster any node will do, the first seed is used.
    let base = match target {
        Target::Single(c) | Target::Cluster(_, c) => c,
    };
    let info = base.get_connection_info().clone();
    let settings = info.redis_settings().clone().set_protocol(redis::ProtocolVersion::RESP3);
    let client = match redis::Client::open(info.set_redis_settings(settings)) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "runtime policy: cannot subscribe; relying on the 2 s re-read");
            return;
        }
    };
    loop {
        let channel = match weak.upgrade() {
            Some(sh) => sh.channel.clone(),
            None => return,
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let config = redis::AsyncConnectionConfig::new().set_push_sender(tx);
        let attempt = async {
            let mut conn = client.get_multiplexed_async_connection_with_config(&config).await?;
            conn.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(conn)
        };
        match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok(conn)) => {
                if let Some(sh) = weak.upgrade() {
                    let _ = sh.refresh().await;
                }
                loop {
                    // Wake up now and then to notice the policy store was dropped.
                    let push = match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
                        Ok(Some(p)) => p,
                        Ok(None) => break,
                        Err(_) => {
                            if weak.strong_count() == 0 {
                                return;
                            }
                            continue;
                        }
                    };
                    match push.kind {
                        PushKind::Disconnection => break,
                        PushKind::Message => {
                            let Some(sh) = weak.upgrade() else { return };
                            let doc = match push.data.get(1) {
                                Some(Value::BulkString(b)) => std::str::from_utf8(b).ok().and_then(Doc::parse),
                                _ => None,
                            };
                            match doc {
                                Some(doc) => sh.adopt(&doc),
                                None => {
                                    let _ = sh.refresh().await;
                                }
                            }
                        }
                        _ => {}
                    }
                }
                drop(conn);
                tracing::debug!("runtime policy subscription ended; reconnecting");
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "runtime policy subscription failed"),
            Err(_) => tracing::debug!("runtime policy subscription timed out"),
        }
        if weak.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
