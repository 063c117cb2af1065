//! The embedded stream log: one SQLite file (WAL, synchronous=FULL) of topics with offsets.
//!
//! Invariants, kept by a single writer thread:
//! - a batch's new records, its topic's next offset and its dedup ranges are committed in ONE
//!   transaction, so a record is in the log exactly once whatever the retries (exactly-once);
//! - offsets of a topic are dense and increase in commit order; records of a batch keep their
//!   order, so order per (device, stream) holds as long as the sender sends in order.
//!
//! Bounds, each checked before anything of a batch is written (`Writer::no_room`): a tenant
//! creates at most `max_topics_per_tenant` topics (counted from the topics that recorded their
//! tenant: those created since the limit exists; topics are never deleted, retention only
//! empties them), else `PublishError::Refused` (400: the sender dead-letters that batch, its
//! other streams go on); a new log holds at most [`MAX_TOPICS`] topics and 2^43 offsets a
//! topic (`layout`), else `PublishError::Full` (503 with the reason).
//!
//! Concurrent requests are group-committed: the writer takes every queued batch into one
//! transaction, so many small batches share one fsync. A commit writes only the dedup ranges
//! it changed, so a scope with many ranges (sparse sequence numbers) does not slow it down.
//!
//! Retention ([`Retention`]: `max_age` and `max_bytes_per_topic`, both off by default, so an
//! upgrade deletes nothing it was not asked to; the shipped config keeps 7 days): every
//! 10 s the writer deletes, per topic and oldest first, the records ingested before the age
//! limit and those past the topic's byte limit, in small transactions. Offsets are never
//! reused: a topic's first offset grows (`GET /v1/log` shows `start_offset`). The dedup ranges
//! stay, so a late retry of a deleted record is still recognised and not appended again.
//!
//! Where a topic's records are in the file (a range of rowids, or an older log's index) is
//! `layout`; the read side (the read API's topics and records, on a read-only connection) is
//! `reader`.

mod layout;
mod reader;

pub use layout::MAX_TOPICS;
pub use reader::{LogRecord, Reader, TopicInfo, read, topics};

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ingest_wire::BatchAck;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

use super::dedup::{DedupScope, RangeSet};
use super::{DEDUP_CACHE_SCOPES, Delivery, PublishError, PublishFuture, Publisher};
use crate::config::Retention;
use layout::{Layout, OFFSET_LIMIT};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS topics (name TEXT PRIMARY KEY, next_offset INTEGER NOT NULL, bytes INTEGER NOT NULL DEFAULT 0, id INTEGER, tenant TEXT) WITHOUT ROWID;
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
    monotonic_ms INTEGER,
    attributes TEXT
);
CREATE TABLE IF NOT EXISTS dedup (
    device TEXT NOT NULL, stream TEXT NOT NULL, epoch INTEGER NOT NULL,
    first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL,
    PRIMARY KEY (device, stream, epoch, first_seq)
) WITHOUT ROWID;
";

/// Most batches group-committed in one transaction.
const MAX_GROUP: usize = 256;

/// How often the retention is applied.
const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Most records one retention transaction deletes.
const SWEEP_CHUNK: u64 = 10_000;

/// Most records one sweep deletes (appends wait while it runs).
const SWEEP_BUDGET: u64 = 100_000;

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
    jobs: mpsc::Sender<Work>,
    healthy: Arc<AtomicBool>,
}

/// What the writer thread does next.
enum Work {
    /// Append a batch and answer.
    Append(Job),
    /// Apply the retention (sent by a ticker every [`SWEEP_INTERVAL`]).
    Sweep,
}

struct Job {
    delivery: Delivery,
    reply: oneshot::Sender<Result<BatchAck, PublishError>>,
}

impl EmbeddedLog {
    /// Opens (creating if needed) the log at `path` and starts its writer thread, which also
    /// applies `retention` and refuses a tenant's topics past `max_topics_per_tenant`.
    pub fn open(
        path: &Path,
        retention: Retention,
        max_topics_per_tenant: u64,
    ) -> Result<EmbeddedLog, LogError> {
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
            .map_err(sqlite)?;
        let mut writer = Writer::new(conn, retention, max_topics_per_tenant).map_err(sqlite)?;
        // SQLite syncs with fdatasync (`.cargo/config.toml`), its syncs of the directory too,
        // and what an fdatasync of a directory makes durable is up to the file system: the
        // entries of the log and of its WAL (there once the writer has read the log) are made
        // durable here, with an fsync of the directory (best effort, like SQLite's own).
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        match writer.layout {
            Layout::Rowid => {
                tracing::info!(path = %path.display(), "embedded log: records found by rowid")
            }
            Layout::Indexed => {
                tracing::info!(path = %path.display(), "embedded log: records found through the (topic, offset) index an older version created")
            }
        }
        let (jobs, rx) = mpsc::channel(MAX_GROUP);
        let healthy = writer.healthy.clone();
        std::thread::Builder::new()
            .name("embedded-log".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| sqlite(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))?;
        if retention != Retention::default() {
            let ticker = jobs.downgrade();
            std::thread::Builder::new()
                .name("embedded-log-retention".into())
                .spawn(move || {
                    // Ends once the log is dropped (no strong sender left).
                    loop {
                        std::thread::sleep(SWEEP_INTERVAL);
                        match ticker.upgrade() {
                            Some(jobs) if jobs.blocking_send(Work::Sweep).is_ok() => {}
                            _ => return,
                        }
                    }
                })
                .map_err(|e| sqlite(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))?;
        }
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
                .send(Work::Append(Job { delivery, reply }))
                .await
                .map_err(|_| gone())?;
            answer.await.map_err(|_| gone())?
        })
    }

    fn is_ready(&self) -> bool {
        self.healthy.load(Ordering::Relaxed) && !self.jobs.is_closed()
    }
}

/// A topic's state as committed.
#[derive(Debug, Clone, Copy, Default)]
struct TopicState {
    /// Its number in the rowids of its records (Rowid layout; 0 in an indexed log).
    id: u64,
    /// The offset the next record gets.
    next_offset: u64,
    /// Payload and attribute bytes the topic holds (for `max_bytes_per_topic`).
    bytes: u64,
}

/// A scope's ranges in memory, and when a commit last used them.
struct CachedScope {
    set: RangeSet,
    last_used: u64,
}

/// What one commit changed in a scope's ranges: the rows to delete and the sequence numbers
/// whose ranges to write.
#[derive(Default)]
struct ScopeChanges {
    removed_firsts: Vec<u64>,
    inserted: Vec<u64>,
}

struct Writer {
    conn: Connection,
    layout: Layout,
    /// Per topic, as committed.
    topics: HashMap<String, TopicState>,
    /// The id the next new topic gets (Rowid layout).
    next_topic_id: u64,
    /// Topics per tenant (those created since topics record their tenant).
    tenants: HashMap<String, u64>,
    max_topics_per_tenant: u64,
    /// Sequence ranges already in the log per idempotency scope; loaded on first use, at most
    /// [`DEDUP_CACHE_SCOPES`] kept (the least recently used are reloaded when needed).
    dedup: HashMap<DedupScope, CachedScope>,
    /// Commits so far (for `last_used`).
    tick: u64,
    retention: Retention,
    healthy: Arc<AtomicBool>,
    /// The caches may hold what a failed transaction left and could not be rebuilt then: the
    /// next commit or sweep rebuilds them first, and fails if it cannot.
    stale: bool,
}

impl Writer {
    /// Brings the log `conn` opened up to the current schema and loads its topics. A new log
    /// gets the Rowid layout; a log an older version created keeps its index.
    fn new(
        conn: Connection,
        retention: Retention,
        max_topics_per_tenant: u64,
    ) -> rusqlite::Result<Writer> {
        conn.execute_batch(SCHEMA)?;
        migrate(&conn)?;
        let topics = load_topics(&conn)?;
        Ok(Writer {
            layout: Layout::of(&conn)?,
            next_topic_id: next_topic_id(&topics),
            tenants: load_tenants(&conn)?,
            max_topics_per_tenant,
            topics,
            conn,
            dedup: HashMap::new(),
            tick: 0,
            retention,
            healthy: Arc::new(AtomicBool::new(true)),
            stale: false,
        })
    }

    fn run(&mut self, mut rx: mpsc::Receiver<Work>) {
        let mut sweep = false;
        while let Some(first) = rx.blocking_recv() {
            let mut group = Vec::new();
            let mut next = Some(first);
            while let Some(work) = next.take() {
                match work {
                    Work::Append(job) => group.push(job),
                    Work::Sweep => sweep = true,
                }
                if group.len() < MAX_GROUP {
                    next = rx.try_recv().ok();
                }
            }
            if !group.is_empty() {
                self.append(group);
            }
            if std::mem::take(&mut sweep)
                && let Err(e) = self.sweep()
            {
                tracing::error!(error = %e, "embedded log retention failed; retried at the next sweep");
                self.reload();
            }
        }
    }

    fn append(&mut self, group: Vec<Job>) {
        match self.commit(&group) {
            Ok(answers) => {
                self.healthy.store(true, Ordering::Relaxed);
                // A refusal is logged where it is answered (`api::post_batch`).
                for (job, answer) in group.into_iter().zip(answers) {
                    let _ = job.reply.send(answer);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, batches = group.len(), "embedded log commit failed; batches refused with 503");
                self.healthy.store(false, Ordering::Relaxed);
                self.reload();
                for job in group {
                    let _ = job.reply.send(Err(PublishError::Unavailable {
                        reason: e.to_string(),
                    }));
                }
            }
        }
    }

    /// Why the log will not take `fresh` new records of `d`, if it will not: a tenant's new
    /// topic past `max_topics_per_tenant` ([`PublishError::Refused`]: that stream only); Rowid
    /// layout, a new topic past [`MAX_TOPICS`] or offsets past 2^43 ([`PublishError::Full`]).
    fn no_room(&self, d: &Delivery, fresh: u64) -> Option<PublishError> {
        let rowid = self.layout == Layout::Rowid;
        match self.topics.get(&d.topic) {
            None => {
                let held = self.tenants.get(&d.tenant).copied().unwrap_or(0);
                if held >= self.max_topics_per_tenant {
                    Some(PublishError::Refused {
                        reason: format!(
                            "tenant {} has {held} topics in the embedded log, its limit (sink.options.max_topics_per_tenant): stream {} is not created; send to fewer streams or raise the limit",
                            d.tenant, d.batch.stream
                        ),
                    })
                } else if rowid && self.next_topic_id > MAX_TOPICS {
                    Some(PublishError::Full {
                        reason: format!(
                            "the embedded log holds {MAX_TOPICS} topics, its limit: topic {} is not created; use Kafka or NATS for more",
                            d.topic
                        ),
                    })
                } else {
                    None
                }
            }
            Some(t) if rowid && t.next_offset + fresh > OFFSET_LIMIT => Some(PublishError::Full {
                reason: format!(
                    "topic {} has used the {OFFSET_LIMIT} offsets a topic of the embedded log has; use Kafka or NATS for it",
                    d.topic
                ),
            }),
            Some(_) => None,
        }
    }

    /// After a failed transaction the caches may hold uncommitted state: rebuild them from the
    /// file. If that fails too, they stay marked stale and the next commit or sweep tries again
    /// first.
    fn reload(&mut self) {
        if let Err(e) = self.rebuild_caches() {
            tracing::error!(error = %e, "embedded log: its caches could not be rebuilt after a failure; the next commit or sweep tries again first");
        }
    }

    /// Rebuilds the caches if they are stale ([`Writer::reload`]).
    fn fresh_caches(&mut self) -> rusqlite::Result<()> {
        if self.stale {
            self.rebuild_caches()?;
        }
        Ok(())
    }

    fn rebuild_caches(&mut self) -> rusqlite::Result<()> {
        self.stale = true;
        self.dedup.clear();
        let topics = load_topics(&self.conn)?;
        let tenants = load_tenants(&self.conn)?;
        self.next_topic_id = next_topic_id(&topics);
        self.topics = topics;
        self.tenants = tenants;
        self.stale = false;
        Ok(())
    }

    /// Appends the new records of every job in one transaction; a job the log will not take
    /// ([`Writer::no_room`]) is answered with why, and nothing of it is written.
    fn commit(&mut self, group: &[Job]) -> rusqlite::Result<Vec<Result<BatchAck, PublishError>>> {
        self.fresh_caches()?;
        self.tick += 1;
        let tick = self.tick;
        // Unchecked: the checks on `self` below borrow it while the transaction is open (the
        // writer thread alone uses the connection).
        let tx = self.conn.unchecked_transaction()?;
        let mut acks = Vec::with_capacity(group.len());
        let mut touched_topics = Vec::new();
        let mut changes: HashMap<DedupScope, ScopeChanges> = HashMap::new();
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO records (id, topic, offset, device, stream, epoch, seq, mqtt_topic, qos, received_at_ms, sent_at_ms, ingested_at_ms, payload, corrected_at_ms, boot_id, monotonic_ms, attributes)
                 VALUES (?17, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
            )?;
            for job in group {
                let d = &job.delivery;
                let key = d.scope();
                if !self.dedup.contains_key(&key) {
                    let set = load_ranges(&tx, &key)?;
                    self.dedup
                        .insert(key.clone(), CachedScope { set, last_used: 0 });
                }
                let cached = self.dedup.get_mut(&key).expect("invariant: loaded above");
                cached.last_used = tick;
                let fresh = d
                    .batch
                    .records
                    .iter()
                    .filter(|r| !cached.set.contains(r.seq))
                    .count() as u64;
                if fresh == 0 {
                    // Nothing new: no topic is created for it.
                    acks.push(Ok(BatchAck {
                        accepted: 0,
                        duplicates: d.batch.records.len() as u64,
                        dead_lettered: 0,
                    }));
                    continue;
                }
                if let Some(refusal) = self.no_room(d, fresh) {
                    acks.push(Err(refusal));
                    continue;
                }
                let seen = &mut self
                    .dedup
                    .get_mut(&key)
                    .expect("invariant: loaded above")
                    .set;
                let (layout, next_topic_id) = (self.layout, &mut self.next_topic_id);
                let tenants = &mut self.tenants;
                let topic = self.topics.entry(d.topic.clone()).or_insert_with(|| {
                    *tenants.entry(d.tenant.clone()).or_default() += 1;
                    let id = match layout {
                        Layout::Rowid => std::mem::replace(next_topic_id, *next_topic_id + 1),
                        Layout::Indexed => 0,
                    };
                    TopicState {
                        id,
                        ..TopicState::default()
                    }
                });
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
                    let attributes = attributes_json(&r.attributes);
                    let attributes_bytes = attributes.as_ref().map_or(0, String::len);
                    insert.execute(params![
                        d.topic,
                        topic.next_offset as i64,
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
                        attributes,
                        layout.row_id(topic.id, topic.next_offset),
                    ])?;
                    let change = changes.entry(key.clone()).or_default();
                    change.removed_firsts.extend(seen.insert(r.seq));
                    change.inserted.push(r.seq);
                    topic.next_offset += 1;
                    topic.bytes += (r.payload.len() + attributes_bytes) as u64;
                    ack.accepted += 1;
                }
                if ack.accepted > 0 {
                    touched_topics.push((d.topic.clone(), d.tenant.clone()));
                }
                acks.push(Ok(ack));
            }
        }
        touched_topics.sort();
        touched_topics.dedup();
        for (name, tenant) in &touched_topics {
            let t = self.topics[name];
            tx.execute(
                "INSERT INTO topics (name, next_offset, bytes, id, tenant) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (name) DO UPDATE SET next_offset = excluded.next_offset, bytes = excluded.bytes",
                params![name, t.next_offset as i64, t.bytes as i64, t.id as i64, tenant],
            )?;
        }
        // Only the ranges this commit changed are written: a scope with many ranges (sparse
        // sequence numbers) costs each commit what the commit added, not what the scope holds.
        for (key, change) in &changes {
            let set = &self.dedup[key].set;
            let current: std::collections::BTreeMap<u64, u64> = change
                .inserted
                .iter()
                .filter_map(|&seq| set.range_of(seq))
                .collect();
            for first in &change.removed_firsts {
                if !current.contains_key(first) {
                    tx.execute(
                        "DELETE FROM dedup WHERE device = ?1 AND stream = ?2 AND epoch = ?3 AND first_seq = ?4",
                        params![key.0, key.1, key.2 as i64, *first as i64],
                    )?;
                }
            }
            for (first, last) in current {
                tx.execute(
                    "INSERT INTO dedup (device, stream, epoch, first_seq, last_seq) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (device, stream, epoch, first_seq) DO UPDATE SET last_seq = excluded.last_seq",
                    params![key.0, key.1, key.2 as i64, first as i64, last as i64],
                )?;
            }
        }
        tx.commit()?;
        if self.dedup.len() > DEDUP_CACHE_SCOPES {
            let mut by_age: Vec<(u64, DedupScope)> = self
                .dedup
                .iter()
                .map(|(k, c)| (c.last_used, k.clone()))
                .collect();
            by_age.sort_unstable();
            for (_, key) in by_age.into_iter().take(DEDUP_CACHE_SCOPES / 4) {
                self.dedup.remove(&key);
            }
        }
        Ok(acks)
    }

    /// Deletes what the retention no longer keeps, oldest first, in transactions of at most
    /// [`SWEEP_CHUNK`] records and at most [`SWEEP_BUDGET`] records per sweep (appends wait
    /// meanwhile; what is left waits for the next sweep). Returns the records deleted.
    fn sweep(&mut self) -> rusqlite::Result<u64> {
        self.fresh_caches()?;
        let mut budget = SWEEP_BUDGET;
        let mut deleted = 0;
        let names: Vec<String> = self.topics.keys().cloned().collect();
        for name in names {
            if budget == 0 {
                break;
            }
            let Some(start) = self.first_offset(&name)? else {
                continue;
            };
            let layout = self.layout;
            let topic = layout.topic(&name, self.topics[&name].id);
            // Every scan below stops at the budget: what lies beyond waits for the next sweep.
            let horizon = (start + budget).min(self.topics[&name].next_offset);
            let mut cut = start;
            if let Some(max_age) = self.retention.max_age {
                let cutoff = crate::api::now_ms().saturating_sub(max_age.as_millis() as i64);
                let first_young: Option<i64> = self
                    .conn
                    .query_row(
                        &layout.first_ingested_since(),
                        params![topic, start as i64, horizon as i64, cutoff],
                        |row| row.get(0),
                    )
                    .optional()?;
                cut = first_young.map_or(horizon, |o| o as u64);
            }
            if let Some(max_bytes) = self.retention.max_bytes_per_topic {
                let held = self.topics[&name].bytes;
                if held > max_bytes {
                    let mut excess = held - max_bytes;
                    let mut stmt = self.conn.prepare_cached(&layout.sizes())?;
                    let mut rows = stmt.query(params![topic, start as i64, horizon as i64])?;
                    while let Some(row) = rows.next()? {
                        let (offset, len): (i64, i64) = (row.get(0)?, row.get(1)?);
                        cut = cut.max(offset as u64 + 1);
                        excess = excess.saturating_sub(len as u64);
                        if excess == 0 {
                            break;
                        }
                    }
                }
            }
            let mut from = start;
            while from < cut && budget > 0 {
                let to = cut.min(from + SWEEP_CHUNK.min(budget));
                let tx = self.conn.transaction()?;
                let (rows, bytes): (i64, i64) = tx.query_row(
                    &layout.count(),
                    params![topic, from as i64, to as i64],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )?;
                tx.execute(&layout.delete(), params![topic, from as i64, to as i64])?;
                let t = self.topics.get_mut(&name).expect("invariant: listed above");
                let left = t.bytes.saturating_sub(bytes as u64);
                tx.execute(
                    "UPDATE topics SET bytes = ?2 WHERE name = ?1",
                    params![name, left as i64],
                )?;
                tx.commit()?;
                t.bytes = left;
                deleted += rows as u64;
                budget = budget.saturating_sub(to - from);
                from = to;
            }
        }
        if deleted > 0 {
            tracing::info!(deleted, "embedded log retention deleted old records");
        }
        Ok(deleted)
    }

    /// The smallest offset `topic` still holds, if it holds any record.
    fn first_offset(&self, topic: &str) -> rusqlite::Result<Option<u64>> {
        first_offset(&self.conn, self.layout, topic, self.topics[topic].id)
    }
}

/// Brings a log file written by an older version up to the current schema.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    if !has_column(conn, "topics", "bytes")? {
        conn.execute_batch(
            "BEGIN;
             ALTER TABLE topics ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;
             UPDATE topics SET bytes = (SELECT coalesce(sum(length(payload)), 0) FROM records WHERE topic = topics.name);
             COMMIT;",
        )?;
    }
    // A log older than topic ids has its (topic, offset) index: Layout::Indexed, no ids
    // needed; topics without a tenant do not count towards max_topics_per_tenant.
    for (table, column, kind) in [
        ("topics", "id", "INTEGER"),
        ("topics", "tenant", "TEXT"),
        ("records", "corrected_at_ms", "INTEGER"),
        ("records", "boot_id", "TEXT"),
        ("records", "monotonic_ms", "INTEGER"),
        ("records", "attributes", "TEXT"),
    ] {
        if !has_column(conn, table, column)? {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {kind}"))?;
        }
    }
    Ok(())
}

/// Whether `table` has `column`.
fn has_column(conn: &Connection, table: &str, column: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT count(*) FROM pragma_table_info(?1) WHERE name = ?2",
        [table, column],
        |row| row.get::<_, i64>(0).map(|n| n > 0),
    )
}

/// The smallest offset topic `name` (id `id`) holds, if it holds any record.
fn first_offset(
    conn: &Connection,
    layout: Layout,
    name: &str,
    id: u64,
) -> rusqlite::Result<Option<u64>> {
    conn.prepare_cached(&layout.first())?
        .query_row(params![layout.topic(name, id), 0, i64::MAX], |row| {
            row.get::<_, i64>(0)
        })
        .optional()
        .map(|o| o.map(|o| o as u64))
}

/// A record's attributes as stored: a JSON object, or NULL when it has none.
fn attributes_json(attributes: &[ingest_wire::Attribute]) -> Option<String> {
    (!attributes.is_empty()).then(|| {
        let map: BTreeMap<&str, &str> = attributes
            .iter()
            .map(|a| (a.key.as_str(), a.value.as_str()))
            .collect();
        serde_json::to_string(&map).expect("invariant: a map of strings serialises")
    })
}

fn load_topics(conn: &Connection) -> rusqlite::Result<HashMap<String, TopicState>> {
    let mut stmt = conn.prepare("SELECT name, next_offset, bytes, coalesce(id, 0) FROM topics")?;
    let rows = stmt.query_map([], |row| {
        Ok((
            row.get::<_, String>(0)?,
            TopicState {
                id: row.get::<_, i64>(3)? as u64,
                next_offset: row.get::<_, i64>(1)? as u64,
                bytes: row.get::<_, i64>(2)? as u64,
            },
        ))
    })?;
    rows.collect()
}

/// Topics per tenant, of those that recorded their tenant.
fn load_tenants(conn: &Connection) -> rusqlite::Result<HashMap<String, u64>> {
    let mut stmt = conn
        .prepare("SELECT tenant, count(*) FROM topics WHERE tenant IS NOT NULL GROUP BY tenant")?;
    let rows = stmt.query_map([], |row| {
        Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)? as u64))
    })?;
    rows.collect()
}

/// The id a new topic gets: one past the largest (ids start at 1).
fn next_topic_id(topics: &HashMap<String, TopicState>) -> u64 {
    topics.values().map(|t| t.id).max().unwrap_or(0) + 1
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
            let log = EmbeddedLog::open(&path, Retention::default(), 1_000).expect("open");
            let ack = log.publish(delivery(1..4)).await.expect("publish");
            assert_eq!((ack.accepted, ack.duplicates), (3, 0));
            let ack = log.publish(delivery(2..6)).await.expect("publish");
            assert_eq!((ack.accepted, ack.duplicates), (2, 2));
        }
        let log = EmbeddedLog::open(&path, Retention::default(), 1_000).expect("reopen");
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

    /// A writer on a fresh file, driven directly (no thread), and a job for it.
    fn writer(path: &Path, retention: Retention) -> Writer {
        Writer::new(Connection::open(path).expect("open"), retention, 1_000).expect("writer")
    }

    /// The schema an older version created: the same tables, the `(topic, offset)` index,
    /// no topic ids.
    const OLDER_SCHEMA: &str = "
        CREATE TABLE topics (name TEXT PRIMARY KEY, next_offset INTEGER NOT NULL, bytes INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
        CREATE TABLE records (id INTEGER PRIMARY KEY, topic TEXT NOT NULL, offset INTEGER NOT NULL, device TEXT NOT NULL, stream TEXT NOT NULL, epoch INTEGER NOT NULL, seq INTEGER NOT NULL, mqtt_topic TEXT NOT NULL, qos INTEGER, received_at_ms INTEGER NOT NULL, sent_at_ms INTEGER NOT NULL, ingested_at_ms INTEGER NOT NULL, payload BLOB NOT NULL, corrected_at_ms INTEGER, boot_id TEXT, monotonic_ms INTEGER, attributes TEXT);
        CREATE UNIQUE INDEX records_by_offset ON records (topic, offset);
        CREATE TABLE dedup (device TEXT NOT NULL, stream TEXT NOT NULL, epoch INTEGER NOT NULL, first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL, PRIMARY KEY (device, stream, epoch, first_seq)) WITHOUT ROWID;
    ";

    /// The path of a log file in `dir`: none yet, or one an older version created (`older`).
    fn log_file(dir: &Path, older: bool) -> std::path::PathBuf {
        let path = dir.join("log.db");
        if older {
            let conn = Connection::open(&path).expect("open");
            conn.execute_batch(OLDER_SCHEMA).expect("older schema");
        }
        path
    }

    fn on_topic(topic: &str, seqs: std::ops::Range<u64>) -> Delivery {
        let mut d = delivery(seqs);
        d.topic = topic.into();
        d.batch.stream = topic.into();
        d
    }

    fn seqs_of(path: &Path, topic: &str, from: u64) -> Vec<(u64, u64)> {
        read(path, topic, from, 1000)
            .expect("read")
            .iter()
            .map(|r| (r.offset, r.seq))
            .collect()
    }

    /// Both layouts give the same answers: appends to interleaved topics, reads from an
    /// offset, the topics' ranges, and the retention.
    #[test]
    fn a_new_log_finds_records_by_rowid_and_an_older_one_through_its_index() {
        for older in [false, true] {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = log_file(dir.path(), older);
            if older {
                let conn = Connection::open(&path).expect("open");
                conn.execute(
                    "INSERT INTO records (topic, offset, device, stream, epoch, seq, mqtt_topic, received_at_ms, sent_at_ms, ingested_at_ms, payload) VALUES ('iot.acme.a', 0, 'd1', 'a', 0, 100, 's/1', 1, 2, 3, x'00')",
                    [],
                )
                .expect("an older record");
                conn.execute(
                    "INSERT INTO topics (name, next_offset, bytes) VALUES ('iot.acme.a', 1, 1)",
                    [],
                )
                .expect("its topic");
            }
            let mut w = writer(
                &path,
                Retention {
                    max_age: None,
                    max_bytes_per_topic: Some(8),
                },
            );
            let want = if older {
                Layout::Indexed
            } else {
                Layout::Rowid
            };
            assert_eq!(w.layout, want);
            let base = u64::from(older);
            w.commit(&[
                job(on_topic("iot.acme.a", 1..4)),
                job(on_topic("iot.acme.b", 1..3)),
            ])
            .expect("commit");
            w.commit(&[job(on_topic("iot.acme.a", 4..6))])
                .expect("commit");
            let a: Vec<(u64, u64)> = (1..6).map(|s| (s - 1 + base, s)).collect();
            let mut want_a = if older { vec![(0, 100)] } else { vec![] };
            want_a.extend(a);
            assert_eq!(seqs_of(&path, "iot.acme.a", 0), want_a, "older={older}");
            assert_eq!(
                seqs_of(&path, "iot.acme.a", 2),
                want_a[2..],
                "older={older}"
            );
            assert_eq!(seqs_of(&path, "iot.acme.b", 0), vec![(0, 1), (1, 2)]);
            assert!(seqs_of(&path, "iot.acme.c", 0).is_empty());
            assert!(seqs_of(&path, "iot.acme.a", u64::MAX).is_empty());
            // 2 bytes a record, 8 kept: the newest four of each topic.
            w.sweep().expect("sweep");
            let listed: Vec<(String, u64, u64)> = topics(&path)
                .expect("topics")
                .into_iter()
                .map(|t| (t.topic, t.start_offset, t.end_offset))
                .collect();
            let end_a = 5 + base;
            assert_eq!(
                listed,
                vec![
                    ("iot.acme.a".to_owned(), end_a - 4, end_a),
                    ("iot.acme.b".to_owned(), 0, 2),
                ],
                "older={older}"
            );
            assert_eq!(seqs_of(&path, "iot.acme.a", 0), want_a[want_a.len() - 4..]);
        }
    }

    /// Every statement on `records` ([`Layout::statements`], the ones the writer and the reader
    /// run) searches a rowid range in a new log and the `(topic, offset)` index in an older
    /// one, and never sorts.
    #[test]
    fn every_statement_searches_its_layouts_range_and_never_sorts() {
        for older in [false, true] {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = log_file(dir.path(), older);
            let w = writer(&path, Retention::default());
            let want = if older {
                "INDEX records_by_offset (topic=? AND offset>? AND offset<?)"
            } else {
                "USING INTEGER PRIMARY KEY (rowid>? AND rowid<?)"
            };
            for sql in w.layout.statements() {
                let mut stmt = w
                    .conn
                    .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                    .expect("explain");
                let values: Vec<rusqlite::types::Value> = vec![
                    w.layout.topic("iot.acme.t", 1),
                    0.into(),
                    i64::MAX.into(),
                    0.into(),
                ];
                let values = values.into_iter().take(stmt.parameter_count());
                let plan: Vec<String> = stmt
                    .query_map(rusqlite::params_from_iter(values), |row| {
                        row.get::<_, String>(3)
                    })
                    .expect("plan")
                    .collect::<rusqlite::Result<_>>()
                    .expect("rows");
                let plan = plan.join("; ");
                assert!(plan.contains(want), "older={older} {sql}: {plan}");
                assert!(!plan.contains("TEMP B-TREE"), "{sql}: {plan}");
            }
        }
    }

    /// Rows and topics in the file, straight from SQLite.
    fn stored(path: &Path) -> (i64, i64) {
        let conn = Connection::open(path).expect("open");
        let count = |sql| conn.query_row(sql, [], |r| r.get(0)).expect("count");
        (
            count("SELECT count(*) FROM records"),
            count("SELECT count(*) FROM topics"),
        )
    }

    /// The last topic id and the last offset a topic can have are used (the range's bounds
    /// stay within i64 there); a batch past either is refused as full with the reason, before
    /// anything of it is written, and the log stays ready for the others.
    #[tokio::test]
    async fn a_batch_past_the_last_topic_id_or_offset_is_refused_and_nothing_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.db");
        {
            let conn = Connection::open(&path).expect("open");
            conn.execute_batch(SCHEMA).expect("schema");
            conn.execute(
                "INSERT INTO topics (name, next_offset, bytes, id, tenant) VALUES ('iot.acme.full', ?1, 0, ?2, 'acme')",
                params![(OFFSET_LIMIT - 2) as i64, MAX_TOPICS as i64],
            )
            .expect("the last topic id, near its last offset");
        }
        let log = EmbeddedLog::open(&path, Retention::default(), 1_000).expect("open");
        let refused = log
            .publish(on_topic("iot.acme.full", 1..4))
            .await
            .expect_err("3 records past the last offset");
        assert!(
            matches!(&refused, PublishError::Full { reason } if reason.contains("has used the")),
            "{refused}"
        );
        assert_eq!(stored(&path), (0, 1));
        assert!(log.is_ready(), "a full topic does not make the log unready");
        let ack = log
            .publish(on_topic("iot.acme.full", 1..3))
            .await
            .expect("the last two offsets");
        assert_eq!(ack.accepted, 2);
        let last = OFFSET_LIMIT - 1;
        assert_eq!(
            seqs_of(&path, "iot.acme.full", 0),
            vec![(last - 1, 1), (last, 2)]
        );
        assert_eq!(seqs_of(&path, "iot.acme.full", last), vec![(last, 2)]);
        assert!(seqs_of(&path, "iot.acme.full", OFFSET_LIMIT).is_empty());
        assert!(seqs_of(&path, "iot.acme.full", u64::MAX).is_empty());
        let listed = &topics(&path).expect("topics")[0];
        assert_eq!(
            (listed.start_offset, listed.end_offset),
            (last - 1, OFFSET_LIMIT)
        );
        let mut other = on_topic("iot.beta.t", 1..2);
        other.tenant = "beta".into();
        let refused = log.publish(other).await.expect_err("no topic id left");
        assert!(
            matches!(&refused, PublishError::Full { reason } if reason.contains("topics, its limit")),
            "{refused}"
        );
        assert_eq!(stored(&path), (2, 1), "nothing of it written");
        assert!(log.is_ready(), "a full log does not make the log unready");
        let ack = log
            .publish(on_topic("iot.acme.full", 1..3))
            .await
            .expect("the others go on");
        assert_eq!(ack.duplicates, 2);
    }

    /// A tenant's topics stop at `max_topics_per_tenant`, counted across the jobs of one group
    /// commit and across a reopen; other tenants and existing topics go on; a batch of
    /// duplicates only creates no topic.
    #[test]
    fn a_tenants_new_topics_stop_at_its_limit_within_a_group_and_after_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.db");
        let with_reply = |d: Delivery| {
            let (reply, answer) = oneshot::channel();
            (Job { delivery: d, reply }, answer)
        };
        let for_tenant = |tenant: &str, stream: &str, seqs| {
            let mut d = on_topic(&format!("iot.{tenant}.{stream}"), seqs);
            d.tenant = tenant.into();
            d
        };
        {
            let mut w = Writer::new(
                Connection::open(&path).expect("open"),
                Retention::default(),
                2,
            )
            .expect("writer");
            w.commit(&[job(for_tenant("acme", "a", 1..3))])
                .expect("commit");
            // Only duplicates, on a new topic name (the same scope): no topic is created.
            let mut again = for_tenant("acme", "a", 1..3);
            again.topic = "iot.acme.renamed".into();
            let (jobs, mut answers): (Vec<_>, Vec<_>) = [
                again,
                for_tenant("acme", "b", 1..2),
                for_tenant("acme", "b", 2..3),
                for_tenant("acme", "c", 1..2),
                for_tenant("beta", "a", 1..2),
            ]
            .into_iter()
            .map(with_reply)
            .unzip();
            w.append(jobs);
            let answers: Vec<_> = answers
                .iter_mut()
                .map(|a| a.try_recv().expect("answered"))
                .collect();
            assert_eq!(answers[0].as_ref().expect("duplicates").duplicates, 2);
            assert_eq!(
                answers[1].as_ref().expect("acme's second topic").accepted,
                1
            );
            assert_eq!(answers[2].as_ref().expect("an existing topic").accepted, 1);
            assert!(
                matches!(&answers[3], Err(PublishError::Refused { reason }) if reason.contains("tenant acme has 2 topics")),
                "{:?}",
                answers[3]
            );
            assert_eq!(answers[4].as_ref().expect("another tenant").accepted, 1);
        }
        let names: Vec<String> = topics(&path)
            .expect("topics")
            .into_iter()
            .map(|t| t.topic)
            .collect();
        assert_eq!(names, ["iot.acme.a", "iot.acme.b", "iot.beta.a"]);
        let mut w = Writer::new(
            Connection::open(&path).expect("open"),
            Retention::default(),
            2,
        )
        .expect("reopen");
        let (job, mut answer) = with_reply(for_tenant("acme", "c", 1..2));
        w.append(vec![job]);
        assert!(matches!(
            answer.try_recv(),
            Ok(Err(PublishError::Refused { .. }))
        ));
    }

    /// A log whose topics have ids but no tenants (written between the two changes) gets the
    /// tenant column and goes on in the Rowid layout.
    #[test]
    fn a_log_with_topic_ids_but_no_tenants_gets_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.db");
        {
            let conn = Connection::open(&path).expect("open");
            conn.execute_batch(
                &OLDER_SCHEMA
                    .replace(
                        "bytes INTEGER NOT NULL DEFAULT 0)",
                        "bytes INTEGER NOT NULL DEFAULT 0, id INTEGER)",
                    )
                    .replace(
                        "CREATE UNIQUE INDEX records_by_offset ON records (topic, offset);",
                        "",
                    ),
            )
            .expect("schema with ids, without tenants");
        }
        let mut w = writer(&path, Retention::default());
        assert_eq!(w.layout, Layout::Rowid);
        w.commit(&[job(on_topic("iot.acme.a", 1..3))])
            .expect("commit")
            .into_iter()
            .for_each(|a| assert_eq!(a.expect("room").accepted, 2));
        assert_eq!(load_tenants(&w.conn).expect("tenants")["acme"], 1);
        assert_eq!(seqs_of(&path, "iot.acme.a", 0), vec![(0, 1), (1, 2)]);
    }

    /// A new log that an older version opened (it creates the index and appends with rowids
    /// of SQLite's choosing, topics without ids) is read through the index from then on, with
    /// every record in offset order.
    #[test]
    fn a_new_log_an_older_version_wrote_to_is_read_through_the_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.db");
        {
            let mut w = writer(&path, Retention::default());
            assert_eq!(w.layout, Layout::Rowid);
            w.commit(&[
                job(on_topic("iot.acme.a", 1..3)),
                job(on_topic("iot.acme.b", 1..2)),
            ])
            .expect("commit");
        }
        {
            // What the older version does at its start and on its appends.
            let conn = Connection::open(&path).expect("open");
            conn.execute_batch(
                "CREATE UNIQUE INDEX IF NOT EXISTS records_by_offset ON records (topic, offset);
                 INSERT INTO records (topic, offset, device, stream, epoch, seq, mqtt_topic, received_at_ms, sent_at_ms, ingested_at_ms, payload) VALUES ('iot.acme.a', 2, 'd1', 'iot.acme.a', 0, 3, 's/1', 1, 2, 3, x'00');
                 INSERT INTO records (topic, offset, device, stream, epoch, seq, mqtt_topic, received_at_ms, sent_at_ms, ingested_at_ms, payload) VALUES ('iot.acme.c', 0, 'd1', 'iot.acme.c', 0, 1, 's/1', 1, 2, 3, x'00');
                 UPDATE topics SET next_offset = 3 WHERE name = 'iot.acme.a';
                 INSERT INTO topics (name, next_offset, bytes) VALUES ('iot.acme.c', 1, 1);",
            )
            .expect("the older version's writes");
        }
        let mut w = writer(&path, Retention::default());
        assert_eq!(w.layout, Layout::Indexed);
        w.commit(&[
            job(on_topic("iot.acme.a", 4..5)),
            job(on_topic("iot.acme.c", 2..3)),
            job(on_topic("iot.acme.d", 1..2)),
        ])
        .expect("commit");
        assert_eq!(
            seqs_of(&path, "iot.acme.a", 0),
            vec![(0, 1), (1, 2), (2, 3), (3, 4)]
        );
        assert_eq!(seqs_of(&path, "iot.acme.b", 0), vec![(0, 1)]);
        assert_eq!(seqs_of(&path, "iot.acme.c", 0), vec![(0, 1), (1, 2)]);
        assert_eq!(seqs_of(&path, "iot.acme.d", 0), vec![(0, 1)]);
        let listed: Vec<(String, u64, u64)> = topics(&path)
            .expect("topics")
            .into_iter()
            .map(|t| (t.topic, t.start_offset, t.end_offset))
            .collect();
        assert_eq!(listed[0], ("iot.acme.a".to_owned(), 0, 4));
    }

    fn job(delivery: Delivery) -> Job {
        Job {
            delivery,
            reply: oneshot::channel().0,
        }
    }

    fn with_seqs(seqs: &[u64]) -> Delivery {
        let mut d = delivery(0..0);
        let template = delivery(0..1).batch.records[0].clone();
        d.batch.records = seqs
            .iter()
            .map(|&seq| Record {
                seq,
                ..template.clone()
            })
            .collect();
        d
    }

    fn stored_ranges(w: &Writer) -> Vec<(u64, u64)> {
        let mut stmt = w
            .conn
            .prepare("SELECT first_seq, last_seq FROM dedup ORDER BY first_seq")
            .expect("prepare");
        stmt.query_map([], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
        })
        .expect("query")
        .collect::<rusqlite::Result<_>>()
        .expect("rows")
    }

    /// A scope of 5,000 ranges (every other sequence number): a commit of one record writes
    /// the ranges it changed, not the 5,000 (the old code deleted and rewrote them all).
    #[test]
    fn a_commit_writes_only_the_dedup_ranges_it_changed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = writer(&dir.path().join("log.db"), Retention::default());
        let evens: Vec<u64> = (0..5_000).map(|i| i * 2).collect();
        w.commit(&[job(with_seqs(&evens))]).expect("commit");
        assert_eq!(stored_ranges(&w).len(), 5_000);
        for (seqs, want_ranges) in [
            (vec![1], 4_999),
            (vec![9_999], 4_999),
            (vec![20_001], 5_000),
        ] {
            let before = w.conn.total_changes();
            let acks = w.commit(&[job(with_seqs(&seqs))]).expect("commit");
            let acks: Vec<BatchAck> = acks.into_iter().map(|a| a.expect("room")).collect();
            assert_eq!(acks[0].accepted, 1);
            let writes = w.conn.total_changes() - before;
            assert!(writes <= 4, "{seqs:?}: {writes} rows written");
            let stored = stored_ranges(&w);
            assert_eq!(stored.len(), want_ranges, "{seqs:?}");
            let key = with_seqs(&[]).scope();
            let memory: Vec<_> = w.dedup[&key].set.iter().collect();
            assert_eq!(stored, memory, "the file holds what memory holds");
        }
        assert_eq!(stored_ranges(&w)[0], (0, 2));
    }

    /// Caches a failure left that could not be rebuilt then are rebuilt before the next commit
    /// or sweep, which fail while they cannot be: offsets go on from what the file holds.
    #[test]
    fn caches_that_could_not_be_rebuilt_are_rebuilt_before_the_next_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.db");
        let mut w = writer(&path, Retention::default());
        w.commit(&[job(with_seqs(&[1, 2]))]).expect("commit");
        // What a failed transaction may leave in memory, and a file the caches cannot be read
        // from for now.
        w.topics.get_mut("iot.acme.t").expect("topic").next_offset = 50;
        w.conn
            .execute_batch("ALTER TABLE topics RENAME TO topics_away")
            .expect("rename");
        w.reload();
        assert!(w.stale);
        assert!(
            w.commit(&[job(with_seqs(&[3]))]).is_err(),
            "no commit with stale caches"
        );
        assert!(w.sweep().is_err(), "no sweep with stale caches");
        w.conn
            .execute_batch("ALTER TABLE topics_away RENAME TO topics")
            .expect("rename back");
        w.sweep().expect("sweep");
        assert!(!w.stale);
        w.topics.get_mut("iot.acme.t").expect("topic").next_offset = 50;
        w.stale = true;
        let acks = w.commit(&[job(with_seqs(&[3]))]).expect("commit");
        assert_eq!(acks[0].as_ref().expect("room").accepted, 1);
        assert!(!w.stale);
        assert_eq!(
            seqs_of(&path, "iot.acme.t", 0),
            vec![(0, 1), (1, 2), (2, 3)]
        );
    }

    #[test]
    fn retention_deletes_old_and_excess_records_oldest_first_and_keeps_dedup() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.db");
        let mut w = writer(
            &path,
            Retention {
                max_age: Some(std::time::Duration::from_secs(3600)),
                max_bytes_per_topic: Some(10),
            },
        );
        // Ten records ingested long ago (ms 3), then twenty of 2 bytes each now.
        w.commit(&[job(with_seqs(&(1..11).collect::<Vec<_>>()))])
            .expect("commit");
        let mut fresh = with_seqs(&(11..31).collect::<Vec<_>>());
        fresh.ingested_at_ms = crate::api::now_ms();
        w.commit(&[job(fresh)]).expect("commit");
        assert_eq!(
            w.sweep().expect("sweep"),
            25,
            "10 too old, 15 past 10 bytes"
        );
        let t = &topics(&path).expect("topics")[0];
        assert_eq!((t.start_offset, t.end_offset, t.bytes), (25, 30, 10));
        let left: Vec<u64> = read(&path, "iot.acme.t", 0, 100)
            .expect("read")
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(left, (26..31).collect::<Vec<_>>(), "the newest five");
        let acks = w.commit(&[job(with_seqs(&[1, 2, 31]))]).expect("commit");
        let acks: Vec<BatchAck> = acks.into_iter().map(|a| a.expect("room")).collect();
        assert_eq!(
            (acks[0].accepted, acks[0].duplicates),
            (1, 2),
            "deleted records are still known: a late retry is not appended again"
        );
        assert_eq!(w.sweep().expect("sweep"), 1, "one more over the byte limit");
        let reopened = load_topics(&w.conn).expect("topics");
        assert_eq!(reopened["iot.acme.t"].bytes, 10);
        assert_eq!(reopened["iot.acme.t"].next_offset, 31);
    }

    #[test]
    fn a_read_stops_at_its_byte_budget_but_always_gives_one_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.db");
        let mut w = writer(&path, Retention::default());
        w.commit(&[job(with_seqs(&(1..11).collect::<Vec<_>>()))])
            .expect("commit");
        let reader = Reader::open(&path).expect("reader");
        let offsets = |from, max_bytes| {
            let mut seen = Vec::new();
            reader
                .each("iot.acme.t", from, 100, max_bytes, |r| {
                    seen.push(r.offset);
                    true
                })
                .expect("read");
            seen
        };
        // Each payload is 2 bytes, 4 as base64.
        assert_eq!(offsets(0, 12), vec![0, 1, 2]);
        assert_eq!(offsets(3, 1), vec![3], "one record even over the budget");
        assert_eq!(offsets(8, u64::MAX), vec![8, 9]);
    }
}
