//! The buffer's read side: a read-only connection that builds batches, checking every record
//! against its checksum (a damaged one is handed back for the writer to drop and report).

use super::schema::Layout;
use super::*;

/// Up to `?4` records of stream `?1` of sequences `?2..=?3`, oldest first (or newest).
pub(super) fn read_sql(layout: Layout, newest_first: bool) -> String {
    format!(
        "SELECT r.seq, r.topic, r.received_at_ms, r.payload, b.boot_id, r.monotonic_ms, r.crc, r.attributes
         FROM records r LEFT JOIN boots b ON b.id = r.boot WHERE {} ORDER BY {}{} LIMIT ?4",
        layout.seqs("r."),
        layout.order("r."),
        if newest_first { " DESC" } else { "" }
    )
}

/// The buffer's read side: a read-only connection for building batches.
pub struct BufferReader {
    conn: Connection,
    path: PathBuf,
    stream_ids: Vec<i64>,
    /// [`read_sql`] oldest first, then newest first.
    reads: [String; 2],
}

impl BufferReader {
    /// Opens a read-only connection to the buffer `path` (which [`Buffer::open`] created).
    pub fn open(path: &Path, stream_names: &[String]) -> Result<BufferReader, BufferError> {
        let sqlite = |source| BufferError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sqlite)?;
        conn.execute_batch(&format!(
            "PRAGMA cache_size=-{};",
            super::open::READER_CACHE_KIB
        ))
        .map_err(sqlite)?;
        let mut stream_ids = Vec::new();
        for name in stream_names {
            let id: Option<i64> = conn
                .query_row("SELECT id FROM streams WHERE name = ?1", [name], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(sqlite)?;
            stream_ids.push(id.ok_or_else(|| sqlite(rusqlite::Error::QueryReturnedNoRows))?);
        }
        let layout = Layout::of(&conn).map_err(sqlite)?;
        Ok(BufferReader {
            conn,
            path: path.to_owned(),
            stream_ids,
            reads: [read_sql(layout, false), read_sql(layout, true)],
        })
    }

    /// Up to `max_records` records of `stream` from `spans` (inclusive sequence ranges, read
    /// in the order given: each oldest first, or newest first with `newest_first`), stopping
    /// before `max_bytes` of topic+payload (at least one record if any).
    pub fn read_batch(
        &self,
        stream: usize,
        spans: &[(u64, u64)],
        newest_first: bool,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<ReadBatch, BufferError> {
        let sqlite = |source| BufferError::Sqlite {
            path: self.path.clone(),
            source,
        };
        let mut stmt = self
            .conn
            .prepare_cached(&self.reads[usize::from(newest_first)])
            .map_err(sqlite)?;
        let mut out = Vec::new();
        let mut corrupt = Vec::new();
        let mut bytes = 0usize;
        // The inclusive range every record of which is in `out` or not in the buffer.
        let mut covered: Option<(u64, u64)> = None;
        for &(first, last) in spans {
            let (first, last) = (first.min(MAX_SEQ), last.min(MAX_SEQ));
            let wanted = max_records - out.len();
            let mut rows = stmt
                .query(params![
                    self.stream_ids[stream],
                    first as i64,
                    last as i64,
                    wanted as i64
                ])
                .map_err(sqlite)?;
            let (mut got, mut full) = (0, false);
            while let Some(row) = rows.next().map_err(sqlite)? {
                let seq = row.get::<_, i64>(0).map_err(sqlite)? as u64;
                // A damaged row may not even read as the types it should have.
                let stored: Option<Vec<u8>> = row.get(7).ok().flatten();
                let read = (|| -> rusqlite::Result<StoredRecord> {
                    Ok(StoredRecord {
                        seq,
                        topic: row.get(1)?,
                        received_at_ms: row.get(2)?,
                        payload: row.get(3)?,
                        boot_id: row.get::<_, Option<String>>(4)?.unwrap_or_default(),
                        monotonic_ms: row.get::<_, Option<i64>>(5)?.map_or(0, |m| m as u64),
                        attributes: match &stored {
                            None => Attributes::new(),
                            Some(json) => serde_json::from_slice(json).map_err(|e| {
                                rusqlite::Error::FromSqlConversionFailure(
                                    7,
                                    rusqlite::types::Type::Blob,
                                    Box::new(e),
                                )
                            })?,
                        },
                    })
                })();
                // NULL: a record from before checksums. Anything but an integer is damage.
                let crc = match row.get_ref(6) {
                    Ok(rusqlite::types::ValueRef::Null) => Ok(None),
                    Ok(rusqlite::types::ValueRef::Integer(c)) => Ok(Some(c)),
                    _ => Err(()),
                };
                let intact = read.as_ref().is_ok_and(|r| {
                    crc.is_ok_and(|crc| {
                        crc.is_none_or(|c| {
                            c as u32
                                == checksum(
                                    r.seq,
                                    r.received_at_ms,
                                    &r.topic,
                                    &r.payload,
                                    stored.as_deref(),
                                )
                        })
                    })
                });
                if let (Ok(record), true) = (&read, intact) {
                    bytes += record.topic.len()
                        + record.payload.len()
                        + stored.as_ref().map_or(0, Vec::len);
                    if !out.is_empty() && bytes > max_bytes {
                        full = true;
                        break;
                    }
                }
                covered = Some(match (covered, newest_first) {
                    (None, false) => (first, seq),
                    (None, true) => (seq, seq),
                    (Some((lo, _)), false) => (lo, seq),
                    (Some((_, hi)), true) => (seq, hi),
                });
                got += 1;
                match read {
                    Ok(record) if intact => out.push(record),
                    // Not delivered: the writer drops it and reports it lost.
                    _ => corrupt.push(seq),
                }
            }
            full |= got == wanted;
            if newest_first && !full {
                // This span is exhausted down to its start: nothing below the last record
                // read is left in it.
                covered = covered.map(|(_, hi)| (first, hi));
            }
            if full {
                break;
            }
        }
        if newest_first {
            out.reverse();
        }
        corrupt.sort_unstable();
        Ok(ReadBatch {
            records: out,
            covered,
            corrupt,
        })
    }
}

/// What [`BufferReader::read_batch`] read.
#[derive(Debug, Default)]
pub struct ReadBatch {
    /// The records, in sequence order.
    pub records: Vec<StoredRecord>,
    /// The inclusive sequence range each record of which is in `records` or was not in the
    /// buffer (already gone); `None` when nothing was read.
    pub covered: Option<(u64, u64)>,
    /// Records that failed their checksum (not in `records`): the writer must drop and report
    /// them ([`WriterCommand::Corrupt`]) before the batch is acknowledged.
    pub corrupt: Vec<u64>,
}
