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
//! Parts: this file has the record and command types and [`Buffer`] (open, commit, make room,
//! checkpoints); `schema` the tables, migrations and what is read back at open; `commit` the
//! steps of one commit; `reader` the read side; `writer` the thread that owns the writes;
//! `protection` what may not be dropped; `space` the disk arithmetic; `recovery` a damaged
//! file's quarantine and salvage.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

mod commit;
#[cfg(test)]
mod model;
pub mod protection;
mod reader;
pub mod recovery;
mod schema;
pub mod space;
mod writer;

pub use protection::{MAX_SEQ, Protected, Protection, SeqRanges};

use crate::routing::Priority;
use commit::{Limits, apply};
pub use commit::{eviction_victim, seq_runs};
use ingest_wire::{LOSS_STREAM, LossReason, LossReport};
pub use reader::{BufferReader, ReadBatch};
pub use recovery::Quarantine;
pub use schema::row_id;
use schema::{SCHEMA, load_epoch, load_stream, migrate, resume_points};
pub use writer::{BufferWriter, Queue, QueueBytes, STOP_BOUND};

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

/// A record received from the broker, not yet in the buffer.
#[derive(Debug, Clone)]
pub struct NewRecord {
    /// Index of its stream.
    pub stream: usize,
    /// MQTT topic.
    pub topic: String,
    /// Exact payload.
    pub payload: Bytes,
    /// Receive time, Unix ms.
    pub received_at_ms: i64,
    /// Receive time, milliseconds since this host booted ([`crate::clock::monotonic_ms`]).
    pub monotonic_ms: u64,
    /// Attributes (`enrich` of a payload that is not a JSON object); usually none.
    pub attributes: Attributes,
    /// Who waits for its commit to acknowledge it (a QoS 1/2 publisher's connection).
    pub receipt: Option<Receipt>,
}

/// Where the writer tells a publisher's connection that its record is committed, or refused
/// (a full disk could not take it): the record's place in that connection's order.
#[derive(Clone)]
pub struct Receipt {
    /// The connection's receipts.
    pub to: Arc<Receipts>,
    /// Its number on that connection (increasing).
    pub ticket: u64,
}

impl std::fmt::Debug for Receipt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Receipt({})", self.ticket)
    }
}

/// One connection's receipts: every ticket up to `done` is committed or refused.
#[derive(Default)]
pub struct Receipts {
    /// (every ticket up to this one is settled, the refused ones not yet taken).
    state: std::sync::Mutex<(u64, Vec<u64>)>,
    notify: tokio::sync::Notify,
}

impl Receipts {
    /// (every ticket up to this one is settled, the refused ones among them since last time),
    /// read together.
    pub fn take(&self) -> (u64, Vec<u64>) {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (state.0, std::mem::take(&mut state.1))
    }

    /// Waits until something was settled since the last call.
    pub async fn changed(&self) {
        self.notify.notified().await;
    }

    fn settle(&self, ticket: u64, refused: bool) {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if refused {
            state.1.push(ticket);
        }
        state.0 = state.0.max(ticket);
    }

    fn wake(&self) {
        self.notify.notify_one();
    }
}

/// Tells the connections waiting on `commands`' records that they are settled.
pub fn settle(commands: &[WriterCommand], refused: bool) {
    let mut woken: Vec<&Arc<Receipts>> = Vec::new();
    for c in commands {
        if let WriterCommand::Append(NewRecord {
            receipt: Some(r), ..
        })
        | WriterCommand::Filtered {
            receipt: Some(r), ..
        } = c
        {
            r.to.settle(r.ticket, refused);
            if !woken.iter().any(|w| Arc::ptr_eq(w, &r.to)) {
                woken.push(&r.to);
            }
        }
    }
    for w in woken {
        w.wake();
    }
}

impl NewRecord {
    /// What it costs against the quota.
    pub fn cost(&self) -> u64 {
        let attributes = stored_attributes(&self.attributes).map_or(0, |a| a.len());
        (self.topic.len() + self.payload.len() + attributes) as u64 + RECORD_OVERHEAD_BYTES
    }
}

/// A record's attributes, by name: what `enrich` adds to a payload that is not a JSON object.
/// They travel to the ingest beside the payload and become Kafka and NATS headers.
pub type Attributes = BTreeMap<String, String>;

/// Attributes as the `attributes` column holds them: a JSON object, or NULL when there are
/// none (most records).
fn stored_attributes(attributes: &Attributes) -> Option<Vec<u8>> {
    (!attributes.is_empty())
        .then(|| serde_json::to_vec(attributes).expect("invariant: a map of strings serialises"))
}

/// The checksum stored with a record: CRC-32 of its seq, receive time, topic, payload and
/// stored attributes (when it has any), so a record that changed on disk (a torn page, a
/// flipped bit) is told from a good one.
pub fn checksum(
    seq: u64,
    received_at_ms: i64,
    topic: &str,
    payload: &[u8],
    attributes: Option<&[u8]>,
) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(&received_at_ms.to_le_bytes());
    h.update(&(topic.len() as u64).to_le_bytes());
    h.update(topic.as_bytes());
    h.update(payload);
    if let Some(a) = attributes {
        h.update(b"\0attributes");
        h.update(&(a.len() as u64).to_le_bytes());
        h.update(a);
    }
    h.finalize()
}

/// A record read back for a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// Sequence number within its stream.
    pub seq: u64,
    /// MQTT topic.
    pub topic: String,
    /// Exact payload.
    pub payload: Vec<u8>,
    /// Receive time, Unix ms.
    pub received_at_ms: i64,
    /// Boot id of the host when it was received; empty if unknown (older buffer, salvage).
    pub boot_id: String,
    /// Milliseconds since that boot when it was received; 0 if unknown.
    pub monotonic_ms: u64,
    /// Its attributes.
    pub attributes: Attributes,
}

/// A command for the writer thread.
#[derive(Debug)]
pub enum WriterCommand {
    /// Store a received record.
    Append(NewRecord),
    /// The ingest acknowledged seqs `first..=last` of `stream`: delete them.
    Ack {
        /// Stream index.
        stream: usize,
        /// First seq of the batch.
        first: u64,
        /// Last seq of the batch.
        last: u64,
    },
    /// Records were lost before reaching the buffer: store this report (to be sent upstream).
    Loss(LossReport),
    /// The ingest rejected seqs `first..=last` of `stream`: move them to the dead-letter table.
    DeadLetter {
        /// Stream index.
        stream: usize,
        /// First seq of the batch.
        first: u64,
        /// Last seq of the batch.
        last: u64,
        /// HTTP status of the rejection.
        status: u16,
        /// The ingest's reason.
        reason: String,
    },
    /// These records of `stream` failed their checksum when read: drop them and report them
    /// lost (`corrupt_buffer`).
    Corrupt {
        /// Stream name (not its index: a reload may renumber the streams while the read that
        /// found them is under way).
        stream: String,
        /// Their sequence numbers.
        seqs: Vec<u64>,
    },
    /// Transforms did not keep this record ([`crate::transform`]): counted, never stored; its
    /// publisher is acknowledged once the commit (with the transforms' state) is in.
    Filtered {
        /// Stream index.
        stream: usize,
        /// Why.
        reason: crate::transform::Reason,
        /// Who waits for it, if anyone.
        receipt: Option<Receipt>,
    },
    /// The transforms' state changed by the records of this commit: saved with them.
    TransformState(Vec<crate::transform::StateRow>),
    /// Lines a file source read, with the file's position after them: the writer makes them
    /// records and a [`WriterCommand::FilePosition`], committed together.
    FileLines(Box<FileLines>),
    /// A file's position after its lines (saved in the commit that stores them).
    FilePosition(Box<FilePosition>),
    /// A reload: once everything queued before it is committed, put these streams in force
    /// ([`Buffer::reconfigure`]); stream indices in the commands after it are the new ones.
    /// Never part of a commit.
    Reconfigure(Reconfigure),
}

/// Lines read from a file ([`crate::source::file`]).
#[derive(Debug)]
pub struct FileLines {
    /// The stream they go to, by name (a reload may renumber the streams meanwhile).
    pub stream: String,
    /// The lines.
    pub lines: Vec<Line>,
    /// Where the file is read up to after them.
    pub position: FilePosition,
}

/// One line of a file, as a record.
#[derive(Debug, Clone)]
pub struct Line {
    /// Its topic.
    pub topic: String,
    /// The line, without its newline.
    pub payload: Bytes,
    /// When it was read, Unix ms.
    pub received_at_ms: i64,
}

/// Where a file source is in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilePosition {
    /// The source's key.
    pub source: String,
    /// The file's device.
    pub dev: u64,
    /// Its inode.
    pub inode: u64,
    /// The checksum of its first line.
    pub fingerprint: u32,
    /// Bytes read and stored.
    pub offset: u64,
    /// Its path when last seen (for people).
    pub path: String,
    /// The file is done with: the position is deleted.
    pub forget: bool,
}

/// New streams for the writer ([`WriterCommand::Reconfigure`]).
#[derive(Debug)]
pub struct Reconfigure {
    /// The configured streams, in config order.
    pub streams: Vec<BufferStream>,
    /// The new quota.
    pub quota_bytes: u64,
    /// The configured streams' transforms, by index (their state comes from the buffer).
    pub chains: Vec<crate::transform::Chain>,
    /// Told the streams in force once they are (dropped if the buffer cannot take them: the
    /// writer then stops, and with it the agent).
    pub done: tokio::sync::oneshot::Sender<Reconfigured>,
}

/// The streams a [`Reconfigure`] put in force.
#[derive(Debug)]
pub struct Reconfigured {
    /// Every stream, configured ones first, then orphans.
    pub streams: Vec<OpenedStream>,
    /// Each one's protection, carried over by name from before: a batch the stopped forwarder
    /// had in flight, or sent without an answer, may be in the log and stays protected.
    pub protections: Vec<Protection>,
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
}

/// The reserve when none is given (tests, tools); the agent sizes it from the config and the
/// volume ([`space::auto_reserve`]).
pub const RESERVE_BYTES: u64 = 4 << 20;

/// How often the checkpointer moves the WAL into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// Checkpoints the buffer's WAL from a thread of its own, so the writer rarely stalls on a
/// checkpoint inside a commit (the writer checkpoints itself only to keep the WAL's growth of
/// the file bounded, [`space`]). Runs until `stop` is set.
pub fn spawn_checkpointer(
    path: &Path,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let path = path.to_owned();
    std::thread::Builder::new().name("buffer-checkpoint".into()).spawn(move || {
        let conn = match Connection::open(&path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot open the buffer for checkpoints; the WAL will grow");
                return;
            }
        };
        let mut failing = false;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(CHECKPOINT_EVERY);
            // PASSIVE never blocks the writer; what it cannot copy now is copied next time.
            // On a full disk it fails until the writer has made room: said once per episode.
            match conn.execute_batch("PRAGMA wal_checkpoint(PASSIVE);") {
                Ok(()) => failing = false,
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "buffer checkpoint failed; retried every 500 ms");
                }
                Err(_) => {}
            }
        }
    })
}

/// A stream known to the buffer at open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenedStream {
    /// Name.
    pub name: String,
    /// First sequence not yet acknowledged: sending resumes here.
    pub resume_after: u64,
    /// Whether it is in the buffer but no longer in the config (it still drains).
    pub orphan: bool,
}

/// A buffer just opened.
pub struct Opened {
    /// The write side.
    pub buffer: Buffer,
    /// Every stream, configured ones first, then orphans.
    pub streams: Vec<OpenedStream>,
    /// The buffer's sequence epoch (random, chosen when the file was created).
    pub epoch: u64,
    /// Set when the file was corrupt and has been moved aside.
    pub quarantine: Option<Quarantine>,
}

impl Buffer {
    /// Opens or creates the buffer at `path` for `streams` in config order, with the default
    /// reserve ([`RESERVE_BYTES`]); see [`Buffer::open_with`].
    pub fn open(
        path: &Path,
        streams: &[BufferStream],
        quota_bytes: u64,
    ) -> Result<Opened, BufferError> {
        Buffer::open_with(path, streams, quota_bytes, RESERVE_BYTES)
    }

    /// Opens or creates the buffer at `path` for `streams` in config order, holding a reserve
    /// file of `reserve_bytes` beside it. A corrupt file is quarantined and what it still holds
    /// is salvaged into a fresh one, and what it held but could not give back is reported lost
    /// (see `Buffer::recover`). Streams with records in the file but not in `streams` are
    /// appended as bulk orphans.
    pub fn open_with(
        path: &Path,
        streams: &[BufferStream],
        quota_bytes: u64,
        reserve_bytes: u64,
    ) -> Result<Opened, BufferError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // A missing directory surfaces below as SQLite's "unable to open", with the path.
            let _ = std::fs::create_dir_all(dir);
        }
        let quarantine = Buffer::recover(path, streams, quota_bytes, reserve_bytes)?;
        let mut opened = Buffer::open_file(path, streams, quota_bytes, reserve_bytes)?;
        ensure_reserve(&opened.buffer.reserve, reserve_bytes);
        opened.quarantine = quarantine;
        Ok(opened)
    }

    /// A corrupt buffer at `path` is replaced by what can be salvaged from it, crash-safely:
    /// the salvage is built beside it (`<path>.salvage`), with the loss reports for what could
    /// not be given back in it, and only once that is complete and on disk is the corrupt file
    /// moved aside (`<path>.corrupt-<ms>`) and the salvaged one moved in. A stop at any point
    /// before the moves starts the salvage over from the corrupt file; a stop between the two
    /// moves leaves only the complete salvage, which the next start moves in.
    fn recover(
        path: &Path,
        streams: &[BufferStream],
        quota_bytes: u64,
        reserve_bytes: u64,
    ) -> Result<Option<Quarantine>, BufferError> {
        let io = |e: std::io::Error| BufferError::Sqlite {
            path: path.to_owned(),
            source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
        };
        let salvage = space::side(path, ".salvage");
        let leftovers = ["", "-wal", "-shm", "-journal"].map(|s| space::side(&salvage, s));
        if !path.exists() && salvage.exists() {
            tracing::warn!(salvaged = %salvage.display(), "a salvage of a corrupt buffer was complete but not yet in place; moving it in");
            // Side files left under the old name belong to the corrupt file (a stop between
            // its moves): everything in them was salvaged or reported; never replay them here.
            for side in ["-wal", "-shm"] {
                let _ = std::fs::remove_file(space::side(path, side));
            }
            std::fs::rename(&salvage, path).map_err(io)?;
            sync_dir(path);
        }
        for p in &leftovers {
            let _ = std::fs::remove_file(p);
        }
        let Some(reason) = recovery::check(path).map_err(|source| BufferError::Sqlite {
            path: path.to_owned(),
            source,
        })?
        else {
            return Ok(None);
        };
        let salvaged = {
            let mut conn = Buffer::connect(&salvage, reserve_bytes)?;
            recovery::salvage(path, &mut conn).map_err(|source| BufferError::Sqlite {
                path: salvage.clone(),
                source,
            })?
        };
        {
            let mut fresh = Buffer::open_file(&salvage, streams, quota_bytes, reserve_bytes)?;
            // What the salvage could not give back is reported before anything else happens.
            if !salvaged.losses.is_empty() {
                let reports: Vec<WriterCommand> = salvaged
                    .losses
                    .iter()
                    .cloned()
                    .map(WriterCommand::Loss)
                    .collect();
                fresh
                    .buffer
                    .commit(&reports, &[], crate::clock::now_ms(), false)?;
            }
            fresh.buffer.checkpoint()?;
        }
        let moved_to = recovery::quarantine(path).map_err(io)?;
        std::fs::rename(&salvage, path).map_err(io)?;
        sync_dir(path);
        recovery::clear_suspect(path);
        for p in &leftovers {
            let _ = std::fs::remove_file(p);
        }
        Ok(Some(Quarantine {
            moved_to,
            reason,
            salvaged: salvaged.copied,
            losses: salvaged.losses,
        }))
    }

    /// A connection to the buffer file at `path` (created if missing), set up and migrated.
    fn connect(path: &Path, reserve_bytes: u64) -> Result<Connection, BufferError> {
        let sqlite = |source| BufferError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open(path).map_err(sqlite)?;
        // auto_vacuum takes effect only on a new file: free pages can then be given back to a
        // full volume ([`space`]). Older buffers keep theirs.
        conn.execute_batch(&format!(
            "PRAGMA auto_vacuum=INCREMENTAL; PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA wal_autocheckpoint=0; PRAGMA journal_size_limit={reserve_bytes}; PRAGMA busy_timeout=5000;"
        ))
        .and_then(|()| conn.execute_batch(SCHEMA))
        .and_then(|()| migrate(&conn))
        .map_err(sqlite)?;
        Ok(conn)
    }

    /// Opens the (sound) buffer file at `path` and loads its streams.
    fn open_file(
        path: &Path,
        streams: &[BufferStream],
        quota_bytes: u64,
        reserve_bytes: u64,
    ) -> Result<Opened, BufferError> {
        let sqlite = |source| BufferError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let conn = Buffer::connect(path, reserve_bytes)?;
        let epoch = load_epoch(&conn).map_err(sqlite)?;
        let page_size: i64 = conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .map_err(sqlite)?;
        let reserve = space::side(path, ".reserve");
        let mut state = Vec::new();
        for spec in streams {
            let mut loaded = load_stream(&conn, &spec.name, spec.priority).map_err(sqlite)?;
            loaded.ttl_ms = spec.ttl.map(|t| t.as_millis() as i64);
            state.push(loaded);
        }
        // Streams dropped from the config keep draining what they hold.
        let orphans: Vec<String> = {
            let mut stmt = conn
                .prepare("SELECT name FROM streams s WHERE EXISTS (SELECT 1 FROM records r WHERE r.stream_id = s.id) ORDER BY id")
                .map_err(sqlite)?;
            let names = stmt
                .query_map([], |r| r.get::<_, String>(0))
                .map_err(sqlite)?;
            names
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(sqlite)?
                .into_iter()
                .filter(|n| !streams.iter().any(|s| &s.name == n))
                .collect()
        };
        for name in &orphans {
            state.push(load_stream(&conn, name, Priority::Bulk).map_err(sqlite)?);
        }
        let opened = resume_points(&conn, &state, streams.len()).map_err(sqlite)?;
        let buffer = Buffer {
            conn,
            path: path.to_owned(),
            streams: state,
            quota_bytes,
            disk_cap: None,
            reserve_bytes,
            reserve,
            ceiling: None,
            page_size: page_size.max(512) as u64,
        };
        Ok(Opened {
            buffer,
            streams: opened,
            epoch,
            quarantine: None,
        })
    }

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
                None => load_stream(&self.conn, &spec.name, spec.priority).map_err(sqlite)?,
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
        let opened = resume_points(&self.conn, &state, streams.len()).map_err(sqlite)?;
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

    /// Progress of every stream, by index.
    pub fn progress(&self) -> Vec<StreamProgress> {
        self.streams.iter().map(|s| s.progress).collect()
    }

    /// Per stream, when its oldest record still held was received (Unix ms), if it holds any.
    pub fn oldest_received_ms(&self) -> rusqlite::Result<Vec<Option<i64>>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT received_at_ms FROM records WHERE stream_id = ?1 ORDER BY seq LIMIT 1",
        )?;
        self.streams
            .iter()
            .map(|s| stmt.query_row([s.id], |r| r.get::<_, i64>(0)).optional())
            .collect()
    }

    /// Total cost of the records held, against the quota.
    pub fn backlog_bytes(&self) -> u64 {
        self.streams.iter().map(|s| s.progress.backlog_bytes).sum()
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
        let housekeeping = !commands
            .iter()
            .any(|c| matches!(c, WriterCommand::Append(_)));
        self.limit_growth(housekeeping)?;
        let mut streams = self.streams.clone();
        let cap = match self.disk_cap {
            Some(cap) if cap < self.quota_bytes => (cap, LossReason::DiskFull),
            _ => (self.quota_bytes, LossReason::Quota),
        };
        let droppable: Vec<Vec<(u64, u64)>> = (0..streams.len())
            .map(|i| protected.get(i).cloned().unwrap_or_default().droppable())
            .collect();
        let summary = apply(
            &mut self.conn,
            &mut streams,
            commands,
            Limits {
                cap: cap.0,
                reason: cap.1,
                highest: None,
            },
            &droppable,
            now_ms,
            expire,
        )
        .map_err(|source| self.error(source))?;
        self.streams = streams;
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
        let droppable: Vec<Vec<(u64, u64)>> = (0..streams.len())
            .map(|i| protected.get(i).cloned().unwrap_or_default().droppable())
            .collect();
        tracing::debug!(
            cap,
            bytes,
            held = self.backlog_bytes(),
            ?droppable,
            "making room"
        );
        let target = cap.saturating_sub(bytes);
        let step = (self.reserve_bytes / 8).max(64 << 10);
        let mut total: Option<CommitSummary> = None;
        loop {
            let held = self.backlog_bytes();
            let commands = if total.is_none() { others } else { &[] };
            let applied = apply(
                &mut self.conn,
                &mut streams,
                commands,
                Limits {
                    cap: target.max(held.saturating_sub(step)),
                    reason: LossReason::DiskFull,
                    highest,
                },
                &droppable,
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

    fn pragma(&self, name: &str) -> Result<u64, BufferError> {
        self.conn
            .query_row(&format!("PRAGMA {name}"), [], |r| r.get::<_, i64>(0))
            .map(|v| v.max(0) as u64)
            .map_err(|e| self.error(e))
    }

    /// Pages a frozen file may still grow by for housekeeping (see [`Buffer::limit_growth`]):
    /// a sixteenth of the reserve, which was released when the disk filled.
    fn headroom_pages(&self) -> u64 {
        (self.reserve_bytes / 16 / self.page_size).max(8)
    }

    /// On a frozen file, before a transaction: new records may not grow it past its ceiling,
    /// but housekeeping (deletes, evictions and the loss reports they write) may, by
    /// [`Buffer::headroom_pages`] at most. Without that headroom a file frozen with no free
    /// page cannot take even the loss report of a refused publish: a B-tree insert (or a
    /// delete that rebalances) needs a page before any is freed, and the commit is refused
    /// for ever. The headroom comes out of the released reserve, so the file stays within
    /// `ceiling + headroom` pages.
    fn limit_growth(&mut self, housekeeping: bool) -> Result<(), BufferError> {
        let Some(ceiling) = self.ceiling else {
            return Ok(());
        };
        let pages = self.pragma("page_count")?;
        let limit = if housekeeping {
            ceiling + self.headroom_pages()
        } else {
            ceiling
        };
        self.pragma(&format!("max_page_count = {}", limit.max(pages)))?;
        Ok(())
    }

    /// Whether the file may not grow (the disk filled and space has not come back).
    pub fn is_frozen(&self) -> bool {
        self.ceiling.is_some()
    }

    /// After every commit: checkpoints (TRUNCATE) when the WAL holds more growth of the file
    /// than half the reserve ([`space::must_checkpoint`]), so a full disk can always be
    /// checkpointed out of; and when the WAL itself takes much of what is left of the volume
    /// ([`space::wal_too_large`]).
    pub fn bound_growth(&mut self) -> Result<(), BufferError> {
        let pages = self.pragma("page_count")?;
        let usage = space::Usage::of(&self.path);
        let wal_too_large = usage.wal > self.reserve_bytes / 2
            && space::Volume::of(&self.path)
                .is_ok_and(|v| space::wal_too_large(usage.wal, v, self.reserve_bytes));
        if wal_too_large
            || space::must_checkpoint(pages, self.page_size, usage.db, self.reserve_bytes)
        {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Copies the whole WAL into the file and empties it; `false` when readers kept it busy.
    fn checkpoint(&mut self) -> Result<bool, BufferError> {
        let busy: i64 = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
            .map_err(|e| self.error(e))?;
        Ok(busy == 0)
    }

    /// Once a second: lets the file grow only as far as the volume allows
    /// ([`space::db_limit_pages`]); while frozen, gives free pages back to the volume and,
    /// once space has come back, takes the reserve back and lets the file grow again.
    pub fn fit_to_volume(&mut self) -> Result<(), BufferError> {
        let volume = match space::Volume::of(&self.path) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the buffer volume's free space");
                return Ok(());
            }
        };
        if self.ceiling.is_some() {
            // Room inside the file again (the ingest took records): the cap that made room
            // is lifted; a new refusal sets a new one from what is held then.
            if self.pragma("freelist_count")? * self.page_size >= self.reserve_bytes {
                self.disk_cap = None;
            }
            self.give_back_free_pages()?;
            let volume = space::Volume::of(&self.path).unwrap_or(volume);
            if space::space_is_back(volume, self.reserve_bytes)
                && ensure_reserve(&self.reserve, self.reserve_bytes)
            {
                tracing::info!(
                    "buffer disk: space is back; the reserve is held again and the full quota applies"
                );
                self.ceiling = None;
                self.disk_cap = None;
            }
        }
        let pages = self.pragma("page_count")?;
        let limit = if let Some(ceiling) = self.ceiling {
            ceiling.max(pages)
        } else {
            space::db_limit_pages(
                volume,
                space::Usage::of(&self.path),
                self.reserve_bytes,
                self.page_size,
                pages,
            )
        };
        self.pragma(&format!("max_page_count = {limit}"))?;
        Ok(())
    }

    /// Frees pages the file no longer uses (beyond half the reserve, kept for reuse) back to
    /// the volume: incremental vacuum, then a checkpoint that shrinks the file. In steps of a
    /// quarter of the reserve, each checkpointed, so the WAL it writes (pages moved from the end
    /// of the file into free slots) always fits. Buffers made before auto_vacuum keep their size.
    fn give_back_free_pages(&mut self) -> Result<(), BufferError> {
        if self.pragma("auto_vacuum")? != 2 {
            return Ok(());
        }
        let keep = self.reserve_bytes / 2 / self.page_size;
        let step = (self.reserve_bytes / 4 / self.page_size).max(1);
        for _ in 0..16 {
            let free = self.pragma("freelist_count")?;
            if free <= keep {
                break;
            }
            // Stepped to its end: a single step frees only a page.
            let vacuumed = self
                .conn
                .prepare(&format!(
                    "PRAGMA incremental_vacuum({})",
                    (free - keep).min(step)
                ))
                .and_then(|mut stmt| {
                    let mut rows = stmt.query([])?;
                    while rows.next()?.is_some() {}
                    Ok(())
                });
            vacuumed.map_err(|e| self.error(e))?;
            self.checkpoint()?;
        }
        Ok(())
    }

    /// SQLite said the disk is full while the group held no new records (acks, reports):
    /// only WAL room is missing. Release the reserve if the volume is full, and checkpoint.
    pub fn wal_room(&mut self) {
        let volume_full =
            space::Volume::of(&self.path).map_or(true, |v| v.available < self.reserve_bytes / 2);
        if volume_full && self.reserve.exists() {
            let _ = std::fs::remove_file(&self.reserve);
        }
        let _ = self.checkpoint();
    }

    /// SQLite said the disk is full (the volume, or the file's allowed size): release the
    /// reserve if the volume itself is full, checkpoint (which the reserve always makes
    /// possible, emptying the WAL), stop the file from growing, and keep at most 80% of what
    /// is held from now on, so the retried commit evicts by policy to make room.
    pub fn disk_full(&mut self) {
        let volume_full =
            space::Volume::of(&self.path).map_or(true, |v| v.available < self.reserve_bytes / 2);
        if volume_full && self.reserve.exists() {
            tracing::warn!(reserve = %self.reserve.display(), "buffer volume full: releasing the reserve");
            let _ = std::fs::remove_file(&self.reserve);
        }
        if let Err(e) = self.checkpoint() {
            tracing::warn!(error = %e, "buffer checkpoint on a full disk failed; retried");
        }
        // The file stays at the size it had when the disk first filled: housekeeping's headroom
        // above it is not taken as the new ceiling by a later refusal, so repeated refusals
        // cannot creep into the released reserve.
        if let Ok(pages) = self.pragma("page_count") {
            let ceiling = self.ceiling.map_or(pages, |c| c.min(pages));
            self.ceiling = Some(ceiling);
            let _ = self.pragma(&format!("max_page_count = {}", ceiling.max(pages)));
        }
        let held = self.backlog_bytes();
        self.disk_cap = Some(self.disk_cap.unwrap_or(held).min(held) * 4 / 5);
    }
}

/// Makes renames in `path`'s directory durable (best effort: a failure only weakens what a
/// power cut right after may undo).
fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
}

/// Creates the reserve file if it is missing and fits (a partial one is removed); whether it
/// is there now.
fn ensure_reserve(path: &Path, bytes: u64) -> bool {
    use std::io::Write;
    if path.metadata().is_ok_and(|m| m.len() == bytes) {
        return true;
    }
    let written = std::fs::File::create(path).and_then(|mut f| {
        let chunk = vec![0u8; 64 << 10];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            f.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        f.sync_all()
    });
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), error = %e, "cannot hold the disk reserve now; will retry");
        let _ = std::fs::remove_file(path);
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

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
