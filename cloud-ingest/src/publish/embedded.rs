//! The embedded stream log: one SQLite file (WAL, synchronous=FULL) of topics with offsets.
//!
//! Invariants, kept by a single writer thread:
//! - a batch's new records, its topic's next offset and its dedup ranges are committed in ONE
//!   transaction, so a record is in the log exactly once whatever the retries (exactly-once);
//! - offsets of a topic are dense and increase in commit order; records of a batch keep their
//!   order, so order per (device, stream) holds as long as the sender sends in order.
//!
//! Concurrent requests are group-committed: the writer takes every queued batch into one
//! transaction, so many small batches share one fsync.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use base64::Engine;
use ingest_wire::BatchAck;
use rusqlite::{Connection, OpenFlags, params};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use super::dedup::{DedupScope, RangeSet};
use super::{Delivery, PublishError, PublishFuture, Publisher};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS topics (name TEXT PRIMARY KEY, next_offset INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    offset INTEGER NOT NULL,
    device TEXT NOT NULL,
    stream TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    mqtt_topic TEXT NOT NULL,
    qos INTEGER,
    received_at_ms INTEGER NOT NULL,
    sent_at_ms INTEGER NOT NULL,
    ingested_at_ms INTEGER NOT NULL,
    payload BLOB NOT NULL,
    corrected_at_ms INTEGER,
    boot_id TEXT,
    monotonic_ms INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS records_by_offset ON records (topic, offset);
CREATE TABLE IF NOT EXISTS dedup (
    device TEXT NOT NULL, stream TEXT NOT NULL, epoch INTEGER NOT NULL,
    first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL,
    PRIMARY KEY (device, stream, epoch, first_seq)
) WITHOUT ROWID;
";

/// Most batches group-committed in one transaction.
const MAX_GROUP: usize = 256;

/// The log file cannot be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// SQLite failed on the log file; at start-up the ingest exits with this.
    #[error("embedded log {path}: {source}")]
    Sqlite {
        /// The log file.
        path: PathBuf,
        /// The SQLite error.
        #[source]
        source: rusqlite::Error,
    },
}

/// A handle to the embedded log's writer thread.
pub struct EmbeddedLog {
    jobs: mpsc::Sender<Job>,
    healthy: Arc<AtomicBool>,
}

struct Job {
    delivery: Delivery,
    reply: oneshot::Sender<Result<BatchAck, PublishError>>,
}

impl EmbeddedLog {
    /// Opens (creating if needed) the log at `path` and starts its writer thread.
    pub fn open(path: &Path) -> Result<EmbeddedLog, LogError> {
        let sqlite = |source| LogError::Sqlite {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // A missing directory surfaces as SQLite's "unable to open" below, with the path.
            let _ = std::fs::create_dir_all(dir);
        }
        let conn = Connection::open(path).map_err(sqlite)?;
        conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;")
            .and_then(|()| conn.execute_batch(SCHEMA))
            .map_err(sqlite)?;
        migrate(&conn).map_err(sqlite)?;
        let offsets = load_offsets(&conn).map_err(sqlite)?;
        let (jobs, rx) = mpsc::channel(MAX_GROUP);
        let healthy = Arc::new(AtomicBool::new(true));
        let mut writer = Writer {
            conn,
            offsets,
            dedup: HashMap::new(),
            healthy: healthy.clone(),
        };
        std::thread::Builder::new()
            .name("embedded-log".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| sqlite(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))?;
        Ok(EmbeddedLog { jobs, healthy })
    }
}

impl Publisher for EmbeddedLog {
    fn publish(&self, delivery: Delivery) -> PublishFuture<'_> {
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            let gone = || PublishError::Unavailable {
                reason: "embedded log writer stopped".into(),
            };
            self.jobs
                .send(Job { delivery, reply })
                .await
                .map_err(|_| gone())?;
            answer.await.map_err(|_| gone())?
        })
    }

    fn is_ready(&self) -> bool {
        self.healthy.load(Ordering::Relaxed) && !self.jobs.is_closed()
    }
}

struct Writer {
    conn: Connection,
    /// Next offset per topic, as committed.
    offsets: HashMap<String, u64>,
    /// Sequence ranges already in the log per idempotency scope; loaded on first use.
    dedup: HashMap<DedupScope, RangeSet>,
    healthy: Arc<AtomicBool>,
}

impl Writer {
    fn run(&mut self, mut rx: mpsc::Receiver<Job>) {
        while let Some(first) = rx.blocking_recv() {
            let mut group = vec![first];
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(job) => group.push(job),
                    Err(_) => break,
                }
            }
            match self.commit(&group) {
                Ok(acks) => {
                    self.healthy.store(true, Ordering::Relaxed);
                    for (job, ack) in group.into_iter().zip(acks) {
                        let _ = job.reply.send(Ok(ack));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, batches = group.len(), "embedded log commit failed; batches refused with 503");
                    self.healthy.store(false, Ordering::Relaxed);
                    // The caches may hold uncommitted state: rebuild them from the file.
                    self.dedup.clear();
                    if let Ok(offsets) = load_offsets(&self.conn) {
                        self.offsets = offsets;
                    }
                    for job in group {
                        let _ = job.reply.send(Err(PublishError::Unavailable {
                            reason: e.to_string(),
                        }));
                    }
                }
            }
        }
    }

    fn commit(&mut self, group: &[Job]) -> rusqlite::Result<Vec<BatchAck>> {
        let tx = self.conn.transaction()?;
        let mut acks = Vec::with_capacity(group.len());
        let mut touched_topics = Vec::new();
        let mut touched_keys = Vec::new();
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO records (topic, offset, device, stream, epoch, seq, mqtt_topic, qos, received_at_ms, sent_at_ms, ingested_at_ms, payload, corrected_at_ms, boot_id, monotonic_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            )?;
            for job in group {
                let d = &job.delivery;
                let key = d.scope();
                if !self.dedup.contains_key(&key) {
                    let ranges = load_ranges(&tx, &key)?;
                    self.dedup.insert(key.clone(), ranges);
                }
                let seen = self.dedup.get_mut(&key).expect("invariant: loaded above");
                let next = self.offsets.entry(d.topic.clone()).or_insert(0);
                let mut ack = BatchAck {
                    accepted: 0,
                    duplicates: 0,
                    dead_lettered: 0,
                };
                for r in &d.batch.records {
                    if seen.contains(r.seq) {
                        ack.duplicates += 1;
                        continue;
                    }
                    insert.execute(params![
                        d.topic,
                        *next as i64,
                        d.batch.device_id,
                        d.batch.stream,
                        d.batch.epoch as i64,
                        r.seq as i64,
                        r.topic,
                        r.qos,
                        r.received_at_ms,
                        d.batch.sent_at_ms,
                        d.ingested_at_ms,
                        r.payload.as_ref(),
                        d.corrected_at_ms(r),
                        Some(r.boot_id.as_str()).filter(|b| !b.is_empty()),
                        Some(r.monotonic_ms as i64).filter(|&m| m > 0),
                    ])?;
                    seen.insert(r.seq);
                    *next += 1;
                    ack.accepted += 1;
                }
                if ack.accepted > 0 {
                    touched_topics.push(d.topic.clone());
                    touched_keys.push(key);
                }
                acks.push(ack);
            }
        }
        touched_topics.sort();
        touched_topics.dedup();
        for topic in &touched_topics {
            tx.execute(
                "INSERT INTO topics (name, next_offset) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET next_offset = excluded.next_offset",
                params![topic, self.offsets[topic] as i64],
            )?;
        }
        touched_keys.sort();
        touched_keys.dedup();
        for key in &touched_keys {
            tx.execute(
                "DELETE FROM dedup WHERE device = ?1 AND stream = ?2 AND epoch = ?3",
                params![key.0, key.1, key.2 as i64],
            )?;
            for (first, last) in self.dedup[key].iter() {
                tx.execute(
                    "INSERT INTO dedup (device, stream, epoch, first_seq, last_seq) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![key.0, key.1, key.2 as i64, first as i64, last as i64],
                )?;
            }
        }
        tx.commit()?;
        Ok(acks)
    }
}

/// Brings a log file written by an older version up to the current schema.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    for (column, kind) in [
        ("corrected_at_ms", "INTEGER"),
        ("boot_id", "TEXT"),
        ("monotonic_ms", "INTEGER"),
    ] {
        let present: bool = conn.query_row(
            "SELECT count(*) FROM pragma_table_info('records') WHERE name = ?1",
            [column],
            |row| row.get::<_, i64>(0).map(|n| n > 0),
        )?;
        if !present {
            conn.execute_batch(&format!("ALTER TABLE records ADD COLUMN {column} {kind}"))?;
        }
    }
    Ok(())
}

fn load_offsets(conn: &Connection) -> rusqlite::Result<HashMap<String, u64>> {
    let mut stmt = conn.prepare("SELECT name, next_offset FROM topics")?;
    let rows = stmt.query_map([], |row| {
        Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)? as u64))
    })?;
    rows.collect()
}

fn load_ranges(conn: &Connection, scope: &DedupScope) -> rusqlite::Result<RangeSet> {
    let mut stmt = conn.prepare_cached(
        "SELECT first_seq, last_seq FROM dedup WHERE device = ?1 AND stream = ?2 AND epoch = ?3",
    )?;
    let mut set = RangeSet::default();
    for row in stmt.query_map(params![scope.0, scope.1, scope.2 as i64], |row| {
        Ok((row.get::<_, i64>(0)? as u64, row.get::<_, i64>(1)? as u64))
    })? {
        let (first, last) = row?;
        set.insert_range(first, last);
    }
    Ok(set)
}

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
    /// Next offset; also the number of records in the topic.
    pub end_offset: u64,
}

fn open_reader(path: &Path) -> Result<Connection, LogError> {
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
    let conn = open_reader(path)?;
    let sqlite = |source| LogError::Sqlite {
        path: path.to_owned(),
        source,
    };
    let mut stmt = conn
        .prepare(
            "SELECT offset, device, stream, seq, mqtt_topic, qos, received_at_ms, sent_at_ms, ingested_at_ms, payload, epoch, corrected_at_ms, boot_id, monotonic_ms
             FROM records WHERE topic = ?1 AND offset >= ?2 ORDER BY offset LIMIT ?3",
        )
        .map_err(sqlite)?;
    let rows = stmt
        .query_map(params![topic, from as i64, limit as i64], |row| {
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
                payload: text,
                payload_base64: b64,
            })
        })
        .map_err(sqlite)?;
    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(sqlite)
}

/// Lists the topics with their end offsets; blocking.
pub fn topics(path: &Path) -> Result<Vec<TopicInfo>, LogError> {
    let conn = open_reader(path)?;
    let sqlite = |source| LogError::Sqlite {
        path: path.to_owned(),
        source,
    };
    let mut stmt = conn
        .prepare("SELECT name, next_offset FROM topics ORDER BY name")
        .map_err(sqlite)?;
    let rows = stmt
        .query_map([], |row| {
            Ok(TopicInfo {
                topic: row.get(0)?,
                end_offset: row.get::<_, i64>(1)? as u64,
            })
        })
        .map_err(sqlite)?;
    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(sqlite)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use ingest_wire::{Batch, Record};

    use super::*;

    fn delivery(seqs: std::ops::Range<u64>) -> Delivery {
        Delivery {
            tenant: "acme".into(),
            topic: "iot.acme.t".into(),
            dead_letter_topic: "iot.acme._dead_letters".into(),
            ingested_at_ms: 3,
            clock_offset_ms: None,
            batch: Batch {
                device_id: "d1".into(),
                stream: "t".into(),
                sent_at_ms: 2,
                epoch: 0,
                records: seqs
                    .map(|seq| Record {
                        seq,
                        topic: "s/1".into(),
                        payload: Bytes::from(vec![seq as u8, 0xff]),
                        qos: Some(1),
                        received_at_ms: 1,
                        ..Default::default()
                    })
                    .collect(),
            },
        }
    }

    #[tokio::test]
    async fn replays_are_deduplicated_across_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.db");
        {
            let log = EmbeddedLog::open(&path).expect("open");
            let ack = log.publish(delivery(1..4)).await.expect("publish");
            assert_eq!((ack.accepted, ack.duplicates), (3, 0));
            let ack = log.publish(delivery(2..6)).await.expect("publish");
            assert_eq!((ack.accepted, ack.duplicates), (2, 2));
        }
        let log = EmbeddedLog::open(&path).expect("reopen");
        let ack = log.publish(delivery(1..7)).await.expect("publish");
        assert_eq!((ack.accepted, ack.duplicates), (1, 5));
        let mut next_epoch = delivery(1..3);
        next_epoch.batch.epoch = 9;
        let ack = log.publish(next_epoch).await.expect("publish");
        assert_eq!(
            (ack.accepted, ack.duplicates),
            (2, 0),
            "a new epoch is a new sequence space"
        );
        let records = read(&path, "iot.acme.t", 0, 100).expect("read");
        let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3, 4, 5, 6, 1, 2]);
        assert_eq!(records[7].epoch, 9);
        assert_eq!(
            records.iter().map(|r| r.offset).collect::<Vec<_>>(),
            (0..8).collect::<Vec<_>>()
        );
        assert_eq!(records[0].payload_base64.as_deref(), Some("Af8="));
        assert_eq!(topics(&path).expect("topics")[0].end_offset, 8);
    }
}
