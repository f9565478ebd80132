//! The durable local outbox (CONTRACT §7, issue 5): every event is written to the OS before the
//! request it describes is forwarded, then delivered at-least-once by the [`crate::ledger::relay`].
//!
//! # Layout (`PREAUTH_DATA_DIR/outbox/`)
//! - `segment-<20-digit id>.ndjson` — one JSON event per line, appended in order. A segment rolls
//!   at 16 MiB; each process start opens a new segment (older ones are never written again).
//! - `cursor.json` — `{"segment":…,"offset":…}`, the first byte not yet delivered; replaced
//!   atomically (write `cursor.json.tmp`, rename). Everything after it is replayed after a restart.
//! - `parked/` — batches the sink rejected for good (`parked-<ms>-<first id>.ndjson` plus a
//!   `.reason` file), and lines that could not be parsed (`corrupt.ndjson`). Move a parked file
//!   back in as a segment with a higher id to replay it.
//!
//! # Durability and fsync policy
//! - [`Outbox::append`] returns once the event's bytes were handed to the kernel with `write(2)`
//!   (no fsync): a crash or `SIGKILL` of the process loses nothing that `append` acknowledged.
//! - [`Outbox::sync`] (`fdatasync`) runs every [`SYNC_INTERVAL`] (100 ms) from
//!   [`OutboxSyncer`], and a rolled segment is synced by the next such tick. **A power loss or
//!   kernel crash may lose the events appended in the last ~100 ms** (plus whatever the disk's
//!   own cache drops if it lies about flushes). Nothing on the hot path waits for a disk flush.
//! - The cursor is not fsynced: after a power loss it may point earlier, so some delivered events
//!   are delivered again (receivers deduplicate by `event_id`); it never points later than what
//!   was delivered, because it is written after the sink acknowledged.
//! - A line cut short by a crash mid-`write` (the last line of the last segment without its
//!   newline) is truncated away on open: its `append` never returned, so its request was never
//!   forwarded.
//!
//! # Page cache
//! Each `sync` also drops from the page cache the segment bytes it just made durable that no
//! reader needs soon (`posix_fadvise(DONTNEED)`): everything synced without a relay, what the
//! relay has delivered with one. The sidecar writes ≈ 1.9 KB of events per request and never
//! reads them back on the hot path; left cached, they grow the node's page cache (and a
//! container's memory use) by that much per request, and every append lands on a newly
//! allocated page (zeroed, then copied into: on a fresh VM the host faults each one in, which
//! cost ≈ 12% of the sidecar's CPU in the load benchmark). Dropped pages are freed and reused by
//! the next appends. Local ledger queries read the dropped segments back from disk.
//!
//! # Group commit
//! `append` serialises the event outside any lock, then stages its line in a shared buffer
//! (short critical section) and takes the writer lock. The first appender to get the writer lock
//! writes everything staged so far in one `write(2)` (the batch of every concurrent appender) and
//! publishes the sequence number it covered; the others find their line already written and
//! return. One appender alone costs one `write(2)`; N concurrent appenders cost far fewer than N.
//! A failed `write` is reported to exactly the appenders of that batch (the partial bytes are
//! truncated away, or the segment is abandoned), so the caller can take the failsafe path.
//!
//! # Bound (`PREAUTH_OUTBOX_MAX_BYTES`, `PREAUTH_OUTBOX_FULL_POLICY`)
//! With a relay (a ledger URL is set) the bytes not yet delivered are bounded by `max_bytes`:
//! past it `failsafe` makes `append` return [`OutboxError::Full`] (the proxy takes the failsafe
//! path of its mode) and `drop` drops the event (counted as `dropped`). That bound applies to
//! what starts a request (decisions, approval requests); the events that complete an admitted
//! request (settlements, releases, approval consumptions) and operator events may use a further
//! headroom of max(`max_bytes` / 8, 16 MiB) — room for the settlements of ≈ 18,000 requests in
//! flight when it filled — so that a request forwarded before the outbox filled does not lose its
//! settlement ([`takes_headroom`]). A follow-up refused even so is counted as dropped, whatever
//! the policy, and logged with what it carried (`state::recorded`). Without a relay nothing is
//! "undelivered": the local ledger is bounded instead by deleting its oldest segments once the
//! directory exceeds `max_bytes` (and, always, segments older than the retention).
//!
//! # Local ledger (retention)
//! When Postgres is not the sink (no ledger URL, or HTTP), segments are kept after delivery for
//! `PREAUTH_LOCAL_LEDGER_RETENTION_HOURS` (by the segment's last write time) and serve
//! `GET /api/v1/enforcement/ledger` ([`crate::ledger::local`]). With Postgres as the sink, a
//! segment is deleted as soon as it is fully delivered.
//!
//! Owns: `Outbox`, `OutboxSyncer`, `OutboxMetrics`, the on-disk format. Imports: event, config
//! (full policy), telemetry (metric handles), decide::time, pingora (background service).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use parking_lot::Mutex;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde::{Deserialize, Serialize};

use crate::config::{Config, OutboxFullPolicy};
use crate::decide::time::parse_rfc3339;
use crate::ledger::event::{Event, EventLine, EventType};

/// Segments roll past this size.
pub const DEFAULT_SEGMENT_BYTES: u64 = 16 * 1024 * 1024;
/// How often [`OutboxSyncer`] fsyncs: the window a power loss may lose.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(100);
/// How often [`OutboxSyncer`] applies retention.
pub const MAINTAIN_INTERVAL: Duration = Duration::from_secs(10);
/// Smallest headroom above `max_bytes` for follow-up events (see [`takes_headroom`]).
/// Sized for the requests in flight when the outbox fills (a settlement is ≈ 0.9 KB), not for
/// the bound: 64 KiB lost settlements of 190 streams with a 1 MiB bound (audit).
pub const FOLLOW_UP_HEADROOM_MIN: u64 = 16 * 1024 * 1024;
/// Sub-directory for rejected batches and unreadable lines.
pub const PARKED_DIR: &str = "parked";

const CURSOR_FILE: &str = "cursor.json";
const CURSOR_TMP: &str = "cursor.json.tmp";
const SEGMENT_PREFIX: &str = "segment-";
const SEGMENT_SUFFIX: &str = ".ndjson";
const CORRUPT_FILE: &str = "corrupt.ndjson";
/// Smallest read when scanning segments; grown when one line is longer.
const MIN_READ: usize = 64 * 1024;
const MAX_READ: usize = 8 * 1024 * 1024;

/// `data_dir/outbox`.
pub fn outbox_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("outbox")
}

pub fn segment_file_name(id: u64) -> String {
    format!("{SEGMENT_PREFIX}{id:020}{SEGMENT_SUFFIX}")
}

pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    name.strip_prefix(SEGMENT_PREFIX)?.strip_suffix(SEGMENT_SUFFIX)?.parse().ok()
}

/// Segment ids in `dir`, ascending.
pub fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut ids = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(id) = entry.file_name().to_str().and_then(parse_segment_file_name) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// Last modification time of a file, Unix ms (0 when unknown).
pub fn mtime_ms(meta: &fs::Metadata) -> u64 {
    meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_millis() as u64)
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Whether an event of type `t` may use the headroom above `max_bytes`: everything except what a
/// new request starts with (its decision, its approval request). Settlements, releases and
/// approval consumptions complete a request admitted before the outbox filled (their number is
/// bounded by the reservations already held, since a full outbox admits nothing new under
/// `failsafe`), and approval grants/denials and runtime changes are operator actions: losing
/// them would leave a forwarded, charged request without its settlement in the ledger.
pub fn takes_headroom(t: EventType) -> bool {
    !matches!(t, EventType::Decision | EventType::ApprovalRequested)
}

/// A place in the outbox: the byte right after an event's line (so acknowledging a position
/// acknowledges that event and everything before it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Position {
    pub segment: u64,
    pub offset: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// `failsafe` policy and `max_bytes` of undelivered events reached.
    #[error("outbox full: {undelivered_bytes} undelivered bytes, limit {max_bytes} (PREAUTH_OUTBOX_MAX_BYTES)")]
    Full { undelivered_bytes: u64, max_bytes: u64 },
    #[error("outbox write failed: {0}")]
    Io(#[from] io::Error),
}

/// How an outbox is run.
#[derive(Clone, Debug)]
pub struct OutboxOptions {
    pub max_bytes: u64,
    pub full_policy: OutboxFullPolicy,
    pub segment_bytes: u64,
    /// A relay drains the outbox (a ledger URL is set): cursor, depth and the full policy apply.
    pub relay: bool,
    /// Keep delivered segments (all segments without a relay) this long as the local ledger;
    /// `None`: delete a segment once it is fully delivered.
    pub retention: Option<Duration>,
}

impl OutboxOptions {
    /// Relay mode, segments deleted on delivery (Postgres as the sink).
    pub fn new(max_bytes: u64, full_policy: OutboxFullPolicy) -> OutboxOptions {
        OutboxOptions { max_bytes, full_policy, segment_bytes: DEFAULT_SEGMENT_BYTES, relay: true, retention: None }
    }

    /// From the configuration: relay iff `PREAUTH_LEDGER_URL` is set; the local ledger is kept
    /// for `PREAUTH_LOCAL_LEDGER_RETENTION_HOURS` unless Postgres is the sink.
    pub fn from_config(c: &Config) -> OutboxOptions {
        let postgres = c.ledger_url.as_deref().is_some_and(crate::ledger::sink::is_postgres_url);
        OutboxOptions {
            relay: c.ledger_url.is_some(),
            retention: (!postgres).then(|| Duration::from_secs(c.local_ledger_retention_hours.saturating_mul(3600))),
            ..OutboxOptions::new(c.outbox_max_bytes, c.outbox_full_policy)
        }
    }
}

/// Counters and gauges of one outbox (totals since open).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutboxStats {
    pub appended: u64,
    pub delivered: u64,
    pub dropped: u64,
    pub parked: u64,
    /// Events not yet delivered (0 without a relay).
    pub depth: u64,
    /// `occurred_at` (append time for events appended by this process) of the oldest
    /// undelivered event, Unix ms.
    pub oldest_undelivered_ms: Option<u64>,
    pub undelivered_bytes: u64,
    pub disk_bytes: u64,
}

struct Staging {
    buf: Vec<u8>,
    events: u64,
    /// Appenders of `buf` that wait for its write and check its outcome (staged lines do not:
    /// their group commit learns of a failure from `flush_staged`).
    waiters: u64,
    /// Sequence number of the last staged line.
    last_seq: u64,
    /// Wall time the first line in `buf` was staged.
    first_ms: u64,
}

struct SegInfo {
    bytes: u64,
    closed_at_ms: u64,
}

struct Failure {
    first: u64,
    last: u64,
    remaining: u64,
    kind: io::ErrorKind,
    message: String,
}

struct Writer {
    file: Arc<File>,
    seg: u64,
    seg_size: u64,
    /// Every segment on disk except the current one.
    closed: BTreeMap<u64, SegInfo>,
    /// Every staged line up to this sequence number has been written (or has failed).
    done_seq: u64,
    failures: Vec<Failure>,
    needs_roll: bool,
    spare: Vec<u8>,
    dirty: bool,
    unsynced: Vec<Arc<File>>,
    dir_dirty: bool,
    /// A failed batch held staged lines: the next `flush_staged` reports it.
    staged_lost: bool,
}

/// Sizes of the segments at one instant, for readers (no lock held while reading).
#[derive(Clone, Debug)]
struct Bounds {
    current: u64,
    current_size: u64,
    closed: Vec<(u64, u64)>,
}

impl Bounds {
    /// (end offset, closed) of a segment that exists.
    fn end_of(&self, seg: u64) -> Option<(u64, bool)> {
        if seg == self.current {
            return Some((self.current_size, false));
        }
        self.closed.binary_search_by_key(&seg, |&(id, _)| id).ok().map(|i| (self.closed[i].1, true))
    }

    fn next_after(&self, seg: u64) -> Option<u64> {
        let i = self.closed.partition_point(|&(id, _)| id <= seg);
        self.closed.get(i).map(|&(id, _)| id).or((self.current > seg).then_some(self.current))
    }

    fn first(&self) -> u64 {
        self.closed.first().map_or(self.current, |&(id, _)| id)
    }

    /// The canonical form of `p`: inside an existing segment, never at the end of a closed one.
    fn normalize(&self, mut p: Position) -> Position {
        loop {
            if p.segment < self.first() {
                p = Position { segment: self.first(), offset: 0 };
            }
            match self.end_of(p.segment) {
                None => match self.next_after(p.segment) {
                    Some(n) => p = Position { segment: n, offset: 0 },
                    None => return Position { segment: self.current, offset: self.current_size },
                },
                Some((end, closed)) => {
                    if p.offset > end {
                        p.offset = end;
                    }
                    if closed && p.offset == end {
                        if let Some(n) = self.next_after(p.segment) {
                            p = Position { segment: n, offset: 0 };
                            continue;
                        }
                    }
                    return p;
                }
            }
        }
    }

    /// Bytes from `a` to `b` (`a <= b`, both normalized or ends of segments).
    fn bytes_between(&self, a: Position, b: Position) -> u64 {
        if a.segment == b.segment {
            return b.offset.saturating_sub(a.offset);
        }
        let mut total = self.end_of(a.segment).map_or(0, |(end, _)| end.saturating_sub(a.offset));
        for &(id, bytes) in &self.closed {
            if id > a.segment && id < b.segment {
                total += bytes;
            }
        }
        if self.current > a.segment && self.current < b.segment {
            total += self.current_size;
        }
        total + b.offset
    }
}

/// A cached read handle on one segment.
#[derive(Default)]
struct ReadCache {
    file: Option<(u64, File)>,
}

impl ReadCache {
    fn read(&mut self, dir: &Path, seg: u64, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        if self.file.as_ref().map(|(id, _)| *id) != Some(seg) {
            self.file = Some((seg, File::open(dir.join(segment_file_name(seg)))?));
        }
        let (_, f) = self.file.as_ref().expect("just opened");
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }
}

/// Calls `f(position after the line, line)` for each complete line from `from` on, in order,
/// until `f` returns false or the committed end is reached. The unterminated tail of a closed
/// segment (a crash mid-write in an older run) is skipped with a warning.
fn walk(
    dir: &Path,
    cache: &mut ReadCache,
    bounds: &Bounds,
    from: Position,
    chunk: usize,
    mut f: impl FnMut(Position, &[u8]) -> bool,
) -> io::Result<()> {
    let mut pos = from;
    let chunk = chunk.clamp(MIN_READ, MAX_READ);
    let mut want = chunk;
    loop {
        let (end, closed) = match bounds.end_of(pos.segment) {
            Some(x) => x,
            None => match bounds.next_after(pos.segment) {
                Some(n) => {
                    pos = Position { segment: n, offset: 0 };
                    continue;
                }
                None => return Ok(()),
            },
        };
        if pos.offset >= end {
            match bounds.next_after(pos.segment) {
                Some(n) if closed => {
                    pos = Position { segment: n, offset: 0 };
                    continue;
                }
                _ => return Ok(()),
            }
        }
        let remaining = end - pos.offset;
        let len = remaining.min(want as u64) as usize;
        let data = cache.read(dir, pos.segment, pos.offset, len)?;
        let mut start = 0usize;
        while let Some(i) = data[start..].iter().position(|&b| b == b'\n') {
            let line = &data[start..start + i];
            start += i + 1;
            if !f(Position { segment: pos.segment, offset: pos.offset + start as u64 }, line) {
                return Ok(());
            }
        }
        if start == 0 {
            if (len as u64) < remaining {
                want = want.saturating_mul(2);
                continue;
            }
            if closed {
                tracing::warn!(
                    segment = pos.segment,
                    bytes = remaining,
                    "outbox: skipping an unterminated line at the end of a segment"
                );
                pos.offset = end;
                continue;
            }
            return Ok(());
        }
        pos.offset += start as u64;
        want = chunk;
    }
}

#[derive(Deserialize)]
struct OccurredAt<'a> {
    #[serde(borrow)]
    occurred_at: std::borrow::Cow<'a, str>,
}

fn occurred_ms(line: &[u8]) -> Option<u64> {
    serde_json::from_slice::<OccurredAt>(line).ok().and_then(|o| parse_rfc3339(&o.occurred_at))
}

struct Reader {
    cursor: Position,
    cache: ReadCache,
    /// Positions of the lines handed out by the last `read_batch`, ascending.
    last_read: Vec<Position>,
}

/// The durable outbox. Share it as `Arc<Outbox>`; every method takes `&self`.
pub struct Outbox {
    dir: PathBuf,
    opts: OutboxOptions,
    staging: Mutex<Staging>,
    writer: Mutex<Writer>,
    reader: Mutex<Reader>,
    undelivered_bytes: AtomicU64,
    depth: AtomicU64,
    oldest_ms: AtomicU64,
    disk_bytes: AtomicU64,
    cursor_segment: AtomicU64,
    appended: AtomicU64,
    delivered: AtomicU64,
    dropped: AtomicU64,
    parked: AtomicU64,
    /// Paces the "write failed" log line (on a full volume every request meets it).
    write_log: crate::telemetry::EverySecond,
    /// Paces the "outbox full" log line.
    full_log: crate::telemetry::EverySecond,
    appended_signal: tokio::sync::Notify,
    /// Group-commit mode (`stage`): counts staged lines for the group commit.
    stage_counter: Option<Arc<crate::commit::StageCounter>>,
    /// Segment bytes before this position are no longer in the page cache (see the module doc).
    uncached: Mutex<Position>,
}

fn create_segment(dir: &Path, id: u64) -> io::Result<File> {
    OpenOptions::new().append(true).create_new(true).open(dir.join(segment_file_name(id)))
}

/// Page size the page-cache drop rounds down to (a larger page only drops less).
const PAGE: u64 = 4096;

/// Drops `len` bytes (0: to the end) of `file` from `offset` on out of the page cache; they must
/// be durable already (dirty pages are not dropped).
fn drop_cached(file: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else { return };
        let _ = posix_fadvise(file, offset, len, PosixFadviseAdvice::POSIX_FADV_DONTNEED);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Truncates an unterminated last line; returns the new length.
fn repair_tail(path: &Path, len: u64) -> io::Result<u64> {
    if len == 0 {
        return Ok(0);
    }
    let f = OpenOptions::new().read(true).write(true).open(path)?;
    let mut last = [0u8; 1];
    f.read_exact_at(&mut last, len - 1)?;
    if last[0] == b'\n' {
        return Ok(len);
    }
    let mut end = len;
    let mut keep = 0u64;
    while end > 0 {
        let start = end.saturating_sub(MIN_READ as u64);
        let mut buf = vec![0u8; (end - start) as usize];
        f.read_exact_at(&mut buf, start)?;
        if let Some(i) = buf.iter().rposition(|&b| b == b'\n') {
            keep = start + i as u64 + 1;
            break;
        }
        end = start;
    }
    f.set_len(keep)?;
    f.sync_all()?;
    tracing::warn!(segment = %path.display(), dropped_bytes = len - keep, "outbox: truncated a line cut short by a crash");
    Ok(keep)
}

fn load_cursor(dir: &Path) -> Option<Position> {
    let mut s = String::new();
    match File::open(dir.join(CURSOR_FILE)) {
        Ok(mut f) => f.read_to_string(&mut s).ok()?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(error = %e, "outbox: cannot read the cursor; replaying from the oldest segment");
            return None;
        }
    };
    match serde_json::from_str(&s) {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(error = %e, "outbox: unreadable cursor; replaying from the oldest segment");
            None
        }
    }
}

fn store_cursor(dir: &Path, p: Position) -> io::Result<()> {
    let tmp = dir.join(CURSOR_TMP);
    let mut f = File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(&p).expect("position serialises"))?;
    drop(f);
    fs::rename(tmp, dir.join(CURSOR_FILE))
}

impl Writer {
    fn bounds(&self) -> Bounds {
        Bounds {
            current: self.seg,
            current_size: self.seg_size,
            closed: self.closed.iter().map(|(&id, s)| (id, s.bytes)).collect(),
        }
    }

    fn roll(&mut self, dir: &Path) -> io::Result<()> {
        let next = self.seg + 1;
        let file = Arc::new(create_segment(dir, next)?);
        let old = std::mem::replace(&mut self.file, file);
        self.unsynced.push(old);
        self.closed.insert(self.seg, SegInfo { bytes: self.seg_size, closed_at_ms: now_ms() });
        self.seg = next;
        self.seg_size = 0;
        self.needs_roll = false;
        self.dir_dirty = true;
        Ok(())
    }

    fn write_batch(&mut self, dir: &Path, buf: &[u8], segment_bytes: u64) -> io::Result<()> {
        if self.needs_roll || (self.seg_size > 0 && self.seg_size + buf.len() as u64 > segment_bytes) {
            self.roll(dir)?;
        }
        match (&*self.file).write_all(buf) {
            Ok(()) => {
                self.seg_size += buf.len() as u64;
                self.dirty = true;
                Ok(())
            }
            Err(e) => {
                // Remove a partial line so the next batch starts on a line boundary; if even that
                // fails, abandon this segment (its torn tail is skipped by readers).
                if self.file.set_len(self.seg_size).is_err() {
                    self.needs_roll = true;
                }
                Err(e)
            }
        }
    }
}

enum AckKind {
    Delivered,
    Parked,
    /// This many parked, the rest delivered (a batch the sink took but for a few events).
    PartlyParked(u64),
}

thread_local! {
    /// The line buffer of [`Outbox::append`] (one per thread: no allocation per event).
    static LINE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `f` of `event` as one JSON line (newline included), in this thread's line buffer.
fn with_line<T>(event: &Event, f: impl FnOnce(&[u8]) -> T) -> T {
    with_written(|line| event.write_json(line), f)
}

/// `f` of the line `write` writes (one JSON value; the newline is added), in this thread's
/// line buffer.
fn with_written<T>(write: impl FnOnce(&mut Vec<u8>), f: impl FnOnce(&[u8]) -> T) -> T {
    LINE.with_borrow_mut(|line| {
        line.clear();
        write(line);
        line.push(b'\n');
        let r = f(line);
        if line.capacity() > 64 * 1024 {
            *line = Vec::new();
        }
        r
    })
}

impl crate::commit::Staged for Outbox {
    fn flush_staged(&self) -> io::Result<()> {
        let last = self.staging.lock().last_seq;
        let mut w = self.writer.lock();
        let written = if w.done_seq < last { self.lead(&mut w) } else { Ok(()) };
        let lost = std::mem::take(&mut w.staged_lost);
        written?;
        if lost {
            return Err(io::Error::other("staged outbox lines were lost in a failed write"));
        }
        Ok(())
    }
}

impl Outbox {
    /// Opens (creating) the outbox in `dir` in relay mode, segments deleted once delivered.
    pub fn open(dir: impl AsRef<Path>, max_bytes: u64, full_policy: OutboxFullPolicy) -> io::Result<Outbox> {
        Outbox::open_with(dir, OutboxOptions::new(max_bytes, full_policy))
    }

    /// Opens `data_dir/outbox` as the configuration says.
    pub fn open_from_config(c: &Config) -> io::Result<Outbox> {
        Outbox::open_with(outbox_dir(&c.data_dir), OutboxOptions::from_config(c))
    }

    pub fn open_with(dir: impl AsRef<Path>, opts: OutboxOptions) -> io::Result<Outbox> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(dir.join(PARKED_DIR))?;
        let _ = fs::remove_file(dir.join(CURSOR_TMP));
        let ids = list_segments(&dir)?;
        let mut closed = BTreeMap::new();
        for (i, &id) in ids.iter().enumerate() {
            let path = dir.join(segment_file_name(id));
            let meta = fs::metadata(&path)?;
            let bytes = if i + 1 == ids.len() { repair_tail(&path, meta.len())? } else { meta.len() };
            if bytes == 0 {
                // An earlier run that appended nothing (or only a torn line): nothing to keep.
                fs::remove_file(&path)?;
                continue;
            }
            closed.insert(id, SegInfo { bytes, closed_at_ms: mtime_ms(&meta) });
        }
        let seg = ids.last().map_or(1, |last| last + 1);
        let file = Arc::new(create_segment(&dir, seg)?);
        sync_dir(&dir)?;
        let disk_bytes: u64 = closed.values().map(|s| s.bytes).sum();
        let writer = Writer {
            file,
            seg,
            seg_size: 0,
            closed,
            done_seq: 0,
            failures: Vec::new(),
            needs_roll: false,
            spare: Vec::new(),
            dirty: false,
            unsynced: Vec::new(),
            dir_dirty: false,
            staged_lost: false,
        };
        let bounds = writer.bounds();
        let mut cache = ReadCache::default();
        let cursor = if opts.relay {
            bounds.normalize(load_cursor(&dir).unwrap_or(Position { segment: bounds.first(), offset: 0 }))
        } else {
            Position { segment: seg, offset: 0 }
        };
        let (mut depth, mut undelivered, mut oldest) = (0u64, 0u64, 0u64);
        if opts.relay {
            undelivered = bounds.bytes_between(cursor, Position { segment: seg, offset: 0 });
            walk(&dir, &mut cache, &bounds, cursor, MAX_READ, |_, line| {
                if depth == 0 {
                    oldest = occurred_ms(line).unwrap_or_else(now_ms);
                }
                depth += 1;
                true
            })?;
            if depth > 0 {
                tracing::info!(events = depth, bytes = undelivered, "outbox: replaying undelivered events");
            }
        }
        Ok(Outbox {
            dir,
            staging: Mutex::new(Staging {
                buf: Vec::with_capacity(64 * 1024),
                events: 0,
                waiters: 0,
                last_seq: 0,
                first_ms: 0,
            }),
            stage_counter: None,
            writer: Mutex::new(writer),
            reader: Mutex::new(Reader { cursor, cache, last_read: Vec::new() }),
            undelivered_bytes: AtomicU64::new(undelivered),
            depth: AtomicU64::new(depth),
            oldest_ms: AtomicU64::new(oldest),
            disk_bytes: AtomicU64::new(disk_bytes),
            cursor_segment: AtomicU64::new(cursor.segment),
            appended: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            parked: AtomicU64::new(0),
            full_log: crate::telemetry::EverySecond::default(),
            write_log: crate::telemetry::EverySecond::default(),
            appended_signal: tokio::sync::Notify::new(),
            uncached: Mutex::new(Position { segment: seg, offset: 0 }),
            opts,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn options(&self) -> &OutboxOptions {
        &self.opts
    }

    /// Writes `event` to the OS (no fsync) before returning. Safe from any thread; concurrent
    /// appenders share one `write(2)`. `Err` means the event is not in the outbox: the caller
    /// takes the failsafe path. Under the `drop` policy a full outbox drops the event and
    /// returns `Ok` (counted as `dropped`).
    pub fn append(&self, event: &Event) -> Result<(), OutboxError> {
        with_line(event, |line| {
            let Some(seq) = self.stage_line(line, true, takes_headroom(event.event_type))? else { return Ok(()) };
            self.wait_written(seq)
        })
    }

    /// Group-commit mode: stages `event` for the next write, which the caller's group commit
    /// makes (`flush_staged`) before anything that depends on the event is acknowledged. `Err`:
    /// the outbox is full under the `failsafe` policy (nothing staged).
    pub fn stage(&self, event: &Event) -> Result<(), OutboxError> {
        self.stage_written(event.event_type, |line| event.write_json(line))
    }

    /// [`Outbox::stage`] of the event of type `event_type` that `write` writes as JSON (no
    /// newline): for callers that write an event from parts ([`crate::ledger::event::Template`]).
    pub fn stage_written(&self, event_type: EventType, write: impl FnOnce(&mut Vec<u8>)) -> Result<(), OutboxError> {
        with_written(write, |line| {
            if self.stage_line(line, false, takes_headroom(event_type))?.is_some() {
                if let Some(c) = &self.stage_counter {
                    c.staged();
                }
            }
            Ok(())
        })
    }

    /// Switches [`Outbox::stage`] on: staged lines are counted in `counter`.
    pub fn group_commit(&mut self, counter: Arc<crate::commit::StageCounter>) {
        self.stage_counter = Some(counter);
    }

    /// The most undelivered bytes an event may bring the outbox to: `max_bytes`, plus the
    /// follow-up headroom (max(`max_bytes` / 8, [`FOLLOW_UP_HEADROOM_MIN`])) for `headroom` events.
    fn limit(&self, headroom: bool) -> u64 {
        let max = self.opts.max_bytes;
        if headroom {
            max.saturating_add((max / 8).max(FOLLOW_UP_HEADROOM_MIN))
        } else {
            max
        }
    }

    /// Puts `line` in the staging buffer; `Ok(None)`: dropped (full, `drop` policy). `headroom`:
    /// the event may go past `max_bytes` into the follow-up headroom ([`takes_headroom`]).
    fn stage_line(&self, line: &[u8], waiter: bool, headroom: bool) -> Result<Option<u64>, OutboxError> {
        let len = line.len() as u64;
        let mut s = self.staging.lock();
        if self.opts.relay {
            // Reserve under the staging lock so concurrent appenders cannot overshoot.
            let used = self.undelivered_bytes.load(Ordering::Acquire);
            if used + len > self.limit(headroom) {
                self.log_full(used);
                return match self.opts.full_policy {
                    OutboxFullPolicy::Failsafe => {
                        // A refused decision refuses its request: nothing is lost. A refused
                        // follow-up is an event lost: counted as such.
                        if headroom {
                            self.dropped.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(OutboxError::Full { undelivered_bytes: used, max_bytes: self.opts.max_bytes })
                    }
                    OutboxFullPolicy::Drop => {
                        self.dropped.fetch_add(1, Ordering::Relaxed);
                        Ok(None)
                    }
                };
            }
            self.undelivered_bytes.fetch_add(len, Ordering::AcqRel);
        }
        if s.buf.is_empty() {
            s.first_ms = now_ms();
        }
        s.buf.extend_from_slice(line);
        s.events += 1;
        s.waiters += u64::from(waiter);
        s.last_seq += 1;
        Ok(Some(s.last_seq))
    }

    /// Logs a refused or dropped event of a full outbox, at most once a second (with the count
    /// since the last line): under sustained traffic every request meets the full outbox.
    fn log_full(&self, undelivered_bytes: u64) {
        let Some(skipped) = self.full_log.pass(now_ms() / 1000) else { return };
        let events = skipped + 1;
        let max_bytes = self.opts.max_bytes;
        match self.opts.full_policy {
            OutboxFullPolicy::Failsafe => tracing::error!(
                events,
                undelivered_bytes,
                max_bytes,
                "outbox full: the ledger sink is not taking events (see the `ledger delivery failed` warnings) and \
                 PREAUTH_OUTBOX_MAX_BYTES is reached; new requests take the failsafe path of their mode \
                 (PREAUTH_OUTBOX_FULL_POLICY=failsafe) until the ledger is back or the bound is raised"
            ),
            OutboxFullPolicy::Drop => tracing::error!(
                events,
                undelivered_bytes,
                max_bytes,
                "outbox full: the ledger sink is not taking events (see the `ledger delivery failed` warnings) and \
                 PREAUTH_OUTBOX_MAX_BYTES is reached; events are dropped, not recorded anywhere \
                 (PREAUTH_OUTBOX_FULL_POLICY=drop, counted in preauth_outbox_events_total{{state=\"dropped\"}}) \
                 until the ledger is back or the bound is raised"
            ),
        }
    }

    /// Waits until line `seq` is written (leading the write if no one has): its outcome.
    fn wait_written(&self, seq: u64) -> Result<(), OutboxError> {
        let mut w = self.writer.lock();
        if w.done_seq < seq {
            let _ = self.lead(&mut w);
        }
        if let Some(i) = w.failures.iter().position(|f| f.first <= seq && seq <= f.last) {
            let f = &mut w.failures[i];
            let err = io::Error::new(f.kind, f.message.clone());
            f.remaining -= 1;
            if f.remaining == 0 {
                w.failures.swap_remove(i);
            }
            return Err(OutboxError::Io(err));
        }
        Ok(())
    }

    /// Writes everything staged (this appender's line included) in one `write(2)`.
    fn lead(&self, w: &mut Writer) -> io::Result<()> {
        let mut batch = std::mem::take(&mut w.spare);
        let (events, waiters, last_seq, first_ms) = {
            let mut s = self.staging.lock();
            std::mem::swap(&mut s.buf, &mut batch);
            let r = (s.events, s.waiters, s.last_seq, s.first_ms);
            s.events = 0;
            s.waiters = 0;
            r
        };
        let mut result = Ok(());
        let bytes = batch.len() as u64;
        match w.write_batch(&self.dir, &batch, self.opts.segment_bytes) {
            Ok(()) => {
                self.disk_bytes.fetch_add(bytes, Ordering::Relaxed);
                self.appended.fetch_add(events, Ordering::Relaxed);
                if self.opts.relay {
                    if self.depth.fetch_add(events, Ordering::AcqRel) == 0 {
                        self.oldest_ms.store(first_ms, Ordering::Release);
                    }
                    self.appended_signal.notify_one();
                }
            }
            Err(e) => {
                // Not in the ledger: counted as dropped (the alert on undelivered events fires).
                self.dropped.fetch_add(events, Ordering::Relaxed);
                if let Some(not_logged) = self.write_log.pass(now_ms() / 1000) {
                    tracing::error!(
                        error = %e,
                        events,
                        not_logged,
                        dir = %self.dir.display(),
                        "outbox: write failed (a full or read-only volume?); these events were not recorded \
                         (counted in preauth_outbox_events_total{{state=\"dropped\"}}); decisions take the failsafe path"
                    );
                }
                if self.opts.relay {
                    self.undelivered_bytes.fetch_sub(bytes, Ordering::AcqRel);
                }
                w.staged_lost |= events > waiters;
                if waiters > 0 {
                    w.failures.push(Failure {
                        first: last_seq + 1 - events,
                        last: last_seq,
                        remaining: waiters,
                        kind: e.kind(),
                        message: e.to_string(),
                    });
                }
                result = Err(e);
            }
        }
        w.done_seq = last_seq;
        batch.clear();
        if batch.capacity() <= 4 * 1024 * 1024 {
            w.spare = batch;
        }
        result
    }

    fn bounds(&self) -> Bounds {
        self.writer.lock().bounds()
    }

    /// Waits until an append happened since the last wait (or returns at once if one did).
    pub async fn appended(&self) {
        self.appended_signal.notified().await
    }

    /// Up to `max` undelivered events from the cursor, with the position to acknowledge each.
    /// Reading again without an `ack` returns the same events.
    pub fn read_batch(&self, max: usize) -> io::Result<Vec<(Position, EventLine)>> {
        let mut r = self.reader.lock();
        r.last_read.clear();
        if max == 0 {
            return Ok(Vec::new());
        }
        loop {
            let bounds = self.bounds();
            let from = bounds.normalize(r.cursor);
            let mut out: Vec<(Position, EventLine)> = Vec::new();
            let mut corrupt: Vec<(Position, Vec<u8>)> = Vec::new();
            let Reader { cache, .. } = &mut *r;
            walk(&self.dir, cache, &bounds, from, max.saturating_mul(1024), |p, line| {
                match EventLine::parse(line) {
                    Some(e) => {
                        out.push((p, e));
                        out.len() < max
                    }
                    // Stop before it: it is consumed (and parked) at the head of a later batch.
                    None if !out.is_empty() => false,
                    None => {
                        corrupt.push((p, line.to_vec()));
                        true
                    }
                }
            })?;
            if let Some(&(last_corrupt, _)) = corrupt.last() {
                self.park_corrupt(&corrupt)?;
                r.last_read = corrupt.iter().map(|(p, _)| *p).collect();
                self.ack_locked(&mut r, last_corrupt, AckKind::Parked)?;
                if out.is_empty() {
                    continue;
                }
            }
            r.last_read = out.iter().map(|(p, _)| *p).collect();
            return Ok(out);
        }
    }

    fn park_corrupt(&self, lines: &[(Position, Vec<u8>)]) -> io::Result<()> {
        let mut f = OpenOptions::new().create(true).append(true).open(self.dir.join(PARKED_DIR).join(CORRUPT_FILE))?;
        for (p, line) in lines {
            tracing::error!(
                segment = p.segment,
                offset = p.offset,
                "outbox: unparseable line moved to parked/corrupt.ndjson"
            );
            let mut buf = line.clone();
            buf.push(b'\n');
            f.write_all(&buf)?;
        }
        f.sync_data()
    }

    /// Marks everything up to `pos` (a position from `read_batch`) delivered: advances and
    /// persists the cursor and deletes fully delivered segments (unless they are retained).
    pub fn ack(&self, pos: Position) -> io::Result<()> {
        let mut r = self.reader.lock();
        self.ack_locked(&mut r, pos, AckKind::Delivered)
    }

    /// Writes `events`, which the sink rejected for good, to `parked/` (with `reason`), then moves
    /// the cursor past `last`: the batch read up to `last` is either `events` (all rejected) or
    /// delivered but for `events`. Returns the parked file.
    pub fn park(&self, last: Position, events: &[EventLine], reason: &str) -> io::Result<PathBuf> {
        let mut r = self.reader.lock();
        let first: String = events
            .first()
            .map(|e| e.event_id.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(64).collect())
            .unwrap_or_default();
        let base = format!("parked-{}-{}", now_ms(), if first.is_empty() { "batch" } else { &first });
        let parked = self.dir.join(PARKED_DIR);
        let path = parked.join(format!("{base}.ndjson"));
        let mut buf = Vec::with_capacity(events.len() * 1024);
        for e in events {
            buf.extend_from_slice(e.json.as_bytes());
            buf.push(b'\n');
        }
        let mut f = File::create(&path)?;
        f.write_all(&buf)?;
        f.sync_all()?;
        fs::write(parked.join(format!("{base}.reason")), format!("{reason}\n"))?;
        sync_dir(&parked)?;
        self.ack_locked(&mut r, last, AckKind::PartlyParked(events.len() as u64))?;
        Ok(path)
    }

    fn ack_locked(&self, r: &mut Reader, pos: Position, kind: AckKind) -> io::Result<()> {
        let bounds = self.bounds();
        let old = bounds.normalize(r.cursor);
        if pos <= old {
            return Ok(());
        }
        let k = r.last_read.partition_point(|p| *p <= pos);
        let n = if k > 0 && r.last_read[k - 1] == pos {
            r.last_read.drain(..k);
            k as u64
        } else {
            // Not a position handed out by the last read: count the lines.
            r.last_read.clear();
            let mut n = 0u64;
            walk(&self.dir, &mut r.cache, &bounds, old, MAX_READ, |p, _| {
                if p <= pos {
                    n += 1;
                }
                p < pos
            })?;
            n
        };
        let bytes = bounds.bytes_between(old, pos);
        let new = bounds.normalize(pos);
        r.cursor = new;
        self.cursor_segment.store(new.segment, Ordering::Release);
        let remaining = self.depth.load(Ordering::Acquire).saturating_sub(n);
        let mut next_oldest = None;
        if remaining > 0 {
            walk(&self.dir, &mut r.cache, &bounds, new, MIN_READ, |_, line| {
                next_oldest = occurred_ms(line);
                false
            })?;
        }
        {
            let _w = self.writer.lock();
            let d = self.depth.load(Ordering::Acquire).saturating_sub(n);
            self.depth.store(d, Ordering::Release);
            self.oldest_ms.store(if d == 0 { 0 } else { next_oldest.unwrap_or_else(now_ms) }, Ordering::Release);
        }
        let _ =
            self.undelivered_bytes.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| Some(v.saturating_sub(bytes)));
        match kind {
            AckKind::Delivered => self.delivered.fetch_add(n, Ordering::Relaxed),
            AckKind::Parked => self.parked.fetch_add(n, Ordering::Relaxed),
            AckKind::PartlyParked(k) => {
                self.delivered.fetch_add(n.saturating_sub(k), Ordering::Relaxed);
                self.parked.fetch_add(k.min(n), Ordering::Relaxed)
            }
        };
        store_cursor(&self.dir, new)?;
        if self.opts.retention.is_none() {
            let doomed: Vec<u64> = bounds.closed.iter().map(|&(id, _)| id).filter(|&id| id < new.segment).collect();
            self.delete_segments(&doomed);
        }
        Ok(())
    }

    fn delete_segments(&self, ids: &[u64]) {
        for &id in ids {
            match fs::remove_file(self.dir.join(segment_file_name(id))) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(segment = id, error = %e, "outbox: cannot delete a delivered segment");
                    continue;
                }
            }
            let mut w = self.writer.lock();
            if let Some(info) = w.closed.remove(&id) {
                self.disk_bytes.fetch_sub(info.bytes, Ordering::Relaxed);
                w.dir_dirty = true;
            }
        }
    }

    /// fsyncs what was written since the last call (and the directory after a roll). Called
    /// every [`SYNC_INTERVAL`] by [`OutboxSyncer`]; cheap when nothing was written.
    pub fn sync(&self) -> io::Result<()> {
        let (file, unsynced, dir_dirty, written) = {
            let mut w = self.writer.lock();
            if !w.dirty && w.unsynced.is_empty() && !w.dir_dirty {
                return Ok(());
            }
            w.dirty = false;
            let written = Position { segment: w.seg, offset: w.seg_size };
            (w.file.clone(), std::mem::take(&mut w.unsynced), std::mem::take(&mut w.dir_dirty), written)
        };
        for f in unsynced {
            f.sync_data()?;
        }
        file.sync_data()?;
        if dir_dirty {
            sync_dir(&self.dir)?;
        }
        self.uncache(&file, written);
        Ok(())
    }

    /// Drops segment bytes up to `synced` (durable; `current` is its segment's file) from the
    /// page cache, but not past the relay's cursor (see the module doc). Best effort: a segment
    /// deleted meanwhile is skipped.
    fn uncache(&self, current: &File, synced: Position) {
        let limit = if self.opts.relay { synced.min(self.reader.lock().cursor) } else { synced };
        let mut mark = self.uncached.lock();
        while *mark < limit {
            let end = if mark.segment < limit.segment { None } else { Some(limit.offset & !(PAGE - 1)) };
            if end.is_some_and(|e| e <= mark.offset) {
                break;
            }
            let len = end.map_or(0, |e| e - mark.offset);
            if mark.segment == synced.segment {
                drop_cached(current, mark.offset, len);
            } else if let Ok(f) = File::open(self.dir.join(segment_file_name(mark.segment))) {
                drop_cached(&f, mark.offset, len);
            }
            *mark = match end {
                Some(e) => Position { segment: mark.segment, offset: e },
                None => Position { segment: mark.segment + 1, offset: 0 },
            };
        }
    }

    /// Where the page cache was last dropped up to (tests).
    #[cfg(test)]
    pub(crate) fn uncached(&self) -> Position {
        *self.uncached.lock()
    }

    /// Applies retention: deletes retained segments whose last write is older than the
    /// retention, then the oldest ones while the directory exceeds `max_bytes`. Only segments
    /// already delivered (all closed ones without a relay) are candidates. Returns how many were
    /// deleted.
    pub fn maintain(&self, now_ms: u64) -> usize {
        let Some(retention) = self.opts.retention else { return 0 };
        let cutoff = now_ms.saturating_sub(retention.as_millis() as u64);
        let limit = if self.opts.relay { self.cursor_segment.load(Ordering::Acquire) } else { u64::MAX };
        let candidates: Vec<(u64, u64, u64)> = {
            let w = self.writer.lock();
            w.closed.iter().filter(|(&id, _)| id < limit).map(|(&id, s)| (id, s.bytes, s.closed_at_ms)).collect()
        };
        let mut disk = self.disk_bytes.load(Ordering::Acquire);
        let mut doomed = Vec::new();
        for &(id, bytes, closed_at) in &candidates {
            if closed_at < cutoff {
                doomed.push(id);
                disk = disk.saturating_sub(bytes);
            } else if disk > self.opts.max_bytes {
                tracing::warn!(
                    segment = id,
                    "local ledger above PREAUTH_OUTBOX_MAX_BYTES: deleting its oldest segment early"
                );
                doomed.push(id);
                disk = disk.saturating_sub(bytes);
            } else {
                break;
            }
        }
        self.delete_segments(&doomed);
        doomed.len()
    }

    pub fn stats(&self) -> OutboxStats {
        let depth = self.depth.load(Ordering::Acquire);
        let oldest = self.oldest_ms.load(Ordering::Acquire);
        OutboxStats {
            appended: self.appended.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            parked: self.parked.load(Ordering::Relaxed),
            depth,
            oldest_undelivered_ms: (depth > 0 && oldest > 0).then_some(oldest),
            undelivered_bytes: self.undelivered_bytes.load(Ordering::Relaxed),
            disk_bytes: self.disk_bytes.load(Ordering::Relaxed),
        }
    }

    /// Events not yet delivered.
    pub fn depth(&self) -> u64 {
        self.depth.load(Ordering::Acquire)
    }

    /// Age of the oldest undelivered event (zero when none).
    pub fn oldest_undelivered_age(&self, now_ms: u64) -> Duration {
        self.stats().oldest_undelivered_ms.map_or(Duration::ZERO, |t| Duration::from_millis(now_ms.saturating_sub(t)))
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        if let Err(e) = self.sync() {
            tracing::warn!(error = %e, "outbox: final fsync failed");
        }
    }
}

/// The `preauth_outbox_*` metric handles (CONTRACT §9), fed from [`OutboxStats`].
pub struct OutboxMetrics {
    events: prometheus::IntCounterVec,
    depth: prometheus::IntGauge,
    oldest_age: prometheus::Gauge,
    last: Mutex<OutboxStats>,
}

impl OutboxMetrics {
    pub fn new(m: &crate::telemetry::Metrics) -> OutboxMetrics {
        OutboxMetrics {
            events: m.outbox_events.clone(),
            depth: m.outbox_depth.clone(),
            oldest_age: m.outbox_oldest_age_seconds.clone(),
            last: Mutex::new(OutboxStats::default()),
        }
    }

    /// Brings the metrics up to `s`: counters by their increase since the last export
    /// (`appended`, `delivered`, `dropped`, `parked`), gauges set.
    pub fn export(&self, s: &OutboxStats, now_ms: u64) {
        let mut last = self.last.lock();
        for (state, now, before) in [
            ("appended", s.appended, last.appended),
            ("delivered", s.delivered, last.delivered),
            ("dropped", s.dropped, last.dropped),
            ("parked", s.parked, last.parked),
        ] {
            if now > before {
                self.events.with_label_values(&[state]).inc_by(now - before);
            }
        }
        *last = *s;
        self.depth.set(s.depth as i64);
        self.oldest_age.set(s.oldest_undelivered_ms.map_or(0.0, |t| now_ms.saturating_sub(t) as f64 / 1000.0));
    }
}

/// Background service of every outbox (with or without a relay): fsync every [`SYNC_INTERVAL`],
/// metrics every tick, retention every [`MAINTAIN_INTERVAL`]; a final fsync on shutdown.
pub struct OutboxSyncer {
    pub outbox: Arc<Outbox>,
    pub metrics: Option<OutboxMetrics>,
    /// Staged lines are written before each fsync: a backstop for callers that stage and do
    /// not commit (none should), and the final write at shutdown.
    pub group: Option<Arc<crate::commit::GroupCommit>>,
}

impl OutboxSyncer {
    pub fn new(outbox: Arc<Outbox>, metrics: Option<OutboxMetrics>) -> OutboxSyncer {
        OutboxSyncer { outbox, metrics, group: None }
    }

    pub fn with_group(self, group: Arc<crate::commit::GroupCommit>) -> OutboxSyncer {
        OutboxSyncer { group: Some(group), ..self }
    }

    async fn sync(&self) {
        if let Some(g) = &self.group {
            g.flush();
        }
        let outbox = self.outbox.clone();
        match tokio::task::spawn_blocking(move || outbox.sync()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "outbox fsync failed"),
            Err(e) => tracing::error!(error = %e, "outbox fsync task failed"),
        }
    }

    fn export(&self) {
        if let Some(m) = &self.metrics {
            m.export(&self.outbox.stats(), now_ms());
        }
    }

    /// Runs until `shutdown` turns true (or its sender is gone).
    pub async fn run(&self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(SYNC_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_maintain: Option<tokio::time::Instant> = None;
        loop {
            if *shutdown.borrow() {
                break;
            }
            tokio::select! {
                r = shutdown.changed() => if r.is_err() { break },
                _ = tick.tick() => {
                    self.sync().await;
                    self.export();
                    if last_maintain.is_none_or(|t| t.elapsed() >= MAINTAIN_INTERVAL) {
                        last_maintain = Some(tokio::time::Instant::now());
                        let outbox = self.outbox.clone();
                        let _ = tokio::task::spawn_blocking(move || outbox.maintain(now_ms())).await;
                    }
                }
            }
        }
        self.sync().await;
        self.export();
    }
}

#[async_trait]
impl BackgroundService for OutboxSyncer {
    async fn start(&self, shutdown: ShutdownWatch) {
        self.run(shutdown).await
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::decide::Micros;
    use crate::ledger::event::EventType;

    /// A directory under the system temp dir, removed on drop.
    pub(crate) struct TempDir(pub PathBuf);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> TempDir {
            let p = std::env::temp_dir().join(format!("preauth-{tag}-{}", uuid::Uuid::new_v4().simple()));
            fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    pub(crate) fn event(i: u64) -> Event {
        let mut e = Event::new(EventType::Decision, "i-test", 1_795_600_000_000_000 + i * 1000, 7);
        e.request_id = Some(format!("req-{i}").into());
        e.tenant_id = Some(format!("tenant-{}", i % 3).into());
        e.decision = Some("ALLOW".into());
        e.estimated_cost_usd = Some(Micros(150 + i as i64));
        e.reserved_usd = Some(Micros(150));
        e
    }

    fn relay_opts(max_bytes: u64) -> OutboxOptions {
        OutboxOptions::new(max_bytes, OutboxFullPolicy::Failsafe)
    }

    fn drain(o: &Outbox) -> Vec<Event> {
        let mut all = Vec::new();
        loop {
            let b = o.read_batch(7).unwrap();
            let Some(&(last, _)) = b.last() else { break };
            all.extend(b.into_iter().map(|(_, e)| e.event().unwrap()));
            o.ack(last).unwrap();
        }
        all
    }

    #[test]
    fn staged_events_are_written_by_the_flush_or_the_next_append() {
        use crate::commit::{StageCounter, Staged};
        let d = TempDir::new("outbox-staged");
        let mut o = Outbox::open(&d.0, 1 << 30, OutboxFullPolicy::Failsafe).unwrap();
        let counter = Arc::new(StageCounter::default());
        o.group_commit(counter);
        o.stage(&event(1)).unwrap();
        o.stage(&event(2)).unwrap();
        assert_eq!((o.depth(), o.read_batch(10).unwrap().len()), (0, 0), "staged, not written");
        o.flush_staged().unwrap();
        assert_eq!(o.read_batch(10).unwrap().len(), 2);
        // An immediate append carries what was staged before it.
        o.stage(&event(3)).unwrap();
        o.append(&event(4)).unwrap();
        let ids: Vec<String> = o
            .read_batch(10)
            .unwrap()
            .into_iter()
            .map(|(_, e)| e.event().unwrap().request_id.unwrap().to_string())
            .collect();
        assert_eq!(ids, ["req-1", "req-2", "req-3", "req-4"]);
        o.flush_staged().unwrap();
        assert_eq!(o.depth(), 4);
    }

    #[test]
    fn synced_bytes_leave_the_page_cache_up_to_the_relay_cursor() {
        let small = |relay: bool| OutboxOptions { relay, segment_bytes: 64 * 1024, ..relay_opts(1 << 30) };
        let page_floor = |p: Position| Position { segment: p.segment, offset: p.offset & !(PAGE - 1) };
        // Local ledger (no relay): everything synced, across rolled segments, to the last whole page.
        let d = TempDir::new("outbox-uncache");
        let o = Outbox::open_with(&d.0, OutboxOptions { retention: Some(Duration::from_secs(3600)), ..small(false) })
            .unwrap();
        let first = o.bounds().current;
        assert_eq!(o.uncached(), Position { segment: first, offset: 0 });
        for i in 0..400 {
            o.append(&event(i)).unwrap();
        }
        o.sync().unwrap();
        let b = o.bounds();
        assert!(b.current >= first + 2, "rolled: {b:?}");
        assert_eq!(o.uncached(), page_floor(Position { segment: b.current, offset: b.current_size }));
        // Relay: nothing before delivery; then up to the cursor, not past it.
        let d = TempDir::new("outbox-uncache-relay");
        let o = Outbox::open_with(&d.0, small(true)).unwrap();
        let first = o.bounds().current;
        for i in 0..400 {
            o.append(&event(i)).unwrap();
        }
        o.sync().unwrap();
        assert_eq!(o.uncached(), Position { segment: first, offset: 0 }, "undelivered bytes stay cached");
        let batch = o.read_batch(250).unwrap();
        o.ack(batch.last().unwrap().0).unwrap();
        o.append(&event(400)).unwrap();
        o.sync().unwrap();
        let cursor = o.reader.lock().cursor;
        assert!(cursor.segment > first, "the cursor left the first segment: {cursor:?}");
        assert_eq!(o.uncached(), page_floor(cursor));
        // Every event is still there to read, from disk.
        assert_eq!(drain(&o).len(), 151);
    }

    /// The replay procedure of the RUNBOOK ("Outbox backlog"): with the sidecar stopped, a parked
    /// batch renamed to a segment id above every other one is delivered after the restart.
    #[test]
    fn a_parked_batch_renamed_to_the_newest_segment_is_replayed_after_a_restart() {
        let d = TempDir::new("outbox-replay-parked");
        let parked = {
            let o = Outbox::open(&d.0, 1 << 30, OutboxFullPolicy::Failsafe).unwrap();
            for i in 0..3 {
                o.append(&event(i)).unwrap();
            }
            let b = o.read_batch(10).unwrap();
            let events: Vec<EventLine> = b.iter().map(|(_, e)| e.clone()).collect();
            let path = o.park(b.last().unwrap().0, &events, "receiver said 422").unwrap();
            o.append(&event(3)).unwrap();
            assert_eq!(o.stats().parked, 3);
            path
        };
        let newest = list_segments(&d.0).unwrap().into_iter().max().unwrap();
        fs::rename(&parked, d.0.join(segment_file_name(newest + 1))).unwrap();
        let o = Outbox::open(&d.0, 1 << 30, OutboxFullPolicy::Failsafe).unwrap();
        let ids: Vec<String> = drain(&o).into_iter().map(|e| e.request_id.unwrap().to_string()).collect();
        assert_eq!(ids, ["req-3", "req-0", "req-1", "req-2"]);
    }

    #[test]
    fn append_read_ack_and_replay_after_restart() {
        let d = TempDir::new("outbox");
        let events: Vec<Event> = (0..10).map(event).collect();
        {
            let o = Outbox::open(&d.0, 1 << 30, OutboxFullPolicy::Failsafe).unwrap();
            for e in &events {
                o.append(e).unwrap();
            }
            assert_eq!(o.depth(), 10);
            assert!(o.stats().oldest_undelivered_ms.is_some());
            let b = o.read_batch(4).unwrap();
            assert_eq!(b.iter().map(|(_, e)| e.event().unwrap()).collect::<Vec<_>>(), events[..4].to_vec());
            assert_eq!(
                b.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>(),
                events[..4].iter().map(EventLine::of).collect::<Vec<_>>()
            );
            // Reading again without an ack returns the same events.
            assert_eq!(o.read_batch(4).unwrap().len(), 4);
            o.ack(b[3].0).unwrap();
            assert_eq!(o.depth(), 6);
            assert_eq!(o.stats().delivered, 4);
        }
        // Restart: the 6 undelivered events are replayed, in order, oldest age from occurred_at.
        let o = Outbox::open(&d.0, 1 << 30, OutboxFullPolicy::Failsafe).unwrap();
        assert_eq!(o.depth(), 6);
        assert_eq!(o.stats().oldest_undelivered_ms, parse_rfc3339(&events[4].occurred_at));
        let rest = drain(&o);
        assert_eq!(rest, events[4..].to_vec());
        assert_eq!(o.depth(), 0);
        assert_eq!(o.stats().oldest_undelivered_ms, None);
        assert_eq!(o.stats().undelivered_bytes, 0);
        drop(o);
        let o = Outbox::open(&d.0, 1 << 30, OutboxFullPolicy::Failsafe).unwrap();
        assert_eq!(o.depth(), 0);
        assert!(o.read_batch(10).unwrap().is_empty());
        // Delivered segments are gone: only the current (empty) one and the previous run's are left.
        assert!(list_segments(&d.0).unwrap().len() <= 2);
    }

    #[test]
    fn segments_roll_and_delivered_segments_are_deleted() {
        let d = TempDir::new("outbox");
        let o = Outbox::open_with(&d.0, OutboxOptions { segment_bytes: 2048, ..relay_opts(1 << 30) }).unwrap();
        for i in 0..60 {
            o.append(&event(i)).unwrap();
        }
        assert!(list_segments(&d.0).unwrap().len() > 10);
        assert_eq!(o.stats().disk_bytes, o.stats().undelivered_bytes);
        let all = drain(&o);
        assert_eq!(all.len(), 60);
        assert!(all.windows(2).all(|w| w[0].request_id < w[1].request_id || w[0].occurred_at < w[1].occurred_at));
        let left = list_segments(&d.0).unwrap();
        assert!(left.len() <= 2, "delivered segments deleted, left {left:?}");
        assert_eq!(o.stats().undelivered_bytes, 0);
        o.sync().unwrap();
        drop(o);
        // A restart continues with nothing to replay.
        let o = Outbox::open_with(&d.0, OutboxOptions { segment_bytes: 2048, ..relay_opts(1 << 30) }).unwrap();
        assert_eq!(o.depth(), 0);
    }

    #[test]
    fn truncated_last_line_is_tolerated_on_open() {
        let d = TempDir::new("outbox");
        {
            let o = Outbox::open(&d.0, 1 << 30, OutboxFullPolicy::Failsafe).unwrap();
            for i in 0..3 {
                o.append(&event(i)).unwrap();
            }
        }
        let last = *list_segments(&d.0).unwrap().iter().max().unwrap();
        let path = d.0.join(segment_file_name(last));
        let full = serde_json::to_vec(&event(3)).unwrap();
        OpenOptions::new().append(true).open(&path).unwrap().write_all(&full[..full.len() / 2]).unwrap();
        let before = fs::metadata(&path).unwrap().len();
        let o = Outbox::open(&d.0, 1 << 30, OutboxFullPolicy::Failsafe).unwrap();
        assert_eq!(o.depth(), 3);
        assert_eq!(fs::metadata(&path).unwrap().len(), before - (full.len() / 2) as u64);
        o.append(&event(4)).unwrap();
        let ids: Vec<_> = drain(&o).into_iter().map(|e| e.request_id.unwrap().to_string()).collect();
        assert_eq!(ids, ["req-0", "req-1", "req-2", "req-4"]);
    }

    #[test]
    fn unparseable_lines_are_parked_not_looped_on() {
        let d = TempDir::new("outbox");
        let mut content = Vec::new();
        for (i, bad) in [(0, false), (1, true), (2, false), (3, true), (4, true)] {
            if bad {
                content.extend_from_slice(b"{not json\n");
            } else {
                content.extend_from_slice(&serde_json::to_vec(&event(i)).unwrap());
                content.push(b'\n');
            }
        }
        fs::write(d.0.join(segment_file_name(1)), &content).unwrap();
        let o = Outbox::open(&d.0, 1 << 30, OutboxFullPolicy::Failsafe).unwrap();
        assert_eq!(o.depth(), 5);
        let got = drain(&o);
        assert_eq!(got.iter().map(|e| e.request_id.as_deref().unwrap()).collect::<Vec<_>>(), ["req-0", "req-2"]);
        assert_eq!(o.depth(), 0);
        assert_eq!(o.stats().parked, 3);
        let corrupt = fs::read_to_string(d.0.join(PARKED_DIR).join(CORRUPT_FILE)).unwrap();
        assert_eq!(corrupt.lines().count(), 3);
    }

    #[test]
    fn full_outbox_failsafe_refuses_and_recovers_after_delivery() {
        let d = TempDir::new("outbox");
        let line = serde_json::to_vec(&event(0)).unwrap().len() as u64 + 1;
        let o = Outbox::open(&d.0, line * 3 + line / 2, OutboxFullPolicy::Failsafe).unwrap();
        for i in 0..3 {
            o.append(&event(i)).unwrap();
        }
        match o.append(&event(3)) {
            Err(OutboxError::Full { max_bytes, .. }) => assert_eq!(max_bytes, line * 3 + line / 2),
            other => panic!("expected Full, got {other:?}"),
        }
        assert_eq!(o.depth(), 3);
        let b = o.read_batch(2).unwrap();
        o.ack(b[1].0).unwrap();
        o.append(&event(4)).unwrap();
        o.append(&event(5)).unwrap();
        assert!(matches!(o.append(&event(6)), Err(OutboxError::Full { .. })));
        assert_eq!(o.stats().dropped, 0);
    }

    /// A full outbox refuses new decisions, but the settlement or release of a request admitted
    /// before it filled (and operator events) still goes in, within a bounded headroom: losing
    /// them would leave a forwarded, charged request without its settlement in the ledger.
    #[test]
    fn full_outbox_still_takes_follow_up_events_within_the_headroom() {
        use crate::commit::{StageCounter, Staged};
        for policy in [OutboxFullPolicy::Failsafe, OutboxFullPolicy::Drop] {
            let d = TempDir::new("outbox-headroom");
            let line = serde_json::to_vec(&event(0)).unwrap().len() as u64 + 1;
            let max = line * 3 + line / 2;
            let mut o = Outbox::open(&d.0, max, policy).unwrap();
            o.group_commit(Arc::new(StageCounter::default()));
            for i in 0..3 {
                o.append(&event(i)).unwrap();
            }
            let decision = o.append(&event(3));
            assert!(matches!(
                (policy, &decision),
                (OutboxFullPolicy::Drop, Ok(())) | (_, Err(OutboxError::Full { .. }))
            ));
            let follow_up = |i: u64, t: EventType| {
                let mut e = event(i);
                e.event_type = t;
                e.decision = None;
                e
            };
            o.append(&follow_up(0, EventType::ReservationSettled)).unwrap();
            o.stage(&follow_up(1, EventType::ReservationReleased)).unwrap();
            o.flush_staged().unwrap();
            o.append(&follow_up(2, EventType::RuntimeChanged)).unwrap();
            let s = o.stats();
            assert_eq!(
                (s.appended, s.depth, s.dropped),
                (6, 6, u64::from(policy == OutboxFullPolicy::Drop)),
                "{policy:?}"
            );
            // Still no room for a new decision or approval request.
            let mut r = follow_up(9, EventType::ApprovalRequested);
            r.approval_id = Some("a-1".into());
            assert!(o.append(&r).is_err() || o.stats().dropped == 2, "{policy:?}");
            // The headroom is bounded too.
            let mut n = 0;
            while o.append(&follow_up(10 + n, EventType::ReservationSettled)).is_ok()
                && o.stats().dropped <= 2
                && n < 100_000
            {
                n += 1;
            }
            assert!(n < 100_000, "{policy:?}: the headroom must be bounded");
            let used = o.stats().undelivered_bytes;
            assert!(used + 2 * line >= max + FOLLOW_UP_HEADROOM_MIN, "{policy:?}: {n} follow-ups, {used} bytes only");
            assert!(o.stats().undelivered_bytes <= max + FOLLOW_UP_HEADROOM_MIN.max(max / 8), "{policy:?}");
            // The follow-up refused at the end is an event lost, counted under either policy (the
            // refused decision and approval request of `failsafe` refused their requests instead).
            let lost = if policy == OutboxFullPolicy::Drop { 3 } else { 1 };
            assert_eq!(o.stats().dropped, lost, "{policy:?}");
        }
    }

    /// What `f` logs (text format, all levels) on this thread.
    pub(crate) fn logs_of(f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl Write for Buf {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let out = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::TRACE)
            .finish();
        tracing::subscriber::with_default(sub, f);
        let text = String::from_utf8_lossy(&buf.0.lock()).into_owned();
        text
    }

    /// A full outbox under sustained traffic: one line a second (with the count since the last
    /// one), that names the cause and the way out, for both policies; not one line per event,
    /// and not silence under `drop`.
    #[test]
    fn full_outbox_is_logged_once_a_second_with_what_to_do() {
        for policy in [OutboxFullPolicy::Failsafe, OutboxFullPolicy::Drop] {
            let d = TempDir::new("outbox-full-log");
            let line = serde_json::to_vec(&event(0)).unwrap().len() as u64 + 1;
            let o = Outbox::open(&d.0, line * 2 + line / 2, policy).unwrap();
            let text = logs_of(|| {
                for i in 0..500 {
                    let _ = o.append(&event(i));
                }
            });
            let lines: Vec<&str> = text.lines().filter(|l| l.contains("outbox full")).collect();
            assert!((1..=2).contains(&lines.len()), "{policy:?}: {text}");
            assert!(lines[0].contains("PREAUTH_OUTBOX_MAX_BYTES") && lines[0].contains("ledger"), "{}", lines[0]);
            let what = if policy == OutboxFullPolicy::Drop { "dropped" } else { "failsafe" };
            assert!(lines[0].contains(what), "{}", lines[0]);
        }
    }

    #[test]
    fn full_outbox_drop_policy_drops_and_counts() {
        let d = TempDir::new("outbox");
        let line = serde_json::to_vec(&event(0)).unwrap().len() as u64 + 1;
        let o = Outbox::open(&d.0, line * 2 + line / 2, OutboxFullPolicy::Drop).unwrap();
        for i in 0..5 {
            o.append(&event(i)).unwrap();
        }
        let s = o.stats();
        assert_eq!((s.appended, s.dropped, s.depth), (2, 3, 2));
        let m = crate::telemetry::Metrics::new();
        let om = OutboxMetrics::new(&m);
        om.export(&s, now_ms());
        om.export(&s, now_ms());
        assert_eq!(m.outbox_events.with_label_values(&["dropped"]).get(), 3);
        assert_eq!(m.outbox_events.with_label_values(&["appended"]).get(), 2);
        assert_eq!(m.outbox_depth.get(), 2);
    }

    #[test]
    fn concurrent_appenders_lose_nothing_and_keep_per_thread_order() {
        let d = TempDir::new("outbox");
        let o = Arc::new(
            Outbox::open_with(&d.0, OutboxOptions { segment_bytes: 64 * 1024, ..relay_opts(1 << 30) }).unwrap(),
        );
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let o = o.clone();
                std::thread::spawn(move || {
                    for i in 0..500 {
                        o.append(&event(t * 10_000 + i)).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(o.depth(), 2000);
        let all = drain(&o);
        assert_eq!(all.len(), 2000);
        for t in 0..4u64 {
            let seq: Vec<u64> = all
                .iter()
                .filter_map(|e| e.request_id.as_ref()?.strip_prefix("req-")?.parse::<u64>().ok())
                .filter(|n| n / 10_000 == t)
                .collect();
            assert_eq!(seq, (0..500).map(|i| t * 10_000 + i).collect::<Vec<_>>());
        }
    }

    #[test]
    fn local_ledger_retention_and_size_bound() {
        let d = TempDir::new("outbox");
        let opts = OutboxOptions {
            segment_bytes: 2048,
            relay: false,
            retention: Some(Duration::from_secs(3600)),
            ..relay_opts(1 << 30)
        };
        let o = Outbox::open_with(&d.0, opts.clone()).unwrap();
        for i in 0..40 {
            o.append(&event(i)).unwrap();
        }
        assert_eq!(o.depth(), 0, "no relay: nothing is undelivered");
        let n = list_segments(&d.0).unwrap().len();
        assert_eq!(o.maintain(now_ms()), 0, "young segments are kept");
        // Two hours later every closed segment is past retention.
        assert_eq!(o.maintain(now_ms() + 2 * 3600 * 1000), n - 1);
        assert_eq!(list_segments(&d.0).unwrap().len(), 1);
        drop(o);
        // Size bound: oldest segments go first.
        let o = Outbox::open_with(&d.0, OutboxOptions { max_bytes: 4096, ..opts }).unwrap();
        for i in 0..40 {
            o.append(&event(i)).unwrap();
        }
        o.maintain(now_ms());
        assert!(o.stats().disk_bytes <= 4096 + 2048, "disk {}", o.stats().disk_bytes);
    }

    #[test]
    fn append_throughput() {
        let d = TempDir::new("outbox");
        let o = Arc::new(Outbox::open(&d.0, 1 << 40, OutboxFullPolicy::Failsafe).unwrap());
        let n = 100_000u64;
        let events: Vec<Event> = (0..n).map(event).collect();
        let t = std::time::Instant::now();
        for e in &events {
            o.append(e).unwrap();
        }
        let single = n as f64 / t.elapsed().as_secs_f64();
        let events = Arc::new(events);
        let t = std::time::Instant::now();
        let hs: Vec<_> = (0..2)
            .map(|k| {
                let (o, events) = (o.clone(), events.clone());
                std::thread::spawn(move || {
                    for e in events.iter().skip(k).step_by(2) {
                        o.append(e).unwrap();
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        let two = n as f64 / t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        o.sync().unwrap();
        let sync_ms = t.elapsed().as_secs_f64() * 1000.0;
        println!(
            "outbox append throughput: single thread {single:.0} events/s, 2 threads {two:.0} events/s \
             (event ~{} bytes; fsync of the backlog {sync_ms:.1} ms)",
            serde_json::to_vec(&event(0)).unwrap().len() + 1
        );
        assert_eq!(o.depth(), 2 * n);
    }
}
