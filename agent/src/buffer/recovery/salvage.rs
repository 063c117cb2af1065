//! The salvage: every row a damaged file still gives back, checksum-verified, copied into a
//! fresh buffer with its identity (epoch, stream, sequence), and what it held but could not
//! give back reported lost (`corrupt_buffer`) with the sequence ranges the file still tells.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ingest_wire::{LossReason, LossReport};
use rusqlite::{Connection, OpenFlags, params};

use super::pages;
use crate::buffer::space::side;

/// Rowids tried one by one past a damaged page before the salvage jumps further ahead.
pub(super) const SALVAGE_STEPS: i64 = 1024;
/// Most loss reports one salvage writes per stream; further missing runs are merged into the
/// last one.
pub(super) const MAX_REPORTS_PER_STREAM: usize = 100;

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
pub(super) fn truncated_copy(path: &Path) -> Option<PathBuf> {
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
pub(super) struct OldStream {
    name: String,
    next_seq: Option<u64>,
    floor: Option<u64>,
}

pub(super) fn old_streams(source: &Connection) -> Option<HashMap<i64, OldStream>> {
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
pub(super) fn raw_record(row: pages::Row) -> Option<OldRow> {
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
pub(super) struct OldRow {
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

pub(super) fn salvage_rows(from: &Path, into: &mut Connection) -> rusqlite::Result<Salvaged> {
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
                == crate::buffer::checksum(
                    row.seq,
                    row.received_at_ms,
                    &row.topic,
                    &row.payload,
                    row.attributes.as_deref(),
                )
        }) && (row.rowid < 1 << 48
            || crate::buffer::row_id(row.stream_id, row.seq) == Some(row.rowid));
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
        let Some(id) = crate::buffer::row_id(sid, seq) else {
            // A sequence past 2^48 (a damaged row of a file from before checksums): its rowid
            // would land in another stream's range.
            *bad.entry(row.stream_id).or_default() += 1;
            return Ok(());
        };
        let inserted = tx.execute(
        "INSERT OR IGNORE INTO records (id, stream_id, seq, topic, received_at_ms, payload, monotonic_ms, crc, attributes) VALUES (?8, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?9)",
        params![
            sid,
            seq as i64,
            row.topic,
            row.received_at_ms,
            row.payload,
            row.monotonic_ms,
            crate::buffer::checksum(
                seq,
                row.received_at_ms,
                &row.topic,
                &row.payload,
                row.attributes.as_deref()
            ),
            id,
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
    // before rowids were clustered), then each stream's ([`crate::buffer::row_id`]). A read that fails
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
    // (A salvaged file's records all have their stream and sequence as their rowid.)
    let rows = crate::buffer::Layout::Rowid;
    tx.execute_batch(&format!(
        "UPDATE streams SET next_seq = MAX(next_seq, COALESCE((SELECT r.seq + 1 FROM records r WHERE {} ORDER BY {} DESC LIMIT 1), 1));",
        rows.stream("r.", "streams.id"),
        rows.order("r.")
    ))?;
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
pub(super) fn salvage_side_tables(source: &Connection, into: &Connection) {
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
pub(super) fn step_over<T>(
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
pub(super) fn missing_runs(floor: u64, next: u64, have: &[u64]) -> Vec<(u64, u64, u64)> {
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
pub(super) fn reports(stream: &str, runs: &[(u64, u64, u64)], now: i64) -> Vec<LossReport> {
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
