//! File source: tails the files a pattern names (`/edge/sensors/*.log`), one record per line,
//! into a stream, as the seed's FileStreamSource does.
//!
//! Invariant: every line is stored exactly once, in order within its file. Lines go to the
//! buffer writer together with the file's position after them, in one command
//! ([`WriterCommand::FileLines`]) whose records and position are committed in one transaction,
//! and reading resumes at the committed position after a restart or a `kill -9`. A file is
//! known by its device, inode and the checksum of its first line, so a new file that reuses
//! an inode is read from its start.
//!
//! Rotation: a file renamed away (or deleted) is still read from the handle held open, for
//! [`ROTATE_WAIT`] (its writer may still append to it); then its last line, even without a
//! newline, is taken and the file is forgotten. The new file at the path is read from its
//! start. A file that shrinks (truncated, or `copytruncate`d) is read again from its start:
//! what was appended between the copy and the truncate and not yet read is lost, as with every
//! tailer (prefer rename). A partial last line waits for its newline; a line longer than
//! `max_line_bytes` is cut there (counted) and the rest of it skipped.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::buffer::{FileLines, FilePosition, Line, Queue, QueueBytes, WriterCommand};
use crate::metrics::Metrics;

/// How long a file renamed away or deleted is still read from its open handle.
pub const ROTATE_WAIT: Duration = Duration::from_secs(5);
/// Most bytes read from one file per look.
const CHUNK: usize = 1 << 20;
/// Most bytes read per look over all files (what the source holds at once).
const POLL_BYTES: usize = 4 << 20;
/// Most lines per command to the writer...
const BATCH_LINES: usize = 1000;
/// ...and most bytes (each batch is committed whole, within the writer's group bound).
const BATCH_BYTES: usize = 256 << 10;
/// Longest `max_line_bytes` (a line must fit one read).
pub const MAX_LINE_BYTES: usize = 512 << 10;
/// Bytes of a file's start its checksum covers (up to its first newline).
const FINGERPRINT_BYTES: usize = 256;
/// Most files followed by one source at once.
pub const MAX_FILES: usize = 1024;

/// A `sources: - file:` entry, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct FileSourceConfig {
    /// The directory the files are in.
    pub dir: PathBuf,
    /// The pattern their names match (`*`, `?`, `[…]`).
    pub pattern: glob::Pattern,
    /// The stream the lines go to.
    pub stream: String,
    /// Each line's topic; `{file}` is the file's name.
    pub topic: String,
    /// Longest line kept whole.
    pub max_line_bytes: usize,
    /// A file with no saved position seen at the first scan is read from its end (else from
    /// its start); files that appear later are always read from their start.
    pub start_at_end: bool,
    /// How often the files are looked at.
    pub poll: Duration,
}

impl FileSourceConfig {
    /// The key of this source's positions in the buffer.
    pub fn key(&self) -> String {
        format!("file:{}", self.dir.join(self.pattern.as_str()).display())
    }
}

/// A file followed.
#[derive(Debug)]
struct Tracked {
    path: PathBuf,
    file: File,
    dev: u64,
    inode: u64,
    fingerprint: Option<u32>,
    /// Bytes consumed: every line before it is stored (or on its way to the writer).
    offset: u64,
    /// In the middle of a line that was cut: skip to its newline.
    skipping: bool,
    /// Since when it is no longer at a path the pattern names.
    gone_since: Option<Instant>,
}

/// What the source knows between polls.
#[derive(Debug)]
struct Tail {
    config: FileSourceConfig,
    key: String,
    tracked: Vec<Tracked>,
    /// Positions committed before this start, by (device, inode), until their files are found.
    saved: HashMap<(u64, u64), FilePosition>,
    /// Whether the source ran before (`start_at: end` applies only before).
    started_before: bool,
    /// Whether the directory was listed once (the saved positions are settled then).
    listed: bool,
    /// Commands to send before the next reads.
    pending: Vec<FileLines>,
    events: Vec<&'static str>,
}

/// The file source stage.
pub struct FileSource {
    tail: Tail,
    queue: Queue,
    budget: QueueBytes,
    metrics: Metrics,
}

impl FileSource {
    /// A source for `config`, resuming at `saved` (the positions the buffer holds for it), sending
    /// to the writer's `queue` within `budget`.
    pub fn new(
        config: FileSourceConfig,
        saved: Vec<FilePosition>,
        queue: Queue,
        budget: QueueBytes,
        metrics: Metrics,
    ) -> FileSource {
        let started_before = saved.iter().any(|p| p.dev == 0 && p.inode == 0);
        FileSource {
            tail: Tail {
                key: config.key(),
                config,
                tracked: Vec::new(),
                saved: saved
                    .into_iter()
                    .filter(|p| !(p.dev == 0 && p.inode == 0))
                    .map(|p| ((p.dev, p.inode), p))
                    .collect(),
                started_before,
                listed: false,
                pending: Vec::new(),
                events: Vec::new(),
            },
            queue,
            budget,
            metrics,
        }
    }

    /// Follows the files until `shutdown`; ends early only if the writer is gone.
    pub async fn run(self, shutdown: CancellationToken) {
        let FileSource {
            mut tail,
            queue,
            budget,
            metrics,
        } = self;
        let poll = tail.config.poll;
        let key = tail.key.clone();
        loop {
            let polled = tokio::task::spawn_blocking(move || {
                let (batches, more) = tail.poll();
                (tail, batches, more)
            })
            .await;
            let Ok((back, batches, more)) = polled else {
                tracing::error!(source = %key, "the file source's poll panicked; it stops");
                return;
            };
            tail = back;
            for event in tail.events.drain(..) {
                metrics
                    .file_source_events
                    .with_label_values(&[key.as_str(), event])
                    .inc();
            }
            for batch in batches {
                let command = WriterCommand::FileLines(Box::new(batch));
                tokio::select! {
                    () = budget.take(&command) => {}
                    () = shutdown.cancelled() => return,
                }
                if queue.send_async(command).await.is_err() {
                    return;
                }
            }
            // Behind (a backlog): read on at once.
            let wait = if more { Duration::ZERO } else { poll };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }
}

/// The checksum of a file's start: up to its first newline, at most [`FINGERPRINT_BYTES`];
/// `None` while the first line is incomplete and shorter.
fn fingerprint(file: &mut File) -> std::io::Result<Option<u32>> {
    let mut head = vec![0u8; FINGERPRINT_BYTES];
    file.seek(SeekFrom::Start(0))?;
    let mut n = 0;
    while n < head.len() {
        let got = file.read(&mut head[n..])?;
        if got == 0 {
            break;
        }
        n += got;
    }
    let head = &head[..n];
    Ok(match head.iter().position(|&b| b == b'\n') {
        Some(i) => Some(crc32fast::hash(&head[..=i])),
        None if n == FINGERPRINT_BYTES => Some(crc32fast::hash(head)),
        None => None,
    })
}

/// One line of [`split_lines`]: the line, whether it was cut, where it ends.
pub type SplitLine<'a> = (&'a [u8], bool, usize);

/// Splits `buf` into lines: complete ones, cut at `max` bytes (the rest skipped to the
/// newline), and with `last`, what is left without a newline. Returns each line (trailing
/// `\r` dropped), whether it was cut, and where it ends in `buf` (past its newline), and the
/// bytes consumed in all; `skipping` carries a cut line across calls. Pure.
pub fn split_lines<'a>(
    buf: &'a [u8],
    max: usize,
    skipping: &mut bool,
    last: bool,
) -> (Vec<SplitLine<'a>>, usize) {
    let mut lines = Vec::new();
    let mut start = 0;
    let trim = |l: &[u8]| -> usize {
        if l.last() == Some(&b'\r') {
            l.len() - 1
        } else {
            l.len()
        }
    };
    while start < buf.len() {
        match buf[start..].iter().position(|&b| b == b'\n') {
            Some(i) => {
                let line = &buf[start..start + i];
                let end = start + i + 1;
                if std::mem::take(skipping) {
                    // The tail of a line cut before.
                } else if line.len() > max {
                    lines.push((&line[..max], true, end));
                } else {
                    lines.push((&line[..trim(line)], false, end));
                }
                start = end;
            }
            None => {
                let rest = &buf[start..];
                if *skipping {
                    start = buf.len();
                } else if rest.len() > max {
                    lines.push((&rest[..max], true, buf.len()));
                    *skipping = true;
                    start = buf.len();
                } else if last {
                    lines.push((&rest[..trim(rest)], false, buf.len()));
                    start = buf.len();
                }
                break;
            }
        }
    }
    (lines, start)
}

/// Where the last complete line of a file of `len` bytes ends (0 if none in its last 64 KiB):
/// reading from its end starts there, never in the middle of a line.
fn last_line_end(file: &mut File, len: u64) -> std::io::Result<u64> {
    let from = len.saturating_sub(64 << 10);
    let mut tail = Vec::new();
    file.seek(SeekFrom::Start(from))?;
    file.take(len - from).read_to_end(&mut tail)?;
    Ok(tail
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| from + i as u64 + 1))
}

/// Opens `path` for reading without blocking (a FIFO swapped in must not hang the source) and
/// gives its identity as the open handle has it: `None` unless it is a regular file.
fn open_regular(path: &Path) -> Option<(File, u64, u64, u64)> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .ok()?;
    let meta = file.metadata().ok()?;
    meta.is_file()
        .then(|| (file, meta.dev(), meta.ino(), meta.len()))
}

/// The marker of a source that has run (its `start_at: end` applies only before that).
fn started_marker(key: &str) -> FilePosition {
    FilePosition {
        source: key.to_owned(),
        dev: 0,
        inode: 0,
        fingerprint: 0,
        offset: 0,
        path: "(source started)".into(),
        forget: false,
    }
}

impl Tail {
    /// One look at the files: the lines to send (with their positions), and whether a file has
    /// more to read right away. At most [`POLL_BYTES`] are read per look.
    fn poll(&mut self) -> (Vec<FileLines>, bool) {
        self.scan();
        let mut batches = std::mem::take(&mut self.pending);
        // Files renamed away first: their lines came before the new file's.
        self.tracked.sort_by_key(|t| t.gone_since.is_none());
        let mut forgotten = Vec::new();
        let mut more = false;
        let mut left = POLL_BYTES;
        for i in 0..self.tracked.len() {
            if left == 0 {
                more = true;
                break;
            }
            match self.read(i, &mut left) {
                Ok((read, forget, behind)) => {
                    if forget {
                        forgotten.push(i);
                    }
                    more |= behind;
                    batches.extend(read);
                }
                Err(e) => {
                    let t = &self.tracked[i];
                    if t.gone_since.is_some_and(|s| s.elapsed() >= ROTATE_WAIT) {
                        // Gone, and unreadable: let it go (its handle holds its space).
                        tracing::warn!(file = %t.path.display(), error = %e, "file source: a file gone from its path cannot be read to its end; left");
                        batches.push(self.batch(i, Vec::new(), t.offset, true));
                        forgotten.push(i);
                    } else {
                        tracing::warn!(file = %t.path.display(), error = %e, "cannot read a file of a file source; retried");
                    }
                }
            }
        }
        for i in forgotten.into_iter().rev() {
            self.tracked.remove(i);
        }
        (batches, more)
    }

    /// Finds the files the pattern names now: new ones are opened (at their saved position, if
    /// any), those gone from their path are marked. The first successful listing also settles
    /// the positions saved before: a file renamed out of the pattern while the agent was
    /// stopped is read to its end, one gone from the directory is forgotten (and said).
    fn scan(&mut self) {
        let entries = match std::fs::read_dir(&self.config.dir) {
            Ok(entries) => entries,
            Err(e) => {
                // The files followed are still read from their handles; none is taken for
                // gone, and the positions saved before wait for a listing.
                if !self.listed {
                    tracing::warn!(dir = %self.config.dir.display(), error = %e, "file source: cannot list the directory; retried");
                }
                return;
            }
        };
        let mut all: Vec<(PathBuf, bool)> = entries
            .filter_map(Result::ok)
            .map(|e| {
                let matches = self
                    .config
                    .pattern
                    .matches(&e.file_name().to_string_lossy());
                (e.path(), matches)
            })
            .collect();
        all.sort();
        let mut found: Vec<(PathBuf, u64, u64)> = Vec::new();
        for (path, matches) in &all {
            if !matches {
                continue;
            }
            if let Ok(meta) = std::fs::metadata(path)
                && meta.is_file()
            {
                found.push((path.clone(), meta.dev(), meta.ino()));
            }
        }
        self.mark_gone(&found);
        let mut full = false;
        for (path, dev, inode) in found {
            if let Some(t) = self
                .tracked
                .iter_mut()
                .find(|t| t.dev == dev && t.inode == inode)
            {
                t.path = path;
                continue;
            }
            if self.tracked.len() >= MAX_FILES {
                full = true;
                continue;
            }
            let Some((file, dev, inode, len)) = open_regular(&path) else {
                continue;
            };
            self.follow(path, file, dev, inode, len, None);
        }
        if full {
            self.events.push("too_many_files");
        }
        if !self.listed {
            self.listed = true;
            self.settle_saved(&all);
        }
    }

    /// Starts following `file`: at its saved position if it is the file read before (same
    /// inode, same first line; the device may differ after a reboot on some file systems), or
    /// from its start (its end for `start_at: end` before the source first ran). `gone`: it is
    /// already renamed out of the pattern.
    fn follow(
        &mut self,
        path: PathBuf,
        mut file: File,
        dev: u64,
        inode: u64,
        len: u64,
        gone: Option<Instant>,
    ) {
        let fp = fingerprint(&mut file).ok().flatten();
        let saved = match self.saved.remove(&(dev, inode)) {
            Some(p) => Some(p),
            None => {
                let other = self
                    .saved
                    .iter()
                    .find(|(_, p)| p.inode == inode && Some(p.fingerprint) == fp)
                    .map(|(k, _)| *k);
                other.and_then(|k| self.saved.remove(&k))
            }
        };
        let (offset, skipping) = match saved {
            Some(p) if fp == Some(p.fingerprint) && p.offset <= len => {
                // Resumed in the middle of a line that was cut: its rest is skipped.
                let mut before = [0u8; 1];
                let mid_line = p.offset > 0
                    && file
                        .seek(SeekFrom::Start(p.offset - 1))
                        .and_then(|_| file.read_exact(&mut before))
                        .is_ok()
                    && before[0] != b'\n';
                (p.offset, mid_line)
            }
            _ if !self.started_before && self.config.start_at_end && fp.is_some() => {
                (last_line_end(&mut file, len).unwrap_or(0), false)
            }
            _ => (0, false),
        };
        self.tracked.push(Tracked {
            path,
            file,
            dev,
            inode,
            fingerprint: fp,
            offset,
            skipping,
            gone_since: gone,
        });
    }

    /// After the first listing: each position saved before whose file the pattern no longer
    /// names is looked for among `all` the directory's files (renamed while the agent was
    /// stopped: read to its end), else forgotten, and said. The source's marker is written.
    fn settle_saved(&mut self, all: &[(PathBuf, bool)]) {
        let saved: Vec<FilePosition> = self.saved.drain().map(|(_, p)| p).collect();
        for p in saved {
            let renamed = all.iter().find_map(|(path, _)| {
                let meta = std::fs::metadata(path).ok()?;
                (meta.is_file() && meta.ino() == p.inode).then(|| path.clone())
            });
            let opened = renamed.and_then(|path| open_regular(&path).map(|o| (path, o)));
            if let Some((path, (mut file, dev, inode, len))) = opened
                && self.tracked.len() < MAX_FILES
                && fingerprint(&mut file).ok().flatten() == Some(p.fingerprint)
            {
                self.saved.insert((dev, inode), p);
                // Gone since long enough: read to its end, then let go.
                let since = Instant::now().checked_sub(ROTATE_WAIT);
                self.follow(path, file, dev, inode, len, since.or(Some(Instant::now())));
                continue;
            }
            tracing::warn!(file = %p.path, offset = p.offset, "file source: a file read before is gone; lines written to it after this offset were not read");
            self.pending.push(FileLines {
                stream: self.config.stream.clone(),
                lines: Vec::new(),
                position: FilePosition { forget: true, ..p },
            });
        }
        if !self.started_before {
            self.started_before = true;
            self.pending.push(FileLines {
                stream: self.config.stream.clone(),
                lines: Vec::new(),
                position: started_marker(&self.key),
            });
        }
    }

    /// Marks the files followed that are not among `found` as gone (since now).
    fn mark_gone(&mut self, found: &[(PathBuf, u64, u64)]) {
        let now = Instant::now();
        for t in &mut self.tracked {
            let here = found
                .iter()
                .any(|(_, dev, inode)| *dev == t.dev && *inode == t.inode);
            if here {
                t.gone_since = None;
            } else if t.gone_since.is_none() {
                t.gone_since = Some(now);
                self.events.push("rotated");
            }
        }
    }

    /// Reads file `i` from its offset (at most `left` bytes, taken from it): its new lines in
    /// batches of at most [`BATCH_LINES`] lines and [`BATCH_BYTES`] bytes, each with the
    /// position after it; whether the file is done with (gone, read to its end after
    /// [`ROTATE_WAIT`]); and whether it has more to read.
    fn read(
        &mut self,
        i: usize,
        left: &mut usize,
    ) -> std::io::Result<(Vec<FileLines>, bool, bool)> {
        let max = self.config.max_line_bytes;
        let t = &mut self.tracked[i];
        let len = t.file.metadata()?.len();
        // Truncated in place (or copytruncate): shorter than what was read, or with another
        // first line (it grew past the old offset before this look). Its content starts again.
        let head = fingerprint(&mut t.file)?;
        if len < t.offset || (t.fingerprint.is_some() && head.is_some() && head != t.fingerprint) {
            t.offset = 0;
            t.skipping = false;
            self.events.push("truncated");
        }
        t.fingerprint = head.or(t.fingerprint.filter(|_| t.offset > 0));
        let done_waiting = t
            .gone_since
            .is_some_and(|since| since.elapsed() >= ROTATE_WAIT);
        if t.fingerprint.is_none() && !done_waiting {
            // No complete first line yet: nothing to send.
            return Ok((Vec::new(), false, false));
        }
        let want = (len - t.offset).min(CHUNK.min(*left) as u64) as usize;
        let mut buf = vec![0u8; want];
        t.file.seek(SeekFrom::Start(t.offset))?;
        let mut n = 0;
        while n < buf.len() {
            let got = t.file.read(&mut buf[n..])?;
            if got == 0 {
                break;
            }
            n += got;
        }
        buf.truncate(n);
        *left = left.saturating_sub(n);
        let at_end = t.offset + n as u64 >= len;
        let forget = done_waiting && at_end;
        let mut skipping = t.skipping;
        let (lines, consumed) = split_lines(&buf, max, &mut skipping, forget);
        t.skipping = skipping;
        let base = t.offset;
        t.offset += consumed as u64;
        let behind = !at_end;
        if consumed == 0 && !forget {
            return Ok((Vec::new(), false, behind));
        }
        let cut = lines.iter().filter(|(_, cut, _)| *cut).count();
        for _ in 0..cut {
            self.events.push("line_cut");
        }
        // Batches bounded in lines and bytes, each with the position just after it.
        let mut batches = Vec::new();
        let mut batch: Vec<Vec<u8>> = Vec::new();
        let mut bytes = 0;
        let count = lines.len();
        for (k, (line, _, end)) in lines.into_iter().enumerate() {
            bytes += line.len();
            batch.push(line.to_vec());
            if (batch.len() >= BATCH_LINES || bytes >= BATCH_BYTES) && k + 1 < count {
                let lines = std::mem::take(&mut batch);
                batches.push(self.batch(i, lines, base + end as u64, false));
                bytes = 0;
            }
        }
        batches.push(self.batch(i, batch, base + consumed as u64, forget));
        Ok((batches, forget, behind))
    }

    /// The command for `lines` of file `i`, with its position `offset` after them.
    fn batch(&self, i: usize, lines: Vec<Vec<u8>>, offset: u64, forget: bool) -> FileLines {
        let t = &self.tracked[i];
        let name: String = t
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
            .chars()
            .map(|c| if c == '+' || c == '#' { '_' } else { c })
            .collect();
        let topic = self.config.topic.replace("{file}", &name);
        let now = crate::clock::now_ms();
        FileLines {
            stream: self.config.stream.clone(),
            lines: lines
                .into_iter()
                .map(|l| Line {
                    topic: topic.clone(),
                    payload: Bytes::from(l),
                    received_at_ms: now,
                })
                .collect(),
            position: FilePosition {
                source: self.key.clone(),
                dev: t.dev,
                inode: t.inode,
                fingerprint: t.fingerprint.unwrap_or(0),
                offset,
                path: t.path.display().to_string(),
                forget,
            },
        }
    }
}

/// The positions saved for source `key` in the buffer at `path` (read-only).
pub fn saved_positions(path: &Path, key: &str) -> rusqlite::Result<Vec<FilePosition>> {
    let conn = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    let mut stmt = conn.prepare(
        "SELECT dev, inode, fingerprint, offset, path FROM file_positions WHERE source = ?1",
    )?;
    stmt.query_map([key], |r| {
        Ok(FilePosition {
            source: key.to_owned(),
            dev: r.get::<_, i64>(0)? as u64,
            inode: r.get::<_, i64>(1)? as u64,
            fingerprint: r.get::<_, i64>(2)? as u32,
            offset: r.get::<_, i64>(3)?.max(0) as u64,
            path: r.get(4)?,
            forget: false,
        })
    })?
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(buf: &[u8], max: usize, skipping: bool, last: bool) -> (Vec<String>, usize, bool) {
        let mut s = skipping;
        let (lines, used) = split_lines(buf, max, &mut s, last);
        (
            lines
                .into_iter()
                .map(|(l, cut, _)| {
                    format!(
                        "{}{}",
                        String::from_utf8_lossy(l),
                        if cut { "…" } else { "" }
                    )
                })
                .collect(),
            used,
            s,
        )
    }

    #[test]
    fn lines_are_split_cut_and_held_back() {
        let v = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        for (buf, max, skipping, last, want) in [
            (
                &b"a\nbb\n"[..],
                10,
                false,
                false,
                (v(&["a", "bb"]), 5, false),
            ),
            (b"a\nbb", 10, false, false, (v(&["a"]), 2, false)),
            (b"a\nbb", 10, false, true, (v(&["a", "bb"]), 4, false)),
            (b"a\r\nb\r\n", 10, false, false, (v(&["a", "b"]), 6, false)),
            (
                b"abcdef\nx\n",
                3,
                false,
                false,
                (v(&["abc…", "x"]), 9, false),
            ),
            (b"abcdef", 3, false, false, (v(&["abc…"]), 6, true)),
            (b"gh\ny\n", 3, true, false, (v(&["y"]), 5, false)),
            (b"ghijkl", 3, true, false, (v(&[]), 6, true)),
            (b"", 3, false, true, (v(&[]), 0, false)),
            (b"\n\n", 3, false, false, (v(&["", ""]), 2, false)),
        ] {
            assert_eq!(
                split(buf, max, skipping, last),
                want,
                "{:?}",
                String::from_utf8_lossy(buf)
            );
        }
    }

    proptest::proptest! {
        /// Fed in any chunks, the lines come out the same as from the whole, and the bytes
        /// consumed never pass a partial line.
        #[test]
        fn chunks_give_the_same_lines(
            text in proptest::collection::vec(proptest::sample::select(vec![b'a', b'b', b'\n', b'\r']), 0..200),
            cuts in proptest::collection::vec(0usize..200, 0..6),
        ) {
            let max = 7;
            let mut whole_skip = false;
            let (whole, _) = split_lines(&text, max, &mut whole_skip, false);
            let whole: Vec<Vec<u8>> = whole.into_iter().map(|(l, _, _)| l.to_vec()).collect();
            let mut got = Vec::new();
            let mut at = 0;
            let mut skipping = false;
            let mut points: Vec<usize> = cuts.into_iter().map(|c| c.min(text.len())).collect();
            points.push(text.len());
            points.sort();
            for end in points {
                if end < at {
                    continue;
                }
                let (lines, used) = split_lines(&text[at..end], max, &mut skipping, false);
                got.extend(lines.into_iter().map(|(l, _, _)| l.to_vec()));
                at += used;
            }
            proptest::prop_assert_eq!(got, whole);
        }
    }
}
