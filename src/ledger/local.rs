//! The local ledger: when Postgres is not the sink (no `PREAUTH_LEDGER_URL`, or an HTTP one), the
//! outbox keeps its segments for `PREAUTH_LOCAL_LEDGER_RETENTION_HOURS` and
//! `GET /api/v1/enforcement/ledger` reads them here.
//!
//! [`query_local`] scans segments newest first, keeps the events passing the filter, and stops
//! once `limit` events were found plus one more segment (events of adjacent segments can
//! interleave by a few milliseconds), or once a segment's last write is older than `start_at`.
//! Results are sorted by `occurred_at` (then `event_id`), newest first. Cost: reading and parsing
//! one or two 16 MiB segments for a typical query — blocking I/O, run it off the async workers
//! (see [`crate::ledger::LedgerSource::query`]). Unparseable lines and a line being written are
//! skipped.
//!
//! Owns: local ledger queries. Imports: outbox (file layout), event, LedgerFilter.

use std::fs;
use std::io;
use std::path::Path;

use crate::ledger::event::Event;
use crate::ledger::outbox::{list_segments, mtime_ms, segment_file_name};
use crate::ledger::LedgerFilter;

/// Slack between an event's `occurred_at` and its segment's last write (clock steps).
const SKEW_MS: u64 = 60_000;

/// Events in the outbox directory `dir` passing `filter`, newest first, at most `filter.limit`.
pub fn query_local(dir: &Path, filter: &LedgerFilter) -> io::Result<Vec<Event>> {
    let limit = filter.limit.clamp(1, LedgerFilter::MAX_LIMIT);
    let ids = match list_segments(dir) {
        Ok(ids) => ids,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut hits: Vec<Event> = Vec::new();
    let mut extra_segments = 0;
    for id in ids.into_iter().rev() {
        let path = dir.join(segment_file_name(id));
        let (meta, data) = match fs::metadata(&path).and_then(|m| Ok((m, fs::read(&path)?))) {
            Ok(x) => x,
            // Deleted by retention meanwhile.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if filter.start_at_us.is_some_and(|s| mtime_ms(&meta) + SKEW_MS < s / 1000) {
            break;
        }
        let complete = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        for line in data[..complete].split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            if let Ok(e) = serde_json::from_slice::<Event>(line) {
                if filter.matches(&e) {
                    hits.push(e);
                }
            }
        }
        if hits.len() >= limit {
            extra_segments += 1;
            if extra_segments > 1 {
                break;
            }
        }
    }
    hits.sort_unstable_by(|a, b| b.occurred_at.cmp(&a.occurred_at).then_with(|| b.event_id.cmp(&a.event_id)));
    hits.truncate(limit);
    Ok(hits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::event::EventType;
    use crate::ledger::outbox::{Outbox, OutboxOptions};

    #[test]
    fn local_queries_filter_and_order_newest_first() {
        let d = std::env::temp_dir().join(format!("preauth-local-{}", uuid::Uuid::new_v4().simple()));
        let opts = OutboxOptions {
            segment_bytes: 4096,
            relay: false,
            retention: Some(std::time::Duration::from_secs(3600)),
            ..OutboxOptions::new(1 << 30, crate::config::OutboxFullPolicy::Failsafe)
        };
        let o = Outbox::open_with(&d, opts).unwrap();
        // Events in the recent past (segment write times bound `occurred_at` from above).
        let now_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let base = (now_s - 3600) * 1_000_000;
        for i in 0..50u64 {
            let t = if i % 10 == 9 { EventType::ReservationSettled } else { EventType::Decision };
            let mut e = Event::new(t, "i-1", base + i * 1_000_000, 1);
            e.tenant_id = Some(format!("t{}", i % 2).into());
            e.reservation_id = Some(format!("r{i}"));
            o.append(&e).unwrap();
        }
        let q = |s: &str| query_local(&d, &LedgerFilter::from_query(s).unwrap()).unwrap();
        let all = q("limit=1000");
        assert_eq!(all.len(), 50);
        assert!(all.windows(2).all(|w| w[0].occurred_at > w[1].occurred_at), "newest first");
        let top = q("limit=3");
        assert_eq!(top, all[..3].to_vec());
        assert_eq!(q("tenant_id=t1").len(), 25);
        assert_eq!(q("event_type=reservation_settled").len(), 5);
        assert_eq!(q("reservation_id=r7")[0].reservation_id.as_deref(), Some("r7"));
        let from = crate::decide::time::rfc3339_seconds((base / 1000) + 40_000);
        let to = crate::decide::time::rfc3339_seconds((base / 1000) + 44_000);
        let window = q(&format!("start_at={from}&end_at={to}"));
        assert_eq!(window.len(), 5);
        assert_eq!(window[0].reservation_id.as_deref(), Some("r44"));
        drop(o);
        let _ = fs::remove_dir_all(&d);
    }
}
