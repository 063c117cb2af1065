//! The buffer's file: its tables, the migrations of files written by older versions, and what
//! is read back from it when it is opened (the epoch, each stream's state and resume point).
//! A record's rowid is its stream and sequence ([`row_id`]), so a stream's records share pages.

use super::*;

/// How the buffer's statements find a stream's records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// By a range of rowids: every record's rowid is derived from its stream and sequence
    /// ([`row_id`]), so the table needs no other index (each commit wrote one too).
    Rowid,
    /// Through the index on (stream, sequence): the buffer still holds records an older
    /// version stored under rowids SQLite chose (below 2^48). The first open that finds none
    /// left drops the index ([`Layout::settle`]).
    Indexed,
}

/// The largest sequence a rowid holds: 2^48 - 1.
const SEQ_MASK: &str = "281474976710655";

impl Layout {
    /// The layout of the buffer `conn` opened (read-only connections too).
    pub fn of(conn: &Connection) -> rusqlite::Result<Layout> {
        let indexed: bool = conn.query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name = 'records_by_seq'",
            [],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )?;
        Ok(if indexed {
            Layout::Indexed
        } else {
            Layout::Rowid
        })
    }

    /// The writer's open: drops the index once every record's rowid is its stream and
    /// sequence, so a buffer of the previous version loses it at its first open and one with
    /// an older version's records once they are gone. Records below 2^48 (rowids SQLite chose)
    /// are a range, read at once; above it, a version older than the clustered rowids that ran
    /// on a newer one's file chose rowids past the last stream's range, so every record is
    /// looked at, once, before the index goes. A drop that fails (a full volume) keeps the
    /// index: tried again at the next open.
    pub(super) fn settle(conn: &Connection) -> rusqlite::Result<Layout> {
        if Layout::of(conn)? == Layout::Rowid {
            return Ok(Layout::Rowid);
        }
        let strays = |sql| conn.query_row(sql, [], |r| r.get::<_, bool>(0));
        if strays("SELECT EXISTS (SELECT 1 FROM records WHERE id < (1 << 48))")?
            || strays("SELECT EXISTS (SELECT 1 FROM records WHERE id <> (stream_id << 48) + seq)")?
        {
            return Ok(Layout::Indexed);
        }
        match conn.execute_batch("DROP INDEX records_by_seq;") {
            Ok(()) => Ok(Layout::Rowid),
            Err(e) => {
                tracing::warn!(error = %e, "the buffer's (stream, sequence) index could not be dropped; it is kept and the drop tried again at the next start");
                Ok(Layout::Indexed)
            }
        }
    }

    /// SQL: the records of stream `?1` with sequences `?2..=?3`; `t` is the table's alias
    /// with its dot, or empty. Sequences are capped below 2^48 (a span may end at
    /// [`MAX_SEQ`]).
    pub fn seqs(self, t: &str) -> String {
        match self {
            Layout::Rowid => format!(
                "{t}id BETWEEN (?1 << 48) + min(?2, {SEQ_MASK}) AND (?1 << 48) + min(?3, {SEQ_MASK})"
            ),
            Layout::Indexed => format!("{t}stream_id = ?1 AND {t}seq BETWEEN ?2 AND ?3"),
        }
    }

    /// SQL: every record of the stream whose id is `stream` (`?1`, or a column).
    pub fn stream(self, t: &str, stream: &str) -> String {
        match self {
            Layout::Rowid => {
                format!("{t}id BETWEEN ({stream} << 48) AND ({stream} << 48) + {SEQ_MASK}")
            }
            Layout::Indexed => format!("{t}stream_id = {stream}"),
        }
    }

    /// SQL: the column that orders a stream's records by sequence.
    pub fn order(self, t: &str) -> String {
        match self {
            Layout::Rowid => format!("{t}id"),
            Layout::Indexed => format!("{t}seq"),
        }
    }

    /// SQL: `column` of the oldest record of the stream whose id is `stream` (`?1`, or an
    /// outer query's column), found without a sort.
    pub fn oldest(self, column: &str, stream: &str) -> String {
        format!(
            "SELECT {column} FROM records WHERE {} ORDER BY {} LIMIT 1",
            self.stream("", stream),
            self.order("")
        )
    }
}

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS streams (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    next_seq INTEGER NOT NULL,
    floor INTEGER
);
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY,
    stream_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    topic TEXT NOT NULL,
    received_at_ms INTEGER NOT NULL,
    payload BLOB NOT NULL,
    boot INTEGER,
    monotonic_ms INTEGER,
    crc INTEGER,
    attributes BLOB
);
CREATE TABLE IF NOT EXISTS boots (id INTEGER PRIMARY KEY, boot_id TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    stream_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    topic TEXT NOT NULL,
    received_at_ms INTEGER NOT NULL,
    payload BLOB NOT NULL,
    status INTEGER NOT NULL,
    reason TEXT NOT NULL,
    dead_at_ms INTEGER NOT NULL,
    attributes BLOB
);
CREATE TABLE IF NOT EXISTS file_positions (
    source TEXT NOT NULL,
    dev INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    fingerprint INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    path TEXT NOT NULL,
    PRIMARY KEY (source, dev, inode)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS transform_state (
    stream TEXT NOT NULL,
    step INTEGER NOT NULL,
    fingerprint TEXT NOT NULL,
    key TEXT NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (stream, step, key)
) WITHOUT ROWID;
";

/// The buffer's epoch, created at random with the file.
pub(super) fn load_epoch(conn: &Connection) -> rusqlite::Result<u64> {
    // Kept below 2^63: SQLite integers are signed.
    let fresh = (rand::random::<u64>() >> 1) as i64;
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('epoch', ?1) ON CONFLICT (key) DO NOTHING",
        [fresh],
    )?;
    conn.query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| {
        r.get::<_, i64>(0)
    })
    .map(|e| e as u64)
}

pub(super) fn load_stream(
    conn: &Connection,
    layout: Layout,
    name: &str,
    priority: Priority,
) -> rusqlite::Result<StreamState> {
    conn.execute(
        "INSERT INTO streams (name, next_seq) VALUES (?1, 1) ON CONFLICT (name) DO NOTHING",
        [name],
    )?;
    let (id, next_seq): (i64, i64) = conn.query_row(
        "SELECT id, next_seq FROM streams WHERE name = ?1",
        [name],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    if row_id(id, 1).is_none() {
        // Records are found by their rowid, which has room for 2^15 streams.
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_RANGE),
            Some(format!(
                "stream {name:?} would be the buffer's stream number {id}; a buffer holds at most 32,767 streams over its life: move the buffer file aside to start a new one"
            )),
        ));
    }
    let (records, bytes): (i64, i64) = conn.query_row(
        &format!(
            "SELECT COUNT(*), COALESCE(SUM(length(CAST(topic AS BLOB)) + length(payload) + coalesce(length(attributes), 0)), 0) FROM records WHERE {}",
            layout.stream("", "?1")
        ),
        [id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let records = records as u64;
    Ok(StreamState {
        id,
        name: name.to_owned(),
        priority,
        ttl_ms: None,
        next_seq: next_seq as u64,
        progress: StreamProgress {
            committed_seq: next_seq as u64 - 1,
            appended_bytes: 0,
            backlog_records: records,
            backlog_bytes: bytes as u64 + records * RECORD_OVERHEAD_BYTES,
        },
    })
}

/// Each stream's resume point (its oldest record held, else its next sequence); those after
/// the first `configured` are orphans.
pub(super) fn resume_points(
    conn: &Connection,
    layout: Layout,
    state: &[StreamState],
    configured: usize,
) -> rusqlite::Result<Vec<OpenedStream>> {
    let mut oldest = conn.prepare_cached(&layout.oldest("seq", "?1"))?;
    state
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let first: Option<i64> = oldest.query_row([s.id], |r| r.get(0)).optional()?;
            Ok(OpenedStream {
                name: s.name.clone(),
                resume_after: first.map_or(s.next_seq - 1, |f| f as u64 - 1),
                orphan: i >= configured,
            })
        })
        .collect()
}

/// Brings a buffer written by an older version up to the current schema (boot id, monotonic
/// time, checksum per record and the delivered floor per stream: NULL, i.e. unknown, for what
/// it already held), and registers this boot.
pub(super) fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let has_monotonic: bool = conn.query_row(
        "SELECT count(*) FROM pragma_table_info('records') WHERE name = 'monotonic_ms'",
        [],
        |row| row.get::<_, i64>(0).map(|n| n > 0),
    )?;
    if !has_monotonic {
        conn.execute_batch(
            "ALTER TABLE records ADD COLUMN boot INTEGER; ALTER TABLE records ADD COLUMN monotonic_ms INTEGER;",
        )?;
    }
    // Checksums and the delivered floor came later: NULL (unknown) for what is already held.
    // So did attributes: NULL (none) for what is already held.
    for (table, column, kind) in [
        ("records", "crc", "INTEGER"),
        ("streams", "floor", "INTEGER"),
        ("records", "attributes", "BLOB"),
        ("dead_letters", "attributes", "BLOB"),
    ] {
        let has: bool = conn.query_row(
            &format!("SELECT count(*) FROM pragma_table_info('{table}') WHERE name = '{column}'"),
            [],
            |row| row.get::<_, i64>(0).map(|n| n > 0),
        )?;
        if !has {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {kind};"))?;
        }
    }
    conn.execute(
        "INSERT OR IGNORE INTO boots (boot_id) VALUES (?1)",
        [crate::clock::boot_id()],
    )?;
    Ok(())
}

/// Bits of a record's rowid that hold its sequence number; the stream's id is above them.
pub(super) const SEQ_BITS: u32 = 48;

/// The rowid of record `seq` of the stream with database id `stream_id`: the table is ordered
/// by stream, then sequence, so a stream's records share pages. Evicting a stream's oldest
/// records then frees whole pages, which a full disk's new records reuse; rows of streams
/// interleaved by arrival would leave every page partly used. `None` (SQLite picks) for a
/// stream id beyond the 15 bits left, which a buffer never reaches. Pure.
pub fn row_id(stream_id: i64, seq: u64) -> Option<i64> {
    (stream_id > 0 && stream_id < 1 << 15 && seq < 1 << SEQ_BITS)
        .then_some((stream_id << SEQ_BITS) | seq as i64)
}
