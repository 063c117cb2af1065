//! `edge-agent status`: how far behind a gateway is, at a glance.
//!
//! From a running agent (`GET /status` on its `metrics_listen`): per stream the records and
//! bytes waiting, the oldest one's age, the drain rate over the last minute and an ETA; the
//! link, the last error, whether delivery is degraded; losses by stream and reason; the buffer
//! file, the free disk, and the bytes the agent wrote to disk per record buffered. From a
//! stopped agent's buffer file (read-only): what each stream holds and its oldest record, the
//! dead letters, the file and the free disk. The same [`Status`] either way: a table for
//! people, JSON (`--json`) for scripts.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::buffer::space::Volume;
use crate::metrics::Metrics;

/// What `status` reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Where the figures come from: `running agent` or `buffer file (agent not running)`.
    pub source: String,
    /// Per stream.
    pub streams: Vec<StreamStatus>,
    /// Whether the last request reached the ingest (running agent only).
    pub link_up: Option<bool>,
    /// Delivery stuck with the link up (running agent only; see `agent_degraded`).
    pub degraded: Option<bool>,
    /// The forwarder's last failure, and how long ago (running agent only).
    pub last_error: Option<String>,
    /// Seconds since `last_error`.
    pub last_error_age_seconds: Option<f64>,
    /// Records dropped since the agent started, by stream and reason (running agent only).
    pub losses: Vec<Loss>,
    /// Records in the dead-letter table (buffer file only).
    pub dead_letters: Option<u64>,
    /// The buffer file's size, with its WAL.
    pub buffer_file_bytes: u64,
    /// Free space on the buffer's volume.
    pub free_disk_bytes: u64,
    /// Bytes the agent wrote to disk since it started (running agent only).
    pub disk_written_bytes: Option<u64>,
    /// `disk_written_bytes` over the records buffered since it started.
    pub disk_bytes_per_record: Option<f64>,
    /// Flash write amplification: `disk_written_bytes` over the topic and payload bytes of
    /// the records buffered since it started (running agent only).
    #[serde(default)]
    pub write_amplification: Option<f64>,
}

/// One stream's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamStatus {
    /// Stream name.
    pub name: String,
    /// Its priority class (running agent only).
    pub priority: Option<String>,
    /// Records waiting in the buffer.
    pub records_waiting: u64,
    /// Their bytes (topic and payload).
    pub bytes_waiting: u64,
    /// Seconds since the oldest waiting record was received.
    pub oldest_age_seconds: Option<f64>,
    /// Records delivered per second over the last minute (running agent only).
    pub drain_records_per_second: Option<f64>,
    /// `records_waiting` over how fast the backlog shrinks (delivered minus arriving), while
    /// it shrinks.
    pub eta_seconds: Option<f64>,
}

/// Records dropped for one reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Loss {
    /// Stream.
    pub stream: String,
    /// Why (`quota`, `ttl`, `disk_full`, …).
    pub reason: String,
    /// How many.
    pub records: u64,
}

/// Samples of each stream's delivered count, for the drain rate: one every
/// [`SAMPLE_EVERY`], the last minute of them.
#[derive(Debug, Default)]
pub struct Drain {
    /// When, and per stream (records delivered, records buffered) since the start.
    samples: Mutex<VecDeque<(Instant, Counts)>>,
}

/// Per stream: (records delivered, records buffered) since the start.
type Counts = BTreeMap<String, (u64, u64)>;

/// How often [`Drain`] samples.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);

impl Drain {
    /// Takes a sample of `metrics` now, keeping a minute of them.
    pub fn sample(&self, metrics: &Metrics) {
        let now = Instant::now();
        let buffered: BTreeMap<String, u64> =
            counter_values(metrics, crate::metrics::RECORDS_BUFFERED, "stream")
                .into_iter()
                .collect();
        let counts = counter_values(metrics, crate::metrics::RECORDS_DELIVERED, "stream")
            .into_iter()
            .map(|(stream, delivered)| {
                let b = buffered.get(&stream).copied().unwrap_or(0);
                (stream, (delivered, b))
            })
            .collect();
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        samples.push_back((now, counts));
        while samples
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > Duration::from_secs(60))
        {
            samples.pop_front();
        }
    }

    /// For `stream`, between the oldest and newest sample: records delivered per second, and
    /// how fast its backlog shrinks (delivered minus newly buffered, per second).
    fn rates(&self, stream: &str) -> Option<(f64, f64)> {
        let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let ((t0, first), (t1, last)) = (samples.front()?, samples.back()?);
        let seconds = t1.duration_since(*t0).as_secs_f64();
        (seconds > 0.0).then(|| {
            let get = |m: &Counts| m.get(stream).copied().unwrap_or((0, 0));
            let ((d0, b0), (d1, b1)) = (get(first), get(last));
            let delivered = d1.saturating_sub(d0) as f64;
            let buffered = b1.saturating_sub(b0) as f64;
            (delivered / seconds, (delivered - buffered) / seconds)
        })
    }
}

/// Every value of counter or gauge `name`, by its label `label`.
fn counter_values(metrics: &Metrics, name: &str, label: &str) -> Vec<(String, u64)> {
    labelled(metrics, name, &[label])
        .into_iter()
        .map(|(mut labels, v)| (labels.remove(0), v))
        .collect()
}

/// Every value of metric `name`, with the values of `labels`.
fn labelled(metrics: &Metrics, name: &str, labels: &[&str]) -> Vec<(Vec<String>, u64)> {
    let Some(family) = metrics.gather().into_iter().find(|f| f.name() == name) else {
        return Vec::new();
    };
    let counter = family.get_field_type() == prometheus::proto::MetricType::COUNTER;
    family
        .get_metric()
        .iter()
        .map(|m| {
            let values = labels
                .iter()
                .map(|l| {
                    m.get_label()
                        .iter()
                        .find(|p| p.name() == *l)
                        .map_or(String::new(), |p| p.value().to_owned())
                })
                .collect();
            let value = if counter {
                m.get_counter().get_value()
            } else {
                m.get_gauge().get_value()
            };
            (values, value.max(0.0) as u64)
        })
        .collect()
}

/// The name of a priority class from its [`crate::metrics::STREAM_PRIORITY`] value.
fn priority_name(value: u64) -> &'static str {
    use crate::routing::Priority;
    [
        Priority::Bulk,
        Priority::Normal,
        Priority::High,
        Priority::Critical,
    ]
    .into_iter()
    .find(|p| *p as u64 == value)
    .map_or("?", Priority::as_str)
}

/// The buffer file's bytes with its WAL.
fn file_bytes(path: &Path) -> u64 {
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    size(path) + size(&crate::buffer::space::side(path, "-wal"))
}

impl Status {
    /// A running agent's status, from its metrics and drain samples.
    pub fn live(metrics: &Metrics, drain: &Drain, buffer: &Path) -> Status {
        let records: BTreeMap<String, u64> =
            counter_values(metrics, crate::metrics::BACKLOG_RECORDS, "stream")
                .into_iter()
                .collect();
        let bytes: BTreeMap<String, u64> =
            counter_values(metrics, crate::metrics::BACKLOG_BYTES, "stream")
                .into_iter()
                .collect();
        let ages: BTreeMap<String, Option<f64>> = metrics.oldest_ages().into_iter().collect();
        let priorities: BTreeMap<String, u64> =
            counter_values(metrics, crate::metrics::STREAM_PRIORITY, "stream")
                .into_iter()
                .collect();
        let streams = records
            .iter()
            .map(|(name, &waiting)| {
                let rates = drain.rates(name);
                StreamStatus {
                    name: name.clone(),
                    priority: priorities.get(name).map(|&p| priority_name(p).to_owned()),
                    records_waiting: waiting,
                    bytes_waiting: bytes.get(name).copied().unwrap_or(0),
                    oldest_age_seconds: ages.get(name).copied().flatten(),
                    drain_records_per_second: rates.map(|(delivered, _)| delivered),
                    // Only while the backlog shrinks: records still arriving count against it.
                    eta_seconds: rates
                        .map(|(_, shrinking)| shrinking)
                        .filter(|r| *r > 0.0 && waiting > 0)
                        .map(|r| waiting as f64 / r),
                }
            })
            .collect();
        let losses = labelled(
            metrics,
            crate::metrics::RECORDS_DROPPED,
            &["stream", "reason"],
        )
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(l, records)| Loss {
            stream: l[0].clone(),
            reason: l[1].clone(),
            records,
        })
        .collect();
        let written = Metrics::disk_written_bytes();
        let buffered: u64 = counter_values(metrics, crate::metrics::RECORDS_BUFFERED, "stream")
            .iter()
            .map(|(_, n)| n)
            .sum();
        let buffered_bytes = metrics.buffered_bytes.get();
        let last_error = metrics.last_error();
        Status {
            source: "running agent".into(),
            streams,
            link_up: Some(metrics.link_up.get() == 1),
            degraded: Some(metrics.is_degraded()),
            last_error_age_seconds: last_error
                .as_ref()
                .map(|(at, _)| (crate::clock::now_ms() - at).max(0) as f64 / 1000.0),
            last_error: last_error.map(|(_, e)| e),
            losses,
            dead_letters: None,
            buffer_file_bytes: file_bytes(buffer),
            free_disk_bytes: Volume::of(buffer).map_or(0, |v| v.available),
            disk_written_bytes: written,
            disk_bytes_per_record: written
                .filter(|_| buffered > 0)
                .map(|w| w as f64 / buffered as f64),
            write_amplification: written
                .filter(|_| buffered_bytes > 0)
                .map(|w| w as f64 / buffered_bytes as f64),
        }
    }

    /// A stopped agent's status, from its buffer file (read-only; safe while nothing writes).
    pub fn from_buffer(path: &Path) -> rusqlite::Result<Status> {
        use rusqlite::{Connection, OpenFlags};
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        let now = crate::clock::now_ms();
        let layout = crate::buffer::Layout::of(&conn)?;
        let rows = layout.stream("r.", "s.id");
        let mut stmt = conn.prepare(&format!(
            "SELECT s.name,
                    (SELECT COUNT(*) FROM records r WHERE {rows}),
                    (SELECT COALESCE(SUM(length(CAST(r.topic AS BLOB)) + length(r.payload) + coalesce(length(r.attributes), 0)), 0) FROM records r WHERE {rows}),
                    ({})
             FROM streams s ORDER BY s.id",
            layout.oldest("received_at_ms", "s.id")
        ))?;
        let streams = stmt
            .query_map([], |r| {
                Ok(StreamStatus {
                    priority: None,
                    name: r.get(0)?,
                    records_waiting: r.get::<_, i64>(1)? as u64,
                    bytes_waiting: r.get::<_, i64>(2)? as u64,
                    oldest_age_seconds: r
                        .get::<_, Option<i64>>(3)?
                        .map(|at| (now - at).max(0) as f64 / 1000.0),
                    drain_records_per_second: None,
                    eta_seconds: None,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let dead_letters: i64 =
            conn.query_row("SELECT COUNT(*) FROM dead_letters", [], |r| r.get(0))?;
        Ok(Status {
            source: "buffer file (agent not running)".into(),
            streams,
            link_up: None,
            degraded: None,
            last_error: None,
            last_error_age_seconds: None,
            losses: Vec::new(),
            dead_letters: Some(dead_letters as u64),
            buffer_file_bytes: file_bytes(path),
            free_disk_bytes: Volume::of(path).map_or(0, |v| v.available),
            disk_written_bytes: None,
            disk_bytes_per_record: None,
            write_amplification: None,
        })
    }

    /// A readable table.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let dash = || "-".to_owned();
        let secs = |s: Option<f64>| {
            s.map_or_else(dash, |s| {
                format!(
                    "{}",
                    humantime::format_duration(Duration::from_secs(s.round() as u64))
                )
            })
        };
        let mut out = String::new();
        let _ = writeln!(out, "source: {}", self.source);
        let _ = writeln!(
            out,
            "{:<20} {:>9} {:>12} {:>12} {:>12} {:>12} {:>12}",
            "stream", "priority", "waiting", "bytes", "oldest", "drain/s", "eta"
        );
        for s in &self.streams {
            let _ = writeln!(
                out,
                "{:<20} {:>9} {:>12} {:>12} {:>12} {:>12} {:>12}",
                s.name,
                s.priority.as_deref().unwrap_or("-"),
                s.records_waiting,
                bytesize::ByteSize(s.bytes_waiting).to_string(),
                secs(s.oldest_age_seconds),
                s.drain_records_per_second
                    .map_or_else(dash, |r| format!("{r:.1}")),
                secs(s.eta_seconds),
            );
        }
        if let Some(up) = self.link_up {
            let _ = writeln!(out, "link: {}", if up { "up" } else { "down" });
        }
        if let Some(degraded) = self.degraded {
            let _ = writeln!(
                out,
                "degraded: {}",
                if degraded {
                    "YES: records wait, the ingest answers, nothing is delivered"
                } else {
                    "no"
                }
            );
        }
        if let Some(e) = &self.last_error {
            let _ = writeln!(
                out,
                "last error ({} ago): {e}",
                secs(self.last_error_age_seconds)
            );
        }
        for l in &self.losses {
            let _ = writeln!(
                out,
                "lost: {} records of {} ({})",
                l.records, l.stream, l.reason
            );
        }
        if let Some(n) = self.dead_letters {
            let _ = writeln!(out, "dead letters: {n}");
        }
        let _ = writeln!(
            out,
            "buffer file: {}, free disk: {}",
            bytesize::ByteSize(self.buffer_file_bytes),
            bytesize::ByteSize(self.free_disk_bytes)
        );
        if let Some(w) = self.disk_written_bytes {
            let per = match (self.disk_bytes_per_record, self.write_amplification) {
                (Some(p), Some(a)) => format!(
                    "{p:.0} B per record buffered, write amplification {a:.1}: bytes written per byte of topic and payload"
                ),
                (Some(p), None) => format!("{p:.0} B per record buffered"),
                _ => dash(),
            };
            let _ = writeln!(
                out,
                "written to disk since start: {} ({per})",
                bytesize::ByteSize(w)
            );
        }
        out
    }
}
