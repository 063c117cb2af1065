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
/// Most bytes read from one file per poll.
const CHUNK: usize = 1 << 20;
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
    /// Positions committed before this start, by (device, inode).
    saved: HashMap<(u64, u64), FilePosition>,
    first_scan: bool,
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
        FileSource {
            tail: Tail {
                key: config.key(),
                config,
                tracked: Vec::new(),
                saved: saved.into_iter().map(|p| ((p.dev, p.inode), p)).collect(),
                first_scan: true,
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

/// Splits `buf` into lines: complete ones, cut at `max` bytes (the rest skipped to the
/// newline), and with `last`, what is left without a newline. Returns the lines (trailing `\r`
/// dropped) and the bytes consumed; `skipping` carries a cut line across calls. Pure.
pub fn split_lines<'a>(
    buf: &'a [u8],
    max: usize,
    skipping: &mut bool,
    last: bool,
) -> (Vec<(&'a [u8], bool)>, usize) {
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
                if std::mem::take(skipping) {
                    // The tail of a line cut before.
                } else if line.len() > max {
                    lines.push((&line[..max], true));
                } else {
                    lines.push((&line[..trim(line)], false));
                }
                start += i + 1;
            }
            None => {
                let rest = &buf[start..];
                if *skipping {
                    start = buf.len();
                } else if rest.len() > max {
                    lines.push((&rest[..max], true));
                    *skipping = true;
                    start = buf.len();
                } else if last {
                    lines.push((&rest[..trim(rest)], false));
                    start = buf.len();
                }
                break;
            }
        }
    }
    (lines, start)
}

impl Tail {
    /// One look at the files: the lines to send (with their positions), and whether a file has
    /// more to read right away.
    fn poll(&mut self) -> (Vec<FileLines>, bool) {
        self.scan();
        let mut batches = Vec::new();
        if self.first_scan {
            // Saved positions of files no longer there (renamed out of the pattern, or deleted,
            // while the agent was stopped): forgotten, and said.
            for (_, p) in self.saved.drain() {
                tracing::warn!(file = %p.path, offset = p.offset, "file source: a file read before is gone; lines written to it after this offset were not read");
                batches.push(FileLines {
                    stream: self.config.stream.clone(),
                    lines: Vec::new(),
                    position: FilePosition { forget: true, ..p },
                });
            }
        }
        // Files renamed away first: their lines came before the new file's.
        self.tracked.sort_by_key(|t| t.gone_since.is_none());
        let mut forgotten = Vec::new();
        let mut more = false;
        for i in 0..self.tracked.len() {
            match self.read(i) {
                Ok(Some((batch, forget))) => {
                    if forget {
                        forgotten.push(i);
                    }
                    more |= !batch.lines.is_empty() && !forget && self.behind(i);
                    batches.push(batch);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(file = %self.tracked[i].path.display(), error = %e, "cannot read a file of a file source; retried");
                }
            }
        }
        for i in forgotten.into_iter().rev() {
            self.tracked.remove(i);
        }
        self.first_scan = false;
        (batches, more)
    }

    /// Whether file `i` has bytes past its offset.
    fn behind(&self, i: usize) -> bool {
        let t = &self.tracked[i];
        t.file.metadata().is_ok_and(|m| m.len() > t.offset)
    }

    /// Finds the files the pattern names now: new ones are opened (at their saved position, if
    /// any), those gone from their path are marked.
    fn scan(&mut self) {
        let entries = match std::fs::read_dir(&self.config.dir) {
            Ok(entries) => entries,
            Err(e) => {
                // The files followed are still read from their handles; none is taken for gone.
                if self.first_scan {
                    tracing::warn!(dir = %self.config.dir.display(), error = %e, "file source: cannot list the directory; retried");
                }
                return;
            }
        };
        let mut found: Vec<(PathBuf, u64, u64)> = entries
            .filter_map(Result::ok)
            .filter(|e| {
                self.config
                    .pattern
                    .matches(&e.file_name().to_string_lossy())
            })
            .filter_map(|e| {
                let meta = std::fs::metadata(e.path()).ok()?;
                meta.is_file().then(|| (e.path(), meta.dev(), meta.ino()))
            })
            .collect();
        found.sort();
        self.mark_gone(&found);
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
                self.events.push("too_many_files");
                continue;
            }
            let Ok(mut file) = File::open(&path) else {
                continue;
            };
            let Ok(len) = file.metadata().map(|m| m.len()) else {
                continue;
            };
            let fp = fingerprint(&mut file).ok().flatten();
            let offset = match self.saved.remove(&(dev, inode)) {
                Some(p) if fp == Some(p.fingerprint) && p.offset <= len => p.offset,
                _ if self.first_scan && self.config.start_at_end => len,
                _ => 0,
            };
            self.tracked.push(Tracked {
                path,
                file,
                dev,
                inode,
                fingerprint: fp,
                offset,
                skipping: false,
                gone_since: None,
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

    /// Reads file `i` from its offset: its new lines and position, if anything moved, and
    /// whether the file is done with (gone, read to its end after [`ROTATE_WAIT`]).
    fn read(&mut self, i: usize) -> std::io::Result<Option<(FileLines, bool)>> {
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
        let Some(fingerprint) = t.fingerprint else {
            // No complete first line yet: nothing to send (unless it is gone for good).
            if done_waiting {
                let position = FilePosition {
                    source: self.key.clone(),
                    dev: t.dev,
                    inode: t.inode,
                    fingerprint: 0,
                    offset: t.offset,
                    path: t.path.display().to_string(),
                    forget: true,
                };
                let last = self.take_rest(i)?;
                return Ok(Some((self.batch(i, last, position), true)));
            }
            return Ok(None);
        };
        let mut buf = vec![0u8; CHUNK.min((len - t.offset) as usize)];
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
        let at_end = t.offset + n as u64 >= len;
        let forget = done_waiting && at_end;
        let mut skipping = t.skipping;
        let (lines, consumed) = split_lines(&buf, max, &mut skipping, forget);
        let cut = lines.iter().filter(|(_, cut)| *cut).count();
        let lines: Vec<Vec<u8>> = lines.into_iter().map(|(l, _)| l.to_vec()).collect();
        t.skipping = skipping;
        if consumed == 0 && !forget {
            return Ok(None);
        }
        t.offset += consumed as u64;
        let position = FilePosition {
            source: self.key.clone(),
            dev: t.dev,
            inode: t.inode,
            fingerprint,
            offset: t.offset,
            path: t.path.display().to_string(),
            forget,
        };
        for _ in 0..cut {
            self.events.push("line_cut");
        }
        Ok(Some((self.batch(i, lines, position), forget)))
    }

    /// What is left of a file gone for good without a complete first line.
    fn take_rest(&mut self, i: usize) -> std::io::Result<Vec<Vec<u8>>> {
        let max = self.config.max_line_bytes;
        let t = &mut self.tracked[i];
        let mut rest = Vec::new();
        t.file.seek(SeekFrom::Start(t.offset))?;
        (&mut t.file).take(max as u64 + 1).read_to_end(&mut rest)?;
        let mut skipping = t.skipping;
        let (lines, _) = split_lines(&rest, max, &mut skipping, true);
        Ok(lines.into_iter().map(|(l, _)| l.to_vec()).collect())
    }

    /// The command for `lines` of file `i` and its position after them.
    fn batch(&self, i: usize, lines: Vec<Vec<u8>>, position: FilePosition) -> FileLines {
        let name = self.tracked[i]
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
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
            position,
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
                .map(|(l, cut)| {
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
            let whole: Vec<Vec<u8>> = whole.into_iter().map(|(l, _)| l.to_vec()).collect();
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
                got.extend(lines.into_iter().map(|(l, _)| l.to_vec()));
                at += used;
            }
            proptest::prop_assert_eq!(got, whole);
        }
    }
}
