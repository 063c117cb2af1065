//! What happens to a buffer file that SQLite cannot trust: it is checked at every start,
//! moved aside (quarantined, never deleted) when corrupt, and whatever rows can still be read
//! are copied into a fresh buffer. Also the offline `edge-agent buffer verify|dump`.
//!
//! Invariant: a corrupt file never stops the agent from starting, and is never lost: it stays
//! beside the buffer as `<buffer>.corrupt-<unix ms>` for an operator to inspect.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, ErrorCode, OpenFlags, params};
use serde::Serialize;

/// A corrupt buffer that was moved aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantine {
    /// Where the corrupt file now is.
    pub moved_to: PathBuf,
    /// What SQLite said about it.
    pub reason: String,
    /// Records read from it and kept in the fresh buffer (with new sequence numbers).
    pub salvaged: u64,
}

fn is_corruption(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if matches!(f.code, ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase))
}

/// Checks the buffer at `path` (absent is fine). `Ok(Some(reason))` when it is corrupt;
/// `Err` for errors that are not about the file's content (permissions, missing directory).
pub fn check(path: &Path) -> rusqlite::Result<Option<String>> {
    if !path.exists() {
        return Ok(None);
    }
    let result = Connection::open(path)
        .and_then(|conn| conn.query_row("PRAGMA quick_check", [], |r| r.get::<_, String>(0)));
    match result {
        Ok(verdict) if verdict == "ok" => Ok(None),
        Ok(verdict) => Ok(Some(verdict)),
        Err(e) if is_corruption(&e) => Ok(Some(e.to_string())),
        Err(e) => Err(e),
    }
}

/// Moves the buffer file and its WAL and shared-memory files aside; returns the new path.
pub fn quarantine(path: &Path) -> std::io::Result<PathBuf> {
    let stamp = crate::clock::now_ms();
    let moved_to = PathBuf::from(format!("{}.corrupt-{stamp}", path.display()));
    std::fs::rename(path, &moved_to)?;
    for suffix in ["-wal", "-shm"] {
        let side = PathBuf::from(format!("{}{suffix}", path.display()));
        if side.exists() {
            std::fs::rename(&side, format!("{}{suffix}", moved_to.display()))?;
        }
    }
    Ok(moved_to)
}

/// Rowids tried past the last readable one before salvage gives up (when the highest rowid
/// itself cannot be read).
const SALVAGE_MISSES: i64 = 100_000;

/// Copies every record still readable from `from`, in rowid (arrival) order, into `into` (a
/// fresh buffer), with new sequence numbers. Reads row by row, so an unreadable page loses only
/// the rows on it. Returns how many were copied.
pub fn salvage(from: &Path, into: &mut Connection) -> rusqlite::Result<u64> {
    // A truncated file still claims its old size in its header, and SQLite then refuses every
    // page; a copy whose header leaves the size to the file lets the surviving pages be read.
    let patched = truncated_copy(from);
    let readable = patched.as_deref().unwrap_or(from);
    let copied = salvage_rows(readable, into);
    if let Some(copy) = patched {
        let _ = std::fs::remove_file(copy);
    }
    copied
}

/// For a file shorter than its header says: a copy with the in-header size marked invalid.
fn truncated_copy(path: &Path) -> Option<PathBuf> {
    let mut bytes = std::fs::read(path).ok()?;
    if bytes.len() < 100 {
        return None;
    }
    let page_size = match u16::from_be_bytes([bytes[16], bytes[17]]) {
        1 => 65_536,
        n => n as u64,
    };
    let header_pages = u32::from_be_bytes([bytes[28], bytes[29], bytes[30], bytes[31]]) as u64;
    if page_size == 0 || header_pages * page_size <= bytes.len() as u64 {
        return None;
    }
    // The in-header size counts only while "version-valid-for" (92..96) equals the change
    // counter (24..28); make them differ so SQLite sizes the database from the file.
    let counter = u32::from_be_bytes([bytes[24], bytes[25], bytes[26], bytes[27]]);
    bytes[92..96].copy_from_slice(&counter.wrapping_add(1).to_be_bytes());
    let copy = PathBuf::from(format!("{}.salvage", path.display()));
    std::fs::write(&copy, &bytes).ok()?;
    Some(copy)
}

fn salvage_rows(from: &Path, into: &mut Connection) -> rusqlite::Result<u64> {
    let Ok(source) = Connection::open_with_flags(from, OpenFlags::SQLITE_OPEN_READ_ONLY) else {
        return Ok(0);
    };
    // Stream names, if that table is still readable; unknown ids get a name of their own.
    let mut names = std::collections::HashMap::new();
    if let Ok(mut stmt) = source.prepare("SELECT id, name FROM streams")
        && let Ok(rows) = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
    {
        names.extend(rows.map_while(Result::ok));
    }
    let max_id: Option<i64> = source
        .query_row("SELECT MAX(id) FROM records", [], |r| r.get(0))
        .ok()
        .flatten();
    let Ok(mut lookup) = source
        .prepare("SELECT stream_id, topic, received_at_ms, payload FROM records WHERE id = ?1")
    else {
        return Ok(0);
    };
    let tx = into.transaction()?;
    let mut copied = 0u64;
    let (mut id, mut misses) = (1i64, 0i64);
    while max_id.map_or(misses < SALVAGE_MISSES, |max| id <= max) {
        let row = lookup.query_row([id], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Vec<u8>>(3)?,
            ))
        });
        id += 1;
        let Ok((stream_id, topic, received_at_ms, payload)) = row else {
            misses += 1;
            continue;
        };
        misses = 0;
        let stream = names
            .get(&stream_id)
            .cloned()
            .unwrap_or_else(|| format!("salvaged-{stream_id}"));
        tx.execute(
            "INSERT INTO streams (name, next_seq) VALUES (?1, 1) ON CONFLICT (name) DO NOTHING",
            [&stream],
        )?;
        let (sid, seq): (i64, i64) = tx.query_row(
            "SELECT id, next_seq FROM streams WHERE name = ?1",
            [&stream],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        tx.execute(
            "INSERT INTO records (stream_id, seq, topic, received_at_ms, payload) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![sid, seq, topic, received_at_ms, payload],
        )?;
        tx.execute(
            "UPDATE streams SET next_seq = ?2 WHERE id = ?1",
            params![sid, seq + 1],
        )?;
        copied += 1;
    }
    tx.commit()?;
    Ok(copied)
}

/// What `edge-agent buffer verify` reports.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// `ok`, or SQLite's integrity_check findings.
    pub integrity: String,
    /// The buffer's sequence epoch.
    pub epoch: Option<u64>,
    /// What each stream holds.
    pub streams: Vec<StreamSummary>,
    /// Records in the dead-letter table.
    pub dead_letters: u64,
}

/// One stream of a buffer file.
#[derive(Debug, Clone, Serialize)]
pub struct StreamSummary {
    /// Stream name.
    pub name: String,
    /// Records waiting to be sent.
    pub records: u64,
    /// Sequence number the next record gets.
    pub next_seq: u64,
}

/// Checks a buffer file offline (read-only; the agent may be running).
pub fn verify(path: &Path) -> rusqlite::Result<VerifyReport> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let integrity = {
        let mut stmt = conn.prepare("PRAGMA integrity_check")?;
        let lines = stmt
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        lines.join("; ")
    };
    let epoch = conn
        .query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| {
            r.get::<_, i64>(0)
        })
        .ok()
        .map(|e| e as u64);
    let mut stmt = conn.prepare(
        "SELECT s.name, (SELECT COUNT(*) FROM records r WHERE r.stream_id = s.id), s.next_seq FROM streams s ORDER BY s.id",
    )?;
    let streams = stmt
        .query_map([], |r| {
            Ok(StreamSummary {
                name: r.get(0)?,
                records: r.get::<_, i64>(1)? as u64,
                next_seq: r.get::<_, i64>(2)? as u64,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let dead_letters = conn.query_row("SELECT COUNT(*) FROM dead_letters", [], |r| {
        r.get::<_, i64>(0)
    })? as u64;
    Ok(VerifyReport {
        integrity,
        epoch,
        streams,
        dead_letters,
    })
}

/// One record as `edge-agent buffer dump` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct DumpedRecord {
    /// Stream name.
    pub stream: String,
    /// Sequence number.
    pub seq: u64,
    /// MQTT topic.
    pub topic: String,
    /// Receive time, Unix ms.
    pub received_at_ms: i64,
    /// Payload as text when valid UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    /// Payload as hex otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_hex: Option<String>,
    /// For dead letters: the ingest's status and reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected: Option<(u16, String)>,
}

/// Every record (or dead letter) of a buffer file, in order, passed to `each`; read-only.
pub fn dump(
    path: &Path,
    dead_letters: bool,
    mut each: impl FnMut(DumpedRecord),
) -> rusqlite::Result<()> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let sql = if dead_letters {
        "SELECT s.name, r.seq, r.topic, r.received_at_ms, r.payload, r.status, r.reason FROM dead_letters r JOIN streams s ON s.id = r.stream_id ORDER BY r.id"
    } else {
        "SELECT s.name, r.seq, r.topic, r.received_at_ms, r.payload, NULL, NULL FROM records r JOIN streams s ON s.id = r.stream_id ORDER BY r.id"
    };
    let mut stmt = conn.prepare(sql)?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let payload: Vec<u8> = row.get(4)?;
        let (text, hex) = match String::from_utf8(payload) {
            Ok(t) => (Some(t), None),
            Err(e) => (
                None,
                Some(e.as_bytes().iter().map(|b| format!("{b:02x}")).collect()),
            ),
        };
        let status: Option<i64> = row.get(5)?;
        let reason: Option<String> = row.get(6)?;
        each(DumpedRecord {
            stream: row.get(0)?,
            seq: row.get::<_, i64>(1)? as u64,
            topic: row.get(2)?,
            received_at_ms: row.get(3)?,
            payload: text,
            payload_hex: hex,
            rejected: status.zip(reason).map(|(s, r)| (s as u16, r)),
        });
    }
    Ok(())
}
