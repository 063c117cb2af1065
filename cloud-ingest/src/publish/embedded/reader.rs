//! Reading the embedded log (the read API's side): the topics and their offsets, and a topic's
//! records from an offset, on a read-only connection that never blocks the writer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::Serialize;

use super::LogError;
use super::layout::{Layout, OFFSET_LIMIT};

/// One record as read back from the embedded log.
#[derive(Debug, Clone, Serialize)]
pub struct LogRecord {
    /// Offset within its topic.
    pub offset: u64,
    /// Record key: the device id.
    pub key: String,
    /// Stream name.
    pub stream: String,
    /// The sender's sequence epoch.
    pub epoch: u64,
    /// Sequence number within (device, stream, epoch).
    pub seq: u64,
    /// MQTT topic it was published on.
    pub mqtt_topic: String,
    /// MQTT QoS, when the sender knew it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qos: Option<u32>,
    /// Agent receive time, Unix ms.
    pub received_at_ms: i64,
    /// Agent send time of its batch, Unix ms.
    pub sent_at_ms: i64,
    /// Ingest receive time, Unix ms.
    pub ingested_at_ms: i64,
    /// `received_at_ms` on the ingest's clock, present only when the agent's clock was off by
    /// more than `clock_skew_threshold`; `received_at_ms` is then the agent's original.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrected_at_ms: Option<i64>,
    /// Whether `corrected_at_ms` was set (the agent's clock was off).
    pub clock_corrected: bool,
    /// The agent host's boot id when it received the record, when the sender gave it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// Milliseconds since that boot, when the sender gave it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub monotonic_ms: Option<u64>,
    /// The attributes the sender attached (`wire/SPEC.md`), by name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
    /// The payload as text, when it is valid UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    /// The payload in standard base64, when it is not valid UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_base64: Option<String>,
}

/// A topic and its end offset (the offset the next record will get).
#[derive(Debug, Clone, Serialize)]
pub struct TopicInfo {
    /// Topic name.
    pub topic: String,
    /// The offset the next record will get; also the number of records ever appended.
    pub end_offset: u64,
    /// The oldest offset still held (retention deletes from the front); `end_offset` when
    /// the topic holds nothing.
    pub start_offset: u64,
    /// Payload bytes held.
    pub bytes: u64,
}

/// The columns [`log_record`] reads, in its order.
pub(super) const COLUMNS: &str = "offset, device, stream, seq, mqtt_topic, qos, received_at_ms, sent_at_ms, ingested_at_ms, payload, epoch, corrected_at_ms, boot_id, monotonic_ms, attributes";

pub(super) fn open_reader(path: &Path) -> Result<Connection, LogError> {
    Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| LogError::Sqlite {
        path: path.to_owned(),
        source,
    })
}

/// Reads up to `limit` records of `topic` from offset `from` on; blocking.
pub fn read(path: &Path, topic: &str, from: u64, limit: usize) -> Result<Vec<LogRecord>, LogError> {
    let mut out = Vec::new();
    Reader::open(path)?.each(topic, from, limit, u64::MAX, |r| {
        out.push(r);
        true
    })?;
    Ok(out)
}

/// A read-only connection to the log file, for the read API and the CLI.
pub struct Reader {
    conn: Connection,
    layout: Layout,
    path: PathBuf,
}

impl Reader {
    /// Opens the log at `path` read-only; blocking.
    pub fn open(path: &Path) -> Result<Reader, LogError> {
        let conn = open_reader(path)?;
        let layout = Layout::of(&conn).map_err(|source| LogError::Sqlite {
            path: path.to_owned(),
            source,
        })?;
        Ok(Reader {
            conn,
            layout,
            path: path.to_owned(),
        })
    }

    /// Hands `f` the records of `topic` from offset `from` on, one at a time, in offset order:
    /// at most `limit`, and no more once their payloads reach `max_bytes` (the first record
    /// always comes, whatever its size), or until `f` answers false. Memory: one record at a
    /// time. Blocking.
    pub fn each(
        &self,
        topic: &str,
        from: u64,
        limit: usize,
        max_bytes: u64,
        mut f: impl FnMut(LogRecord) -> bool,
    ) -> Result<(), LogError> {
        let sqlite = |source| LogError::Sqlite {
            path: self.path.clone(),
            source,
        };
        let id = match self.layout {
            Layout::Rowid => {
                let id: Option<i64> = self
                    .conn
                    .query_row("SELECT id FROM topics WHERE name = ?1", [topic], |row| {
                        row.get(0)
                    })
                    .optional()
                    .map_err(sqlite)?
                    .flatten();
                match id {
                    Some(id) => id as u64,
                    None => return Ok(()),
                }
            }
            Layout::Indexed => 0,
        };
        if self.layout == Layout::Rowid && from >= OFFSET_LIMIT {
            return Ok(());
        }
        let mut stmt = self
            .conn
            .prepare(&self.layout.read(COLUMNS))
            .map_err(sqlite)?;
        let mut rows = stmt
            .query(params![
                self.layout.topic(topic, id),
                from.min(i64::MAX as u64) as i64,
                i64::MAX,
                limit as i64
            ])
            .map_err(sqlite)?;
        let mut bytes = 0u64;
        while let Some(row) = rows.next().map_err(sqlite)? {
            let record = log_record(row).map_err(sqlite)?;
            let size = record.payload.as_ref().map_or(0, String::len)
                + record.payload_base64.as_ref().map_or(0, String::len)
                + record
                    .attributes
                    .iter()
                    .map(|(k, v)| k.len() + v.len())
                    .sum::<usize>();
            if bytes > 0 && bytes + size as u64 > max_bytes {
                break;
            }
            bytes += size as u64;
            if !f(record) {
                break;
            }
        }
        Ok(())
    }
}

pub(super) fn log_record(row: &rusqlite::Row<'_>) -> rusqlite::Result<LogRecord> {
    let payload: Vec<u8> = row.get(9)?;
    let (text, b64) = match String::from_utf8(payload) {
        Ok(text) => (Some(text), None),
        Err(e) => (
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(e.as_bytes())),
        ),
    };
    Ok(LogRecord {
        offset: row.get::<_, i64>(0)? as u64,
        key: row.get(1)?,
        stream: row.get(2)?,
        epoch: row.get::<_, i64>(10)? as u64,
        seq: row.get::<_, i64>(3)? as u64,
        mqtt_topic: row.get(4)?,
        qos: row.get(5)?,
        received_at_ms: row.get(6)?,
        sent_at_ms: row.get(7)?,
        ingested_at_ms: row.get(8)?,
        corrected_at_ms: row.get(11)?,
        clock_corrected: row.get::<_, Option<i64>>(11)?.is_some(),
        boot_id: row.get(12)?,
        monotonic_ms: row.get::<_, Option<i64>>(13)?.map(|m| m as u64),
        attributes: row
            .get::<_, Option<String>>(14)?
            .and_then(|json| serde_json::from_str(&json).ok())
            .unwrap_or_default(),
        payload: text,
        payload_base64: b64,
    })
}

/// Lists the topics with their end offsets; blocking.
pub fn topics(path: &Path) -> Result<Vec<TopicInfo>, LogError> {
    let conn = open_reader(path)?;
    let sqlite = |source| LogError::Sqlite {
        path: path.to_owned(),
        source,
    };
    let listed = || -> rusqlite::Result<Vec<TopicInfo>> {
        let layout = Layout::of(&conn)?;
        // An older version's log may not have the id column yet (the writer adds it).
        let id = match layout {
            Layout::Rowid => "id",
            Layout::Indexed => "0",
        };
        let mut stmt = conn.prepare(&format!(
            "SELECT name, next_offset, bytes, {id} FROM topics ORDER BY name"
        ))?;
        let mut rows = stmt.query([])?;
        let mut topics = Vec::new();
        while let Some(row) = rows.next()? {
            let name: String = row.get(0)?;
            let end_offset = row.get::<_, i64>(1)? as u64;
            let first = super::first_offset(&conn, layout, &name, row.get::<_, i64>(3)? as u64)?;
            topics.push(TopicInfo {
                topic: name,
                end_offset,
                start_offset: first.unwrap_or(end_offset),
                bytes: row.get::<_, i64>(2)? as u64,
            });
        }
        Ok(topics)
    };
    listed().map_err(sqlite)
}
