//! The append-only journal shared by the embedded stores (budgets, approvals): one JSON line per
//! change, written with one `write_all` before the store answers (so a SIGKILL loses nothing) —
//! or, for a store in group-commit mode, staged and written by the group commit (`crate::commit`)
//! before the request it belongs to goes on — a failed write cut off again, and the compaction
//! threshold. Snapshot contents, replay and
//! compaction policy stay with each store.
//!
//! `install` (write a whole file atomically) also writes the embedded counters' daily snapshot
//! (`store::daily`) and the embedded runtime policy (`store::runtime_policy`).
//!
//! Owns: `Journal`, `push_line`, `create_append`, `sync_dir`, `install`. Imports: std, serde.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What replaying a journal could not read. A crash leaves at most a torn last write (the tail:
/// skipped, logged); an unreadable line with readable ones after it is damage (a disk error, a
/// hand edit), and starting from such a journal would silently lose what the line held — a
/// tenant's month spend, a consumed approval token.
#[derive(Debug, Default)]
pub(crate) struct Unreadable {
    /// Lines that could not be read.
    pub(crate) skipped: u64,
    /// Non-blank lines seen.
    lines: u64,
    /// The first unreadable line so far (1-based, among non-blank lines).
    first_bad: Option<u64>,
    /// The first unreadable line followed by a readable one.
    damaged_at: Option<u64>,
    /// The last line was unreadable although complete (newline-terminated, not NUL bytes): not
    /// what a crash during a write leaves.
    bad_complete_tail: bool,
}

impl Unreadable {
    /// Counts one non-blank line, readable or not (`line`: its bytes, with its newline if it
    /// had one).
    pub(crate) fn line(&mut self, readable: bool, line: &[u8]) {
        self.lines += 1;
        self.bad_complete_tail =
            !readable && line.ends_with(b"\n") && !line.iter().all(|b| *b == 0 || b.is_ascii_whitespace());
        if readable {
            if let Some(bad) = self.first_bad {
                self.damaged_at.get_or_insert(bad);
            }
        } else {
            self.skipped += 1;
            self.first_bad.get_or_insert(self.lines);
        }
    }

    /// `Err` (nothing changed, the file kept as it is) when a line before the tail was lost;
    /// else logs a torn last write, if any. `what`: what the journal holds, for the operator.
    pub(crate) fn check(&self, path: &Path, what: &str) -> io::Result<()> {
        if let Some(n) = self.damaged_at.or(self.bad_complete_tail.then_some(self.lines)) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: line {n} of {} cannot be read and is not a torn last write ({} unreadable line(s) in \
                     all): the {what} it and the lines after it hold cannot be trusted, and starting would lose \
                     them. This file is left as it is: restore it from a backup, or repair line {n} (or delete \
                     it, accepting that what it held is lost), then start again",
                    path.display(),
                    self.lines,
                    self.skipped
                ),
            ));
        }
        if self.skipped > 0 {
            tracing::warn!(
                skipped = self.skipped,
                path = %path.display(),
                "journal: ignored its torn last write (a crash during a write; that change was not acknowledged)"
            );
        }
        Ok(())
    }
}

/// An open journal file and what is known about its length.
pub(crate) struct Journal {
    pub(crate) dir: PathBuf,
    pub(crate) file: Arc<File>,
    /// Bytes of complete, acknowledged lines.
    pub(crate) len: u64,
    /// Size right after the last compaction.
    pub(crate) base_len: u64,
    pub(crate) compact_above: u64,
    /// A failed write could not be cut off: truncate to `len` before the next one.
    pub(crate) dirty: bool,
    buf: Vec<u8>,
    /// Lines staged for the next group commit (`stage_with`), not yet written.
    staged: Vec<u8>,
    /// Staged lines were dropped by a failed `append_with`: the next `flush_staged` fails.
    staged_lost: bool,
}

impl Journal {
    /// [`install`]s `snapshot` as the journal at `path`: a crash leaves either the old or the new
    /// journal complete. The result is open for appending.
    pub(crate) fn install(
        dir: &Path,
        tmp_name: &str,
        path: &Path,
        snapshot: &[u8],
        compact_above: u64,
    ) -> io::Result<Journal> {
        let file = install(dir, tmp_name, path, snapshot)?;
        let len = snapshot.len() as u64;
        Ok(Journal {
            dir: dir.to_path_buf(),
            file: Arc::new(file),
            len,
            base_len: len,
            compact_above,
            dirty: false,
            buf: Vec::new(),
            staged: Vec::new(),
            staged_lost: false,
        })
    }

    /// Cuts off what a failed write left, if that could not be done at the time.
    pub(crate) fn repair(&mut self) -> io::Result<()> {
        if self.dirty {
            self.file.set_len(self.len)?;
            self.dirty = false;
        }
        Ok(())
    }

    /// Appends `entries` with one `write_all`; on failure nothing of them stays in the file (if
    /// the truncation fails too, it is retried before the next write). Returns whether the
    /// journal has grown enough to be compacted.
    pub(crate) fn append<T: serde::Serialize>(&mut self, entries: &[T]) -> io::Result<bool> {
        self.append_with(|buf| entries.iter().try_for_each(|e| push_line(buf, e)))
    }

    /// [`Journal::append`] of the lines `write` puts into the buffer (newline-terminated).
    /// Lines staged before go out first, in the same write.
    pub(crate) fn append_with(&mut self, write: impl FnOnce(&mut Vec<u8>) -> io::Result<()>) -> io::Result<bool> {
        self.repair()?;
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let r = write(&mut buf).and_then(|()| {
            if self.staged.is_empty() {
                return self.write_out(&buf);
            }
            self.staged.extend_from_slice(&buf);
            self.write_staged()
        });
        buf.clear();
        if buf.capacity() <= 1 << 16 {
            self.buf = buf;
        }
        r
    }

    /// Stages the lines `write` puts into the buffer for the next write (a group commit's
    /// `flush_staged`, or the next `append_with`). Nothing is written yet.
    pub(crate) fn stage_with(&mut self, write: impl FnOnce(&mut Vec<u8>) -> io::Result<()>) -> io::Result<()> {
        let mark = self.staged.len();
        write(&mut self.staged).inspect_err(|_| self.staged.truncate(mark))
    }

    /// Writes the staged lines with one `write_all` (on failure they are not in the file, and
    /// are dropped). Returns whether the journal has grown enough to be compacted.
    pub(crate) fn flush_staged(&mut self) -> io::Result<bool> {
        if std::mem::take(&mut self.staged_lost) {
            return Err(io::Error::other("staged journal lines were lost in a failed write"));
        }
        if self.staged.is_empty() {
            return Ok(false);
        }
        let mut staged = std::mem::take(&mut self.staged);
        let r = self.repair().and_then(|()| self.write_out(&staged));
        staged.clear();
        if staged.capacity() <= 1 << 16 {
            self.staged = staged;
        }
        r
    }

    /// Writes the staged lines now, ahead of their group commit (an append that carries them, a
    /// compaction's snapshot point). A failure is also kept for that group commit, which then
    /// fails as if its own write had. Returns whether the journal has grown enough to be compacted.
    pub(crate) fn write_staged(&mut self) -> io::Result<bool> {
        let r = self.flush_staged();
        if r.is_err() {
            self.staged_lost = true;
        }
        r
    }

    fn write_out(&mut self, bytes: &[u8]) -> io::Result<bool> {
        if let Err(e) = (&*self.file).write_all(bytes) {
            self.dirty = self.file.set_len(self.len).is_err();
            return Err(e);
        }
        self.len += bytes.len() as u64;
        Ok(self.len > self.compact_above.max(self.base_len.saturating_mul(2)))
    }
}

/// One compact JSON line.
pub(crate) fn push_line<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, e: &T) -> io::Result<()> {
    serde_json::to_writer(&mut *out, e).map_err(io::Error::other)?;
    out.push(b'\n');
    Ok(())
}

/// Creates `path` afresh, opened for appending.
pub(crate) fn create_append(path: &Path) -> io::Result<File> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    OpenOptions::new().create_new(true).append(true).open(path)
}

/// Writes `bytes` to `tmp_name` in `dir`, fsyncs it and renames it over `path` (then fsyncs the
/// directory): a crash leaves either the old or the new file complete. Returns the new file,
/// open for appending.
pub(crate) fn install(dir: &Path, tmp_name: &str, path: &Path, bytes: &[u8]) -> io::Result<File> {
    install_with(dir, tmp_name, path, |mut file| file.write_all(bytes))
}

/// [`install`] of what `write` writes to the temporary file (in pieces, without the whole file
/// in memory). When `write` fails, `path` is left as it was.
pub(crate) fn install_with(
    dir: &Path,
    tmp_name: &str,
    path: &Path,
    write: impl FnOnce(&File) -> io::Result<()>,
) -> io::Result<File> {
    let tmp_path = dir.join(tmp_name);
    let file = create_append(&tmp_path)?;
    write(&file)?;
    file.sync_all()?;
    fs::rename(&tmp_path, path)?;
    sync_dir(dir)?;
    Ok(file)
}

/// Makes a rename in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}
