//! Opening the buffer file: the quick check at a clean start, the full check (and the salvage
//! of a damaged file) otherwise, the schema's migration, the reserve file, and the
//! checkpointer that keeps the WAL small.

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;

use super::schema::{Layout, SCHEMA, load_epoch, load_stream, migrate, resume_points};
use super::{Buffer, BufferError, BufferStream, Quarantine, WriterCommand, recovery, space};
use crate::routing::Priority;

/// Page size of a new buffer file. A commit writes every page it touched to the WAL (the last,
/// partly filled leaf of the records, the streams' counters), then a checkpoint writes them
/// again: at gateway rates a commit holds a few records, so smaller pages mean fewer bytes
/// written to flash per record (`BENCH_ONLY=flash bash tests/bench.sh`; BENCHMARKS.md).
pub const PAGE_SIZE: u64 = 1024;

/// Page cache of the writer's connection, KiB (SQLite's default is 2,000 per connection). The
/// writer appends at the end of the records and deletes at their start: the pages it reuses
/// are the b-trees' edges, a few hundred KiB.
pub(super) const WRITER_CACHE_KIB: u32 = 1024;
/// Page cache of a read connection, KiB: a batch is read once, front to back, so only the
/// b-tree's inner pages are worth keeping between reads.
pub(super) const READER_CACHE_KIB: u32 = 256;
/// Page cache of the checkpointer's connection, KiB: it copies pages, it does not read rows.
pub(super) const CHECKPOINT_CACHE_KIB: u32 = 64;

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
    pub(super) fn recover(
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
    pub(super) fn connect(path: &Path, reserve_bytes: u64) -> Result<Connection, BufferError> {
        let sqlite = |source| BufferError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open(path).map_err(sqlite)?;
        // auto_vacuum and page_size take effect only on a new file: free pages can then be
        // given back to a full volume ([`space`]), and each commit rewrites smaller pages
        // ([`PAGE_SIZE`]). Older buffers keep theirs.
        conn.execute_batch(&format!(
            "PRAGMA page_size={PAGE_SIZE}; PRAGMA auto_vacuum=INCREMENTAL; PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA wal_autocheckpoint=0; PRAGMA journal_size_limit={reserve_bytes}; PRAGMA cache_size=-{WRITER_CACHE_KIB};"
        ))
        .and_then(|()| conn.busy_timeout(BUSY_TIMEOUT))
        .and_then(|()| {
            // A commit's statements, each prepared once: more than rusqlite's default of 16.
            conn.set_prepared_statement_cache_capacity(STATEMENTS_CACHED);
            conn.execute_batch(SCHEMA)
        })
        .and_then(|()| migrate(&conn))
        .map_err(sqlite)?;
        Ok(conn)
    }

    /// Opens the (sound) buffer file at `path` and loads its streams.
    pub(super) fn open_file(
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
        let layout = Layout::settle(&conn).map_err(sqlite)?;
        let epoch = load_epoch(&conn).map_err(sqlite)?;
        let page_size: i64 = conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .map_err(sqlite)?;
        let reserve = space::side(path, ".reserve");
        let mut state = Vec::new();
        for spec in streams {
            let mut loaded =
                load_stream(&conn, layout, &spec.name, spec.priority).map_err(sqlite)?;
            loaded.ttl_ms = spec.ttl.map(|t| t.as_millis() as i64);
            state.push(loaded);
        }
        // Streams dropped from the config keep draining what they hold.
        let orphans: Vec<String> = {
            let mut stmt = conn
                .prepare(&format!(
                    "SELECT name FROM streams s WHERE EXISTS (SELECT 1 FROM records r WHERE {}) ORDER BY id",
                    layout.stream("r.", "s.id")
                ))
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
            state.push(load_stream(&conn, layout, name, Priority::Bulk).map_err(sqlite)?);
        }
        let opened = resume_points(&conn, layout, &state, streams.len()).map_err(sqlite)?;
        // SQLite syncs with fdatasync (`.cargo/config.toml`), its syncs of the directory too,
        // and what an fdatasync of a directory makes durable is up to the file system. The
        // entries of the file and of the WAL this open created are made durable here, with an
        // fsync of the directory.
        sync_dir(path);
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
            wal_restart: super::growth::WalRestart::new(),
            layout,
        };
        Ok(Opened {
            buffer,
            streams: opened,
            epoch,
            quarantine: None,
        })
    }
}

/// How long the writer's connection waits for a lock (the checkpointer's, a TRUNCATE
/// checkpoint's wait for readers).
pub(super) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The reserve when none is given (tests, tools); the agent sizes it from the config and the
/// volume ([`space::auto_reserve`]).
pub const RESERVE_BYTES: u64 = 4 << 20;

/// Prepared statements the writer's connection keeps (a commit uses about 15).
const STATEMENTS_CACHED: usize = 32;

/// How often the checkpointer moves the WAL into the database file.
pub(super) const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

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
            Ok(c) => {
                // Best effort: a memory setting never stops the checkpoints.
                let _ = c.execute_batch(&format!("PRAGMA cache_size=-{CHECKPOINT_CACHE_KIB};"));
                c
            }
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

/// Makes renames and new files in `path`'s directory durable (best effort: a failure only
/// weakens what a power cut right after may undo).
pub(super) fn sync_dir(path: &Path) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Creates the reserve file if it is missing and fits (a partial one is removed); whether it
/// is there now.
pub(super) fn ensure_reserve(path: &Path, bytes: u64) -> bool {
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
