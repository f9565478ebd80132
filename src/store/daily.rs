//! The embedded counters' daily request counts on disk: `<data dir>/counters-daily.json`, so that
//! a restart (deploy, crash) does not hand every tenant a fresh tier daily quota.
//!
//! The file is one JSON object, `{"day": <UTC day number>, "counts": {"<tenant>": <requests>}}`:
//! the tenants with a count above zero on that day. It is rewritten whole, atomically
//! (`journal::install`: temporary file, fsync, rename, fsync of the directory), so a crash leaves
//! the previous or the new snapshot, never a mix. When and what to write is the counters'
//! business (`store::memory`); this module owns the format, the write and the load:
//!
//! - a file of another day than the one asked for is ignored (its counts are over);
//! - a missing file is a first start: nothing to load;
//! - a file that cannot be read or parsed is moved aside (`counters-daily.json.corrupt`, for
//!   inspection) with a warning, and the day's counts start from zero — the sidecar still
//!   starts, like the journals that skip unreadable lines and the outbox that replays without an
//!   unreadable cursor.
//!
//! Owns: the snapshot format, `load`, `write` (and its `Sink`). Imports: `store::journal`, serde, tracing, std.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

use serde::Deserialize;

use super::journal;

/// The snapshot's file name in the data directory.
pub(crate) const FILE: &str = "counters-daily.json";
const TMP_FILE: &str = "counters-daily.json.tmp";
/// Where an unreadable snapshot is moved (the latest one only).
pub(crate) const CORRUPT_FILE: &str = "counters-daily.json.corrupt";

#[derive(Deserialize)]
struct In {
    day: u32,
    counts: HashMap<String, u64>,
}

/// Where [`write`]'s caller puts the counts: in pieces, each kept in memory until
/// [`Sink::end_piece`] hands it to the file — so a piece can be gathered under a lock and written
/// after it is let go, and no more than one piece is ever held (not the whole snapshot).
pub(crate) struct Sink<'a> {
    file: &'a File,
    buf: Vec<u8>,
    first: bool,
}

impl Sink<'_> {
    /// Adds `tenant`'s count to the current piece.
    pub(crate) fn push(&mut self, tenant: &str, count: u64) {
        if !std::mem::take(&mut self.first) {
            self.buf.push(b',');
        }
        serde_json::to_writer(&mut self.buf, tenant).expect("a string serialises into a Vec");
        self.buf.push(b':');
        self.buf.extend_from_slice(itoa::Buffer::new().format(count).as_bytes());
    }

    /// Writes the current piece to the file.
    pub(crate) fn end_piece(&mut self) -> io::Result<()> {
        let r = (&*self.file).write_all(&self.buf);
        self.buf.clear();
        r
    }
}

/// Replaces the snapshot in `dir` with the counts of `day` that `fill` pushes, atomically and
/// durably (a failed `fill` leaves the previous snapshot in place).
pub(crate) fn write(dir: &Path, day: u32, fill: impl FnOnce(&mut Sink<'_>) -> io::Result<()>) -> io::Result<()> {
    journal::install_with(dir, TMP_FILE, &dir.join(FILE), |file| {
        let mut sink = Sink { file, buf: Vec::new(), first: true };
        sink.buf.extend_from_slice(format!("{{\"day\":{day},\"counts\":{{").as_bytes());
        fill(&mut sink)?;
        sink.buf.extend_from_slice(b"}}\n");
        sink.end_piece()
    })
    .map(drop)
}

/// The counts of `today` kept in `dir` (empty when there is no snapshot, or one of another day;
/// an unreadable one is moved aside with a warning, see the module docs).
pub(crate) fn load(dir: &Path, today: u32) -> Vec<(String, u64)> {
    let path = dir.join(FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => return unreadable(dir, &e.to_string()),
    };
    let snapshot: In = match serde_json::from_slice(&bytes) {
        Ok(s) => s,
        Err(e) => return unreadable(dir, &e.to_string()),
    };
    if snapshot.day != today {
        tracing::info!(
            path = %path.display(),
            snapshot_day = snapshot.day,
            today,
            "daily request counts: the snapshot is of another UTC day; today's counts start from zero"
        );
        return Vec::new();
    }
    let counts: Vec<(String, u64)> = snapshot.counts.into_iter().filter(|&(_, n)| n > 0).collect();
    tracing::info!(path = %path.display(), tenants = counts.len(), "daily request counts: restored today's counts");
    counts
}

fn unreadable(dir: &Path, error: &str) -> Vec<(String, u64)> {
    let (path, aside) = (dir.join(FILE), dir.join(CORRUPT_FILE));
    let moved = fs::rename(&path, &aside);
    tracing::warn!(
        path = %path.display(),
        error,
        moved_to = %aside.display(),
        moved = moved.is_ok(),
        "daily request counts: the snapshot cannot be read; today's tier daily quotas count from zero \
         on this replica until UTC midnight. Check the data volume (disk errors, full disk, permissions \
         of PREAUTH_DATA_DIR); the file was moved aside for inspection (delete it when done) and a new \
         snapshot is written within seconds of the next request"
    );
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::outbox::tests::TempDir;

    fn write_all(d: &Path, day: u32, counts: &[(&str, u64)]) -> io::Result<()> {
        write(d, day, |sink| {
            for (i, &(tenant, n)) in counts.iter().enumerate() {
                sink.push(tenant, n);
                if i % 2 == 1 {
                    sink.end_piece()?;
                }
            }
            Ok(())
        })
    }

    fn sorted(mut v: Vec<(String, u64)>) -> Vec<(String, u64)> {
        v.sort();
        v
    }

    #[test]
    fn a_snapshot_round_trips_and_leaves_no_temporary_file() {
        let tmp = TempDir::new("daily");
        let d = tmp.0.clone();
        write_all(&d, 20_000, &[("acme", 3), ("we\"ird\n", 1), ("b", 7)]).unwrap();
        assert_eq!(sorted(load(&d, 20_000)), vec![("acme".into(), 3), ("b".into(), 7), ("we\"ird\n".into(), 1)]);
        assert!(!d.join(TMP_FILE).exists());
        write_all(&d, 20_000, &[]).unwrap();
        assert_eq!(load(&d, 20_000), vec![], "a rewrite replaces the whole snapshot");
    }

    #[test]
    fn a_snapshot_of_another_day_is_ignored_and_a_missing_one_is_empty() {
        let tmp = TempDir::new("daily");
        let d = tmp.0.clone();
        assert_eq!(load(&d, 20_000), vec![]);
        write_all(&d, 19_999, &[("acme", 1)]).unwrap();
        assert_eq!(load(&d, 20_000), vec![], "yesterday's counts are over");
        assert_eq!(load(&d, 19_998), vec![], "a snapshot from the future (clock stepped back) too");
        assert!(d.join(FILE).exists(), "kept: it is not damaged");
    }

    #[test]
    fn an_unreadable_snapshot_is_moved_aside_and_counts_start_from_zero() {
        let tmp = TempDir::new("daily");
        let d = tmp.0.clone();
        for garbage in
            [&b"{\"day\": 20000, \"counts\": {\"acme\": 1"[..], b"", b"\x00\xff", b"{\"day\":-1,\"counts\":{}}"]
        {
            fs::write(d.join(FILE), garbage).unwrap();
            assert_eq!(load(&d, 20_000), vec![]);
            assert!(!d.join(FILE).exists());
            assert_eq!(fs::read(d.join(CORRUPT_FILE)).unwrap(), garbage, "kept for inspection");
        }
    }
}
