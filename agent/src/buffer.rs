//! The durable buffer: one SQLite file (WAL, synchronous=FULL) between the broker and the uplink.
//!
//! Invariants:
//! - a record is deleted only once the ingest acknowledged it (2xx), moved to the dead-letter
//!   table when the ingest rejected it (400/413), or dropped by policy (quota, TTL, full disk)
//!   or for failing its checksum, and every drop writes a loss report in the same transaction;
//! - each stream's sequence numbers increase by one per record and survive restarts (the
//!   counter is committed in the same transaction as the records);
//! - every record carries a CRC-32 of its seq, topic, payload and receive time: a record whose
//!   bytes changed on disk is never delivered (it is reported lost as `corrupt_buffer`);
//! - one thread, [`BufferWriter`], owns every write (appends, acks, evictions): a second writer
//!   connection would fight for SQLite's write lock and starve the drain. Reads for batches go
//!   through a separate read-only connection ([`BufferReader`]), which WAL lets run alongside;
//! - a full disk never wedges the writer ([`space`] has the invariant and its arithmetic).
//!
//! Group commit: the writer gathers commands for at most `commit_window` after the first one,
//! then commits them in one transaction (one fsync), so flash sees few large writes.
//!
//! Parts: this file has the error, the stream types and [`Buffer`] (reconfigure, commit, make
//! room); `record` the record types and their checksum; `command` what the writer is asked;
//! `open` opening (checks, migration, reserve, checkpointer); `growth` the file against its
//! volume; `schema` the tables, migrations and what is read back at open; `commit` the steps
//! of one commit; `reader` the read side; `writer` the thread that owns the writes;
//! `protection` what may not be dropped; `space` the disk arithmetic; `recovery` a damaged
//! file's quarantine and salvage.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

mod command;
mod commit;
mod growth;
#[cfg(test)]
mod model;
mod open;
pub mod protection;
mod reader;
mod record;
pub mod recovery;
mod schema;
pub mod space;
mod writer;

pub use command::{FileLines, FilePosition, Line, Reconfigure, Reconfigured, WriterCommand};
use open::{BUSY_TIMEOUT, ensure_reserve};
pub use open::{Opened, OpenedStream, PAGE_SIZE, RESERVE_BYTES, spawn_checkpointer};
pub use protection::{DropGuard, Droppable, MAX_SEQ, Protected, Protection, SeqRanges};
use record::stored_attributes;
pub use record::{Attributes, NewRecord, Receipt, Receipts, StoredRecord, checksum, settle};
pub use schema::Layout;

use crate::routing::Priority;
use commit::{Limits, apply};
pub use commit::{eviction_victim, seq_runs};
use ingest_wire::{LOSS_STREAM, LossReason, LossReport};
pub use reader::{BufferReader, ReadBatch};
pub use recovery::Quarantine;
pub use schema::row_id;
use schema::{load_stream, resume_points};
pub use writer::{ACK_LINGER, BufferWriter, Queue, QueueBytes, STOP_BOUND};

/// Bytes a record costs against the quota beyond its topic and payload (row and index).
pub const RECORD_OVERHEAD_BYTES: u64 = 48;
/// Records evicted per delete statement while over quota.
const EVICT_CHUNK: u64 = 512;

/// A buffer operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    /// SQLite failed. At open the agent exits with this; in the writer the group is retried
    /// with backoff and nothing is dropped.
    #[error("buffer {path}: {source}")]
    Sqlite {
        /// The buffer file.
        path: PathBuf,
        /// The SQLite error.
        #[source]
        source: rusqlite::Error,
    },
}

impl BufferError {
    /// Whether SQLite found the file damaged (SQLITE_CORRUPT, SQLITE_NOTADB).
    pub fn is_corrupt(&self) -> bool {
        let BufferError::Sqlite { source, .. } = self;
        recovery::is_corruption(source)
    }

    /// For damage found while running: marks the file for salvage at the next start
    /// ([`recovery::mark_suspect`]) and says so. `false` for other errors.
    pub fn mark_if_corrupt(&self) -> bool {
        if !self.is_corrupt() {
            return false;
        }
        let BufferError::Sqlite { path, source } = self;
        recovery::mark_suspect(path, &source.to_string());
        tracing::error!(path = %path.display(), error = %source, "the buffer file is damaged: the agent stops; its next start quarantines it, salvages what is intact and reports the rest lost (corrupt_buffer)");
        true
    }

    /// Whether SQLite reported a full disk (SQLITE_FULL).
    pub fn is_disk_full(&self) -> bool {
        let BufferError::Sqlite { source, .. } = self;
        matches!(source, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DiskFull)
    }
}

/// What the writer has committed for one stream, published after every commit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamProgress {
    /// Highest sequence committed so far (0: none ever).
    pub committed_seq: u64,
    /// Bytes appended since the agent started (a running total, for batch triggers).
    pub appended_bytes: u64,
    /// Records in the buffer.
    pub backlog_records: u64,
    /// Their cost against the quota.
    pub backlog_bytes: u64,
}

#[derive(Debug, Clone)]
struct StreamState {
    id: i64,
    name: String,
    priority: Priority,
    ttl_ms: Option<i64>,
    next_seq: u64,
    progress: StreamProgress,
}

/// A stream as the buffer knows it.
#[derive(Debug, Clone)]
pub struct BufferStream {
    /// Name; [`LOSS_STREAM`] is the loss-report stream (never evicted).
    pub name: String,
    /// Priority class (eviction order).
    pub priority: Priority,
    /// Records older than this are dropped and reported.
    pub ttl: Option<Duration>,
}

/// Per-stream counts of one commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitSummary {
    /// Records appended, per stream index.
    pub appended: Vec<u64>,
    /// Their topic and payload bytes, over every stream.
    pub appended_bytes: u64,
    /// Records deleted after an ack, per stream index.
    pub acked: Vec<u64>,
    /// Records moved to dead letters, per stream index.
    pub dead_lettered: Vec<u64>,
    /// Records evicted by the quota (or the full disk), per stream index.
    pub evicted: Vec<u64>,
    /// Why they were evicted.
    pub evicted_reason: LossReason,
    /// Records dropped by their TTL, per stream index.
    pub expired: Vec<u64>,
    /// The loss reports written by this commit (drops of this commit and reported ones).
    pub losses: Vec<LossReport>,
    /// Records the transforms did not keep, by stream index and reason.
    pub filtered: BTreeMap<(usize, crate::transform::Reason), u64>,
}

impl CommitSummary {
    /// Adds the counts of an earlier commit (of the same group) to these.
    pub fn absorb(&mut self, earlier: CommitSummary) {
        let add = |a: &mut Vec<u64>, b: Vec<u64>| a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        add(&mut self.appended, earlier.appended);
        self.appended_bytes += earlier.appended_bytes;
        add(&mut self.acked, earlier.acked);
        add(&mut self.dead_lettered, earlier.dead_lettered);
        add(&mut self.expired, earlier.expired);
        if earlier.evicted.iter().any(|&n| n > 0) {
            self.evicted_reason = earlier.evicted_reason;
        }
        add(&mut self.evicted, earlier.evicted);
        let mut losses = earlier.losses;
        losses.append(&mut self.losses);
        self.losses = losses;
        for (k, n) in earlier.filtered {
            *self.filtered.entry(k).or_default() += n;
        }
    }
}

/// The buffer's write side (owned by [`BufferWriter`]; used directly in tests).
pub struct Buffer {
    conn: Connection,
    path: PathBuf,
    streams: Vec<StreamState>,
    quota_bytes: u64,
    /// Set while the disk is full: the bytes that fit, below the quota. Evictions down to it
    /// are reported as `disk_full`.
    disk_cap: Option<u64>,
    /// Bytes of the reserve file kept beside the buffer ([`space`]).
    reserve_bytes: u64,
    /// The reserve file.
    reserve: PathBuf,
    /// While the disk is full: the most pages the file may have (its size when the disk
    /// filled). It may shrink below (free pages given back) and grow back up to it ([`space`]).
    ceiling: Option<u64>,
    page_size: u64,
    /// When the WAL may next be made to start again ([`Buffer::restart_wal`]).
    wal_restart: growth::WalRestart,
    /// How statements find a stream's records.
    layout: schema::Layout,
}

impl Buffer {
    /// Puts a new stream list in force (a reload), keeping everything buffered, and returns
    /// every stream as [`Buffer::open`] does: a stream already known keeps its id, sequence
    /// and counts, and takes its new priority and TTL; a new one is created; one dropped from
    /// the config that still holds records stays, as a bulk orphan that drains, and an empty
    /// one is forgotten. Running totals (`appended_bytes`) start again from 0, as at a start.
    /// On an error nothing has changed.
    pub fn reconfigure(
        &mut self,
        streams: &[BufferStream],
        quota_bytes: u64,
    ) -> Result<Vec<OpenedStream>, BufferError> {
        let sqlite = |source| BufferError::Sqlite {
            path: self.path.clone(),
            source,
        };
        let mut state = Vec::new();
        for spec in streams {
            let mut s = match self.streams.iter().find(|s| s.name == spec.name) {
                Some(known) => known.clone(),
                None => load_stream(&self.conn, self.layout, &spec.name, spec.priority)
                    .map_err(sqlite)?,
            };
            s.priority = spec.priority;
            s.ttl_ms = spec.ttl.map(|t| t.as_millis() as i64);
            state.push(s);
        }
        for s in &self.streams {
            if s.progress.backlog_records > 0 && !streams.iter().any(|c| c.name == s.name) {
                state.push(StreamState {
                    priority: Priority::Bulk,
                    ttl_ms: None,
                    ..s.clone()
                });
            }
        }
        for s in &mut state {
            s.progress.appended_bytes = 0;
        }
        let opened =
            resume_points(&self.conn, self.layout, &state, streams.len()).map_err(sqlite)?;
        self.streams = state;
        self.quota_bytes = quota_bytes;
        Ok(opened)
    }

    /// The transforms' state saved for `stream` (at most
    /// [`crate::transform::MAX_RESTORED`] rows).
    pub fn transform_state(
        &self,
        stream: &str,
    ) -> Result<Vec<crate::transform::StateRow>, BufferError> {
        let sqlite = |source| BufferError::Sqlite {
            path: self.path.clone(),
            source,
        };
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT step, fingerprint, key, state FROM transform_state WHERE stream = ?1 LIMIT ?2",
            )
            .map_err(sqlite)?;
        stmt.query_map(
            params![stream, crate::transform::MAX_RESTORED as i64],
            |r| {
                Ok(crate::transform::StateRow {
                    stream: stream.to_owned(),
                    step: r.get::<_, i64>(0)?.max(0) as usize,
                    fingerprint: r.get(1)?,
                    key: r.get(2)?,
                    state: Some(r.get(3)?),
                })
            },
        )
        .map_err(sqlite)?
        .collect::<rusqlite::Result<_>>()
        .map_err(sqlite)
    }

    /// Deletes the transforms' state of every stream but `streams` (in one statement); how many
    /// rows went.
    pub fn forget_transform_state_except(&self, streams: &[String]) -> Result<usize, BufferError> {
        let names = serde_json::to_string(streams).expect("invariant: strings serialise");
        self.conn
            .execute(
                "DELETE FROM transform_state WHERE stream NOT IN (SELECT value FROM json_each(?1))",
                [names],
            )
            .map_err(|source| BufferError::Sqlite {
                path: self.path.clone(),
                source,
            })
    }

    /// Whether the stream at index `stream` is of the critical class.
    pub fn is_critical(&self, stream: usize) -> bool {
        self.streams
            .get(stream)
            .is_some_and(|s| s.priority == Priority::Critical)
    }

    /// Progress of every stream, by index.
    pub fn progress(&self) -> Vec<StreamProgress> {
        self.streams.iter().map(|s| s.progress).collect()
    }

    /// Per stream, when its oldest record still held was received (Unix ms), if it holds any.
    pub fn oldest_received_ms(&self) -> rusqlite::Result<Vec<Option<i64>>> {
        let mut stmt = self
            .conn
            .prepare_cached(&self.layout.oldest("received_at_ms", "?1"))?;
        self.streams
            .iter()
            .map(|s| stmt.query_row([s.id], |r| r.get::<_, i64>(0)).optional())
            .collect()
    }

    /// Total cost of the records held, against the quota.
    pub fn backlog_bytes(&self) -> u64 {
        self.streams.iter().map(|s| s.progress.backlog_bytes).sum()
    }

    /// Whether the records held plus `incoming` bytes of new ones come within a tenth of what
    /// the buffer may hold (its quota, or less on a volume short of room): a commit may have to
    /// evict.
    pub fn near_cap(&self, incoming: u64) -> bool {
        let cap = self
            .disk_cap
            .unwrap_or(self.quota_bytes)
            .min(self.quota_bytes);
        self.backlog_bytes().saturating_add(incoming) >= cap - cap / 10
    }

    /// Applies `commands` in one transaction; with `expire`, also drops records past their
    /// stream's TTL (as of `now_ms`). Every drop writes its loss report in the same transaction.
    /// Records a stream's [`Protection`] covers are never dropped: they were sent and may be in
    /// the log. On error nothing of it is applied and the in-memory state is
    /// unchanged, so the same commands can be retried.
    pub fn commit(
        &mut self,
        commands: &[WriterCommand],
        protected: &[Protection],
        now_ms: i64,
        expire: bool,
    ) -> Result<CommitSummary, BufferError> {
        let streams = self.streams.len();
        self.commit_with(
            commands,
            Droppable::given(protected, streams),
            now_ms,
            expire,
        )
    }

    /// [`Buffer::commit`] with the shared protections, whose lock it takes only if the commit
    /// has something to drop, and then holds until the commit is over ([`Droppable`]).
    pub fn commit_shared(
        &mut self,
        commands: &[WriterCommand],
        protected: &Protected,
        now_ms: i64,
        expire: bool,
    ) -> Result<CommitSummary, BufferError> {
        let streams = self.streams.len();
        self.commit_with(
            commands,
            Droppable::shared(protected, streams),
            now_ms,
            expire,
        )
    }

    fn commit_with(
        &mut self,
        commands: &[WriterCommand],
        mut droppable: Droppable<'_>,
        now_ms: i64,
        expire: bool,
    ) -> Result<CommitSummary, BufferError> {
        let housekeeping = !commands
            .iter()
            .any(|c| matches!(c, WriterCommand::Append(_)));
        self.limit_growth(housekeeping)?;
        let mut streams = self.streams.clone();
        let cap = match self.disk_cap {
            Some(cap) if cap < self.quota_bytes => (cap, LossReason::DiskFull),
            _ => (self.quota_bytes, LossReason::Quota),
        };
        let summary = apply(
            &mut self.conn,
            self.layout,
            &mut streams,
            commands,
            Limits {
                cap: cap.0,
                reason: cap.1,
                highest: None,
            },
            &mut droppable,
            now_ms,
            expire,
        )
        .map_err(|source| self.error(source))?;
        self.streams = streams;
        if summary
            .evicted
            .iter()
            .chain(&summary.expired)
            .all(|&n| n == 0)
        {
            droppable.dropped_nothing();
        }
        // Only now may a read see what this commit dropped: the lock (if taken) goes.
        drop(droppable);
        Ok(summary)
    }

    /// On a frozen file (the disk filled), before new records are written: applies the group's
    /// other commands (acks first free what they may) and evicts by policy until `appends` fit
    /// under the disk cap, in transactions of their own (pages freed by one transaction are
    /// reused by the next). Only classes no higher than the highest incoming one give way.
    /// Each transaction evicts at most an eighth of the reserve, with a checkpoint between
    /// them: an eviction rewrites the pages it empties into the WAL, and one large eviction's
    /// WAL did not fit what a full volume had left (CI: every attempt refused, each lowering
    /// the cap and so evicting more, for minutes).
    pub fn make_room(
        &mut self,
        others: &[WriterCommand],
        appends: &[WriterCommand],
        protected: &[Protection],
        now_ms: i64,
    ) -> Result<CommitSummary, BufferError> {
        self.limit_growth(true)?;
        let mut streams = self.streams.clone();
        let (bytes, highest) = appends
            .iter()
            .filter_map(|c| match c {
                WriterCommand::Append(r) => Some((r.cost(), streams[r.stream].priority)),
                _ => None,
            })
            .fold((0u64, None), |(b, h), (c, p)| {
                (b + c, Some(h.map_or(p, |h: Priority| h.max(p))))
            });
        let cap = self
            .disk_cap
            .unwrap_or(self.quota_bytes)
            .min(self.quota_bytes);
        tracing::debug!(
            cap,
            bytes,
            held = self.backlog_bytes(),
            ?protected,
            "making room"
        );
        let target = cap.saturating_sub(bytes);
        let step = (self.reserve_bytes / 8).max(64 << 10);
        let mut droppable_now = Droppable::given(protected, streams.len());
        let mut total: Option<CommitSummary> = None;
        loop {
            let held = self.backlog_bytes();
            let commands = if total.is_none() { others } else { &[] };
            let applied = apply(
                &mut self.conn,
                self.layout,
                &mut streams,
                commands,
                Limits {
                    cap: target.max(held.saturating_sub(step)),
                    reason: LossReason::DiskFull,
                    highest,
                },
                &mut droppable_now,
                now_ms,
                false,
            );
            let summary = match applied {
                Ok(summary) => summary,
                // What earlier steps made is in: the caller tries its records with it.
                Err(_) if total.is_some() => break,
                Err(source) => return Err(self.error(source)),
            };
            self.streams = streams.clone();
            let evicted = summary.evicted.iter().any(|&n| n > 0);
            total = Some(match total {
                None => summary,
                Some(earlier) => {
                    let mut summary = summary;
                    summary.absorb(earlier);
                    summary
                }
            });
            if !evicted || self.backlog_bytes() <= target {
                break;
            }
            let _ = self.checkpoint();
        }
        Ok(total.expect("invariant: the first step either returned or set it"))
    }

    fn error(&self, source: rusqlite::Error) -> BufferError {
        BufferError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::schema::load_epoch;
    use super::*;
    use bytes::Bytes;

    fn streams() -> Vec<BufferStream> {
        [
            ("alarms", Priority::Critical),
            ("telemetry", Priority::Normal),
            ("logs", Priority::Bulk),
            (LOSS_STREAM, Priority::Critical),
        ]
        .into_iter()
        .map(|(name, priority)| BufferStream {
            name: name.into(),
            priority,
            ttl: None,
        })
        .collect()
    }

    /// A fresh buffer (with its directory, kept alive by the caller) holding the test streams.
    fn fresh(quota: u64) -> (tempfile::TempDir, PathBuf, Buffer) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.db");
        let buffer = Buffer::open(&path, &streams(), quota).expect("open").buffer;
        (dir, path, buffer)
    }

    /// The WAL file exists once a buffer is open, new or not, so the fsync of the directory
    /// that ends the open makes its entry durable (SQLite's own syncs are fdatasyncs).
    #[test]
    fn the_wal_exists_when_the_open_syncs_the_directory() {
        let (_dir, path, buffer) = fresh(1 << 30);
        assert!(space::side(&path, "-wal").exists(), "a new buffer's WAL");
        drop(buffer);
        let _buffer = Buffer::open(&path, &streams(), 1 << 30).expect("open");
        assert!(
            space::side(&path, "-wal").exists(),
            "a reopened buffer's WAL"
        );
    }

    fn rec(stream: usize, payload: &[u8]) -> WriterCommand {
        WriterCommand::Append(NewRecord {
            stream,
            topic: "t/1".into(),
            payload: Bytes::copy_from_slice(payload),
            received_at_ms: 7,
            monotonic_ms: 7,
            attributes: Default::default(),
            receipt: None,
        })
    }

    /// A full disk froze the file with no free page in it and nothing may be evicted: a commit
    /// that brings no new records (loss reports of refused publishes, acks of records already
    /// evicted) still goes in. CI once saw such a commit refused for minutes, in a loop.
    #[test]
    fn a_frozen_file_without_free_pages_still_takes_loss_reports() {
        let (_dir, _path, mut b) = fresh(6 << 20);
        let mut n = 0u64;
        while b.pragma("page_count").unwrap() * b.page_size < 3_000_000 {
            let group: Vec<_> = (0..100)
                .map(|_| {
                    n += 1;
                    rec((n % 3) as usize, &[(n % 251) as u8; 400])
                })
                .collect();
            b.commit(&group, &[], 7, false).expect("fill");
        }
        b.checkpoint().expect("checkpoint");
        assert_eq!(b.pragma("freelist_count").unwrap(), 0);
        let pages = b.pragma("page_count").unwrap();
        b.ceiling = Some(pages);
        b.pragma(&format!("max_page_count = {pages}")).unwrap();
        let report = |i: u64| LossReport {
            stream: Some("logs".into()),
            first_seq: None,
            last_seq: None,
            count: i,
            reason: LossReason::DiskFull,
            detected_at_ms: 8,
        };
        for i in 1..=200 {
            b.commit(&[WriterCommand::Loss(report(i))], &[], 8, false)
                .unwrap_or_else(|e| panic!("loss report {i} on a frozen file: {e}"));
        }
        assert!(
            b.pragma("page_count").unwrap() <= pages + b.headroom_pages(),
            "the file grew beyond its headroom"
        );
        // New records still may not grow the file.
        let big: Vec<_> = (0..50).map(|_| rec(2, &[9u8; 4000])).collect();
        assert!(
            b.commit(&big, &[], 9, false)
                .is_err_and(|e| e.is_disk_full())
        );
    }

    /// An acknowledged range wider than a removal's span (1,000 sequences), with a gap in it,
    /// is deleted whole and counted exactly: the commit's count, the backlog's records and bytes.
    #[test]
    fn a_wide_acknowledged_range_with_a_gap_is_deleted_and_counted_exactly() {
        let (_dir, _path, mut b) = fresh(1 << 30);
        let group: Vec<_> = (0..2_500)
            .map(|i| rec(2, &[(i % 251) as u8; 100]))
            .collect();
        b.commit(&group, &[], 7, false).expect("append");
        assert_eq!(b.progress()[2].backlog_records, 2_500);
        let ack = |first, last| WriterCommand::Ack {
            stream: 2,
            first,
            last,
        };
        let gap = b.commit(&[ack(995, 1_004)], &[], 7, false).expect("gap");
        assert_eq!(gap.acked[2], 10);
        let rest = b.commit(&[ack(1, 2_600)], &[], 7, false).expect("the rest");
        assert_eq!(rest.acked[2], 2_490);
        let left = b.progress()[2];
        assert_eq!((left.backlog_records, left.backlog_bytes), (0, 0));
        let stored: i64 = b
            .conn
            .query_row("SELECT count(*) FROM records", [], |r| r.get(0))
            .expect("count");
        assert_eq!(stored, 0);
    }

    /// Under steady load the background checkpointer never copies the whole WAL (a commit lands
    /// while it copies), so nothing made the WAL start again from its beginning and it grew
    /// without end (132 MB in 10 s at 10,000 records/s on the bench VM). Here a reader held
    /// inside the WAL keeps every checkpoint from completing while it grows past its cycle; once
    /// the reader leaves, the writer's own restart brings the file back to `journal_size_limit`
    /// (the reserve) at the commit after, with no other checkpoint running.
    #[test]
    fn the_wal_starts_again_after_its_cycle_without_a_completed_background_checkpoint() {
        let (_dir, path, mut b) = fresh(1 << 30);
        let wal = || std::fs::metadata(space::side(&path, "-wal")).map_or(0, |m| m.len());
        let (mut seq, round) = (0u64, |b: &mut Buffer, seq: &mut u64| {
            // Stored, then acknowledged: the file itself stays small, only the WAL grows.
            let group: Vec<_> = (0..50).map(|i| rec(2, &[(i % 251) as u8; 4000])).collect();
            b.commit(&group, &[], 7, false).expect("append");
            let ack = WriterCommand::Ack {
                stream: 2,
                first: *seq + 1,
                last: *seq + 50,
            };
            *seq += 50;
            b.commit(&[ack], &[], 7, false).expect("ack");
            b.bound_growth().expect("bound growth");
        });
        let reader = Connection::open(&path).expect("reader");
        reader
            .execute_batch("BEGIN; SELECT count(*) FROM records;")
            .expect("read transaction");
        while wal() <= space::WAL_CYCLE_BYTES + (2 << 20) {
            round(&mut b, &mut seq);
        }
        let grown = wal();
        reader.execute_batch("COMMIT").expect("reader leaves");
        std::thread::sleep(std::time::Duration::from_millis(150));
        for _ in 0..3 {
            round(&mut b, &mut seq);
        }
        assert!(
            wal() <= RESERVE_BYTES + (1 << 20),
            "the WAL grew to {grown} B and is still {} B",
            wal()
        );
    }

    /// A buffer that still holds records an older version stored under rowids SQLite chose
    /// (below 2^48, interleaved across streams, found through an index on stream and
    /// sequence) keeps that index and statements that use it: every record reads back, in
    /// order, and the stream goes on from where it was. The first open that finds none of
    /// those records left drops the index, which every commit had to write too.
    #[test]
    fn a_buffer_holding_an_older_versions_rowids_keeps_its_index_until_they_are_gone() {
        let (_dir, path, mut b) = fresh(1 << 30);
        let group: Vec<_> = (0..3000u64)
            .map(|n| rec((n % 3) as usize, format!("r{n}").as_bytes()))
            .collect();
        b.commit(&group, &[], 7, false).expect("append");
        drop(b);
        let old = Connection::open(&path).expect("old");
        old.execute_batch(
            "CREATE UNIQUE INDEX records_by_seq ON records (stream_id, seq);
             UPDATE records SET id = seq * 10 + stream_id WHERE seq <= 500;",
        )
        .expect("written as an older version did");
        drop(old);
        let read_all = |path: &Path| -> Vec<Vec<(u64, Vec<u8>)>> {
            let reader =
                BufferReader::open(path, &["alarms".into(), "telemetry".into(), "logs".into()])
                    .expect("reader");
            (0..3)
                .map(|stream| {
                    reader
                        .read_batch(stream, &[(1, MAX_SEQ)], false, 5000, 1 << 30)
                        .expect("read")
                        .records
                        .into_iter()
                        .map(|r| (r.seq, r.payload.to_vec()))
                        .collect()
                })
                .collect()
        };
        let want = |from: u64| -> Vec<Vec<(u64, Vec<u8>)>> {
            (0..3u64)
                .map(|stream| {
                    (0..3000u64)
                        .filter(|n| n % 3 == stream && n / 3 + 1 >= from)
                        .map(|n| (n / 3 + 1, format!("r{n}").into_bytes()))
                        .chain((stream == 1).then(|| (1001, b"after".to_vec())))
                        .collect()
                })
                .collect()
        };
        let mut b = Buffer::open(&path, &streams(), 1 << 30)
            .expect("reopen")
            .buffer;
        assert_eq!(b.layout, Layout::Indexed, "older rowids are still held");
        b.commit(&[rec(1, b"after")], &[], 8, false)
            .expect("append after");
        assert_eq!(read_all(&path), want(1));
        // The older records go (acknowledged); the next open drops the index.
        let acks: Vec<_> = (0..3)
            .map(|stream| WriterCommand::Ack {
                stream,
                first: 1,
                last: 500,
            })
            .collect();
        let summary = b.commit(&acks, &[], 9, false).expect("acks");
        assert_eq!(summary.acked[..3], [500, 500, 500]);
        drop(b);
        let b = Buffer::open(&path, &streams(), 1 << 30)
            .expect("reopen")
            .buffer;
        assert_eq!(b.layout, Layout::Rowid);
        let indexes: i64 = b
            .conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND tbl_name = 'records'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(indexes, 0, "the (stream, seq) index is dropped");
        assert_eq!(read_all(&path), want(501));
        assert_eq!(
            b.progress()[1].backlog_records,
            501,
            "counted at open by rowid range"
        );
    }

    /// A version older than the clustered rowids that ran on a newer one's file chose rowids
    /// past the last stream's range: such a record would be read as another stream's, so the
    /// index stays while one is held.
    #[test]
    fn a_record_whose_rowid_is_not_its_stream_and_sequence_keeps_the_index() {
        let (_dir, path, mut b) = fresh(1 << 30);
        b.commit(&[rec(1, b"one"), rec(2, b"two")], &[], 7, false)
            .expect("append");
        drop(b);
        let old = Connection::open(&path).expect("old");
        old.execute_batch(
            "CREATE UNIQUE INDEX records_by_seq ON records (stream_id, seq);
             INSERT INTO records (stream_id, seq, topic, received_at_ms, payload)
                 VALUES (1, 2, 't', 0, x'00');",
        )
        .expect("written as a version without clustered rowids did");
        let stray: i64 = old
            .query_row("SELECT max(id) FROM records", [], |r| r.get(0))
            .unwrap();
        assert!(stray > 3 << 48, "past the last stream's range: {stray}");
        drop(old);
        let b = Buffer::open(&path, &streams(), 1 << 30)
            .expect("reopen")
            .buffer;
        assert_eq!(b.layout, Layout::Indexed);
    }

    /// A commit that drops nothing never takes the protections' lock (it commits while a
    /// batch being read holds it); one that may drop takes it and is counted when it ends, so
    /// a read that overlapped it reads again under the lock (`protection`'s doc).
    #[test]
    fn only_a_commit_that_may_drop_takes_the_protections() {
        let (_dir, path, mut b) = fresh(200_000);
        let protected = Protected::new(vec![Protection::floor(0); 4]);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let held = protected.lock();
        std::thread::scope(|scope| {
            let (b, protected) = (&mut b, &protected);
            scope.spawn(move || {
                let appends: Vec<_> = (0..10).map(|_| rec(2, &[1; 100])).collect();
                let _ = done_tx.send(b.commit_shared(&appends, protected, 0, false).is_ok());
            });
            let committed = done_rx.recv_timeout(Duration::from_secs(20));
            drop(held);
            assert_eq!(
                committed,
                Ok(true),
                "appends under the quota waited for the lock"
            );
        });
        assert_eq!(
            protected.drops(),
            0,
            "nothing could be dropped: not counted"
        );
        // Over the quota: the commit evicts, under the lock, and is counted.
        let appends: Vec<_> = (0..1500).map(|_| rec(2, &[2; 100])).collect();
        let s = b
            .commit_shared(&appends, &protected, 0, false)
            .expect("commit");
        assert!(s.evicted[2] > 0, "the quota evicted: {s:?}");
        assert_eq!(protected.drops(), 1);
        // What the protections cover is not evicted, whatever the quota.
        let (floor, held) = (
            b.progress()[2].committed_seq,
            b.progress()[2].backlog_records,
        );
        assert!(held > 0);
        protected.lock()[2] = Protection::floor(floor);
        let appends: Vec<_> = (0..600).map(|_| rec(2, &[3; 100])).collect();
        let s = b
            .commit_shared(&appends, &protected, 0, false)
            .expect("commit");
        assert!(s.evicted[2] > 0, "the quota evicted: {s:?}");
        assert_eq!(protected.drops(), 2);
        let reader =
            BufferReader::open(&path, &["alarms".into(), "telemetry".into(), "logs".into()])
                .expect("reader");
        let kept = reader
            .read_batch(2, &[(1, floor)], false, 5000, 1 << 30)
            .expect("read")
            .records
            .len() as u64;
        assert_eq!(kept, held, "protected records were evicted");
        // Over the quota with everything protected: it looks, drops nothing, is not counted.
        protected.lock()[2] = Protection::floor(MAX_SEQ);
        let s = b
            .commit_shared(&[rec(2, &[4; 100])], &protected, 0, false)
            .expect("commit");
        assert_eq!(s.evicted[2], 0);
        assert_eq!(
            protected.drops(),
            2,
            "a commit that dropped nothing was counted"
        );
    }

    #[test]
    fn append_read_ack_and_resume_after_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.db");
        {
            let mut b = Buffer::open(&path, &streams(), 1 << 30)
                .expect("open")
                .buffer;
            b.commit(
                &[
                    rec(1, b"\x00a"),
                    rec(1, b"\xffb"),
                    rec(0, b"c"),
                    rec(1, b"d"),
                ],
                &[],
                0,
                false,
            )
            .expect("commit");
            let r =
                BufferReader::open(&path, &["alarms".into(), "telemetry".into(), "logs".into()])
                    .expect("reader");
            let batch = r
                .read_batch(1, &[(1, MAX_SEQ)], false, 10, 1 << 20)
                .expect("read")
                .records;
            assert_eq!(
                batch.iter().map(|r| r.seq).collect::<Vec<_>>(),
                vec![1, 2, 3]
            );
            assert_eq!(batch[0].payload, b"\x00a");
            assert_eq!(
                r.read_batch(1, &[(2, MAX_SEQ)], false, 1, 1 << 20)
                    .expect("read")
                    .records[0]
                    .seq,
                2
            );
            let s = b
                .commit(
                    &[WriterCommand::Ack {
                        stream: 1,
                        first: 1,
                        last: 2,
                    }],
                    &[],
                    0,
                    false,
                )
                .expect("ack");
            assert_eq!(s.acked[1], 2);
            assert_eq!(b.progress()[1].backlog_records, 1);
        }
        let o = Buffer::open(&path, &streams(), 1 << 30).expect("reopen");
        let (mut b, opened) = (o.buffer, o.streams);
        assert_eq!(
            opened[1].resume_after, 2,
            "telemetry resumes after the acked seqs"
        );
        assert_eq!(opened[0].resume_after, 0);
        assert_eq!(b.progress()[1].committed_seq, 3);
        b.commit(&[rec(1, b"e")], &[], 0, false).expect("commit");
        assert_eq!(
            b.progress()[1].committed_seq,
            4,
            "sequence survives the restart"
        );
    }

    #[test]
    fn attributes_are_stored_checked_read_back_and_counted() {
        let (_dir, path, mut b) = fresh(1 << 30);
        let attributes: Attributes = [("device_location", "floor 1"), ("site", "berlin")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let mut with = rec(1, b"21.5 C");
        if let WriterCommand::Append(r) = &mut with {
            r.attributes = attributes.clone();
        }
        let cost = match &with {
            WriterCommand::Append(r) => r.cost(),
            _ => unreachable!(),
        };
        b.commit(&[with, rec(1, b"22"), rec(1, b"23")], &[], 0, false)
            .expect("commit");
        assert_eq!(
            b.progress()[1].backlog_bytes,
            cost + 2 * (3 + 2 + RECORD_OVERHEAD_BYTES),
            "the attributes count against the quota"
        );
        let names = ["alarms".into(), "telemetry".into(), "logs".into()];
        let r = BufferReader::open(&path, &names).expect("reader");
        let read = r
            .read_batch(1, &[(1, MAX_SEQ)], false, 10, 1 << 20)
            .expect("read");
        assert_eq!(read.records[0].attributes, attributes);
        assert!(read.records[1].attributes.is_empty());
        // A changed attribute is damage, as a changed payload is.
        b.conn
            .execute(
                "UPDATE records SET attributes = CAST(replace(CAST(attributes AS TEXT), 'floor 1', 'floor 2') AS BLOB) WHERE seq = 1",
                [],
            )
            .expect("tamper");
        let read = r
            .read_batch(1, &[(1, MAX_SEQ)], false, 10, 1 << 20)
            .expect("read");
        assert_eq!(read.corrupt, vec![1]);
        assert_eq!(read.records.len(), 2);
        // Acknowledged, the three give back exactly what they cost.
        b.commit(
            &[WriterCommand::Ack {
                stream: 1,
                first: 1,
                last: 3,
            }],
            &[],
            0,
            false,
        )
        .expect("ack");
        assert_eq!(b.progress()[1].backlog_bytes, 0);
    }

    #[test]
    fn byte_limit_keeps_at_least_one_record() {
        let (_dir, path, mut b) = fresh(1 << 30);
        b.commit(&[rec(2, &[1; 100]), rec(2, &[2; 100])], &[], 0, false)
            .expect("commit");
        let r = BufferReader::open(&path, &["alarms".into(), "telemetry".into(), "logs".into()])
            .expect("reader");
        assert_eq!(
            r.read_batch(2, &[(1, MAX_SEQ)], false, 10, 10)
                .expect("read")
                .records
                .len(),
            1
        );
        assert_eq!(
            r.read_batch(2, &[(1, MAX_SEQ)], false, 10, 300)
                .expect("read")
                .records
                .len(),
            2
        );
    }

    /// A reload's streams: a known one keeps what it holds and takes its new priority (which
    /// the quota then follows), a new one starts empty, a dropped one still holding records
    /// stays as a bulk orphan after the configured ones, a dropped empty one is forgotten.
    #[test]
    fn reconfigure_keeps_what_is_held_and_takes_new_priorities() {
        let cost = 3 + 100 + RECORD_OVERHEAD_BYTES;
        let (_dir, _path, mut b) = fresh(cost * 100);
        // alarms (critical), telemetry (normal), logs (bulk), losses.
        b.commit(
            &[
                rec(0, &[0; 100]),
                rec(1, &[1; 100]),
                rec(1, &[1; 100]),
                rec(2, &[2; 100]),
            ],
            &[],
            5,
            false,
        )
        .expect("commit");
        let spec = |list: &[(&str, Priority)]| -> Vec<BufferStream> {
            list.iter()
                .map(|&(name, priority)| BufferStream {
                    name: name.into(),
                    priority,
                    ttl: None,
                })
                .collect()
        };
        let opened = b
            .reconfigure(
                &spec(&[
                    ("vibration", Priority::High),
                    ("telemetry", Priority::Bulk),
                    ("logs", Priority::Critical),
                    (LOSS_STREAM, Priority::Critical),
                ]),
                cost * 4,
            )
            .expect("reconfigure");
        let summary = |o: &[OpenedStream]| -> Vec<(String, u64, bool)> {
            o.iter()
                .map(|o| (o.name.clone(), o.resume_after, o.orphan))
                .collect()
        };
        assert_eq!(
            summary(&opened),
            vec![
                ("vibration".into(), 0, false),
                ("telemetry".into(), 0, false),
                ("logs".into(), 0, false),
                (LOSS_STREAM.into(), 0, false),
                ("alarms".into(), 0, true),
            ]
        );
        let held: Vec<u64> = b.progress().iter().map(|p| p.backlog_records).collect();
        assert_eq!(held, vec![0, 2, 1, 0, 1], "nothing buffered is lost");
        // Over the new quota (4 records): the bulk ones go (telemetry, the orphan), not logs,
        // which was bulk before the reload.
        let s = b
            .commit(&[rec(2, &[2; 100]), rec(2, &[3; 100])], &[], 6, false)
            .expect("commit");
        assert_eq!(s.evicted[2], 0, "logs is critical now: {:?}", s.evicted);
        assert_eq!(s.evicted.iter().sum::<u64>(), 2, "{:?}", s.evicted);
        assert_eq!(
            s.appended,
            vec![0, 0, 2, 1, 0],
            "by the new indices, with the eviction's loss report"
        );
        let again = b
            .reconfigure(&streams(), cost * 100)
            .expect("reconfigure back");
        assert!(
            !again.iter().any(|o| o.name == "vibration"),
            "an empty stream dropped from the config is forgotten: {again:?}"
        );
        let back = b.progress();
        assert_eq!(back[2].backlog_records, 3, "logs kept its records");
        assert_eq!(back[2].committed_seq, 3);
    }

    #[test]
    fn quota_evicts_lowest_priority_oldest_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.db");
        let cost = 3 + 100 + RECORD_OVERHEAD_BYTES;
        let mut b = Buffer::open(&path, &streams(), cost * 5)
            .expect("open")
            .buffer;
        let mut cmds = vec![rec(0, &[0; 100]), rec(1, &[1; 100])];
        cmds.extend((0..4).map(|_| rec(2, &[2; 100])));
        let s = b.commit(&cmds, &[], 5, false).expect("commit");
        assert_eq!(
            s.evicted,
            vec![0, 0, 4, 0],
            "bulk goes first, whole chunk of its oldest"
        );
        assert!(b.backlog_bytes() <= cost * 5);
        let report = LossReport {
            stream: Some("logs".into()),
            first_seq: Some(1),
            last_seq: Some(4),
            count: 4,
            reason: LossReason::Quota,
            detected_at_ms: 5,
        };
        assert_eq!(s.losses, vec![report.clone()]);
        let r = BufferReader::open(
            &path,
            &[
                "alarms".into(),
                "telemetry".into(),
                "logs".into(),
                LOSS_STREAM.into(),
            ],
        )
        .expect("reader");
        let sent = r
            .read_batch(3, &[(1, MAX_SEQ)], false, 10, 1 << 20)
            .expect("read")
            .records;
        assert_eq!(
            sent.len(),
            1,
            "the loss report is a record of the loss stream, same commit"
        );
        assert_eq!(sent[0].topic, "_losses/quota");
        assert_eq!(
            serde_json::from_slice::<LossReport>(&sent[0].payload).expect("json"),
            report
        );
        let r = BufferReader::open(&path, &["alarms".into(), "telemetry".into(), "logs".into()])
            .expect("reader");
        assert_eq!(
            r.read_batch(0, &[(1, MAX_SEQ)], false, 10, 1 << 20)
                .expect("read")
                .records
                .len(),
            1,
            "critical untouched"
        );
    }

    #[test]
    fn dead_letters_are_kept() {
        let (_dir, _, mut b) = fresh(1 << 30);
        b.commit(&[rec(1, b"x"), rec(1, b"y")], &[], 0, false)
            .expect("commit");
        let s = b
            .commit(
                &[WriterCommand::DeadLetter {
                    stream: 1,
                    first: 1,
                    last: 1,
                    status: 400,
                    reason: "bad".into(),
                }],
                &[],
                0,
                false,
            )
            .expect("dead letter");
        assert_eq!(s.dead_lettered[1], 1);
        let n: i64 = b
            .conn
            .query_row("SELECT COUNT(*) FROM dead_letters", [], |r| r.get(0))
            .expect("count");
        assert_eq!(n, 1);
    }

    #[test]
    fn removed_stream_becomes_an_orphan_that_drains() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.db");
        {
            let mut b = Buffer::open(&path, &streams(), 1 << 30)
                .expect("open")
                .buffer;
            b.commit(&[rec(2, b"keep me")], &[], 0, false)
                .expect("commit");
        }
        let o = Buffer::open(&path, &streams()[..2], 1 << 30).expect("reopen");
        let (_b, opened) = (o.buffer, o.streams);
        assert_eq!(opened.len(), 3);
        assert!(opened[2].orphan && opened[2].name == "logs");
    }

    #[test]
    fn ttl_drops_old_records_and_reports_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.db");
        let mut specs = streams();
        specs[1].ttl = Some(Duration::from_secs(60));
        let mut b = Buffer::open(&path, &specs, 1 << 30).expect("open").buffer;
        let at = |t: i64| {
            WriterCommand::Append(NewRecord {
                stream: 1,
                topic: "t".into(),
                payload: Bytes::from_static(b"x"),
                received_at_ms: t,
                monotonic_ms: 1,
                attributes: Default::default(),
                receipt: None,
            })
        };
        b.commit(&[at(1_000), at(2_000), at(70_000)], &[], 0, false)
            .expect("commit");
        let s = b.commit(&[], &[], 61_500, true).expect("expire");
        assert_eq!(
            s.expired[1], 1,
            "only the record older than 60 s at t=61.5 s"
        );
        assert_eq!(
            (
                s.losses[0].first_seq,
                s.losses[0].last_seq,
                s.losses[0].count
            ),
            (Some(1), Some(1), 1)
        );
        assert_eq!(s.losses[0].reason, LossReason::Ttl);
        assert_eq!(b.progress()[1].backlog_records, 2);
        assert_eq!(
            b.progress()[3].backlog_records,
            1,
            "one loss report waits to be sent"
        );
    }

    #[test]
    fn handed_in_losses_are_stored() {
        let (_dir, _, mut b) = fresh(1 << 30);
        let overflow = LossReport {
            stream: None,
            first_seq: None,
            last_seq: None,
            count: 42,
            reason: LossReason::BrokerOverflow,
            detected_at_ms: 1,
        };
        let s = b
            .commit(&[WriterCommand::Loss(overflow)], &[], 1, false)
            .expect("commit");
        assert_eq!(s.appended[3], 1);
    }

    #[test]
    fn epoch_is_kept_with_the_file_and_new_with_a_new_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.db");
        let first = Buffer::open(&path, &streams(), 1 << 30)
            .expect("open")
            .epoch;
        assert_eq!(
            Buffer::open(&path, &streams(), 1 << 30)
                .expect("reopen")
                .epoch,
            first
        );
        std::fs::remove_file(&path).expect("remove");
        let _ = std::fs::remove_file(dir.path().join("b.db-wal"));
        assert_ne!(
            Buffer::open(&path, &streams(), 1 << 30).expect("new").epoch,
            first
        );
    }

    #[test]
    fn a_garbage_file_is_quarantined_and_the_buffer_starts_fresh() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.db");
        std::fs::write(
            &path,
            b"this is not a database, just garbage bytes \x00\xff".repeat(100),
        )
        .expect("write");
        let o = Buffer::open(&path, &streams(), 1 << 30).expect("starts anyway");
        let q = o.quarantine.expect("quarantined");
        assert!(q.moved_to.exists() && q.moved_to.to_string_lossy().contains(".corrupt-"));
        assert_eq!(q.salvaged, 0);
        let mut b = o.buffer;
        b.commit(&[rec(1, b"fresh")], &[], 0, false)
            .expect("usable");
    }

    #[test]
    fn a_damaged_file_is_quarantined_and_readable_records_are_salvaged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.db");
        let epoch;
        {
            let mut b = Buffer::open(&path, &streams(), 1 << 30)
                .expect("open")
                .buffer;
            let cmds: Vec<_> = (0..2000).map(|i| rec(1 + i % 2, &[i as u8; 300])).collect();
            epoch = load_epoch(&b.conn).expect("epoch");
            b.commit(&cmds, &[], 0, false).expect("commit");
            b.conn
                .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
                .expect("checkpoint");
        }
        // Overwrite a stretch in the middle of the file: some pages become garbage.
        let mut bytes = std::fs::read(&path).expect("read");
        let len = bytes.len();
        for b in &mut bytes[len / 2..len / 2 + 16384] {
            *b = 0xA5;
        }
        std::fs::write(&path, &bytes).expect("write");
        let o = Buffer::open(&path, &streams(), 1 << 30).expect("starts anyway");
        let q = o.quarantine.expect("quarantined");
        assert!(
            q.salvaged > 0 && q.salvaged < 2000,
            "salvaged {} of 2000",
            q.salvaged
        );
        let progress = o.buffer.progress();
        let held: u64 = progress[..3].iter().map(|p| p.backlog_records).sum();
        assert_eq!(held, q.salvaged, "salvaged records are in the new buffer");
        let reported: u64 = q.losses.iter().map(|l| l.count).sum();
        assert_eq!(
            q.salvaged + reported,
            2000,
            "what did not come back is reported: {:?}",
            q.losses
        );
        assert!(
            q.losses
                .iter()
                .all(|l| l.reason == LossReason::CorruptBuffer && l.first_seq.is_some())
        );
        assert_eq!(
            progress[3].backlog_records,
            q.losses.len() as u64,
            "the reports wait to be sent"
        );
        assert_eq!(o.epoch, epoch, "the records keep their identity");
        let stray: Vec<String> = std::fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("salvage") || (n.contains("corrupt") && n.ends_with("-shm")))
            .collect();
        assert!(stray.is_empty(), "stray files: {stray:?}");
        assert!(recovery::verify(&path).expect("verify").integrity == "ok");
    }

    #[test]
    fn records_sent_are_never_evicted_the_oldest_unsent_are() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.db");
        let cost = 3 + 100 + RECORD_OVERHEAD_BYTES;
        let mut b = Buffer::open(&path, &streams(), cost * 3)
            .expect("open")
            .buffer;
        let sent = |floor, ranges: &[(u64, u64)]| {
            let mut p = vec![Protection::default(); 4];
            p[2].floor = floor;
            for &(f, l) in ranges {
                p[2].ranges.insert_range(f, l);
            }
            p
        };
        let cmds: Vec<_> = (0..6).map(|_| rec(2, &[2; 100])).collect();
        let s = b.commit(&cmds, &sent(2, &[]), 5, false).expect("commit");
        assert_eq!(
            s.losses[0].first_seq,
            Some(3),
            "seqs 1 and 2 were sent: kept"
        );
        assert_eq!(s.evicted[2], 4);
        assert_eq!(b.progress()[2].backlog_records, 2);

        // A newest-first stream has its newest batch in flight: the oldest unsent ones go.
        let cmds: Vec<_> = (0..6).map(|_| rec(2, &[2; 100])).collect();
        let s = b
            .commit(&cmds, &sent(2, &[(8, 9), (12, 12)]), 5, false)
            .expect("commit");
        let lost = &s.losses[0];
        assert_eq!(
            (lost.first_seq, lost.last_seq, lost.count),
            (Some(7), Some(11), 3),
            "7, 10 and 11 go; 8, 9 and 12 are in flight"
        );
    }

    #[test]
    fn reads_newest_first_across_spans_and_says_what_it_covered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.db");
        let mut b = Buffer::open(&path, &streams(), 1 << 30)
            .expect("open")
            .buffer;
        let cmds: Vec<_> = (0..10).map(|_| rec(2, b"v")).collect();
        b.commit(&cmds, &[], 0, false).expect("commit");
        let r = BufferReader::open(&path, &["alarms".into(), "telemetry".into(), "logs".into()])
            .expect("reader");
        let read = |spans: &[(u64, u64)], newest, n| {
            let got = r.read_batch(2, spans, newest, n, 1 << 20).expect("read");
            (
                got.records.iter().map(|r| r.seq).collect::<Vec<_>>(),
                got.covered,
            )
        };
        // 6 and 7 were delivered: the spans skip them.
        let spans = [(8, MAX_SEQ), (1, 5)];
        assert_eq!(read(&spans, true, 4), (vec![5, 8, 9, 10], Some((5, 10))));
        assert_eq!(
            read(&spans, true, 20),
            (vec![1, 2, 3, 4, 5, 8, 9, 10], Some((1, 10)))
        );
        assert_eq!(
            read(&[(4, MAX_SEQ)], false, 3),
            (vec![4, 5, 6], Some((4, 6)))
        );
        assert_eq!(read(&[(11, MAX_SEQ)], false, 3), (vec![], None));
        // The top span is empty (evicted), the next one is read down to its start.
        assert_eq!(
            read(&[(11, MAX_SEQ), (1, 3)], true, 5),
            (vec![1, 2, 3], Some((1, 3)))
        );
    }

    #[test]
    fn eviction_choice() {
        use Priority::*;
        for (streams, want) in [
            (vec![(Critical, 5), (Normal, 5), (Bulk, 5)], Some(2)),
            (vec![(Critical, 5), (Normal, 5), (Bulk, 0)], Some(1)),
            (vec![(Critical, 5), (Normal, 0)], Some(0)),
            (vec![(Bulk, 1), (Bulk, 9)], Some(1)),
            (vec![(Bulk, 0)], None),
        ] {
            assert_eq!(eviction_victim(&streams), want, "{streams:?}");
        }
    }
}
#[cfg(test)]
mod frozen_tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn a_frozen_file_makes_room_for_new_records_by_policy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.db");
        let streams: Vec<BufferStream> = [
            ("alarms", Priority::Critical),
            ("logs", Priority::Bulk),
            (LOSS_STREAM, Priority::Critical),
        ]
        .into_iter()
        .map(|(name, priority)| BufferStream {
            name: name.into(),
            priority,
            ttl: None,
        })
        .collect();
        let mut b = Buffer::open(&path, &streams, 1 << 30).expect("open").buffer;
        let rec = |stream| {
            WriterCommand::Append(NewRecord {
                stream,
                topic: "plant/1/x".into(),
                payload: Bytes::from(vec![7u8; 400]),
                received_at_ms: 1,
                monotonic_ms: 1,
                attributes: Default::default(),
                receipt: None,
            })
        };
        let fill: Vec<_> = (0..3000).map(|i| rec(i % 2)).collect();
        b.commit(&fill, &[], 1, false).expect("fill");
        b.disk_full();
        let more: Vec<_> = (0..300).map(|i| rec(i % 2)).collect();
        let mut tries = 0;
        let s = loop {
            let made = b.make_room(&[], &more, &[], 2).expect("make room");
            match b.commit(&more, &[], 2, false) {
                Ok(mut s) => {
                    s.absorb(made);
                    break s;
                }
                Err(e) if e.is_disk_full() && tries < 8 => {
                    tries += 1;
                    b.disk_full();
                }
                Err(e) => panic!("after {tries} tries: {e}"),
            }
        };
        assert_eq!(s.appended[0] + s.appended[1], 300);
        assert!(
            s.evicted[1] > 0 && s.evicted[0] == 0,
            "{:?} {:?} after {tries}",
            s.evicted,
            s.losses
        );
    }
}
