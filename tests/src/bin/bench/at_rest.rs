//! Compression at rest, the design the agent does not use, measured beside the one it does.
//! Both on the agent's SQLite settings (WAL, synchronous=FULL, a passive checkpoint every
//! 500 ms from another thread), in this process, so `/proc/self/io` counts their disk writes:
//! - **rows** (the agent's buffer): one row per record, indexed by (stream, seq); batches are
//!   encoded and zstd-compressed when they are sent;
//! - **segments**: every group commit seals its records into one zstd frame (a protobuf
//!   `Batch`), and a request is those frames concatenated (the contract allows it), so nothing
//!   is compressed again on the way out.
//!
//! Per group size (records per commit: 10 ≈ 1,000 records/s, 100 ≈ 10,000 records/s at the
//! 10 ms commit window): bytes written to disk per record, wire bytes / raw bytes, and the CPU
//! per record of building 1,000-record requests from what is stored.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use e2e::load::{self, PayloadKind};
use rusqlite::{Connection, params};

/// Records per design and group size.
const RECORDS: u64 = 100_000;
/// Records per request on the way out.
const REQUEST: u64 = 1000;
const BOOT_ID: &str = "5f2c1a9e-3b7d-4e8a-9c21-0d4b6e8f1a2c";

/// One row of the table.
pub struct AtRest {
    /// "rows" or "segments".
    pub design: &'static str,
    /// Records per group commit.
    pub group: u64,
    /// Bytes written to disk per record (WAL, checkpoints, database).
    pub disk_per_record: f64,
    /// Request body bytes over topic + payload bytes.
    pub wire_ratio: f64,
    /// Time to build the requests from the stored records (one thread), µs per record.
    pub drain_us_per_record: f64,
}

fn record(i: u64) -> ingest_wire::Record {
    let client = (i % 10) as usize;
    ingest_wire::Record {
        seq: i + 1,
        topic: format!("plant/{client}/telemetry/t{}", i % 4),
        payload: Bytes::from(load::payload(PayloadKind::Json, client, i / 10, 200)),
        qos: None,
        received_at_ms: 1_795_000_000_000 + i as i64 / 10,
        boot_id: BOOT_ID.into(),
        monotonic_ms: 60_000 + i / 10,
        attributes: Vec::new(),
    }
}

fn batch(records: Vec<ingest_wire::Record>) -> ingest_wire::Batch {
    ingest_wire::Batch {
        device_id: e2e::DEVICE.into(),
        stream: "telemetry".into(),
        sent_at_ms: 1_795_000_000_000,
        epoch: 1,
        records,
    }
}

fn written() -> u64 {
    crate::network::disk_writes(std::process::id())
}

fn open(path: &Path, schema: &str) -> Connection {
    let conn = Connection::open(path).expect("open");
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA wal_autocheckpoint=0;",
    )
    .expect("pragmas");
    conn.execute_batch(schema).expect("schema");
    conn
}

/// Runs `write` with a checkpointer beside it, as the agent does; returns bytes written.
fn with_checkpoints(path: &Path, write: impl FnOnce()) -> u64 {
    let stop = Arc::new(AtomicBool::new(false));
    let (p, s) = (path.to_owned(), stop.clone());
    let checkpointer = std::thread::spawn(move || {
        let conn = Connection::open(&p).expect("open");
        while !s.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(500));
            let _ = conn.execute_batch("PRAGMA wal_checkpoint(PASSIVE);");
        }
        let _ = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);");
    });
    let before = written();
    write();
    stop.store(true, Ordering::Relaxed);
    checkpointer.join().expect("checkpointer");
    written() - before
}

fn rows(dir: &Path, group: u64) -> AtRest {
    let path = dir.join(format!("rows-{group}.db"));
    let mut conn = open(
        &path,
        "CREATE TABLE records (id INTEGER PRIMARY KEY, stream_id INTEGER NOT NULL,
            seq INTEGER NOT NULL, topic TEXT NOT NULL, received_at_ms INTEGER NOT NULL,
            payload BLOB NOT NULL, boot INTEGER, monotonic_ms INTEGER);
         CREATE UNIQUE INDEX records_by_seq ON records (stream_id, seq);",
    );
    let mut raw = 0u64;
    let disk = with_checkpoints(&path, || {
        for g in 0..RECORDS / group {
            let tx = conn.transaction().expect("tx");
            {
                let mut insert = tx
                    .prepare_cached(
                        "INSERT INTO records (stream_id, seq, topic, received_at_ms, payload, boot, monotonic_ms)
                         VALUES (1, ?1, ?2, ?3, ?4, 1, ?5)",
                    )
                    .expect("prepare");
                for i in g * group..(g + 1) * group {
                    let r = record(i);
                    raw += (r.topic.len() + r.payload.len()) as u64;
                    insert
                        .execute(params![
                            r.seq as i64,
                            r.topic,
                            r.received_at_ms,
                            r.payload.as_ref(),
                            r.monotonic_ms as i64
                        ])
                        .expect("insert");
                }
            }
            tx.commit().expect("commit");
        }
    });
    let started = Instant::now();
    let mut wire = 0u64;
    let mut stmt = conn
        .prepare(
            "SELECT seq, topic, received_at_ms, payload, monotonic_ms FROM records
             WHERE stream_id = 1 AND seq > ?1 ORDER BY seq LIMIT ?2",
        )
        .expect("prepare");
    let mut after = 0i64;
    loop {
        let records: Vec<ingest_wire::Record> = stmt
            .query_map(params![after, REQUEST as i64], |row| {
                Ok(ingest_wire::Record {
                    seq: row.get::<_, i64>(0)? as u64,
                    topic: row.get(1)?,
                    received_at_ms: row.get(2)?,
                    payload: Bytes::from(row.get::<_, Vec<u8>>(3)?),
                    monotonic_ms: row.get::<_, i64>(4)? as u64,
                    boot_id: BOOT_ID.into(),
                    qos: None,
                    attributes: Vec::new(),
                })
            })
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        let Some(last) = records.last() else { break };
        after = last.seq as i64;
        let body =
            ingest_wire::compress(&ingest_wire::encode_batch(&batch(records)), 1).expect("zstd");
        wire += body.len() as u64;
    }
    AtRest {
        design: "rows",
        group,
        disk_per_record: disk as f64 / RECORDS as f64,
        wire_ratio: wire as f64 / raw as f64,
        drain_us_per_record: started.elapsed().as_secs_f64() * 1e6 / RECORDS as f64,
    }
}

fn segments(dir: &Path, group: u64) -> AtRest {
    let path = dir.join(format!("segments-{group}.db"));
    let mut conn = open(
        &path,
        "CREATE TABLE segments (id INTEGER PRIMARY KEY, stream_id INTEGER NOT NULL,
            first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL, frame BLOB NOT NULL);
         CREATE UNIQUE INDEX segments_by_seq ON segments (stream_id, first_seq);",
    );
    let mut raw = 0u64;
    let disk = with_checkpoints(&path, || {
        for g in 0..RECORDS / group {
            let records: Vec<_> = (g * group..(g + 1) * group).map(record).collect();
            raw += records
                .iter()
                .map(|r| (r.topic.len() + r.payload.len()) as u64)
                .sum::<u64>();
            let (first, last) = (records[0].seq, records[records.len() - 1].seq);
            let frame = ingest_wire::compress(&ingest_wire::encode_batch(&batch(records)), 1)
                .expect("zstd");
            let tx = conn.transaction().expect("tx");
            tx.execute(
                "INSERT INTO segments (stream_id, first_seq, last_seq, frame) VALUES (1, ?1, ?2, ?3)",
                params![first as i64, last as i64, frame],
            )
            .expect("insert");
            tx.commit().expect("commit");
        }
    });
    let started = Instant::now();
    let mut wire = 0u64;
    let mut stmt = conn
        .prepare(
            "SELECT last_seq, frame FROM segments WHERE stream_id = 1 AND first_seq > ?1
             ORDER BY first_seq LIMIT ?2",
        )
        .expect("prepare");
    let mut after = 0i64;
    loop {
        let frames: Vec<(i64, Vec<u8>)> = stmt
            .query_map(params![after, (REQUEST / group).max(1) as i64], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        let Some(&(last, _)) = frames.last() else {
            break;
        };
        after = last;
        let body: Vec<u8> = frames.into_iter().flat_map(|(_, f)| f).collect();
        wire += body.len() as u64;
    }
    AtRest {
        design: "segments",
        group,
        disk_per_record: disk as f64 / RECORDS as f64,
        wire_ratio: wire as f64 / raw as f64,
        drain_us_per_record: started.elapsed().as_secs_f64() * 1e6 / RECORDS as f64,
    }
}

/// Both designs at 10 and 100 records per commit.
pub fn measure() -> Vec<AtRest> {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut out = Vec::new();
    for group in [10, 100] {
        out.push(rows(dir.path(), group));
        out.push(segments(dir.path(), group));
    }
    out
}
