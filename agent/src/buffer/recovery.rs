//! What happens to a buffer file that SQLite cannot trust: it is checked at every start,
//! moved aside (quarantined, never deleted) when corrupt, and whatever rows can still be read
//! are copied into a fresh buffer. Also the offline `edge-agent buffer verify|dump`.
//!
//! Invariants:
//! - a corrupt file never stops the agent from starting, and is never lost: it stays beside the
//!   buffer as `<buffer>.corrupt-<unix ms>` for an operator to inspect; salvage leaves no other
//!   file behind;
//! - a salvaged record is byte-identical to what was received (its checksum is verified) and
//!   keeps its identity (epoch, stream, sequence) whenever the file still tells it, so a record
//!   the ingest already has is deduplicated, not delivered twice;
//! - what the file held but the salvage could not give back is reported lost
//!   (`corrupt_buffer`), with the sequence ranges when the file still tells them (the stream's
//!   next sequence and delivered floor), else with what count it can establish.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ingest_wire::{LossReason, LossReport};
use rusqlite::{Connection, ErrorCode, OpenFlags, params};
use serde::Serialize;

use super::space::side;

mod pages;

/// A corrupt buffer that was moved aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantine {
    /// Where the corrupt file now is.
    pub moved_to: PathBuf,
    /// What SQLite said about it.
    pub reason: String,
    /// Records read from it, intact, and kept in the fresh buffer.
    pub salvaged: u64,
    /// What it held but could not give back: reported upstream at start.
    pub losses: Vec<LossReport>,
}

pub(super) fn is_corruption(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if matches!(f.code, ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase))
}

/// The marker beside a buffer in which the running agent found damage.
fn suspect(path: &Path) -> PathBuf {
    side(path, ".damaged")
}

/// Marks the buffer at `path` as damaged (the running agent read a page SQLite calls corrupt):
/// its next start salvages it even if `PRAGMA quick_check` passes (that check does not read
/// everything a query may). Written and synced before the agent stops.
pub fn mark_suspect(path: &Path, why: &str) {
    use std::io::Write;
    let marked = std::fs::File::create(suspect(path))
        .and_then(|mut f| f.write_all(why.as_bytes()).and_then(|()| f.sync_all()));
    if let Err(e) = marked {
        tracing::warn!(error = %e, "cannot mark the buffer as damaged; the next start checks it as usual");
    }
}

/// After a salvage: the marker is gone with the file it was about.
pub fn clear_suspect(path: &Path) {
    let _ = std::fs::remove_file(suspect(path));
}

/// The marker beside a buffer that the agent stopped cleanly.
fn clean_marker(path: &Path) -> PathBuf {
    side(path, ".clean")
}

/// What the buffer file looks like on disk: its size and modification time, and its WAL's.
fn file_stamp(path: &Path) -> Option<String> {
    let stamp = |p: &Path| {
        std::fs::metadata(p).ok().map(|m| {
            let modified = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            format!("{} {modified}", m.len())
        })
    };
    let wal = stamp(&side(path, "-wal")).unwrap_or_else(|| "none".into());
    Some(format!("{} / wal {wal}", stamp(path)?))
}

/// After a clean stop (everything committed, every connection closed): marks the buffer at
/// `path` so that the next start can skip the full check. The marker holds the file's
/// `file_stamp`: a file changed since (restored, copied over, written by anything) is
/// checked anyway.
pub fn mark_clean(path: &Path) {
    use std::io::Write;
    let Some(stamp) = file_stamp(path) else {
        return;
    };
    let marked = std::fs::File::create(clean_marker(path))
        .and_then(|mut f| f.write_all(stamp.as_bytes()).and_then(|()| f.sync_all()));
    if let Err(e) = marked {
        tracing::warn!(error = %e, "cannot mark the clean stop; the next start checks the whole buffer");
    }
}

/// Takes the clean-stop marker away (durably: a power cut later must not bring it back) and
/// says whether it vouches for the file as it is now.
fn take_clean_marker(path: &Path) -> bool {
    let marker = clean_marker(path);
    let Ok(stamp) = std::fs::read_to_string(&marker) else {
        return false;
    };
    if std::fs::remove_file(&marker).is_err() {
        return false;
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if std::fs::File::open(dir).and_then(|d| d.sync_all()).is_err() {
        return false;
    }
    file_stamp(path).is_some_and(|now| now == stamp)
}

/// Checks the buffer at `path` (absent is fine). `Ok(Some(reason))` when it is corrupt, or
/// was marked damaged while running; `Err` for errors that are not about the file's content
/// (permissions, missing directory). After a clean stop that left the file as it was, the full
/// read (`PRAGMA quick_check`, seconds on a large buffer on an SD card) is skipped: the file
/// was consistent when the agent closed it, every record's checksum is still verified on every
/// read, and damage met while running is marked and salvaged at the next start.
pub fn check(path: &Path) -> rusqlite::Result<Option<String>> {
    let clean = take_clean_marker(path);
    if !path.exists() {
        clear_suspect(path);
        return Ok(None);
    }
    if let Ok(why) = std::fs::read_to_string(suspect(path)) {
        return Ok(Some(format!("damage found while running: {why}")));
    }
    if clean {
        tracing::info!("the buffer was stopped cleanly and is unchanged since: full check skipped");
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

/// Rowids tried one by one past a damaged page before the salvage jumps further ahead.
const SALVAGE_STEPS: i64 = 1024;
/// Most loss reports one salvage writes per stream; further missing runs are merged into the
/// last one.
const MAX_REPORTS_PER_STREAM: usize = 100;

/// What a salvage got back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Salvaged {
    /// Intact records copied into the fresh buffer.
    pub copied: u64,
    /// What could not be given back.
    pub losses: Vec<LossReport>,
}

/// Copies every intact record still readable from `from`, in rowid (arrival) order, into
/// `into` (a fresh buffer). When `from` still tells its epoch and each stream's next sequence,
/// the fresh buffer takes them over and records keep their sequence numbers; otherwise they
/// are numbered anew under a new epoch. Reads row by row, so an unreadable page loses only the
/// rows on it; a row whose checksum fails is not copied. Leaves no file behind but the
/// quarantined one (and its WAL).
pub fn salvage(from: &Path, into: &mut Connection) -> rusqlite::Result<Salvaged> {
    let beside = |p: &Path| ["-wal", "-shm", "-journal"].map(|s| side(p, s));
    let existed: Vec<PathBuf> = beside(from).into_iter().filter(|p| p.exists()).collect();
    // A truncated file still claims its old size in its header, and SQLite then refuses every
    // page; a copy whose header leaves the size to the file lets the surviving pages be read.
    let patched = truncated_copy(from);
    let readable = patched.as_deref().unwrap_or(from);
    let result = salvage_rows(readable, into);
    if let Some(copy) = &patched {
        let _ = std::fs::remove_file(copy);
        for p in beside(copy) {
            let _ = std::fs::remove_file(p);
        }
    }
    for p in beside(from) {
        if !existed.contains(&p) || p.to_string_lossy().ends_with("-shm") {
            let _ = std::fs::remove_file(p);
        }
    }
    result
}

/// For a file shorter than its header says: a copy with the in-header size marked invalid.
fn truncated_copy(path: &Path) -> Option<PathBuf> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut header = [0u8; 100];
    let len = std::fs::metadata(path).ok()?.len();
    std::fs::File::open(path)
        .ok()?
        .read_exact(&mut header)
        .ok()?;
    let page_size = match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65_536,
        n => n as u64,
    };
    let header_pages = u32::from_be_bytes([header[28], header[29], header[30], header[31]]) as u64;
    if page_size == 0 || header_pages * page_size <= len {
        return None;
    }
    // The in-header size counts only while "version-valid-for" (92..96) equals the change
    // counter (24..28); make them differ so SQLite sizes the database from the file.
    let counter = u32::from_be_bytes([header[24], header[25], header[26], header[27]]);
    let copy = side(path, ".readable");
    std::fs::copy(path, &copy).ok()?;
    // Its WAL too: it may hold the newest commits (and where each stream's numbering stands).
    let wal = side(path, "-wal");
    if wal.exists() {
        let _ = std::fs::copy(&wal, side(&copy, "-wal"));
    }
    let patched = std::fs::OpenOptions::new()
        .write(true)
        .open(&copy)
        .and_then(|mut f| {
            f.seek(SeekFrom::Start(92))?;
            f.write_all(&counter.wrapping_add(1).to_be_bytes())
        });
    match patched {
        Ok(()) => Some(copy),
        Err(_) => {
            let _ = std::fs::remove_file(&copy);
            None
        }
    }
}

/// A stream of the damaged file, as far as it still tells.
#[derive(Debug, Clone)]
struct OldStream {
    name: String,
    next_seq: Option<u64>,
    floor: Option<u64>,
}

fn old_streams(source: &Connection) -> Option<HashMap<i64, OldStream>> {
    let row = |r: &rusqlite::Row<'_>, cols: usize| -> rusqlite::Result<(i64, OldStream)> {
        Ok((
            r.get(0)?,
            OldStream {
                name: r.get(1)?,
                next_seq: r.get::<_, Option<i64>>(2)?.map(|n| n.max(1) as u64),
                floor: if cols > 3 {
                    r.get::<_, Option<i64>>(3)?.map(|n| n.max(1) as u64)
                } else {
                    None
                },
            },
        ))
    };
    for (sql, cols) in [
        ("SELECT id, name, next_seq, floor FROM streams", 4),
        ("SELECT id, name, next_seq FROM streams", 3),
    ] {
        if let Ok(mut stmt) = source.prepare(sql) {
            return stmt
                .query_map([], |r| row(r, cols))
                .and_then(|rows| rows.collect::<rusqlite::Result<HashMap<_, _>>>())
                .ok();
        }
    }
    None
}

/// A `records` row as read off a raw page: its nine columns with the right types and a
/// checksum (rows from before checksums cannot be trusted without SQLite's b-tree).
fn raw_record(row: pages::Row) -> Option<OldRow> {
    use pages::Value::{Blob, Int, Null, Text};
    let rowid = row.rowid;
    let mut v = row.values.into_iter();
    let (
        Some(Null),
        Some(Int(stream_id)),
        Some(Int(seq)),
        Some(Text(topic)),
        Some(Int(received_at_ms)),
        Some(Blob(payload)),
    ) = (v.next(), v.next(), v.next(), v.next(), v.next(), v.next())
    else {
        return None;
    };
    let monotonic_ms = match (v.next()?, v.next()?) {
        (Int(_) | Null, Int(m)) => Some(m),
        (Int(_) | Null, Null) => None,
        _ => return None,
    };
    let Some(Int(crc)) = v.next() else {
        return None;
    };
    // Rows written before the column existed end at the checksum.
    let attributes = match v.next() {
        None | Some(Null) => None,
        Some(Blob(a)) => Some(a),
        Some(_) => return None,
    };
    Some(OldRow {
        rowid,
        stream_id,
        seq: u64::try_from(seq).ok()?,
        topic: String::from_utf8(topic).ok()?,
        received_at_ms,
        payload,
        crc: Some(crc),
        monotonic_ms,
        attributes,
    })
}

/// One row read back from the damaged file.
struct OldRow {
    rowid: i64,
    stream_id: i64,
    seq: u64,
    topic: String,
    received_at_ms: i64,
    payload: Vec<u8>,
    crc: Option<i64>,
    monotonic_ms: Option<i64>,
    attributes: Option<Vec<u8>>,
}

fn salvage_rows(from: &Path, into: &mut Connection) -> rusqlite::Result<Salvaged> {
    let now = crate::clock::now_ms();
    let unknown = || Salvaged {
        copied: 0,
        losses: vec![LossReport {
            stream: None,
            first_seq: None,
            last_seq: None,
            count: 0,
            reason: LossReason::CorruptBuffer,
            detected_at_ms: now,
        }],
    };
    let Ok(source) = Connection::open_with_flags(from, OpenFlags::SQLITE_OPEN_READ_ONLY) else {
        return Ok(unknown());
    };
    let epoch: Option<i64> = source
        .query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| {
            r.get(0)
        })
        .ok();
    let streams = old_streams(&source);
    // Records keep their identity only when the file tells the epoch and where every stream's
    // numbering stands: a new record must never reuse a sequence the ingest may have.
    let keep = epoch.is_some()
        && streams
            .as_ref()
            .is_some_and(|s| !s.is_empty() && s.values().all(|o| o.next_seq.is_some()));
    const COLUMNS: &str = "id, stream_id, seq, topic, received_at_ms, payload";
    let prepare = |filter: &str| {
        source
            .prepare(&format!(
                "SELECT {COLUMNS}, crc, monotonic_ms, attributes FROM records WHERE {filter}"
            ))
            .or_else(|_| {
                source.prepare(&format!(
                    "SELECT {COLUMNS}, crc, monotonic_ms, NULL FROM records WHERE {filter}"
                ))
            })
            .or_else(|_| {
                source.prepare(&format!(
                    "SELECT {COLUMNS}, NULL, NULL, NULL FROM records WHERE {filter}"
                ))
            })
    };
    let (Ok(mut after), Ok(mut at)) = (prepare("id > ?1 ORDER BY id LIMIT 1"), prepare("id = ?1"))
    else {
        return Ok(unknown());
    };
    let read = |r: &rusqlite::Row<'_>| -> rusqlite::Result<(i64, OldRow)> {
        Ok((
            r.get(0)?,
            OldRow {
                rowid: r.get(0)?,
                stream_id: r.get(1)?,
                seq: r.get::<_, i64>(2)?.max(0) as u64,
                topic: r.get(3)?,
                received_at_ms: r.get(4)?,
                payload: r.get(5)?,
                crc: r.get(6)?,
                monotonic_ms: r.get(7)?,
                attributes: r.get(8)?,
            },
        ))
    };
    let tx = into.transaction()?;
    if keep {
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('epoch', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [epoch],
        )?;
        for old in streams.iter().flat_map(|s| s.values()) {
            tx.execute(
                "INSERT INTO streams (name, next_seq) VALUES (?1, ?2) ON CONFLICT (name) DO UPDATE SET next_seq = excluded.next_seq",
                params![old.name, old.next_seq.unwrap_or(1) as i64],
            )?;
        }
    }
    let name_of = |stream_id: i64| {
        streams
            .as_ref()
            .and_then(|s| s.get(&stream_id))
            .map_or_else(|| format!("salvaged-{stream_id}"), |o| o.name.clone())
    };
    let mut copied = 0u64;
    // Per old stream id: the old sequence numbers given back intact.
    let mut kept: HashMap<i64, Vec<u64>> = HashMap::new();
    // Per old stream id: rows read but failing their checksum.
    let mut bad: HashMap<i64, u64> = HashMap::new();
    let mut keep_row = |row: OldRow| -> rusqlite::Result<()> {
        // The checksum covers all but the stream; a clustered rowid repeats the stream and
        // the sequence, so a flipped stream id shows there (rowids below 2^48 are older).
        let intact = row.crc.is_none_or(|c| {
            c as u32
                == super::checksum(
                    row.seq,
                    row.received_at_ms,
                    &row.topic,
                    &row.payload,
                    row.attributes.as_deref(),
                )
        }) && (row.rowid < 1 << 48
            || super::row_id(row.stream_id, row.seq) == Some(row.rowid));
        if !intact {
            *bad.entry(row.stream_id).or_default() += 1;
            return Ok(());
        }
        let name = name_of(row.stream_id);
        tx.execute(
            "INSERT INTO streams (name, next_seq) VALUES (?1, 1) ON CONFLICT (name) DO NOTHING",
            [&name],
        )?;
        let (sid, next): (i64, i64) = tx.query_row(
            "SELECT id, next_seq FROM streams WHERE name = ?1",
            [&name],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let known = keep
            && streams
                .as_ref()
                .is_some_and(|s| s.contains_key(&row.stream_id));
        let seq = if known { row.seq } else { next as u64 };
        let inserted = tx.execute(
        "INSERT OR IGNORE INTO records (id, stream_id, seq, topic, received_at_ms, payload, monotonic_ms, crc, attributes) VALUES (?8, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?9)",
        params![
            sid,
            seq as i64,
            row.topic,
            row.received_at_ms,
            row.payload,
            row.monotonic_ms,
            super::checksum(
                seq,
                row.received_at_ms,
                &row.topic,
                &row.payload,
                row.attributes.as_deref()
            ),
            super::row_id(sid, seq),
            row.attributes,
        ],
    )?;
        if inserted == 0 {
            return Ok(());
        }
        if !known {
            tx.execute(
                "UPDATE streams SET next_seq = ?2 WHERE id = ?1",
                params![sid, seq as i64 + 1],
            )?;
        }
        kept.entry(row.stream_id).or_default().push(row.seq);
        copied += 1;
        Ok(())
    };
    // Walk the table in rowid order, one region at a time: rowids below 2^48 (buffers from
    // before rowids were clustered), then each stream's ([`super::row_id`]). A read that fails
    // hit a damaged page: step over it row by row, then by growing jumps, so the rows after it
    // are still found.
    let top_stream = streams
        .as_ref()
        .and_then(|s| s.keys().max().copied())
        .unwrap_or(0)
        .clamp(64, (1 << 15) - 2);
    for region in 0..=top_stream {
        let (lo, hi) = (region << 48, ((region + 1) << 48) - 1);
        let mut last = lo;
        loop {
            // A damaged interior page can send "the next row" backwards: that is a failed
            // read too, and `last` only ever grows, so the walk ends.
            let found = match after.query_row([last], read) {
                Ok(row) if row.0 > last => Some(row),
                Err(rusqlite::Error::QueryReturnedNoRows) => None,
                Ok(_) | Err(_) => step_over(&mut at, &mut after, last, hi, read),
            };
            match found {
                Some((id, row)) if id > last && id <= hi => {
                    last = id;
                    keep_row(row)?;
                }
                _ => break,
            }
        }
    }
    // What the b-tree could not reach may still sit on leaf pages whose parents were lost: read
    // the pages themselves. Only rows whose checksum holds and whose sequence the file still
    // held undelivered (from its floor up) are taken, each once.
    if keep && let Some(streams) = &streams {
        let mut failed = None;
        // The database file only: superseded WAL frames hold rows deleted since (the walk
        // above read the WAL through SQLite).
        pages::scan(from, None, |row| {
            if failed.is_some() {
                return;
            }
            if let Some(old) = raw_record(row)
                && let Some(s) = streams.get(&old.stream_id)
                && let (Some(floor), Some(next)) = (s.floor, s.next_seq)
                && (floor..next).contains(&old.seq)
                // A row the walk already copied is ignored by the insert (same stream and seq).
                && let Err(e) = keep_row(old)
            {
                failed = Some(e);
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
    }
    // A stream's numbering goes on above everything it held, whatever its row said.
    tx.execute_batch(
        "UPDATE streams SET next_seq = MAX(next_seq, COALESCE((SELECT MAX(seq) + 1 FROM records r WHERE r.stream_id = streams.id), 1));",
    )?;
    tx.commit()?;
    let mut losses = Vec::new();
    match (&streams, keep) {
        (Some(streams), true) => {
            let mut ids: Vec<_> = streams.keys().copied().collect();
            ids.sort_unstable();
            for sid in ids {
                let old = &streams[&sid];
                let mut have = kept.remove(&sid).unwrap_or_default();
                have.sort_unstable();
                let Some(next) = old.next_seq else { continue };
                // Below the floor everything was delivered (or reported) before the damage; an
                // older file without a floor: below what was salvaged is unknown.
                let Some(floor) = old.floor.or_else(|| have.first().copied()) else {
                    continue;
                };
                let missing = missing_runs(floor, next, &have);
                losses.extend(reports(&old.name, &missing, now));
            }
        }
        _ => {
            // Identity lost: count what the file says each stream held, less what came back
            // (its rows that failed their checksum are in that difference already).
            let mut counted = false;
            for (sid, old) in streams.iter().flatten() {
                let (Some(next), Some(floor)) = (old.next_seq, old.floor) else {
                    continue;
                };
                let had = next.saturating_sub(floor);
                let back = kept.get(sid).map_or(0, |v| v.len() as u64);
                counted = true;
                bad.remove(sid);
                if had > back {
                    losses.push(LossReport {
                        stream: Some(old.name.clone()),
                        first_seq: None,
                        last_seq: None,
                        count: had - back,
                        reason: LossReason::CorruptBuffer,
                        detected_at_ms: now,
                    });
                }
            }
            if !counted {
                losses.extend(unknown().losses);
            }
        }
    }
    // Rows that failed their checksum and are not counted above. With the identity kept, every
    // record of every stream is among the missing ranges already, and a damaged row under a
    // stream id the file never had is one of them with its stream id flipped.
    for (sid, count) in bad {
        if keep {
            continue;
        }
        losses.push(LossReport {
            stream: Some(name_of(sid)),
            first_seq: None,
            last_seq: None,
            count,
            reason: LossReason::CorruptBuffer,
            detected_at_ms: now,
        });
    }
    salvage_side_tables(&source, into);
    Ok(Salvaged { copied, losses })
}

/// Copies, as far as they can be read, the file sources' positions (else every tailed file
/// would be read again from its start) and the transforms' state (open windows) into the
/// salvage.
fn salvage_side_tables(source: &Connection, into: &Connection) {
    for (table, columns) in [
        (
            "file_positions",
            "source, dev, inode, fingerprint, offset, path",
        ),
        ("transform_state", "stream, step, fingerprint, key, state"),
    ] {
        let Ok(mut stmt) = source.prepare(&format!("SELECT {columns} FROM {table}")) else {
            continue;
        };
        let n = columns.split(',').count();
        let Ok(rows) = stmt.query_map([], |r| {
            (0..n)
                .map(|i| r.get::<_, rusqlite::types::Value>(i))
                .collect::<rusqlite::Result<Vec<_>>>()
        }) else {
            continue;
        };
        let marks = vec!["?"; n].join(", ");
        let insert = format!("INSERT OR REPLACE INTO {table} ({columns}) VALUES ({marks})");
        for row in rows.flatten() {
            let _ = into.execute(&insert, rusqlite::params_from_iter(row));
        }
    }
}

/// After a read past `last` failed: the next readable row up to `hi`, looked for id by id for
/// [`SALVAGE_STEPS`] ids, then by reads past `last + 2^k` for growing k. `None` when nothing
/// readable is left below `hi`.
fn step_over<T>(
    at: &mut rusqlite::Statement<'_>,
    after: &mut rusqlite::Statement<'_>,
    last: i64,
    hi: i64,
    read: impl Fn(&rusqlite::Row<'_>) -> rusqlite::Result<T> + Copy,
) -> Option<T> {
    for id in last.saturating_add(1)..=last.saturating_add(SALVAGE_STEPS).min(hi) {
        if let Ok(row) = at.query_row([id], read) {
            return Some(row);
        }
    }
    for k in 10..63 {
        let from = last.checked_add(1i64 << k).filter(|f| *f < hi)?;
        match after.query_row([from], read) {
            Ok(row) => return Some(row),
            Err(rusqlite::Error::QueryReturnedNoRows) => return None,
            Err(_) => {}
        }
    }
    None
}

/// The runs of sequences in `floor..next` not in `have` (sorted): (first, last, count). Pure.
fn missing_runs(floor: u64, next: u64, have: &[u64]) -> Vec<(u64, u64, u64)> {
    let mut runs = Vec::new();
    let mut at = floor;
    for &seq in have.iter().filter(|&&s| s >= floor && s < next) {
        if seq > at {
            runs.push((at, seq - 1, seq - at));
        }
        at = at.max(seq + 1);
    }
    if next > at {
        runs.push((at, next - 1, next - at));
    }
    runs
}

/// Loss reports for the missing runs of one stream, at most [`MAX_REPORTS_PER_STREAM`].
fn reports(stream: &str, runs: &[(u64, u64, u64)], now: i64) -> Vec<LossReport> {
    let mut out: Vec<LossReport> = Vec::new();
    for &(first, last, count) in runs {
        if out.len() == MAX_REPORTS_PER_STREAM {
            let tail = out
                .last_mut()
                .expect("invariant: at the cap, there is a last report");
            tail.last_seq = Some(last);
            tail.count += count;
            continue;
        }
        out.push(LossReport {
            stream: Some(stream.to_owned()),
            first_seq: Some(first),
            last_seq: Some(last),
            count,
            reason: LossReason::CorruptBuffer,
            detected_at_ms: now,
        });
    }
    out
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
    /// Records whose bytes no longer match their checksum (never sent; reported lost when
    /// the agent reads them).
    pub corrupt_records: u64,
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
    let mut corrupt_records = 0;
    // A file from before attributes has no such column: NULL (none) for all its rows.
    if let Ok(mut stmt) = conn
        .prepare("SELECT seq, received_at_ms, topic, payload, crc, attributes FROM records")
        .or_else(|_| {
            conn.prepare("SELECT seq, received_at_ms, topic, payload, crc, NULL FROM records")
        })
    {
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let intact = (|| -> rusqlite::Result<bool> {
                let crc: Option<i64> = row.get(4)?;
                let seq = row.get::<_, i64>(0)? as u64;
                let received: i64 = row.get(1)?;
                let topic: String = row.get(2)?;
                let payload: Vec<u8> = row.get(3)?;
                let attributes: Option<Vec<u8>> = row.get(5)?;
                Ok(crc.is_none_or(|c| {
                    c as u32
                        == super::checksum(seq, received, &topic, &payload, attributes.as_deref())
                }))
            })();
            if !intact.unwrap_or(false) {
                corrupt_records += 1;
            }
        }
    }
    Ok(VerifyReport {
        integrity,
        epoch,
        streams,
        dead_letters,
        corrupt_records,
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
    /// Its attributes, when it has any.
    #[serde(skip_serializing_if = "super::Attributes::is_empty")]
    pub attributes: super::Attributes,
}

/// Every record (or dead letter) of a buffer file, in order, passed to `each`; read-only.
pub fn dump(
    path: &Path,
    dead_letters: bool,
    mut each: impl FnMut(DumpedRecord),
) -> rusqlite::Result<()> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let sql = if dead_letters {
        "SELECT s.name, r.seq, r.topic, r.received_at_ms, r.payload, r.status, r.reason, r.attributes FROM dead_letters r JOIN streams s ON s.id = r.stream_id ORDER BY r.id"
    } else {
        "SELECT s.name, r.seq, r.topic, r.received_at_ms, r.payload, NULL, NULL, r.attributes FROM records r JOIN streams s ON s.id = r.stream_id ORDER BY r.id"
    };
    // A file from before attributes has no such column.
    let mut stmt = conn
        .prepare(sql)
        .or_else(|_| conn.prepare(&sql.replace("r.attributes", "NULL")))?;
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
            attributes: row
                .get::<_, Option<Vec<u8>>>(7)?
                .and_then(|a| serde_json::from_slice(&a).ok())
                .unwrap_or_default(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::{Buffer, BufferStream, NewRecord, WriterCommand};
    use crate::routing::Priority;

    /// After a clean stop the full check is skipped once (the marker is taken away); a file
    /// written after the marker, or a start without one, gets the full check.
    #[test]
    fn a_clean_stop_skips_the_full_check_only_for_an_unchanged_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("buffer.db");
        {
            let conn = Connection::open(&path).expect("open");
            conn.execute_batch(
                "CREATE TABLE t (v BLOB); WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000) INSERT INTO t SELECT randomblob(200) FROM n;",
            )
            .expect("fill");
        }
        let corrupt = || {
            use std::io::{Seek, SeekFrom, Write};
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .expect("file");
            f.seek(SeekFrom::Start(4096 * 3)).expect("seek");
            f.write_all(&[0xA5; 4096 * 4]).expect("garbage");
        };
        mark_clean(&path);
        assert!(clean_marker(&path).exists());
        assert_eq!(check(&path).expect("check"), None);
        assert!(!clean_marker(&path).exists(), "used once");

        mark_clean(&path);
        corrupt();
        assert!(
            check(&path).expect("check").is_some(),
            "written after the clean stop: fully checked, and found corrupt"
        );
        assert!(
            check(&path).expect("check").is_some(),
            "no marker: fully checked"
        );
    }

    fn streams() -> Vec<BufferStream> {
        [
            ("alarms", Priority::Critical),
            ("logs", Priority::Bulk),
            (ingest_wire::LOSS_STREAM, Priority::Critical),
        ]
        .into_iter()
        .map(|(name, priority)| BufferStream {
            name: name.into(),
            priority,
            ttl: None,
        })
        .collect()
    }

    /// A buffer of 3000 records in two streams, checkpointed into its file.
    fn filled(path: &Path) -> u64 {
        let mut b = Buffer::open(path, &streams(), 1 << 30).expect("open");
        let cmds: Vec<_> = (0..3000u32)
            .map(|i| {
                WriterCommand::Append(NewRecord {
                    stream: (i % 2) as usize,
                    topic: format!("plant/{i}"),
                    payload: bytes::Bytes::from(i.to_be_bytes().repeat(50)),
                    received_at_ms: i as i64,
                    monotonic_ms: 1,
                    attributes: Default::default(),
                    receipt: None,
                })
            })
            .collect();
        b.buffer.commit(&cmds, &[], 0, false).expect("commit");
        b.buffer.checkpoint().expect("checkpoint");
        b.epoch
    }

    fn salvaged_from(damage: impl FnOnce(&mut Vec<u8>)) -> (Salvaged, u64, u64) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.db");
        let epoch = filled(&path);
        let mut bytes = std::fs::read(&path).expect("read");
        damage(&mut bytes);
        std::fs::write(&path, &bytes).expect("write");
        let o = Buffer::open(&path, &streams(), 1 << 30).expect("opens anyway");
        let q = o.quarantine.expect("quarantined");
        let held: u64 = o.buffer.progress()[..2]
            .iter()
            .map(|p| p.backlog_records)
            .sum();
        assert_eq!(held, q.salvaged);
        assert_eq!(o.epoch, epoch, "identity kept");
        (
            Salvaged {
                copied: q.salvaged,
                losses: q.losses,
            },
            held,
            epoch,
        )
    }

    #[test]
    fn a_truncated_file_gives_back_its_intact_head_and_reports_the_rest_by_range() {
        for share in [0.1, 0.5, 0.9] {
            let (s, _, _) = salvaged_from(|b| {
                let len = b.len();
                b.truncate((len as f64 * share) as usize);
            });
            let reported: u64 = s.losses.iter().map(|l| l.count).sum();
            assert_eq!(s.copied + reported, 3000, "{share}: {:?}", s.losses);
            if share > 0.4 {
                assert!(s.copied > 0, "{share}: something comes back");
            }
        }
    }

    /// Property: whatever 64 bytes a bad flash page flips in the middle third of the file, the
    /// salvage ends within seconds (CI once saw a start stall: a damaged interior page sent the
    /// walk backwards), and every record is given back or reported lost, or the file no
    /// longer tells how many it held and an uncounted loss is reported.
    #[test]
    fn flipped_bytes_anywhere_salvage_quickly_and_account_for_every_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = dir.path().join("good.db");
        filled(&good);
        let clean = std::fs::read(&good).expect("read");
        for seed in 1..=40u64 {
            let mut bytes = clean.clone();
            let len = bytes.len();
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ seed.wrapping_mul(0x1234_5678_9ABC_DEF1);
            for _ in 0..64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                bytes[len / 3 + (x as usize % (len / 3))] ^= 0x5A;
            }
            let path = dir.path().join(format!("s{seed}.db"));
            std::fs::write(&path, &bytes).expect("write");
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(
                    Buffer::open(&path, &streams(), 1 << 30)
                        .map(|o| o.quarantine.map(|q| (q.salvaged, q.losses))),
                );
            });
            let opened = rx
                .recv_timeout(std::time::Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("seed {seed}: the salvage never ended"))
                .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            let Some((copied, losses)) = opened else {
                continue; // the flips missed everything SQLite checks
            };
            let reported: u64 = losses.iter().map(|l| l.count).sum();
            let uncounted = losses.iter().any(|l| l.count == 0 && l.stream.is_none());
            assert!(
                copied + reported == 3000 || uncounted,
                "seed {seed}: {copied} copied + {reported} reported: {losses:?}"
            );
        }
    }

    /// A stop in the middle of a salvage loses nothing: an unfinished salvage beside the corrupt
    /// file is started over, and a finished one whose move into place was cut short is moved in.
    #[test]
    fn a_salvage_cut_short_is_redone_or_finished() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.db");
        let salvage = dir.path().join("b.db.salvage");
        filled(&path);
        let len = std::fs::metadata(&path).expect("meta").len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(len / 2))
            .expect("truncate");
        // Stopped while salvaging: a partial salvage file is beside the corrupt one.
        std::fs::write(&salvage, b"SQLite format 3\0 half written").expect("partial");
        let held = |o: &crate::buffer::Opened| -> u64 {
            o.buffer.progress()[..2]
                .iter()
                .map(|p| p.backlog_records)
                .sum()
        };
        let o = Buffer::open(&path, &streams(), 1 << 30).expect("opens");
        let q = o.quarantine.clone().expect("salvaged over again");
        let reported: u64 = q.losses.iter().map(|l| l.count).sum();
        assert_eq!(q.salvaged + reported, 3000);
        assert_eq!(held(&o), q.salvaged);
        let reports = o.buffer.progress()[2].backlog_records;
        assert!(reports > 0, "the loss reports are in the salvaged file");
        drop(o);
        assert!(!salvage.exists());
        // Stopped between moving the corrupt file aside and moving the salvage in.
        std::fs::rename(&path, &salvage).expect("as if not moved in yet");
        let o = Buffer::open(&path, &streams(), 1 << 30).expect("opens");
        assert_eq!(o.quarantine, None);
        assert_eq!(held(&o), q.salvaged, "the finished salvage is in place");
        assert_eq!(o.buffer.progress()[2].backlog_records, reports);
        assert!(!salvage.exists());
    }

    /// Damage the running agent meets (a read SQLite calls corrupt) marks the file; the next
    /// start salvages it even when its quick check passes, and a sound file salvaged so loses
    /// nothing.
    #[test]
    fn damage_found_while_running_is_salvaged_at_the_next_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.db");
        filled(&path);
        let names: Vec<String> = streams().into_iter().map(|s| s.name).collect();
        // Pages of the records' b-tree zeroed under a reader.
        let mut bytes = std::fs::read(&path).expect("read");
        let from = bytes.len() / 2 / 4096 * 4096;
        bytes[from..from + 4 * 4096].fill(0);
        let damaged = dir.path().join("d.db");
        std::fs::write(&damaged, &bytes).expect("write");
        let reader = crate::buffer::BufferReader::open(&damaged, &names).expect("reader");
        let error = (0..2)
            .find_map(|s| {
                reader
                    .read_batch(s, &[(1, crate::buffer::MAX_SEQ)], false, 5000, 1 << 30)
                    .err()
            })
            .expect("a read meets the damage");
        assert!(error.is_corrupt(), "{error}");
        // A sound file marked damaged: salvaged whole.
        mark_suspect(&path, "test");
        let o = Buffer::open(&path, &streams(), 1 << 30).expect("opens");
        let q = o.quarantine.clone().expect("salvaged");
        assert!(
            q.reason.contains("damage found while running"),
            "{}",
            q.reason
        );
        assert_eq!((q.salvaged, q.losses.len()), (3000, 0));
        assert!(!suspect(&path).exists());
        drop(o);
        assert_eq!(
            Buffer::open(&path, &streams(), 1 << 30)
                .expect("opens")
                .quarantine,
            None
        );
    }

    #[test]
    fn missing_runs_are_the_gaps_between_floor_and_next() {
        assert_eq!(
            missing_runs(1, 11, &[1, 2, 5, 10]),
            vec![(3, 4, 2), (6, 9, 4)]
        );
        assert_eq!(missing_runs(3, 6, &[]), vec![(3, 5, 3)]);
        assert_eq!(missing_runs(3, 6, &[1, 3, 4, 5]), vec![]);
    }
}
