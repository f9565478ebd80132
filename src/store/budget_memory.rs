//! Embedded [`Budgets`]: state in memory behind one mutex, made durable by an append-only journal
//! in a data directory (`<dir>/budgets.journal`).
//!
//! # Journal
//! Every change (reserve, settle, release — also by `expire` —, charge) is one compact JSON line,
//! written with a single `write_all` to a file opened with `O_APPEND` *before* the call returns and
//! *before* the change becomes visible in memory; if the write fails the change is not made and the
//! call answers `StoreError::Unavailable`. There is no fsync per change:
//!
//! - **Process crash or `SIGKILL`: nothing is lost.** Every acknowledged change is in the kernel's
//!   page cache, which outlives the process; the next `open` replays it.
//! - **Power loss or kernel crash: changes since the last successful [`MemoryBudgets::sync`] may be
//!   lost** (and the last line may be torn; `open` ignores unreadable lines). Calling `sync`
//!   periodically from a background worker is the caller's choice of durability window; it
//!   fsyncs outside the state lock, so it does not stall requests.
//!
//! # Compaction
//! `open` replays the journal and rewrites it as a snapshot (write to `budgets.journal.tmp`,
//! fsync, rename, fsync the directory): the spend of the current and previous month per tenant
//! (as of the latest `now` seen), the active reservations, and the settled/released records still
//! remembered. While running, once the journal exceeds [`BudgetsOptions::compact_above_bytes`]
//! (and twice its size right after the last compaction) a background thread compacts it: under
//! the lock it writes the staged lines (so the file ends where the state stands) and copies the
//! state (tenants and labels shared), the remembered finished records 4,096 per lock hold (a
//! copy of all 50,000 at once held the lock 2-5 ms; a piece takes a tenth of that), skipping
//! those forgotten in between; with no lock held it writes and fsyncs the snapshot of that copy;
//! then, under the lock, it appends the lines written meanwhile, fsyncs again (only that tail is
//! dirty), renames and swaps the file handle. It never re-reads the journal: parsing every line
//! once more cost ~2 µs of CPU per request in steady state, a tenth of a request's whole cost
//! (benches/load: 64 MiB journals compacted every ~180k requests). [`MemoryBudgets::compact`] does
//! the same on demand. A crash at any point leaves either the old or the new journal complete.
//!
//! Dropping a `MemoryBudgets` syncs the journal (clean shutdown loses nothing, even on a later
//! power loss); a background compaction still running finishes on its own thread.
//!
//! One process per data directory: two processes appending to the same journal corrupt it.
//!
//! # Memory
//! Settled and released reservations are remembered for [`BudgetsOptions::finished_retention_ms`]
//! (24 h) so that a late duplicate settle answers `NotActive`, then forgotten; at most
//! [`BudgetsOptions::max_finished`] (50,000) are kept (oldest forgotten first), so memory stays
//! bounded whatever the request rate; a settle for a forgotten one answers `NotFound`. Months before the previous
//! one are forgotten once time moves into a new month (unless they still hold reservations).
//!
//! Reservations are held in a compact form and rebuilt into [`Reservation`]s when read, exactly
//! (`store::compact`): ids and request ids that are canonical UUIDs as 16 bytes (other text as
//! is), tier, model and month shared by every reservation with the same ones, the tenant's name
//! shared with its account. A tenant's account keeps its first month inline. Finished ones are kept
//! in an `IdRing`, whose memory does not grow with churn as a `HashMap`'s does: about 170 bytes
//! per finished reservation, about 110 per tenant with spend.
//!
//! Owns: `MemoryBudgets`, `BudgetsOptions`, the journal format. Imports: `store::budget`,
//! `store::compact`, `store::StoreError`, `decide` money/time types, parking_lot, serde/serde_json,
//! uuid, tracing, std.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::num::NonZeroU8;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::budget::{
    Budgets, Reservation, ReservationState, ReserveOutcome, ReserveRequest, SettleOutcome, Settlement, SpendView,
};
use super::compact::{Id, IdRing, LabelTable, Labels};
use super::journal::{create_append, sync_dir, Journal, Unreadable};
use super::StoreError;
use crate::commit::{StageCounter, Staged};
use crate::decide::time::{Month, MS_PER_DAY};
use crate::decide::{FastMap, Micros, Tier, UnixMillis};

/// The journal's file name inside the data directory.
pub const JOURNAL_FILE: &str = "budgets.journal";
const TMP_FILE: &str = "budgets.journal.tmp";
const SNAPSHOT_VERSION: u32 = 1;
/// Piece size of a compaction's reads and writes.
const SPILL_BYTES: usize = 256 * 1024;
/// Finished records copied per lock hold by a background compaction (~0.2 ms).
const COPY_PIECE: usize = 4096;

/// Tuning for [`MemoryBudgets`].
#[derive(Clone, Debug)]
pub struct BudgetsOptions {
    /// How long settled/released reservations are remembered. Default 24 h.
    pub finished_retention_ms: u64,
    /// At most this many settled/released reservations are remembered. Default 50,000 (≈ 8 MB):
    /// memory must not grow with request volume; at high rates records age out sooner than 24 h.
    pub max_finished: usize,
    /// Compact the journal in the background once it is larger than this. Default 64 MiB.
    pub compact_above_bytes: u64,
}

impl Default for BudgetsOptions {
    fn default() -> Self {
        BudgetsOptions { finished_retention_ms: MS_PER_DAY, max_finished: 50_000, compact_above_bytes: 64 << 20 }
    }
}

// ---------------------------------------------------------------------------------------------
// Journal format: one JSON object per line, tagged by "op". Money as integer micro-USD.

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Entry<'a> {
    /// First line of a snapshot: the latest `now` the state had seen.
    Snapshot {
        v: u32,
        now: UnixMillis,
    },
    Reserve {
        id: Cow<'a, str>,
        tenant: Cow<'a, str>,
        tier: Cow<'a, str>,
        request_id: Cow<'a, str>,
        model: Cow<'a, str>,
        month: Cow<'a, str>,
        amount: i64,
        at: UnixMillis,
    },
    Settle {
        id: Cow<'a, str>,
        actual: i64,
        at: UnixMillis,
    },
    Release {
        id: Cow<'a, str>,
        at: UnixMillis,
    },
    Charge {
        tenant: Cow<'a, str>,
        month: Cow<'a, str>,
        amount: i64,
        at: UnixMillis,
    },
    /// Snapshot: a month's spend (added, like a charge) and the tier of the tenant's latest hold
    /// (absent in journals written before it was kept).
    Spent {
        tenant: Cow<'a, str>,
        month: Cow<'a, str>,
        spent: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tier: Option<Cow<'a, str>>,
    },
    /// Snapshot: a settled (`actual` set) or released reservation; does not touch spend.
    Done {
        id: Cow<'a, str>,
        tenant: Cow<'a, str>,
        tier: Cow<'a, str>,
        request_id: Cow<'a, str>,
        model: Cow<'a, str>,
        month: Cow<'a, str>,
        amount: i64,
        created: UnixMillis,
        at: UnixMillis,
        actual: Option<i64>,
    },
}

/// One journal line, newline included: what both the live log and a snapshot write.
fn entry_line(out: &mut Vec<u8>, e: &Entry<'_>) -> io::Result<()> {
    e.write_line(out)?;
    out.push(b'\n');
    Ok(())
}

impl Entry<'_> {
    /// One journal line without its newline: serde's exact output, written by hand for the
    /// per-request records (reserve, settle, release); the rest go through serde.
    fn write_line(&self, out: &mut Vec<u8>) -> io::Result<()> {
        use crate::jsonw::{str_field, uint_field};
        match self {
            Entry::Reserve { id, tenant, tier, request_id, model, month, amount, at } => {
                str_field(out, b"{\"op\":\"reserve\",\"id\":", id);
                str_field(out, b",\"tenant\":", tenant);
                str_field(out, b",\"tier\":", tier);
                str_field(out, b",\"request_id\":", request_id);
                str_field(out, b",\"model\":", model);
                str_field(out, b",\"month\":", month);
                uint_field(out, b",\"amount\":", *amount);
                uint_field(out, b",\"at\":", *at);
                out.push(b'}');
            }
            Entry::Settle { id, actual, at } => {
                str_field(out, b"{\"op\":\"settle\",\"id\":", id);
                uint_field(out, b",\"actual\":", *actual);
                uint_field(out, b",\"at\":", *at);
                out.push(b'}');
            }
            Entry::Release { id, at } => {
                str_field(out, b"{\"op\":\"release\",\"id\":", id);
                uint_field(out, b",\"at\":", *at);
                out.push(b'}');
            }
            other => serde_json::to_writer(&mut *out, other).map_err(io::Error::other)?,
        }
        Ok(())
    }
}

fn reserve_entry(r: &Reservation) -> Entry<'_> {
    Entry::Reserve {
        id: Cow::Borrowed(&r.id),
        tenant: Cow::Borrowed(&r.tenant),
        tier: Cow::Borrowed(&r.tenant_tier),
        request_id: Cow::Borrowed(&r.request_id),
        model: Cow::Borrowed(&r.model),
        month: Cow::Borrowed(&r.month),
        amount: r.amount.0,
        at: r.created_at,
    }
}

fn prev_month(m: Month) -> Month {
    if m.month == 1 {
        Month { year: m.year - 1, month: 12 }
    } else {
        Month { year: m.year, month: m.month - 1 }
    }
}

// ---------------------------------------------------------------------------------------------
// State: pure bookkeeping, no I/O. Replaying a journal and serving live calls use the same code.

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
struct Acct {
    spent: i64,
    reserved: i64,
    active: u64,
}

/// One month of a tenant's account (the month packed so that [`Months`] needs no tag of its own),
/// with the tier the tenant's latest hold of the month resolved to (the tenant view's tier when
/// the tenants file names none; it fits in the slot's padding).
#[derive(Clone, Copy, Debug)]
struct Slot {
    acct: Acct,
    year: i32,
    month: NonZeroU8,
    tier: Option<Tier>,
}

impl Slot {
    fn new(m: Month) -> Slot {
        let month = u8::try_from(m.month).ok().and_then(NonZeroU8::new).expect("months are 1..=12");
        Slot { acct: Acct::default(), year: m.year, month, tier: None }
    }

    fn month(&self) -> Month {
        Month { year: self.year, month: u32::from(self.month.get()) }
    }
}

/// A tenant's accounts for the few months kept: one month inline (the common case needs no
/// allocation of its own), more in a short list (a tenant rarely has more than two).
enum Months {
    One(Slot),
    Many(Vec<Slot>),
}

impl Months {
    fn as_slice(&self) -> &[Slot] {
        match self {
            Months::One(m) => std::slice::from_ref(m),
            Months::Many(v) => v,
        }
    }

    fn get_or_insert(&mut self, month: Month) -> &mut Slot {
        let i = match self.as_slice().iter().position(|s| s.month() == month) {
            Some(i) => i,
            None => {
                let new = Slot::new(month);
                match self {
                    Months::One(m) => *self = Months::Many(vec![*m, new]),
                    Months::Many(v) => {
                        v.reserve_exact(1);
                        v.push(new);
                    }
                }
                self.as_slice().len() - 1
            }
        };
        match self {
            Months::One(s) => s,
            Months::Many(v) => &mut v[i],
        }
    }

    /// Keeps the months `keep` accepts; false when none is left.
    fn retain(&mut self, mut keep: impl FnMut(&Slot) -> bool) -> bool {
        match self {
            Months::One(m) => keep(m),
            Months::Many(v) => {
                v.retain(|m| keep(m));
                if let [m] = v[..] {
                    *self = Months::One(m);
                }
                !self.as_slice().is_empty()
            }
        }
    }
}

/// A reservation as kept in memory: the tenant shared with its account, the labels shared with
/// every reservation that has the same ones, the request id compact. [`Held::reservation`]
/// rebuilds the public [`Reservation`] exactly.
#[derive(Clone)]
struct Held {
    tenant: Arc<str>,
    labels: Arc<Labels>,
    request_id: Id,
    amount: i64,
    created_at: UnixMillis,
}

impl Held {
    /// This reservation's snapshot line: `Reserve` while active, `Done` with `(at, actual)` once
    /// settled or released.
    fn snapshot_entry<'a>(&'a self, id: &Id, done: Option<(UnixMillis, Option<i64>)>) -> Entry<'a> {
        let (id, tenant, tier, request_id, model, month) = (
            Cow::Owned(id.text()),
            Cow::Borrowed(&*self.tenant),
            Cow::Borrowed(&*self.labels.tier),
            Cow::Owned(self.request_id.text()),
            Cow::Borrowed(&*self.labels.model),
            Cow::Borrowed(&*self.labels.month),
        );
        match done {
            None => {
                Entry::Reserve { id, tenant, tier, request_id, model, month, amount: self.amount, at: self.created_at }
            }
            Some((at, actual)) => Entry::Done {
                id,
                tenant,
                tier,
                request_id,
                model,
                month,
                amount: self.amount,
                created: self.created_at,
                at,
                actual,
            },
        }
    }

    fn reservation(&self, id: &Id) -> Reservation {
        Reservation {
            id: id.text(),
            // Shared labels: clones copy no text.
            tenant: self.tenant.clone(),
            tenant_tier: self.labels.tier.clone(),
            request_id: self.request_id.text(),
            model: self.labels.model.clone(),
            month: self.labels.month.clone(),
            amount: Micros(self.amount),
            created_at: self.created_at,
        }
    }
}

/// A settled (`actual` charged) or released reservation.
#[derive(Clone)]
struct Finished {
    held: Held,
    at: UnixMillis,
    actual: Option<i64>,
}

impl Finished {
    fn state(&self) -> ReservationState {
        self.actual.map_or(ReservationState::Released, |a| ReservationState::Settled { actual: Micros(a) })
    }
}

/// The fields of a reservation as text, from a [`Reservation`] or a journal line.
struct Fields<'a> {
    id: &'a str,
    tenant: &'a str,
    tier: &'a str,
    request_id: &'a str,
    model: &'a str,
    month: &'a str,
    amount: i64,
    created_at: UnixMillis,
}

impl<'a> Fields<'a> {
    fn of(r: &'a Reservation) -> Fields<'a> {
        Fields {
            id: &r.id,
            tenant: &r.tenant,
            tier: &r.tenant_tier,
            request_id: &r.request_id,
            model: &r.model,
            month: &r.month,
            amount: r.amount.0,
            created_at: r.created_at,
        }
    }
}

/// Shrinks a map that has emptied out to a quarter of its capacity or less (after a burst).
macro_rules! shrink_if_sparse {
    ($c:expr) => {
        if $c.capacity() > 64 && $c.capacity() > 4 * $c.len() {
            $c.shrink_to_fit();
        }
    };
}

struct State {
    retention_ms: u64,
    max_finished: usize,
    /// tenant → its months. The key is the one copy of the tenant's name that its reservations
    /// share.
    accts: FastMap<Arc<str>, Months>,
    labels: LabelTable,
    active: FastMap<Id, Held>,
    /// (created_at, id) of every active reservation.
    by_age: BTreeSet<(UnixMillis, Id)>,
    /// Settled and released reservations, in finishing order.
    finished: IdRing<Finished>,
    last_now: UnixMillis,
    month: Option<Month>,
}

impl State {
    fn new(opts: &BudgetsOptions) -> State {
        State {
            retention_ms: opts.finished_retention_ms,
            max_finished: opts.max_finished,
            accts: FastMap::default(),
            labels: LabelTable::default(),
            active: FastMap::default(),
            by_age: BTreeSet::new(),
            // One more than the cap: an insert comes before the pop that makes room.
            finished: IdRing::expecting(opts.max_finished.saturating_add(1)),
            last_now: 0,
            month: None,
        }
    }

    /// Rebuilds a state from journal bytes; unreadable lines are skipped and counted.
    #[cfg(test)]
    fn replay(bytes: &[u8], opts: &BudgetsOptions) -> (State, u64) {
        let (st, unreadable) = Self::replay_from(bytes, opts).expect("reading a slice cannot fail");
        (st, unreadable.skipped)
    }

    /// The state a journal read from `journal` describes, line by line (a journal of up to the
    /// compaction threshold is never held whole: it would double the memory of a start), and
    /// which lines could not be read.
    fn replay_from(mut journal: impl io::BufRead, opts: &BudgetsOptions) -> io::Result<(State, Unreadable)> {
        let mut st = State::new(opts);
        let mut unreadable = Unreadable::default();
        let mut line = Vec::with_capacity(1024);
        loop {
            line.clear();
            if journal.read_until(b'\n', &mut line)? == 0 {
                break;
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let entry = serde_json::from_slice::<Entry<'_>>(&line);
            unreadable.line(entry.is_ok(), &line);
            if let Ok(e) = entry {
                st.apply(&e);
            }
        }
        Ok((st, unreadable))
    }

    fn acct(&self, tenant: &str, month: &str) -> Acct {
        self.slot(tenant, month).map(|s| s.acct).unwrap_or_default()
    }

    fn slot(&self, tenant: &str, month: &str) -> Option<Slot> {
        let m = Month::parse(month)?;
        self.accts.get(tenant).and_then(|ms| ms.as_slice().iter().find(|s| s.month() == m)).copied()
    }

    /// The account of `tenant` in `month`, and the tenant's shared name.
    fn acct_mut(&mut self, tenant: &str, month: Month) -> (Arc<str>, &mut Acct) {
        let (key, slot) = self.slot_mut(tenant, month);
        (key, &mut slot.acct)
    }

    /// [`State::acct_mut`] with the rest of the month's slot.
    fn slot_mut(&mut self, tenant: &str, month: Month) -> (Arc<str>, &mut Slot) {
        let key = match self.accts.get_key_value(tenant) {
            Some((k, _)) => k.clone(),
            None => {
                let k: Arc<str> = Arc::from(tenant);
                self.accts.insert(k.clone(), Months::One(Slot::new(month)));
                k
            }
        };
        let months = self.accts.get_mut(&*key).expect("inserted above");
        (key, months.get_or_insert(month))
    }

    /// The account of a month given as text; a month that does not parse (only possible from a
    /// damaged journal line) books into year 0, which the month pruning drops.
    fn acct_mut_text(&mut self, tenant: &str, month: &str) -> &mut Acct {
        &mut self.slot_mut_text(tenant, month).acct
    }

    fn slot_mut_text(&mut self, tenant: &str, month: &str) -> &mut Slot {
        self.slot_mut(tenant, Month::parse(month).unwrap_or(Month { year: 0, month: 1 })).1
    }

    /// Moves time forward: forgets old months and old finished records.
    fn advance(&mut self, now: UnixMillis) {
        if now <= self.last_now && self.month.is_some() {
            return;
        }
        self.last_now = self.last_now.max(now);
        let m = Month::of(self.last_now);
        if self.month != Some(m) {
            self.month = Some(m);
            let prev = prev_month(m);
            self.accts.retain(|_, months| months.retain(|s| s.acct.active > 0 || s.month() >= prev));
            shrink_if_sparse!(self.accts);
        }
        let horizon = self.last_now.saturating_sub(self.retention_ms);
        if self.finished.front().is_some_and(|(_, f)| f.at < horizon) {
            while self.finished.front().is_some_and(|(_, f)| f.at < horizon) {
                self.finished.pop_front();
            }
            self.finished.shrink_if_sparse();
        }
    }

    fn insert_active(&mut self, r: Fields<'_>) {
        let id = Id::new(r.id);
        if self.active.contains_key(&id) || self.finished.contains(&id) {
            return;
        }
        let labels = self.labels.get(r.tier, r.model, r.month);
        let (tenant, slot) = self.slot_mut(r.tenant, labels.account_month);
        if labels.account_tier.is_some() {
            slot.tier = labels.account_tier;
        }
        let acct = &mut slot.acct;
        acct.reserved = acct.reserved.saturating_add(r.amount);
        acct.active += 1;
        self.by_age.insert((r.created_at, id.clone()));
        let held =
            Held { tenant, labels, request_id: Id::new(r.request_id), amount: r.amount, created_at: r.created_at };
        self.active.insert(id, held);
    }

    /// Ends an active reservation: settled (`actual` charged) or released. `view` reads what the
    /// caller needs of it (a settlement only its tenant and amount, not a rebuilt `Reservation`).
    fn finish<T>(
        &mut self,
        id: &Id,
        at: UnixMillis,
        actual: Option<i64>,
        view: impl FnOnce(&Held, &Id) -> T,
    ) -> Option<T> {
        let (key, held) = self.active.remove_entry(id)?;
        self.by_age.remove(&(held.created_at, key.clone()));
        shrink_if_sparse!(self.active);
        let (_, acct) = self.acct_mut(&held.tenant, held.labels.account_month);
        acct.reserved = acct.reserved.saturating_sub(held.amount);
        acct.active = acct.active.saturating_sub(1);
        if let Some(a) = actual {
            acct.spent = acct.spent.saturating_add(a);
        }
        let seen = view(&held, &key);
        self.insert_finished(key, Finished { held, at, actual });
        Some(seen)
    }

    fn insert_finished(&mut self, id: Id, f: Finished) {
        self.finished.push_back(id, f);
        while self.finished.len() > self.max_finished {
            self.finished.pop_front();
        }
    }

    /// Applies one journal entry.
    fn apply(&mut self, e: &Entry<'_>) {
        match e {
            Entry::Snapshot { now, .. } => {
                self.advance(*now);
            }
            Entry::Reserve { id, tenant, tier, request_id, model, month, amount, at } => {
                self.advance(*at);
                self.insert_active(Fields {
                    id,
                    tenant,
                    tier,
                    request_id,
                    model,
                    month,
                    amount: *amount,
                    created_at: *at,
                });
            }
            Entry::Settle { id, actual, at } => {
                self.advance(*at);
                self.finish(&Id::new(id), *at, Some(*actual), |_, _| ());
            }
            Entry::Release { id, at } => {
                self.advance(*at);
                self.finish(&Id::new(id), *at, None, |_, _| ());
            }
            Entry::Charge { tenant, month, amount, at } => {
                self.advance(*at);
                let a = self.acct_mut_text(tenant, month);
                a.spent = a.spent.saturating_add(*amount);
            }
            Entry::Spent { tenant, month, spent, tier } => {
                let slot = self.slot_mut_text(tenant, month);
                slot.acct.spent = slot.acct.spent.saturating_add(*spent);
                if let Some(t) = tier.as_deref().and_then(Tier::parse) {
                    slot.tier = Some(t);
                }
            }
            Entry::Done { id, tenant, tier, request_id, model, month, amount, created, at, actual } => {
                self.advance(*at);
                let id = Id::new(id);
                if !self.active.contains_key(&id) {
                    let tenant = match self.accts.get_key_value(&**tenant) {
                        Some((k, _)) => k.clone(),
                        None => Arc::from(&**tenant),
                    };
                    let held = Held {
                        tenant,
                        labels: self.labels.get(tier, model, month),
                        request_id: Id::new(request_id),
                        amount: *amount,
                        created_at: *created,
                    };
                    self.insert_finished(id, Finished { held, at: *at, actual: *actual });
                }
            }
        }
    }

    /// Everything needed to rebuild this state, copied out (tenants and labels shared, no text
    /// formatted): what a snapshot is written from after the lock that guards the state is let go.
    fn snapshot(&self) -> Snapshot {
        let mut snap = self.snapshot_head();
        self.copy_finished(0, u64::MAX, usize::MAX, &mut snap.finished);
        snap
    }

    /// [`State::snapshot`] without the finished records (the bulk of it; [`State::copy_finished`]
    /// adds them a piece at a time).
    fn snapshot_head(&self) -> Snapshot {
        let prev = prev_month(Month::of(self.last_now));
        let spent = self
            .accts
            .iter()
            .flat_map(|(tenant, months)| months.as_slice().iter().map(move |slot| (tenant, slot)))
            .filter(|(_, s)| (s.acct.spent != 0 || s.tier.is_some()) && (s.acct.active > 0 || s.month() >= prev))
            .map(|(tenant, slot)| (tenant.clone(), slot.month(), slot.acct.spent, slot.tier))
            .collect();
        let active =
            self.by_age.iter().filter_map(|(_, id)| self.active.get(id).map(|h| (id.clone(), h.clone()))).collect();
        Snapshot { now: self.last_now, spent, active, finished: Vec::new() }
    }

    /// Copies to `out` at most `max` of the finished records numbered `from..until` (in finishing
    /// order; those forgotten since are skipped); returns the number to continue from.
    fn copy_finished(&self, from: u64, until: u64, max: usize, out: &mut Vec<(Id, Finished)>) -> u64 {
        let (from, until) = self.finished.clamp_seqs(from, until);
        let until = until.min(from.saturating_add(max as u64));
        out.extend(self.finished.range(from, until).map(|(id, f)| (id.clone(), f.clone())));
        until
    }

    fn spend_view(&self, tenant: &str, month: &str) -> SpendView {
        let slot = self.slot(tenant, month);
        let a = slot.map(|s| s.acct).unwrap_or_default();
        let tier = slot.and_then(|s| s.tier);
        SpendView { spent: Micros(a.spent), reserved: Micros(a.reserved), active_reservations: a.active, tier }
    }

    fn get(&self, id: &Id) -> Option<(Reservation, ReservationState)> {
        if let Some(h) = self.active.get(id) {
            return Some((h.reservation(id), ReservationState::Active));
        }
        self.finished.get(id).map(|f| (f.held.reservation(id), f.state()))
    }

    /// A canonical text form of everything observable (tests compare states with it).
    #[cfg(test)]
    fn dump(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let mut accts: Vec<_> = self
            .accts
            .iter()
            .flat_map(|(t, ms)| ms.as_slice().iter().map(move |s| (t, s.month().to_string(), s.acct, s.tier)))
            .filter(|(_, _, a, tier)| *a != Acct::default() || tier.is_some())
            .collect();
        accts.sort();
        for (t, m, a, tier) in accts {
            let _ =
                writeln!(s, "acct {t} {m} spent={} reserved={} active={} tier={tier:?}", a.spent, a.reserved, a.active);
        }
        for (_, id) in &self.by_age {
            let _ = writeln!(s, "active {:?}", self.active[id].reservation(id));
        }
        let mut fin: Vec<_> = self.finished.iter().map(|(id, f)| (f.held.reservation(id), f.state(), f.at)).collect();
        fin.sort_by(|a, b| a.0.id.cmp(&b.0.id));
        for (res, state, at) in fin {
            let _ = writeln!(s, "done {res:?} {state:?} at={at}");
        }
        s
    }
}

// ---------------------------------------------------------------------------------------------
// The journal file.

fn unavailable(e: io::Error) -> StoreError {
    StoreError::Unavailable(format!("budget journal: {e}"))
}

// ---------------------------------------------------------------------------------------------

struct Inner {
    state: State,
    journal: Option<Journal>,
    /// Group-commit mode: entries are staged and counted here, and written by the group commit.
    staged: Option<Arc<StageCounter>>,
}

impl Inner {
    /// Writes the entries (if durable), or stages them in group-commit mode. Returns whether a
    /// compaction is due.
    fn log(&mut self, entries: &[Entry<'_>]) -> Result<bool, StoreError> {
        let lines = |buf: &mut Vec<u8>| entries.iter().try_for_each(|e| entry_line(buf, e));
        match (&mut self.journal, &self.staged) {
            (Some(j), Some(counter)) => {
                j.stage_with(lines).map_err(unavailable)?;
                counter.staged();
                Ok(false)
            }
            (Some(j), None) => j.append_with(lines).map_err(unavailable),
            (None, _) => Ok(false),
        }
    }
}

/// A [`State`] copied for its snapshot ([`State::snapshot`]): the months' spend, the active
/// reservations oldest first, the finished ones in finishing order.
struct Snapshot {
    now: UnixMillis,
    spent: Vec<(Arc<str>, Month, i64, Option<Tier>)>,
    active: Vec<(Id, Held)>,
    finished: Vec<(Id, Finished)>,
}

impl Snapshot {
    /// Writes the snapshot lines to `w` in 256 KiB pieces (a big state's lines are never held in
    /// memory whole); returns the bytes written.
    fn write_to(&self, w: &mut dyn Write) -> io::Result<u64> {
        let mut buf = Vec::with_capacity(SPILL_BYTES + 4096);
        let mut total = 0u64;
        let mut spill = |buf: &mut Vec<u8>, force: bool| -> io::Result<()> {
            if force || buf.len() >= SPILL_BYTES {
                w.write_all(buf)?;
                total += buf.len() as u64;
                buf.clear();
            }
            Ok(())
        };
        let out = &mut buf;
        entry_line(out, &Entry::Snapshot { v: SNAPSHOT_VERSION, now: self.now })?;
        for (tenant, month, spent, tier) in &self.spent {
            let e = Entry::Spent {
                tenant: Cow::Borrowed(tenant),
                month: Cow::Owned(month.to_string()),
                spent: *spent,
                tier: tier.map(|t| Cow::Borrowed(t.as_str())),
            };
            entry_line(out, &e)?;
            spill(out, false)?;
        }
        for (id, h) in &self.active {
            entry_line(out, &h.snapshot_entry(id, None))?;
            spill(out, false)?;
        }
        for (id, f) in &self.finished {
            entry_line(out, &f.held.snapshot_entry(id, Some((f.at, f.actual))))?;
            spill(out, false)?;
        }
        spill(out, true)?;
        Ok(total)
    }
}

struct Shared {
    inner: Mutex<Inner>,
    compacting: AtomicBool,
    /// A group commit's write failed after its changes were applied here (a full volume): the
    /// state holds changes the file lacks, so the next `sync` rewrites the journal from it.
    snapshot_due: AtomicBool,
}

/// Embedded budgets: in memory, journaled to a data directory (see the module docs).
pub struct MemoryBudgets {
    shared: Arc<Shared>,
}

impl MemoryBudgets {
    /// Opens (creating `dir` if needed) with default options: replays and compacts the journal.
    pub fn open(dir: &Path) -> io::Result<MemoryBudgets> {
        Self::open_with(dir, BudgetsOptions::default())
    }

    pub fn open_with(dir: &Path, opts: BudgetsOptions) -> io::Result<MemoryBudgets> {
        fs::create_dir_all(dir)?;
        let path = dir.join(JOURNAL_FILE);
        let (state, unreadable) = match File::open(&path) {
            Ok(f) => State::replay_from(io::BufReader::with_capacity(256 * 1024, f), &opts)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => State::replay_from(io::empty(), &opts)?,
            Err(e) => return Err(e),
        };
        unreadable.check(&path, "month spend and holds")?;
        let mut snap = Vec::new();
        state.snapshot().write_to(&mut snap)?;
        let journal = Journal::install(dir, TMP_FILE, &path, &snap, opts.compact_above_bytes)?;
        Ok(Self::build(state, Some(journal)))
    }

    /// No journal: nothing survives the process (tests, benches).
    pub fn in_memory() -> MemoryBudgets {
        Self::in_memory_with(BudgetsOptions::default())
    }

    pub fn in_memory_with(opts: BudgetsOptions) -> MemoryBudgets {
        Self::build(State::new(&opts), None)
    }

    fn build(state: State, journal: Option<Journal>) -> MemoryBudgets {
        MemoryBudgets {
            shared: Arc::new(Shared {
                inner: Mutex::new(Inner { state, journal, staged: None }),
                compacting: AtomicBool::new(false),
                snapshot_due: AtomicBool::new(false),
            }),
        }
    }

    /// Switches to group-commit mode: changes are applied at once but their journal lines are
    /// staged (counted in `counter`) and written by [`Staged::flush_staged`], which the caller's
    /// group commit runs before anything that depends on them is acknowledged.
    pub fn group_commit(&self, counter: Arc<StageCounter>) {
        self.shared.inner.lock().staged = Some(counter);
    }

    /// Flushes the journal to stable storage (fsync). Call it periodically from a background
    /// worker: it bounds what a power loss can take. No-op without a journal.
    pub fn sync(&self) -> io::Result<()> {
        // Changes whose group-commit write failed are in the state only: written back as a
        // snapshot once the volume takes it (a settlement of a request already served would
        // otherwise be lost at the next start — durability audit).
        if self.shared.snapshot_due.load(Ordering::Acquire) && !self.shared.compacting.load(Ordering::Acquire) {
            self.compact()?;
            self.shared.snapshot_due.store(false, Ordering::Release);
            tracing::info!(
                "budget journal: rewritten from memory after failed writes; the changes they carried are durable again"
            );
        }
        let file = self.shared.inner.lock().journal.as_ref().map(|j| j.file.clone());
        match file {
            Some(f) => f.sync_data(),
            None => Ok(()),
        }
    }

    /// Rewrites the journal as a snapshot now (returns at once if a compaction is running).
    pub fn compact(&self) -> io::Result<()> {
        if self.shared.compacting.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let r = self.shared.compact();
        self.shared.compacting.store(false, Ordering::Release);
        r
    }

    /// Current journal size in bytes (0 without a journal).
    pub fn journal_len(&self) -> u64 {
        self.shared.inner.lock().journal.as_ref().map_or(0, |j| j.len)
    }

    /// Synchronous core of [`Budgets::reserve`].
    pub fn reserve_now(&self, r: &ReserveRequest<'_>) -> Result<ReserveOutcome, StoreError> {
        let amount = r.amount.0.max(0);
        let min = r.min_amount.map(|m| m.0.clamp(0, amount));
        let mut res = r.reservation(Micros(amount));
        let mut g = self.shared.inner.lock();
        let a = g.state.acct(r.tenant, &res.month);
        let remaining = r.monthly_budget.0.saturating_sub(a.spent).saturating_sub(a.reserved);
        let hold = match min {
            _ if amount <= remaining => amount,
            // What is left, or nothing when the tenant is past its budget (an approved
            // over-budget request, `m` 0, is admitted even then).
            Some(m) if remaining.max(0) >= m => remaining.max(0),
            _ => {
                return Ok(ReserveOutcome::Insufficient {
                    spent: Micros(a.spent),
                    reserved: Micros(a.reserved),
                    remaining: Micros(remaining.max(0)),
                })
            }
        };
        res.amount = Micros(hold);
        let compact = g.log(std::slice::from_ref(&reserve_entry(&res)))?;
        g.state.advance(r.now);
        g.state.insert_active(Fields::of(&res));
        drop(g);
        self.after_write(compact);
        Ok(ReserveOutcome::Reserved(res))
    }

    /// Synchronous core of [`Budgets::settle`].
    pub fn settle_now(&self, id: &str, actual: Micros, now: UnixMillis) -> Result<SettleOutcome, StoreError> {
        let actual = actual.max(Micros::ZERO);
        let key = Id::new(id);
        let mut g = self.shared.inner.lock();
        if !g.state.active.contains_key(&key) {
            let known = g.state.finished.contains(&key);
            return Ok(if known { SettleOutcome::NotActive } else { SettleOutcome::NotFound });
        }
        let entry = Entry::Settle { id: Cow::Borrowed(id), actual: actual.0, at: now };
        let compact = g.log(std::slice::from_ref(&entry))?;
        g.state.advance(now);
        let ended = g.state.finish(&key, now, Some(actual.0), |h, _| (h.tenant.clone(), Micros(h.amount)));
        drop(g);
        self.after_write(compact);
        Ok(match ended {
            Some((tenant, reserved)) => SettleOutcome::Settled(Settlement::of(tenant, reserved, actual)),
            None => SettleOutcome::NotFound,
        })
    }

    /// Synchronous core of [`Budgets::release`].
    pub fn release_now(&self, id: &str, now: UnixMillis) -> Result<Option<Reservation>, StoreError> {
        let key = Id::new(id);
        let mut g = self.shared.inner.lock();
        if !g.state.active.contains_key(&key) {
            return Ok(None);
        }
        let entry = Entry::Release { id: Cow::Borrowed(id), at: now };
        let compact = g.log(std::slice::from_ref(&entry))?;
        g.state.advance(now);
        let ended = g.state.finish(&key, now, None, Held::reservation);
        drop(g);
        self.after_write(compact);
        Ok(ended)
    }

    /// Synchronous core of [`Budgets::expire`].
    pub fn expire_now(&self, older_than: UnixMillis, now: UnixMillis) -> Result<Vec<Reservation>, StoreError> {
        let mut g = self.shared.inner.lock();
        let ids: Vec<Id> =
            g.state.by_age.iter().take_while(|(at, _)| *at < older_than).map(|(_, id)| id.clone()).collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let entries: Vec<Entry<'_>> =
            ids.iter().map(|id| Entry::Release { id: Cow::Owned(id.text()), at: now }).collect();
        let compact = g.log(&entries)?;
        g.state.advance(now);
        let ended: Vec<Reservation> =
            ids.iter().filter_map(|id| g.state.finish(id, now, None, Held::reservation)).collect();
        drop(g);
        self.after_write(compact);
        Ok(ended)
    }

    /// Synchronous core of [`Budgets::charge`]. `month` must be `YYYY-MM`.
    pub fn charge_now(&self, tenant: &str, month: &str, amount: Micros, now: UnixMillis) -> Result<(), StoreError> {
        if Month::parse(month).is_none() {
            return Err(StoreError::Unavailable(format!("budget charge: month {month:?} is not YYYY-MM")));
        }
        if amount.0 <= 0 {
            return Ok(());
        }
        let entry =
            Entry::Charge { tenant: Cow::Borrowed(tenant), month: Cow::Borrowed(month), amount: amount.0, at: now };
        let mut g = self.shared.inner.lock();
        let compact = g.log(std::slice::from_ref(&entry))?;
        g.state.apply(&entry);
        drop(g);
        self.after_write(compact);
        Ok(())
    }

    pub fn tenant_spend_now(&self, tenant: &str, month: &str) -> SpendView {
        self.shared.inner.lock().state.spend_view(tenant, month)
    }

    pub fn active_now(&self, limit: usize) -> Vec<Reservation> {
        let g = self.shared.inner.lock();
        g.state
            .by_age
            .iter()
            .take(limit)
            .filter_map(|(_, id)| g.state.active.get(id).map(|h| h.reservation(id)))
            .collect()
    }

    pub fn get_now(&self, id: &str) -> Option<(Reservation, ReservationState)> {
        let key = Id::new(id);
        self.shared.inner.lock().state.get(&key)
    }

    fn after_write(&self, compact_due: bool) {
        if compact_due {
            self.shared.compact_in_background();
        }
    }

    #[cfg(test)]
    fn dump(&self) -> String {
        self.shared.inner.lock().state.dump()
    }

    #[cfg(test)]
    fn is_compacting(&self) -> bool {
        self.shared.compacting.load(Ordering::Acquire)
    }
}

impl Staged for MemoryBudgets {
    fn flush_staged(&self) -> io::Result<()> {
        let flushed = match self.shared.inner.lock().journal.as_mut() {
            Some(j) => j.flush_staged(),
            None => Ok(false),
        };
        let compact = flushed.inspect_err(|_| self.shared.snapshot_due.store(true, Ordering::Release))?;
        self.after_write(compact);
        Ok(())
    }
}

impl Drop for MemoryBudgets {
    fn drop(&mut self) {
        if let Err(e) = self.flush_staged() {
            tracing::warn!(error = %e, "budget journal: writing staged lines at close failed");
        }
        if let Err(e) = self.sync() {
            tracing::warn!(error = %e, "budget journal: final sync failed");
        }
    }
}

impl Shared {
    fn compact_in_background(self: &Arc<Self>) {
        if self.compacting.swap(true, Ordering::AcqRel) {
            return;
        }
        let shared = Arc::clone(self);
        let spawned = std::thread::Builder::new().name("budgets-compact".into()).spawn(move || {
            if let Err(e) = shared.compact() {
                tracing::warn!(error = %e, "budget journal compaction failed; retrying when it has doubled");
                if let Some(j) = shared.inner.lock().journal.as_mut() {
                    j.base_len = j.base_len.max(j.len);
                }
            }
            shared.compacting.store(false, Ordering::Release);
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "budget journal compaction thread did not start");
            self.compacting.store(false, Ordering::Release);
        }
    }

    /// Caller holds the `compacting` flag.
    fn compact(&self) -> io::Result<()> {
        // 1. Locked: the staged lines written, so that the file ends (at `l0`) where the state
        //    stands — ahead of their group commit, which writes this journal before the outbox
        //    anyway, so a crash can already leave journal lines whose events are not written —
        //    and the state copied (the module docs say why not re-read the file) — the
        //    finished records, the bulk, in pieces, the lock let go between them. A record
        //    forgotten meanwhile is left out: forgetting it is all replaying it would lead to.
        let (dir, l0, mut snapshot, end) = {
            let mut g = self.inner.lock();
            let Inner { state, journal, .. } = &mut *g;
            let Some(j) = journal.as_mut() else { return Ok(()) };
            j.write_staged()?;
            (j.dir.clone(), j.len, state.snapshot_head(), state.finished.end_seq())
        };
        let mut from = 0;
        while from < end {
            let g = self.inner.lock();
            from = g.state.copy_finished(from, end, COPY_PIECE, &mut snapshot.finished);
        }
        let path = dir.join(JOURNAL_FILE);
        // 2. No lock: the copy written as a snapshot.
        let tmp_path = dir.join(TMP_FILE);
        let tmp = create_append(&tmp_path)?;
        let snap_len = snapshot.write_to(&mut &tmp)?;
        drop(snapshot);
        tmp.sync_data()?;
        // 3. Locked: append what was written meanwhile, make it durable, swap the files.
        let mut g = self.inner.lock();
        let Some(j) = g.journal.as_mut() else { return Ok(()) };
        let mut tail = Vec::new();
        if j.len > l0 {
            let mut f = File::open(&path)?;
            f.seek(SeekFrom::Start(l0))?;
            f.take(j.len - l0).read_to_end(&mut tail)?;
        }
        (&tmp).write_all(&tail)?;
        tmp.sync_data()?;
        fs::rename(&tmp_path, &path)?;
        sync_dir(&dir)?;
        j.file = Arc::new(tmp);
        j.len = snap_len + tail.len() as u64;
        j.base_len = j.len;
        j.dirty = false;
        Ok(())
    }
}

impl super::budget::BudgetsNow for MemoryBudgets {
    fn reserve_now(&self, r: &ReserveRequest<'_>) -> Result<ReserveOutcome, StoreError> {
        MemoryBudgets::reserve_now(self, r)
    }
    fn settle_now(&self, id: &str, actual: Micros, now: UnixMillis) -> Result<SettleOutcome, StoreError> {
        MemoryBudgets::settle_now(self, id, actual, now)
    }
}

#[async_trait]
impl Budgets for MemoryBudgets {
    fn now(&self) -> Option<&dyn super::budget::BudgetsNow> {
        Some(self)
    }

    async fn active_count(&self) -> Result<u64, StoreError> {
        Ok(self.shared.inner.lock().state.active.len() as u64)
    }

    async fn sync(&self) -> Result<(), StoreError> {
        MemoryBudgets::sync(self).map_err(|e| StoreError::Unavailable(format!("budget journal fsync: {e}")))
    }

    async fn reserve(&self, r: &ReserveRequest<'_>) -> Result<ReserveOutcome, StoreError> {
        self.reserve_now(r)
    }

    async fn settle(&self, id: &str, actual: Micros, now: UnixMillis) -> Result<SettleOutcome, StoreError> {
        self.settle_now(id, actual, now)
    }

    async fn release(&self, id: &str, now: UnixMillis) -> Result<Option<Reservation>, StoreError> {
        self.release_now(id, now)
    }

    async fn expire(&self, older_than: UnixMillis, now: UnixMillis) -> Result<Vec<Reservation>, StoreError> {
        self.expire_now(older_than, now)
    }

    async fn charge(
        &self,
        _id: &str,
        tenant: &str,
        month: &str,
        amount: Micros,
        now: UnixMillis,
    ) -> Result<(), StoreError> {
        self.charge_now(tenant, month, amount, now)
    }

    async fn tenant_spend(&self, tenant: &str, month: &str) -> Result<SpendView, StoreError> {
        Ok(self.tenant_spend_now(tenant, month))
    }

    async fn active(&self, limit: usize) -> Result<Vec<Reservation>, StoreError> {
        Ok(self.active_now(limit))
    }

    async fn get(&self, id: &str) -> Result<Option<(Reservation, ReservationState)>, StoreError> {
        Ok(self.get_now(id))
    }
}

#[cfg(test)]
#[path = "budget_tests.rs"]
mod tests;
