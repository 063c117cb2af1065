//! The offline `edge-agent buffer verify|dump`: what a buffer file holds, read-only, for an
//! operator (a stopped agent's buffer, or a quarantined one).

use std::path::Path;

use rusqlite::{Connection, OpenFlags};
use serde::Serialize;

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
    let layout = crate::buffer::Layout::of(&conn)?;
    let mut stmt = conn.prepare(&format!(
        "SELECT s.name, (SELECT COUNT(*) FROM records r WHERE {}), s.next_seq FROM streams s ORDER BY s.id",
        layout.stream("r.", "s.id")
    ))?;
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
                        == crate::buffer::checksum(
                            seq,
                            received,
                            &topic,
                            &payload,
                            attributes.as_deref(),
                        )
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
    #[serde(skip_serializing_if = "crate::buffer::Attributes::is_empty")]
    pub attributes: crate::buffer::Attributes,
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
